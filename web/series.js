// Metric series in the browser: decoding the API's arrays, appending live points, merging a zoomed full-resolution
// slice into the overview, smoothing, and mapping steps to epochs or wall time.
//
// A series is {key, steps, values, epochs, times, total}: parallel arrays sorted by step. values hold NaN for
// stored NaN/infinities (drawn as gaps), epochs and times hold null where the worker sent none.

import { toNumber } from "./ui.js";

// getTimezoneOffset() is UTC minus local time, in minutes.
const LOCAL_SHIFT_MS = new Date().getTimezoneOffset() * 60_000;

export function fromApi(series) {
  return {
    key: series.key,
    steps: series.steps,
    values: series.values.map(toNumber),
    epochs: series.epochs.map((e) => (e === null ? null : toNumber(e))),
    times: series.times,
    total: series.total_points,
    downsampled: series.downsampled,
  };
}

export function emptySeries(key) {
  return { key, steps: [], values: [], epochs: [], times: [], total: 0, downsampled: false };
}

export function lastStep(series) {
  return series && series.steps.length ? series.steps[series.steps.length - 1] : -1;
}

// Appends live points [[step, value, epoch], ...] that are newer than what the series holds (an event can
// repeat points the initial load already had). Returns how many were added.
export function appendPoints(series, points, time = null) {
  let added = 0;
  let last = lastStep(series);
  for (const [step, value, epoch, t] of points) {
    if (step <= last) continue;
    series.steps.push(step);
    series.values.push(toNumber(value));
    series.epochs.push(epoch === null || epoch === undefined ? null : toNumber(epoch));
    series.times.push(t ?? time); // live events carry each point's wall time as a 4th element
    last = step;
    added += 1;
  }
  series.total += added;
  return added;
}

// Adds the points of a fetched series (a tail, a catch-up) to `series`, in step order, skipping steps it holds.
// Usually they all come after its last step; a catch-up can also fill a gap before points a live event appended.
export function appendSeries(series, tail) {
  const last = lastStep(series);
  if (!tail.steps.length) return 0;
  if (tail.steps[0] > last) {
    for (let i = 0; i < tail.steps.length; i++) {
      series.steps.push(tail.steps[i]);
      series.values.push(tail.values[i]);
      series.epochs.push(tail.epochs[i]);
      series.times.push(tail.times[i]);
    }
    series.total += tail.steps.length;
    return tail.steps.length;
  }
  const out = emptySeries(series.key);
  let i = 0;
  let j = 0;
  let added = 0;
  const take = (s, k) => {
    out.steps.push(s.steps[k]);
    out.values.push(s.values[k]);
    out.epochs.push(s.epochs[k]);
    out.times.push(s.times[k]);
  };
  while (i < series.steps.length || j < tail.steps.length) {
    const a = i < series.steps.length ? series.steps[i] : Infinity;
    const b = j < tail.steps.length ? tail.steps[j] : Infinity;
    if (a <= b) {
      take(series, i++);
      if (a === b) j++;
    } else {
      take(tail, j++);
      added += 1;
    }
  }
  Object.assign(series, { steps: out.steps, values: out.values, epochs: out.epochs, times: out.times });
  series.total += added;
  return added;
}

// The overview outside [detail.min, detail.max] plus the detail inside: full resolution where the user zoomed,
// the downsampled shape around it (so a pan shows something at once, then fetches its own detail).
export function merged(overview, detail) {
  if (!detail) return overview;
  const out = emptySeries(overview.key);
  const take = (s, i) => {
    out.steps.push(s.steps[i]);
    out.values.push(s.values[i]);
    out.epochs.push(s.epochs[i]);
    out.times.push(s.times[i]);
  };
  let i = 0;
  for (; i < overview.steps.length && overview.steps[i] < detail.min; i++) take(overview, i);
  for (let j = 0; j < detail.series.steps.length; j++) take(detail.series, j);
  while (i < overview.steps.length && overview.steps[i] <= detail.max) i++;
  for (; i < overview.steps.length; i++) take(overview, i);
  out.total = overview.total;
  return out;
}

