"""Decision latency and live-event latency over loopback HTTP, against the real server in auto mode.

**Decision latency**: from ingesting the point that completes a detector's evidence to the worker holding the
command. Each trial is a real worker (``trainer.start_run(..., detector=AutoDecay, mode="auto")``: its sender
thread posts the points, its command thread keeps the long-poll ``GET /runs/{id}/commands`` open) that logs a
noise-free curve one epoch at a time: ``lr`` at every step and ``epoch/train_loss`` at the last step of each
epoch, then ``run.flush()``, so each epoch is one ``POST /metrics`` and the detector gets one new point per
request. Within a stage the loss is ``s^k * (1 + exp(-e / 1.5))`` (``k``: the stage, ``e``: the epoch in it,
``s`` = 0.6): it drops fast then flattens, and AutoDecay with ``min_stage=6, confirm=1,
min_window_blocks=3`` decides a decay every 6 to 8 epochs. A copy of the same detector, fed the same points in
the same order as the server's live detection does, says in advance which point completes the evidence; the
server's decision must be made at exactly that step (checked with ``GET /runs/{id}/decisions`` at the end).
When the command arrives the worker applies it to its simulated LR (``lr * factor``), acknowledges it with
``run.ack_command`` and goes on with the next stage, so the logged LR opens a new stage on the server.

Clocks (all ``time.perf_counter`` in this process): a wrapping ``httpx`` transport, shared by the run's two HTTP
clients (given a transport, the run sends its metric batches over httpx too, not libcurl), stamps the ``POST
/metrics`` that carries the completing point when it is handed to the connection (``send``) and when its response
body has been read (``response``), and every long-poll response when it has been read; a watcher thread calls
``run.pending_commands()`` every ``--poll-ms`` and stamps the first time each command is there (``held``). The
latency is ``held - response`` (the issue's "from ingesting the point"); ``held - send`` is reported too. The
server's own wall-clock stamps of the decision (proposed, delivered) split the time into its phases.

**Live-event latency**: two subscribers stream ``GET /api/v1/runs/{id}/stream`` and ``GET /api/v1/stream``
(Server-Sent Events) in their own threads while a producer posts small batches (``loss`` and ``lr`` for
``--event-batch`` steps) at ``--event-rate`` per second; each batch is matched with its ``points`` event by the
last step of ``loss``. Latency = event received - batch sent. Batches whose event never comes are counted.

    .venv/bin/python -m benchmarks.bench_latency [--engines sqlite,postgres] [--runs 10] [--decisions 250]
        [--events 1000] [--event-rate 20] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

from benchmarks import bench_replicas, harness
from server.detectors import Detector, make_detector
from trainer import Run, start_run

NAME = "latency"
TARGET_DECISION_P50_S = 0.020
TARGET_DECISION_P99_S = 0.100
TARGET_EVENT_P99_S = 0.100

METRIC = "epoch/train_loss"
LR_KEY = "lr"
DETECTOR_PARAMS: dict[str, Any] = {
    "min_stage": 6,
    "confirm": 1,
    "min_window_blocks": 3,
    "max_decays": 1000,
    "factor": 0.5,
}
DETECTOR: dict[str, Any] = {"name": "autodecay", "metric": METRIC, "params": DETECTOR_PARAMS}
LR0 = 0.1
STAGE_SCALE = 0.6  # each stage's curve is this times the previous one's
DROP_EPOCHS = 1.5  # the e-folding time of the drop within a stage, in epochs
MAX_EPOCHS_PER_STAGE = 40  # the detector decides within 8; far more means something is wrong
QUICK = {"runs": 2, "decisions": 20, "events": 100}
FULL = {"runs": 10, "decisions": 250, "events": 1000}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_latency", description=__doc__.split("\n")[0])
    harness.add_common_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="a smoke test: 2 runs, 20 decisions, 100 events")
    parser.add_argument("--runs", type=harness.positive_int, help="workers (runs), one after the other (default 10)")
    parser.add_argument(
        "--decisions", type=harness.positive_int, help="timed decisions in all, split over the runs (default 250)"
    )
    parser.add_argument("--steps-per-epoch", type=harness.positive_int, default=10, help="lr points per epoch")
    parser.add_argument(
        "--gap-ms",
        type=float,
        default=25.0,
        help="pause before each epoch is logged, so that the server is idle as between real epochs (default 25)",
    )
    parser.add_argument(
        "--poll-ms", type=float, default=0.2, help="how often the watcher reads run.pending_commands() (default 0.2)"
    )
    parser.add_argument(
        "--command-timeout", type=float, default=5.0, help="seconds to wait for an expected command (default 5)"
    )
    parser.add_argument("--events", type=harness.positive_int, help="timed live events (default 1000)")
    parser.add_argument("--event-rate", type=float, default=20.0, help="batches per second (default 20)")
    parser.add_argument("--event-batch", type=harness.positive_int, default=10, help="steps per batch (2 keys each)")
    parser.add_argument("--event-warmup", type=int, default=10, help="untimed batches first (default 10)")
    parser.add_argument(
        "--trace",
        action="store_true",
        help="run the server with timestamps on its hot path (ingest, live-detection pass, transactions, "
        "wakeups, command fetch, feed reads) and break each latency into the server's phases",
    )
    parser.add_argument(
        "--replicas",
        type=harness.bounded_int(8),
        default=1,
        help="PostgreSQL only: this many servers on the database behind the shipped HAProxy configuration "
        "(least connections: a worker's long-poll holds one replica, so its batches go to another)",
    )
    # The traced server (a child process).
    parser.add_argument("--serve-traced", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    return parser


def _option(args: argparse.Namespace, name: str) -> int:
    value: int | None = getattr(args, name)
    return value if value is not None else (QUICK if args.quick else FULL)[name]


def _summary(values: Sequence[float]) -> dict[str, float | int]:
    return {
        "count": len(values),
        "p50": harness.percentile(values, 50),
        "p90": harness.percentile(values, 90),
        "p99": harness.percentile(values, 99),
        "max": max(values) if values else math.nan,
        "mean": statistics.fmean(values) if values else math.nan,
    }


# --- the worker's clocks ------------------------------------------------------------------------------------


@dataclass
class Exchange:
    """One HTTP exchange as the transport saw it (perf_counter and wall clock at send and at response read)."""

    method: str
    path: str
    sent: float
    done: float
    wall_sent: float
    wall_done: float
    request: bytes
    response: bytes


class TimingTransport(httpx.BaseTransport):
    """The default transport, stamping metric posts and command polls; the response body is read here so that
    ``done`` is when the whole answer has arrived. Shared by the run's two clients: ``close`` does nothing and
    :meth:`shutdown` closes the pool once the run is closed (as in bench_train_overhead)."""

    def __init__(self) -> None:
        self._inner = httpx.HTTPTransport()
        self._lock = threading.Lock()
        self.exchanges: list[Exchange] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        watched = path.endswith("/metrics") or path.endswith("/commands")
        wall_sent, sent = time.time(), time.perf_counter()
        response = self._inner.handle_request(request)
        try:
            raw = b"".join(response.iter_raw())
        finally:
            response.close()
        done, wall_done = time.perf_counter(), time.time()
        if watched:
            exchange = Exchange(request.method, path, sent, done, wall_sent, wall_done, request.content, raw)
            with self._lock:
                self.exchanges.append(exchange)
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=httpx.ByteStream(raw),
            extensions=response.extensions,
            request=request,
        )

    def snapshot(self) -> list[Exchange]:
        with self._lock:
            return list(self.exchanges)

    def close(self) -> None:
        pass

    def shutdown(self) -> None:
        self._inner.close()


class CommandWatcher(threading.Thread):
    """Reads ``run.pending_commands()`` every ``poll_s`` (public API, no I/O) and stamps when each command id is
    first there: the moment a training loop checking between steps would hold it."""

    def __init__(self, run: Run, poll_s: float) -> None:
        super().__init__(name="bench-command-watcher", daemon=True)
        self._run = run
        self._poll_s = poll_s
        self._stop_event = threading.Event()
        self._cond = threading.Condition()
        self.first_seen: dict[int, tuple[float, float]] = {}  # id -> (perf_counter, wall clock)
        self.actions: dict[int, tuple[str, float | None]] = {}

    def run(self) -> None:
        sleep, pending, stopped = time.sleep, self._run.pending_commands, self._stop_event.is_set
        while not stopped():
            commands = pending()
            if commands:
                now, wall = time.perf_counter(), time.time()
                fresh = [c for c in commands if c.id not in self.first_seen]
                if fresh:
                    with self._cond:
                        for command in fresh:
                            self.first_seen[command.id] = (now, wall)
                            self.actions[command.id] = (command.action, command.factor)
                        self._cond.notify_all()
            sleep(self._poll_s)

    def wait_for_new(self, known: set[int], timeout: float) -> list[int]:
        """Ids first seen that are not in ``known``; waits up to ``timeout`` for one."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                new = sorted(set(self.first_seen) - known)
                left = deadline - time.monotonic()
                if new or left <= 0:
                    return new
                self._cond.wait(left)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


