"""Detection benchmark: replay synthetic and recorded curves through every registered stage detector.

Open loop: each curve's points are fed in order to a fresh detector by the loop live detection and replay use
(``server.detectors.feed.Feeder``) and every decision is recorded; a decision does not change the curve (it was
already recorded), so each is only *observed*, as in the server's observe mode: the detector is told it was not
applied (``not_applied``, its stage starts again), and each change of a recorded run's LR is told before the
first point at the new LR, as live.

Curve families (``--families``):

====================  ========  ======================================================================
family                signal    what
====================  ========  ======================================================================
synth-step            loss      synthetic decline-then-plateau, 6,000 per-step points (``synthetic_curves``)
synth-epoch           loss      the same shape, 60 per-epoch points
control-step          loss      negative controls, per step: steady declines, any decision is false
control-epoch         loss      negative controls, per epoch
real-const-step       loss      MNIST-1D, constant LR: per-step minibatch loss (``record_curves``)
real-const-epoch      loss      the same runs: epoch-mean training loss
real-const-sasa       Δ         the same runs: per-step SASA+ statistic ``sasa_delta``
real-decay-step       loss      MNIST-1D, StepDecay (x0.1 at 50% and 75%): per-step loss, stage analysis
real-decay-epoch      loss      the same runs, epoch-mean training loss
real-decay-sasa       Δ         the same runs, per-step ``sasa_delta``
====================  ========  ======================================================================

Detectors that watch a loss get the ``loss`` families; ``stationarity`` (SASA+) watches the optimizer
statistic and gets only the ``sasa`` families (synthetic curves have no such statistic: it is skipped there).

Ground truth and scoring:

* **Onset of a real constant-LR plateau**: from the epoch-mean training loss ``L_1..L_E``, the final level
  ``F`` is the mean over the last 20% of epochs and the total drop is ``D = L_1 - F``; the onset is the end
  (global step) of the first epoch with ``L_e <= F + 0.1 D``: the loss has less than 10% of its drop left.
  Per-step and ``sasa`` curves of the run use the same onset step. A decision before the onset is false.
* **Synthetic plateaus**: the onset is where the noiseless curve becomes flat; a decision is false while the
  noiseless curve has more than 10% of its drop left (the same 10% rule), see ``synthetic_curves``.
* Each plateau curve has one outcome, from its **first** decision (after a false decay the real run would have
  continued at another LR, so later decisions on the recording mean nothing): **false** if it comes before that
  limit, **detected** otherwise, **missed** if there is none. **Delay** = step of the first decision minus the
  onset (it can be slightly negative on synthetic curves), in steps and as a share of the curve's length.
* **Negative controls**: any decision is a false decay.
* **StepDecay runs**: each LR level is a stage. For each stage: does the detector decide within it, i.e.
  before the scheduled drop (it would have decayed earlier than the schedule), and at which step/epoch?
  Two replays: ``continuous`` (the whole run through one detector, as live with every proposal rejected: a
  detector that fired, or stopped, in stage 1 carries that into stage 2) and ``fresh`` (each stage alone
  through a new detector started at the stage's LR: what the stage's own points show). For reference, each
  stage's own onset is given by the same 10% rule applied to the stage's epochs; a decision before it is
  counted as ``early``.

Parameters: every detector runs with its defaults (``default``); detectors whose parameters count points
also run with a per-kind set (``per-kind``: per-step vs per-epoch values, see ``PER_KIND_PARAMS``).
``--detector NAME --set KEY=VALUE`` (repeatable; ``--set-step``/``--set-epoch`` for one kind) evaluates one
parameter choice instead (``custom``: defaults plus the given values). ``initial_lr`` is the curve's LR.

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_detection [--families synth-step,real-const-step] [--detail]
    .venv/bin/python -m benchmarks.bench_detection --detector autodecay --set rho=0.2 --set-step min_stage=500

Tables go to stdout, everything (per-curve decisions included) to ``benchmarks/results/detection.json``.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import math
import pkgutil
import statistics
import time
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import print_table, write_json
from benchmarks.synthetic_curves import Curve, Kind, make_curves
from server.detectors.feed import Feeder

CURVES_DIR = Path(__file__).resolve().parent / "data" / "curves"
ONSET_FRACTION = 0.10  # the onset: less than this share of the total drop is left
TAIL_FRACTION = 0.20  # the final level: mean of this share of the last epochs

SYNTHETIC_FAMILIES = ("synth-step", "synth-epoch", "control-step", "control-epoch")
REAL_FAMILIES = (
    "real-const-step",
    "real-const-epoch",
    "real-const-sasa",
    "real-decay-step",
    "real-decay-epoch",
    "real-decay-sasa",
)
FAMILIES = SYNTHETIC_FAMILIES + REAL_FAMILIES

# What each detector watches; the rest watch a loss.
DETECTOR_SIGNAL = {"stationarity": "sasa_delta"}

# Per-kind parameter sets for detectors whose parameters count points (ReduceLROnPlateau's patience is in
# evaluations: 10 epochs is its usual meaning, 10 steps of a noisy minibatch loss is nothing; dlib's window
# of 2000 values never fills with tens of epochs).
PER_KIND_PARAMS: dict[str, dict[Kind, dict[str, Any]]] = {
    "autodecay": {"per-step": {"preset": "step"}, "per-epoch": {"preset": "epoch"}},
    "plateau": {"per-step": {"patience": 1000}, "per-epoch": {"patience": 10}},
    "slope": {"per-step": {"window": 2000}, "per-epoch": {"window": 10, "dump_amount": 0}},
}


# --- the detectors ------------------------------------------------------------------------------------------


def load_detectors() -> tuple[dict[str, Any], dict[str, str]]:
    """Imports every module of ``server.detectors`` on its own (one broken module does not hide the others)
    and returns the registry, plus the modules that failed to import with their error."""
    import server.detectors as package

    failed: dict[str, str] = {}
    for module in sorted(m.name for m in pkgutil.iter_modules(package.__path__)):
        if module == "base":
            continue
        try:
            importlib.import_module(f"server.detectors.{module}")
        except Exception as exc:  # a detector being written right now may not import yet
            failed[module] = f"{type(exc).__name__}: {exc}"
    return dict(package.DETECTORS), failed


@dataclass(frozen=True)
class Config:
    """One parameter choice of one detector: ``common`` for every kind, then the kind's own values."""

    detector: str
    label: str
    common: dict[str, Any]
    per_kind: dict[Kind, dict[str, Any]]

    def params(self, kind: Kind, lr: float) -> dict[str, Any]:
        out: dict[str, Any] = {"initial_lr": lr}
        out.update(self.common)
        out.update(self.per_kind.get(kind, {}))
        return out

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in self.common.items()]
        for kind, values in self.per_kind.items():
            if values:
                parts.append(f"{kind}: " + ", ".join(f"{k}={v}" for k, v in values.items()))
        return "; ".join(parts) or "defaults"


