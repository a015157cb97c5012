// One run as the run and compare pages hold it: the run, its series (downsampled overview per key), stages and
// decisions, kept current from live events. Small batches arrive with their points and are appended as they are;
// big ones (or a wall-time axis, since events carry no time) fetch the new tail; an overview that has grown
// well past what a chart needs is fetched again, downsampled.

import { api } from "./api.js";
import { appendPoints, appendSeries, emptySeries, fromApi, lastStep } from "./series.js";

export const MAX_POINTS = 2000;
const REFETCH_FACTOR = 3; // an overview grown past 3x MAX_POINTS is downsampled again
const REFETCH_EVERY_MS = 3000;

export async function fetchSeries(runId, keys, params = {}) {
  const body = await api(`/runs/${runId}/metrics`, {
    params: { key: keys, max_points: MAX_POINTS, ...params },
  });
  return new Map(body.series.map((s) => [s.key, fromApi(s)]));
}

export class RunData {
  constructor(id, { onChange = () => {}, needsTime = () => false } = {}) {
    this.id = id;
    this.run = null;
    this.series = new Map();
    this.stages = [];
    this.decisions = [];
    this.onChange = onChange; // (what: "points" | "stages" | "decisions" | "run", detail) after a live change
    this.needsTime = needsTime; // whether appended points need their wall time (the x-axis shows it)
    this.tails = new Map(); // key -> in-flight tail fetch
    this.refetchAt = new Map(); // key -> last overview refetch (ms)
    this.appendHooks = []; // (key, append) for views holding zoomed detail of this run
  }

  get name() {
    return this.run ? this.run.name : `run ${this.id}`;
  }

  async load() {
    const [run, stages, decisions, series] = await Promise.all([
      api(`/runs/${this.id}`),
      api(`/runs/${this.id}/stages`),
      api(`/runs/${this.id}/decisions`),
      fetchSeries(this.id, undefined),
    ]);
    this.run = run;
    this.stages = stages;
    this.decisions = decisions;
    this.series = series;
    return this;
  }

  async reloadRun() {
    this.run = await api(`/runs/${this.id}`);
    this.onChange("run");
  }

  async reloadAll() {
    await this.load();
    this.onChange("points");
    this.onChange("stages");
    this.onChange("decisions");
    this.onChange("run");
  }

  // --- live events ---------------------------------------------------------------------------------------------

  // A `points` event: {keys: {key: {count, first_step, last_step, points?: [[step, value, epoch], ...]}}}.
  applyPoints(payload) {
    const now = Date.now() / 1000;
    for (const [key, batch] of Object.entries(payload.keys)) {
      this.updateLatest(key, batch, now);
      let series = this.series.get(key);
      if (!series) {
        series = emptySeries(key);
        this.series.set(key, series);
      }
      // Points with their wall time (a 4th element) can be appended on any x-axis; older servers sent none.
      const timed = batch.points && batch.points.every((p) => p.length > 3);
      if (batch.points && (timed || !this.needsTime())) {
        appendPoints(series, batch.points);
        for (const hook of this.appendHooks) hook(key, (detail) => appendPoints(detail, batch.points));
        this.maybeRefetch(key);
      } else {
        this.fetchTail(key);
      }
    }
    this.onChange("points", Object.keys(payload.keys));
  }

  updateLatest(key, batch, now) {
    if (!this.run) return;
    const latest = this.run.latest[key] || { step: null, value: null, epoch: null, time: null, count: 0 };
    latest.count += batch.count;
    if (latest.step === null || batch.last_step >= latest.step) {
      latest.step = batch.last_step;
      latest.time = now;
      if (batch.points && batch.points.length) {
        const last = batch.points[batch.points.length - 1];
        latest.value = last[1];
        latest.epoch = last[2] ?? latest.epoch;
      }
    }
    this.run.latest[key] = latest;
  }

  // The points after the last one held, downsampled if there are many; one fetch per key at a time.
  fetchTail(key) {
    if (this.tails.has(key)) {
      this.tails.set(key, "again");
      return;
    }
    this.tails.set(key, "running");
    const series = this.series.get(key);
    const after = lastStep(series) + 1;
    fetchSeries(this.id, [key], { min_step: after })
      .then((fetched) => {
        const tail = fetched.get(key);
        if (tail) appendSeries(series, tail);
        this.maybeRefetch(key);
        this.onChange("points", [key]);
      })
      .catch(() => {})
      .finally(() => {
        const again = this.tails.get(key) === "again";
        this.tails.delete(key);
        if (again) this.fetchTail(key);
      });
  }

  maybeRefetch(key) {
    const series = this.series.get(key);
    if (!series || series.steps.length < REFETCH_FACTOR * MAX_POINTS) return;
    const last = this.refetchAt.get(key) || 0;
    if (performance.now() - last < REFETCH_EVERY_MS) return;
    this.refetchAt.set(key, performance.now());
    fetchSeries(this.id, [key])
      .then((fetched) => {
        const fresh = fetched.get(key);
        if (!fresh) return;
        appendSeries(fresh, series); // points that arrived while the request ran are kept
        this.series.set(key, fresh);
        this.onChange("points", [key]);
      })
      .catch(() => {});
  }

  // Every key's points after the last one held, in one request (a catch-up after the initial load).
  async fetchTails() {
    if (!this.series.size) return;
    const after = Math.min(...[...this.series.values()].map(lastStep)) + 1;
    const fetched = await fetchSeries(this.id, [...this.series.keys()], { min_step: after });
    for (const [key, tail] of fetched) {
      const series = this.series.get(key);
      if (series) appendSeries(series, tail);
    }
    this.onChange("points", [...fetched.keys()]);
  }

  // A decision only moves forward: the answer to the page's own approve can arrive after the live event that
  // says it was applied meanwhile, and must not put the table back to "approved". Its history grows by one entry
  // per transition, so the longer history is the newer state.
  applyDecision(decision) {
    const i = this.decisions.findIndex((d) => d.id === decision.id);
    if (i >= 0 && (decision.history?.length ?? 0) < (this.decisions[i].history?.length ?? 0)) return;
    if (i >= 0) this.decisions[i] = decision;
    else this.decisions.push(decision);
    this.decisions.sort((a, b) => a.id - b.id);
    this.onChange("decisions", decision);
  }

  applyStage(stage) {
    const i = this.stages.findIndex((s) => s.index === stage.index);
    if (i >= 0) this.stages[i] = stage;
    else this.stages.push(stage);
    this.stages.sort((a, b) => a.index - b.index);
    this.onChange("stages", stage);
  }

  get pending() {
    return this.decisions.filter((d) => d.status === "proposed");
  }
}
