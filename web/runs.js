// The runs page: every run with its status, mode, current stage and LR, latest values and waiting proposals; filters
// and sort order live in the URL (refresh, Back and bookmarks keep them); rows change live from the event stream.

import { api, explain, subscribe } from "./api.js";
import {
  ago, announce, fmtEpoch, fmtInt, fmtLr, fmtPercent, fmtValue, h, renderHeader, runColor, throttled, toNumber,
} from "./ui.js";

const $ = (id) => document.getElementById(id);
const FILTERS = ["status", "project", "tag", "name"];
const PAGE = 100;
const RECONCILE_MS = 60_000; // "stale" is derived from heartbeats: no event says a run went quiet

const hook = { loadedAt: null, errors: [] };
window.__stagewatch = hook;

const setLive = renderHeader("runs");
const runs = new Map(); // id -> RunPublic, in the order the server listed them
const stages = new Map(); // id -> current stage {index, lr}
const selected = new Set();
let nextCursor = null;
let listed = false; // a list came back: only then may an empty table say "no runs" (not under a refusal)
let filters = readFilters();
let sort = null; // set from the URL once the columns are defined, below

// --- URL state ---------------------------------------------------------------------------------------------------

function readFilters() {
  const p = new URLSearchParams(location.search);
  return Object.fromEntries(FILTERS.map((f) => [f, p.get(f) || ""]));
}

function readSort() {
  const raw = new URLSearchParams(location.search).get("sort") || "";
  const m = /^(-?)([\w:.-]+)$/.exec(raw);
  return m && allColumns().some((c) => c.id === m[2] && c.sort) ? { key: m[2], desc: m[1] === "-" } : null;
}

function writeUrl(push) {
  const p = new URLSearchParams();
  for (const f of FILTERS) if (filters[f]) p.set(f, filters[f]);
  if (sort) p.set("sort", `${sort.desc ? "-" : ""}${sort.key}`);
  const url = `${location.pathname}${p.toString() ? `?${p}` : ""}`;
  if (url === `${location.pathname}${location.search}`) return;
  // A committed filter is a step Back can return to; typing is not.
  if (push) history.pushState(null, "", url);
  else history.replaceState(null, "", url);
}

function fillForm() {
  for (const f of FILTERS) $(`f-${f}`).value = filters[f];
}

// --- columns -------------------------------------------------------------------------------------------------------

const latestBy = (run, test) => {
  let best = null;
  for (const [key, latest] of Object.entries(run.latest)) {
    if (test(key) && (!best || latest.count > best.count)) best = latest;
  }
  return best;
};
const isTrainLoss = (k) => /loss/i.test(k) && !/(test|val|eval)/i.test(k);
const isTestLoss = (k) => /loss/i.test(k) && /(test|val|eval)/i.test(k);
const isTestAcc = (k) => /acc/i.test(k) && /(test|val|eval)/i.test(k);
const lastStepOf = (run) => Math.max(-1, ...Object.values(run.latest).map((l) => l.step ?? -1));
const lastTimeOf = (run) => Math.max(Date.parse(run.created_at) / 1000, ...Object.values(run.latest).map((l) => l.time ?? 0));
// From creation to the last point (a running run's duration so far).
const durationOf = (run) => lastTimeOf(run) - Date.parse(run.created_at) / 1000;
const lrOf = (run) => run.latest[run.detector?.lr_key || "lr"]?.value;
const num = (v) => {
  const x = toNumber(v);
  return x === null || Number.isNaN(x) ? -Infinity : x;
};
const STATUS_ORDER = { running: 0, stale: 1, failed: 2, finished: 3 };

