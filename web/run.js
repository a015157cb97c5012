// The run page: live charts with stages and decisions, the decision panel (a waiting proposal with its evidence
// and the operator's actions), the run's controls, stages and decisions as tables, and the audit log.

import { api, download, explain, mayAct, subscribe, whoami } from "./api.js";
import { ChartView, DECISION_KINDS, decisionKind, decisionNumber, describeAction } from "./charts.js";
import { fetchSeries, RunData } from "./rundata.js";
import { lastStep, StepMap } from "./series.js";
import { mountToolbar, readViewState, writeViewState } from "./toolbar.js";
import {
  ago, announce, fmtEpoch, fmtInt, fmtLr, fmtPercent, fmtValue, h, loadPlotly, renderHeader, runColor, seconds,
  throttled, timeElement,
} from "./ui.js";

const $ = (id) => document.getElementById(id);
const runId = Number(new URLSearchParams(location.search).get("id"));

// What the tests and the benchmark read: when the first chart was drawn, and which step of each key is on screen.
const hook = { runId, firstChart: null, drawnAt: null, lastDrawn: {}, errors: [] };
window.__stagewatch = hook;

const setLive = renderHeader("run");
const state = readViewState();
let view;
const data = new RunData(runId, { onChange: (what) => changed(what), needsTime: () => state.xmode === "time" });
let loaded = false;
// What the user may do, from GET /whoami: controls a token may not use are disabled, with the reason beside them,
// instead of a 403 after a click. null until known (controls stay disabled meanwhile).
let me = null;
const early = []; // live events that arrived before the page had its data: applied right after

// --- live events, subscribed before anything is loaded (the stream's hello marks where the load starts) -------------

// The data is fetched at once, not after the stream's hello: waiting would put a round trip (and, on a cold load,
// plotly.js's evaluation, which delays the event) on the way to the first chart. If the hello came after the fetch
// started, events committed in between could be in neither: a catch-up after the first draw fetches them.
let helloAt = null;
let fetchAt = null;
const whenLoaded = (fn) => (payload) => (loaded ? fn(payload) : early.push(() => fn(payload)));
subscribe(`/runs/${runId}/stream`, {
  hello: () => {
    if (helloAt !== null) return;
    helloAt = performance.now();
    if (loaded) catchUp();
  },
  points: whenLoaded((payload) => data.applyPoints(payload)),
  decision: whenLoaded((decision) => data.applyDecision(decision)),
  stage: whenLoaded((stage) => data.applyStage(stage)),
  run: whenLoaded((event) => {
    if (event.change === "checkpoint" || event.change === "rewind") refreshCheckpoints();
    return event.change === "rewind" ? data.reloadAll() : data.reloadRun();
  }),
}, setLive);


// --- reacting to changes -------------------------------------------------------------------------------------------

const refreshFacts = throttled(renderFacts, 250);
const refreshAudit = throttled(loadAudit, 400);
let refreshToolbar = () => {};

function changed(what) {
  if (!loaded) return;
  if (what === "points") {
    view.update();
    refreshFacts();
    refreshToolbar();
  } else if (what === "decisions") {
    renderDecision();
    renderDecisionsTable();
    view.highlight = highlightOf();
    view.update();
    refreshAudit();
    refreshFacts();
  } else if (what === "stages") {
    renderStages();
    view.update();
    refreshFacts();
  } else if (what === "run") {
    renderHead();
    renderNotes();
    renderControls();
    renderCheckpoints();
    renderDecision();
    refreshFacts();
    refreshAudit();
  }
}

// --- loading -------------------------------------------------------------------------------------------------------

function askWhoami() {
  whoami().then((answer) => {
    me = answer;
  }, (error) => {
    me = { role: null, auth: true, refused: error.status === 401 };
  }).then(() => {
    if (!loaded) return;
    renderControls();
    renderNotes();
    renderCheckpoints();
    shownProposal = null; // the proposal's buttons too
    renderDecision();
  });
}
askWhoami();