def make_configs(
    registry: dict[str, Any],
    names: Sequence[str] | None,
    common: dict[str, Any],
    step_set: dict[str, Any],
    epoch_set: dict[str, Any],
) -> list[Config]:
    chosen = sorted(registry) if not names else list(names)
    custom = bool(common or step_set or epoch_set)
    configs: list[Config] = []
    for name in chosen:
        if custom:
            configs.append(Config(name, "custom", common, {"per-step": step_set, "per-epoch": epoch_set}))
            continue
        configs.append(Config(name, "default", {}, {}))
        if name in PER_KIND_PARAMS:
            fields = registry[name].Params.model_fields
            per_kind = {
                kind: {k: v for k, v in values.items() if k in fields} for kind, values in PER_KIND_PARAMS[name].items()
            }
            if any(per_kind.values()):
                configs.append(Config(name, "per-kind", {}, per_kind))
    return configs


def build_detector(registry: dict[str, Any], config: Config, curve: Curve) -> Any:
    """Like ``make_detector``, but from the registry loaded here (``make_detector`` imports every built-in
    module and would fail while one of them is missing)."""
    from server.detectors import DetectorError

    cls = registry[config.detector]
    params = config.params(curve.kind, curve.lr)
    try:
        parsed = cls.Params.model_validate(params)
    except Exception as exc:
        raise DetectorError(f"detector {config.detector!r} ({config.label}): {exc}") from None
    return cls(parsed)