const COLUMNS = [
  { id: "select", label: "Compare", hidden: true },
  { id: "status", label: "Status", sort: (r) => STATUS_ORDER[r.status] ?? 9 },
  { id: "name", label: "Run", sort: (r) => r.name.toLowerCase() },
  { id: "mode", label: "Mode", sort: (r) => r.mode },
  { id: "stage", label: "Stage · LR", num: true, sort: (r) => stages.get(r.id)?.index ?? -1 },
  { id: "step", label: "Step (epoch)", num: true, sort: lastStepOf },
  { id: "train_loss", label: "Train loss", num: true, sort: (r) => num(latestBy(r, isTrainLoss)?.value) },
  { id: "test_loss", label: "Test loss", num: true, sort: (r) => num(latestBy(r, isTestLoss)?.value) },
  { id: "test_acc", label: "Test acc.", num: true, sort: (r) => num(latestBy(r, isTestAcc)?.value) },
  { id: "pending", label: "Decision", sort: (r) => r.pending_proposals },
  { id: "updated", label: "Last point", num: true, sort: lastTimeOf },
  { id: "created", label: "Created", num: true, sort: (r) => Date.parse(r.created_at) },
  { id: "duration", label: "Duration", num: true, sort: durationOf },
];

// --- config columns: hyper-parameters from each run's `config`, picked by the user ----------------------------------

// Chosen config keys, kept on the device: a column set is a habit, not part of a shared link.
const CONFIG_COLUMNS_KEY = "stagewatch.runs.config-columns";
let configKeys = (() => {
  try {
    const saved = JSON.parse(localStorage.getItem(CONFIG_COLUMNS_KEY) || "[]");
    return Array.isArray(saved) ? saved.filter((k) => typeof k === "string") : [];
  } catch {
    return [];
  }
})();

// {"optimizer": {"momentum": 0.9}, "batch_size": 32} -> {"optimizer.momentum": 0.9, "batch_size": 32}: one level
// of nesting opened, deeper values shown as JSON.
function flatConfig(run) {
  const flat = {};
  for (const [key, value] of Object.entries(run.config || {})) {
    if (value && typeof value === "object" && !Array.isArray(value)) {
      for (const [inner, v] of Object.entries(value)) flat[`${key}.${inner}`] = v;
    } else flat[key] = value;
  }
  return flat;
}

function configText(value) {
  if (value === undefined || value === null) return "–";
  return typeof value === "object" ? JSON.stringify(value) : String(value);
}

function allColumns() {
  return [...COLUMNS, ...configKeys.map((key) => ({
    id: `cfg:${key}`, label: key, config: key, num: true,
    // Numbers sort as numbers; text after them; runs without the key last.
    sort: (r) => {
      const v = flatConfig(r)[key];
      return typeof v === "number" ? v : v === undefined ? -Infinity : Number.MAX_VALUE;
    },
  }))];
}

// "Columns": a checkbox per config key found in the listed runs; rebuilt when a new key appears.
const picker = h("details", { class: "column-picker", id: "column-picker" }, h("summary", {}, "Columns"));
const pickerList = h("fieldset", {}, h("legend", {}, "Config values as columns"));
picker.append(pickerList);
$("filters").after(picker);
let pickerSignature = "";
function renderPicker() {
  const keys = new Set(configKeys);
  for (const run of runs.values()) for (const key of Object.keys(flatConfig(run))) keys.add(key);
  const sorted = [...keys].sort();
  const signature = sorted.join("|");
  if (signature === pickerSignature) return;
  pickerSignature = signature;
  pickerList.replaceChildren(pickerList.firstChild, ...(sorted.length ? sorted.map((key, i) => h("label", {},
    h("input", { type: "checkbox", id: `col-${i}`, checked: configKeys.includes(key), onchange: (event) => {
      configKeys = event.target.checked ? [...configKeys, key] : configKeys.filter((k) => k !== key);
      localStorage.setItem(CONFIG_COLUMNS_KEY, JSON.stringify(configKeys));
      renderHead();
      renderRows();
    } }), ` ${key}`)) : [h("span", { class: "muted small" }, "No run has a config yet.")]));
}

sort = readSort();

function renderHead() {
  $("runs-head").replaceChildren(...allColumns().map((c) => {
    if (c.hidden) return h("th", { scope: "col" }, h("span", { class: "visually-hidden" }, c.label));
    const aria = sort && sort.key === c.id ? (sort.desc ? "descending" : "ascending") : undefined;
    return h("th", { scope: "col", class: c.num ? "num" : undefined, "aria-sort": aria },
      h("button", { type: "button", class: "sort", onclick: () => sortBy(c.id) }, c.label));
  }));
}