async function main() {
  if (!Number.isInteger(runId) || runId < 1) {
    fail("No run given: open this page as run.html?id=<run id>, or pick a run on the runs page.");
    return;
  }
  fetchAt = performance.now();
  const loading = data.load(); // mostly the responses to the requests run.html sent early
  const plotlyReady = loadPlotly();
  plotlyReady.catch(() => {}); // reported below, after the data
  try {
    await loading;
    performance.mark("data-ready");
  } catch (error) {
    fail(error.status === 404 ? `There is no run ${runId}.` : `The run could not be loaded: ${explain(error)}`);
    return;
  }
  try {
    await plotlyReady;
    performance.mark("plotly-ready");
  } catch (error) {
    fail(error.message);
    return;
  }
  view = new ChartView($("chart"), {
    state,
    fetchDetail: (id, keys, min, max) => fetchSeries(id, keys, { min_step: min, max_step: max }),
    onStateChange: () => {
      writeViewState(state);
      refreshToolbar();
    },
    onDrawn: drawn,
    exportName: () => data.name,
  });
  view.runs = [data];
  view.highlight = highlightOf();
  data.appendHooks.push((key, append) => view.appendToDetail(runId, key, append));
  hook.view = view;
  refreshToolbar = mountToolbar($("toolbar"), view, {
    extra: [h("button", { type: "button", id: "export", onclick: exportCsv }, "Export CSV")],
  });
  refreshToolbar();
  if (state.range) view.setRange(state.range); // a zoom kept in the URL: fetch its full resolution
  await view.draw();
  performance.mark("first-chart");
  hook.firstChart = performance.now();
  loaded = true;
  for (const apply of early.splice(0)) apply();
  if (helloAt !== null) catchUp();
  renderHead();
  renderFacts();
  renderDecision();
  renderDecisionsTable();
  renderStages();
  loadCheckpoints();
  renderLegend();
  wireControls();
  wireNotes();
  loadAudit();
  setInterval(renderFacts, 5000); // "12 s ago" keeps moving
}

// Fetches what may have been committed between the initial load and the start of the stream (see above).
async function catchUp() {
  if (helloAt <= fetchAt) return;
  const [stages, decisions] = await Promise.all([
    api(`/runs/${runId}/stages`), api(`/runs/${runId}/decisions`), data.fetchTails(),
  ]);
  for (const stage of stages) data.applyStage(stage);
  for (const decision of decisions) data.applyDecision(decision);
}

function fail(message) {
  const box = $("load-error");
  box.textContent = message;
  box.classList.remove("hidden");
  hook.errors.push(message);
}

function drawn(chart) {
  // The DOM holds the new figure now; the next frame paints it.
  const steps = chart.drawnSteps.get(runId) || {};
  requestAnimationFrame(() => {
    hook.drawnAt = Date.now();
    hook.lastDrawn = steps;
  });
  renderNote();
}

// --- header and facts ------------------------------------------------------------------------------------------------

function renderHead() {
  const run = data.run;
  // The run's colour, as on the runs and compare pages.
  $("run-name").replaceChildren(h("span", { class: "swatch", style: `background:${runColor(run.id)}`,
    "aria-hidden": "true" }), run.name);
  const status = $("run-status");
  status.textContent = run.status;
  status.className = `status ${run.status}`;
  const detector = run.detector ? `${run.detector.name} on ${run.detector.metric}` : "no detector";
  const tags = run.tags.length ? ` · tags ${run.tags.join(", ")}` : "";
  $("run-meta").textContent = `#${run.id} · ${run.project} · mode ${run.mode} · ${detector}${tags}`;
  const pending = data.pending.length;
  document.title = `${pending ? `(${pending}) ` : ""}${run.name} · Stagewatch`;
}

function latestOf(predicate) {
  let best = null;
  for (const [key, latest] of Object.entries(data.run.latest)) {
    if (predicate(key) && (!best || latest.count > best.count)) best = { key, ...latest };
  }
  return best;
}

