"""``start_run`` and ``Run``: log metrics from a training loop without ever slowing it down or crashing it.

How it works: ``Run.log`` validates its numbers and appends one tuple to a ``collections.deque`` -- about a
microsecond. One daemon thread per run drains that queue every ``batch_interval_s`` (or as soon as
``batch_points`` points are waiting), encodes batches and POSTs them to ``/api/v1/runs/{id}/metrics``, and
sends a heartbeat when it has had nothing to send for ``heartbeat_s``.

When the server is down, slow or failing (connection errors, timeouts, 5xx, 401/403) the sender logs one
warning per outage (logger ``trainer``), keeps up to ``max_memory_points`` points in memory and appends the
rest to ``<spool_dir>/pending.jsonl``; it retries with capped exponential backoff and, once the server
answers again, re-sends the spool, then the memory. Sending is at-least-once and the server's ingest is
idempotent (a resent identical point is a counted no-op), so every point is stored exactly once.

A batch the server refuses for good (409 conflict with a stored value, 422 invalid, 400/404/413) is not
retried: the sender logs the server's message and appends the batch to ``<spool_dir>/rejected.jsonl``.

Commands (``decay``, ``set_lr``, ``stop``; see :mod:`trainer.commands`) are pushed: a third thread keeps a
long-poll ``GET /runs/{id}/commands`` open (``wait=command_wait_s``, its own HTTP connection, so a poll never
delays a metric batch or ``flush``), which the server answers the moment a command is approved -- within
milliseconds on a LAN. The responses to metric batches carry them too. With ``command_idle_s`` > 0 the
poller only polls after that long without a batch response that brought commands (fewer requests, slower
delivery). ``Run.pending_commands()`` reads them without I/O; ``Run.ack_command`` queues the
acknowledgement, which the sender posts and retries through outages like a metric batch.
"""

from __future__ import annotations

import collections
import enum
import logging
import math
import numbers
import random
import threading
import time
import types
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import httpx

from trainer.client import Client, error_detail
from trainer.commands import Ack, Command, CommandInbox
from trainer.errors import AuthError, RunStateError, ServerError
from trainer.spool import Spool, encode_batch

__all__ = ["Run", "RunState", "start_run"]

logger = logging.getLogger("trainer")

DEFAULT_SPOOL_ROOT = Path.home() / ".stagewatch" / "spool"
_REJECT_CODES = frozenset({400, 404, 409, 413, 422})
_FAST_TYPES = (float, int)

# One log() call: (values, step, epoch, unix time). Converted to wire points by the sender thread.
_Entry = tuple[dict[str, float], int, float | None, float]


class RunState(enum.Enum):
    UNOPENED = 1
    OPENED = 2
    CLOSED = 3


def _wire_value(value: float) -> float | str:
    if math.isfinite(value):
        return value
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def _to_points(entries: Iterable[_Entry]) -> list[dict[str, Any]]:
    points: list[dict[str, Any]] = []
    append = points.append
    for values, step, epoch, t in entries:
        for key, value in values.items():
            point: dict[str, Any] = {"key": key, "step": step, "value": _wire_value(value), "time": t}
            if epoch is not None:
                point["epoch"] = epoch
            append(point)
    return points


def _checked_values(values: Mapping[str, Any]) -> dict[str, float]:
    """The slow path of ``Run.log``: anything but plain ``str`` keys and ``int``/``float`` values."""
    out: dict[str, float] = {}
    for key, value in values.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"metric keys must be non-empty strings, got {key!r}")
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            hint = " (call .item() on a tensor)" if hasattr(value, "item") else ""
            raise TypeError(f"metric {key!r}: expected a real number, got {type(value).__name__}{hint}")
        out[key] = float(value)
    return out


