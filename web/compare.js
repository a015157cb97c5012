// The compare page: several runs overlaid on the same panels (say AutoDecay against StepDecay), each run's stages
// as a ribbon in the top strip and as boundaries in its colour, a summary table, all live.

import { api, download, explain, subscribe } from "./api.js";
import { ChartView, decisionNumber, describeAction } from "./charts.js";
import { fetchSeries, RunData } from "./rundata.js";
import { mountToolbar, readViewState, writeViewState } from "./toolbar.js";
import {
  fmtInt, fmtLr, fmtPercent, fmtValue, h, loadPlotly, PALETTE, renderHeader, runColors, throttled,
} from "./ui.js";

const $ = (id) => document.getElementById(id);
const MAX_RUNS = PALETTE.length; // one colour each

const hook = { firstChart: null, drawnAt: null, errors: [] };
window.__stagewatch = hook;

const setLive = renderHeader("compare");
const state = readViewState();
const ids = [...new Set((new URLSearchParams(location.search).get("runs") || "")
  .split(",").map((s) => Number(s.trim())).filter((n) => Number.isInteger(n) && n > 0))].slice(0, MAX_RUNS);
$("pick-runs").value = ids.join(", ");
$("pick").addEventListener("submit", (event) => {
  event.preventDefault();
  const value = $("pick-runs").value.replace(/\s+/g, "");
  location.href = `compare.html?runs=${encodeURIComponent(value)}${location.hash}`;
});

let view = null;
let loaded = false;
const refreshSummary = throttled(renderSummary, 500);
let refreshToolbar = () => {};
const runs = ids.map((id) => new RunData(id, {
  needsTime: () => state.xmode === "time",
  onChange: (what) => {
    if (!loaded) return;
    view.update();
    if (what !== "points") refreshSummary();
    else refreshToolbar();
  },
}));
const byId = new Map(runs.map((r) => [r.id, r]));

function fail(message) {
  const box = $("load-error");
  box.textContent = message;
  box.classList.remove("hidden");
  hook.errors.push(message);
}

async function main() {
  if (!runs.length) {
    $("summary").classList.add("hidden");
    $("toolbar").classList.add("hidden");
    $("chart").classList.add("hidden");
    await offerRecent();
    return;
  }
  // Subscribed before loading; events that come before the data are applied right after it.
  const early = [];
  const route = (fn) => (payload) => {
    const run = byId.get(payload.run_id);
    if (!run) return;
    if (loaded) fn(run, payload);
    else early.push(() => fn(run, payload));
  };
  subscribe("/stream", {
    points: route((run, p) => run.applyPoints(p)),
    decision: route((run, d) => run.applyDecision(d)),
    stage: route((run, s) => run.applyStage(s)),
    run: route((run, e) => (e.change === "rewind" ? run.reloadAll() : run.reloadRun())),
  }, setLive);
  const loading = Promise.allSettled(runs.map((r) => r.load()));
  const plotlyReady = loadPlotly();
  plotlyReady.catch(() => {});
  const results = await loading;
  results.forEach((result, i) => {
    if (result.status === "rejected") fail(`Run ${runs[i].id} could not be loaded: ${explain(result.reason)}`);
  });
  const ok = runs.filter((_, i) => results[i].status === "fulfilled");
  if (!ok.length) return;
  try {
    await plotlyReady;
  } catch (error) {
    fail(error.message);
    return;
  }
  view = new ChartView($("chart"), {
    state,
    compare: true,
    fetchDetail: (id, keys, min, max) => fetchSeries(id, keys, { min_step: min, max_step: max }),
    onStateChange: () => {
      writeViewState(state);
      refreshToolbar();
    },
    onDrawn: () => {
      hook.drawnAt = Date.now();
    },
    exportName: () => `compare ${view.runs.map((r) => r.name).join(" vs ")}`,
  });
  view.runs = ok;
  for (const run of ok) run.appendHooks.push((key, append) => view.appendToDetail(run.id, key, append));
  hook.view = view;
  refreshToolbar = mountToolbar($("toolbar"), view, {
    extra: [h("button", { type: "button", id: "export", onclick: exportCsv }, "Export CSV (one file per run)")],
  });
  refreshToolbar();
  if (state.range) view.setRange(state.range);
  await view.draw();
  performance.mark("first-chart");
  hook.firstChart = performance.now();
  loaded = true;
  for (const apply of early.splice(0)) apply();
  renderSummary();
  renderLegend();
  document.title = `Compare ${ok.map((r) => r.name).join(" vs ")} · Stagewatch`;
}

