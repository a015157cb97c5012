"""The sender: one thread per run that delivers everything the training loop hands over, exactly once.

``Run.log`` appends to :attr:`Sender.recorder` (typed arrays per set of keys, see :mod:`trainer.columns`; no I/O,
no lock and no object per call). Every ``batch_interval_s`` -- or at once when a third of a batch is waiting, on
``urgent``, or while someone flushes -- the thread takes what was logged into an in-memory buffer and delivers, in
this order, each step only after the previous one went through:

1. the run itself: created (idempotently, by its ``client_key``) or marked ``running`` again;
2. the spool's inherited data reconciled with the rewinds the server made since its writer last looked;
3. a pending rewind (``resume_step``);
4. command acknowledgements;
5. the spool (inherited data, then this process's own), then the buffer, in batches;
6. a heartbeat when nothing else went out for ``heartbeat_s``;
7. spools other runs left behind (orphans), one per cycle.

A batch leaves the buffer only once the server has stored it (or refused it for good, then it is kept in
``rejected.jsonl``): any failure or exception puts it back in front, in order. A timeout whose request did
reach the server is harmless, because the resend is an idempotent no-op there. When the buffer passes
``max_memory_points`` the oldest half goes to the spool; when more than ``max_queue`` calls wait while this thread
is stuck in a request, ``log()`` hands them to a spiller thread that writes them to the spool. Both threads
end in :meth:`Sender.stop`.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time

import httpx

from trainer.backoff import Backoff
from trainer.client import Client, error_detail
from trainer.columns import Columns, Recorder
from trainer.commands import Ack, CommandInbox
from trainer.options import RunOptions
from trainer.spool import Spool

__all__ = ["Sender"]

logger = logging.getLogger("trainer")

REJECT_CODES = frozenset({400, 404, 409, 413, 422})


class Refused(Exception):
    """The server refused something for a reason retrying cannot fix (auth aside)."""


class Sender:
    """Delivers one run's points, acknowledgements, rewinds and status; see the module doc."""

    def __init__(
        self,
        client: Client,
        spool: Spool,
        options: RunOptions,
        inbox: CommandInbox,
        *,
        needs_running: bool,
        orphans: list[Spool],
    ) -> None:
        self._client = client
        self.spool = spool
        self._options = options
        self._inbox = inbox
        # Appended by log(), taken by take_columns(); log() never waits on this thread. log() wakes it when a third
        # of a batch waits (of one set of keys), and hands everything to the spool past max_queue rows.
        self.recorder = Recorder(wake_rows=max(1, options.batch_points // 3), max_rows=options.max_queue)
        self.acks: collections.deque[Ack] = collections.deque()  # appended by ack_command()
        self._buffer: collections.deque[Columns] = collections.deque()  # drained, not yet stored, oldest first
        self._buffer_points = 0
        self._sending = False
        self._flushing = 0
        self._lock = threading.Lock()
        self._progress = threading.Condition(self._lock)
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._backoff = Backoff(options.retry_max_s)
        self._outage: str | None = None
        self._needs_running = needs_running
        self._reconciled = False
        self._last_contact = time.monotonic()
        self._orphans = list(orphans)
        self.piggyback_at = -math.inf  # when a metrics response last carried commands
        self.points_sent = 0
        self.batches_sent = 0  # metric POSTs of this process's points that the server stored
        self.points_rejected = 0
        self._handoff: collections.deque[Columns] = collections.deque()
        self._handoff_wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stagewatch-sender", daemon=True)
        self._spiller = threading.Thread(target=self._run_spiller, name="stagewatch-spiller", daemon=True)

    # --- lifecycle --------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self._spiller.start()

    def stop(self, timeout: float) -> None:
        """Ends both threads (the sender finishes its cycle: at most one request, ``timeout`` long) and writes
        whatever is still in memory to the spool. Orphans not delivered yet are left for the next process."""
        self._stop.set()
        self.wake.set()
        self._handoff_wake.set()
        self._thread.join(timeout)
        self._spiller.join(timeout)
        with self._lock:
            everything = Columns()
            while self._buffer:
                everything.extend(self._buffer.popleft())
            self._buffer_points = 0
            while self._handoff:
                everything.extend(self._handoff.popleft())
            everything.extend(self.take_columns())
            self._spill(everything)
        for orphan in self._orphans:
            orphan.release()
        self._orphans.clear()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def all_delivered(self) -> bool:
        """Nothing of this run is waiting: no point, no acknowledgement, no rewind."""
        return (
            not self.recorder
            and not self.acks
            and not self._handoff
            and not self._buffer
            and not self._sending
            and self.spool.meta.run_id is not None
            and self.spool.meta.pending_rewind is None
            and not self.spool.has_pending()
        )

    def flush(self, timeout: float | None) -> bool:
        """Waits until :meth:`all_delivered` (True) or ``timeout`` passes (False); retries at once meanwhile."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._progress:
            self._backoff.retry_now()
            self._flushing += 1  # everything goes out back to back meanwhile
            try:
                while not self.all_delivered():
                    self.wake.set()
                    if not self._thread.is_alive():
                        return False
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return False
                    self._progress.wait(0.05 if remaining is None else min(remaining, 0.05))
                return True
            finally:
                self._flushing -= 1

    def persist(self, timeout: float) -> None:
        """Writes everything still in memory to the spool and syncs it to disk, so that a crash of this process
        loses none of it. Waits up to ``timeout`` for a batch in flight to be stored or put back first."""
        deadline = time.monotonic() + timeout
        with self._progress:
            while self._sending and time.monotonic() < deadline:
                self._progress.wait(0.05)
            everything = Columns()
            while self._handoff:
                everything.extend(self._handoff.popleft())
            while self._buffer:
                everything.extend(self._buffer.popleft())
            self._buffer_points = 0
            everything.extend(self.take_columns())
            self._spill(everything)
            self.spool.sync()

    def take_columns(self) -> Columns:
        """Everything ``log()`` added since the last call: each point goes one way."""
        return self.recorder.take()

    def overflow(self) -> None:
        """Called by ``log()`` when more than ``max_queue`` calls of one set of keys wait: the spiller writes
        everything waiting to the spool."""
        self._handoff.append(self.take_columns())
        self._handoff_wake.set()

    # --- threads ----------------------------------------------------------------------------------------

    def _run_spiller(self) -> None:
        while not self._stop.is_set():
            self._handoff_wake.wait()
            self._handoff_wake.clear()
            while self._handoff and not self._stop.is_set():
                with self._lock:
                    if not self._handoff:
                        break
                    self._spill(self._handoff.popleft())
                    self._progress.notify_all()

    def _run(self) -> None:
        while True:
            stopping = self._stop.is_set()
            try:
                self._cycle()
            except Exception:  # never let the thread die: the data stays where it is, say what happened
                logger.exception("stagewatch: unexpected error in the sender thread; retrying")
                self._failed("unexpected error")
            with self._progress:
                self._progress.notify_all()
            if stopping:
                return
            self.wake.wait(self._options.batch_interval_s)
            self.wake.clear()

    def _cycle(self) -> None:
        with self._lock:
            self._drain()
        if self._backoff.remaining() > 0:
            return
        try:
            ok = self._deliver() and self._deliver_orphan()
        except httpx.TransportError as exc:
            ok = self._failed(f"{type(exc).__name__}: {exc}")
        if ok:
            if self._outage is not None:
                logger.warning("stagewatch: server reachable again for run %s; sending what was kept", self.run_id)
                self._outage = None
            self._backoff.succeeded()

    @property
    def run_id(self) -> int | None:
        return self.spool.meta.run_id

    # --- delivery ---------------------------------------------------------------------------------------

    def _deliver(self) -> bool:
        """One attempt at everything outstanding, in order; False (and a backoff) at the first failure."""
        if not self._ensure_run(self.spool) or not self._reconcile(self.spool):
            return False
        if not self._rewind(self.spool) or not self._send_acks() or not self._send_spool(self.spool):
            return False
        if not self._send_buffer():
            return False
        if time.monotonic() - self._last_contact >= self._options.heartbeat_s:
            assert self.run_id is not None
            response = self._client.heartbeat(self.run_id)
            if response.status_code != 200:
                return self._failed(f"HTTP {response.status_code}: {error_detail(response)}")
            self._last_contact = time.monotonic()
        return True

    def _ensure_run(self, spool: Spool) -> bool:
        """The spool's run exists on the server (created by its client key) and, if resumed, runs again."""
        meta = spool.meta
        if meta.run_id is None:
            response = self._client.create_run({**meta.create, "client_key": meta.client_key})
            code = response.status_code
            if spool is not self.spool and 400 <= code < 500 and code not in (401, 403, 408, 429):
                raise Refused(f"HTTP {code}: {error_detail(response)}")
            if code not in (200, 201):
                return self._failed(f"could not create the run: HTTP {response.status_code}: {error_detail(response)}")
            meta.run_id = int(response.json()["id"])
            spool.save_meta()
            logger.warning("stagewatch: run created on the server as id %s", meta.run_id)
            if spool is self.spool and response.status_code == 200:
                self._needs_running = True  # it existed: an earlier process of this job created it
        if spool is self.spool and self._needs_running:
            response = self._client.update_run(meta.run_id, {"status": "running"})
            if response.status_code != 200:
                return self._failed(f"HTTP {response.status_code}: {error_detail(response)}")
            self._needs_running = False
        return True

    def _reconcile(self, spool: Spool) -> bool:
        """Drops inherited points that a rewind made since their writer looked would otherwise bring back, and
        learns the run's last rewind for what this process spools from now on."""
        if spool is self.spool and self._reconciled:
            return True
        meta = spool.meta
        assert meta.run_id is not None
        if meta.rewind_seen is None or (spool.inherited_points and meta.inherited_rewind_seen is not None):
            response = self._client.get_rewinds(meta.run_id, after=0)
            if response.status_code != 200:
                return self._failed(f"HTTP {response.status_code}: {error_detail(response)}")
            rewinds = response.json()["data"]
            if meta.inherited_rewind_seen is not None:
                later = [r["step"] for r in rewinds if r["event_id"] > meta.inherited_rewind_seen]
                if later and spool.inherited_points:
                    dropped = spool.drop_inherited_after(min(later))
                    logger.warning(
                        "stagewatch: run %s was rewound to step %s after an earlier process spooled its points; "
                        "%s of them after that step were dropped, not resent",
                        meta.run_id,
                        min(later),
                        dropped,
                    )
            latest = max((r["event_id"] for r in rewinds), default=0)
            if meta.rewind_seen is None:
                meta.rewind_seen = latest
            meta.inherited_rewind_seen = latest
            spool.save_meta()
        if spool is self.spool:
            self._reconciled = True
        return True

    def _rewind(self, spool: Spool) -> bool:
        meta = spool.meta
        if meta.pending_rewind is None:
            return True
        assert meta.run_id is not None
        response = self._client.rewind(meta.run_id, meta.pending_rewind, reason="resumed by the worker client")
        code = response.status_code
        if code == 200:
            meta.rewind_seen = int(response.json()["event_id"])
            logger.warning("stagewatch: run %s rewound to step %s", meta.run_id, meta.pending_rewind)
        elif code in REJECT_CODES:
            logger.error(
                "stagewatch: the server refused to rewind run %s to step %s (HTTP %s: %s)",
                meta.run_id,
                meta.pending_rewind,
                code,
                error_detail(response),
            )
        else:
            return self._failed(f"HTTP {code}: {error_detail(response)}")
        meta.pending_rewind = None
        spool.save_meta()
        return True

    def _send_acks(self) -> bool:
        """Posts the queued acknowledgements in order."""
        acks = self.acks
        assert self.run_id is not None
        while acks:
            ack = acks[0]
            response = self._client.ack_command(self.run_id, ack.command_id, ack.body())
            code = response.status_code
            if code != 200 and code not in REJECT_CODES:
                hint = " -- check the token and its role" if code in (401, 403) else ""
                return self._failed(f"HTTP {code}: {error_detail(response)}{hint}")
            if code != 200:  # 409: acknowledged differently before; 404/422: nothing to retry
                logger.warning(
                    "stagewatch: the server refused the acknowledgement of command %s of run %s (HTTP %s: %s)",
                    ack.command_id,
                    self.run_id,
                    code,
                    error_detail(response),
                )
            self._last_contact = time.monotonic()
            acks.popleft()
            with self._progress:
                self._progress.notify_all()
        return True

    def _send_spool(self, spool: Spool) -> bool:
        assert spool.meta.run_id is not None
        for body, name, end in spool.batches():
            if not self._post(spool, body):
                return False
            with self._lock:
                spool.ack(name, end)
        with self._lock:
            spool.truncate_if_done()
        return True

    def _send_buffer(self) -> bool:
        """What is queued now goes out; points logged while it is on the wire wait for the next cycle, unless
        a whole batch of them is waiting or someone flushes. Otherwise a fast loop keeps this thread posting
        tiny batches back to back, and each POST costs the training thread GIL time."""
        first = True
        while True:
            with self._lock:
                self._drain()
                eager = first or self._stop.is_set() or self._flushing > 0
                take = eager or self._buffer_points >= self._options.batch_points
                batch = self._take_batch() if take else Columns()
                self._sending = bool(batch)
            first = False
            if not batch:
                return True
            stored = False
            try:
                stored = self._post(self.spool, batch.encode(), batch.points)
            finally:  # whatever happened (an error, an exception), a batch not stored goes back in front
                with self._lock:
                    self._sending = False
                    if not stored:
                        self._buffer.appendleft(batch)
                        self._buffer_points += batch.points
            if not stored:
                return False

    def _post(self, spool: Spool, body: bytes, points: int | None = None) -> bool:
        """Sends one batch of ``spool``'s run (``points`` in it; counted in the body, of the ``points`` form, when
        None). True when it is stored, or refused for good and kept aside."""
        run_id = spool.meta.run_id
        assert run_id is not None
        response = self._client.post_metrics(run_id, body)
        code = response.status_code
        if code == 200:
            if spool is self.spool:
                answer = response.json()
                self.points_sent += int(answer.get("accepted", 0))
                self.batches_sent += 1
                if isinstance(answer.get("commands"), list):
                    self._inbox.add_json(answer["commands"], run_id=run_id)
                    self.piggyback_at = time.monotonic()
            self._last_contact = time.monotonic()
            return True
        detail = error_detail(response)
        if code in REJECT_CODES:
            with self._lock:
                spool.reject(body, code, detail)
                if spool is self.spool:
                    self.points_rejected += body.count(b'"key"') if points is None else points
            logger.warning(
                "stagewatch: the server refused a batch of run %s (HTTP %s: %s); it is kept in %s and not retried",
                run_id,
                code,
                detail,
                spool.rejected_path,
            )
            return True
        if code in (401, 403):
            return self._failed(f"HTTP {code}: {detail} -- check the token and its role (needs worker)")
        return self._failed(f"HTTP {code}: {detail}")

    def _deliver_orphan(self) -> bool:
        """Delivers the first spool another run left behind: its run, its points, its final status."""
        if not self._orphans:
            return True
        orphan = self._orphans[0]
        try:
            created = self._ensure_run(orphan)
        except Refused as exc:
            logger.error("stagewatch: the server refused to create the run left in %s (%s)", orphan.directory, exc)
            orphan.release()
            self._orphans.pop(0)
            return True
        if not (created and self._reconcile(orphan) and self._rewind(orphan)):
            return False
        if not self._send_spool(orphan):
            return False
        status = orphan.meta.final_status
        if status is not None:
            assert orphan.meta.run_id is not None
            response = self._client.update_run(orphan.meta.run_id, {"status": status})
            if response.status_code != 200 and response.status_code not in REJECT_CODES:
                return self._failed(f"HTTP {response.status_code}: {error_detail(response)}")
            orphan.meta.final_status = None
            orphan.save_meta()
        logger.warning("stagewatch: delivered what run %s left in %s", orphan.meta.run_id, orphan.directory)
        orphan.release()
        self._orphans.pop(0)
        return True

    # --- memory -----------------------------------------------------------------------------------------

    def _drain(self) -> None:
        """Columns -> buffer; past ``max_memory_points`` the oldest half goes to the spool (caller holds the lock)."""
        taken = self.take_columns()
        if taken:
            buffer = self._buffer
            if buffer:
                buffer[-1].extend(taken)  # one chunk, however many drains an outage lasts
            else:
                buffer.append(taken)
            self._buffer_points += taken.points
        if self._buffer_points > self._options.max_memory_points:
            self._spill(self._take(self._buffer_points - self._options.max_memory_points // 2))

    def _take_batch(self) -> Columns:
        return self._take(self._options.batch_points)

    def _take(self, n: int) -> Columns:
        """The oldest ``n`` points of the buffer (fewer if it holds fewer), out of it (caller holds the lock)."""
        buffer = self._buffer
        taken = Columns()
        while buffer and taken.points < n:
            chunk = buffer.popleft()
            room = n - taken.points
            if chunk.points > room:
                chunk, rest = chunk.cut(room)
                buffer.appendleft(rest)
            if taken:
                taken.extend(chunk)
            else:
                taken = chunk
        self._buffer_points -= taken.points
        return taken

    def _spill(self, columns: Columns) -> None:
        """Appends points to the spool in batches (caller holds the lock)."""
        points = columns.to_points()
        size = self._options.batch_points
        for start in range(0, len(points), size):
            self.spool.append(points[start : start + size])

    # --- outages ----------------------------------------------------------------------------------------

    def _failed(self, reason: str) -> bool:
        self.note_outage(reason)
        self._backoff.failed()
        return False

    def note_outage(self, reason: str) -> None:
        if self._outage is None:
            logger.warning(
                "stagewatch: cannot reach the server for run %s (%s); training goes on, points are kept "
                "(in memory, then in %s) and sent when it answers again",
                self.run_id,
                reason,
                self.spool.pending_path,
            )
            self._outage = reason
