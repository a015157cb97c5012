"""The real service as a separate OS process (``python -m server.cli serve``), for tests that kill it.

Unlike the in-thread ``LiveServer`` of ``tests/conftest.py``, a :class:`ServerProcess` can be SIGKILLed -- no
graceful shutdown, no response to requests in flight, open transactions cut off -- and started again on the
same port, so that a client holding the URL sees a real crash and a real recovery.

```python
with ServerProcess(migrated_url, tmp_path) as server:
    httpx.get(f"{server.url}/healthz")
    server.kill()  # SIGKILL, reaped
    server.start()  # same port, waits for /healthz
```

The process's stdout and stderr go to files in ``log_dir`` (appended across restarts, so no pipe can fill up
and block the server); a start that fails raises with the tail of what the process wrote.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import httpx

from server.migrate import upgrade
from tests.conftest import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.05
TAIL_CHARS = 4000


class ServerError(RuntimeError):
    """The server process did not come up (it exited, or /healthz did not answer 200 in time)."""


class ServerProcess:
    """``python -m server.cli serve`` on 127.0.0.1 with auth off, on one port chosen once for every restart.

    The database is migrated (``server.migrate.upgrade``, a no-op when already at head) before the first start.
    """

    def __init__(
        self,
        database_url: str,
        log_dir: Path | None = None,
        *,
        port: int | None = None,
        start_timeout_s: float = START_TIMEOUT_S,
        stop_timeout_s: float = STOP_TIMEOUT_S,
        env: dict[str, str] | None = None,
    ) -> None:
        self.database_url = database_url
        self.env = dict(env or {})  # on top of this process's environment
        self.port = port if port is not None else free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="stagewatch-server-"))
        self.stdout_path = self.log_dir / "server.stdout.log"
        self.stderr_path = self.log_dir / "server.stderr.log"
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.popen: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._migrated = False
        # Where this start's output begins in each file, so that an error shows only what this process wrote.
        self._stdout_from = 0
        self._stderr_from = 0

    # --- lifecycle ------------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "server.cli",
            "serve",
            "--db",
            self.database_url,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--no-auth",
        ]

    def start(self) -> None:
        """Spawns the server and returns once ``GET /healthz`` answers 200; raises :class:`ServerError` with
        its output if it exits first or does not answer within ``start_timeout_s``."""
        if self.running:
            raise RuntimeError(f"the server (pid {self.pid}) is already running")
        if not self._migrated:
            upgrade(self.database_url)
            self._migrated = True
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # Only the command line configures it: a STAGEWATCH_DATABASE_URL of the caller's must not leak in.
        env.pop("STAGEWATCH_DATABASE_URL", None)
        env.update(self.env)
        with self.stdout_path.open("ab") as out, self.stderr_path.open("ab") as err:
            self._stdout_from, self._stderr_from = out.tell(), err.tell()
            # The child has its own copies of the descriptors; ours close when this block ends.
            self.popen = subprocess.Popen(self.command(), cwd=REPO_ROOT, env=env, stdout=out, stderr=err)
        self.starts += 1
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        popen = self.popen
        assert popen is not None
        deadline = time.monotonic() + self.start_timeout_s
        with httpx.Client(timeout=2.0) as http:
            while True:
                if popen.poll() is not None:
                    raise ServerError(
                        f"the server exited with status {popen.returncode} before answering /healthz\n{self.output()}"
                    )
                try:
                    if http.get(f"{self.url}/healthz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    self.kill()
                    raise ServerError(
                        f"no 200 from {self.url}/healthz within {self.start_timeout_s:g}s; killed it\n{self.output()}"
                    )
                # The poll interval: returns at once if the process exits meanwhile.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    popen.wait(timeout=POLL_INTERVAL_S)

    def kill(self) -> None:
        """SIGKILL (no graceful shutdown), then waits until the process is reaped. No-op if not running."""
        popen = self.popen
        if popen is None or popen.poll() is not None:
            return
        popen.send_signal(signal.SIGKILL)
        popen.wait(timeout=self.stop_timeout_s)

    def restart(self) -> None:
        """A crash and a recovery: :meth:`kill` (if running), then :meth:`start` on the same port."""
        self.kill()
        self.start()

    def stop(self) -> None:
        """A clean stop: SIGTERM, then SIGKILL if it has not exited within ``stop_timeout_s``."""
        popen = self.popen
        if popen is None or popen.poll() is not None:
            return
        popen.terminate()
        try:
            popen.wait(timeout=self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(timeout=self.stop_timeout_s)

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self.stop()

    def io_counters(self) -> dict[str, int] | None:
        """The running process's I/O counters from Linux's ``/proc/<pid>/io``: ``rchar``/``wchar`` are the bytes it
        has read/written so far through any descriptor (sockets and files alike). ``rchar`` grows as a request body
        arrives and ``wchar`` as a batch is written to the database, so a test can kill the server mid-request.
        ``None`` when not running or where the counters cannot be read (not Linux)."""
        if not self.running:
            return None
        try:
            with open(f"/proc/{self.pid}/io") as f:
                fields = (line.split(":", 1) for line in f if ":" in line)
                return {name.strip(): int(value) for name, value in fields}
        except (OSError, ValueError):
            return None

    # --- output ---------------------------------------------------------------------------------------------

    def output(self, chars: int = TAIL_CHARS) -> str:
        """The tail of what the current (or last) process wrote to stderr and stdout."""
        return (
            f"--- server stderr ({self.stderr_path}) ---\n{_tail(self.stderr_path, self._stderr_from, chars)}\n"
            f"--- server stdout ({self.stdout_path}) ---\n{_tail(self.stdout_path, self._stdout_from, chars)}"
        )


def _tail(path: Path, start: int, chars: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return "(no output)"
    return text[-chars:] if text else "(empty)"