// Which colour is which run: full names (the strip's lane labels are short), in the chart's colours.
function renderLegend() {
  const colors = runColors(view.runs.map((r) => r.id));
  $("run-legend").replaceChildren(...view.runs.map((run) => h("li", { dataset: { run: String(run.id) } },
    h("span", { class: "swatch", style: `background:${colors.get(run.id)}`, "aria-hidden": "true" }),
    h("a", { href: `run.html?id=${run.id}` }, `#${run.id} ${run.name}`))));
}

function renderSummary() {
  const colors = runColors(view.runs.map((r) => r.id));
  const rows = view.runs.map((run) => {
    const accuracy = [...run.series.entries()].find(([k]) => /acc/i.test(k) && /(test|val|eval)/i.test(k));
    const loss = [...run.series.entries()].find(([k]) => /loss/i.test(k) && /(test|val|eval)/i.test(k));
    const best = accuracy ? Math.max(...accuracy[1].values.filter(Number.isFinite)) : null;
    const lastLoss = loss && loss[1].values.length ? loss[1].values[loss[1].values.length - 1] : null;
    const steps = Math.max(-1, ...Object.values(run.run.latest).map((l) => l.step ?? -1));
    const decisions = run.decisions.filter((d) => d.status !== "superseded");
    return h("tr", { dataset: { run: String(run.id) } },
      h("td", {}, h("span", { class: "swatch", style: `background:${colors.get(run.id)}`, "aria-hidden": "true" }),
        h("span", { class: "visually-hidden" }, `the colour of run ${run.id}`)),
      h("th", { scope: "row" }, h("a", { href: `run.html?id=${run.id}` }, run.name),
        h("div", { class: "small muted" }, `#${run.id} · ${run.run.project} · `,
          h("span", { class: `status ${run.run.status}` }, run.run.status))),
      h("td", {}, run.run.mode, h("div", { class: "small muted" }, run.run.detector ? run.run.detector.name : "–")),
      h("td", {}, run.stages.length
        ? run.stages.map((s) => `S${s.index}: ${fmtLr(s.lr)} @ ${fmtInt(s.start_step)}`).join(" · ")
        : "–"),
      h("td", {}, decisions.length ? decisions.map((d) => `#${decisionNumber(run, d)} ${describeAction(d)} (${d.status})`).join("; ") : "–"),
      h("td", { class: "num" }, steps >= 0 ? fmtInt(steps) : "–"),
      h("td", { class: "num" }, best !== null && Number.isFinite(best) ? fmtPercent(best) : "–"),
      h("td", { class: "num" }, lastLoss !== null ? fmtValue(lastLoss) : "–"),
    );
  });
  $("summary-rows").replaceChildren(...rows);
}

// Every point of every compared run at full resolution, a file per run (the export is per run on the server).
async function exportCsv(event) {
  const button = event.currentTarget;
  button.disabled = true;
  try {
    for (const run of view.runs) {
      // The run page's name for the same file (the server's Content-Disposition says the same).
      await download(`/runs/${run.id}/metrics/export`, { format: "csv" }, `run-${run.id}-metrics.csv`);
    }
  } catch (error) {
    fail(`Export failed: ${explain(error)}`);
  } finally {
    button.disabled = false;
  }
}

// No runs chosen: the most recent ones, to tick.
async function offerRecent() {
  let page;
  try {
    page = await api("/runs", { params: { limit: 30 } });
  } catch (error) {
    fail(`The runs could not be loaded: ${explain(error)}`);
    return;
  }
  const list = h("fieldset", {}, h("legend", {}, "Recent runs"),
    ...page.data.map((r) => h("div", {},
      h("input", { type: "checkbox", id: `pick-${r.id}`, value: String(r.id), name: "pick" }),
      h("label", { for: `pick-${r.id}` }, ` ${r.name} `, h("span", { class: "muted small" },
        `#${r.id} · ${r.project} · ${r.status} · ${r.mode}`)))));
  const form = h("form", { class: "stack", "aria-label": "Pick runs" }, list,
    h("div", {}, h("button", { type: "submit", class: "primary" }, "Compare the ticked runs")));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const picked = [...form.querySelectorAll("input[name=pick]:checked")].map((i) => i.value);
    if (picked.length) location.href = `compare.html?runs=${picked.join(",")}`;
  });
  $("main").append(form);
}

main().catch((error) => fail(String(error)));
