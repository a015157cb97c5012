"""Several replicas on one PostgreSQL database behind HAProxy, under load, one replica SIGKILLed mid-run.

For each topology -- ``--replicas`` N, then 1 (the comparison), each behind Debian's HAProxy with the shipped
``deploy/haproxy.cfg`` (plus one ``server`` line per replica past the second) -- on a fresh PostgreSQL database:

* N ``stagewatch serve`` processes with authentication on; a worker and an operator token made with the CLI;
* W runs created through the balancer, each with AutoDecay in observe mode on ``loss``: live detection works on
  every run;
* W workers (asyncio, one keep-alive connection each) post one batch of P points (4 keys) per second for D
  seconds through the balancer. A batch that fails -- its connection cut by the kill, a 502/503 from the
  balancer -- is sent again until it is stored, as the real client does (ingest is idempotent); its latency runs
  from its first attempt, and the retries are counted;
* at ``--kill-at`` seconds replica 1 is SIGKILLed and started again on its port at once (its downtime is
  recorded; with one replica the balancer has nowhere else to go meanwhile);
* one live-event subscriber on ``/api/v1/stream`` through the balancer: for each batch, the time from its first
  send to its ``points`` event (matched by run and last step);
* at D/2 seconds an operator ``decay`` for every run, posted through the balancer; from then on each worker
  long-polls its commands (``wait=5``), acknowledges each command id once, and keeps polling until every command
  was delivered (or none was for 30 s):
  counted are commands never delivered and commands delivered again after their acknowledgement (a worker that
  did not deduplicate would apply those twice);
* at the end every run is exported (CSV) and its points counted: stored must equal sent, and no step is there
  twice.

Only 127.0.0.1 is contacted; sizes are bounded (workers <= 500, points <= 10,000, seconds <= 600).

    .venv/bin/python -m benchmarks.bench_replicas [--replicas 3] [--workers 200] [--points 100] [--seconds 60]
        [--kill-at 20] [--out NAME]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from benchmarks import harness
from benchmarks.bench_load import KEYS, MachineSampler, batch_bodies

NAME = "replicas"
HOST = "127.0.0.1"
HAPROXY_CONFIG = harness.REPO_ROOT / "deploy" / "haproxy.cfg"
DETECTOR = {"name": "autodecay", "metric": "loss"}
REQUEST_TIMEOUT_S = 60.0
RETRY_PAUSE_S = 0.05  # between attempts of one batch (the real client backs off exponentially from 0.5 s)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_replicas", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--replicas", type=harness.bounded_int(8), default=3, help="replicas behind the balancer (default 3)"
    )
    parser.add_argument("--workers", type=harness.bounded_int(500), default=200, help="simulated workers (default 200)")
    parser.add_argument(
        "--points", type=harness.bounded_int(10_000), default=100, help="points per batch (default 100)"
    )
    parser.add_argument("--seconds", type=harness.bounded_int(600), default=60, help="batches per worker (default 60)")
    parser.add_argument("--kill-at", type=float, default=20.0, help="SIGKILL replica 1 at this second (default 20)")
    parser.add_argument("--no-single", action="store_true", help="skip the one-replica comparison")
    parser.add_argument("--postgres-url", default=harness.POSTGRES_ADMIN)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", default="default", help="results go to benchmarks/results/replicas-NAME.json")
    return parser


# --- the topology -------------------------------------------------------------------------------------------------


@dataclass
class Replica:
    db_url: str
    log_path: Path
    auth: bool = True
    port: int = field(default_factory=harness.free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> None:
        command = [str(harness.stagewatch_script()), "serve", "--db", self.db_url, "--host", HOST]
        command += ["--port", str(self.port), *([] if self.auth else ["--no-auth"])]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=harness.server_env(None))
        harness.wait_healthy(self.process, self.url, self.log_path)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            harness.stop_server(self.process)


def balancer_config(replicas: int, directory: Path) -> Path:
    """The shipped configuration, with a ``server`` line for each replica past the two it names."""
    text = HAPROXY_CONFIG.read_text()
    extra = "".join(f'    server replica-{i} "${{STAGEWATCH_REPLICA_{i}}}"\n' for i in range(3, replicas + 1))
    path = directory / "haproxy.cfg"
    path.write_text(text.rstrip("\n") + "\n" + extra)
    return path


@contextlib.contextmanager
def topology(db_url: str, count: int, directory: Path, *, auth: bool = True) -> Iterator[tuple[str, list[Replica]]]:
    """``count`` replicas behind HAProxy (the database already migrated); yields the balancer's URL and the
    replicas."""
    replicas = [Replica(db_url, directory / f"replica-{i}.log", auth) for i in range(1, count + 1)]
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    port = harness.free_port()
    env = {**os.environ, "STAGEWATCH_BIND": f"{HOST}:{port}"}
    # With one replica, the second line of the shipped file points at the same one (a config needs it set).
    env.update({f"STAGEWATCH_REPLICA_{i}": f"{HOST}:{replicas[min(i, count) - 1].port}" for i in range(1, 3)})
    env.update({f"STAGEWATCH_REPLICA_{i}": f"{HOST}:{r.port}" for i, r in enumerate(replicas, start=1)})
    balancer: subprocess.Popen[bytes] | None = None
    try:
        for replica in replicas:
            replica.start()
        config = balancer_config(count, directory)
        with (directory / "haproxy.log").open("ab") as log:
            balancer = subprocess.Popen([haproxy, "-db", "-f", str(config)], env=env, stdout=log, stderr=log)
        url = f"http://{HOST}:{port}"
        harness.wait_healthy(balancer, url, directory / "haproxy.log")
        yield url, replicas
    finally:
        if balancer is not None:
            balancer.terminate()
            balancer.wait(timeout=10)
        for replica in replicas:
            replica.stop()


# --- the load -----------------------------------------------------------------------------------------------------


@dataclass
class WorkerLog:
    run_id: int
    sent_points: int = 0
    latencies: list[float] = field(default_factory=list)
    first_sent: dict[int, float] = field(default_factory=dict)  # batch's last step -> monotonic first attempt
    retries: int = 0
    failures: list[str] = field(default_factory=list)
    commands: dict[int, int] = field(default_factory=dict)  # command id -> times delivered after its ack


def client_for(url: str, token: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=url,
        headers={"content-type": "application/json", "Authorization": f"Bearer {token}"},
        timeout=httpx.Timeout(REQUEST_TIMEOUT_S, connect=10.0),
        limits=httpx.Limits(max_connections=2, max_keepalive_connections=2),
    )


async def send_batch(client: httpx.AsyncClient, log: WorkerLog, body: bytes, last_step: int, points: int) -> None:
    started = time.monotonic()
    log.first_sent[last_step] = started
    while True:
        try:
            response = await client.post(f"/api/v1/runs/{log.run_id}/metrics", content=body)
            if response.status_code == 200:
                break
            reason = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            reason = type(exc).__name__
        log.retries += 1
        if len(log.failures) < 3:
            log.failures.append(reason)
        if time.monotonic() - started > REQUEST_TIMEOUT_S * 2:
            raise RuntimeError(f"run {log.run_id}: a batch was not stored in {REQUEST_TIMEOUT_S * 2:.0f} s: {reason}")
        await asyncio.sleep(RETRY_PAUSE_S)
    log.latencies.append(time.monotonic() - started)
    log.sent_points += points


async def worker(
    client: httpx.AsyncClient, log: WorkerLog, bodies: Sequence[bytes], steps: int, t0: float, phase: float
) -> None:
    points = steps * len(KEYS)
    for k, body in enumerate(bodies):
        delay = t0 + phase + k - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await send_batch(client, log, body, (k + 1) * steps - 1, points)


async def command_poller(client: httpx.AsyncClient, log: WorkerLog, start: float, done: asyncio.Event) -> None:
    """From ``start`` until ``done``: long-polls, acknowledges each command once; a command delivered again after
    its acknowledgement is counted."""
    await asyncio.sleep(max(0.0, start - time.monotonic()))
    while not done.is_set():
        try:
            response = await client.get(f"/api/v1/runs/{log.run_id}/commands", params={"wait": 5})
            if response.status_code != 200:
                await asyncio.sleep(RETRY_PAUSE_S)
                continue
            for command in response.json()["data"]:
                if command["id"] in log.commands:
                    log.commands[command["id"]] += 1  # its ack went through, yet it came again
                    continue
                ack = {"status": "applied", "step": 0, "lr": 0.01}
                while True:
                    acked = await client.post(f"/api/v1/runs/{log.run_id}/commands/{command['id']}/ack", json=ack)
                    if acked.status_code == 200:
                        break
                    await asyncio.sleep(RETRY_PAUSE_S)
                log.commands[command["id"]] = 0
        except httpx.HTTPError:
            await asyncio.sleep(RETRY_PAUSE_S)


async def subscriber(url: str, token: str, arrivals: dict[tuple[int, int], float], stop: asyncio.Event) -> None:
    """The all-runs stream through the balancer; reconnects (from its last event id) when it is cut."""
    last_id = None
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(30.0, connect=10.0)) as client:
        while not stop.is_set():
            headers = {"Authorization": f"Bearer {token}", **({"Last-Event-ID": last_id} if last_id else {})}
            try:
                async with client.stream("GET", "/api/v1/stream", headers=headers) as response:
                    event = ""
                    async for line in response.aiter_lines():
                        if line.startswith("id: "):
                            last_id = line[4:]
                        elif line.startswith("event: "):
                            event = line[7:]
                        elif line.startswith("data: ") and event == "points":
                            data = orjson.loads(line[6:])
                            loss = data.get("keys", {}).get("loss")
                            if loss is not None:
                                arrivals.setdefault((data["run_id"], loss["last_step"]), time.monotonic())
                        if stop.is_set():
                            return
            except httpx.HTTPError:
                await asyncio.sleep(RETRY_PAUSE_S)


async def kill_and_restart(replica: Replica, at: float, record: dict[str, float]) -> None:
    await asyncio.sleep(max(0.0, at - time.monotonic()))
    killed = time.monotonic()
    replica.kill()
    await asyncio.to_thread(replica.start)
    record["downtime_s"] = time.monotonic() - killed


async def post_commands(url: str, token: str, run_ids: Sequence[int], at: float) -> list[int]:
    """One ``decay`` per run, posted at ``at``, 20 at a time, each retried until the balancer took it."""
    await asyncio.sleep(max(0.0, at - time.monotonic()))
    headers = {"Authorization": f"Bearer {token}"}
    gate = asyncio.Semaphore(20)

    async def post(client: httpx.AsyncClient, run_id: int) -> int:
        async with gate:
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    response = await client.post(
                        f"/api/v1/runs/{run_id}/commands", json={"action": "decay", "factor": 0.5}
                    )
                    if response.status_code == 201:
                        command_id: int = response.json()["id"]
                        return command_id
                await asyncio.sleep(RETRY_PAUSE_S)

    limits = httpx.Limits(max_connections=20)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        return list(await asyncio.gather(*(post(client, run_id) for run_id in run_ids)))


async def settle(condition: Any, quiet_s: float, progress: Any) -> None:
    """Waits until ``condition()``, or until ``progress()`` has not changed for ``quiet_s`` (bounded: whatever
    is still missing then is counted as missing)."""
    last, since = progress(), time.monotonic()
    while not condition():
        await asyncio.sleep(0.1)
        now = progress()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > quiet_s:
            return


async def load(
    url: str, tokens: dict[str, str], replicas: list[Replica], run_ids: list[int], args: argparse.Namespace
) -> dict[str, Any]:
    bodies, _ = batch_bodies(KEYS, args.points, args.seconds, args.seed)
    steps = max(1, args.points // len(KEYS))
    rng = random.Random(args.seed)
    logs = [WorkerLog(run_id) for run_id in run_ids]
    arrivals: dict[tuple[int, int], float] = {}
    stop = asyncio.Event()
    kill: dict[str, float] = {}
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(client_for(url, tokens["worker"])) for _ in logs]
        listening = asyncio.create_task(subscriber(url, tokens["operator"], arrivals, stop))
        t0 = time.monotonic() + 1.0
        done = asyncio.Event()
        halfway = t0 + args.seconds / 2
        tasks = [
            asyncio.create_task(worker(c, log, bodies, steps, t0, rng.random()))
            for c, log in zip(clients, logs, strict=True)
        ]
        pollers = [
            asyncio.create_task(command_poller(c, log, halfway, done)) for c, log in zip(clients, logs, strict=True)
        ]
        posting = asyncio.create_task(post_commands(url, tokens["operator"], run_ids, halfway))
        killing = asyncio.create_task(kill_and_restart(replicas[0], t0 + args.kill_at, kill))
        await asyncio.gather(*tasks, killing)
        wall = time.monotonic() - t0
        command_ids = await posting
        # Every command delivered, or 30 s without a new delivery; then the stream's stragglers, the same way.
        await settle(lambda: len(command_ids) == sum(len(log.commands) for log in logs), 30.0,
                     lambda: sum(len(log.commands) for log in logs))  # fmt: skip
        done.set()
        await asyncio.gather(*pollers)
        batches = sum(len(log.first_sent) for log in logs)
        await settle(lambda: len(arrivals) >= batches, 30.0, lambda: len(arrivals))
        stop.set()
        listening.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listening
    events = [
        arrivals[(log.run_id, s)] - sent
        for log in logs
        for s, sent in log.first_sent.items()
        if (log.run_id, s) in arrivals
    ]
    delivered = {cid for log in logs for cid in log.commands}
    return {
        "wall_s": wall,
        "logs": logs,
        "event_latencies": events,
        "events_missing": sum(len(log.first_sent) for log in logs) - len(events),
        "commands_posted": len(command_ids),
        "commands_never_delivered": len(set(command_ids) - delivered),
        "commands_delivered_after_ack": sum(n for log in logs for n in log.commands.values()),
        "kill": kill,
    }


def count_stored(url: str, token: str, run_ids: Sequence[int]) -> tuple[int, int]:
    """Points stored in all runs, and steps stored twice (a key's step once at most)."""
    stored = twice = 0
    with harness.http_client(url) as client:
        for run_id in run_ids:
            response = client.get(
                f"/api/v1/runs/{run_id}/metrics/export",
                params={"format": "csv"},
                headers={"Authorization": f"Bearer {token}"},
            )
            harness.check_status(response)
            lines = response.text.splitlines()[1:]
            keys_steps = [tuple(line.split(",", 2)[:2]) for line in lines]
            stored += len(keys_steps)
            twice += len(keys_steps) - len(set(keys_steps))
    return stored, twice


def bench_topology(count: int, args: argparse.Namespace) -> dict[str, Any]:
    with harness.postgres_database(args.postgres_url) as db_url, tempfile.TemporaryDirectory() as tmp:
        harness.migrate(db_url)
        tokens = {role: harness.create_token(db_url, role, f"bench-{role}") for role in ("worker", "operator")}
        with topology(db_url, count, Path(tmp)) as (url, replicas):
            run_ids = []
            with harness.http_client(url) as client:
                for i in range(args.workers):
                    response = client.post(
                        "/api/v1/runs",
                        json={"name": f"replicas-{i}", "project": "bench", "detector": DETECTOR, "mode": "observe"},
                        headers={"Authorization": f"Bearer {tokens['worker']}"},
                    )
                    harness.check_status(response, 201)
                    run_ids.append(response.json()["id"])
            with MachineSampler() as machine:
                outcome = asyncio.run(load(url, tokens, replicas, run_ids, args))
            stored, twice = count_stored(url, tokens["operator"], run_ids)
    logs: list[WorkerLog] = outcome.pop("logs")
    latencies = [x for log in logs for x in log.latencies]
    sent = sum(log.sent_points for log in logs)
    return {
        "replicas": count,
        "workers": args.workers,
        "points_sent": sent,
        "points_stored": stored,
        "points_lost": sent - stored,
        "steps_stored_twice": twice,
        "points_per_s": sent / outcome["wall_s"],
        "ingest_s": {q: harness.percentile(latencies, q) for q in (50, 95, 99, 100)},
        "retries": sum(log.retries for log in logs),
        "retry_reasons": sorted({r for log in logs for r in log.failures})[:10],
        "event_s": {q: harness.percentile(outcome["event_latencies"], q) for q in (50, 99)}
        if outcome["event_latencies"]
        else {},
        "machine": machine.summary(),
        **{k: v for k, v in outcome.items() if k != "event_latencies"},
    }


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for r in results:
        rows.append(
            [
                r["replicas"],
                r["workers"],
                f"{r['points_per_s']:,.0f}",
                f"{r['ingest_s'][50] * 1e3:.1f}",
                f"{r['ingest_s'][99] * 1e3:.1f}",
                f"{r['ingest_s'][100] * 1e3:.0f}",
                r["retries"],
                f"{r['event_s'].get(50, float('nan')) * 1e3:.1f}",
                f"{r['event_s'].get(99, float('nan')) * 1e3:.1f}",
                r["events_missing"],
                r["points_lost"],
                r["steps_stored_twice"],
                r["commands_never_delivered"],
                r["commands_delivered_after_ack"],
                f"{r['kill'].get('downtime_s', float('nan')):.1f}",
                f"{r['machine']['load1_mean']:.1f}",
            ]
        )
    harness.print_table(
        f"{args.workers} workers x {args.points} points/s for {args.seconds} s through HAProxy, replica 1 SIGKILLed "
        f"at {args.kill_at:g} s and restarted",
        [
            "replicas", "workers", "pts/s", "p50 ms", "p99 ms", "max ms", "retries", "event p50 ms", "event p99 ms",
            "events missing", "lost", "twice", "cmd never", "cmd again", "downtime s", "load1",
        ],
        rows,
    )  # fmt: skip
    targets: dict[str, Any] = {}
    for r in results:
        zero = (
            r["points_lost"] == 0
            and r["steps_stored_twice"] == 0
            and r["commands_never_delivered"] == 0
            and r["commands_delivered_after_ack"] == 0
        )
        print(
            f"target {r['replicas']} replicas: 0 points lost or stored twice, 0 commands never delivered or "
            f"delivered again -> {'met' if zero else 'MISSED'}"
        )
        targets[f"replicas_{r['replicas']}_exact"] = {"met": zero}
    return targets


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 < args.kill_at < args.seconds:
        raise SystemExit("--kill-at must be within the run")
    harness.snapshot_code()
    counts = [args.replicas] + ([] if args.no_single or args.replicas == 1 else [1])
    results = []
    for count in counts:
        print(f"[replicas] {count} replica(s), {args.workers} workers, {args.seconds} s ...", flush=True)
        results.append(bench_topology(count, args))
    targets = report(results, args)
    harness.write_json(f"{NAME}-{args.out}", {"options": vars(args), "results": results, "targets": targets})
    return 0 if all(t["met"] for t in targets.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