# --- the real curves ----------------------------------------------------------------------------------------


def read_csv(path: Path) -> dict[str, np.ndarray]:
    header = path.read_text().split("\n", 1)[0].split(",")
    data = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
    return {name: data[:, i] for i, name in enumerate(header)}


def plateau_onset(
    steps: np.ndarray, losses: np.ndarray, fraction: float = ONSET_FRACTION, tail: float = TAIL_FRACTION
) -> dict[str, float | int]:
    """The 10% rule on epoch means: the first epoch within ``fraction`` of the total drop of the final level."""
    n = len(losses)
    k = max(1, math.ceil(tail * n))
    final = float(np.mean(losses[-k:]))
    drop = float(losses[0]) - final
    threshold = final + fraction * drop
    below = np.flatnonzero(losses <= threshold)
    index = int(below[0]) if below.size else n - 1
    return {"onset_step": int(steps[index]), "onset_index": index, "final_level": final, "drop": drop}


@dataclass(frozen=True)
class Stage:
    """One LR level of a recorded run: steps ``start..end``, and its own onset (10% rule on its epochs)."""

    index: int
    lr: float
    start: int
    end: int
    onset: int
    start_epoch: int  # first epoch (1-based) of the stage
    end_epoch: int
    onset_epoch: int


@dataclass(frozen=True)
class RealRun:
    name: str
    schedule: str
    steps_per_epoch: int
    curves: list[Curve]
    onset: dict[str, float | int]
    stages: list[Stage]


def _lr_changes(steps: np.ndarray, lrs: np.ndarray) -> tuple[tuple[int, float], ...]:
    changes = []
    for i in range(1, len(lrs)):
        if not math.isclose(lrs[i], lrs[i - 1], rel_tol=1e-6):
            changes.append((int(steps[i]), float(lrs[i])))
    return tuple(changes)


def _stages(epoch: dict[str, np.ndarray], steps_per_epoch: int) -> list[Stage]:
    steps, lrs, losses = epoch["step"].astype(np.int64), epoch["lr"], epoch["train_loss"]
    bounds = [0] + [i for i in range(1, len(lrs)) if not math.isclose(lrs[i], lrs[i - 1], rel_tol=1e-6)]
    bounds.append(len(lrs))
    stages = []
    for index, (a, b) in enumerate(itertools.pairwise(bounds)):
        onset = plateau_onset(steps[a:b], losses[a:b])
        start = int(steps[a - 1]) + 1 if a > 0 else 1
        stages.append(
            Stage(
                index=index + 1,
                lr=float(lrs[a]),
                start=start,
                end=int(steps[b - 1]),
                onset=int(onset["onset_step"]),
                start_epoch=int(epoch["epoch"][a]),
                end_epoch=int(epoch["epoch"][b - 1]),
                onset_epoch=int(epoch["epoch"][a + int(onset["onset_index"])]),
            )
        )
    assert steps_per_epoch > 0
    return stages


def load_real_runs(directory: Path) -> list[RealRun]:
    runs = []
    for epoch_path in sorted(directory.glob("*-epoch.csv")):
        name = epoch_path.name.removesuffix("-epoch.csv")
        step_path = directory / f"{name}-step.csv"
        if not step_path.exists():
            continue
        schedule = name.split("-seed")[0]
        epoch, step = read_csv(epoch_path), read_csv(step_path)
        e_steps = epoch["step"].astype(np.int64)
        s_steps = step["step"].astype(np.int64)
        spe = int(e_steps[0])
        onset = plateau_onset(e_steps, epoch["train_loss"])
        stages = _stages(epoch, spe)
        constant = len(stages) == 1
        prefix = "real-const" if constant else "real-decay"
        onset_step = int(onset["onset_step"]) if constant else None
        common: dict[str, Any] = {
            "onset": onset_step,
            "steps_per_epoch": spe,
            "group": name,
            "info": {"run": name, "schedule": schedule},
        }
        curves = [
            Curve(
                name=f"{prefix}-step/{name}",
                family=f"{prefix}-step",
                kind="per-step",
                steps=s_steps,
                values=step["train_loss"],
                lr=float(step["lr"][0]),
                lr_changes=_lr_changes(s_steps, step["lr"]),
                **common,
            ),
            Curve(
                name=f"{prefix}-epoch/{name}",
                family=f"{prefix}-epoch",
                kind="per-epoch",
                steps=e_steps,
                values=epoch["train_loss"],
                lr=float(epoch["lr"][0]),
                lr_changes=_lr_changes(e_steps, epoch["lr"]),
                **common,
            ),
        ]
        if "sasa_delta" in step and np.isfinite(step["sasa_delta"]).any():
            curves.append(
                Curve(
                    name=f"{prefix}-sasa/{name}",
                    family=f"{prefix}-sasa",
                    kind="per-step",
                    steps=s_steps,
                    values=step["sasa_delta"],
                    lr=float(step["lr"][0]),
                    lr_changes=_lr_changes(s_steps, step["lr"]),
                    signal="sasa_delta",
                    **common,
                )
            )
        runs.append(RealRun(name, schedule, spe, curves, onset, stages))
    return runs