function sortBy(id) {
  // First click: the natural order (names A-Z, numbers high to low); the next one flips it.
  const numeric = allColumns().find((c) => c.id === id).num || id === "pending";
  sort = sort && sort.key === id ? { key: id, desc: !sort.desc } : { key: id, desc: numeric };
  writeUrl(false);
  renderHead();
  renderRows();
}

function ordered() {
  const list = [...runs.values()];
  if (!sort) return list;
  const column = allColumns().find((c) => c.id === sort.key);
  if (!column) return list;
  const key = column.sort;
  const sign = sort.desc ? -1 : 1;
  return list.sort((a, b) => {
    const x = key(a);
    const y = key(b);
    return (x < y ? -1 : x > y ? 1 : 0) * sign || b.id - a.id;
  });
}

// --- rows ------------------------------------------------------------------------------------------------------------

function row(run) {
  const step = lastStepOf(run);
  const epochs = Object.values(run.latest).map((l) => toNumber(l.epoch)).filter(Number.isFinite);
  const stage = stages.get(run.id);
  const lr = lrOf(run);
  const trainLoss = latestBy(run, isTrainLoss);
  const testLoss = latestBy(run, isTestLoss);
  const testAcc = latestBy(run, isTestAcc);
  const link = `run.html?id=${run.id}`;
  const checkbox = h("input", { type: "checkbox", id: `select-${run.id}`, checked: selected.has(run.id),
    onchange: (event) => {
      if (event.target.checked) selected.add(run.id);
      else selected.delete(run.id);
      updateCompare();
    } });
  const lastTime = lastTimeOf(run);
  return h("tr", { class: run.pending_proposals ? "pending" : undefined, dataset: { run: String(run.id) } },
    h("td", {}, checkbox, h("label", { for: `select-${run.id}`, class: "visually-hidden" }, `Compare ${run.name}`)),
    h("td", {}, h("span", { class: `status ${run.status}` }, run.status)),
    h("th", { scope: "row" },
      h("span", { class: "swatch", style: `background:${runColor(run.id)}`, "aria-hidden": "true" }),
      h("a", { href: link, class: "run-name", id: `run-link-${run.id}` }, run.name),
      h("div", { class: "small muted" }, `#${run.id} · ${run.project} `,
        run.tags.length ? h("span", { class: "tags" }, ...run.tags.map((t) => h("span", { class: "tag" }, t))) : null)),
    h("td", {}, run.mode, h("div", { class: "small muted" }, run.detector ? run.detector.name : "no detector")),
    h("td", { class: "num" }, stage ? `S${stage.index} · ` : "", lr === undefined ? "–" : fmtLr(lr)),
    h("td", { class: "num" }, step >= 0 ? fmtInt(step) : "–",
      epochs.length ? h("div", { class: "small muted" }, `epoch ${fmtEpoch(Math.max(...epochs))}`) : null),
    h("td", { class: "num" }, trainLoss ? fmtValue(trainLoss.value) : "–"),
    h("td", { class: "num" }, testLoss ? fmtValue(testLoss.value) : "–"),
    h("td", { class: "num" }, testAcc ? fmtPercent(testAcc.value) : "–"),
    h("td", {}, run.pending_proposals
      ? h("a", { class: "badge-pending", href: `${link}#decision`, id: `pending-link-${run.id}` },
        run.pending_proposals === 1 ? "1 proposal waiting" : `${run.pending_proposals} proposals waiting`)
      : h("span", { class: "muted" }, "–")),
    h("td", { class: "num", title: new Date(lastTime * 1000).toString() }, ago(lastTime)),
    h("td", { class: "num", title: new Date(run.created_at).toString() }, fmtCreated(run.created_at)),
    h("td", { class: "num" }, fmtDuration(durationOf(run))),
    ...configKeys.map((key) => h("td", { class: "num", dataset: { config: key } }, configText(flatConfig(run)[key]))),
  );
}

// "Dec 4, 20:14": the day and time; the full date is in the cell's title.
function fmtCreated(iso) {
  return new Date(iso).toLocaleString("en-US", { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit",
    hour12: false });
}

