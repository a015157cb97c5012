"""Training-time overhead of logging every step on the MNIST-1D recipe, server up and server down.

The reference recipe (``stagewatch train --recipe mnist1d-cnn`` with its defaults: 4,000 training samples,
batch 32, 125 updates per epoch, SGD at a constant LR 0.05, one torch thread) is trained by the loop that
command runs, :func:`trainer.loop.fit`, under three conditions with the same seed and data:

* ``no logging``: the run is :class:`benchmarks.offline_run.OfflineRun`, which discards every point and has
  no commands (``fit`` still calls it: that call is part of the baseline);
* ``server up``: a real run, so every step logs ``train/loss`` and ``lr``, applies the run's commands, and
  every epoch logs ``epoch/train_loss``, ``test/loss`` and ``test/accuracy`` (what ``stagewatch train`` does)
  to the real ``stagewatch serve`` in its own process on a SQLite file (benchmarks.harness), one new run per
  training;
* ``server down``: the same calls to a loopback port where nothing listens, so the sender thread retries and
  keeps the points (in memory up to the client's ``max_memory_points``, then in a temporary spool directory,
  where closing the run puts the rest);
* ``server up, httpx`` (only with ``--with-httpx``): as ``server up``, but the run is given an httpx transport,
  so its metric batches go over httpx instead of libcurl (:mod:`trainer.curl`): the client's previous path,
  measured in the same rounds.

The conditions are interleaved (their order rotates from one repeat to the next, so none always runs first)
after an untimed warm-up round, and the per-epoch wall time (``fit``'s ``EpochStats.seconds``: updates,
logging, evaluation) is compared: the ratio of the pooled medians, and the median over repeats of each
repeat's ratio to the no-logging training of the same repeat (paired, so slow drifts of the machine cancel
out). The sender thread, the server process and the training share the CPUs; that contention is part of the
measured overhead.
A second table says where the time goes: wall time inside ``run.log()``, metric POSTs (the run's
``batches_sent``), CPU of the client's threads and of the server, and the load of other processes.

Nothing is taken on trust: after each server-up training the run is flushed and ``GET /api/v1/runs/{id}`` must
report exactly the logged point count for every key; after each server-down training ``pending.jsonl`` must
hold every logged point exactly once. A training that lost or rejected a point fails the benchmark.

    .venv/bin/python -m benchmarks.bench_train_overhead [--repeats 30] [--epochs 6] [--num-samples N] [--with-httpx]
        [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import random
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from benchmarks import harness
from benchmarks.offline_run import OfflineRun
from trainer import Run, start_run
from trainer.commands import Command
from trainer.train_cli import DEFAULT_LR, MOMENTUM, WEIGHT_DECAY

if TYPE_CHECKING:  # torch is imported only when the benchmark runs (run_all imports this module)
    from trainer.loop import EpochStats, FitRun
    from trainer.recipes.mnist1d import Mnist1dData

NAME = "train_overhead"
TARGET_PCT = 1.0
BATCH_SIZE = 32  # stagewatch train's default, as DEFAULT_LR, MOMENTUM and WEIGHT_DECAY
CONDITIONS = ("none", "up", "down")
LABELS = {"none": "no logging", "up": "server up", "down": "server down", "up_httpx": "server up, httpx"}
STEP_KEYS = ("train/loss", "lr")
EPOCH_KEYS = ("epoch/train_loss", "test/loss", "test/accuracy")
QUICK = {"repeats": 1, "epochs": 1, "num_samples": 1000, "warmup": 0}
# 180 epochs a condition: on a 2-core VM an epoch varies by +-5 % from one to the next, and fewer leave the
# paired 90 % CI wider than the 1 % target (12 rounds x 3 epochs gave about +-2 %).
FULL = {"repeats": 30, "epochs": 6, "num_samples": None, "warmup": 1}
FLUSH_TIMEOUT_S = 600.0
BOOTSTRAP_RESAMPLES = 2000
QUIET_OTHER_CORES = 0.2  # above this median load from other processes, the report warns


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_train_overhead", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--repeats", type=harness.positive_int, help="timed rounds of the three conditions (default 30)"
    )
    parser.add_argument("--epochs", type=harness.positive_int, help="epochs per training (default 6)")
    parser.add_argument(
        "--num-samples", type=harness.positive_int, help="MNIST-1D samples, train + test (default: the recipe's, 5000)"
    )
    parser.add_argument("--warmup", type=int, help="untimed rounds first, 1 epoch each (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="model initialisation and minibatch order (default 0)")
    parser.add_argument(
        "--max-memory-points",
        type=harness.positive_int,
        default=None,
        help="the client's max_memory_points in the server-down condition (default: the client's, 200000); "
        "a small value makes the sender write the spool during training",
    )
    parser.add_argument(
        "--with-httpx",
        action="store_true",
        help="a fourth condition in every round: server up, metric batches over httpx instead of libcurl",
    )
    parser.add_argument("--quick", action="store_true", help="1 round of 1 epoch on 1,000 samples: a smoke test")
    return parser


def _option(args: argparse.Namespace, name: str) -> Any:
    value = getattr(args, name)
    return value if value is not None else (QUICK if args.quick else FULL)[name]


# --- CPU time of threads and of the server process (Linux /proc; None elsewhere) ------------------------------


def _thread_cpu_ns(native_id: int | None) -> int | None:
    if native_id is None:
        return None
    try:
        return int(Path(f"/proc/self/task/{native_id}/schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _server_pid() -> int | None:
    """The ``stagewatch serve`` child of this process (the harness starts exactly one)."""
    me = os.getpid()
    with contextlib.suppress(OSError):
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == me and b"serve" in cmdline:
                return int(entry.name)
    return None


def _process_cpu_s(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _machine_busy_s() -> float | None:
    """CPU seconds all CPUs have spent busy since boot (steal included: the hypervisor gave them to others)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class _Meter:
    """What happens between ``start`` and ``stop`` (one training): CPU seconds of the run's background threads,
    of the server process, and of everything else on the machine (other processes, steal)."""

    def __init__(self, server_pid: int | None, threads: Sequence[threading.Thread] = ()) -> None:
        self._threads = list(threads)
        self._server_pid = server_pid
        self._start: dict[str, int | None] = {}
        self._cpu_start: tuple[float | None, float | None, float | None, float] = (None, None, None, 0.0)
        self.threads_s: dict[str, float | None] = {}
        self.server_s: float | None = None
        self.other_cores: float | None = None  # busy CPUs that were neither this process nor the server

    def _cpu(self) -> tuple[float | None, float | None, float | None, float]:
        return _machine_busy_s(), _process_cpu_s(os.getpid()), _process_cpu_s(self._server_pid), time.monotonic()

    def start(self) -> None:
        self._start = {t.name: _thread_cpu_ns(t.native_id) for t in self._threads}
        self._cpu_start = self._cpu()

    def stop(self) -> None:
        end = self._cpu()
        for t in self._threads:
            before, after = self._start.get(t.name), _thread_cpu_ns(t.native_id)
            self.threads_s[t.name] = (after - before) / 1e9 if before is not None and after is not None else None
        (busy0, me0, server0, t0), (busy1, me1, server1, t1) = self._cpu_start, end
        if server0 is not None and server1 is not None:
            self.server_s = server1 - server0
        if busy0 is not None and busy1 is not None and me0 is not None and me1 is not None and t1 > t0:
            self.other_cores = max(0.0, (busy1 - busy0) - (me1 - me0) - (self.server_s or 0.0)) / (t1 - t0)


