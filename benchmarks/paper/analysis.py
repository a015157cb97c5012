"""The measures of the reproduction report, fixed before any result was looked at, and the verdicts.

**Transition at a decay** (claims a and b). ``y_e`` is a per-epoch curve after ``e`` completed epochs
(``epoch/train_loss``, ``test/loss``, ``test/accuracy`` in percent), oriented so that an improvement is
positive (losses negated). The schedule decays after epoch ``m`` (the first update of epoch ``m + 1`` runs at the
new rate). With the per-epoch improvements ``d_e = y_e - y_(e-1)``:

* ``pace``: the mean of the ``WINDOW`` improvements before the decay, ``d_(m-WINDOW+1) .. d_m``;
* ``noise``: their sample standard deviation (how much one epoch's improvement wanders around the pace);
* ``jump = d_(m+1) - pace``: how much more the first epoch at the new rate improved than the stage's recent
  pace. A stage transition is a sudden improvement, ``jump > 0``; a decay under plain gradient descent only
  slows progress, ``jump <= 0``;
* ``sharpness = jump / noise``: the jump in units of the epoch-to-epoch noise (``None`` when the noise is 0).

(a) holds for a metric and a decay when the mean sharpness over seeds is at least ``SHARP_Z`` (and the mean
jump is positive); the claim holds when it does at the first decay on all three curves (the second decay,
at 1 % of the starting rate, often has little left to learn). The server's own segmentation must also have put
a stage boundary exactly at each scheduled decay.

(b) compares the mean jumps (over seeds) of full-batch runs with the SGD runs', per curve and decay:
*vanished* when the full-batch jump is ``<= 0`` (the decay brought no sudden improvement at all), else
*shrunk* by ``factor = SGD jump / GD jump`` (no comparison where the SGD jump itself is
``<= 0``). The claim holds when, in the full-batch protocol that trains (``gd-long``), every curve's jump
vanished or shrank by at least ``SHRINK_FACTOR`` at both decays, wherever SGD showed a jump (at least once).

(d) per checkpoint the held-out target accuracy; per seed the paired difference *last stage - first stage*.
Holds (later stages less transferable) when the mean difference is negative and every seed's is; contradicted
when the mean is positive and every seed's is; otherwise inconclusive. Stated per target and evaluation; the
verdict is the primary target's (``reversed``), both evaluations.

(c) from the time-to-accuracy benchmark's own JSON: AutoDecay saves time when its mean epochs are below
StepDecay's; accuracy is not hurt when its mean final accuracy is no more than StepDecay's seed-to-seed
standard deviation below StepDecay's mean (the benchmark's own, stricter goal -- no lower at all -- is shown too).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from server.detectors.segment import segment

WINDOW = 5
SHARP_Z = 3.0
SHRINK_FACTOR = 5.0
CURVES = {  # key on the server -> (label, sign that makes an improvement positive, scale)
    "epoch/train_loss": ("training loss", -1.0, 1.0),
    "test/loss": ("test loss", -1.0, 1.0),
    "test/accuracy": ("test accuracy (pp)", 1.0, 100.0),
}


def mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def std(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) >= 2 else math.nan


def transition(y: Sequence[float], m: int, window: int = WINDOW) -> dict[str, float | None]:
    """The transition measures at a decay after epoch ``m`` of the oriented curve ``y`` (``y[e - 1]`` after
    ``e`` epochs); see the module doc. The window shrinks when the decay comes early."""
    d = {e: y[e - 1] - y[e - 2] for e in range(2, len(y) + 1)}
    before = [d[e] for e in range(max(2, m - window + 1), m + 1)]
    if m + 1 not in d or len(before) < 2:
        return {"jump": None, "pace": None, "noise": None, "sharpness": None}
    pace = mean(before)
    noise = std(before)
    jump = d[m + 1] - pace
    return {"jump": jump, "pace": pace, "noise": noise, "sharpness": jump / noise if noise > 0 else None}


def run_transitions(curves: dict[str, list[float]], milestones: Sequence[int]) -> dict[str, list[dict[str, Any]]]:
    """Per curve key, the transition measures at each decay (in the curve's own units, oriented)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for key, (_, sign, scale) in CURVES.items():
        y = [sign * scale * v for v in curves[key]]
        out[key] = [{"decay_epoch": m, **transition(y, m)} for m in milestones]
    return out


def curve_only_transitions(
    steps: Sequence[int], values: Sequence[float], decay_steps: Sequence[int], tolerance: int
) -> dict[str, Any]:
    """The server's segmentation rule (``server.detectors.segment``) run on the per-step training loss *without*
    the LR: which sharp transitions the curve itself shows, and whether each scheduled decay is one of them
    (a curve boundary within ``tolerance`` steps)."""
    stages = segment(steps, values, None)
    found = [s.start_step for s in stages[1:]]
    return {
        "boundaries": found,
        "decays_found": [any(abs(b - d) <= tolerance for b in found) for d in decay_steps],
    }


def aggregate(values: Sequence[float | None]) -> dict[str, Any]:
    known = [v for v in values if v is not None and math.isfinite(v)]
    return {"mean": mean(known), "std": std(known), "values": list(values), "n": len(known)}


def summarize_transitions(runs: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per curve and decay, jump and sharpness aggregated over the runs (seeds) given."""
    out: dict[str, list[dict[str, Any]]] = {}
    for key in CURVES:
        per_decay = []
        for i, m in enumerate(runs[0]["milestones"]):
            per_decay.append({
                "decay_epoch": m,
                "jump": aggregate([r["transitions"][key][i]["jump"] for r in runs]),
                "sharpness": aggregate([r["transitions"][key][i]["sharpness"] for r in runs]),
                "pace": aggregate([r["transitions"][key][i]["pace"] for r in runs]),
            })  # fmt: skip
        out[key] = per_decay
    return out


def verdict_a(sgd: dict[str, list[dict[str, Any]]], boundaries_at_decays: bool) -> dict[str, Any]:
    per: dict[str, list[bool]] = {}
    for key, decays in sgd.items():
        per[key] = [d["sharpness"]["mean"] >= SHARP_Z and d["jump"]["mean"] > 0 for d in decays]
    holds = boundaries_at_decays and all(flags[0] for flags in per.values())
    return {"holds": holds, "sharp": per, "server_boundaries_at_decays": boundaries_at_decays}


def shrink(sgd_jump: float, gd_jump: float) -> dict[str, Any]:
    if math.isnan(gd_jump) or math.isnan(sgd_jump):
        return {"outcome": "unknown", "factor": None}
    if sgd_jump <= 0:  # no transition under SGD: nothing for full batch to lose
        return {"outcome": "no SGD transition", "factor": None}
    if gd_jump <= 0:
        return {"outcome": "vanished", "factor": None}
    return {"outcome": "shrunk" if gd_jump < sgd_jump else "not smaller", "factor": sgd_jump / gd_jump}


def verdict_b(sgd: dict[str, list[dict[str, Any]]], gd: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    comparisons: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for kind, summary in gd.items():
        comparisons[kind] = {
            key: [shrink(s["jump"]["mean"], g["jump"]["mean"]) for s, g in zip(sgd[key], summary[key], strict=True)]
            for key in CURVES
        }
    decisive = comparisons.get("gd-long") or next(iter(comparisons.values()), {})

    def ok(c: dict[str, Any]) -> bool:
        return bool(c["outcome"] == "vanished" or (c["factor"] is not None and c["factor"] >= SHRINK_FACTOR))

    # Only where SGD shows a transition is there one for full batch to lose; at least one such place is needed.
    compared = [c for per in decisive.values() for c in per if c["outcome"] != "no SGD transition"]
    holds = bool(compared) and all(ok(c) for c in compared)
    return {"holds": holds, "comparisons": comparisons, "decided_on": "gd-long" if "gd-long" in gd else "gd"}


def paired_last_minus_first(rows_by_seed: dict[int, list[dict[str, Any]]], field: str) -> list[float]:
    """Per seed: the last stage's value of ``field`` minus the first stage's (stage 0, the init, left out)."""
    out = []
    for rows in rows_by_seed.values():
        stages = [r for r in rows if r["stage"] >= 1]
        out.append(100 * (stages[-1][field] - stages[0][field]))
    return out


def claim_outcome(diffs: Sequence[float]) -> str:
    if diffs and mean(diffs) < 0 and all(d < 0 for d in diffs):
        return "holds"
    if diffs and mean(diffs) > 0 and all(d > 0 for d in diffs):
        return "contradicted"
    return "inconclusive"


def verdict_d(rows_by_seed: dict[int, list[dict[str, Any]]], fields: Sequence[str], primary: str) -> dict[str, Any]:
    per = {}
    for field in fields:
        diffs = paired_last_minus_first(rows_by_seed, field)
        per[field] = {"diffs_pp": diffs, "mean_pp": mean(diffs), "outcome": claim_outcome(diffs)}
    source = paired_last_minus_first(rows_by_seed, "source_test_accuracy")
    primary_outcomes = {per[f]["outcome"] for f in fields if f.startswith(primary + "/")}
    if primary_outcomes == {"holds"}:
        overall = "holds"
    elif primary_outcomes == {"contradicted"}:
        overall = "contradicted"
    else:
        overall = "inconclusive"
    return {
        "outcome": overall,
        "per_evaluation": per,
        "source_gain_pp": {"diffs_pp": source, "mean_pp": mean(source)},
    }


def verdict_c(tta: dict[str, Any]) -> dict[str, Any]:
    summary = tta["summary"]
    step, auto = summary["step"], summary["autodecay"]
    share = auto["epochs_used_mean"] / step["epochs_used_mean"]
    gap = auto["final_accuracy_pct_mean"] - step["final_accuracy_pct_mean"]
    spread = step["final_accuracy_pct_std"]
    tolerance = spread if spread is not None and math.isfinite(spread) else 0.0
    saves = share < 1.0
    not_hurt = gap >= -tolerance
    return {
        "holds": saves and not_hurt,
        "epoch_share": share,
        "accuracy_gap_pp": gap,
        "step_accuracy_std_pp": spread,
        "saves_time": saves,
        "accuracy_not_hurt": not_hurt,
        "benchmark_goal_no_lower": gap >= 0,
    }
