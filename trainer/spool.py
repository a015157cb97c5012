"""A run's spool: the directory that holds what the server has not acknowledged yet, so a crash loses nothing.

Files in a spool directory:

- ``meta.json`` -- whose data this is: the server ``url``, the run's ``client_key`` and ``run_id`` (``null``
  while the server has never answered), the fields to create the run with, the last rewind of the run the
  writer knew (``rewind_seen``, an audit event id), a rewind still to be made (``pending_rewind``) and a final
  status ``close()`` could not deliver (``final_status``). Replaced atomically.
- ``pending.jsonl`` -- batches this process could not deliver yet, one ``{"points": [...]}`` per line in the
  wire format, appended in one ``write`` each and read from a remembered offset.
- ``inherited.jsonl`` -- what earlier processes of the same run left behind, cleaned up when this process
  opened the spool (torn or unreadable lines dropped with a warning, points after the resume step dropped) and
  reconciled with the server's rewinds before any of it is sent.
- ``rejected.jsonl`` -- batches the server refused for good (409, 422, ...), each with the server's answer.
- ``lock`` -- held (``flock``) by the process that owns the spool, so that two processes never send it twice.

A spool directory belongs to one run. Data of another run found in it (a crashed job of a *new* run whose
directory is reused) is moved to ``orphans/<key>/`` and delivered to its own run. Writers hold the run's lock;
the sender thread is the only reader. A line written twice to the server (a crash between the send and the
offset update) is harmless: the server's ingest is idempotent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trainer.errors import RunStateError

__all__ = ["Spool", "SpoolBusy", "SpoolMeta", "encode_batch"]

logger = logging.getLogger("trainer")

META = "meta.json"
PENDING = "pending.jsonl"
INHERITED = "inherited.jsonl"
REJECTED = "rejected.jsonl"
LOCK = "lock"
ORPHANS = "orphans"
_DATA = (META, PENDING, INHERITED, REJECTED)


def encode_batch(points: list[dict[str, Any]]) -> bytes:
    """A request body; ``allow_nan=False`` because non-finite values travel as strings already."""
    return json.dumps({"points": points}, separators=(",", ":"), allow_nan=False).encode()


class SpoolBusy(RunStateError):
    """Another live process holds this spool directory."""


@dataclasses.dataclass
class SpoolMeta:
    """Whose data a spool holds and what is still owed to the server besides points (see the module doc)."""

    url: str
    client_key: str
    run_id: int | None = None
    create: dict[str, Any] = dataclasses.field(default_factory=dict)
    rewind_seen: int | None = None  # for pending.jsonl; None: the writer never learned it
    inherited_rewind_seen: int | None = None  # the same for inherited.jsonl
    pending_rewind: int | None = None
    final_status: str | None = None

    @classmethod
    def load(cls, path: Path) -> SpoolMeta | None:
        try:
            raw = json.loads(path.read_bytes())
            names = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in raw.items() if k in names})
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:
            logger.warning("stagewatch: ignoring an unreadable spool file %s (%s)", path, exc)
            return None

    def belongs_to(self, other: SpoolMeta) -> bool:
        """Same run: the same server and the same run id or client key."""
        if self.url != other.url:
            return False
        if self.run_id is not None and self.run_id == other.run_id:
            return True
        return bool(self.client_key) and self.client_key == other.client_key


class Spool:
    """One run's spool directory, locked by this process from :meth:`open` to :meth:`release`."""

    def __init__(self, directory: Path, meta: SpoolMeta) -> None:
        self.directory = directory
        self.meta = meta
        self.pending_path = directory / PENDING
        self.inherited_path = directory / INHERITED
        self.rejected_path = directory / REJECTED
        self._offsets = {INHERITED: 0, PENDING: 0}  # bytes already acknowledged by the server
        self._lock_fd: int | None = None
        self.points_written = 0
        self.inherited_points = 0  # kept from earlier processes when this one opened the spool
        # True once truncate_if_done found every data file sent and removed them; any write makes it False.
        # The sender checks the spool every cycle: without this, that is a stat, an open and an unlink per file,
        # each a system call that hands the GIL to the training thread and waits to get it back.
        self._empty = False

    # --- ownership --------------------------------------------------------------------------------------

    @classmethod
    def open(cls, directory: Path, meta: SpoolMeta, *, resume_step: int | None = None) -> tuple[Spool, list[Spool]]:
        """Locks ``directory`` for this run. What an earlier process of the same run left becomes
        ``inherited.jsonl`` (without points after ``resume_step``); what another run left is moved to
        ``orphans/`` and returned, with the orphans already there, as spools to deliver (each locked)."""
        spool = cls(directory, meta)
        spool._lock(block=False)
        try:
            old = SpoolMeta.load(directory / META)
            orphans: list[Spool] = []
            if old is not None and not old.belongs_to(meta):
                if spool._holds_data() or old.final_status is not None:  # owed to another run: deliver it there
                    orphans.append(spool._evict(old))
            elif old is not None or spool._holds_data():
                spool._inherit(old, resume_step)
            if meta.pending_rewind is None and resume_step is not None:
                meta.pending_rewind = resume_step
            spool.save_meta()
            orphans += cls.adopt_all(directory / ORPHANS, url=meta.url)
            return spool, orphans
        except BaseException:
            spool.release()
            raise

    @classmethod
    def adopt_all(cls, root: Path, *, url: str, only_finished: bool = False) -> list[Spool]:
        """The spools under ``root`` of the server ``url`` that no live process holds, locked and cleaned up
        for delivery. With ``only_finished``, only those no one will resume: never created on the server, or
        closed with a final status still to deliver."""
        found: list[Spool] = []
        try:
            children = sorted(p for p in root.iterdir() if p.is_dir())
        except FileNotFoundError:
            return found
        for child in children:
            meta = SpoolMeta.load(child / META)
            if meta is None or meta.url != url:
                continue
            if only_finished and meta.run_id is not None and meta.final_status is None:
                continue
            spool = cls(child, meta)
            try:
                spool._lock(block=False)
            except SpoolBusy:
                continue
            spool._inherit(meta, None)
            spool.save_meta()
            found.append(spool)
        return found

    def _lock(self, *, block: bool) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise SpoolBusy(
                f"the spool {self.directory} is held by another live process of this run; give each process its "
                "own spool_dir, or stop the other one first"
            ) from None
        self._lock_fd = fd

    def release(self) -> None:
        """Unlocks; removes the directory when nothing in it is owed to anyone (no pending, no rejected)."""
        if self._lock_fd is None:
            return
        if not self.has_pending() and not self.rejected_path.exists() and self.meta.final_status is None:
            self._remove_files()
        os.close(self._lock_fd)
        self._lock_fd = None

    def _holds_data(self) -> bool:
        return any((self.directory / name).exists() and (self.directory / name).stat().st_size for name in _DATA[1:])

    def _evict(self, old: SpoolMeta) -> Spool:
        """Moves another run's leftovers to ``orphans/<its key>`` (renames within one file system: atomic)."""
        target = self.directory / ORPHANS / f"{old.client_key or uuid.uuid4().hex}"
        target.mkdir(parents=True, exist_ok=True)
        for name in _DATA:
            with contextlib.suppress(FileNotFoundError):
                os.replace(self.directory / name, target / name)
        logger.warning(
            "stagewatch: %s held data of another run (%s); it is delivered to that run from %s",
            self.directory,
            f"run {old.run_id}" if old.run_id is not None else f"client_key {old.client_key}",
            target,
        )
        orphan = Spool(target, old)
        orphan._lock(block=False)
        orphan._inherit(old, None)
        return orphan

    def _inherit(self, old: SpoolMeta | None, resume_step: int | None) -> None:
        """Earlier processes' data -> ``inherited.jsonl``, whole lines only, nothing after ``resume_step``."""
        if old is not None and old is not self.meta:
            if self.meta.run_id is None:
                self.meta.run_id = old.run_id
            if self.meta.pending_rewind is None and old.pending_rewind is not None and resume_step is None:
                self.meta.pending_rewind = old.pending_rewind
            self.meta.final_status = None  # this process is the run now; it sends its own
        # The rewinds the writers of the data knew; unknown for either file makes the merge unknown.
        seen: list[int | None] = []
        if self.inherited_path.exists():
            seen.append(old.inherited_rewind_seen if old is not None else None)
        if self.pending_path.exists():
            seen.append(old.rewind_seen if old is not None else None)
        kept, lines = self._rewrite([self.inherited_path, self.pending_path], keep_through=resume_step)
        known = [v for v in seen if v is not None]
        self.meta.inherited_rewind_seen = min(known) if known and len(known) == len(seen) else None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.pending_path)
        self.inherited_points = kept
        if lines:
            logger.warning(
                "stagewatch: %s points left by an earlier process in %s are sent first%s",
                kept,
                self.directory,
                "" if resume_step is None else f" (without those after the resume step {resume_step})",
            )

    def drop_inherited_after(self, step: int) -> int:
        """After a rewind to ``step`` that the inherited data predates: drops its points after ``step``."""
        before = self.inherited_points
        self.inherited_points, _ = self._rewrite([self.inherited_path], keep_through=step)
        self._offsets[INHERITED] = 0
        return before - self.inherited_points

    def _rewrite(self, sources: list[Path], *, keep_through: int | None) -> tuple[int, int]:
        """Concatenates ``sources`` into ``inherited.jsonl`` (atomically), keeping whole, readable lines and
        points at steps <= ``keep_through``. Returns (points kept, lines written)."""
        self._empty = False
        tmp = self.directory / (INHERITED + ".tmp")
        kept = lines = 0
        with tmp.open("wb") as out:
            for source in sources:
                try:
                    data = source.read_bytes()
                except FileNotFoundError:
                    continue
                for number, line in enumerate(data.split(b"\n"), 1):
                    points = self._parse(source, number, line, torn=not data.endswith(b"\n"))
                    if keep_through is not None:
                        points = [p for p in points if p["step"] <= keep_through]
                    if points:
                        out.write(encode_batch(points) + b"\n")
                        kept += len(points)
                        lines += 1
            out.flush()
            os.fsync(out.fileno())
        if lines:
            os.replace(tmp, self.inherited_path)
        else:
            tmp.unlink()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.inherited_path)
        return kept, lines

    @staticmethod
    def _parse(source: Path, number: int, line: bytes, *, torn: bool) -> list[dict[str, Any]]:
        if not line:
            return []
        try:
            points = json.loads(line)["points"]
            if not isinstance(points, list) or not all(isinstance(p, dict) and type(p["step"]) is int for p in points):
                raise ValueError("not a batch of points")
            return points
        except (ValueError, KeyError, TypeError) as exc:
            what = "a line cut short by a crash" if torn else f"an unreadable line ({exc})"
            logger.warning("stagewatch: skipping %s at %s:%d", what, source, number)
            return []

    def save_meta(self) -> None:
        tmp = self.directory / (META + ".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self.meta), separators=(",", ":")))
        os.replace(tmp, self.directory / META)

    def _remove_files(self) -> None:
        for name in (*_DATA, LOCK):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.directory / name)
        if self.directory.parent.name == ORPHANS:
            shutil.rmtree(self.directory, ignore_errors=True)
        with contextlib.suppress(OSError):  # not empty: the user's own files, or orphans still owed
            self.directory.rmdir()

    # --- data -------------------------------------------------------------------------------------------

    def append(self, points: list[dict[str, Any]]) -> None:
        """Appends one batch to ``pending.jsonl`` in a single write (a crash can only cut the last line)."""
        self._empty = False
        with self.pending_path.open("ab") as f:
            f.write(encode_batch(points) + b"\n")
        self.points_written += len(points)

    def sync(self) -> None:
        """Forces ``pending.jsonl`` to disk (a checkpoint should not outlive the points it covers)."""
        try:
            fd = os.open(self.pending_path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def reject(self, body: bytes, status_code: int, detail: str) -> None:
        """Keeps a batch the server refused for good, with its answer."""
        record = {"status_code": status_code, "detail": detail, "batch": json.loads(body)}
        with self.rejected_path.open("ab") as f:
            f.write(json.dumps(record, separators=(",", ":"), allow_nan=False).encode() + b"\n")

    def has_pending(self) -> bool:
        if self._empty:
            return False
        return any(self._unsent(name) for name in self._offsets)

    def _unsent(self, name: str) -> bool:
        try:
            return (self.directory / name).stat().st_size > self._offsets[name]
        except FileNotFoundError:
            return False

    def batches(self) -> Iterator[tuple[bytes, str, int]]:
        """Yields ``(body, file, end_offset)`` for each unacknowledged whole line, inherited ones first; call
        :meth:`ack` after each."""
        if self._empty:
            return
        for name in (INHERITED, PENDING):
            try:
                f = (self.directory / name).open("rb")
            except FileNotFoundError:
                continue
            with f:
                f.seek(self._offsets[name])
                while True:
                    line = f.readline()
                    if not line.endswith(b"\n"):  # EOF, or a line being appended right now
                        break
                    yield line.rstrip(b"\n"), name, f.tell()

    def ack(self, name: str, end_offset: int) -> None:
        self._offsets[name] = end_offset

    def truncate_if_done(self) -> None:
        """Deletes the data files once all of them are acknowledged."""
        if self._empty:
            return
        done = 0
        for name in self._offsets:
            if not self._unsent(name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.directory / name)
                self._offsets[name] = 0
                done += 1
        self._empty = done == len(self._offsets)