function renderFacts() {
  if (!data.run) return;
  const latest = Object.values(data.run.latest);
  const step = Math.max(-1, ...latest.map((l) => l.step ?? -1));
  const epochs = latest.map((l) => Number(l.epoch)).filter(Number.isFinite);
  const lrKey = data.run.detector?.lr_key || "lr";
  const lr = data.run.latest[lrKey];
  const stage = data.stages.at(-1);
  const trainLoss = latestOf((k) => /loss/i.test(k) && !/(test|val|eval)/i.test(k));
  const testLoss = latestOf((k) => /loss/i.test(k) && /(test|val|eval)/i.test(k));
  const testAcc = latestOf((k) => /acc/i.test(k) && /(test|val|eval)/i.test(k));
  const last = Math.max(...latest.map((l) => l.time ?? 0));
  const facts = [
    ["Step", step >= 0 ? fmtInt(step) : "–"],
    epochs.length ? ["Epoch", fmtEpoch(Math.max(...epochs))] : null,
    ["LR", lr ? fmtLr(lr.value) : "–"],
    ["Stage", stage ? `S${stage.index}` : "–"],
    trainLoss ? [trainLoss.key, fmtValue(trainLoss.value)] : null,
    testLoss ? [testLoss.key, fmtValue(testLoss.value)] : null,
    testAcc ? [testAcc.key, fmtPercent(testAcc.value)] : null,
    ["Last point", last ? ago(last) : "–"],
  ].filter(Boolean);
  $("facts").replaceChildren(...facts.map(([label, value]) => h("div", {}, h("dt", {}, label), h("dd", {}, value))));
}

function renderNote() {
  const parts = [];
  for (const [key, s] of data.series) {
    if (s.downsampled) parts.push(`${key}: ${fmtInt(s.total)} points, ${fmtInt(s.steps.length)} drawn`);
  }
  let text = parts.length
    ? `Long series are downsampled (each bucket keeps its min and max, spikes and NaN stay): ${parts.join("; ")}. `
      + "Zoom in (drag across a chart, or the step fields) for full resolution."
    : "Every point is drawn.";
  if (view.detail) text = `Steps ${fmtInt(view.detail.min)}–${fmtInt(view.detail.max)} at full resolution where it fits. ${text}`;
  $("chart-note").textContent = text;
}

function renderLegend() {
  $("decision-legend").replaceChildren(
    h("li", { class: "muted" }, "Markers:"),
    ...Object.values(DECISION_KINDS).map((k) =>
      h("li", {}, h("span", { style: `color:${k.color}`, "aria-hidden": "true" }, k.glyph), ` ${k.label}`)),
    h("li", { class: "muted" }, "· shaded bands: stages · amber band: evidence window of the proposal"),
  );
}

// --- the decision panel --------------------------------------------------------------------------------------------

let shownProposal = null;
let selectedDecision = null; // a decision whose window the user asked to see (decisions table)

function highlightOf() {
  const chosen = data.pending.at(-1) || data.decisions.find((d) => d.id === selectedDecision);
  const window_ = chosen?.evidence?.window;
  return window_ ? { window: window_, runId } : null;
}

// Why this user cannot act on the run (null: they can). The server checks again; this only keeps the page honest.
function whyNot() {
  if (!isLive()) return `The run is ${data.run.status}: nothing can be applied any more.`;
  if (!me) return "Checking what your token may do…";
  if (me.refused) return "The server refused your token: sign in again with a valid one to act.";
  if (!me.role) return "Sign in with an operator token to act on this run.";
  if (!mayAct(me)) return `You are signed in as ${me.name} (${me.role}): deciding and acting need an operator token.`;
  return null;
}

function isLive() {
  return data.run && (data.run.status === "running" || data.run.status === "stale");
}

function renderDecision() {
  const section = $("decision");
  const body = $("decision-body");
  const pending = data.pending.at(-1);
  const allowed = whyNot() === null;
  const key = pending ? `${pending.id}:${pending.status}:${allowed}` : `none:${data.decisions.length}:${isLive()}`;
  // Never rebuild the form a person may be typing in: only when the proposal itself changes.
  if (key === shownProposal) return;
  shownProposal = key;
  section.classList.toggle("proposal", Boolean(pending));
  $("decision-h").textContent = pending ? (allowed ? "Proposal waiting for you" : "Proposal waiting for an operator")
    : "Decision";
  if (!pending) {
    const last = data.decisions.at(-1);
    const mode = {
      approve: "Proposals wait here for an operator.",
      auto: "This run is in auto mode: decisions are applied at once.",
      observe: "This run is in observe mode: decisions are only drawn.",
    }[data.run.mode];
    body.replaceChildren(...[
      h("p", {}, "No proposal waiting."),
      h("p", { class: "small muted" }, mode),
      last ? h("p", { class: "small" }, `Last decision: #${decisionNumber(data, last)} ${describeAction(last)} — `,
        h("span", { class: `dstatus ${last.status}` }, last.status)) : null,
    ].filter(Boolean));
    return;
  }
  announce(`Proposal waiting: ${describeAction(pending)}.`);
  body.replaceChildren(...proposalView(pending).filter(Boolean));
}