// "42 s", "12 min 05 s", "3 h 07 min".
function fmtDuration(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) return "–";
  const s = Math.round(seconds);
  const pad = (n) => String(n).padStart(2, "0");
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${pad(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${pad(Math.floor((s % 3600) / 60))} min`;
}

function renderRows() {
  const list = ordered();
  const body = $("runs");
  // Rows are rebuilt on live changes: whoever is tabbing through them keeps their place.
  const focused = body.contains(document.activeElement) ? document.activeElement.id : null;
  if (!list.length && !listed) {
    body.replaceChildren();
  } else if (!list.length) {
    const any = FILTERS.some((f) => filters[f]);
    body.replaceChildren(h("tr", {}, h("td", { colspan: String(allColumns().length), class: "muted" },
      any ? "No run matches these filters." : "No runs yet. Start one with `stagewatch train` or `stagewatch demo`.")));
  } else {
    body.replaceChildren(...list.map(row));
  }
  if (focused) document.getElementById(focused)?.focus();
  const shown = `${list.length} run${list.length === 1 ? "" : "s"}${nextCursor ? " (more below)" : ""}`;
  $("runs-caption").textContent = `${shown}. Updated live; click a column to sort.`;
  renderBanner();
  renderDatalists();
  renderPicker();
}

// Live events touch one row at a time; a whole re-render is kept for sorting, at most every 250 ms.
const rerender = throttled(renderRows, 250);

function renderBanner() {
  const waiting = [...runs.values()].filter((r) => r.pending_proposals > 0);
  const banner = $("pending-banner");
  banner.classList.toggle("hidden", waiting.length === 0);
  if (!waiting.length) {
    banner.replaceChildren();
    return;
  }
  const links = waiting.flatMap((r, i) => [i ? ", " : "", h("a", { href: `run.html?id=${r.id}#decision` }, r.name)]);
  const text = waiting.length === 1 ? "1 run is waiting for a decision: " : `${waiting.length} runs are waiting for a decision: `;
  banner.replaceChildren(h("strong", {}, text), ...links);
  document.title = `(${waiting.length}) Runs · Stagewatch`;
}

function renderDatalists() {
  const projects = new Set();
  const tags = new Set();
  for (const r of runs.values()) {
    projects.add(r.project);
    for (const t of r.tags) tags.add(t);
  }
  $("projects").replaceChildren(...[...projects].sort().map((p) => h("option", { value: p })));
  $("tags").replaceChildren(...[...tags].sort().map((t) => h("option", { value: t })));
}

function updateCompare() {
  const button = $("compare");
  button.disabled = selected.size === 0;
  button.textContent = selected.size ? `Compare selected (${selected.size})` : "Compare selected";
}

// --- loading -------------------------------------------------------------------------------------------------------

let loadRequest = 0;

async function load({ append = false } = {}) {
  const request = ++loadRequest;
  const params = { ...filters, limit: PAGE, cursor: append ? nextCursor : undefined };
  let page;
  try {
    page = await api("/runs", { params });
  } catch (error) {
    if (request !== loadRequest) return;
    const box = $("load-error");
    box.textContent = `The runs could not be loaded: ${explain(error)}`;
    box.classList.remove("hidden");
    hook.errors.push(box.textContent);
    $("runs-caption").textContent = "";
    return;
  }
  if (request !== loadRequest) return; // filters changed meanwhile
  $("load-error").classList.add("hidden");
  listed = true;
  if (!append) runs.clear();
  for (const run of page.data) runs.set(run.id, run);
  nextCursor = page.next_cursor;
  $("more").classList.toggle("hidden", !nextCursor);
  renderRows();
  hook.loadedAt = performance.now();
  loadStages(page.data.map((r) => r.id));
}

// Runs carry their open stage (`stage`); only for a run without one (an older server) is it fetched, a few at
// a time, after the table is up.
async function loadStages(ids) {
  const queue = [];
  for (const id of ids) {
    const run = runs.get(id);
    if (run && run.stage !== undefined) {
      if (run.stage) stages.set(id, run.stage);
    } else {
      queue.push(id);
    }
  }
  const worker = async () => {
    while (queue.length) {
      const id = queue.shift();
      try {
        const list = await api(`/runs/${id}/stages`);
        if (list.length) stages.set(id, list[list.length - 1]);
      } catch {
        // a run deleted meanwhile, or no permission: the cell keeps its dash
      }
    }
    rerender();
  };
  await Promise.all([worker(), worker(), worker(), worker()]);
}

function matches(run) {
  if (filters.status && run.status !== filters.status) return false;
  if (filters.project && run.project !== filters.project) return false;
  if (filters.tag && !run.tags.includes(filters.tag)) return false;
  if (filters.name && !run.name.toLowerCase().includes(filters.name.toLowerCase())) return false;
  return true;
}

// One fetch per run at a time, however many events asked for it.
const refreshing = new Map();
function refreshRun(id) {
  if (refreshing.has(id)) {
    refreshing.set(id, true);
    return;
  }
  refreshing.set(id, false);
  api(`/runs/${id}`).then((run) => {
    const known = runs.has(id);
    if (matches(run)) {
      if (!known) announce(`New run: ${run.name}.`);
      runs.set(id, run);
      if (!known) loadStages([id]);
    } else runs.delete(id);
    rerender();
  }).catch(() => {}).finally(() => {
    const again = refreshing.get(id);
    refreshing.delete(id);
    if (again) refreshRun(id);
  });
}

// --- live ------------------------------------------------------------------------------------------------------------

function onPoints(event) {
  const run = runs.get(event.run_id);
  if (!run) return;
  const now = Date.now() / 1000;
  for (const [key, batch] of Object.entries(event.keys)) {
    const latest = run.latest[key] || { step: null, value: null, epoch: null, time: null, count: 0 };
    latest.count += batch.count;
    latest.step = Math.max(latest.step ?? -1, batch.last_step);
    latest.time = now;
    if (batch.points && batch.points.length) {
      const [, value, epoch] = batch.points[batch.points.length - 1];
      latest.value = value;
      if (epoch !== null && epoch !== undefined) latest.epoch = epoch;
    } else {
      refreshRun(run.id); // a big batch: its last value is not in the event
    }
    run.latest[key] = latest;
  }
  if (run.status === "stale") run.status = "running"; // ingesting is a heartbeat
  rerender();
}

function onStage(stage) {
  const current = stages.get(stage.run_id);
  if (!current || stage.index >= current.index) {
    stages.set(stage.run_id, stage);
    rerender();
  }
}

subscribe("/stream", {
  points: onPoints,
  decision: (d) => refreshRun(d.run_id),
  stage: onStage,
  run: (event) => refreshRun(event.run_id),
}, setLive);

// --- the form --------------------------------------------------------------------------------------------------------

const form = $("filters");
function commit(push) {
  const data = new FormData(form);
  filters = Object.fromEntries(FILTERS.map((f) => [f, String(data.get(f) || "").trim()]));
  writeUrl(push);
  load();
}
let typing = null;
form.addEventListener("input", (event) => {
  if (event.target.tagName !== "INPUT") return;
  clearTimeout(typing);
  typing = setTimeout(() => commit(false), 300);
});
form.addEventListener("change", () => {
  clearTimeout(typing);
  commit(true);
});
form.addEventListener("submit", (event) => {
  event.preventDefault();
  clearTimeout(typing);
  commit(true);
});
$("f-clear").addEventListener("click", () => {
  for (const f of FILTERS) $(`f-${f}`).value = "";
  commit(true);
});
$("compare").addEventListener("click", () => {
  location.href = `compare.html?runs=${[...selected].join(",")}`;
});
$("more").addEventListener("click", () => load({ append: true }));
window.addEventListener("popstate", () => {
  filters = readFilters();
  sort = readSort();
  fillForm();
  renderHead();
  load();
});
window.addEventListener("stagewatch:token", () => load());

fillForm();
renderHead();
load();
setInterval(() => {
  if (document.visibilityState === "visible") load();
}, RECONCILE_MS);
setInterval(rerender, 5000); // the "ago" column