# --- decision latency ---------------------------------------------------------------------------------------


@dataclass
class DecisionTrial:
    run: int
    index: int  # the decision's rank in its run
    step: int  # the step of the completing point
    epochs_in_stage: int
    command_id: int | None = None
    send: float = math.nan  # perf_counter stamps
    response: float = math.nan
    poll_response: float = math.nan  # the long-poll response that carried the command, read
    held: float = math.nan
    wall_send: float = math.nan
    proposed_after_send_s: float = math.nan  # server clock minus the worker's wall clock at send
    delivered_after_send_s: float = math.nan
    via: str = ""  # which request brought the command to the worker: long-poll or ingest response

    @property
    def latency_s(self) -> float:
        return self.held - self.response

    @property
    def latency_from_send_s(self) -> float:
        return self.held - self.send


@dataclass
class RunOutcome:
    run_id: int | None
    trials: list[DecisionTrial] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    epochs: int = 0


def _loss(stage: int, epoch_in_stage: int) -> float:
    scale = STAGE_SCALE**stage
    return scale * (1.0 + math.exp(-epoch_in_stage / DROP_EPOCHS))


def _metric_step(body: bytes) -> int | None:
    """The step of the monitored metric in a metrics post, if it carries one."""
    try:
        batch = json.loads(body)
        steps = [int(p["step"]) for p in batch.get("points", ()) if p.get("key") == METRIC]
        steps += [int(step) for t in batch.get("tables", ()) if METRIC in t["keys"] for step in t["steps"]]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return max(steps) if steps else None


def _command_ids(body: bytes, field_name: str) -> list[int]:
    try:
        items = json.loads(body).get(field_name) or []
    except (ValueError, AttributeError):
        return []
    return [int(item["id"]) for item in items if isinstance(item, dict) and "id" in item]


def _parse_time(text: str | None) -> float:
    if not text:
        return math.nan
    stamp = dt.datetime.fromisoformat(text)
    if stamp.tzinfo is None:  # SQLite keeps no time zone; the server writes UTC
        stamp = stamp.replace(tzinfo=dt.UTC)
    return stamp.timestamp()


def decision_run(url: str, index: int, decisions: int, args: argparse.Namespace, spool: Path) -> RunOutcome:
    """One worker: logs stage after stage until ``decisions`` commands arrived and were applied."""
    transport = TimingTransport()
    replica: Detector[Any] = make_detector("autodecay", DETECTOR_PARAMS)
    outcome = RunOutcome(run_id=None)
    poll_s = args.poll_ms / 1e3
    gap_s = args.gap_ms / 1e3
    try:
        with start_run(
            url,
            name=f"latency-{index}",
            project="bench",
            detector=DETECTOR,
            mode="auto",
            spool_dir=spool,
            close_timeout_s=30.0,
            transport=transport,
        ) as run:
            outcome.run_id = run.id
            watcher = CommandWatcher(run, poll_s)
            watcher.start()
            try:
                _drive(run, replica, watcher, transport, outcome, decisions, args, gap_s)
            finally:
                watcher.stop()
            if not run.flush(timeout=30):
                outcome.problems.append("the final flush did not finish within 30 s")
    finally:
        transport.shutdown()
    if outcome.run_id is not None:
        _check_decisions(url, outcome)
    return outcome