// "Approved automatically in 42 s unless you decide first": ticks every second until the server's own sweep
// approves it (the live decision event then replaces the panel).
let countdownTimer = null;
function autoApproveCountdown(d) {
  const el = h("p", { class: "notice", id: "auto-approve-countdown" });
  const due = Date.parse(d.auto_approve_at);
  const tick = () => {
    const left = Math.max(0, Math.round((due - Date.now()) / 1000));
    el.textContent = left > 0
      ? `Approved automatically in ${left >= 120 ? `${Math.round(left / 60)} min` : `${left} s`} unless you decide first.`
      : "Being approved automatically now…";
  };
  tick();
  clearInterval(countdownTimer);
  countdownTimer = setInterval(() => (el.isConnected ? tick() : clearInterval(countdownTimer)), 1000);
  return el;
}

function proposalView(d) {
  const ev = d.evidence || {};
  const currentLr = data.run.latest[data.run.detector?.lr_key || "lr"];
  const below = Number(ev.value) < Number(ev.threshold);
  const meterMax = Math.max(Number(ev.threshold) * 2, Number(ev.value) || 0) || 1;
  const status = h("p", { id: "decision-status", role: "status", class: "small" });
  const reason = () => $("decision-reason").value.trim();
  const decide = (verb, body, done) => act(status, () => api(`/runs/${runId}/decisions/${d.id}/${verb}`,
    { method: "POST", body }), (result) => {
    data.applyDecision(result);
    $("decision-reason").value = "";
    announce(done);
  });

  const overrideFactor = h("input", { id: "override-factor", type: "number", step: "any", min: "0.000001",
    max: "0.999999", placeholder: String(d.factor ?? 0.1) });
  const overrideLr = h("input", { id: "override-lr", type: "number", step: "any", min: "0",
    placeholder: d.lr ? String(d.lr) : "" });
  const backoff = h("input", { id: "reject-backoff", type: "number", step: "any", min: "0", placeholder: "default",
    style: "width: 7rem" });
  const backoffUnit = h("select", { id: "reject-backoff-unit" }, h("option", { value: "epochs" }, "epochs"),
    h("option", { value: "steps" }, "steps"));

  return [
    h("p", {}, h("strong", { id: "proposal-action" }, describeAction(d)),
      h("span", { id: "proposal-result" }, resultingLr(d, currentLr)),
      h("br"), h("span", { class: "small muted" },
        `#${decisionNumber(data, d)} by ${d.source}${d.step !== null ? ` at step ${fmtInt(d.step)}` : ""}, `,
        ago(seconds(d.created_at)))),
    ev.explanation ? h("p", { class: "explanation", id: "proposal-explanation" }, ev.explanation) : null,
    d.auto_approve_at ? autoApproveCountdown(d) : null,
    h("dl", { class: "evidence", "aria-label": "Evidence" },
      ev.statistic !== undefined ? [h("dt", {}, "Statistic"), h("dd", {}, ev.statistic)] : null,
      ev.value !== undefined ? [
        h("dt", {}, "Value"),
        h("dd", { id: "proposal-value" }, fmtValue(ev.value),
          h("span", { class: "small muted" }, below ? " — below the threshold" : " — at or above the threshold")),
        h("dt", {}, "Threshold"), h("dd", { id: "proposal-threshold" }, fmtValue(ev.threshold)),
        h("dt", {}, h("label", { for: "stat-meter" }, "Value / threshold")),
        h("dd", {}, h("meter", { id: "stat-meter", class: "stat-bar", min: "0", max: String(meterMax),
          value: String(Math.max(0, Number(ev.value) || 0)), optimum: String(meterMax),
          low: String(Number(ev.threshold)), title: `${fmtValue(ev.value)} against ${fmtValue(ev.threshold)}` }),
          h("span", { class: "small muted" }, ratioText(Number(ev.value), Number(ev.threshold)))),
      ] : null,
      ev.window ? [h("dt", {}, "Window"), h("dd", {}, `steps ${fmtInt(ev.window[0])}–${fmtInt(ev.window[1])} `,
        h("button", { type: "button", id: "show-window", onclick: () => zoomToWindow(ev.window) }, "Show on chart"))]
        : null,
      ev.stage ? [h("dt", {}, "Stage judged"), h("dd", { id: "proposal-stage" },
        `S${ev.stage.index}, from step ${fmtInt(ev.stage.start_step)}${ev.stage.lr ? ` at LR ${fmtLr(ev.stage.lr)}` : ""}`)]
        : null,
      ev.metric ? [h("dt", {}, "Metric"), h("dd", {}, `${ev.metric}${ev.detector ? ` (${ev.detector})` : ""}`)] : null,
    ),
    whyNot() === null ? null : h("p", { class: "notice", id: "decide-note" }, whyNot()),
    h("label", { for: "decision-reason", class: "small" }, "Reason (optional, kept in the audit log)"),
    h("input", { id: "decision-reason", type: "text", maxlength: "2000", autocomplete: "off" }),
    h("div", { class: "actions" },
      h("button", { type: "button", class: "primary", id: "approve", disabled: whyNot() !== null,
        onclick: () => decide("approve", { reason: reason() }, `Decision ${d.id} approved.`) }, "Approve"),
      h("button", { type: "button", class: "danger", id: "reject", disabled: whyNot() !== null,
        onclick: () => {
          const body = { reason: reason() };
          if (backoff.value) body.backoff = { [backoffUnit.value]: Number(backoff.value) };
          decide("reject", body, `Decision ${d.id} rejected.`);
        } }, "Reject"),
    ),
    h("div", { class: "subform" },
      h("div", { class: "row" }, h("label", { for: "reject-backoff" }, "On reject, hold the detector for"), backoff,
        h("label", { for: "reject-backoff-unit", class: "visually-hidden" }, "Unit of the hold"), backoffUnit)),
    h("form", { class: "subform", id: "override-factor-form", "aria-label": "Override with another factor",
      onsubmit: (event) => {
        event.preventDefault();
        decide("override", { factor: Number(overrideFactor.value), reason: reason() },
          `Decision ${d.id} overridden: decay by ${overrideFactor.value}.`);
      } },
      h("div", { class: "row" }, h("label", { for: "override-factor" }, "New factor"), overrideFactor,
        h("button", { type: "submit", disabled: whyNot() !== null }, "Override with this factor"))),
    h("form", { class: "subform", id: "override-lr-form", "aria-label": "Override with an explicit LR",
      onsubmit: (event) => {
        event.preventDefault();
        decide("override", { lr: Number(overrideLr.value), reason: reason() },
          `Decision ${d.id} overridden: LR ${overrideLr.value}.`);
      } },
      h("div", { class: "row" }, h("label", { for: "override-lr" }, "New LR"), overrideLr,
        h("button", { type: "submit", disabled: whyNot() !== null }, "Override with this LR"))),
    status,
  ];
}