# --- replay and scoring -------------------------------------------------------------------------------------


@dataclass
class CurveResult:
    config: Config
    curve: Curve
    decisions: list[dict[str, Any]]
    seconds: float
    error: str | None = None
    false_steps: list[int] = field(default_factory=list)
    detected: int | None = None
    stage_results: list[dict[str, Any]] = field(default_factory=list)

    @property
    def delay(self) -> int | None:
        if self.detected is None or self.curve.onset is None:
            return None
        return self.detected - self.curve.onset


def _feed(detector: Any, curve: Curve, first: int = 0, last: int | None = None) -> list[dict[str, Any]]:
    """Feeds points ``first..last`` (indices) through the live feeding loop (``server.detectors.feed``), each
    decision only observed: the recording went on at its own schedule, as if every proposal had been rejected.
    The recorded LR changes are told as live; a slice starts from the LR in effect at its first point."""
    steps = curve.steps[first:last].tolist()
    values = curve.values[first:last].tolist()
    lr = curve.lr
    for step, new_lr in curve.lr_changes:
        if step <= steps[0]:
            lr = new_lr
    lrs = [(steps[0], lr)] + [(step, new_lr) for step, new_lr in curve.lr_changes if step > steps[0]]
    made = Feeder(detector, outcome="observed").feed([(s, v, None) for s, v in zip(steps, values, strict=True)], lrs)
    return [
        {
            "step": d.step,
            "action": d.action,
            "factor": d.factor,
            "lr": d.lr,
            "statistic": d.evidence.statistic,
            "value": d.evidence.value,
            "threshold": d.evidence.threshold,
            "window": list(d.evidence.window),
        }
        for d in made
    ]


def replay(registry: dict[str, Any], config: Config, curve: Curve) -> CurveResult:
    """The whole curve through one detector; for a StepDecay run, also each stage through a fresh one."""
    started = time.perf_counter()
    stages: list[Stage] = curve.info.get("stages", [])  # type: ignore[assignment]
    try:
        decisions = _feed(build_detector(registry, config, curve), curve)
        fresh: list[list[dict[str, Any]]] = []
        for stage in stages:
            first = int(np.searchsorted(curve.steps, stage.start))
            last = int(np.searchsorted(curve.steps, stage.end, side="right"))
            stage_curve = replace(curve, lr=stage.lr)
            fresh.append(_feed(build_detector(registry, config, stage_curve), curve, first, last))
    except Exception as exc:  # report it in the table rather than losing the whole benchmark
        detail = traceback.format_exception_only(type(exc), exc)[-1].strip()
        return CurveResult(config, curve, [], time.perf_counter() - started, error=detail)
    result = CurveResult(config, curve, decisions, time.perf_counter() - started)
    score(result, stages, fresh)
    return result


def _stage_result(stage: Stage, steps: list[int], spe: int, mode: str) -> dict[str, Any]:
    inside = [s for s in steps if stage.start <= s <= stage.end]
    first = inside[0] if inside else None
    return {
        "mode": mode,
        "stage": stage.index,
        "lr": stage.lr,
        "start_step": stage.start,
        "end_step": stage.end,
        "onset_step": stage.onset,
        "start_epoch": stage.start_epoch,
        "end_epoch": stage.end_epoch,
        "onset_epoch": stage.onset_epoch,
        "fired": first is not None,
        "first_step": first,
        "first_epoch": None if first is None else first / spe,
        "before_onset": first is not None and first < stage.onset,
        "epochs_before_scheduled_end": None if first is None else (stage.end - first) / spe,
        "epochs_after_onset": None if first is None else (first - stage.onset) / spe,
        "decisions": len(inside),
    }


