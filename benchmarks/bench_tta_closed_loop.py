"""In-process closed loop for tuning AutoDecay's epoch preset: the recipe's training, the detector, no server.

``benchmarks.bench_time_to_accuracy`` is the measure (real server, real workers); a setting takes minutes
there. This loop trains the same task (:func:`trainer.recipes.mnist1d.make_task`: same data, initialisation
and minibatch order, one thread, SGD with the recipe's momentum and weight decay) and feeds each epoch's test
accuracy to AutoDecay in auto mode: a decay multiplies the LR from the next epoch on, a stop ends the run.
Two differences from the real system, both small: a decision applies at the epoch boundary (live it lands a
few to a few dozen steps into the next epoch), and a stopped run counts whole epochs.

A run's curve depends only on the epochs at which the LR was decayed, so trajectories are memoised in a
tree keyed by those epochs (model, optimizer and minibatch-generator state after every epoch): StepDecay and
every detector variant share the constant-LR trunk, and a variant that decays where an earlier one did costs
nothing. That makes a sweep of detector parameters over many settings and seeds cheap.

    .venv/bin/python -m benchmarks.bench_tta_closed_loop --settings tune [--variant NAME ...] [--out NAME]

Variants are named sets of AutoDecay parameters on top of ``stagewatch train``'s (``VARIANTS``);
``--param K=V`` adds an ad-hoc one. Prints, per setting, StepDecay's and each variant's mean final accuracy,
the gap, the epoch ratio and the decisions per seed, and the issue 11 goals per setting.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from server.detectors.autodecay import AutoDecay, AutoDecayParams
from trainer.recipes.mnist1d import NUM_CLASSES, load_data, make_task
from trainer.train_cli import DETECTOR_PARAMS, MOMENTUM, WEIGHT_DECAY

RESULTS = Path(__file__).parent / "results"
EPOCHS = 60
FACTOR = 0.1


@dataclass(frozen=True)
class Setting:
    width: int = 32
    num_samples: int = 5000
    label_noise: float = 0.0
    lr: float = 0.05
    seeds: tuple[int, ...] = (0, 1, 2)

    @property
    def name(self) -> str:
        return f"w{self.width}-n{self.num_samples}-noise{self.label_noise:g}-lr{self.lr:g}-s{self.seeds[0]}"


# The settings of the README's time-to-accuracy table: every one of them has been seen, so all are tuning.
TUNE = [
    Setting(),
    Setting(lr=0.1),
    Setting(width=16, num_samples=3000, seeds=(20, 21, 22)),
    Setting(num_samples=10000, seeds=(40, 41, 42)),
    Setting(width=24, num_samples=4000, label_noise=0.05, seeds=(50, 51, 52)),
    Setting(width=64, num_samples=6000, lr=0.1, seeds=(60, 61, 62)),
    Setting(width=48, label_noise=0.2, lr=0.1, seeds=(30, 31, 32)),
    Setting(width=64, num_samples=8000, label_noise=0.1, seeds=(10, 11, 12)),
]

# The epoch preset before this sweep (issue 11 item 7): every base value explicit, so no later_ value applies.
BEFORE = {
    "window": 0.3,
    "max_window_blocks": None,
    "smooth": 3,
    "min_window_blocks": 4,
    "min_stage": 5,
    "rho": 0.1,
    "confirm": 2,
}
LATER = {"later_smooth": 1, "later_min_window_blocks": 3, "later_min_stage": 3}
FAST = {**LATER, "later_window": 0.3}
# Variants on top of stagewatch train's DETECTOR_PARAMS and the epoch preset (``{}``: the preset as it is now).
# They name every value they change from BEFORE, so they mean the same whatever the preset is. The sweep that chose
# the preset, in order (README, "Time to accuracy"): md2; L*; P1-P6; P7-P14; P13, P15, P16. P13 became the preset.
VARIANTS: dict[str, dict[str, Any]] = {
    "preset": {},
    "before": BEFORE,
    "md2": {**BEFORE, "max_decays": 2},
    "L": {**BEFORE, **LATER},
    "L_w4": {**BEFORE, **LATER, "window": 0.4},
    "L_w5": {**BEFORE, **LATER, "window": 0.5},
    "L_z15": {**BEFORE, **LATER, "z": 1.5},
    "L_ms8": {**BEFORE, **LATER, "min_stage": 8},
    "L_w5_ms8": {**BEFORE, **LATER, "window": 0.5, "min_stage": 8},
    "P1": {**BEFORE, **FAST, "window": 0.5},
    "P2": {**BEFORE, **FAST, "window": 0.5, "later_rho": 0.25},
    "P3": {**BEFORE, **FAST, "window": 0.4, "later_rho": 0.25},
    "P6": {**BEFORE, **FAST, "window": 0.5, "later_rho": 0.4},
    "P13": {**BEFORE, **FAST, "window": 0.5, "later_rho": 0.25, "later_confirm": 1, "max_window_blocks": 8},
    "P15": {**BEFORE, **FAST, "window": 0.5, "later_rho": 0.25, "later_confirm": 1, "max_window_blocks": 10},
    "P16": {**BEFORE, **FAST, "window": 0.5, "later_rho": 0.25, "later_confirm": 1, "max_window_blocks": 9},
}
# Evaluated with options tried and then removed (they did not help): ``noise`` = "median"/"stage_median" (the
# median absolute second difference, over the window or the whole stage, instead of the mean over the window) and
# ``trend_z`` (a least-squares trend over the last half of the stage vetoing the end). For the record only.
REMOVED_OPTION_VARIANTS: dict[str, dict[str, Any]] = {
    "P4": {**FAST, "window": 0.5, "later_rho": 0.25, "noise": "stage_median"},
    "P5": {**FAST, "window": 0.5, "later_rho": 0.25, "trend_z": 1.0},
    "P7": {**FAST, "window": 0.5, "later_rho": 0.25, "noise": "stage_median", "later_confirm": 1},
    "P8": {**FAST, "window": 0.45, "later_rho": 0.25, "noise": "stage_median"},
    "P9": {**FAST, "window": 0.45, "later_rho": 0.25, "noise": "stage_median", "later_confirm": 1},
    "P10": {**FAST, "window": 0.5, "later_rho": 0.4, "noise": "stage_median", "later_confirm": 1},
    "P11": {
        **FAST,
        "window": 0.5,
        "later_rho": 0.25,
        "noise": "stage_median",
        "later_confirm": 1,
        "max_window_blocks": 8,
    },
    "P12": {
        **FAST,
        "window": 0.5,
        "later_rho": 0.25,
        "noise": "stage_median",
        "later_confirm": 1,
        "max_window_blocks": 10,
    },
    "P14": {
        **FAST,
        "window": 0.4,
        "later_rho": 0.25,
        "noise": "stage_median",
        "later_confirm": 1,
        "max_window_blocks": 8,
    },
}


# Run once each, after the epoch preset's parameters were fixed (README, "Time to accuracy": the heldout2 files).
HELD_OUT = [
    Setting(width=40, num_samples=7000, seeds=(70, 71, 72)),
    Setting(width=20, label_noise=0.15, seeds=(80, 81, 82)),
    Setting(num_samples=4000, lr=0.08, seeds=(90, 91, 92)),
]


class Tree:
    """Trajectories of one (setting, seed), memoised by decay epochs: ``key`` is the tuple of 0-based epoch
    indices from which a further x``FACTOR`` applies; ``states[key][k]`` is the state after ``k`` epochs
    (``k`` > the last decay epoch) with its test accuracy."""

    def __init__(self, setting: Setting, seed: int, data: Any) -> None:
        self.setting, self.seed = setting, seed
        task = make_task(data, batch_size=32, seed=seed, channels=setting.width, label_noise=setting.label_noise)
        self.task = task
        self.steps_per_epoch = task.steps_per_epoch
        # make_task's minibatch order: one randperm per epoch from a generator seeded with the seed.
        self.n = task.description["num_train"]
        self.x, self.y = self._training_data(task)
        model = task.model
        optimizer = torch.optim.SGD(model.parameters(), lr=setting.lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        generator = torch.Generator().manual_seed(seed)
        self.model, self.optimizer = model, optimizer
        root = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()), generator.get_state())
        self.states: dict[tuple[int, ...], dict[int, tuple[Any, Any, Any, float]]] = {(): {0: (*root, math.nan)}}
        self.epochs_trained = 0

    def _training_data(self, task: Any) -> tuple[torch.Tensor, torch.Tensor]:
        # The (possibly label-noised) training data the task's minibatches are cut from, read from its closure.
        cells = {name: cell.cell_contents for name, cell in zip(
            task.batches.__code__.co_freevars, task.batches.__closure__ or (), strict=True)}  # fmt: skip
        data = cells["data"]
        return data.x_train, data.y_train

    def accuracy(self, key: tuple[int, ...], k: int) -> float:
        key = tuple(d for d in key if d < k)
        return self._state(key, k)[3]

    def _state(self, key: tuple[int, ...], k: int) -> tuple[Any, Any, Any, float]:
        traj = self.states.setdefault(key, {})
        if k in traj:
            return traj[k]
        start = key[-1] if key else 0
        if key and start not in traj:
            traj[start] = self._state(key[:-1], start)
        last = max(e for e in traj if e <= k)
        model_state, opt_state, gen_state, _ = traj[last]
        self.model.load_state_dict(model_state)
        self.optimizer.load_state_dict(copy.deepcopy(opt_state))  # the loaded buffers are updated in place
        lr = self.setting.lr * FACTOR ** len(key)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        generator = torch.Generator()
        generator.set_state(gen_state)
        self.model.train()
        for epoch in range(last, k):
            order = torch.randperm(self.n, generator=generator)
            for first in range(0, self.n, 32):
                index = order[first : first + 32]
                loss = F.cross_entropy(self.model(self.x[index]), self.y[index])
                self.optimizer.zero_grad(set_to_none=True)
                torch.autograd.backward(loss)
                self.optimizer.step()
            _, acc = self.task.evaluate(self.model)
            self.model.train()
            self.epochs_trained += 1
            traj[epoch + 1] = (
                copy.deepcopy(self.model.state_dict()),
                copy.deepcopy(self.optimizer.state_dict()),
                generator.get_state(),
                float(acc),
            )
        return traj[k]


@dataclass
class Outcome:
    final: float
    epochs: int
    decisions: list[tuple[str, int]]  # (action, epoch of the evidence)
    curve: list[float]


def run_step(tree: Tree) -> Outcome:
    key = (EPOCHS // 2, (3 * EPOCHS) // 4)
    curve = [tree.accuracy(key, k) for k in range(1, EPOCHS + 1)]
    return Outcome(curve[-1], EPOCHS, [], curve)


def run_autodecay(tree: Tree, params: dict[str, Any]) -> Outcome:
    detector = AutoDecay(AutoDecayParams(**{**DETECTOR_PARAMS, "mode": "max", "chance": 1 / NUM_CLASSES, **params}))
    detector.set_lr(tree.setting.lr)
    decays: list[int] = []
    curve: list[float] = []
    decisions: list[tuple[str, int]] = []
    for k in range(1, EPOCHS + 1):
        acc = tree.accuracy(tuple(decays), k)
        curve.append(acc)
        for decision in detector.update(k * tree.steps_per_epoch, acc):
            decisions.append((decision.action, k))
            if decision.action == "decay":
                decays.append(k)
            else:
                return Outcome(acc, k, decisions, curve)
    return Outcome(curve[-1], EPOCHS, decisions, curve)


def parse_param(text: str) -> tuple[str, Any]:
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def evaluate(settings: Sequence[Setting], variants: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for setting in settings:
        data = load_data(num_samples=setting.num_samples)
        started = time.perf_counter()
        trees = [Tree(setting, seed, data) for seed in setting.seeds]
        steps = [run_step(t) for t in trees]
        step_acc = statistics.fmean(100 * o.final for o in steps)
        rows: dict[str, Any] = {"step": {"acc": step_acc, "finals": [o.final for o in steps]}}
        print(f"\n{setting.name}: StepDecay {step_acc:.2f} %  ({', '.join(f'{100 * o.final:.1f}' for o in steps)})")
        for name, params in variants.items():
            outs = [run_autodecay(t, params) for t in trees]
            acc = statistics.fmean(100 * o.final for o in outs)
            ratio = statistics.fmean(o.epochs for o in outs) / EPOCHS
            silent = [
                t.seed for t, o, s in zip(trees, outs, steps, strict=True)
                if not o.decisions and 100 * (s.final - o.final) > 2
            ]  # fmt: skip
            met = ratio <= 0.5 and acc >= step_acc - 1e-9 and not silent
            per_seed = "; ".join(
                ", ".join(f"{a} {e}" for a, e in o.decisions) + f" ({100 * o.final:.1f})" for o in outs
            )
            print(
                f"  {name:>14}: {acc:6.2f} % gap {acc - step_acc:+5.2f}  epochs {ratio:.2f}x  "
                f"{'MET ' if met else 'miss'}  {per_seed}"
            )
            rows[name] = {
                "acc": acc,
                "gap": acc - step_acc,
                "ratio": ratio,
                "met": met,
                "silent": silent,
                "runs": [{"seed": t.seed, "final": o.final, "epochs": o.epochs, "decisions": o.decisions,
                          "curve": o.curve} for t, o in zip(trees, outs, strict=True)],
            }  # fmt: skip
        print(f"  ({sum(t.epochs_trained for t in trees)} epochs trained, {time.perf_counter() - started:.0f} s)")
        out[setting.name] = rows
    print("\nsummary (settings met / mean gap / mean ratio):")
    for name in variants:
        summary = [out[s.name][name] for s in settings]
        print(
            f"  {name:>14}: {sum(r['met'] for r in summary)}/{len(summary)} met, "
            f"acc>= {sum(r['gap'] >= 0 for r in summary)}, ratio<=0.5 {sum(r['ratio'] <= 0.5 for r in summary)}, "
            f"gap {statistics.fmean(r['gap'] for r in summary):+.2f}, "
            f"ratio {statistics.fmean(r['ratio'] for r in summary):.2f}"
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_tta_closed_loop", description=__doc__)
    parser.add_argument("--settings", default="tune", help="tune, or indexes into the tuning list (0,3,5)")
    parser.add_argument("--variant", action="append", default=[], help="a name in VARIANTS (default: all)")
    parser.add_argument("--param", action="append", default=[], metavar="K=V", help="an ad-hoc variant's parameter")
    parser.add_argument("--out", default=None, metavar="NAME")
    args = parser.parse_args(argv)
    settings = TUNE if args.settings == "tune" else [TUNE[int(i)] for i in args.settings.split(",")]
    variants = {name: VARIANTS[name] for name in (args.variant or list(VARIANTS))}
    if args.param:
        variants["adhoc"] = dict(parse_param(p) for p in args.param)
    result = evaluate(settings, variants)
    if args.out:
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"tta_closed_loop-{args.out}.json"
        path.write_text(json.dumps({"variants": variants, "settings": result}, indent=1))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
