// The chart toolbar of the run and compare pages (x-axis, smoothing, panels and their log scale, zoom by steps,
// reset) and the view state behind it, kept in the URL hash: a refresh, a bookmark or a link shows the same view.

import { h } from "./ui.js";
import { panelsFor } from "./charts.js";

export function readViewState() {
  const p = new URLSearchParams(location.hash.slice(1));
  const set = (name) => new Set((p.get(name) || "").split(",").filter(Boolean));
  const range = /^(\d+)-(\d+)$/.exec(p.get("range") || "");
  const smooth = Number(p.get("smooth"));
  return {
    xmode: ["step", "epoch", "time"].includes(p.get("x")) ? p.get("x") : "step",
    smooth: Number.isFinite(smooth) && smooth >= 0 && smooth < 1 ? smooth : 0,
    hidden: set("hide"),
    log: set("log"),
    nolog: set("nolog"),
    range: range ? [Number(range[1]), Number(range[2])] : null,
  };
}

export function writeViewState(state) {
  const p = new URLSearchParams();
  if (state.xmode !== "step") p.set("x", state.xmode);
  if (state.smooth > 0) p.set("smooth", String(state.smooth));
  for (const name of ["hidden", "log", "nolog"]) {
    if (state[name].size) p.set(name === "hidden" ? "hide" : name, [...state[name]].join(","));
  }
  if (state.range) p.set("range", `${state.range[0]}-${state.range[1]}`);
  const hash = p.toString();
  // replaceState: a view change is not a navigation; Back leaves the page as users expect.
  history.replaceState(history.state, "", `${location.pathname}${location.search}${hash ? `#${hash}` : ""}`);
}

// Builds the toolbar into `form` and wires it to `view` (a ChartView). Returns refresh(), which re-renders the
// panel toggles (new keys can appear live) and the zoom fields.
export function mountToolbar(form, view, { extra = [] } = {}) {
  const state = view.state;
  const xmode = h("fieldset", {},
    h("legend", {}, "x-axis"),
    ...[["step", "step"], ["epoch", "epoch"], ["time", "wall time"]].map(([value, label]) =>
      h("label", {}, h("input", { type: "radio", name: "xmode", value, checked: state.xmode === value }), ` ${label}`)),
  );
  const smoothValue = h("output", { id: "smooth-value", for: "smooth" }, state.smooth.toFixed(2));
  const smooth = h("input", { id: "smooth", type: "range", min: "0", max: "0.99", step: "0.01",
    value: String(state.smooth), "aria-describedby": "smooth-help" });
  const smoothing = h("label", { for: "smooth" }, "Smoothing ", smooth, " ", smoothValue,
    h("span", { id: "smooth-help", class: "visually-hidden" },
      "debiased exponential moving average, as TensorBoard's; the weight is for a 1,000-point series and scaled to "
      + "each series' density, so a sparse per-epoch curve is smoothed over the same stretch of the axis; 0 is off"));
  const panels = h("div", { class: "panels-toggle", id: "panel-toggles" });
  const from = h("input", { id: "zoom-from", type: "number", min: "0", step: "1", inputmode: "numeric", size: 9 });
  const to = h("input", { id: "zoom-to", type: "number", min: "0", step: "1", inputmode: "numeric", size: 9 });
  // The zoom fields take steps whatever the x-axis shows (the URL keeps steps); the legend says so in epoch and
  // wall-time mode instead of a bare "Steps" next to an epoch axis.
  const zoomLegend = h("legend", { id: "zoom-legend" });
  const zoom = h("fieldset", {},
    zoomLegend,
    h("label", { for: "zoom-from" }, "from "), from,
    h("label", { for: "zoom-to" }, "to "), to,
    h("button", { type: "submit", id: "zoom-apply" }, "Zoom to steps"),
    h("button", { type: "button", id: "zoom-reset", onclick: () => view.setRange(null) }, "Reset zoom"),
  );
  form.replaceChildren(xmode, smoothing, h("fieldset", {}, h("legend", {}, "Panels"), panels), zoom, ...extra);

  form.addEventListener("change", (event) => {
    const target = event.target;
    if (target.name === "xmode") {
      state.xmode = target.value;
      view.userY.clear();
    } else if (target.dataset.panel && target.dataset.toggle === "show") {
      if (target.checked) state.hidden.delete(target.dataset.panel);
      else state.hidden.add(target.dataset.panel);
    } else if (target.dataset.panel && target.dataset.toggle === "log") {
      const id = target.dataset.panel;
      state.log.delete(id);
      state.nolog.delete(id);
      const byDefault = target.dataset.defaultLog === "true";
      if (target.checked !== byDefault) (target.checked ? state.log : state.nolog).add(id);
      view.userY.delete(id);
    } else return;
    writeViewState(state);
    view.update();
  });
  smooth.addEventListener("input", () => {
    state.smooth = Number(smooth.value);
    smoothValue.textContent = state.smooth.toFixed(2);
    writeViewState(state);
    view.update();
  });
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const a = Number(from.value);
    const b = Number(to.value);
    if (from.value === "" || to.value === "" || !(b > a)) {
      to.setCustomValidity("The last step must be after the first.");
      to.reportValidity();
      return;
    }
    to.setCustomValidity("");
    view.userY.clear();
    view.setRange([a, b]);
  });

  let shown = "";
  return function refresh() {
    zoomLegend.textContent = state.xmode === "step" ? "Steps" : `Zoom by step (x-axis: ${state.xmode === "epoch"
      ? "epochs" : "wall time"})`;
    const keys = new Set();
    for (const run of view.runs) for (const key of run.series.keys()) keys.add(key);
    const all = panelsFor(keys);
    const signature = all.map((p) => p.id).join("|");
    if (signature !== shown) {
      shown = signature;
      panels.replaceChildren(...all.map((p) => {
        const showId = `show-${p.id}`;
        const logId = `log-${p.id}`;
        const isLog = state.log.has(p.id) || (Boolean(p.defaultLog) && !state.nolog.has(p.id));
        return h("span", { class: "row" },
          h("input", { type: "checkbox", id: showId, checked: !state.hidden.has(p.id),
            dataset: { panel: p.id, toggle: "show" } }),
          h("label", { for: showId }, p.title),
          h("input", { type: "checkbox", id: logId, checked: isLog,
            dataset: { panel: p.id, toggle: "log", defaultLog: String(Boolean(p.defaultLog)) } }),
          h("label", { for: logId, class: "small muted" }, "log",
            h("span", { class: "visually-hidden" }, ` scale for ${p.title}`)));
      }));
    }
    if (document.activeElement !== from && document.activeElement !== to) {
      from.value = state.range ? String(state.range[0]) : "";
      to.value = state.range ? String(state.range[1]) : "";
    }
  };
}