// " → LR 0.01 (now 0.1)": what the decision leaves the LR at, which is what an operator decides on.
function resultingLr(d, current) {
  const now = current ? Number(current.value) : NaN;
  if (d.action === "decay" && !d.lr && Number.isFinite(now) && d.factor) {
    return ` → LR ${fmtLr(now * d.factor)} (now ${fmtLr(now)})`;
  }
  return Number.isFinite(now) ? ` (LR now ${fmtLr(now)})` : "";
}

// "92 % of it", "negative": how far the statistic is from the line the detector draws.
function ratioText(value, threshold) {
  if (!Number.isFinite(value) || !Number.isFinite(threshold) || threshold === 0) return "";
  if (value < 0 && threshold > 0) return " the value is negative";
  return ` ${Math.round((100 * value) / threshold)} % of it`;
}

function zoomToWindow([a, b]) {
  const margin = Math.max(1, Math.round((b - a) * 0.6));
  view.userY.clear();
  view.setRange([Math.max(0, a - margin), b + margin]);
  $("chart").scrollIntoView({ behavior: "smooth", block: "nearest" });
}

// Runs an operator action: the status line says what happened (or why not), the live stream does the rest.
async function act(status, call, onDone) {
  status.textContent = "Sending…";
  status.classList.remove("error");
  status.removeAttribute("role");
  status.setAttribute("role", "status");
  try {
    const result = await call();
    status.textContent = "Done.";
    onDone(result);
  } catch (error) {
    status.textContent = explain(error);
    status.classList.add("error");
    status.setAttribute("role", "alert");
  }
}

// --- controls --------------------------------------------------------------------------------------------------------

