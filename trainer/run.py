"""``start_run`` and ``Run``: log metrics from a training loop without ever slowing it down, crashing it, or
losing a point.

The delivery guarantee: every point passed to ``log()`` is stored on the server exactly once -- through
outages, server restarts (SIGKILL included), slow answers and resumes. Only if this process dies can points be
lost, and then only those logged since the last successful ``flush()`` or ``checkpoint()``: what the server
has not stored yet is kept in memory, then in the run's spool directory, and whoever opens that spool next (a
resumed job, or the next job of the same server) delivers it. ``flush()`` returns True only when the server
has stored everything logged so far.

``Run`` is a short front; the work is done by small parts it owns:

- :class:`trainer.options.RunOptions` -- batching, retry, spool and timeout settings;
- :class:`trainer.sender.Sender` -- the thread that delivers points, acknowledgements, rewinds and orphans;
- :class:`trainer.spool.Spool` -- the crash-safe files of what is not delivered yet;
- :class:`trainer.poller.CommandPoller` -- the thread that long-polls for commands;
- :class:`trainer.backoff.Backoff` -- the retry policy every loop shares.

No thread outlives ``close()``.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import math
import numbers
import re
import threading
import time
import types
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import httpx

from trainer.backoff import Backoff
from trainer.client import Client, error_detail
from trainer.columns import LOCKED_WRITES, MAX_STEP, Block
from trainer.commands import Ack, Command, CommandInbox
from trainer.errors import AuthError, RunStateError, ServerError
from trainer.options import RunOptions
from trainer.poller import CommandPoller
from trainer.sender import Sender
from trainer.spool import META, Spool, SpoolMeta

__all__ = ["Run", "RunState", "start_run"]

logger = logging.getLogger("trainer")

_FAST_TYPES = (float, int)


class RunState(enum.Enum):
    UNOPENED = 1
    OPENED = 2
    CLOSED = 3


# Module constants rather than ``math.inf``, ``time.time``, ``trainer.columns.MAX_STEP`` in ``log()``: between
# torch operations each attribute lookup is a cache miss or two, and ``log()`` runs every step (-1.4 us a call there).
_INF = math.inf
_wall_clock = time.time
_MAX_STEP = MAX_STEP


def _checked_values(values: Mapping[str, Any]) -> dict[str, float]:
    """The slow path of ``Run.log``: anything but plain ``str`` keys and ``int``/``float`` values."""
    out: dict[str, float] = {}
    for key, value in values.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"metric keys must be non-empty strings, got {key!r}")
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            hint = " (call .item() on a tensor)" if hasattr(value, "item") else ""
            raise TypeError(f"metric {key!r}: expected a real number, got {type(value).__name__}{hint}")
        try:
            out[key] = float(value)
        except OverflowError:
            raise ValueError(f"metric {key!r}: {value!r} is too large for a float") from None
    return out


def _check_keys(keys: tuple[Any, ...]) -> None:
    for key in keys:
        if type(key) is not str or not key:
            raise TypeError(f"metric keys must be non-empty strings, got {key!r}")


def _dir_name(client_key: str) -> str:
    """A directory name for a client key: readable when the key is, unique either way."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", client_key)[:80]
    if safe == client_key:
        return f"key-{safe}"
    return f"key-{safe}-{hashlib.sha256(client_key.encode()).hexdigest()[:12]}"