class Run:
    """A run on the server, opened as a context manager; see :func:`start_run`.

    ```python
    with trainer.start_run("http://127.0.0.1:8765", name="mlp", config={"lr": 0.1}) as run:
        for step in range(1000):
            run.log({"loss": train_step()}, step=step)
    ```

    ``id`` is ``None`` until the server has created the run (it may be down when the run starts).
    """

    def __init__(
        self,
        url: str,
        *,
        name: str | None,
        project: str,
        tags: Iterable[str],
        config: Mapping[str, Any] | None,
        notes: str,
        token: str | None,
        run_id: int | None,
        detector: Mapping[str, Any] | None = None,
        mode: str | None = None,
        auto_approve_after_s: float | None = None,
        spool_dir: str | Path | None,
        timeout: float,
        batch_points: int,
        batch_interval_s: float,
        heartbeat_s: float,
        max_memory_points: int,
        max_queue: int,
        retry_max_s: float,
        close_timeout_s: float,
        transport: httpx.BaseTransport | None,
        command_wait_s: float = 5.0,
        command_idle_s: float = 0.0,
    ) -> None:
        self.id: int | None = run_id
        self.state = RunState.UNOPENED
        self._fields: dict[str, Any] = {
            "name": name,
            "project": project,
            "tags": list(tags),
            "notes": notes,
            "config": dict(config or {}),
            "detector": dict(detector) if detector is not None else None,
            "mode": mode,
            "auto_approve_after_s": auto_approve_after_s,
        }
        self._client = Client(url, token=token, timeout=timeout, transport=transport)
        local = f"run-{run_id}" if run_id is not None else f"new-{uuid.uuid4().hex[:12]}"
        self.spool = Spool(Path(spool_dir) if spool_dir is not None else DEFAULT_SPOOL_ROOT / local)
        self._batch_points = batch_points
        self._interval = batch_interval_s
        self._heartbeat_s = heartbeat_s
        self._max_memory = max_memory_points
        self._max_queue = max_queue
        self._retry_max = retry_max_s
        self._close_timeout = close_timeout_s
        # Producer -> sender. deque.append/popleft are atomic; the lock guards the buffer and spool writes.
        self._queue: collections.deque[_Entry] = collections.deque()
        self._wake_at = max(1, batch_points // 3)
        self._lock = threading.Lock()
        self._progress = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._buffer: collections.deque[_Entry] = collections.deque()  # drained, not yet acknowledged
        self._buffer_points = 0
        self._sending = False
        self._flushing = 0  # flush() calls waiting (guarded by the lock)
        self._needs_running = False  # a resumed run whose PATCH status=running has not gone through
        self._outage: str | None = None
        self._failures = 0
        self._next_attempt = 0.0
        self._last_contact = time.monotonic()
        self._thread = threading.Thread(target=self._run_sender, name="stagewatch-sender", daemon=True)
        # Overflow while the sender is stuck in a request: log() hands the whole queue over here (O(1)) and
        # this thread writes it to the spool, so the training loop never does the file I/O itself.
        self._handoff: collections.deque[collections.deque[_Entry]] = collections.deque()
        self._handoff_wake = threading.Event()
        self._spiller = threading.Thread(target=self._run_spiller, name="stagewatch-spiller", daemon=True)
        self.points_sent = 0
        self.points_rejected = 0
        # Commands: received by the sender (piggybacked) and the poller, read by the training loop.
        self.should_stop = False  # set by a ``stop`` command once applied (see trainer.torch)
        self._inbox = CommandInbox()
        self._acks: collections.deque[Ack] = collections.deque()  # queued by the loop, posted by the sender
        self._command_wait = command_wait_s
        self._command_idle = command_idle_s
        self._piggyback_at = -math.inf  # when an ingest response last carried a "commands" list
        self._poll_client = Client(url, token=token, timeout=timeout, transport=transport)
        self._poller = threading.Thread(target=self._run_poller, name="stagewatch-commands", daemon=True)

    # --- lifecycle ------------------------------------------------------------------------------------------

    def __enter__(self) -> Run:
        if self.state is not RunState.UNOPENED:
            raise RunStateError(
                "this run is already open" if self.state is RunState.OPENED else "a closed run cannot be reopened"
            )
        try:
            self._open()
        except BaseException:
            self._client.close()
            self._poll_client.close()
            self.state = RunState.CLOSED
            raise
        self.state = RunState.OPENED
        self._thread.start()
        self._spiller.start()
        self._piggyback_at = time.monotonic()  # the first poll waits for command_idle_s without a batch
        self._poller.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self.close("failed" if exc_type is not None else "finished")

    def _open(self) -> None:
        """Creates or resumes the run. Refusals that retrying cannot fix raise; an unreachable or failing
        server only warns, and the sender creates or resumes the run once it answers."""
        try:
            if self.id is None:
                response = self._client.create_run({k: v for k, v in self._fields.items() if v is not None})
                if response.status_code == 201:
                    self.id = int(response.json()["id"])
                    self._use_run_spool()
                    return
                self._raise_for_refusal(response, "create the run")
            else:
                response = self._client.get_run(self.id)
                if response.status_code != 200:
                    self._raise_for_refusal(response, f"resume run {self.id}")
                else:
                    response = self._client.update_run(self.id, {"status": "running"})
                    if response.status_code == 200:
                        return
                    self._raise_for_refusal(response, f"resume run {self.id}")
                self._needs_running = True
                return
        except httpx.TransportError as exc:
            self._note_outage(f"{type(exc).__name__}: {exc}")
            self._needs_running = self.id is not None
            return
        self._note_outage(f"HTTP {response.status_code}: {error_detail(response)}")

    def _raise_for_refusal(self, response: httpx.Response, what: str) -> None:
        """Raises for 4xx answers; returns for 5xx and other transient ones."""
        code = response.status_code
        detail = error_detail(response)
        if code in (401, 403):
            raise AuthError(f"could not {what}: HTTP {code}: {detail}", status_code=code, detail=detail)
        if 400 <= code < 500 and code not in (408, 429):
            raise ServerError(f"could not {what}: HTTP {code}: {detail}", status_code=code, detail=detail)

    def _use_run_spool(self) -> None:
        """A run created after start moves its spool directory name from ``new-...`` to ``run-<id>`` only
        when the caller chose none and nothing is spooled yet; otherwise the directory stays."""
        if self.spool.directory.name.startswith("new-") and not self.spool.has_pending():
            self.spool = Spool(self.spool.directory.with_name(f"run-{self.id}"))

    def close(self, status: str = "finished") -> None:
        """Flushes (up to ``close_timeout_s``), stops the sender, spills what is left to the spool and marks
        the run ``status``. Closing twice is a no-op."""
        if self.state is not RunState.OPENED:
            if self.state is RunState.UNOPENED:
                self.state = RunState.CLOSED
                self._client.close()
                self._poll_client.close()
            return
        self.state = RunState.CLOSED
        try:
            self.flush(timeout=self._close_timeout)
        finally:
            self._stop.set()
            self._wake.set()
            self._thread.join(timeout=self._close_timeout + 5)
            # A long-poll in flight ends by itself within command_wait_s; the poller closes its own client.
            self._poller.join(timeout=0.2)
            with self._lock:
                entries = self._take_all()
                while self._handoff:  # whatever the spiller thread has not written yet
                    full = self._handoff.popleft()
                    while full:
                        entries.append(full.popleft())
                self._spill(entries)
                left = self.spool.has_pending()
            self._set_status(status)
            if left:
                logger.warning(
                    "stagewatch: run %s closed with points the server has not acknowledged; they are kept in %s",
                    self.id,
                    self.spool.pending_path,
                )
            if self._acks:
                logger.warning(
                    "stagewatch: run %s closed before the server acknowledged command(s) %s; a job resumed from "
                    "a checkpoint that holds the CommandApplier state acknowledges them again",
                    self.id,
                    ", ".join(str(a.command_id) for a in self._acks),
                )
            self._client.close()

    def _set_status(self, status: str) -> None:
        if self.id is None:
            return
        try:
            response = self._client.update_run(self.id, {"status": status})
        except httpx.TransportError as exc:
            logger.warning("stagewatch: could not mark run %s %s: %s", self.id, status, exc)
            return
        if response.status_code != 200:
            logger.warning(
                "stagewatch: could not mark run %s %s: HTTP %s: %s",
                self.id,
                status,
                response.status_code,
                error_detail(response),
            )

    # --- the training loop's side ---------------------------------------------------------------------------

    def log(self, values: Mapping[str, float], *, step: int, epoch: float | None = None, urgent: bool = False) -> None:
        """Queues one point per key at ``step``; returns at once (no I/O).

        Values must be real numbers (``float``, ``int``, numpy scalars); NaN and infinities are fine and
        arrive as such. Anything else raises ``TypeError`` here, in the training loop, because it is a bug.

        ``urgent=True`` wakes the sender now instead of at the next ``batch_interval_s`` (still no I/O here):
        use it for the points a server-side detector watches (say, per-epoch losses), so that its decision
        comes back within milliseconds rather than a batch interval later.
        """
        if self.state is not RunState.OPENED:
            raise RunStateError(f"cannot log to a run that is {self.state.name.lower()}; use `with start_run(...)`")
        if type(step) is not int or step < 0:
            if isinstance(step, bool) or not isinstance(step, int):
                raise TypeError(f"step must be an int, got {type(step).__name__}")
            raise ValueError(f"step must be >= 0, got {step}")
        copied = dict(values)
        for key, value in copied.items():
            if type(value) not in _FAST_TYPES or type(key) is not str:
                copied = _checked_values(copied)
                break
        # A plain float or int in range passes at once; the slower checks only run for the rest (numpy scalars).
        fast_epoch = epoch is None or (type(epoch) in _FAST_TYPES and 0 <= epoch < math.inf)
        if not fast_epoch and (not isinstance(epoch, numbers.Real) or not epoch >= 0 or epoch == math.inf):
            raise TypeError(f"epoch must be a finite number >= 0, got {epoch!r}")
        queue = self._queue
        queue.append((copied, step, epoch, time.time()))
        n = len(queue)
        if n == self._wake_at or urgent:
            self._wake.set()
        elif n > self._max_queue:
            self._overflow()

    def pending_commands(self) -> list[Command]:
        """The commands received and not yet acknowledged, oldest first. No I/O; safe from any thread."""
        return self._inbox.pending()

    def ack_command(
        self,
        command_id: int,
        *,
        status: str,
        step: int,
        lr: float | None,
        message: str = "",
    ) -> None:
        """Queues the acknowledgement of a command (``status`` ``"applied"`` or ``"failed"``, at ``step``, with
        the LR now in effect) and drops it from :meth:`pending_commands`. No I/O: the sender thread posts it,
        retrying through outages; :meth:`flush` waits for it too."""
        if self.state is not RunState.OPENED:
            raise RunStateError(f"cannot acknowledge a command on a run that is {self.state.name.lower()}")
        if status not in ("applied", "failed"):
            raise ValueError(f"status must be 'applied' or 'failed', got {status!r}")
        if type(step) is not int or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        self._inbox.retire(command_id)
        self._acks.append(Ack(command_id, "applied" if status == "applied" else "failed", step, lr, message))
        self._wake.set()

    def flush(self, timeout: float | None = None) -> bool:
        """Waits until the server has acknowledged every point logged so far.

        Returns ``True`` when it has, ``False`` when ``timeout`` seconds passed first (the points are kept
        and still sent later). Never raises for network trouble. ``timeout=None`` waits as long as it takes.
        """
        if self.state is RunState.UNOPENED:
            raise RunStateError("cannot flush a run that has not been opened")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._progress:
            self._next_attempt = 0.0  # try now, whatever the backoff says
            self._flushing += 1  # the sender sends everything back to back meanwhile
            try:
                while not self._all_acknowledged():
                    self._wake.set()
                    if not self._thread.is_alive():
                        return False
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return False
                    self._progress.wait(0.05 if remaining is None else min(remaining, 0.05))
                return True
            finally:
                self._flushing -= 1

    def _all_acknowledged(self) -> bool:
        return (
            not self._queue
            and not self._acks
            and not self._handoff
            and not self._buffer
            and not self._sending
            and not self.spool.has_pending()
        )

    def _overflow(self) -> None:
        """The sender is stuck in a request and the queue passed ``max_queue``: swap in a fresh queue and let
        the spiller thread write the full one to the spool (the sender may still drain part of it: popleft is
        atomic, so every entry goes one way or the other)."""
        full, self._queue = self._queue, collections.deque()
        self._handoff.append(full)
        self._handoff_wake.set()

    def _run_spiller(self) -> None:
        while True:
            self._handoff_wake.wait()
            self._handoff_wake.clear()
            while self._handoff:
                full = self._handoff[0]
                with self._lock:
                    entries = []
                    while full:
                        entries.append(full.popleft())
                    self._spill(entries)
                    self._handoff.popleft()
                    self._progress.notify_all()

    # --- the sender thread ----------------------------------------------------------------------------------

    def _run_sender(self) -> None:
        while True:
            stopping = self._stop.is_set()
            try:
                self._cycle()
            except Exception:  # never let the thread die: keep the points, say what happened
                logger.exception("stagewatch: unexpected error in the sender thread; retrying")
                self._failed("unexpected error")
            with self._progress:
                self._progress.notify_all()
            if stopping:
                return
            self._wake.wait(self._interval)
            self._wake.clear()

    def _cycle(self) -> None:
        with self._lock:
            self._drain()
        if time.monotonic() < self._next_attempt:
            return
        if self._send_all():
            if self._outage is not None:
                logger.warning("stagewatch: server reachable again for run %s; sending what was kept", self.id)
                self._outage = None
            self._failures = 0

    def _drain(self) -> None:
        queue, buffer = self._queue, self._buffer
        while queue:
            entry = queue.popleft()
            buffer.append(entry)
            self._buffer_points += len(entry[0])
        if self._buffer_points > self._max_memory:
            spilled = []
            while self._buffer_points > self._max_memory // 2:
                entry = buffer.popleft()
                self._buffer_points -= len(entry[0])
                spilled.append(entry)
            self._spill(spilled)

    def _take_all(self) -> list[_Entry]:
        entries = list(self._buffer)
        entries.extend(self._queue)
        self._buffer.clear()
        self._queue.clear()
        self._buffer_points = 0
        return entries

    def _spill(self, entries: list[_Entry]) -> None:
        """Appends entries to the spool in batches (caller holds the lock)."""
        points = _to_points(entries)
        for start in range(0, len(points), self._batch_points):
            self.spool.append(points[start : start + self._batch_points])

    def _send_all(self) -> bool:
        """One attempt at everything outstanding; False (and a backoff) at the first transient failure."""
        try:
            if self.id is None and not self._create():
                return False
            assert self.id is not None
            if self._needs_running:
                response = self._client.update_run(self.id, {"status": "running"})
                if response.status_code != 200:
                    return self._failed(f"HTTP {response.status_code}: {error_detail(response)}")
                self._needs_running = False
            if not self._send_acks():
                return False
            for body, end in self.spool.pending_batches():
                if not self._post(body):
                    return False
                with self._lock:
                    self.spool.ack(end)
            with self._lock:
                self.spool.truncate_if_done()
            # What is queued now goes out; points logged while it is on the wire wait for the next cycle, unless
            # a whole batch of them is already waiting or the run is flushing/closing. Otherwise a fast loop
            # keeps the sender posting tiny batches back to back, and each POST costs the training thread GIL
            # time.
            first = True
            while True:
                with self._lock:
                    self._drain()
                    eager = first or self._stop.is_set() or self._flushing > 0
                    batch = self._take_batch() if eager or self._buffer_points >= self._batch_points else []
                    self._sending = bool(batch)
                first = False
                if not batch:
                    break
                try:
                    ok = self._post(encode_batch(_to_points(batch)))
                finally:
                    with self._lock:
                        self._sending = False
                        if not ok:  # put it back in front, in order
                            self._buffer.extendleft(reversed(batch))
                            self._buffer_points += sum(len(e[0]) for e in batch)
                if not ok:
                    return False
            if time.monotonic() - self._last_contact >= self._heartbeat_s:
                response = self._client.heartbeat(self.id)
                if response.status_code != 200:
                    return self._failed(f"HTTP {response.status_code}: {error_detail(response)}")
                self._last_contact = time.monotonic()
            return True
        except httpx.TransportError as exc:
            return self._failed(f"{type(exc).__name__}: {exc}")

    def _take_batch(self) -> list[_Entry]:
        batch: list[_Entry] = []
        points = 0
        buffer = self._buffer
        while buffer and points < self._batch_points:
            entry = buffer.popleft()
            batch.append(entry)
            points += len(entry[0])
        self._buffer_points -= points
        return batch

    def _create(self) -> bool:
        response = self._client.create_run({k: v for k, v in self._fields.items() if v is not None})
        if response.status_code != 201:
            return self._failed(f"could not create the run: HTTP {response.status_code}: {error_detail(response)}")
        self.id = int(response.json()["id"])
        logger.warning("stagewatch: run created on the server as id %s", self.id)
        return True

    def _post(self, body: bytes) -> bool:
        """Sends one batch. True when it is stored or was rejected for good (and kept aside)."""
        assert self.id is not None
        response = self._client.post_metrics(self.id, body)
        code = response.status_code
        if code == 200:
            answer = response.json()
            self.points_sent += int(answer.get("accepted", 0))
            self._last_contact = time.monotonic()
            if isinstance(answer.get("commands"), list):
                self._receive(answer["commands"])
                self._piggyback_at = time.monotonic()
            return True
        detail = error_detail(response)
        if code in _REJECT_CODES:
            with self._lock:
                self.spool.reject(body, code, detail)
                self.points_rejected += len(body.split(b'"key"')) - 1
            logger.warning(
                "stagewatch: the server refused a batch of run %s (HTTP %s: %s); it is kept in %s and not retried",
                self.id,
                code,
                detail,
                self.spool.rejected_path,
            )
            return True
        if code in (401, 403):
            return self._failed(f"HTTP {code}: {detail} -- check the token and its role (needs worker)")
        return self._failed(f"HTTP {code}: {detail}")

    def _send_acks(self) -> bool:
        """Posts the queued acknowledgements in order; False (and a backoff) at the first transient failure."""
        assert self.id is not None
        acks = self._acks
        while acks:
            ack = acks[0]
            response = self._client.ack_command(self.id, ack.command_id, ack.body())
            code = response.status_code
            if code in (401, 403):
                return self._failed(f"HTTP {code}: {error_detail(response)} -- check the token and its role")
            if code != 200 and code not in _REJECT_CODES:
                return self._failed(f"HTTP {code}: {error_detail(response)}")
            if code != 200:  # 409: acknowledged differently before; 404/422: nothing to retry
                logger.warning(
                    "stagewatch: the server refused the acknowledgement of command %s of run %s (HTTP %s: %s)",
                    ack.command_id,
                    self.id,
                    code,
                    error_detail(response),
                )
            self._last_contact = time.monotonic()
            acks.popleft()
            with self._progress:
                self._progress.notify_all()
        return True

    def _receive(self, items: list[Any]) -> None:
        commands: list[Command] = []
        for item in items:
            try:
                commands.append(Command.from_json(item))
            except (KeyError, TypeError, ValueError, AttributeError):
                logger.warning("stagewatch: ignoring a malformed command from the server: %.200r", item)
        if self._inbox.add(commands):
            logger.info("stagewatch: run %s received command(s): %s", self.id, [c.id for c in commands])

    def _run_poller(self) -> None:
        """Long-polls for commands while no metric batch brings them; never raises, closes its client."""
        failures = 0
        try:
            while not self._stop.is_set():
                idle_for = time.monotonic() - self._piggyback_at
                if self.id is None or idle_for < self._command_idle:
                    self._stop.wait(0.5 if self.id is None else self._command_idle - idle_for)
                    continue
                reason = ""
                try:
                    response = self._poll_client.get_commands(
                        self.id, after=self._inbox.last_id, wait=self._command_wait
                    )
                    if response.status_code == 200:
                        data = response.json().get("data")
                        self._receive(data if isinstance(data, list) else [])
                        failures = 0
                        continue
                    reason = f"HTTP {response.status_code}: {error_detail(response)}"
                except Exception as exc:  # transport trouble, a bad body, a client closed under us
                    reason = f"{type(exc).__name__}: {exc}"
                failures += 1
                # Outages are reported once by the sender; the poller only backs off.
                logger.debug("stagewatch: polling commands of run %s failed (%s)", self.id, reason)
                self._stop.wait(min(self._retry_max, 0.25 * 2 ** min(failures, 16)) * random.uniform(0.8, 1.0))
        finally:
            self._poll_client.close()

    def _failed(self, reason: str) -> bool:
        self._note_outage(reason)
        self._failures += 1
        delay = min(self._retry_max, 0.25 * 2 ** min(self._failures, 16))
        self._next_attempt = time.monotonic() + delay * random.uniform(0.8, 1.0)
        return False

    def _note_outage(self, reason: str) -> None:
        if self._outage is None:
            logger.warning(
                "stagewatch: cannot reach the server for run %s (%s); training goes on, points are kept "
                "(in memory, then in %s) and sent when it answers again",
                self.id,
                reason,
                self.spool.pending_path,
            )
            self._outage = reason


def start_run(
    url: str,
    *,
    name: str | None = None,
    project: str = "default",
    tags: Iterable[str] = (),
    config: Mapping[str, Any] | None = None,
    notes: str = "",
    token: str | None = None,
    run_id: int | None = None,
    detector: Mapping[str, Any] | None = None,
    mode: str | None = None,
    auto_approve_after_s: float | None = None,
    spool_dir: str | Path | None = None,
    timeout: float = 10.0,
    batch_points: int = 5000,
    batch_interval_s: float = 1.0,
    heartbeat_s: float = 30.0,
    max_memory_points: int = 200_000,
    max_queue: int = 200_000,
    retry_max_s: float = 30.0,
    close_timeout_s: float = 30.0,
    transport: httpx.BaseTransport | None = None,
    command_wait_s: float = 5.0,
    command_idle_s: float = 0.0,
) -> Run:
    """A run to open with ``with``: creates it on the server (or resumes ``run_id``), marks it ``finished``
    on a normal exit and ``failed`` when the block raises (the exception propagates).

    ```python
    with start_run("http://127.0.0.1:8765", name="resnet18", config={"lr": 0.1}, token=token) as run:
        run.log({"loss": 0.3, "lr": 0.1}, step=123)
    ```

    ``detector`` (``{"name": "autodecay", "metric": "epoch/train_loss", "params": {...}}``) and ``mode``
    (``auto``, ``approve`` or ``observe``) configure the server's stage detection for a new run, with
    ``auto_approve_after_s`` (approve mode: approve a proposal nobody decided on); omitted, the server's
    defaults apply. They are ignored when resuming ``run_id``.

    ``spool_dir`` (default ``~/.stagewatch/spool/run-<id>``) receives the points that do not fit in
    memory (``max_memory_points``) while the server is unreachable, and the batches it refuses for good.
    ``max_queue`` bounds the ``log()`` calls waiting for the sender thread; past it they are handed to a
    spiller thread that writes them to the spool (``log()`` itself never does I/O).

    Commands from the server reach a background thread that long-polls for them (``command_wait_s`` per
    request, 0..30; see the module doc for ``command_idle_s``) and the answers to metric batches. Read them with
    :meth:`Run.pending_commands` and apply them with :class:`trainer.torch.CommandApplier`.
    """
    return Run(
        url,
        name=name,
        project=project,
        tags=tags,
        config=config,
        notes=notes,
        token=token,
        run_id=run_id,
        detector=detector,
        mode=mode,
        auto_approve_after_s=auto_approve_after_s,
        spool_dir=spool_dir,
        timeout=timeout,
        batch_points=batch_points,
        batch_interval_s=batch_interval_s,
        heartbeat_s=heartbeat_s,
        max_memory_points=max_memory_points,
        max_queue=max_queue,
        retry_max_s=retry_max_s,
        close_timeout_s=close_timeout_s,
        transport=transport,
        command_wait_s=command_wait_s,
        command_idle_s=command_idle_s,
    )