def score(result: CurveResult, stages: Sequence[Stage] = (), fresh: Sequence[list[dict[str, Any]]] = ()) -> None:
    curve, steps = result.curve, [d["step"] for d in result.decisions]
    if stages:
        spe = curve.steps_per_epoch
        for stage, stage_decisions in zip(stages, fresh, strict=True):
            result.stage_results.append(_stage_result(stage, steps, spe, "continuous"))
            result.stage_results.append(_stage_result(stage, [d["step"] for d in stage_decisions], spe, "fresh"))
        return
    limit = curve.early_limit
    if limit is None:  # a negative control: every decision is false
        result.false_steps = steps
        return
    # One outcome per curve, from its first decision: after a false decay the real run would have gone on at
    # another LR, so what the detector says later on this recording proves nothing either way.
    result.false_steps = [s for s in steps if s < limit]
    result.detected = steps[0] if steps and steps[0] >= limit else None


# --- aggregation and tables ---------------------------------------------------------------------------------


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


def _worst(values: Sequence[float]) -> float:
    return float(max(values)) if values else math.nan


def summarize_plateaus(results: Sequence[CurveResult]) -> dict[str, Any]:
    ok = [r for r in results if r.error is None]
    delays = [float(r.delay) for r in ok if r.delay is not None]
    fractions = [float(r.delay) / r.curve.length for r in ok if r.delay is not None]
    return {
        "curves": len(results),
        "errors": len(results) - len(ok),
        "detected": len(delays),
        "false": sum(1 for r in ok if r.false_steps and r.detected is None),
        "missed": sum(1 for r in ok if not r.decisions),
        "delay_steps_median": _median(delays),
        "delay_steps_worst": _worst(delays),
        "delay_fraction_median": _median(fractions),
        "delay_fraction_worst": _worst(fractions),
        "decisions_per_curve": sum(len(r.decisions) for r in ok) / len(ok) if ok else math.nan,
        "seconds": sum(r.seconds for r in results),
    }


def summarize_controls(results: Sequence[CurveResult]) -> dict[str, Any]:
    ok = [r for r in results if r.error is None]
    firsts = [r.false_steps[0] / r.curve.length for r in ok if r.false_steps]
    return {
        "curves": len(results),
        "errors": len(results) - len(ok),
        "false": len(firsts),
        "first_false_fraction_min": min(firsts) if firsts else math.nan,
        "first_false_fraction_median": _median(firsts),
        "decisions_per_curve": sum(len(r.decisions) for r in ok) / len(ok) if ok else math.nan,
        "seconds": sum(r.seconds for r in results),
    }


def summarize_stages(results: Sequence[CurveResult]) -> dict[str, Any]:
    ok = [r for r in results if r.error is None]
    modes: dict[str, dict[int, dict[str, Any]]] = {}
    for r in ok:
        for s in r.stage_results:
            per_stage = modes.setdefault(s["mode"], {})
            entry = per_stage.setdefault(s["stage"], {"runs": 0, "fired": 0, "before_onset": 0, "saved": []})
            entry["runs"] += 1
            entry["fired"] += int(s["fired"])
            entry["before_onset"] += int(s["before_onset"])
            if s["epochs_before_scheduled_end"] is not None:
                entry["saved"].append(s["epochs_before_scheduled_end"])
    for per_stage in modes.values():
        for entry in per_stage.values():
            saved = entry.pop("saved")
            entry["epochs_before_scheduled_end_median"] = _median(saved)
    return {
        "curves": len(results),
        "errors": len(results) - len(ok),
        "modes": {mode: {str(k): v for k, v in sorted(ps.items())} for mode, ps in modes.items()},
        "seconds": sum(r.seconds for r in results),
    }


def family_kind(family: str) -> str:
    if family.startswith("real-decay"):
        return "stages"
    if family.startswith("control"):
        return "controls"
    return "plateaus"


