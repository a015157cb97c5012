// The chart grid of the run and compare pages: one plotly figure of small multiples sharing the x-axis (plotly
// `matches`), a strip on top with each run's stages (ribbons labelled with their LR) and decisions (markers with
// their evidence on hover), stages as shaded bands behind every panel, and the evidence window of a proposal.
//
// The view owns no data fetching policy beyond zoom: the page hands it runs ({id, name, series, stages,
// decisions}) and calls update() when they change. Zooming fetches full resolution for the zoomed range through
// `fetchDetail`; the x range, log axes, smoothing and hidden panels live in `state` (the page keeps it in the URL).

import { fmtEpoch, fmtInt, fmtLr, fmtValue, PALETTE, runColors } from "./ui.js";
import { lastStep, lowerBound, merged, smooth, StepMap } from "./series.js";

const DASHES = ["solid", "dot", "dash", "longdash", "dashdot"];
const RIBBONS = ["#d0ebff", "#ffe8cc", "#d3f9d8", "#f3d9fa", "#ffe3e3", "#c5f6fa", "#e9fac8", "#fff3bf"];
// Stage bands behind the panels: the strip's ribbon colour of the same stage, faint, so S2 is one colour everywhere.
const BANDS = RIBBONS.map((hex) => `rgba(${[1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16)).join(", ")}, 0.4)`);
const WINDOW_FILL = "rgba(245, 159, 0, 0.22)";
const COLUMN_DOMAINS = [[0, 0.475], [0.525, 1]];
const PANEL_PX = 230;
const GAP_PX = 46;

// Which panel a metric key goes to. The first four are the issue's charts; every other key gets its own.
const PANELS = [
  { id: "train_loss", title: "Train loss", test: (k) => /loss/i.test(k) && !/(test|val|eval)/i.test(k) },
  { id: "test_loss", title: "Test loss", test: (k) => /loss/i.test(k) && /(test|val|eval)/i.test(k) },
  { id: "test_acc", title: "Test accuracy", test: (k) => /acc/i.test(k) && /(test|val|eval)/i.test(k) },
  {
    id: "lr", title: "Learning rate", steps: true, noSmooth: true, defaultLog: true,
    test: (k) => /(^|\/)(lr|learning_rate)$/i.test(k),
  },
];

export function panelOf(key) {
  const known = PANELS.find((p) => p.test(key));
  return known ? known.id : `key:${key}`;
}

// The panels for a set of keys, in a stable order: the known four, then the others alphabetically.
export function panelsFor(keys) {
  const byId = new Map();
  for (const key of [...keys].sort()) {
    const id = panelOf(key);
    if (!byId.has(id)) {
      const known = PANELS.find((p) => p.id === id);
      byId.set(id, { ...(known || { id, title: key }), keys: [] });
    }
    byId.get(id).keys.push(key);
  }
  const order = (p) => {
    const i = PANELS.findIndex((q) => q.id === p.id);
    return i < 0 ? PANELS.length : i;
  };
  return [...byId.values()].sort((a, b) => order(a) - order(b) || a.title.localeCompare(b.title));
}

// --- decisions ---------------------------------------------------------------------------------------------------

export const DECISION_KINDS = {
  proposed: { label: "proposed (waiting)", symbol: "circle", color: "#f59f00", size: 15, glyph: "●" },
  approved: { label: "approved", symbol: "circle-open", color: "#2b8a3e", size: 12, glyph: "○" },
  overridden: { label: "overridden", symbol: "diamond", color: "#862e9c", size: 13, glyph: "◆" },
  applied: { label: "applied", symbol: "triangle-down", color: "#2b8a3e", size: 13, glyph: "▼" },
  rejected: { label: "rejected", symbol: "x", color: "#c92a2a", size: 12, glyph: "✕" },
  dropped: { label: "superseded / expired", symbol: "circle-open", color: "#868e96", size: 10, glyph: "○" },
  observed: { label: "observed only", symbol: "circle-open", color: "#1c7ed6", size: 10, glyph: "○" },
  failed: { label: "failed", symbol: "triangle-down-open", color: "#c92a2a", size: 13, glyph: "▽" },
  rolled_back: { label: "rolled back", symbol: "triangle-down-open", color: "#e8590c", size: 13, glyph: "↶" },
};

export function decisionKind(decision) {
  const s = decision.status;
  if (s === "proposed") return "proposed";
  if (s === "applied") return "applied";
  if (s === "approved" || s === "delivered") return decision.overridden ? "overridden" : "approved";
  if (s === "rejected" || s === "failed" || s === "observed" || s === "rolled_back") return s;
  return "dropped";
}