def _drive(
    run: Run,
    replica: Detector[Any],
    watcher: CommandWatcher,
    transport: TimingTransport,
    outcome: RunOutcome,
    decisions: int,
    args: argparse.Namespace,
    gap_s: float,
) -> None:
    lr, stage, epoch_in_stage, step, epoch = LR0, 0, 0, 0, 0
    known: set[int] = set()
    while len(outcome.trials) < decisions:
        if epoch_in_stage > MAX_EPOCHS_PER_STAGE:
            outcome.problems.append(f"no decision after {epoch_in_stage} epochs of stage {stage}")
            return
        time.sleep(gap_s)
        for s in range(step + 1, step + args.steps_per_epoch):
            run.log({LR_KEY: lr}, step=s)
        step += args.steps_per_epoch
        epoch += 1
        value = _loss(stage, epoch_in_stage)
        run.log({LR_KEY: lr, METRIC: value}, step=step, epoch=float(epoch))
        # What the server's live detection does with this point: the LR first, then the value.
        if replica.lr != lr:
            replica.set_lr(lr)
        expected = replica.update(step, value)
        if not run.flush(timeout=30):
            outcome.problems.append(f"flush of step {step} did not finish within 30 s")
            return
        outcome.epochs += 1
        if not expected:
            epoch_in_stage += 1
            surprise = sorted(set(watcher.first_seen) - known)
            if surprise:
                outcome.problems.append(f"command(s) {surprise} arrived after step {step}, which decides nothing")
                return
            continue
        trial = DecisionTrial(outcome.run_id or 0, len(outcome.trials), step, epochs_in_stage=epoch_in_stage + 1)
        new = watcher.wait_for_new(known, args.command_timeout)
        if len(new) != 1:
            outcome.problems.append(
                f"step {step}: expected one command within {args.command_timeout:g} s, got {new or 'none'}"
            )
            return
        command_id = new[0]
        known.add(command_id)
        trial.command_id = command_id
        trial.held = watcher.first_seen[command_id][0]
        action, factor = watcher.actions[command_id]
        if action != "decay" or factor is None or factor != DETECTOR_PARAMS["factor"]:
            outcome.problems.append(f"command {command_id}: expected a decay by {DETECTOR_PARAMS['factor']}")
            return
        _stamp(trial, transport.snapshot(), step, command_id)
        outcome.trials.append(trial)
        lr *= factor
        run.ack_command(command_id, status="applied", step=step, lr=lr)
        stage, epoch_in_stage = stage + 1, 0


def _stamp(trial: DecisionTrial, exchanges: Sequence[Exchange], step: int, command_id: int) -> None:
    """The transport's stamps of the post that carried the completing point and of the answer that carried
    the command."""
    for exchange in exchanges:
        if exchange.method == "POST" and exchange.path.endswith("/metrics") and _metric_step(exchange.request) == step:
            trial.send, trial.response, trial.wall_send = exchange.sent, exchange.done, exchange.wall_sent
    for exchange in exchanges:
        if exchange.done < trial.send:
            continue
        if exchange.method == "GET" and command_id in _command_ids(exchange.response, "data"):
            trial.poll_response, trial.via = exchange.done, "long-poll"
            break
        if exchange.method == "POST" and command_id in _command_ids(exchange.response, "commands"):
            trial.poll_response, trial.via = exchange.done, "ingest response"
            break


def _check_decisions(url: str, outcome: RunOutcome) -> None:
    """The server decided exactly at the expected steps, and every decision went approved -> delivered ->
    applied; also takes the server's stamps of each."""
    with harness.http_client(url) as client:
        response = client.get(f"/api/v1/runs/{outcome.run_id}/decisions")
        harness.check_status(response)
    made = response.json()
    by_id = {int(d["id"]): d for d in made}
    steps = [int(d["step"]) for d in made]
    expected = [t.step for t in outcome.trials]
    if steps[: len(expected)] != expected:
        outcome.problems.append(f"the server decided at steps {steps}, the replica at {expected}")
    for trial in outcome.trials:
        decision = by_id.get(trial.command_id or -1)
        if decision is None:
            outcome.problems.append(f"command {trial.command_id} is not among the run's decisions")
            continue
        if decision["step"] != trial.step:
            outcome.problems.append(f"command {trial.command_id} was decided at step {decision['step']}")
        history = {h["status"]: _parse_time(h.get("at")) for h in decision["history"]}
        if decision["status"] != "applied" or "delivered" not in history or "approved" not in history:
            outcome.problems.append(f"decision {decision['id']}: status {decision['status']}, history {history}")
        trial.proposed_after_send_s = history.get("proposed", math.nan) - trial.wall_send
        trial.delivered_after_send_s = history.get("delivered", math.nan) - trial.wall_send