// TensorBoard's smoothing: an exponential moving average, debiased so the first points are not pulled to 0.
// NaN points stay gaps and do not poison the average.
export function smooth(values, weight) {
  if (!(weight > 0)) return values;
  const out = new Array(values.length);
  let last = 0;
  let n = 0;
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (!Number.isFinite(v)) {
      out[i] = NaN;
      continue;
    }
    last = last * weight + (1 - weight) * v;
    n += 1;
    out[i] = last / (1 - weight ** n);
  }
  return out;
}

export function lowerBound(sorted, value) {
  let lo = 0;
  let hi = sorted.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (sorted[mid] < value) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// Step -> x for the chosen axis. Epoch and wall time come from the points that carry them (any key); steps in
// between are interpolated, so stages and decisions (which know only steps) line up with the curves.
export class StepMap {
  constructor(mode, seriesList) {
    this.mode = mode;
    if (mode === "step") return;
    const pairs = [];
    for (const s of seriesList) {
      const column = mode === "epoch" ? s.epochs : s.times;
      for (let i = 0; i < s.steps.length; i++) {
        const v = column[i];
        if (v !== null && v !== undefined && Number.isFinite(v)) pairs.push([s.steps[i], v]);
      }
    }
    pairs.sort((a, b) => a[0] - b[0] || a[1] - b[1]);
    this.steps = [];
    this.xs = [];
    for (const [step, v] of pairs) {
      if (this.steps.length && this.steps[this.steps.length - 1] === step) continue;
      // Keep the mapping monotonic: a clock that went back must not fold the axis.
      const x = this.xs.length ? Math.max(v, this.xs[this.xs.length - 1]) : v;
      this.steps.push(step);
      this.xs.push(x);
    }
  }

  get usable() {
    return this.mode === "step" || this.steps.length > 0;
  }

  // The raw value of the step (epoch, or Unix seconds) — interpolated, or extrapolated at the ends.
  value(step) {
    const { steps, xs } = this;
    const n = steps.length;
    if (n === 0) return null;
    if (n === 1) return xs[0];
    let i = lowerBound(steps, step);
    if (i < n && steps[i] === step) return xs[i];
    i = Math.min(Math.max(i, 1), n - 1);
    const s0 = steps[i - 1];
    const s1 = steps[i];
    return xs[i - 1] + ((xs[i] - xs[i - 1]) * (step - s0)) / (s1 - s0);
  }

  // What plotly draws: steps and epochs as numbers, wall time as a date in milliseconds. Plotly shows dates
  // as UTC, so they are shifted to read as the browser's local time.
  x(step) {
    if (this.mode === "step") return step;
    const v = this.value(step);
    return v === null ? null : this.fromValue(v);
  }

  fromValue(v) {
    return this.mode === "time" ? v * 1000 - LOCAL_SHIFT_MS : v;
  }

  toValue(x) {
    return this.mode === "time" ? (x + LOCAL_SHIFT_MS) / 1000 : x;
  }

  // The x of every point of a series: its own epoch/time when it has one, the mapped step otherwise.
  xsOf(series) {
    if (this.mode === "step") return series.steps;
    const own = this.mode === "epoch" ? series.epochs : series.times;
    return series.steps.map((step, i) => {
      const v = own[i];
      return v !== null && v !== undefined && Number.isFinite(v) ? this.fromValue(v) : this.x(step);
    });
  }

  // x -> step (inverse of x()), for zooms made on an epoch or time axis.
  step(x) {
    if (this.mode === "step") return x;
    const v = this.toValue(x);
    const { steps, xs } = this;
    const n = xs.length;
    if (n === 0) return 0;
    if (n === 1) return steps[0];
    let i = lowerBound(xs, v);
    i = Math.min(Math.max(i, 1), n - 1);
    const x0 = xs[i - 1];
    const x1 = xs[i];
    if (x1 === x0) return steps[i];
    return steps[i - 1] + ((steps[i] - steps[i - 1]) * (v - x0)) / (x1 - x0);
  }
}