# --- one training -------------------------------------------------------------------------------------------


@dataclass
class Trial:
    condition: str
    repeat: int  # -1: warm-up
    epoch_s: list[float]
    loop_s: float  # the whole fit() call (FitResult.seconds)
    in_log_s: float  # wall time spent inside run.log() by the training thread
    log_calls: int
    points_logged: int
    points_verified: int | None = None  # on the server (up) or in pending.jsonl (down)
    verified: bool = True
    problems: list[str] = field(default_factory=list)
    background_cpu_s: dict[str, float | None] = field(default_factory=dict)  # per thread, during training
    server_cpu_s: float | None = None  # during training (idle unless the condition is "up")
    other_cores: float | None = None  # CPUs busy with other processes (or stolen) during training, on average
    metric_posts: int = 0  # stored batches (Run.batches_sent), the whole run: the final flush too
    warnings: list[str] = field(default_factory=list)


class _Collect(logging.Handler):
    """Keeps the ``trainer`` logger's records of one training (the server-down warnings are expected)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _trainer_warnings() -> Iterator[_Collect]:
    logger = logging.getLogger("trainer")
    handler = _Collect()
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


@dataclass(frozen=True)
class Training:
    """What one trial trains: the recipe's data for ``epochs`` epochs from ``seed``, at stagewatch train's
    defaults and a constant rate."""

    data: Mnist1dData
    epochs: int
    seed: int


class _TimedRun:
    """The :class:`trainer.loop.FitRun` handed to ``fit``: passes everything to ``inner`` (a real run, or an
    :class:`OfflineRun` for the baseline) and times the training thread's ``log()`` calls. Every condition goes
    through it, so the timer costs the same everywhere."""

    def __init__(self, inner: FitRun) -> None:
        self._inner = inner
        self._clock = time.perf_counter_ns
        self.in_log_ns = 0
        self.calls = 0

    @property
    def id(self) -> int | None:
        return self._inner.id

    @property
    def should_stop(self) -> bool:
        return self._inner.should_stop

    @should_stop.setter
    def should_stop(self, value: bool) -> None:  # the command applier sets it on a stop command
        self._inner.should_stop = value

    def log(self, values: Mapping[str, float], *, step: int, epoch: float | None = None, urgent: bool = False) -> None:
        started = self._clock()
        self._inner.log(values, step=step, epoch=epoch, urgent=urgent)
        self.in_log_ns += self._clock() - started
        self.calls += 1

    def sync_detection(self, timeout: float = 30.0) -> bool:
        return self._inner.sync_detection(timeout)

    def pending_commands(self) -> list[Command]:
        return self._inner.pending_commands()

    def ack_command(self, command_id: int, *, status: str, step: int, lr: float | None, message: str = "") -> None:
        self._inner.ack_command(command_id, status=status, step=step, lr=lr, message=message)


def _train(training: Training, run: Run | None, meter: _Meter) -> tuple[list[float], float, float, int, Counter[str]]:
    """Trains once with :func:`trainer.loop.fit`; returns epoch times, loop time, time inside log(), log() calls
    and points per key sent to ``run`` (``None``: the offline baseline)."""
    import torch

    from trainer.loop import fit
    from trainer.recipes.mnist1d import make_task

    task = make_task(training.data, batch_size=BATCH_SIZE, seed=training.seed)
    optimizer = torch.optim.SGD(task.model.parameters(), lr=DEFAULT_LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    timed = _TimedRun(OfflineRun() if run is None else run)
    epoch_s: list[float] = []

    def on_epoch(e: EpochStats) -> None:
        epoch_s.append(e.seconds)

    gc.collect()
    meter.start()
    result = fit(task, timed, schedule="constant", epochs=training.epochs, optimizer=optimizer, on_epoch=on_epoch)
    meter.stop()
    per_key: Counter[str] = Counter()
    if run is not None:
        for key in STEP_KEYS:
            per_key[key] = result.steps
        for key in EPOCH_KEYS:
            per_key[key] = result.epochs
    return epoch_s, result.seconds, timed.in_log_ns / 1e9, timed.calls, per_key


def _background_threads(before: set[int]) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.ident not in before and t.name.startswith("stagewatch-")]


def trial_none(training: Training, repeat: int, server_pid: int | None) -> Trial:
    meter = _Meter(server_pid)
    epoch_s, loop_s, in_log_s, calls, _ = _train(training, None, meter)
    trial = Trial("none", repeat, epoch_s, loop_s, in_log_s, calls, 0)
    trial.server_cpu_s, trial.other_cores = meter.server_s, meter.other_cores
    return trial


def trial_up(
    training: Training, repeat: int, url: str, spool: Path, server_pid: int | None, *, over_httpx: bool = False
) -> Trial:
    """``over_httpx``: the run gets an httpx transport, which sends its metric batches over httpx too."""
    before = {t.ident for t in threading.enumerate() if t.ident is not None}
    transport = httpx.HTTPTransport() if over_httpx else None
    condition = "up_httpx" if over_httpx else "up"
    with _trainer_warnings() as warnings:
        try:
            with start_run(
                url,
                name=f"train-overhead {condition} r{repeat}",
                project="bench",
                spool_dir=spool,
                close_timeout_s=FLUSH_TIMEOUT_S,
                transport=transport,
            ) as run:
                meter = _Meter(server_pid, _background_threads(before))
                epoch_s, loop_s, in_log_s, calls, per_key = _train(training, run, meter)
                flushed = run.flush(timeout=FLUSH_TIMEOUT_S)
                sent, rejected, run_id = run.points_sent, run.points_rejected, run.id
            metric_posts = run.batches_sent
        finally:
            if transport is not None:
                transport.close()
    logged = sum(per_key.values())
    trial = Trial(condition, repeat, epoch_s, loop_s, in_log_s, calls, logged)
    trial.background_cpu_s, trial.server_cpu_s = meter.threads_s, meter.server_s
    trial.other_cores, trial.metric_posts = meter.other_cores, metric_posts
    trial.warnings = warnings.messages
    if not flushed:
        trial.problems.append(f"flush did not finish within {FLUSH_TIMEOUT_S:.0f}s")
    if rejected:
        trial.problems.append(f"the server rejected {rejected} points")
    if sent != logged:
        trial.problems.append(f"the server acknowledged {sent} points, {logged} were logged")
    if warnings.messages:
        trial.problems.append(f"client warnings: {warnings.messages}")
    for leftover in ("pending.jsonl", "rejected.jsonl"):
        if (spool / leftover).exists():
            trial.problems.append(f"{leftover} left in the spool")
    if run_id is None:
        trial.problems.append("the run was never created")
    else:
        with harness.http_client(url) as client:
            response = client.get(f"/api/v1/runs/{run_id}")
            harness.check_status(response)
        stored = {key: int(v["count"]) for key, v in response.json()["latest"].items()}
        trial.points_verified = sum(stored.values())
        if stored != dict(per_key):
            trial.problems.append(f"server holds {stored}, logged {dict(per_key)}")
    trial.verified = not trial.problems
    return trial


def _spooled_points(spool: Path) -> tuple[Counter[str], int]:
    """Points per key in ``pending.jsonl`` and the number of distinct ``(key, step)`` among them."""
    per_key: Counter[str] = Counter()
    distinct: set[tuple[str, int]] = set()
    path = spool / "pending.jsonl"
    if path.exists():
        with path.open("rb") as f:
            for line in f:
                for point in json.loads(line)["points"]:
                    per_key[point["key"]] += 1
                    distinct.add((point["key"], point["step"]))
    return per_key, len(distinct)


def trial_down(
    training: Training,
    repeat: int,
    url: str,
    spool: Path,
    server_pid: int | None,
    max_memory_points: int | None,
) -> Trial:
    before = {t.ident for t in threading.enumerate() if t.ident is not None}
    extra: dict[str, Any] = {} if max_memory_points is None else {"max_memory_points": max_memory_points}
    with (
        _trainer_warnings() as warnings,
        start_run(
            url,
            name=f"train-overhead down r{repeat}",
            project="bench",
            spool_dir=spool,
            timeout=1.0,
            close_timeout_s=0.1,
            **extra,
        ) as run,
    ):
        meter = _Meter(server_pid, _background_threads(before))
        epoch_s, loop_s, in_log_s, calls, per_key = _train(training, run, meter)
        run_id = run.id
    logged = sum(per_key.values())
    trial = Trial("down", repeat, epoch_s, loop_s, in_log_s, calls, logged)
    trial.background_cpu_s = meter.threads_s
    trial.server_cpu_s, trial.other_cores = meter.server_s, meter.other_cores
    trial.warnings = warnings.messages
    spooled, distinct = _spooled_points(spool)
    trial.points_verified = sum(spooled.values())
    if run_id is not None:
        trial.problems.append(f"a server answered at {url} (run {run_id})")
    if spooled != per_key or distinct != logged:
        trial.problems.append(
            f"pending.jsonl holds {dict(spooled)} ({distinct} distinct key/step), logged {dict(per_key)}"
        )
    if (spool / "rejected.jsonl").exists():
        trial.problems.append("rejected.jsonl in the spool")
    trial.verified = not trial.problems
    return trial


# --- statistics and output ----------------------------------------------------------------------------------


def _pct(ratio: float) -> float:
    return (ratio - 1.0) * 100.0


def _bootstrap_median_ci(values: Sequence[float], seed: int) -> tuple[float, float]:
    """90% percentile-bootstrap interval of the median (crude with few repeats, but shows the resolution)."""
    if len(values) < 2:
        return math.nan, math.nan
    rng = random.Random(seed)
    medians = [statistics.median(rng.choices(values, k=len(values))) for _ in range(BOOTSTRAP_RESAMPLES)]
    return harness.percentile(medians, 5), harness.percentile(medians, 95)


def summarize(trials: Sequence[Trial], seed: int, conditions: Sequence[str] = CONDITIONS) -> dict[str, Any]:
    timed = [t for t in trials if t.repeat >= 0]
    by_condition = {c: [t for t in timed if t.condition == c] for c in conditions}
    pooled = {c: statistics.median(s for t in ts for s in t.epoch_s) for c, ts in by_condition.items()}
    baseline = {t.repeat: t for t in by_condition["none"]}
    summary: dict[str, Any] = {}
    for c, ts in by_condition.items():
        epochs = [s for t in ts for s in t.epoch_s]
        paired = [_pct(statistics.median(t.epoch_s) / statistics.median(baseline[t.repeat].epoch_s)) for t in ts]
        paired_loop = [_pct(t.loop_s / baseline[t.repeat].loop_s) for t in ts]
        n_epochs = sum(len(t.epoch_s) for t in ts)
        background = [v for t in ts for v in t.background_cpu_s.values() if v is not None]
        server = [t.server_cpu_s for t in ts if t.server_cpu_s is not None]
        others = [t.other_cores for t in ts if t.other_cores is not None]
        metric_posts = sum(t.metric_posts for t in ts)
        summary[c] = {
            "label": LABELS[c],
            "trainings": len(ts),
            "epochs": n_epochs,
            "epoch_s_median": pooled[c],
            "epoch_s_p10": harness.percentile(epochs, 10),
            "epoch_s_p90": harness.percentile(epochs, 90),
            "loop_s_median": statistics.median(t.loop_s for t in ts),
            "overhead_pct_pooled": _pct(pooled[c] / pooled["none"]),
            "overhead_pct_paired": statistics.median(paired),
            "overhead_pct_paired_ci90": _bootstrap_median_ci(paired, seed),
            "overhead_pct_paired_per_repeat": paired,
            "loop_overhead_pct_paired": statistics.median(paired_loop),
            "log_calls": sum(t.log_calls for t in ts),
            "points_logged": sum(t.points_logged for t in ts),
            "points_verified": sum(t.points_verified or 0 for t in ts),
            "all_verified": all(t.verified for t in ts),
            "in_log_ms_per_epoch": sum(t.in_log_s for t in ts) / n_epochs * 1e3,
            "in_log_us_per_call": sum(t.in_log_s for t in ts) / max(1, sum(t.log_calls for t in ts)) * 1e6,
            "background_cpu_ms_per_epoch": sum(background) / n_epochs * 1e3 if background else math.nan,
            "server_cpu_ms_per_epoch": sum(server) / n_epochs * 1e3 if server else math.nan,
            "other_load_cores_median": statistics.median(others) if others else math.nan,
            "other_load_cores_max": max(others) if others else math.nan,
            "metric_posts_per_epoch": metric_posts / n_epochs if c != "none" else math.nan,
            "points_per_metric_post": sum(t.points_logged for t in ts) / metric_posts if metric_posts else math.nan,
        }
    return summary


def report(summary: dict[str, Any], args: argparse.Namespace, steps_per_epoch: int) -> dict[str, Any]:
    harness.print_table(
        f"Epoch wall time, MNIST-1D recipe ({steps_per_epoch} steps/epoch), "
        f"{args.repeats} interleaved rounds x {args.epochs} epochs",
        [
            "condition",
            "epochs",
            "median ms",
            "p10 ms",
            "p90 ms",
            "overhead %",
            "paired %",
            "paired 90% CI",
            "loop %",
            "other load",
        ],
        [
            [
                s["label"],
                s["epochs"],
                s["epoch_s_median"] * 1e3,
                s["epoch_s_p10"] * 1e3,
                s["epoch_s_p90"] * 1e3,
                s["overhead_pct_pooled"],
                s["overhead_pct_paired"],
                "{} .. {}".format(*(harness.fmt_number(v) for v in s["overhead_pct_paired_ci90"])),
                s["loop_overhead_pct_paired"],
                s["other_load_cores_median"],
            ]
            for s in summary.values()
        ],
    )
    print(
        "overhead %: pooled medians; paired %: median over rounds of (round's median / no-logging's median - 1); "
        "loop %: the same for the whole fit() call; other load: CPUs busy with other processes (median)"
    )
    busy = max(s["other_load_cores_median"] for s in summary.values())
    if busy > QUIET_OTHER_CORES:
        print(
            f"warning: other processes kept {busy:.2f} CPUs busy during the trainings (of {os.cpu_count()}): "
            "the differences are noisy; run again on a quiet machine"
        )
    harness.print_table(
        "Per epoch: time in log(), metric POSTs and CPU of the client's threads and of the server; points checked",
        [
            "condition",
            "log() calls",
            "points",
            "verified",
            "all there",
            "in log() ms",
            "us/call",
            "POSTs",
            "pts/POST",
            "client threads CPU ms",
            "server CPU ms",
        ],
        [
            [
                s["label"],
                s["log_calls"],
                s["points_logged"],
                s["points_verified"],
                s["all_verified"],
                s["in_log_ms_per_epoch"],
                s["in_log_us_per_call"] if s["log_calls"] else math.nan,
                s["metric_posts_per_epoch"],
                s["points_per_metric_post"],
                s["background_cpu_ms_per_epoch"],
                s["server_cpu_ms_per_epoch"],
            ]
            for s in summary.values()
        ],
    )
    targets: dict[str, Any] = {}
    for c in ("up", "down"):  # up_httpx is a reference, not a target
        s = summary[c]
        # Both estimates must be within the target: the larger one is reported.
        value = max(s["overhead_pct_pooled"], s["overhead_pct_paired"])
        met = harness.target_line(
            f"overhead of logging every step, {s['label']} (larger of pooled and paired)",
            value,
            TARGET_PCT,
            "%",
            higher_is_better=False,
        )
        met = met and s["all_verified"]
        if not s["all_verified"]:
            print(f"  {s['label']}: points were lost or rejected: the measurement does not count")
        targets[f"{c}_overhead_pct"] = {"target": TARGET_PCT, "value": value, "met": met, "unit": "%"}
    return targets


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("repeats", "epochs", "num_samples", "warmup"):
        setattr(args, name, _option(args, name))
    harness.snapshot_code()
    from trainer.recipes.mnist1d import load_data

    data = load_data(num_samples=args.num_samples)
    training = Training(data, epochs=args.epochs, seed=args.seed)
    warm_training = replace(training, epochs=1)
    steps_per_epoch = math.ceil(data.num_train / BATCH_SIZE)
    conditions = CONDITIONS + (("up_httpx",) if args.with_httpx else ())
    print(
        f"[train_overhead] {data.num_train} training samples, {steps_per_epoch} steps/epoch, {args.warmup} warm-up + "
        f"{args.repeats} rounds x {len(conditions)} conditions x {args.epochs} epochs ...",
        flush=True,
    )
    started = time.perf_counter()
    trials: list[Trial] = []
    with (
        tempfile.TemporaryDirectory(prefix="stagewatch-bench-spool-") as tmp,
        harness.sqlite_database() as db_url,
        harness.running_server(db_url) as url,
    ):
        server_pid = _server_pid()
        down_url = f"http://127.0.0.1:{harness.free_port()}"
        runners: dict[str, Callable[[Training, int], Trial]] = {
            "none": lambda t, r: trial_none(t, r, server_pid),
            "up": lambda t, r: trial_up(t, r, url, Path(tmp) / f"up-{r}", server_pid),
            "up_httpx": lambda t, r: trial_up(t, r, url, Path(tmp) / f"httpx-{r}", server_pid, over_httpx=True),
            "down": lambda t, r: trial_down(
                t, r, down_url, Path(tmp) / f"down-{r}", server_pid, args.max_memory_points
            ),
        }
        rounds = [(-1 - w, warm_training) for w in range(args.warmup)] + [(r, training) for r in range(args.repeats)]
        for repeat, cfg in rounds:
            shift = max(repeat, 0) % len(conditions)
            order = conditions[shift:] + conditions[:shift]  # rotates: none up down, up down none, down none up
            for condition in order:
                trial = runners[condition](cfg, repeat)
                trials.append(trial)
                if trial.problems:
                    print(f"  {LABELS[condition]}, round {repeat}: {'; '.join(trial.problems)}", flush=True)
            if repeat >= 0:
                line = "  ".join(
                    f"{LABELS[t.condition]} {statistics.median(t.epoch_s) * 1e3:.1f} ms"
                    + (f" (other load {t.other_cores:.2f})" if t.other_cores is not None else "")
                    for t in trials[-len(conditions) :]
                )
                print(f"  round {repeat + 1}/{args.repeats}: median epoch  {line}", flush=True)
    wall_s = time.perf_counter() - started
    summary = summarize(trials, args.seed, conditions)
    targets = report(summary, args, steps_per_epoch)
    print(f"\n{len(trials)} trainings in {wall_s:.0f}s")
    harness.write_json(
        NAME,
        {
            "options": vars(args),
            "recipe": {
                "num_train": data.num_train,
                "steps_per_epoch": steps_per_epoch,
                "loop": "trainer.loop.fit",
                "config": {
                    "epochs": args.epochs,
                    "batch_size": BATCH_SIZE,
                    "momentum": MOMENTUM,
                    "weight_decay": WEIGHT_DECAY,
                    "seed": args.seed,
                    "schedule": "constant",
                },
                "lr": DEFAULT_LR,
                "step_keys": STEP_KEYS,
                "epoch_keys": EPOCH_KEYS,
            },
            "wall_s": wall_s,
            "summary": summary,
            "trials": [asdict(t) for t in trials],
            "targets": targets,
        },
    )
    return 0 if all(s["all_verified"] for s in summary.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