def print_tables(summaries: dict[tuple[str, str, str], dict[str, Any]], skipped: list[list[object]]) -> None:
    plateau_rows: list[list[object]] = []
    control_rows: list[list[object]] = []
    stage_rows: list[list[object]] = []
    for (detector, label, family), s in summaries.items():
        who = f"{detector}/{label}"
        kind = family_kind(family)
        if kind == "plateaus":
            plateau_rows.append([
                who, family, s["curves"], s["detected"], s["false"], s["missed"], s["delay_steps_median"],
                s["delay_steps_worst"],
                _pct(s["delay_fraction_median"]), _pct(s["delay_fraction_worst"]), s["decisions_per_curve"],
                _err(s),
            ])  # fmt: skip
        elif kind == "controls":
            control_rows.append([
                who, family, s["curves"], s["false"], _pct(s["first_false_fraction_min"]), s["decisions_per_curve"],
                _err(s),
            ])  # fmt: skip
        else:
            for mode, per_stage in s["modes"].items():
                cells = []
                for st in per_stage.values():
                    saved = st["epochs_before_scheduled_end_median"]
                    cell = f"{st['fired']}/{st['runs']}"
                    if st["fired"]:
                        cell += f", {st['before_onset']} early, {saved:.0f} ep"
                    cells.append(cell)
                stage_rows.append([who, family, mode, *cells, _err(s)])
    if plateau_rows:
        print_table(
            "Plateau curves, by first decision: detected (delay = its step - onset), false (before the 10%-rule "
            "limit) or missed (none)",
            [
                "detector/params", "family", "curves", "detected", "false", "missed", "delay med", "delay worst",
                "med %len", "worst %len", "decisions/curve", "errors",
            ],
            plateau_rows,
        )  # fmt: skip
    if control_rows:
        print_table(
            "Negative controls (steady declines): every decision is a false decay",
            ["detector/params", "family", "curves", "false", "first false at %len (min)", "decisions/curve", "errors"],
            control_rows,
        )
    if stage_rows:
        width = max(len(r) for r in stage_rows)
        headers = ["detector/params", "family", "replay"] + [f"stage {i + 1}" for i in range(width - 4)] + ["errors"]
        print_table(
            "StepDecay runs: per stage, runs where the detector decided before the scheduled drop / runs, how many "
            "of those before the stage's own onset (early), median epochs before the scheduled drop.\n"
            "continuous: the whole run through one detector (proposals rejected); fresh: each stage alone",
            headers,
            [r[:-1] + [""] * (width - len(r)) + r[-1:] for r in stage_rows],
        )
    if skipped:
        print_table("Skipped", ["detector", "families", "why"], skipped)


def print_stage_details(results: Sequence[CurveResult]) -> None:
    rows: list[list[object]] = []
    for r in results:
        if not r.stage_results:
            continue
        for mode in ("continuous", "fresh"):
            cells = []
            for s in r.stage_results:
                if s["mode"] != mode:
                    continue
                fired = "-" if s["first_epoch"] is None else f"ep {s['first_epoch']:.1f}"
                cells.append(f"{fired} (onset ep {s['onset_epoch']}, end ep {s['end_epoch']})")
            rows.append([f"{r.config.detector}/{r.config.label}", r.curve.name, mode, *cells])
    if rows:
        width = max(len(r) for r in rows)
        print_table(
            "StepDecay runs, per run: first decision in each stage (the stage's onset by the 10% rule, its last epoch)",
            ["detector/params", "curve", "replay"] + [f"stage {i + 1}" for i in range(width - 3)],
            [r + [""] * (width - len(r)) for r in rows],
        )


def print_group_details(results: Sequence[CurveResult]) -> None:
    groups: dict[tuple[str, str, str], list[CurveResult]] = {}
    for r in results:
        if r.stage_results or r.curve.family.startswith("real"):
            continue
        groups.setdefault((f"{r.config.detector}/{r.config.label}", r.curve.family, r.curve.group), []).append(r)
    rows: list[list[object]] = []
    for (who, family, group), rs in groups.items():
        if family.startswith("control"):
            firsts = [r.false_steps[0] / r.curve.length for r in rs if r.false_steps]
            rows.append([who, family, group, len(rs), len(firsts), "", _pct(min(firsts) if firsts else math.nan), ""])
        else:
            s = summarize_plateaus(rs)
            rows.append([
                who, family, group, s["curves"], s["false"], s["missed"], _pct(s["delay_fraction_median"]),
                _pct(s["delay_fraction_worst"]),
            ])  # fmt: skip
    print_table(
        "Synthetic curves by noise (controls: first false decision at %len)",
        ["detector/params", "family", "group", "curves", "false", "missed", "delay med %len", "delay worst %len"],
        rows,
    )


