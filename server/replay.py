"""``stagewatch replay``: run a detector over a recorded run, offline, exactly as it would have run live.

Input is one of:

- a CSV with a header: ``step`` plus one column per metric (``lr`` optional; an empty cell is a missing
  point), or the long format Stagewatch exports (``key,step,value,...``, one row per point);
- a TensorBoard log directory (or one event file), read with TensorBoard's own ``EventAccumulator``, every
  scalar kept: ``simple_value`` scalars (``torch.utils.tensorboard``, ``tensorboardX``) and the tensor
  scalars of TF2's ``tf.summary.scalar``.

The monitored series is fed to the detector by the same loop live detection uses
(:class:`server.detectors.feed.Feeder`). The recorded learning rate (``lr``, or ``--lr-tag``) is matched to each
point as the last LR logged at or before its step (the first LR for points before any); its first value becomes
the detector's ``initial_lr`` unless ``--set initial_lr=...`` is given, and each change of it is told to the
detector before that point, as live. ``--assume`` says what became of each decision, as the run's mode did live:

- ``applied`` (default): applied at its step -- "what would it have decided" on a recording made without it;
- ``observed``: only noted -- reproduces, decision for decision, a run watched live in observe mode;
- ``logged``: applied where the recorded LR next changes, the detector waiting meanwhile -- reproduces a live
  auto-mode run, whose applied decisions show in its logged LR.

Output: one JSON line per decision on stdout (``Decision.to_dict()``); ``--plot FILE.html`` also writes a
self-contained plotly figure (plotly.js embedded, no CDN) of the curve, the LR, the stages found by
``server.detectors.segment`` and the decisions. Every bad input is a one-line message on stderr and exit
code 2.
"""

from __future__ import annotations

import argparse
import bisect
import csv
import html
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.detectors import Decision, Detector, DetectorError, make_detector
from server.detectors.feed import Feeder, Outcome

if TYPE_CHECKING:
    from server.detectors.segment import Stage

EXIT_USAGE = 2
DEFAULT_LR_NAME = "lr"
MAX_PLOT_POINTS = 20_000  # beyond this the plotted curve keeps each bucket's min and max (spikes survive)
_LONG_FORMAT_COLUMNS = {"key", "step", "value"}


class ReplayError(Exception):
    """Bad input: the message, one line, names what was wrong."""


@dataclass(frozen=True)
class Recording:
    """The monitored series of a recorded run, with the LR in effect at each of its points when known."""

    source: str  # the input, for messages and the plot title
    key: str
    steps: list[int]
    values: list[float]
    lr_key: str | None = None
    lrs: list[float] | None = None  # the LR at each point, aligned with ``steps``; None: no LR recorded


# --- reading ---------------------------------------------------------------------------------------------


Points = list[tuple[int, float]]


def load_recording(path: Path, key: str | None = None, lr_key: str | None = None) -> Recording:
    """Read the series ``key`` (default: the only one besides the LR) and the LR series from a CSV or log."""
    if not path.exists():
        raise ReplayError(f"{path}: no such file or directory")
    if path.is_dir() or "tfevents" in path.name:
        return _load_tensorboard(path, key, lr_key)
    return _load_csv(path, key, lr_key)


def _choose(
    names: Sequence[str], key: str | None, lr_key: str | None, source: str, what: str
) -> tuple[str, str | None]:
    """The monitored name and the LR name (None when there is none) among ``names``."""
    choices = ", ".join(repr(n) for n in names) or "none"
    if lr_key is not None and lr_key not in names:
        raise ReplayError(f"{source}: no {what} {lr_key!r} for the learning rate; {what}s: {choices}")
    lr_name = lr_key if lr_key is not None else (DEFAULT_LR_NAME if DEFAULT_LR_NAME in names else None)
    if key is not None:
        if key not in names:
            raise ReplayError(f"{source}: no {what} {key!r}; {what}s: {choices}")
        return key, lr_name
    metrics = [n for n in names if n != lr_name]
    if len(metrics) == 1:
        return metrics[0], lr_name
    flag = "--tag" if what == "tag" else "--key"
    if not metrics:
        raise ReplayError(f"{source}: no metric {what} to monitor besides the learning rate; {what}s: {choices}")
    listed = ", ".join(repr(n) for n in metrics)
    raise ReplayError(f"{source}: several metric {what}s, choose one with {flag}: {listed}")