function wireControls() {
  const status = $("controls-status");
  const reason = () => $("action-reason").value.trim();
  const command = (body, done) => act(status, () => api(`/runs/${runId}/commands`, { method: "POST", body }), () => {
    $("action-reason").value = "";
    announce(done);
  });
  $("decay-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const factor = Number($("decay-factor").value);
    command({ action: "decay", factor, reason: reason() }, `Decay by ${factor} sent to the worker.`);
  });
  $("setlr-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const lr = Number($("set-lr").value);
    command({ action: "set_lr", lr, reason: reason() }, `LR ${lr} sent to the worker.`);
  });
  $("hold-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const unit = $("hold-unit").value;
    const amount = Number($("hold-amount").value);
    const body = { [unit]: unit === "steps" ? Math.round(amount) : amount, reason: reason() };
    act(status, () => api(`/runs/${runId}/hold`, { method: "POST", body }), () => {
      $("action-reason").value = "";
      announce(`Detector held for ${amount} ${unit}.`);
    });
  });
  const dialog = $("stop-dialog");
  $("stop").addEventListener("click", () => dialog.showModal());
  dialog.addEventListener("close", () => {
    if (dialog.returnValue === "stop") command({ action: "stop", reason: reason() }, "Stop sent to the worker.");
    $("stop").focus();
  });
  renderControls();
}

function renderControls() {
  const why = whyNot();
  for (const element of $("controls").querySelectorAll("button, input, select")) element.disabled = why !== null;
  $("controls-note").textContent = why
    ?? "Commands reach the worker at its next step boundary; a waiting proposal is superseded.";
  $("controls").classList.toggle("not-allowed", why !== null);
}

// --- notes and tags ----------------------------------------------------------------------------------------------------

// Editing a run's notes and tags needs the worker role (PATCH /runs/{id}); a viewer sees the form disabled.
function notesAllowed() {
  if (!me) return "Checking what your token may do…";
  if (!me.role) return "Sign in with a worker or operator token to edit.";
  if (!mayAct(me, "worker")) return `You are signed in as ${me.name} (${me.role}): editing needs a worker or operator token.`;
  return null;
}

// The fields follow the run (another tab may edit it) unless the user is editing them.
let notesDirty = false;
function renderNotes() {
  const why = notesAllowed();
  for (const element of $("notes-form").querySelectorAll("input, textarea, button")) element.disabled = why !== null;
  const status = $("notes-status");
  if (why || status.dataset.reason) status.textContent = why ?? ""; // a reason shown earlier goes once it is moot
  status.dataset.reason = why ? "true" : "";
  if (notesDirty) return;
  $("run-tags").value = data.run.tags.join(", ");
  $("run-notes").value = data.run.notes;
}

function wireNotes() {
  const form = $("notes-form");
  form.addEventListener("input", () => {
    notesDirty = true;
  });
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const tags = [...new Set($("run-tags").value.split(/[\s,]+/).filter(Boolean))];
    act($("notes-status"), () => api(`/runs/${runId}`, { method: "PATCH", body: { tags, notes: $("run-notes").value } }),
      (run) => {
        notesDirty = false;
        data.run = { ...data.run, ...run };
        renderHead();
        renderNotes();
        refreshAudit();
        announce("Notes and tags saved.");
      });
  });
  renderNotes();
}

// --- stages and decisions tables --------------------------------------------------------------------------------------

function renderStages() {
  const epochs = new StepMap("epoch", [...data.series.values()]);
  const end = Math.max(-1, ...[...data.series.values()].map(lastStep));
  const rows = data.stages.map((s) => {
    const last = s.end_step ?? end;
    const e0 = epochs.usable ? epochs.value(s.start_step) : null;
    const e1 = epochs.usable ? epochs.value(last) : null;
    const sum = s.summary || {};
    return h("tr", {},
      h("th", { scope: "row" }, `S${s.index}`),
      // "(open)" only while the run can still move on to another stage; a finished run's last stage ended.
      h("td", { class: "num" }, `${fmtInt(s.start_step)}–${fmtInt(last)}${s.end_step === null && isLive() ? " (open)" : ""}`),
      h("td", { class: "num" }, e0 === null ? "–" : `${fmtEpoch(e0)}–${fmtEpoch(e1)}`),
      h("td", { class: "num" }, fmtLr(s.lr)),
      h("td", {}, { start: "start of the run", lr_change: "LR change" }[s.source] || s.source),
      h("td", { class: "num" }, sum.count ? `${fmtValue(sum.first)} → ${fmtValue(sum.last)} (${best(sum)})` : "–"),
    );
  });
  $("stages").replaceChildren(...(rows.length ? rows : [h("tr", {}, h("td", { colspan: "6", class: "muted" },
    "No stage yet: stages follow the logged LR (key lr)."))]));
}