def bench_decisions(url: str, args: argparse.Namespace) -> dict[str, Any]:
    runs, total = _option(args, "runs"), _option(args, "decisions")
    per_run = [total // runs + (1 if i < total % runs else 0) for i in range(runs)]
    outcomes: list[RunOutcome] = []
    with tempfile.TemporaryDirectory(prefix="stagewatch-bench-spool-") as tmp:
        for i, count in enumerate(per_run):
            if count == 0:
                continue
            outcome = decision_run(url, i, count, args, Path(tmp) / f"run-{i}")
            outcomes.append(outcome)
            lat = [t.latency_s * 1e3 for t in outcome.trials]
            print(
                f"  run {i + 1}/{runs} (id {outcome.run_id}): {len(lat)} decisions in {outcome.epochs} epochs, "
                f"median {statistics.median(lat) if lat else math.nan:.1f} ms, max {max(lat, default=math.nan):.1f} ms"
                + (f"; PROBLEMS: {'; '.join(outcome.problems)}" if outcome.problems else ""),
                flush=True,
            )
    trials = [t for o in outcomes for t in o.trials]
    phases = {
        "ingest_request_s": [t.response - t.send for t in trials],
        "send_to_proposed_s": [t.proposed_after_send_s for t in trials],
        "proposed_to_delivered_s": [t.delivered_after_send_s - t.proposed_after_send_s for t in trials],
        "delivered_to_poll_response_s": [(t.poll_response - t.send) - t.delivered_after_send_s for t in trials],
        "poll_response_to_held_s": [t.held - t.poll_response for t in trials],
    }
    return {
        "runs": len(outcomes),
        "decisions": len(trials),
        "epochs": sum(o.epochs for o in outcomes),
        "problems": [p for o in outcomes for p in o.problems],
        "via": {v: sum(1 for t in trials if t.via == v) for v in sorted({t.via for t in trials})},
        "latency_s": {**_summary([t.latency_s for t in trials]), "all": [t.latency_s for t in trials]},
        "latency_from_send_s": _summary([t.latency_from_send_s for t in trials]),
        "phases": {name: _summary([v for v in values if math.isfinite(v)]) for name, values in phases.items()},
        "trials": [
            {**asdict(t), "latency_s": t.latency_s, "latency_from_send_s": t.latency_from_send_s} for t in trials
        ],
    }


# --- live-event latency -------------------------------------------------------------------------------------


class Subscriber(threading.Thread):
    """Streams an SSE endpoint and stamps each ``points`` event of ``run_id`` by the last step of ``loss``."""

    def __init__(self, url: str, path: str, run_id: int) -> None:
        super().__init__(name=f"bench-sse{path.replace('/', '-')}", daemon=True)
        self._url, self._path, self._run_id = url, path, run_id
        self.ready = threading.Event()
        self.stop_after: int | None = None  # the sentinel's last step: leave once it is seen
        self.received: dict[int, float] = {}
        self.events: dict[str, int] = {}
        self.error: str | None = None

    def run(self) -> None:
        timeout = httpx.Timeout(10.0, read=60.0)
        try:
            with (
                httpx.Client(base_url=self._url, timeout=timeout) as client,
                client.stream("GET", self._path) as response,
            ):
                harness.check_status(response)
                self._consume(response.iter_lines())
        except Exception as exc:  # reported with the results, never raised from a thread
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.ready.set()

    def _consume(self, lines: Iterator[str]) -> None:
        kind, data = "", ""
        for line in lines:
            if line:
                if line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:"):
                    data = line[5:].strip()
                continue
            now = time.perf_counter()  # a blank line ends the event
            self.events[kind] = self.events.get(kind, 0) + 1
            if kind == "hello":
                self.ready.set()
            elif kind == "points":
                payload = json.loads(data)
                loss = payload.get("keys", {}).get("loss")
                if payload.get("run_id") == self._run_id and loss is not None:
                    last = int(loss["last_step"])
                    self.received.setdefault(last, now)
                    if self.stop_after is not None and last >= self.stop_after:
                        return
            kind, data = "", ""


def _event_bodies(count: int, steps: int) -> list[tuple[int, bytes]]:
    bodies = []
    for i in range(count):
        first = i * steps
        points: list[dict[str, Any]] = []
        for step in range(first, first + steps):
            t = harness.BASE_TIME + step * harness.SECONDS_PER_STEP
            points.append({"key": "loss", "step": step, "value": 2.0 / (1.0 + step / 1000), "time": t})
            points.append({"key": "lr", "step": step, "value": 0.1, "time": t})
        bodies.append((first + steps - 1, harness.encode(points)))
    return bodies


def bench_events(url: str, args: argparse.Namespace) -> dict[str, Any]:
    count = _option(args, "events")
    warmup = max(0, args.event_warmup)
    bodies = _event_bodies(warmup + count + 1, args.event_batch)  # the last one is the sentinel
    period = 1.0 / args.event_rate
    with harness.http_client(url) as client:
        run_id = harness.create_run(client, "latency-events")
        subscribers = [
            Subscriber(url, f"/api/v1/runs/{run_id}/stream", run_id),
            Subscriber(url, "/api/v1/stream", run_id),
        ]
        for subscriber in subscribers:
            subscriber.start()
        for subscriber in subscribers:
            if not subscriber.ready.wait(10) or subscriber.error:
                raise RuntimeError(f"the live stream did not start: {subscriber.error}")
        sent: dict[int, tuple[float, float]] = {}
        start = time.perf_counter()
        for i, (last_step, body) in enumerate(bodies[:-1]):
            delay = start + i * period - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            before = time.perf_counter()
            response = harness.post_points(client, run_id, body)
            after = time.perf_counter()
            harness.check_status(response)
            if i >= warmup:
                sent[last_step] = (before, after)
        wall = time.perf_counter() - start
        sentinel_step, sentinel = bodies[-1]
        for subscriber in subscribers:
            subscriber.stop_after = sentinel_step
        time.sleep(1.0)  # stragglers, then the sentinel wakes each stream one last time
        harness.check_status(harness.post_points(client, run_id, sentinel))
        for subscriber in subscribers:
            subscriber.join(timeout=10)
    results: dict[str, Any] = {"run_id": run_id, "batches": len(sent), "wall_s": wall, "rate": len(sent) / wall}
    for name, subscriber in zip(("run_stream", "all_stream"), subscribers, strict=True):
        from_send = [subscriber.received[s] - t[0] for s, t in sent.items() if s in subscriber.received]
        from_response = [subscriber.received[s] - t[1] for s, t in sent.items() if s in subscriber.received]
        results[name] = {
            "path": subscriber._path,
            "received": len(from_send),
            "missing": [s for s in sent if s not in subscriber.received],
            "events_by_kind": subscriber.events,
            "error": subscriber.error,
            "latency_s": {**_summary(from_send), "all": from_send},
            "after_response_s": _summary(from_response),
        }
    ingest = [t[1] - t[0] for t in sent.values()]
    results["ingest_request_s"] = _summary(ingest)
    received = subscribers[0].received
    results["batches_timed"] = [
        {"last_step": s, "send": t[0], "response": t[1], "received": received.get(s, math.nan)} for s, t in sent.items()
    ]
    return results


# --- tracing the server (--trace) ---------------------------------------------------------------------------
#
# The server runs in a child process started like ``stagewatch serve`` (same CLI entry point, same uvicorn
# settings), with wrappers installed first that stamp the hot path with ``time.perf_counter`` -- CLOCK_MONOTONIC
# on Linux, the same clock in every process, so the stamps line up with the worker's. Nothing in ``server/``
# changes. ``GET /__latency/trace`` hands the stamps over.

TRACE_PATH = "/__latency/trace"
TRANSACTION_MODULES = (
    "server.routes.metrics",
    "server.routes.commands",
    "server.routes.stream",
    "server.routes.runs",
    "server.routes.decisions",
    "server.routes.history",
    "server.live.engine",
)


class Tracer:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []  # list.append is atomic: no lock on the hot path

    def add(self, kind: str, **fields: Any) -> None:
        fields["kind"] = kind
        fields["thread"] = threading.current_thread().name
        self.events.append(fields)

    def timed(self, owner: Any, name: str, kind: str, run_arg: int | None) -> None:
        """Wraps ``owner.name``: start and end, the run id (positional argument ``run_arg``) and, for a list
        result, its length."""
        original: Callable[..., Any] = getattr(owner, name)
        add, now = self.add, time.perf_counter

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0, result = now(), None
            try:
                result = original(*args, **kwargs)
                return result
            finally:
                run = args[run_arg] if run_arg is not None and len(args) > run_arg else None
                size = len(result) if isinstance(result, list) else None
                add(kind, run=run, t0=t0, t1=now(), n=size)

        setattr(owner, name, wrapper)

    def stamp(self, owner: Any, name: str, kind: str, run_arg: int) -> None:
        """Wraps ``owner.name``: the moment it is called, with the run id and a ``command`` keyword."""
        original: Callable[..., Any] = getattr(owner, name)
        add, now = self.add, time.perf_counter

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            add(kind, run=args[run_arg], t0=now(), command=bool(kwargs.get("command", False)))
            return original(*args, **kwargs)

        setattr(owner, name, wrapper)

    def transaction(self, where: str, original: Callable[..., Any]) -> Callable[..., Any]:
        """``server.db.transaction`` with stamps: asked (t0), begun (t1: SQLite's write lock is taken here),
        body done (t2), committed (t3)."""
        add, now = self.add, time.perf_counter

        @contextlib.contextmanager
        def traced(factory: Any, *, write: bool = False, **options: Any) -> Iterator[Any]:
            # Every other keyword (snapshot=, durable=, and any added later) passes through untouched: a
            # wrapper that named them all broke each pass that used a new one (durable=).
            t0, t1, t2 = now(), math.nan, math.nan
            try:
                with original(factory, write=write, **options) as session:
                    t1 = now()
                    try:
                        yield session
                    finally:
                        t2 = now()
            finally:
                add("tx", where=where, write=write, t0=t0, t1=t1, t2=t2, t3=now())

        return traced

    def wakeups(self) -> None:
        """Events handed out by ``Wakeups.subscribe`` stamp when their waiter resumes (``woken``)."""
        import asyncio

        import server.wakeups

        add, now = self.add, time.perf_counter

        class TracedEvent(asyncio.Event):
            key: int = -1

            async def wait(self) -> Literal[True]:
                result = await super().wait()
                add("woken", run=self.key, t0=now())
                return result

        subscribe = server.wakeups.Wakeups.subscribe

        @functools.wraps(subscribe)
        def traced_subscribe(self: Any, key: int) -> asyncio.Event:
            event = subscribe(self, key)
            event.__class__ = TracedEvent
            event.key = key  # type: ignore[attr-defined]
            return event

        server.wakeups.Wakeups.subscribe = traced_subscribe  # type: ignore[method-assign]

    def install(self) -> None:
        import importlib

        import server.app
        import server.live.engine as engine
        import server.routes.commands as command_routes
        import server.routes.metrics as metric_routes
        import server.routes.stream as stream_routes
        from server.state import AppState

        self.timed(metric_routes, "_ingest", "ingest", 1)  # (state, run_id, body)
        self.timed(command_routes, "_take", "take", 1)  # (state, run_id, after)
        self.timed(stream_routes, "_read", "feed_read", 2)  # (state, after, run_id)
        self.timed(engine.LiveDetection, "_pass", "pass", 1)  # (self, run_id)
        self.timed(engine.LiveDetection, "_sweep", "sweep", None)
        self.timed(engine, "process_run", "process_run", 1)  # (session, run_id)
        self.stamp(engine.LiveDetection, "notify", "notify", 1)
        self.stamp(AppState, "announce", "announce", 1)  # runs on the event loop
        self.wakeups()
        for name in TRANSACTION_MODULES:
            module = importlib.import_module(name)
            setattr(module, "transaction", self.transaction(name, module.transaction))  # noqa: B010
        create_app = server.app.create_app
        events = self.events

        def create_traced_app(*args: Any, **kwargs: Any) -> Any:
            app = create_app(*args, **kwargs)

            @app.get(TRACE_PATH, include_in_schema=False)
            def trace() -> list[dict[str, Any]]:
                return list(events)

            return app

        server.app.create_app = create_traced_app


def serve_traced(args: argparse.Namespace) -> int:
    Tracer().install()
    from server.cli import main as cli_main

    # uvicorn re-raises SIGTERM once it has shut down: end quietly instead of dying of it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    return cli_main(["serve", "--db", args.db, "--port", str(args.port), "--no-auth"])


@contextlib.contextmanager
def traced_server(db_url: str) -> Iterator[str]:
    harness.migrate(db_url)
    port = harness.free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "benchmarks.bench_latency", "--serve-traced", "--db", db_url, "--port", str(port)]
    with tempfile.TemporaryDirectory(prefix="stagewatch-bench-log-") as logdir:
        log_path = Path(logdir) / "server.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=harness.REPO_ROOT)
            try:
                harness.wait_healthy(process, base, log_path)
                yield base
            finally:
                harness.stop_server(process)