def _recording(source: str, key: str, points: Points, lr_key: str | None, lr_points: Points | None) -> Recording:
    if not points:
        raise ReplayError(f"{source}: {key!r} has no numeric data")
    steps = [s for s, _ in points]
    for i in range(1, len(steps)):
        if steps[i] <= steps[i - 1]:
            raise ReplayError(
                f"{source}: steps of {key!r} must strictly increase, but step {steps[i]} follows step {steps[i - 1]}"
            )
    values = [v for _, v in points]
    lrs = _lr_at(steps, lr_points) if lr_points is not None else None
    return Recording(source, key, steps, values, lr_key if lrs is not None else None, lrs)


def _lr_at(steps: Sequence[int], lr_points: Points) -> list[float] | None:
    """For each step, the last finite LR logged at or before it (the first one before any); None if none."""
    known = sorted(((s, v) for s, v in lr_points if math.isfinite(v)), key=lambda p: p[0])
    if not known:
        return None
    lr_steps = [s for s, _ in known]
    return [known[max(bisect.bisect_right(lr_steps, step) - 1, 0)][1] for step in steps]


def _number(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ReplayError(f"{where}: {text!r} is not a number") from None


def _step(text: str, where: str) -> int:
    value = _number(text, where)
    if not value.is_integer():
        raise ReplayError(f"{where}: step {text!r} is not an integer")
    return int(value)


def _read_csv_rows(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and (line number, cells) of every non-blank row."""
    source = str(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            rows = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    except UnicodeDecodeError:
        raise ReplayError(f"{source}: not a UTF-8 text CSV") from None
    except csv.Error as exc:
        raise ReplayError(f"{source}: malformed CSV: {exc}") from None
    except OSError as exc:
        raise ReplayError(f"{source}: cannot read: {exc.strerror or exc}") from None
    if header is None or not any(cell.strip() for cell in header):
        raise ReplayError(f"{source}: empty CSV, expected a header with a 'step' column")
    names = [cell.strip() for cell in header]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ReplayError(f"{source}: column {duplicated[0]!r} appears more than once in the header")
    if "step" not in names:
        raise ReplayError(f"{source}: no 'step' column in the header; columns: {', '.join(map(repr, names))}")
    for line, row in rows:
        if len(row) > len(names):
            raise ReplayError(f"{source}: line {line} has {len(row)} cells, the header {len(names)}")
    return names, rows


def _load_csv(path: Path, key: str | None, lr_key: str | None) -> Recording:
    source = str(path)
    names, rows = _read_csv_rows(path)
    col = {n: i for i, n in enumerate(names)}

    def cell(row: list[str], name: str) -> str:
        i = col[name]
        return row[i].strip() if i < len(row) else ""

    if set(names) >= _LONG_FORMAT_COLUMNS:  # Stagewatch's export: key,step,value,...
        keys = list(dict.fromkeys(cell(row, "key") for _, row in rows if cell(row, "key")))
        chosen, lr_name = _choose(keys, key, lr_key, source, "key")
        series: dict[str, Points] = {chosen: []}
        if lr_name is not None:
            series[lr_name] = []
        for line, row in rows:
            name = cell(row, "key")
            text = cell(row, "value")
            if name in series and text:
                where = f"{source}: line {line}"
                series[name].append((_step(cell(row, "step"), where), _number(text, f"{where}, key {name!r}")))
        return _recording(source, chosen, series[chosen], lr_name, series.get(lr_name) if lr_name else None)

    chosen, lr_name = _choose([n for n in names if n != "step"], key, lr_key, source, "column")
    points: Points = []
    lr_column: Points = []
    for line, row in rows:
        where = f"{source}: line {line}"
        text = cell(row, chosen)
        lr_text = cell(row, lr_name) if lr_name is not None else ""
        if not text and not lr_text:
            continue
        step_text = cell(row, "step")
        if not step_text:
            raise ReplayError(f"{where}: the step is empty")
        step = _step(step_text, where)
        if text:
            points.append((step, _number(text, f"{where}, column {chosen!r}")))
        if lr_text:
            lr_column.append((step, _number(lr_text, f"{where}, column {lr_name!r}")))
    return _recording(source, chosen, points, lr_name, lr_column if lr_name is not None else None)


def _load_tensorboard(path: Path, tag: str | None, lr_tag: str | None) -> Recording:
    source = str(path)
    try:
        from tensorboard.backend.event_processing import event_accumulator
        from tensorboard.util import tensor_util
    except ImportError:
        raise ReplayError(
            f"{source}: reading TensorBoard logs needs tensorboard: pip install 'stagewatch[tensorboard]'"
        ) from None
    try:
        accumulator = event_accumulator.EventAccumulator(
            str(path), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.TENSORS: 0}
        )
        accumulator.Reload()
        tags = accumulator.Tags()
        scalar_tags = list(tags.get(event_accumulator.SCALARS, []))
        # TF2 writes scalars as tensors tagged with the scalars plugin.
        tensor_tags = [
            t
            for t in tags.get(event_accumulator.TENSORS, [])
            if t not in scalar_tags and accumulator.SummaryMetadata(t).plugin_data.plugin_name == "scalars"
        ]
    except Exception as exc:  # a corrupt or foreign file: TensorBoard's errors have no common base
        raise ReplayError(f"{source}: cannot read the TensorBoard log: {exc}") from None
    names = scalar_tags + tensor_tags
    if not names:
        hint = ""
        if path.is_dir():
            runs = sorted({str(p.parent) for p in path.rglob("*tfevents*") if p.parent != path})
            if runs:
                hint = f"; event files are in: {', '.join(runs[:5])}{', ...' if len(runs) > 5 else ''}"
        raise ReplayError(f"{source}: no TensorBoard scalars found{hint}")
    chosen, lr_name = _choose(names, tag, lr_tag, source, "tag")

    def points(name: str) -> Points:
        try:
            if name in scalar_tags:
                return [(int(e.step), float(e.value)) for e in accumulator.Scalars(name)]
            return [
                (int(e.step), float(tensor_util.make_ndarray(e.tensor_proto).item())) for e in accumulator.Tensors(name)
            ]
        except (ValueError, TypeError) as exc:
            raise ReplayError(f"{source}: tag {name!r} does not hold scalar numbers: {exc}") from None

    lr_points = points(lr_name) if lr_name is not None else None
    return _recording(source, chosen, points(chosen), lr_name, lr_points)


# --- detector --------------------------------------------------------------------------------------------


def parse_settings(items: Iterable[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; a value is parsed as JSON when it is JSON (5, 0.1, true, "x"), else kept as text."""
    params: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ReplayError(f"--set {item!r}: expected KEY=VALUE, e.g. --set patience=5")
        if name in params:
            raise ReplayError(f"--set: parameter {name!r} is given more than once")
        try:
            params[name] = json.loads(text)
        except ValueError:
            params[name] = text
    return params


def build_detector(name: str, settings: dict[str, Any], recording: Recording) -> Detector[Any]:
    params = dict(settings)
    first_lr = recording.lrs[0] if recording.lrs else None
    if "initial_lr" not in params and first_lr is not None and first_lr > 0:
        params["initial_lr"] = first_lr
    try:
        return make_detector(name, params)
    except DetectorError as exc:
        raise ReplayError(str(exc)) from None


def replay(detector: Detector[Any], recording: Recording, *, assume: Outcome = "applied") -> list[Decision]:
    """Feeds every point to ``detector`` through the live feeding loop; returns its decisions."""
    feeder = Feeder(detector, outcome=assume)
    points = [(step, value, None) for step, value in zip(recording.steps, recording.values, strict=True)]
    lrs = [] if recording.lrs is None else list(zip(recording.steps, recording.lrs, strict=True))
    return feeder.feed(points, lrs)


def _json_safe(x: Any) -> Any:
    """JSON has no NaN or infinities: they become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    return x


def decision_line(decision: Decision) -> str:
    return json.dumps(_json_safe(decision.to_dict()), allow_nan=False)


# --- plot ------------------------------------------------------------------------------------------------


def _plot_indices(values: Sequence[float], max_points: int) -> list[int]:
    """All indices, or each bucket's min and max (non-finite values first) plus the last one."""
    n = len(values)
    if n <= max_points:
        return list(range(n))
    import numpy as np

    x = np.asarray(values, dtype=np.float64)
    keep = {n - 1}
    buckets = max(1, (max_points - 1) // 2)
    edges = np.linspace(0, n, buckets + 1).astype(np.int64)
    for lo, hi in zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True):
        if hi <= lo:
            continue
        chunk = x[lo:hi]
        bad = np.flatnonzero(~np.isfinite(chunk))
        finite = np.where(np.isfinite(chunk), chunk, np.nan)
        if len(bad) == len(chunk):
            keep.add(lo)
            continue
        keep.add(lo + (int(bad[0]) if len(bad) else int(np.nanargmin(finite))))
        keep.add(lo + int(np.nanargmax(finite)))
    return sorted(keep)


def write_plot(
    path: Path, recording: Recording, stages: Sequence[Stage], decisions: Sequence[Decision], title: str
) -> None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    has_lr = recording.lrs is not None
    fig = make_subplots(specs=[[{"secondary_y": has_lr}]])
    keep = _plot_indices(recording.values, MAX_PLOT_POINTS)
    fig.add_trace(
        go.Scatter(
            x=[recording.steps[i] for i in keep],
            y=[recording.values[i] if math.isfinite(recording.values[i]) else None for i in keep],
            mode="lines",
            name=recording.key,
            line={"width": 1.2, "color": "#1f77b4"},
        ),
        secondary_y=False,
    )
    if recording.lrs is not None:
        lrs = recording.lrs
        changes = [i for i in range(len(lrs)) if i == 0 or lrs[i] != lrs[i - 1]]
        changes.append(len(lrs) - 1)
        fig.add_trace(
            go.Scatter(
                x=[recording.steps[i] for i in changes],
                y=[lrs[i] for i in changes],
                mode="lines",
                line_shape="hv",
                name=recording.lr_key or DEFAULT_LR_NAME,
                line={"width": 1.5, "color": "#7f7f7f", "dash": "dot"},
            ),
            secondary_y=True,
        )
        positive = all(v > 0 for v in lrs)
        fig.update_yaxes(title_text=recording.lr_key, type="log" if positive else "linear", secondary_y=True)
    for k, stage in enumerate(stages):
        end = stages[k + 1].start_step if k + 1 < len(stages) else stage.end_step
        label = f"stage {stage.index + 1}" + (f" · lr {stage.lr:.3g}" if stage.lr is not None else "")
        fig.add_vrect(
            x0=stage.start_step,
            x1=end,
            fillcolor="#2ca02c" if k % 2 == 0 else "#ff7f0e",
            opacity=0.10,
            line_width=0,
            layer="below",
            annotation_text=label,
            annotation_position="top left",
        )
    value_at = dict(zip(recording.steps, recording.values, strict=True))
    for action, symbol, color in (("decay", "triangle-down", "#d62728"), ("stop", "x", "#000000")):
        chosen = [d for d in decisions if d.action == action]
        if not chosen:
            continue
        fig.add_trace(
            go.Scatter(
                x=[d.step for d in chosen],
                y=[_finite(value_at.get(d.step)) for d in chosen],
                mode="markers",
                name=action,
                marker={"symbol": symbol, "size": 12, "color": color},
                hovertext=[_hover(d) for d in chosen],
                hoverinfo="text",
            ),
            secondary_y=False,
        )
    fig.update_yaxes(title_text=recording.key, secondary_y=False)
    fig.update_layout(title=title, xaxis_title="step", hovermode="closest", template="plotly_white")
    fig.write_html(str(path), include_plotlyjs=True, full_html=True)


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _hover(d: Decision) -> str:
    lr = f", lr → {d.lr:.3g}" if d.lr is not None else ""
    head = f"{d.action} at step {d.step} (factor {d.factor:g}{lr})" if d.action == "decay" else f"stop at step {d.step}"
    return f"<b>{html.escape(head)}</b><br>{html.escape(d.evidence.explanation)}"


# --- command line ----------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="INPUT", help="a CSV (step + metric columns) or a TensorBoard log directory")
    parser.add_argument("--detector", required=True, metavar="NAME", help="detector to run, e.g. plateau")
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a detector parameter (repeatable); VALUE is parsed as JSON when it can be",
    )
    parser.add_argument("--key", metavar="COLUMN", help="CSV column (or key) to monitor; default: the only one")
    parser.add_argument("--tag", metavar="TAG", help="TensorBoard scalar tag to monitor; default: the only one")
    parser.add_argument(
        "--lr-tag",
        "--lr-key",
        dest="lr_tag",
        metavar="NAME",
        help=f"tag or column holding the learning rate; default: {DEFAULT_LR_NAME!r} when present",
    )
    parser.add_argument(
        "--assume",
        choices=["applied", "observed", "logged"],
        default="applied",
        help="what became of each decision: applied at its step (default), only observed (a live observe-mode "
        "run), or applied where the recorded LR next changes (a live auto-mode run)",
    )
    parser.add_argument("--plot", metavar="FILE.html", type=Path, help="also write a self-contained plotly figure")


def run(args: argparse.Namespace) -> int:
    """The ``replay`` verb: decisions as JSON lines on stdout; bad input is one line on stderr, exit 2."""
    try:
        _run(args)
    except ReplayError as exc:
        sys.stderr.write(f"stagewatch replay: {exc}\n")
        return EXIT_USAGE
    except BrokenPipeError:  # stdout closed early (| head): stop quietly, as other command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


def _run(args: argparse.Namespace) -> None:
    if args.key is not None and args.tag is not None and args.key != args.tag:
        raise ReplayError("give the monitored series once: --key and --tag name the same thing")
    settings = parse_settings(args.settings)
    plot: Path | None = args.plot
    if plot is not None and not plot.parent.is_dir():
        raise ReplayError(f"--plot {plot}: directory {plot.parent} does not exist")
    recording = load_recording(Path(args.input), args.key or args.tag, args.lr_tag)
    detector = build_detector(args.detector, settings, recording)
    decisions = replay(detector, recording, assume=args.assume)
    for decision in decisions:
        sys.stdout.write(decision_line(decision) + "\n")
    sys.stdout.flush()
    if plot is not None:
        from server.detectors.segment import segment

        stages = segment(recording.steps, recording.values, recording.lrs)
        title = (
            f"{html.escape(recording.key)} from {html.escape(recording.source)}: detector {html.escape(args.detector)}"
        )
        try:
            write_plot(plot, recording, stages, decisions, title)
        except OSError as exc:
            raise ReplayError(f"--plot {plot}: cannot write: {exc.strerror or exc}") from None
        sys.stderr.write(f"wrote {plot}: {len(stages)} stages, {len(decisions)} decisions\n")