// "decay ×0.1 → 0.01", "set LR 0.02", "stop".
export function describeAction(d) {
  if (d.action === "decay") return `decay ×${fmtLr(d.factor)}${d.lr ? ` → LR ${fmtLr(d.lr)}` : ""}`;
  if (d.action === "set_lr") return `set LR ${fmtLr(d.lr)}`;
  if (d.action === "rollback") return `roll back to step ${fmtInt(d.step)}`;
  return d.action;
}

function escapeHtml(text) {
  return String(text).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
}

function wrap(text, width = 56) {
  // A word longer than a line (a path, a hash) is cut into pieces that fit.
  const words = String(text).split(/\s+/).flatMap((w) => w.match(new RegExp(`.{1,${width}}`, "g")) || []);
  const lines = [];
  let line = "";
  for (const word of words) {
    if (line && line.length + word.length + 1 > width) {
      lines.push(line);
      line = word;
    } else line = line ? `${line} ${word}` : word;
  }
  if (line) lines.push(line);
  return lines.map(escapeHtml).join("<br>");
}

// A decision's number within its run (1, 2, ...: the order of their ids), which the page shows instead of the
// API's global id: a run's first decision is #1.
export function decisionNumber(run, decision) {
  const i = run.decisions.findIndex((d) => d.id === decision.id);
  return i < 0 ? decision.id : i + 1;
}