def fetch_trace(url: str) -> list[dict[str, Any]]:
    with harness.http_client(url) as client:
        response = client.get(TRACE_PATH)
        harness.check_status(response)
    events: list[dict[str, Any]] = response.json()
    return events


class Timeline:
    """The traced events of one run, to find the ones that belong to one trial."""

    def __init__(self, events: Sequence[dict[str, Any]], run_id: int) -> None:
        self.run = [e for e in events if e.get("run") == run_id]
        self.tx = [e for e in events if e["kind"] == "tx"]

    def first(self, kind: str, after: float, *, before: float = math.inf, **match: Any) -> dict[str, Any] | None:
        for event in self.run:
            matches = all(event.get(k) == v if v is not None else event.get(k) for k, v in match.items())
            if event["kind"] == kind and after <= event["t0"] <= before and matches:
                return event
        return None

    def last(self, kind: str, before: float) -> dict[str, Any] | None:
        found = None
        for event in self.run:
            if event["kind"] == kind and event["t0"] <= before:
                found = event
        return found

    def tx_in(self, span: dict[str, Any], where: str) -> dict[str, Any] | None:
        for event in self.tx:
            if (
                event["where"] == where
                and event["thread"] == span["thread"]
                and span["t0"] <= event["t0"] <= span["t1"]
            ):
                return event
        return None


