"""The real ``stagewatch`` console script, run as a subprocess with HOME in a temporary directory (so the
embedded default database lands there): db, token, serve (refusals, and a real server with auth) and demo."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from server.db import make_engine, make_session_factory, transaction
from server.migrate import current_revision, head_revision, upgrade
from server.store.tokens import create_token as store_create_token
from tests.conftest import free_port

pytestmark = pytest.mark.slow  # see the tiers in the README (make test-fast leaves these out)

STAGEWATCH = Path(sys.executable).parent / "stagewatch"
COMMAND_TIMEOUT_S = 60
START_TIMEOUT_S = 30
STOP_TIMEOUT_S = 10


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


def cli_env(home: Path) -> dict[str, str]:
    # Nothing from the developer's environment may choose the database or the settings.
    env = {k: v for k, v in os.environ.items() if not k.startswith("STAGEWATCH_")}
    env["HOME"] = str(home)
    return env


def stagewatch(home: Path, *args: str, timeout: float = COMMAND_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(STAGEWATCH), *args],
        env=cli_env(home),
        cwd=home,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result.stdout


def schema_revision(url: str) -> str | None:
    engine = make_engine(url)
    try:
        return current_revision(engine)
    finally:
        engine.dispose()


class Process:
    """A long-running ``stagewatch`` subprocess whose output goes to files (no pipe can fill up and block)."""

    def __init__(self, popen: subprocess.Popen[bytes], stdout: Path, stderr: Path) -> None:
        self.popen = popen
        self.stdout_path = stdout
        self.stderr_path = stderr

    def output(self) -> str:
        return f"stdout:\n{self.stdout_path.read_text()}\nstderr:\n{self.stderr_path.read_text()}"

    def wait_healthy(self, base_url: str) -> httpx.Response:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.popen.poll() is not None:
                pytest.fail(f"stagewatch exited with {self.popen.returncode} before serving\n{self.output()}")
            try:
                response = httpx.get(f"{base_url}/healthz", timeout=2)
                if response.status_code == 200:
                    return response
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no healthy answer at {base_url}/healthz in {START_TIMEOUT_S}s\n{self.output()}")
            time.sleep(0.1)


@contextmanager
def running(home: Path, *args: str) -> Iterator[Process]:
    """Start ``stagewatch ARGS`` and always stop it again (terminate, then kill), whatever the test did."""
    stdout, stderr = home.parent / "server.out", home.parent / "server.err"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        popen = subprocess.Popen([str(STAGEWATCH), *args], env=cli_env(home), cwd=home, stdout=out, stderr=err)
        try:
            yield Process(popen, stdout, stderr)
        finally:
            if popen.poll() is None:
                popen.terminate()
                try:
                    popen.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    popen.kill()
                    popen.wait(timeout=STOP_TIMEOUT_S)


def create_token(home: Path, url: str, role: str, name: str) -> str:
    result = stagewatch(home, "token", "create", "--role", role, "--name", name, "--db", url)
    lines = ok(result).splitlines()
    assert len(lines) == 1, result.stdout
    token = lines[0].strip()
    assert token.startswith("sw_") and len(token) > 40, token
    assert f"({role}, '{name}')" in result.stderr
    return token


def token_rows(home: Path, url: str) -> dict[int, list[str]]:
    rows: dict[int, list[str]] = {}
    for line in ok(stagewatch(home, "token", "list", "--db", url)).splitlines():
        token_id, *fields = line.split("\t")
        rows[int(token_id)] = fields
    return rows


def test_db_upgrade_then_current_prints_head(home: Path, db_url: str) -> None:
    head = head_revision()
    assert "current: (empty)" in ok(stagewatch(home, "db", "current", "--db", db_url))
    assert f"current: {head}  head: {head}" in ok(stagewatch(home, "db", "upgrade", "--db", db_url))
    assert ok(stagewatch(home, "db", "current", "--db", db_url)).strip() == f"current: {head}  head: {head}"
    assert schema_revision(db_url) == head


def test_serve_refuses_unmigrated_explicit_database(home: Path, db_url: str) -> None:
    port = free_port()
    result = stagewatch(home, "serve", "--db", db_url, "--port", str(port))
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"stagewatch db upgrade --db '{db_url}'" in result.stderr
    assert "no Stagewatch schema" in result.stderr
    assert "Stagewatch dashboard" not in result.stdout
    # An explicit database is migrated only as a visible step, never behind the operator's back.
    assert schema_revision(db_url) is None


def test_serve_refuses_insecure_bind(home: Path) -> None:
    result = stagewatch(home, "serve", "--host", "0.0.0.0", "--no-auth", "--port", str(free_port()))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "refusing to listen on 0.0.0.0 with authentication disabled" in result.stderr
    assert "--allow-insecure-bind" in result.stderr
    assert "Stagewatch dashboard" not in result.stdout


def test_token_create_list_revoke(home: Path, migrated_url: str) -> None:
    url = migrated_url
    token = create_token(home, url, "worker", "ci")

    listing = stagewatch(home, "token", "list", "--db", url)
    assert token not in ok(listing) + listing.stderr, "token list printed a secret"
    assert token[3:12] not in listing.stdout
    [line] = listing.stdout.splitlines()
    token_id, *fields = line.split("\t")
    assert fields == ["worker", "ci", "active"]

    assert ok(stagewatch(home, "token", "revoke", token_id, "--db", url)) == ""
    rows = token_rows(home, url)
    assert list(rows) == [int(token_id)]
    role, name, state = rows[int(token_id)]
    assert (role, name) == ("worker", "ci")
    assert state.startswith("revoked 20"), state

    again = stagewatch(home, "token", "revoke", token_id, "--db", url)
    assert again.returncode == 2, again.stdout + again.stderr
    assert f"no active token with id {token_id}" in again.stderr


def test_token_create_refuses_unmigrated_explicit_database(home: Path, db_url: str) -> None:
    result = stagewatch(home, "token", "create", "--role", "viewer", "--db", db_url)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    assert f"stagewatch db upgrade --db '{db_url}'" in result.stderr


def test_token_create_rejects_unknown_role(home: Path, tmp_path: Path) -> None:
    result = stagewatch(home, "token", "create", "--role", "admin", "--db", f"sqlite:///{tmp_path / 'x.db'}")
    assert result.returncode == 2
    assert result.stdout == ""
    assert "invalid choice: 'admin'" in result.stderr
    assert not (tmp_path / "x.db").exists()


def test_serve_with_auth_over_real_http(home: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'served.db'}"
    upgrade(url)
    # Tokens are made in-process here (the CLI's token commands have their own test) to keep this one fast.
    engine = make_engine(url)
    try:
        with transaction(make_session_factory(engine), write=True) as session:
            viewer = store_create_token(session, name="dashboard", role="viewer")[1]
            worker_row, worker = store_create_token(session, name="gpu-0", role="worker")
            worker_id = worker_row.id
    finally:
        engine.dispose()
    port = free_port()
    base = f"http://127.0.0.1:{port}"

    with running(home, "serve", "--db", url, "--port", str(port)) as server:
        health = server.wait_healthy(base).json()
        assert health["status"] == "ok"
        assert health["database"] == "sqlite"
        assert health["schema_revision"] == head_revision()

        with httpx.Client(base_url=base, timeout=10) as http:
            anonymous = http.get("/api/v1/runs")
            assert anonymous.status_code == 401
            assert anonymous.headers["content-type"].startswith("application/json")
            assert anonymous.json()["code"] == "unauthorized"
            assert "missing bearer token" in anonymous.json()["detail"]

            as_viewer = {"Authorization": f"Bearer {viewer}"}
            as_worker = {"Authorization": f"Bearer {worker}"}
            listed = http.get("/api/v1/runs", headers=as_viewer)
            assert listed.status_code == 200, listed.text
            assert listed.json()["data"] == []

            forbidden = http.post("/api/v1/runs", json={"name": "nope"}, headers=as_viewer)
            assert forbidden.status_code == 403, forbidden.text
            assert forbidden.json()["code"] == "forbidden"
            assert "worker" in forbidden.json()["detail"]

            created = http.post("/api/v1/runs", json={"name": "resnet"}, headers=as_worker)
            assert created.status_code == 201, created.text
            run_id = created.json()["id"]
            listed = http.get("/api/v1/runs", headers=as_viewer).json()["data"]
            assert [(run["id"], run["name"]) for run in listed] == [(run_id, "resnet")]

            bogus = http.get("/api/v1/runs", headers={"Authorization": "Bearer sw_not-a-token"})
            assert bogus.status_code == 401

            # Revoking takes effect on the running server at once.
            ok(stagewatch(home, "token", "revoke", str(worker_id), "--db", url))
            revoked = http.post("/api/v1/runs", json={"name": "late"}, headers=as_worker)
            assert revoked.status_code == 401, revoked.text
            assert "revoked" in revoked.json()["detail"]

        assert server.popen.poll() is None, server.output()


def test_demo_serves_embedded_database(home: Path) -> None:
    port = free_port()
    embedded = home / ".stagewatch" / "stagewatch.db"
    assert not embedded.exists()

    with running(home, "demo", "--port", str(port)) as demo:
        health = demo.wait_healthy(f"http://127.0.0.1:{port}").json()
        assert health["status"] == "ok"
        assert health["database"] == "sqlite"
        assert health["schema_revision"] == head_revision()
        stdout = demo.stdout_path.read_text()
        assert f"http://127.0.0.1:{port}/" in stdout, demo.output()
        # The demo needs no token.
        runs = httpx.get(f"http://127.0.0.1:{port}/api/v1/runs", timeout=10)
        assert runs.status_code == 200, runs.text
        popen = demo.popen

    assert popen.poll() is not None, "the demo is still running after it was stopped"
    assert embedded.exists()
    assert schema_revision(f"sqlite:///{embedded}") == head_revision()