// The stage's best value of the monitored metric: the highest of an accuracy, the lowest of a loss.
function best(summary) {
  const higherIsBetter = /acc|f1|auc|precision|recall|score/i.test(data.run.detector?.metric || "");
  return higherIsBetter ? `max ${fmtValue(summary.max)}` : `min ${fmtValue(summary.min)}`;
}

function renderDecisionsTable() {
  const rows = [...data.decisions].reverse().map((d) => {
    const ev = d.evidence || {};
    const actor = d.history.length ? d.history[d.history.length - 1].actor : d.actor;
    const kind = DECISION_KINDS[decisionKind(d)];
    return h("tr", { dataset: { decision: String(d.id) } },
      h("th", { scope: "row" }, String(decisionNumber(data, d))),
      h("td", {}, describeAction(d), d.overridden ? h("span", { class: "small muted" }, " (overridden)") : null),
      h("td", {}, h("span", { style: `color:${kind.color}`, "aria-hidden": "true" }, `${kind.glyph} `),
        h("span", { class: `dstatus ${d.status}` }, d.status)),
      h("td", {}, `${d.source}${actor && actor !== d.source ? ` · ${actor}` : ""}`),
      h("td", { class: "num" }, d.step === null ? "–" : fmtInt(d.step)),
      h("td", { class: "num" }, d.applied_step === null ? "–" : `${fmtInt(d.applied_step)} · LR ${fmtLr(d.applied_lr)}`),
      h("td", {}, ev.statistic !== undefined ? `${fmtValue(ev.value)} vs ${fmtValue(ev.threshold)} ` : "",
        ev.window ? h("button", { type: "button", class: "small", "aria-label": `Show the window of decision ${d.id}`,
          onclick: () => {
            selectedDecision = d.id;
            view.highlight = highlightOf();
            zoomToWindow(ev.window);
          } }, "Show window") : null),
    );
  });
  $("decisions").replaceChildren(...(rows.length ? rows : [h("tr", {}, h("td", { colspan: "7", class: "muted" },
    data.run.detector ? "No decision yet." : "No detector on this run, and no operator command yet."))]));
  renderHead();
  renderControls();
}

// --- stage checkpoints ------------------------------------------------------------------------------------------------

let checkpoints = [];
const refreshCheckpoints = throttled(() => loadCheckpoints(), 400);

async function loadCheckpoints() {
  try {
    checkpoints = (await api(`/runs/${runId}/checkpoints`)).data;
  } catch (error) {
    $("checkpoints-status").textContent = `The checkpoints could not be loaded: ${explain(error)}`;
    return;
  }
  renderCheckpoints();
}

// One row per checkpoint, grouped by the stage each one ends (earlier stages first), with a roll-back button that
// is disabled, with the reason, for anyone who may not act on the run.
function renderCheckpoints() {
  if (!data.run) return;
  const why = whyNot();
  const sorted = [...checkpoints].sort((a, b) => (a.stage ?? -1) - (b.stage ?? -1) || a.step - b.step);
  let previous;
  const rows = sorted.map((c) => {
    const first = c.stage !== previous;
    previous = c.stage;
    const metrics = Object.entries(c.metrics || {}).map(([k, v]) => `${k} ${fmtValue(v)}`).join(" · ");
    return h("tr", { dataset: { checkpoint: String(c.id) } },
      h("th", { scope: "row" }, first ? (c.stage === null ? "–" : `S${c.stage}`) : ""),
      h("td", { class: "num" }, fmtInt(c.step)),
      h("td", { class: "num" }, c.lr === null ? "–" : fmtLr(c.lr)),
      h("td", { class: "small" }, metrics || "–"),
      h("td", { class: "uri" }, c.uri),
      h("td", {}, h("button", { type: "button", class: "small", disabled: why !== null,
        "aria-label": `Roll the run back to the checkpoint at step ${c.step}`, title: why ?? "",
        onclick: (event) => rollBack(c, event.currentTarget) }, "Roll back")),
    );
  });
  $("checkpoints").replaceChildren(...(rows.length ? rows : [h("tr", {}, h("td", { colspan: "6", class: "muted" },
    "No checkpoint yet: a worker with stage checkpoints on saves one before every decay."))]));
  $("checkpoints-note").textContent = rows.length && why ? why : "";
}