Event = dict[str, Any] | None


def _gap(later: Event, later_key: str, earlier: Event, earlier_key: str) -> float:
    """``later[later_key] - earlier[earlier_key]``; NaN when either event was not found."""
    if later is None or earlier is None:
        return math.nan
    return float(later[later_key]) - float(earlier[earlier_key])


DECISION_PHASES = (
    ("send -> ingest starts (HTTP, body, thread pool)", "ingest_start"),
    ("ingest: write lock (BEGIN)", "ingest_lock"),
    ("ingest: validate, insert, commit", "ingest_work"),
    ("ingest done -> notify (back on the event loop)", "to_notify"),
    ("notify -> pass starts (live-detection thread)", "to_pass"),
    ("pass: write lock (BEGIN)", "pass_lock"),
    ("pass: process_run (reads, detector, writes)", "pass_work"),
    ("pass: commit", "pass_commit"),
    ("commit -> announce on the event loop", "to_announce"),
    ("announce -> long-poll coroutine resumes", "to_woken"),
    ("resumed -> command fetch starts (thread pool)", "to_take"),
    ("fetch: write lock (BEGIN)", "take_lock"),
    ("fetch: read, mark delivered, commit", "take_work"),
    ("fetch done -> response read by the worker", "to_worker"),
    ("response read -> in pending_commands()", "to_held"),
)


def decision_phases(trial: dict[str, Any], timeline: Timeline) -> dict[str, float]:
    send, response = trial["send"], trial["response"]
    ingest = timeline.first("ingest", send, before=response)
    take = timeline.first("take", ingest["t1"] if ingest else send, n=None)
    if ingest is None or take is None:
        return {}
    notify = timeline.first("notify", ingest["t1"])
    passed = timeline.last("pass", take["t0"])
    announce = timeline.first("announce", passed["t0"] if passed else ingest["t1"], command=True)
    itx = timeline.tx_in(ingest, "server.routes.metrics")
    ptx = timeline.tx_in(passed, "server.live.engine") if passed else None
    ttx = timeline.tx_in(take, "server.routes.commands")
    woken = timeline.first("woken", announce["t0"], before=take["t0"]) if announce else None
    work = timeline.first("process_run", passed["t0"], before=passed["t1"]) if passed else None
    return {
        "ingest_start": ingest["t0"] - send,
        "ingest_lock": _gap(itx, "t1", itx, "t0"),
        "ingest_work": ingest["t1"] - ingest["t0"] - _gap(itx, "t1", itx, "t0"),
        "to_notify": _gap(notify, "t0", ingest, "t1"),
        "to_pass": _gap(passed, "t0", notify, "t0"),
        "pass_lock": _gap(ptx, "t1", ptx, "t0"),
        "pass_work": _gap(work, "t1", work, "t0"),
        "pass_commit": _gap(ptx, "t3", ptx, "t2"),
        "to_announce": _gap(announce, "t0", ptx, "t3"),
        "to_woken": _gap(woken, "t0", announce, "t0"),
        "to_take": _gap(take, "t0", woken, "t0"),
        "take_lock": _gap(ttx, "t1", ttx, "t0"),
        "take_work": _gap(take, "t1", ttx, "t1"),
        "to_worker": trial["poll_response"] - take["t1"],
        "to_held": trial["held"] - trial["poll_response"],
    }


EVENT_PHASES = (
    ("send -> ingest starts (HTTP, body, thread pool)", "ingest_start"),
    ("ingest: write lock (BEGIN)", "ingest_lock"),
    ("ingest: validate, insert, commit", "ingest_work"),
    ("ingest done -> announce (event loop)", "to_announce"),
    ("announce -> stream coroutine resumes", "to_woken"),
    ("resumed -> feed read starts (thread pool)", "to_read"),
    ("feed read", "read"),
    ("feed read done -> event received", "to_client"),
)