class Run:
    """A run on the server, opened as a context manager; see :func:`start_run`.

    ```python
    with trainer.start_run("http://127.0.0.1:8765", name="mlp", config={"lr": 0.1}) as run:
        for step in range(1000):
            run.log({"loss": train_step()}, step=step)
    ```
    """

    def __init__(
        self,
        url: str,
        *,
        fields: Mapping[str, Any],
        token: str | None,
        run_id: int | None,
        client_key: str | None,
        resume_step: int | None,
        spool_dir: str | Path | None,
        options: RunOptions,
        transport: httpx.BaseTransport | None,
    ) -> None:
        if resume_step is not None:
            if type(resume_step) is not int or resume_step < 0:
                raise ValueError(f"resume_step must be an int >= 0, got {resume_step!r}")
            if run_id is None and client_key is None:
                raise ValueError("resume_step needs the run to resume: pass run_id or client_key")
        if client_key is not None and not (0 < len(client_key) <= 200 and client_key.isprintable()):
            raise ValueError(f"client_key must be 1..200 printable characters, got {client_key!r}")
        self.state = RunState.UNOPENED
        self.options = options
        self._url = url
        self._token = token
        self._transport = transport
        self._fields = {k: v for k, v in fields.items() if v is not None}
        self._run_id = run_id
        # A new run gets a key of its own, so that a create retried after a lost answer never makes two runs.
        self._client_key = client_key if client_key is not None or run_id is not None else uuid.uuid4().hex
        self._resume_step = resume_step
        self._spool_dir = Path(spool_dir) if spool_dir is not None else None
        self.should_stop = False  # set by a ``stop`` command once applied (see trainer.torch)
        self._inbox = CommandInbox()
        self._client: Client | None = None
        self._sender: Sender | None = None
        # What log() touches, in attributes of their own: between torch operations each lookup is a cache miss.
        self._blocks: dict[tuple[str, ...], Block] | None = None  # the sender's recorder's, while open
        self._wake = threading.Event()  # the sender's, once open
        self._poller: CommandPoller | None = None

    # --- what callers read ------------------------------------------------------------------------------

    @property
    def id(self) -> int | None:
        """The server's id of the run; ``None`` until the server has created it (it may be down at start)."""
        return self._sender.spool.meta.run_id if self._sender is not None else self._run_id

    @property
    def client_key(self) -> str | None:
        return self._sender.spool.meta.client_key or None if self._sender is not None else self._client_key

    @property
    def spool(self) -> Spool:
        """The run's spool (see :mod:`trainer.spool`); only while the run is or was open."""
        if self._sender is None:
            raise RunStateError("the run has no spool before it is opened")
        return self._sender.spool

    @property
    def points_sent(self) -> int:
        """Points the server has stored from this process (its answers' ``accepted``, summed)."""
        return self._sender.points_sent if self._sender is not None else 0

    @property
    def batches_sent(self) -> int:
        """Metric POSTs of this process the server has stored: ``points_sent / batches_sent`` is the batch size."""
        return self._sender.batches_sent if self._sender is not None else 0

    @property
    def points_rejected(self) -> int:
        return self._sender.points_rejected if self._sender is not None else 0

    # --- lifecycle --------------------------------------------------------------------------------------

    def __enter__(self) -> Run:
        if self.state is not RunState.UNOPENED:
            raise RunStateError(
                "this run is already open" if self.state is RunState.OPENED else "a closed run cannot be reopened"
            )
        self.state = RunState.CLOSED  # until everything below worked
        options = self.options
        client = Client(self._url, token=self._token, timeout=options.timeout, transport=self._transport)
        meta = SpoolMeta(
            url=client.base_url, client_key=self._client_key or "", run_id=self._run_id, create=self._fields
        )
        directory = self._spool_dir if self._spool_dir is not None else self._default_spool_dir(client.base_url)
        orphans: list[Spool] = []
        try:
            spool, orphans = Spool.open(directory, meta, resume_step=self._resume_step)
        except BaseException:
            client.close()
            raise
        try:
            if self._spool_dir is None:  # jobs of this server that ended with data still owed
                orphans += Spool.adopt_all(options.spool_root, url=client.base_url, only_finished=True)
            needs_running = self._open(client, spool)
        except BaseException:
            for s in (spool, *orphans):
                s.release()
            client.close()
            raise
        self._client = client
        self._sender = sender = Sender(
            client, spool, options, self._inbox, needs_running=needs_running, orphans=orphans
        )
        sender.piggyback_at = time.monotonic()  # the first poll waits for command_idle_s without a batch
        poll_client = Client(self._url, token=self._token, timeout=options.timeout, transport=self._transport)
        self._poller = CommandPoller(
            poll_client,
            self._inbox,
            options,
            run_id=lambda: spool.meta.run_id,
            piggyback_at=lambda: sender.piggyback_at,
        )
        sender.start()
        self._poller.start()
        self._wake = sender.wake
        self._blocks = sender.recorder.blocks
        self.state = RunState.OPENED
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self.close("failed" if exc_type is not None else "finished")

    def _default_spool_dir(self, url: str) -> Path:
        root = self.options.spool_root
        if self._run_id is None:
            assert self._client_key is not None
            return root / _dir_name(self._client_key)
        # A job resumed by id: the directory its earlier process used, whatever it was named.
        try:
            for child in sorted(root.iterdir()):
                meta = SpoolMeta.load(child / META) if child.is_dir() else None
                if meta is not None and meta.url == url and meta.run_id == self._run_id:
                    return child
        except FileNotFoundError:
            pass
        return root / f"run-{self._run_id}"

    def _open(self, client: Client, spool: Spool) -> bool:
        """Creates or resumes the run; returns whether it still has to be marked ``running``. Refusals that
        retrying cannot fix raise; an unreachable or failing server leaves it to the sender thread."""
        meta = spool.meta
        try:
            if meta.run_id is None:
                response = client.create_run({**meta.create, "client_key": meta.client_key})
                if response.status_code in (200, 201):
                    meta.run_id = int(response.json()["id"])
                    if response.status_code == 201 and meta.rewind_seen is None:
                        # New on the server, so it has no rewinds: the sender need not ask (one request and
                        # a metadata write less, in the first seconds of training).
                        meta.rewind_seen = 0
                    spool.save_meta()
                    if response.status_code == 201:
                        return False
                    response = client.update_run(meta.run_id, {"status": "running"})  # it existed: resumed
                    if response.status_code == 200:
                        return False
                    _raise_for_refusal(response, f"resume run {meta.run_id}")
                else:
                    _raise_for_refusal(response, "create the run")
            else:
                response = client.get_run(meta.run_id)
                if response.status_code == 200:
                    if not meta.client_key:
                        meta.client_key = response.json().get("client_key") or ""
                        spool.save_meta()
                    response = client.update_run(meta.run_id, {"status": "running"})
                    if response.status_code == 200:
                        return False
                _raise_for_refusal(response, f"resume run {meta.run_id}")
        except httpx.TransportError as exc:
            logger.debug("stagewatch: could not open run %s now (%s); the sender retries", meta.run_id, exc)
        return meta.run_id is not None

    def close(self, status: str = "finished") -> None:
        """Delivers what is left (up to ``close_timeout_s``) and marks the run ``status``, retrying with backoff
        within that time. What the server could not take by then -- points, and the status itself -- stays in
        the spool for the next process. Stops every thread of the run. Closing twice is a no-op."""
        if self.state is not RunState.OPENED:
            self.state = RunState.CLOSED
            return
        self.state = RunState.CLOSED
        self._blocks = None
        sender, poller, client = self._sender, self._poller, self._client
        assert sender is not None and poller is not None and client is not None
        deadline = time.monotonic() + self.options.close_timeout_s
        try:
            sender.flush(timeout=self.options.close_timeout_s)
        finally:
            sender.stop(timeout=self.options.timeout + 5)
            spool = sender.spool
            meta = spool.meta
            if spool.has_pending() or meta.run_id is None or meta.pending_rewind is not None:
                # The status must not arrive before the points: the next process sends both, in order.
                meta.final_status = status
            elif not self._send_status(client, meta.run_id, status, deadline):
                meta.final_status = status
            spool.save_meta()
            poller.stop(timeout=self.options.command_wait_s + self.options.timeout)
            if meta.final_status is not None:
                logger.warning(
                    "stagewatch: run %s closed before the server took everything; what is left (%s) is kept in %s "
                    "and delivered by the next process that opens it",
                    meta.run_id,
                    "points and the final status" if spool.has_pending() else "the final status",
                    spool.directory,
                )
            if sender.acks:
                logger.warning(
                    "stagewatch: run %s closed before the server acknowledged command(s) %s; a job resumed from "
                    "a checkpoint that holds the CommandApplier state acknowledges them again",
                    meta.run_id,
                    ", ".join(str(a.command_id) for a in sender.acks),
                )
            spool.release()
            client.close()

    def _send_status(self, client: Client, run_id: int, status: str, deadline: float) -> bool:
        """PATCHes the final status, retrying transient failures with backoff until ``deadline``."""
        backoff = Backoff(self.options.retry_max_s)
        while True:
            try:
                response = client.update_run(run_id, {"status": status})
                if response.status_code == 200:
                    return True
                reason = f"HTTP {response.status_code}: {error_detail(response)}"
                if 400 <= response.status_code < 500 and response.status_code not in (401, 403, 408, 429):
                    logger.warning("stagewatch: the server refused to mark run %s %s (%s)", run_id, status, reason)
                    return True  # nothing a retry can fix
            except httpx.TransportError as exc:
                reason = f"{type(exc).__name__}: {exc}"
            delay = backoff.failed()
            if time.monotonic() + delay > deadline:
                logger.warning("stagewatch: could not mark run %s %s (%s)", run_id, status, reason)
                return False
            time.sleep(delay)

    # --- the training loop's side -----------------------------------------------------------------------

    def log(self, values: Mapping[str, float], *, step: int, epoch: float | None = None, urgent: bool = False) -> None:
        """Queues one point per key at ``step``; returns at once (no I/O).

        Values must be real numbers (``float``, ``int``, numpy scalars); NaN and infinities are fine and
        arrive as such. Anything else raises ``TypeError`` here, in the training loop, because it is a bug; so
        does a step that is not an ``int`` (``ValueError`` below 0 or above 2**53, the largest a double -- and the
        dashboard -- holds exactly). Safe to call from several threads.

        ``urgent=True`` wakes the sender now instead of at the next ``batch_interval_s`` (still no I/O here):
        use it for the points a server-side detector watches (say, per-epoch losses), so that its decision
        comes back within milliseconds rather than a batch interval later.
        """
        blocks = self._blocks  # the recorder's blocks while the run is open, else None
        if blocks is None:
            raise RunStateError(f"cannot log to a run that is {self.state.name.lower()}; use `with start_run(...)`")
        if type(step) is not int or not 0 <= step <= _MAX_STEP:
            if isinstance(step, bool) or not isinstance(step, int):
                raise TypeError(f"step must be an int, got {type(step).__name__}")
            if step < 0:
                raise ValueError(f"step must be >= 0, got {step}")
            raise ValueError(f"step must be <= 2**53 (exact in a double, and in the dashboard), got {step}")
        # Everything is checked before anything is stored: a call that raises leaves no point behind. Plain
        # floats pass at once; the rest (ints, numpy scalars) are converted by the slow path first.
        for value in values.values():
            if type(value) is not float:
                values = _checked_values(values)
                break
        if type(epoch) is float and 0.0 <= epoch < _INF:  # the usual case first: step / steps_per_epoch
            epoch_value = epoch
        elif epoch is None:
            epoch_value = math.nan  # "no epoch" in trainer.columns
        elif (type(epoch) in _FAST_TYPES and 0 <= epoch < math.inf) or (
            isinstance(epoch, numbers.Real) and epoch >= 0 and epoch != math.inf
        ):
            epoch_value = float(epoch)
        else:
            raise TypeError(f"epoch must be a finite number >= 0, got {epoch!r}")
        keys = tuple(values)
        if not keys:
            return
        block = blocks.get(keys)
        if block is None or LOCKED_WRITES:  # keys not seen yet (checked once), or a free-threaded build
            block = self._append_slow(keys, [step, epoch_value, _wall_clock(), *values.values()])
        else:
            # The whole row in one call, so no lock (trainer.columns.Recorder); nothing it leaves behind is an
            # object the garbage collector counts.
            block.rows.fromlist([step, epoch_value, _wall_clock(), *values.values()])  # values in order of keys
        n = len(block.rows)
        if n == block.wake_len or urgent:
            self._wake.set()
        elif n > block.max_len:
            self._overflow()

    def _append_slow(self, keys: tuple[str, ...], row: list[float]) -> Block:
        _check_keys(keys)
        sender = self._sender
        assert sender is not None
        return sender.recorder.append(keys, row)

    def _overflow(self) -> None:
        sender = self._sender
        if sender is not None:
            sender.overflow()

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
        checkpoint: Mapping[str, Any] | None = None,
    ) -> None:
        """Queues the acknowledgement of a command (``status`` ``"applied"`` or ``"failed"``, at ``step``, with
        the LR now in effect) and drops it from :meth:`pending_commands`. No I/O: the sender thread posts it,
        retrying through outages; :meth:`flush` waits for it too. ``checkpoint``: one saved just before it was
        applied (the fields of ``POST /runs/{id}/checkpoints``), recorded on the server with the acknowledgement."""
        sender = self._sender
        if self.state is not RunState.OPENED or sender is None:
            raise RunStateError(f"cannot acknowledge a command on a run that is {self.state.name.lower()}")
        if status not in ("applied", "failed"):
            raise ValueError(f"status must be 'applied' or 'failed', got {status!r}")
        if type(step) is not int or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        self._inbox.retire(command_id)
        sender.acks.append(
            Ack(command_id, "applied" if status == "applied" else "failed", step, lr, message, checkpoint=checkpoint)
        )
        sender.wake.set()

    def ack_rollback(self, command_id: int, *, step: int, lr: float | None, message: str = "", timeout: float) -> bool:
        """Acknowledges a rollback this job applied: it loaded the checkpoint at ``step`` and logs the steps after
        it again. Call it after :meth:`flush` returned True and before logging anything more: the run is rewound
        to ``step`` (the points after it move to the audit log), then the acknowledgement goes out, and only
        then what the job logs next. Waits up to ``timeout`` seconds for both (the training loop is at a step
        boundary); returns whether they got through -- if not, they keep that order when the server answers."""
        sender = self._sender
        if self.state is not RunState.OPENED or sender is None:
            raise RunStateError(f"cannot acknowledge a command on a run that is {self.state.name.lower()}")
        spool = sender.spool
        spool.meta.pending_rewind = step  # before the acknowledgement, and kept on disk: a resumed job makes it
        spool.save_meta()
        self.ack_command(command_id, status="applied", step=step, lr=lr, message=message)
        return sender.flush(timeout)

    def flush(self, timeout: float | None = None) -> bool:
        """Waits until the server has stored every point logged so far (and every acknowledgement).

        Returns ``True`` when it has, ``False`` when ``timeout`` seconds passed first (the points are kept
        and still sent later). Never raises for network trouble. ``timeout=None`` waits as long as it takes.
        """
        if self._sender is None:
            raise RunStateError("cannot flush a run that has not been opened")
        return self._sender.flush(timeout)

    def sync_detection(self, timeout: float = 30.0) -> bool:
        """Waits until the server has stored every point logged so far, its live detection has examined them,
        and this job holds every command that produced (they are then in :meth:`pending_commands`). Blocks the
        caller: for tests and benchmarks that need a decision to land at the same step on any machine. Returns
        ``False`` if that did not happen within ``timeout`` seconds (nothing is lost: it just did not wait)."""
        sender, client = self._sender, self._client
        if sender is None or client is None or self.state is not RunState.OPENED:
            raise RunStateError("cannot sync detection of a run that is not open")
        deadline = time.monotonic() + timeout
        if not sender.flush(timeout) or self.id is None:
            return False
        try:
            response = client.get_detection(self.id, wait=max(0.0, min(60.0, deadline - time.monotonic())))
            if response.status_code != 200 or not response.json().get("caught_up"):
                return False
            response = client.get_commands(self.id, after=self._inbox.last_id, wait=0)
            if response.status_code != 200:
                return False
            self._inbox.add_json(response.json().get("data") or [], run_id=self.id)
        except (httpx.TransportError, ValueError):
            return False
        return True

    def checkpoint(self, timeout: float = 5.0) -> bool:
        """Makes every point logged so far survive a crash of this process: waits up to ``timeout`` for the
        server to store them, then writes whatever it has not stored to the spool (on disk), where the next
        process that opens the spool finds it. Call it when you save a checkpoint (the integrations do).
        Returns ``True`` when the server has stored everything, ``False`` when part of it is in the spool."""
        if self._sender is None:
            raise RunStateError("cannot checkpoint a run that has not been opened")
        if self._sender.flush(timeout):
            return True
        self._sender.persist(timeout=self.options.timeout)
        return False


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
    client_key: str | None = None,
    resume_step: int | None = None,
    detector: Mapping[str, Any] | None = None,
    mode: str | None = None,
    auto_approve_after_s: float | None = None,
    spool_dir: str | Path | None = None,
    options: RunOptions | None = None,
    transport: httpx.BaseTransport | None = None,
    **tuning: Any,
) -> Run:
    """A run to open with ``with``: creates it on the server (or resumes it), marks it ``finished`` on a
    normal exit and ``failed`` when the block raises (the exception propagates).

    ```python
    with start_run("http://127.0.0.1:8765", name="resnet18", config={"lr": 0.1}, token=token) as run:
        run.log({"loss": 0.3, "lr": 0.1}, step=123)
    ```

    Which run:

    - neither ``run_id`` nor ``client_key``: a new run (with a random client key of its own);
    - ``client_key="job-42"``: the run with that key, created if the server has none -- pass the same key
      when a crashed job restarts, and it continues the same run even if the server never answered before;
    - ``run_id=N``: resume run N.

    ``resume_step`` (with ``run_id`` or ``client_key``): the job restarted from a checkpoint at that step.
    Before anything else is sent the run is rewound there (``POST /runs/{id}/rewind``: later points move to the
    audit log), and what the dead process left in the spool after that step is dropped, so every step is
    stored once, with the values of the resumed job.

    ``spool_dir`` (default ``~/.stagewatch/spool/<run>``): where points wait that the server has not stored;
    keep it with your checkpoints so that a resumed job finds it. ``detector`` (``{"name": "autodecay",
    "metric": "epoch/train_loss", "params": {...}}``), ``mode`` (``auto``, ``approve`` or ``observe``) and
    ``auto_approve_after_s`` configure the server's stage detection of a new run; ignored when resuming.

    Tuning: ``options=RunOptions(...)`` or its fields as keywords (``timeout``, ``batch_points``,
    ``retry_max_s``, ``close_timeout_s``, ``command_wait_s``, ...; see :class:`trainer.options.RunOptions`).
    Commands from the server are read with :meth:`Run.pending_commands` and applied with
    :class:`trainer.torch.CommandApplier`.

    ``transport``: an httpx transport every request goes through (instrumentation, a custom proxy, tests).
    Without one, metric batches go over libcurl (:mod:`trainer.curl`), which holds no GIL while a batch is on
    the wire, and the other requests over httpx's default transport.
    """
    if options is None:
        options = RunOptions(**tuning)
    elif tuning:
        raise TypeError(f"pass tuning either as options= or as keywords, not both: {sorted(tuning)}")
    fields = {
        "name": name,
        "project": project,
        "tags": list(tags),
        "notes": notes,
        "config": dict(config or {}),
        "detector": dict(detector) if detector is not None else None,
        "mode": mode,
        "auto_approve_after_s": auto_approve_after_s,
    }
    return Run(
        url,
        fields=fields,
        token=token,
        run_id=run_id,
        client_key=client_key,
        resume_step=resume_step,
        spool_dir=spool_dir,
        options=options,
        transport=transport,
    )


def _raise_for_refusal(response: httpx.Response, what: str) -> None:
    """Raises for 4xx answers; returns for 5xx and other transient ones."""
    code = response.status_code
    detail = error_detail(response)
    if code in (401, 403):
        raise AuthError(f"could not {what}: HTTP {code}: {detail}", status_code=code, detail=detail)
    if 400 <= code < 500 and code not in (408, 429):
        raise ServerError(f"could not {what}: HTTP {code}: {detail}", status_code=code, detail=detail)