// Every line is wrapped (plotly never wraps a hover label, and one too wide for the chart is cut off at its edge);
// the text is plain until wrap() escapes it, so only the title's <b> is markup.
function decisionHover(d, number, runName) {
  const ev = d.evidence || {};
  const lines = [`<b>${wrap(`#${number} ${describeAction(d)}`)}</b> · ${escapeHtml(d.status)}${d.overridden ? " (overridden)" : ""}`];
  if (runName) lines.push(wrap(runName));
  lines.push(wrap(`by ${d.source}${d.step !== null ? ` at step ${fmtInt(d.step)}` : ""}`));
  if (ev.statistic !== undefined) {
    lines.push(wrap(`${ev.statistic}: ${fmtValue(ev.value)} vs threshold ${fmtValue(ev.threshold)}`));
  }
  if (ev.window) lines.push(`evidence window: steps ${fmtInt(ev.window[0])}–${fmtInt(ev.window[1])}`);
  if (ev.explanation) lines.push(wrap(ev.explanation));
  for (const t of d.history || []) {
    const extra = t.step !== undefined && t.step !== null ? ` at step ${fmtInt(t.step)}` : "";
    const lr = t.lr !== undefined && t.lr !== null ? `, LR ${fmtLr(t.lr)}` : "";
    lines.push(wrap(`· ${t.status} by ${t.actor}${extra}${lr}${t.note ? ` — ${t.note}` : ""}`));
  }
  return lines.join("<br>");
}

// --- the view ----------------------------------------------------------------------------------------------------

export class ChartView {
  // state: {xmode: "step"|"epoch"|"time", smooth: 0..0.99, hidden: Set, log: Set, nolog: Set, range: [s0, s1]|null}
  constructor(element, {
    state, compare = false, fetchDetail, onStateChange = () => {}, onDrawn = () => {}, exportName = () => "stagewatch",
  }) {
    this.element = element;
    this.exportName = exportName; // the PNG download's file name and title: the run's name
    // What plotly's hover label cannot say without per-point data on load: the step, epoch, wall time, stage and
    // LR of the hovered point (of every run at that x on compare), worked out only when a point is hovered.
    this.info = document.createElement("p");
    Object.assign(this.info, { id: "hover-info", className: "hover-info" });
    this.info.textContent = "Hover a curve for its step, epoch, wall time, stage and LR.";
    element.before(this.info);
    this.traceSources = []; // trace index -> {run, series} of the figure on screen
    this.hoverMaps = null; // run id -> {epoch, time} StepMaps, built at the first hover after a draw
    window.addEventListener("stagewatch:theme", () => this.update()); // the figure's colours follow the theme
    this.state = state;
    this.compare = compare;
    this.fetchDetail = fetchDetail;
    this.onStateChange = onStateChange;
    this.onDrawn = onDrawn;
    this.runs = [];
    this.highlight = null; // {window: [a, b], runId}: the evidence window drawn over every panel
    this.detail = null; // {min, max, byRun: Map(runId -> Map(key -> series))}
    this.userY = new Map(); // panel id -> y range the user zoomed to (kept until a reset)
    this.plotted = false;
    this.drawing = null;
    this.dirty = false;
    this.zoomRequest = 0;
    this.panels = [];
  }

  // --- drawing ---------------------------------------------------------------------------------------------------

  // Coalesces bursts of live events into one redraw per frame; a redraw in flight is followed by one more.
  update() {
    this.dirty = true;
    if (this.scheduled) return;
    this.scheduled = true;
    requestAnimationFrame(() => {
      this.scheduled = false;
      if (this.drawing) return; // draw() re-checks `dirty` when it finishes
      this.draw();
    });
  }

  async draw() {
    this.dirty = false;
    const { data, layout } = this.figure();
    const steps = this.figureSteps;
    const name = this.exportName();
    // Nothing that leaves the machine: no Chart Studio / Plotly Cloud buttons or links (the dashboard works
    // offline). The PNG is named after the run.
    const config = {
      responsive: true,
      displaylogo: false,
      showLink: false,
      showSendToCloud: false,
      showEditInChartStudio: false,
      modeBarButtonsToRemove: ["lasso2d", "select2d", "autoScale2d", "sendDataToCloud", "editInChartStudio", "toImage"],
      modeBarButtonsToAdd: [{
        name: "download-png", title: "Download as PNG (titled with the run's name)", icon: window.Plotly.Icons.camera,
        click: (gd) => this.downloadPng(gd),
      }],
      toImageButtonOptions: { format: "png", filename: fileName(name) },
    };
    this.drawing = window.Plotly.react(this.element, data, layout, config);
    try {
      await this.drawing;
    } finally {
      this.drawing = null;
    }
    this.drawnSteps = steps; // what is on screen now, per run: {key: last step drawn}
    this.element.classList.remove("loading");
    this.hoverMaps = null;
    if (!this.plotted) {
      this.plotted = true;
      this.element.on("plotly_relayout", (event) => this.onRelayout(event));
      this.element.on("plotly_hover", (event) => this.onHover(event));
    }
    this.onDrawn(this);
    if (this.dirty) this.update();
  }

  // Everything the figure shows, rebuilt from the model: cheap next to plotly's own drawing.
  figure() {
    const keys = new Set();
    for (const run of this.runs) for (const key of run.series.keys()) keys.add(key);
    const panels = panelsFor(keys).filter((p) => !this.state.hidden.has(p.id));
    this.panels = panels;
    this.figureSteps = new Map(this.runs.map((run) => [run.id, {}]));
    this.traceSources = [];
    const seriesOf = (run, key) => {
      const zoomed = this.detail?.byRun.get(run.id);
      const series = zoomed?.series.get(key);
      return merged(run.series.get(key), series && { min: zoomed.min, max: zoomed.max, series });
    };
    const maps = new Map(
      this.runs.map((run) => [run.id, new StepMap(this.state.xmode, [...run.series.values()])]),
    );
    const colors = runColors(this.runs.map((run) => run.id));
    const theme = themeColors();
    const width = this.element.clientWidth || 900;
    const columns = panels.length > 1 && width >= 760 ? 2 : 1;
    const rows = Math.max(1, Math.ceil(panels.length / columns));
    const lanes = Math.max(1, this.runs.length);
    const stripPx = 24 + 26 * lanes;
    const margin = { l: this.compare ? 84 : 64, r: 18, t: 30, b: 34 };
    const plotPx = stripPx + rows * (PANEL_PX + GAP_PX);
    const height = plotPx + margin.t + margin.b;
    const frac = (px) => px / plotPx;
    const xType = this.state.xmode === "time" ? "date" : "linear";
    const xTitle = { step: "step", epoch: "epoch", time: "wall time" }[this.state.xmode];
    // With two columns of panels the strip is drawn twice, once above each column, so that a stage boundary in
    // the strip sits right above the same boundary in the panels under it. The right copy's axes come after the
    // panels' (x/y{panels + 2}); it has no lane labels and its traces are "mirror"s.
    const strips = [{ x: "x", y: "y", domain: columns === 1 ? [0, 1] : COLUMN_DOMAINS[0], mirror: false }];
    if (columns === 2) {
      const n = panels.length + 2;
      strips.push({ x: `x${n}`, y: `y${n}`, domain: COLUMN_DOMAINS[1], mirror: true });
    }

    const layout = {
      height,
      margin,
      uirevision: "stagewatch", // plotly keeps what the user did (zoom, hover) across react() calls
      // Compare: every run at the hovered x in one label, as W&B and TensorBoard show it.
      hovermode: this.compare ? "x unified" : "closest",
      hoverlabel: { namelength: -1, bgcolor: theme.bg, font: { color: theme.fg } },
      showlegend: false,
      dragmode: "zoom",
      font: { family: "system-ui, sans-serif", size: 12, color: theme.fg },
      paper_bgcolor: theme.bg,
      plot_bgcolor: theme.bg,
      shapes: [],
      annotations: [],
    };
    for (const strip of strips) {
      const xName = strip.x === "x" ? "xaxis" : `xaxis${strip.x.slice(1)}`;
      const yName = strip.y === "y" ? "yaxis" : `yaxis${strip.y.slice(1)}`;
      layout[xName] = {
        domain: strip.domain, anchor: strip.y, side: "top", type: xType, showgrid: false, zeroline: false,
        title: { text: xTitle, standoff: 2, font: { size: 11 } }, automargin: false, color: theme.muted,
        ...(strip.mirror ? { matches: "x" } : {}),
      };
      layout[yName] = {
        domain: [1 - frac(stripPx), 1], anchor: strip.x, fixedrange: true, showgrid: false, zeroline: false,
        range: [-0.6, lanes - 0.4], tickvals: [...Array(lanes).keys()],
        // Lane i from the bottom is run (lanes - 1 - i): the first run is on top. "#id name": names of runs
        // started from one script often share their first dozen characters.
        ticktext: this.runs.map((_, lane) => {
          if (strip.mirror) return "";
          if (!this.compare) return "stages";
          const run = this.runs[lanes - 1 - lane];
          return `<span style="color:${colors.get(run.id)}">#${run.id} ${escapeHtml(shorten(run.name, 9))}</span>`;
        }),
        tickfont: { size: 10 },
      };
    }
    const range = this.xRange(maps);
    // Both attributes, always: under uirevision plotly would keep an earlier autorange otherwise.
    if (range) Object.assign(layout.xaxis, { range, autorange: false });
    else layout.xaxis.autorange = true;

    const data = [];
    // --- the strip: stage ribbons and decision markers, one lane per run (top lane = first run) ---
    this.runs.forEach((run, ri) => {
      const lane = lanes - 1 - ri;
      const map = maps.get(run.id);
      const end = runLastStep(run);
      run.stages.forEach((stage, si) => {
        const x0 = map.x(stage.start_step);
        const x1 = map.x(stage.end_step ?? Math.max(end, stage.start_step));
        if (x0 === null || x1 === null) return;
        for (const strip of strips) {
          layout.shapes.push({
            type: "rect", xref: strip.x, yref: strip.y, x0, x1, y0: lane - 0.45, y1: lane + 0.02, layer: "below",
            fillcolor: RIBBONS[si % RIBBONS.length], line: { width: 1, color: theme.bg },
            // The labels once, in the left strip; the right copy says the same in the same colours.
            label: strip.mirror ? undefined : { text: `S${stage.index} · lr ${fmtLr(stage.lr)}`,
              font: { size: 10, color: "#1b1f24" }, textposition: "middle left", padding: 4 },
          });
        }
      });
      const groups = new Map();
      for (const d of run.decisions) {
        const step = d.step ?? d.applied_step ?? end;
        const x = map.x(step);
        if (x === null) continue;
        const kind = decisionKind(d);
        if (!groups.has(kind)) groups.set(kind, { x: [], y: [], text: [], ids: [], symbols: [] });
        const g = groups.get(kind);
        g.x.push(x);
        g.y.push(lane + 0.24);
        g.text.push(decisionHover(d, decisionNumber(run, d), this.compare ? `#${run.id} ${run.name}` : null));
        g.ids.push(d.id);
        g.symbols.push(d.action === "stop" ? "square" : DECISION_KINDS[kind].symbol);
      }
      for (const [kind, g] of groups) {
        const style = DECISION_KINDS[kind];
        for (const strip of strips) {
          data.push({
            type: "scatter", mode: "markers", xaxis: strip.x, yaxis: strip.y, x: g.x, y: g.y,
            name: style.label, hovertext: g.text, hoverinfo: "text", customdata: g.ids,
            marker: { symbol: g.symbols, size: style.size, color: style.color, line: { width: 1.5, color: style.color } },
            hoverlabel: { align: "left", bgcolor: theme.bg, bordercolor: style.color, font: { size: 12, color: theme.fg } },
            meta: { role: strip.mirror ? "decisions-mirror" : "decisions", run: run.id, kind },
          });
        }
      }
    });

    // --- the panels ---
    panels.forEach((panel, pi) => {
      const n = pi + 2;
      const row = Math.floor(pi / columns);
      const col = pi % columns;
      const top = 1 - frac(stripPx + GAP_PX + row * (PANEL_PX + GAP_PX));
      const bottom = top - frac(PANEL_PX);
      const xDomain = columns === 1 ? [0, 1] : COLUMN_DOMAINS[col];
      const isLog = this.isLog(panel);
      layout[`xaxis${n}`] = {
        domain: xDomain, anchor: `y${n}`, matches: "x", type: xType, showgrid: true, gridcolor: theme.grid,
        zeroline: false, showticklabels: true, tickfont: { size: 10 }, color: theme.muted,
      };
      layout[`yaxis${n}`] = {
        domain: [bottom, top], anchor: `x${n}`, type: isLog ? "log" : "linear", showgrid: true,
        gridcolor: theme.grid, zeroline: false, exponentformat: "power", tickfont: { size: 10 }, color: theme.muted,
      };
      const legend = [];
      const drawn = [];
      // Dense series first, so a per-step curve lies under the per-epoch one of the same panel.
      const count = (key) => Math.max(0, ...this.runs.map((r) => r.series.get(key)?.total ?? 0));
      const keys = [...panel.keys].sort((a, b) => count(b) - count(a) || a.localeCompare(b));
      keys.forEach((key, ki) => {
        this.runs.forEach((run, ri) => {
          if (!run.series.has(key)) return;
          const s = seriesOf(run, key);
          this.figureSteps.get(run.id)[key] = lastStep(s);
          const map = maps.get(run.id);
          const x = map.xsOf(s);
          // The run page: the panel's first key in the run's own colour (the one it has on compare), others in
          // the palette's next ones. Compare: the run's colour, keys told apart by dash.
          const own = colors.get(run.id);
          const color = this.compare || ki === 0 ? own : PALETTE[(PALETTE.indexOf(own) + ki) % PALETTE.length];
          const dash = this.compare ? DASHES[ki % DASHES.length] : "solid";
          const name = this.compare ? `#${run.id} ${run.name} · ${key}` : key;
          const line = { color, width: 1.6, dash, shape: panel.steps ? "hv" : "linear" };
          const weight = panel.noSmooth ? 0 : densityWeight(this.state.smooth, s.values.length);
          const common = { type: "scatter", mode: "lines", xaxis: `x${n}`, yaxis: `y${n}`, x, connectgaps: false };
          const hovertemplate = `%{y:.4~g}<extra>${escapeHtml(name)}</extra>`;
          if (weight > 0) {
            // The raw line stays, faint, under the smoothed one; both count for the y-axis (applyYRange).
            data.push({ ...common, y: s.values, name, line: { ...line, width: 1 }, opacity: 0.28, hoverinfo: "skip",
              meta: { role: "raw", run: run.id, key, panel: panel.id } });
            drawn.push(data.length - 1);
            this.traceSources[data.length - 1] = { run, series: s };
            data.push({ ...common, y: smooth(s.values, weight), name: `${name} (smoothed)`, line, hovertemplate,
              meta: { role: "smoothed", run: run.id, key, panel: panel.id, weight } });
          } else {
            data.push({ ...common, y: s.values, name, line, hovertemplate,
              meta: { role: "raw", run: run.id, key, panel: panel.id } });
          }
          drawn.push(data.length - 1);
          this.traceSources[data.length - 1] = { run, series: s };
          if (!this.compare || ri === 0) {
            const swatch = this.compare ? { solid: "━", dot: "┈", dash: "╍", longdash: "━ ━", dashdot: "━·" }[dash] : "━";
            legend.push(`<span style="color:${this.compare ? theme.muted : color}">${swatch}</span> ${escapeHtml(key)}`);
          }
        });
      });
      if (panel.id === "test_acc" && this.allWithin01(drawn.map((i) => data[i]))) layout[`yaxis${n}`].tickformat = ".0%";
      layout.annotations.push({
        xref: `x${n} domain`, yref: `y${n} domain`, x: 0, y: 1, xanchor: "left", yanchor: "bottom", yshift: 4,
        showarrow: false, align: "left", font: { size: 12 },
        text: `<b>${escapeHtml(panel.title)}</b>${isLog ? " (log)" : ""}   ${legend.join("   ")}`,
      });
      this.applyYRange(layout[`yaxis${n}`], panel, drawn.map((i) => data[i]), range, isLog);

      // Stages behind the curves: shaded bands in the strip's stage colours (the run page) or boundaries in the
      // run's colour (compare).
      this.runs.forEach((run) => {
        const map = maps.get(run.id);
        const end = runLastStep(run);
        run.stages.forEach((stage, si) => {
          const x0 = map.x(stage.start_step);
          const x1 = map.x(stage.end_step ?? Math.max(end, stage.start_step));
          if (x0 === null || x1 === null) return;
          if (!this.compare) {
            layout.shapes.push({ type: "rect", xref: `x${n}`, yref: `y${n} domain`, x0, x1, y0: 0, y1: 1,
              layer: "below", fillcolor: BANDS[si % BANDS.length], opacity: theme.dark ? 0.35 : 1, line: { width: 0 } });
          } else if (si > 0) {
            layout.shapes.push({ type: "line", xref: `x${n}`, yref: `y${n} domain`, x0, x1: x0, y0: 0, y1: 1,
              layer: "below", line: { width: 1.2, dash: "dashdot", color: colors.get(run.id) } });
          }
        });
      });
      if (this.highlight) {
        const map = maps.get(this.highlight.runId) || maps.values().next().value;
        const [a, b] = this.highlight.window;
        const x0 = map && map.x(a);
        const x1 = map && map.x(b);
        if (x0 !== null && x1 !== null && x0 !== undefined) {
          layout.shapes.push({ type: "rect", xref: `x${n}`, yref: `y${n} domain`, x0, x1, y0: 0, y1: 1,
            layer: "below", fillcolor: WINDOW_FILL, line: { width: 1, color: "#f59f00", dash: "dot" },
            label: pi === 0 ? { text: "evidence window", textposition: "top center", font: { size: 10, color: "#7a4d00" } } : undefined });
        }
      }
    });
    if (this.highlight) {
      const map = maps.get(this.highlight.runId) || maps.values().next().value;
      const x0 = map && map.x(this.highlight.window[0]);
      const x1 = map && map.x(this.highlight.window[1]);
      if (x0 !== null && x1 !== null && x0 !== undefined) {
        for (const strip of strips) {
          layout.shapes.push({ type: "rect", xref: strip.x, yref: strip.y, x0, x1, y0: -0.5, y1: lanes - 0.5,
            layer: "below", fillcolor: WINDOW_FILL, line: { width: 0 } });
        }
      }
    }
    return { data, layout };
  }

  // --- hover -----------------------------------------------------------------------------------------------------

  // The hovered point's context, one line per run: "#3 ad-approve-b · step 1,234 · epoch 3.4 · 20:14:03 · S1 ·
  // LR 0.01". Looked up by binary search from the trace's series; the epoch/time maps are built once per draw.
  onHover(event) {
    const lines = new Map();
    for (const point of event.points || []) {
      const source = this.traceSources[point.curveNumber];
      if (!source || lines.has(source.run.id)) continue;
      lines.set(source.run.id, this.describePoint(source.run, source.series, point.pointNumber));
    }
    if (lines.size) this.info.textContent = [...lines.values()].join("  |  ");
  }

  describePoint(run, series, i) {
    const step = series.steps[i];
    if (step === undefined) return "";
    if (!this.hoverMaps) this.hoverMaps = new Map();
    if (!this.hoverMaps.has(run.id)) {
      const all = [...run.series.values()];
      this.hoverMaps.set(run.id, { epoch: new StepMap("epoch", all), time: new StepMap("time", all) });
    }
    const maps = this.hoverMaps.get(run.id);
    const epoch = series.epochs[i] ?? (maps.epoch.usable ? maps.epoch.value(step) : null);
    const time = series.times[i] ?? (maps.time.usable ? maps.time.value(step) : null);
    const stage = stageAt(run.stages, step);
    const lr = stage ? stage.lr : lrAt(run, step);
    const parts = [
      this.compare ? `#${run.id} ${run.name}` : null,
      `${series.key} ${fmtValue(series.values[i])}`,
      `step ${fmtInt(step)}`,
      epoch !== null && epoch !== undefined ? `epoch ${fmtEpoch(epoch)}` : null,
      time ? new Date(time * 1000).toLocaleString() : null,
      stage ? `stage S${stage.index}` : null,
      lr !== null && lr !== undefined ? `LR ${fmtLr(lr)}` : null,
    ];
    return parts.filter(Boolean).join(" · ");
  }

  isLog(panel) {
    if (this.state.log.has(panel.id)) return true;
    if (this.state.nolog.has(panel.id)) return false;
    return Boolean(panel.defaultLog);
  }

  allWithin01(traces) {
    let any = false;
    for (const t of traces) {
      for (const v of t.y) {
        if (!Number.isFinite(v)) continue;
        if (v < 0 || v > 1) return false;
        any = true;
      }
    }
    return any;
  }

  // The x range in plotly's units, from the zoom kept in steps (so it survives a change of x-axis mode).
  xRange(maps) {
    if (!this.state.range) return null;
    const map = maps.values().next().value;
    if (!map || !map.usable) return null;
    const x0 = map.x(this.state.range[0]);
    const x1 = map.x(this.state.range[1]);
    return x0 === null || x1 === null ? null : [x0, x1];
  }

  // Plotly fits y to every point of a trace, also those outside a zoomed x range: a late, flat part of a loss
  // curve would stay squashed. Zoomed, y fits what is visible, unless the user zoomed y too.
  applyYRange(axis, panel, traces, xRange, isLog) {
    const user = this.userY.get(panel.id);
    if (user) {
      Object.assign(axis, { range: user, autorange: false });
      return;
    }
    // Unzoomed, plotly's autorange is right for linear axes; log axes get a look first (below).
    if (!xRange && !isLog) {
      axis.autorange = true;
      return;
    }
    const [x0, x1] = xRange || [-Infinity, Infinity];
    let lo = Infinity;
    let hi = -Infinity;
    for (const t of traces) {
      const xs = t.x;
      for (let i = 0; i < xs.length; i++) {
        if (xs[i] < x0 || xs[i] > x1) continue;
        let v = t.y[i];
        if (!Number.isFinite(v)) continue;
        if (isLog) {
          if (v <= 0) continue;
          v = Math.log10(v);
        }
        if (v < lo) lo = v;
        if (v > hi) hi = v;
      }
    }
    if (!Number.isFinite(lo)) {
      axis.autorange = true;
      return;
    }
    if (isLog) {
      // Plotly's own log ticks label minor ticks with a bare digit ("2 / 10⁻¹ / 5"), which reads as a value.
      // Every tick here is labelled with its whole value: 1-2-5 steps, or powers of ten over several decades.
      // A flat LR spans no decade: half a decade around it.
      if (hi - lo < 0.5) {
        const mid = (hi + lo) / 2;
        Object.assign(axis, { range: [mid - 0.5, mid + 0.5], autorange: false }, logTicks(mid - 0.5, mid + 0.5));
        return;
      }
      Object.assign(axis, logTicks(lo - 0.1, hi + 0.1));
      if (!xRange) {
        axis.autorange = true;
        return;
      }
    }
    const pad = (hi - lo) * 0.06 || Math.abs(hi) * 0.05 || 0.5;
    Object.assign(axis, { range: [lo - pad, hi + pad], autorange: false });
  }

  // --- zoom --------------------------------------------------------------------------------------------------

  onRelayout(event) {
    let xr = null;
    let reset = false;
    for (const [name, value] of Object.entries(event)) {
      let m = /^xaxis\d*\.range\[(0|1)\]$/.exec(name);
      if (m) {
        xr = xr || [null, null];
        xr[Number(m[1])] = value;
        continue;
      }
      if (/^xaxis\d*\.range$/.test(name) && Array.isArray(value)) xr = [...value];
      if (/^xaxis\d*\.autorange$/.test(name) && value) reset = true;
      m = /^yaxis(\d*)\.(range\[(0|1)\]|range|autorange)$/.exec(name);
      if (m && m[1] !== "") {
        const panel = this.panels[Number(m[1]) - 2];
        if (!panel) continue;
        if (m[2] === "autorange") this.userY.delete(panel.id);
        else {
          const axis = this.element.layout[`yaxis${m[1]}`];
          if (axis && axis.range) this.userY.set(panel.id, [...axis.range]);
        }
      }
    }
    if (reset) {
      this.userY.clear();
      this.setRange(null);
      return;
    }
    if (xr && xr[0] !== null && xr[1] !== null) {
      // Date axes report strings ("2026-11-28 14:02:07.5"), in the shifted "local as UTC" time of StepMap.
      const toX = (v) => (typeof v === "string" ? Date.parse(`${v.replace(" ", "T")}Z`) : v);
      const x = [toX(xr[0]), toX(xr[1])];
      const [s0, s1] = this.stepsOf(this.runs[0], x);
      if (!this.state.range || this.state.range[0] !== s0 || this.state.range[1] !== s1) this.setRange([s0, s1], x);
    }
  }

  // The steps of `run` that an x range covers (on an epoch or wall-time axis each run has its own steps there).
  stepsOf(run, x) {
    const map = new StepMap(this.state.xmode, [...(run?.series.values() || [])]);
    return [Math.max(0, Math.floor(map.step(x[0]))), Math.ceil(map.step(x[1]))];
  }

  // Zoom to steps [s0, s1] of the first run (null: everything; the URL keeps steps), and fetch each run's part of
  // the range at full resolution when it fits. `x`: the range as drawn, when the zoom was made on the chart.
  async setRange(range, x = null) {
    this.state.range = range;
    this.onStateChange();
    const request = ++this.zoomRequest;
    if (!range) {
      this.detail = null;
      this.update();
      return;
    }
    this.update(); // y fits the new x range at once, with what is loaded
    const byRun = new Map();
    await Promise.all(this.runs.map(async (run, i) => {
      const [min, max] = i === 0 || !x || this.state.xmode === "step" ? range : this.stepsOf(run, x);
      const series = await this.fetchDetail(run.id, [...run.series.keys()], min, max);
      byRun.set(run.id, { min, max, series });
    }));
    if (request !== this.zoomRequest) return; // a newer zoom won
    this.detail = { min: range[0], max: range[1], byRun };
    this.update();
  }

  // Live points inside a zoomed range belong to the detail too (it replaces the overview there).
  appendToDetail(runId, key, append) {
    const series = this.detail?.byRun.get(runId)?.series.get(key);
    if (series) append(series);
  }

  // The figure as shown, with the run's name as its title on top (the page's heading is not in the image).
  // Plotly's own PNG export loads its image from a blob: URL, which the page's Content-Security-Policy refuses
  // (img-src 'self' data:); its SVG export is a data: URL, rasterized here on a canvas at twice the size.
  async downloadPng(gd) {
    const name = this.exportName();
    const width = gd.clientWidth;
    const height = gd.layout.height + 36;
    const layout = { ...gd.layout, width, height, margin: { ...gd.layout.margin, t: gd.layout.margin.t + 36 },
      title: { text: escapeHtml(name), x: 0.01, y: 0.995, yanchor: "top" } };
    const svg = await window.Plotly.toImage({ data: gd.data, layout }, { format: "svg", width, height });
    const image = new Image();
    image.src = svg;
    await image.decode();
    const canvas = Object.assign(document.createElement("canvas"), { width: 2 * width, height: 2 * height });
    canvas.getContext("2d").drawImage(image, 0, 0, canvas.width, canvas.height);
    const link = Object.assign(document.createElement("a"), {
      href: canvas.toDataURL("image/png"), download: `${fileName(name)}.png`,
    });
    document.body.append(link);
    link.click();
    link.remove();
  }

  // --- for the tests and the benchmark -------------------------------------------------------------------------
  snapshot() {
    const traces = (this.element.data || []).map((t) => ({
      ...t.meta,
      points: t.x.length,
      lastX: t.x.length ? t.x[t.x.length - 1] : null,
    }));
    return { traces, range: this.state.range, detail: this.detail ? [this.detail.min, this.detail.max] : null };
  }
}

export function runLastStep(run) {
  let last = -1;
  for (const s of run.series.values()) last = Math.max(last, lastStep(s));
  return last;
}

// The slider's weight is for a series of SMOOTH_REFERENCE points; a sparser one gets the weight that smooths
// over the same stretch of the x-axis (w ** (reference / n)): 0.9 flattens a 2,500-point per-step loss, and
// leaves a 20-point per-epoch accuracy nearly as it is instead of pulling its end 7 points low.
const SMOOTH_REFERENCE = 1000;
export function densityWeight(weight, points) {
  if (!(weight > 0) || points < 2) return 0;
  return weight ** (SMOOTH_REFERENCE / Math.max(points, 1));
}

// The stage that holds `step` (stages are sorted by start; the last one may be open).
function stageAt(stages, step) {
  let found = null;
  for (const stage of stages) if (stage.start_step <= step) found = stage;
  return found;
}

// The run's LR at `step` from its LR series, when it has no stages (no detector watching the LR).
function lrAt(run, step) {
  const series = run.series.get(run.run?.detector?.lr_key || "lr");
  if (!series || !series.steps.length) return null;
  const i = Math.min(lowerBound(series.steps, step + 1), series.steps.length) - 1;
  return i >= 0 ? series.values[i] : null;
}

// The chart's colours from the page's CSS variables (app.css), so they follow the light or dark theme.
function themeColors() {
  const css = getComputedStyle(document.documentElement);
  const read = (name, fallback) => css.getPropertyValue(name).trim() || fallback;
  return {
    dark: document.documentElement.dataset.theme === "dark",
    fg: read("--fg", "#1b1f24"),
    bg: read("--bg", "#ffffff"),
    muted: read("--muted", "#57606a"),
    grid: read("--grid", "#eef1f4"),
  };
}

// Ticks for a log axis over [lo, hi] decades: values 1, 2, 5 × 10^k (only 10^k over more than two decades,
// every other one past eight), each labelled in full ("0.02", "1e-4").
function logTicks(lo, hi) {
  const mantissas = hi - lo > 2 ? [1] : [1, 2, 5];
  const every = hi - lo > 8 ? 2 : 1;
  const tickvals = [];
  for (let k = Math.floor(lo); k <= Math.ceil(hi); k++) {
    if (k % every) continue;
    for (const m of mantissas) {
      const v = m * 10 ** k;
      const e = Math.log10(v);
      if (e >= lo && e <= hi) tickvals.push(Number(v.toPrecision(3)));
    }
  }
  return { tickmode: "array", tickvals, ticktext: tickvals.map((v) => String(v)) };
}

function fileName(name) {
  return name.replace(/[^\w.-]+/g, "_") || "stagewatch";
}

function shorten(text, n) {
  return text.length > n ? `${text.slice(0, n - 1)}…` : text;
}