def event_phases(batch: dict[str, Any], timeline: Timeline, run_id: int) -> dict[str, float]:
    ingest = timeline.first("ingest", batch["send"], before=batch["response"])
    if ingest is None or not math.isfinite(batch["received"]):
        return {}
    announce = timeline.first("announce", ingest["t1"])
    read = None
    for event in timeline.run:  # the run stream's read that returned this batch's event
        if event["kind"] == "feed_read" and event["t0"] >= ingest["t1"] and event["n"]:
            read = event
            break
    if read is None or read["run"] != run_id:
        return {}
    itx = timeline.tx_in(ingest, "server.routes.metrics")
    woken = timeline.first("woken", announce["t0"], before=read["t0"]) if announce else None
    return {
        "ingest_start": ingest["t0"] - batch["send"],
        "ingest_lock": _gap(itx, "t1", itx, "t0"),
        "ingest_work": ingest["t1"] - ingest["t0"] - _gap(itx, "t1", itx, "t0"),
        "to_announce": _gap(announce, "t0", ingest, "t1"),
        "to_woken": _gap(woken, "t0", announce, "t0"),
        "to_read": _gap(read, "t0", woken, "t0"),
        "read": read["t1"] - read["t0"],
        "to_client": batch["received"] - read["t1"],
    }


def analyse_trace(events: Sequence[dict[str, Any]], decisions: dict[str, Any], live: dict[str, Any]) -> dict[str, Any]:
    timelines: dict[int, Timeline] = {}

    def timeline(run_id: int) -> Timeline:
        if run_id not in timelines:
            timelines[run_id] = Timeline(events, run_id)
        return timelines[run_id]

    per_trial = [(t, decision_phases(t, timeline(t["run"]))) for t in decisions["trials"]]
    per_batch = [(b, event_phases(b, timeline(live["run_id"]), live["run_id"])) for b in live["batches_timed"]]
    slowest = sorted(per_trial, key=lambda tp: -tp[0]["latency_s"])[:5]
    passes = [e["t1"] - e["t0"] for e in events if e["kind"] == "pass"]
    sweeps = [e["t1"] - e["t0"] for e in events if e["kind"] == "sweep"]
    locks = {
        where: [e["t1"] - e["t0"] for e in events if e["kind"] == "tx" and e["where"] == where and e["write"]]
        for where in sorted({e["where"] for e in events if e["kind"] == "tx"})
    }
    return {
        "decision_phases": {
            key: _summary([p[key] for _, p in per_trial if p and math.isfinite(p[key])]) for _, key in DECISION_PHASES
        },
        "decisions_traced": sum(1 for _, p in per_trial if p),
        "slowest_decisions": [
            {"step": t["step"], "run": t["run"], "latency_s": t["latency_s"], "phases": p} for t, p in slowest
        ],
        "event_phases": {
            key: _summary([p[key] for _, p in per_batch if p and math.isfinite(p[key])]) for _, key in EVENT_PHASES
        },
        "events_traced": sum(1 for _, p in per_batch if p),
        "pass_s": _summary(passes),
        "sweep_s": _summary(sweeps),
        "write_lock_wait_s": {where: _summary(v) for where, v in locks.items() if v},
    }


def report_trace(results: Sequence[dict[str, Any]]) -> None:
    stats = ("p50", "p90", "p99", "max")
    for r in results:
        trace = r.get("trace")
        if not trace:
            continue
        engine = r["engine"]
        harness.print_table(
            f"{engine}: decision latency by server phase, traced ({trace['decisions_traced']} decisions, ms)",
            ["phase", *stats],
            [[label, *_ms(trace["decision_phases"][key], *stats)] for label, key in DECISION_PHASES],
        )
        harness.print_table(
            f"{engine}: the 5 slowest decisions by phase (ms)",
            ["phase", *(f"step {s['step']}" for s in trace["slowest_decisions"])],
            [["total (from the ingest response)", *(s["latency_s"] * 1e3 for s in trace["slowest_decisions"])]]
            + [
                [label, *(s["phases"].get(key, math.nan) * 1e3 for s in trace["slowest_decisions"])]
                for label, key in DECISION_PHASES
            ],
        )
        harness.print_table(
            f"{engine}: live-event latency by server phase, run stream, traced ({trace['events_traced']} events, ms)",
            ["phase", *stats],
            [[label, *_ms(trace["event_phases"][key], *stats)] for label, key in EVENT_PHASES],
        )
        harness.print_table(
            f"{engine}: live-detection passes, sweeps and write-lock waits (BEGIN of write transactions, ms)",
            ["what", "count", *stats],
            [["live-detection pass", trace["pass_s"]["count"], *_ms(trace["pass_s"], *stats)]]
            + [["auto-approval sweep", trace["sweep_s"]["count"], *_ms(trace["sweep_s"], *stats)]]
            + [
                [f"write lock: {where}", summary["count"], *_ms(summary, *stats)]
                for where, summary in trace["write_lock_wait_s"].items()
            ],
        )


# --- report -------------------------------------------------------------------------------------------------


class LoadMeter:
    """CPUs kept busy, on average between ``start`` and ``stop``, by this process, by the server and by
    everything else (other processes, steal; with Postgres its backends count there). Linux ``/proc``."""

    def __init__(self) -> None:
        self._server = self._server_pid()
        self._start = self._sample()

    @staticmethod
    def _server_pid() -> int | None:
        me = os.getpid()
        for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
            try:
                if not entry.name.isdigit():
                    continue
                stat, cmdline = (entry / "stat").read_text(), (entry / "cmdline").read_bytes()
                if int(stat.rsplit(")", 1)[1].split()[1]) == me and b"serve" in cmdline:
                    return int(entry.name)
            except (OSError, ValueError, IndexError):
                continue
        return None

    def _sample(self) -> tuple[float, float, float, float] | None:
        try:
            tick = os.sysconf("SC_CLK_TCK")
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
            machine = (sum(fields) - fields[3] - fields[4]) / tick  # all but idle and iowait
            own = sum(os.times()[:2])
            server = 0.0
            if self._server is not None:
                stat = Path(f"/proc/{self._server}/stat").read_text().rsplit(")", 1)[1].split()
                server = (int(stat[11]) + int(stat[12])) / tick
        except (OSError, ValueError, IndexError):
            return None
        return time.monotonic(), machine, own, server

    def stop(self) -> dict[str, float | None]:
        end = self._sample()
        if end is None or self._start is None:
            return {"benchmark_cpus": None, "server_cpus": None, "other_cpus": None}
        wall = end[0] - self._start[0]
        machine, own, server = (end[i] - self._start[i] for i in (1, 2, 3))
        return {
            "benchmark_cpus": own / wall,
            "server_cpus": server / wall,
            "other_cpus": max(0.0, machine - own - server) / wall,
        }