def print_real_onsets(runs: Sequence[RealRun]) -> None:
    rows: list[list[object]] = []
    for run in runs:
        stages = " | ".join(
            f"s{s.index} lr {s.lr:g}: ep {s.start_epoch}-{s.end_epoch}, onset ep {s.onset_epoch}" for s in run.stages
        )
        rows.append([run.name, run.steps_per_epoch, run.onset["final_level"], run.onset["drop"], stages])
    print_table(
        "Recorded runs: plateau onset by the 10% rule (epoch-mean train loss)",
        ["run", "steps/epoch", "final level", "drop", "stages (constant LR: one)"],
        rows,
    )


def _pct(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{100 * x:.1f}%"


def _err(s: dict[str, Any]) -> str:
    return str(s["errors"]) if s["errors"] else ""


# --- command line -------------------------------------------------------------------------------------------


def parse_assignment(text: str) -> tuple[str, Any]:
    """``KEY=VALUE``; the value is read as JSON when it parses (numbers, true/false, null), else as text."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def families_arg(text: str) -> list[str]:
    chosen = [f.strip() for f in text.split(",") if f.strip()]
    unknown = [f for f in chosen if f not in FAMILIES and f not in ("synthetic", "real")]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"families: comma-separated subset of {','.join(FAMILIES)} (or 'synthetic', 'real')"
        )
    out: list[str] = []
    for f in chosen:
        out.extend(SYNTHETIC_FAMILIES if f == "synthetic" else REAL_FAMILIES if f == "real" else [f])
    return list(dict.fromkeys(out))


def select_curves(families: Iterable[str], seed: int, curves_dir: Path) -> tuple[list[Curve], list[RealRun]]:
    wanted = set(families)
    curves: list[Curve] = []
    if wanted & set(SYNTHETIC_FAMILIES):
        curves.extend(c for c in make_curves(seed) if c.family in wanted)
    runs: list[RealRun] = []
    if wanted & set(REAL_FAMILIES):
        runs = load_real_runs(curves_dir)
        for run in runs:
            for c in run.curves:
                if c.family in wanted:
                    if run.schedule != "constant" or len(run.stages) > 1:
                        c.info["stages"] = run.stages  # type: ignore[assignment]
                    curves.append(c)
    return curves, runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detector", action="append", default=[], help="detector name (repeatable; default: all)")
    parser.add_argument("--set", dest="common", action="append", type=parse_assignment, default=[], metavar="K=V")
    parser.add_argument("--set-step", action="append", type=parse_assignment, default=[], metavar="K=V")
    parser.add_argument("--set-epoch", action="append", type=parse_assignment, default=[], metavar="K=V")
    parser.add_argument("--families", type=families_arg, default=list(FAMILIES), help="curve families (default all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic curves (default 0)")
    parser.add_argument("--curves-dir", type=Path, default=CURVES_DIR, help="recorded curves (record_curves.py)")
    parser.add_argument("--detail", action="store_true", help="also print per-noise and per-run tables")
    parser.add_argument("--output", default="detection", help="results/<NAME>.json (default detection)")
    args = parser.parse_args(argv)

    registry, failed = load_detectors()
    for module, why in failed.items():
        print(f"warning: server.detectors.{module} did not import: {why}")
    if not registry:
        raise SystemExit("no detector is registered yet (server.detectors.DETECTORS is empty)")
    unknown = [d for d in args.detector if d not in registry]
    if unknown:
        parser.error(f"unknown detector(s) {', '.join(unknown)}; registered: {', '.join(sorted(registry))}")
    configs = make_configs(
        registry, args.detector or None, dict(args.common), dict(args.set_step), dict(args.set_epoch)
    )
    curves, runs = select_curves(args.families, args.seed, args.curves_dir)
    if not curves:
        raise SystemExit("no curve selected (are the recorded curves in benchmarks/data/curves? run record_curves)")

    print(f"detectors: {', '.join(sorted(registry))}; {len(configs)} parameter sets; {len(curves)} curves")
    for c in configs:
        print(f"  {c.detector}/{c.label}: {c.describe()}")
    if runs:
        print_real_onsets(runs)

    results: list[CurveResult] = []
    skipped: list[list[object]] = []
    started = time.perf_counter()
    for config in configs:
        signal = DETECTOR_SIGNAL.get(config.detector, "loss")
        mine = [c for c in curves if c.signal == signal]
        others = sorted({c.family for c in curves if c.signal != signal})
        if others and signal != "loss":
            why = f"watches {signal}, which these families do not carry (synthetic curves have no optimizer state)"
            skipped.append([f"{config.detector}/{config.label}", ", ".join(others), why])
        for curve in mine:
            results.append(replay(registry, config, curve))
    replay_seconds = time.perf_counter() - started

    summaries: dict[tuple[str, str, str], dict[str, Any]] = {}
    for config in configs:
        for family in args.families:
            rs = [r for r in results if r.config is config and r.curve.family == family]
            if not rs:
                continue
            kind = family_kind(family)
            if kind == "plateaus":
                summaries[(config.detector, config.label, family)] = summarize_plateaus(rs)
            elif kind == "controls":
                summaries[(config.detector, config.label, family)] = summarize_controls(rs)
            else:
                summaries[(config.detector, config.label, family)] = summarize_stages(rs)
    print_tables(summaries, skipped)
    if args.detail:
        print_group_details(results)
        print_stage_details(results)
    errors = [r for r in results if r.error]
    for r in errors[:10]:
        print(f"error: {r.config.detector}/{r.config.label} on {r.curve.name}: {r.error}")
    print(f"\nreplayed {len(results)} curve/parameter pairs in {replay_seconds:.1f} s")

    write_json(
        args.output,
        {
            "definitions": {
                "onset_real": (
                    f"end of the first epoch whose epoch-mean train loss is within {ONSET_FRACTION:.0%} of the total "
                    f"drop (first epoch mean - final level) above the final level (mean of the last "
                    f"{TAIL_FRACTION:.0%} of epochs); per-step and sasa curves use the same step"
                ),
                "onset_synthetic": "where the noiseless curve becomes flat; false before it has 10% of its drop left",
                "outcome": "per plateau curve, from its first decision: false (before the false limit), detected, "
                "or missed (no decision); on a negative control every decision is false",
                "delay": "first decision minus the onset (detected curves), in steps and / curve length",
                "stages": "StepDecay: first decision within each LR level, i.e. before the scheduled drop",
            },
            "settings": {
                "families": args.families,
                "seed": args.seed,
                "curves_dir": str(args.curves_dir),
                "per_kind_params": PER_KIND_PARAMS,
            },
            "detectors": sorted(registry),
            "import_failures": failed,
            "configs": [
                {"detector": c.detector, "label": c.label, "common": c.common, "per_kind": c.per_kind} for c in configs
            ],
            "skipped": [{"config": s[0], "families": s[1], "why": s[2]} for s in skipped],
            "real_runs": [{"name": r.name, "onset": r.onset, "stages": [vars(s) for s in r.stages]} for r in runs],
            "summaries": [{"detector": d, "label": label, "family": f, **s} for (d, label, f), s in summaries.items()],
            "curves": [
                {
                    "detector": r.config.detector,
                    "label": r.config.label,
                    "curve": r.curve.name,
                    "family": r.curve.family,
                    "group": r.curve.group,
                    "length": r.curve.length,
                    "onset": r.curve.onset,
                    "false_before": r.curve.early_limit,
                    "error": r.error,
                    "false_steps": r.false_steps[:20],
                    "detected": r.detected,
                    "delay": r.delay,
                    "stages": r.stage_results,
                    "decisions": r.decisions[:20],
                    "decision_count": len(r.decisions),
                    "seconds": r.seconds,
                }
                for r in results
            ],
            "replay_seconds": replay_seconds,
        },
    )


if __name__ == "__main__":
    main()