function rollBack(checkpoint, button) {
  const question = `Roll run ${data.run.name} back to the checkpoint at step ${fmtInt(checkpoint.step)}? The worker `
    + "loads it at its next step boundary; the points after that step move to the audit log.";
  if (!window.confirm(question)) return;
  const status = $("checkpoints-status");
  button.disabled = true;
  status.textContent = "Sending the rollback…";
  api(`/runs/${runId}/rollback`, { method: "POST", body: { checkpoint_id: checkpoint.id, reason: "from the run page" } })
    .then(() => {
      status.textContent = `Rollback to step ${fmtInt(checkpoint.step)} sent to the worker.`;
      announce(status.textContent);
      refreshAudit();
    }, (error) => {
      status.textContent = `The rollback was refused: ${explain(error)}`;
      button.disabled = whyNot() !== null;
    });
}

// --- audit log ---------------------------------------------------------------------------------------------------------

async function loadAudit() {
  let events;
  try {
    events = (await api(`/runs/${runId}/events`, { params: { limit: 100 } })).data;
  } catch (error) {
    $("audit").replaceChildren(h("li", { class: "error" }, explain(error)));
    return;
  }
  const list = $("audit");
  const scroll = list.scrollTop;
  list.replaceChildren(...events.map(auditItem));
  list.scrollTop = scroll;
}

function auditItem(event) {
  const p = event.payload || {};
  let what = event.kind;
  let detail = "";
  const m = /^decision\.(.+)$/.exec(event.kind);
  if (m) {
    const d = data.decisions.find((x) => x.id === p.decision_id);
    what = `Decision #${d ? decisionNumber(data, d) : p.decision_id} ${p.overrides ? "overridden" : m[1]}`;
    if (p.overrides) detail = `was ${describeAction(p.overrides)}, now ${d ? describeAction(d) : "changed"}`;
    else if (m[1] === "applied" || m[1] === "failed") detail = `at step ${fmtInt(p.step)}, LR ${fmtLr(p.lr)}`;
    else if (d) detail = describeAction(d);
  } else if (event.kind === "run.created") {
    what = "Run created";
    detail = `mode ${p.mode}${p.detector ? `, ${p.detector.name} on ${p.detector.metric}` : ""}`;
  } else if (event.kind === "run.updated") {
    what = "Run updated";
    detail = Object.entries(p.after || {}).map(([k, v]) => `${k} → ${typeof v === "object" ? JSON.stringify(v) : v}`)
      .join(", ");
  } else if (event.kind === "detector.held") {
    what = "Detector held";
    detail = p.epochs ? `${p.epochs} epochs` : `${p.steps} steps`;
  } else if (event.kind === "metrics.rewound") {
    what = `Rewound to step ${fmtInt(p.step)}`;
  }
  const note = p.note || p.reason;
  return h("li", { dataset: { kind: event.kind } },
    h("span", { class: "what" }, what), ` by ${event.actor} · `, timeElement(event.created_at),
    detail ? h("span", { class: "note" }, detail) : null,
    note ? h("span", { class: "note" }, `“${note}”`) : null);
}

// --- export --------------------------------------------------------------------------------------------------------------

async function exportCsv(event) {
  const button = event.currentTarget;
  const label = button.textContent;
  button.disabled = true;
  try {
    await download(`/runs/${runId}/metrics/export`, { format: "csv" }, `run-${runId}-metrics.csv`, (bytes) => {
      button.textContent = `Exporting… ${(bytes / 1e6).toFixed(1)} MB`;
    });
    announce("Export started.");
  } catch (error) {
    fail(`Export failed: ${explain(error)}`);
  } finally {
    button.textContent = label;
    button.disabled = false;
  }
}

// Signing in after a refusal: start again with the token. Once loaded, only what the user may do changes.
window.addEventListener("stagewatch:token", () => {
  if (!loaded) location.reload();
  else askWhoami();
});

main().catch((error) => fail(String(error)));