def bench_engine(engine: str, args: argparse.Namespace) -> dict[str, Any]:
    trace: dict[str, Any] | None = None
    with contextlib.ExitStack() as stack:
        db_url = stack.enter_context(harness.database(engine, args.postgres_url))
        if args.replicas > 1:
            harness.migrate(db_url)
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="stagewatch-latency-")))
            url, _ = stack.enter_context(bench_replicas.topology(db_url, args.replicas, directory, auth=False))
        else:
            url = stack.enter_context(traced_server(db_url) if args.trace else harness.running_server(db_url))
        print(f"[latency] {engine}: decisions ...", flush=True)
        meter = LoadMeter()
        decisions = bench_decisions(url, args)
        decisions["load"] = meter.stop()
        print(f"[latency] {engine}: live events ...", flush=True)
        meter = LoadMeter()
        events = bench_events(url, args)
        events["load"] = meter.stop()
        print(f"  load: decisions {_load_text(decisions['load'])}; live events {_load_text(events['load'])}")
        if args.trace:
            trace = analyse_trace(fetch_trace(url), decisions, events)
    del events["batches_timed"]  # only the trace needs them; the latencies are in events[...]["latency_s"]
    return {
        "engine": engine,
        "engine_version": harness.engine_version(engine, args.postgres_url),
        "decisions": decisions,
        "events": events,
        "trace": trace,
    }


def _load_text(load: dict[str, float | None]) -> str:
    if load["other_cpus"] is None:
        return "not measured"
    return (
        f"benchmark {load['benchmark_cpus']:.2f}, server {load['server_cpus']:.2f}, "
        f"other processes {load['other_cpus']:.2f} CPUs (of {os.cpu_count()})"
    )


def _ms(summary: dict[str, Any], *names: str) -> list[float]:
    return [float(summary[n]) * 1e3 for n in names]


def report(results: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], bool]:
    stats = ("p50", "p90", "p99", "max")
    harness.print_table(
        "Decision latency: completing point ingested -> command in run.pending_commands() (auto mode, ms)",
        ["engine / from", "decisions", "p50", "p90", "p99", "max"],
        [
            [f"{r['engine']}: ingest {label}", r["decisions"]["decisions"], *_ms(r["decisions"][key], *stats)]
            for r in results
            for label, key in (("response", "latency_s"), ("sent", "latency_from_send_s"))
        ],
    )
    harness.print_table(
        "Where the decision time goes, from the ingest request sent (server stamps are wall clock, ms)",
        ["engine / phase", "p50", "p90", "p99", "max"],
        [
            [f"{r['engine']}: {name.removesuffix('_s').replace('_', ' ')}", *_ms(summary, *stats)]
            for r in results
            for name, summary in r["decisions"]["phases"].items()
        ],
    )
    harness.print_table(
        "Live events: batch sent -> its points event received by an SSE subscriber (ms)",
        ["engine / stream", "events", "missing", "p50", "p90", "p99", "max", "p50 after resp"],
        [
            [
                f"{r['engine']}: {r['events'][s]['path']}",
                r["events"][s]["received"],
                len(r["events"][s]["missing"]),
                *_ms(r["events"][s]["latency_s"], *stats),
                r["events"][s]["after_response_s"]["p50"] * 1e3,
            ]
            for r in results
            for s in ("run_stream", "all_stream")
        ],
    )
    targets: dict[str, Any] = {}
    ok = True
    for r in results:
        engine, dec, ev = r["engine"], r["decisions"], r["events"]
        checks = [
            ("decision_p50_s", "decision p50", dec["latency_s"]["p50"], TARGET_DECISION_P50_S),
            ("decision_p99_s", "decision p99", dec["latency_s"]["p99"], TARGET_DECISION_P99_S),
            ("event_p99_s", "live event p99", ev["run_stream"]["latency_s"]["p99"], TARGET_EVENT_P99_S),
        ]
        for key, label, value, target in checks:
            met = harness.target_line(f"{engine} {label}", value * 1e3, target * 1e3, "ms", higher_is_better=False)
            targets[f"{engine}_{key}"] = {"target": target, "value": value, "met": met, "unit": "s"}
        if dec["problems"]:
            ok = False
            print(f"{engine}: decision trials had problems (their numbers do not count): {dec['problems']}")
        missing = {s: len(ev[s]["missing"]) for s in ("run_stream", "all_stream") if ev[s]["missing"]}
        if missing or any(ev[s]["error"] for s in ("run_stream", "all_stream")):
            ok = False
            errors = [ev[s]["error"] for s in ("run_stream", "all_stream")]
            print(f"{engine}: live events lost {missing} (errors: {errors})")
    return targets, ok


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.serve_traced:
        return serve_traced(args)
    if args.replicas > 1 and (args.engines != ["postgres"] or args.trace):
        raise SystemExit("--replicas needs --engines postgres (SQLite is one process's file) and no --trace")
    harness.snapshot_code()
    results = []
    for engine in args.engines:
        results.append(bench_engine(engine, args))
    report_trace(results)
    targets, ok = report(results)
    options = {**vars(args), **{name: _option(args, name) for name in ("runs", "decisions", "events")}}
    options["detector"] = DETECTOR
    name = NAME if args.replicas == 1 else f"{NAME}-replicas{args.replicas}"
    harness.write_json(name, {"options": options, "results": results, "targets": targets})
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
