"""The deployment files, checked without Docker: the exact commands docker-compose.yml runs, run against a
real Postgres database of their own, in the order compose runs them.

No container engine is needed (or available in CI): the image's only job is to put the `stagewatch` console
script on PATH, so each compose `command:` is run with the virtualenv's script in its place, the environment
the compose file gives it, and the database URL pointed at a fresh database on the test server. What can only
be checked statically (service wiring, published port, the Dockerfile) is checked from the files themselves.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import yaml
from psycopg import sql
from sqlalchemy.engine import make_url

from server.migrate import head_revision
from tests.conftest import POSTGRES_ADMIN

pytestmark = pytest.mark.slow  # see the tiers in the README (make test-fast leaves these out)

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
CONTAINER_PORT = 8765
STAGEWATCH = Path(sys.executable).parent / "stagewatch"
COMMAND_TIMEOUT_S = 120
SERVER_START_TIMEOUT_S = 30


def load_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict), "docker-compose.yml is not a mapping"
    return data


def service(name: str) -> dict[str, Any]:
    services = load_compose()["services"]
    assert name in services, f"docker-compose.yml has no {name!r} service"
    svc: dict[str, Any] = services[name]
    return svc


def command(name: str) -> list[str]:
    cmd = service(name).get("command")
    assert isinstance(cmd, list), f"the {name} service's command must be in exec (list) form, got {cmd!r}"
    assert all(isinstance(part, str) for part in cmd), cmd
    return list(cmd)


def compose_environment(name: str) -> dict[str, str]:
    env = service(name).get("environment", {})
    if isinstance(env, list):  # the `- KEY=value` form
        env = dict(item.split("=", 1) for item in env)
    return {str(key): str(value) for key, value in env.items()}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per line of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, args = line.partition(" ")
            result.append((instruction.upper(), args.strip()))
    return result


def dockerfile_cmd() -> list[str]:
    cmds = [args for instruction, args in dockerfile_instructions() if instruction == "CMD"]
    assert len(cmds) == 1, f"expected one CMD in the Dockerfile, found {len(cmds)}"
    cmd = json.loads(cmds[0])  # the exec (JSON array) form; the shell form would not parse
    assert isinstance(cmd, list) and all(isinstance(part, str) for part in cmd), cmd
    return cmd


def local(cmd: list[str]) -> list[str]:
    """The compose command with the image's `stagewatch` replaced by this virtualenv's console script."""
    assert cmd[0] == "stagewatch", cmd
    assert STAGEWATCH.exists(), f"{STAGEWATCH} is missing: is the project installed in this environment?"
    return [str(STAGEWATCH), *cmd[1:]]


def with_option(cmd: list[str], option: str, value: str) -> list[str]:
    assert option in cmd, f"{option} not in {cmd}"
    i = cmd.index(option)
    return [*cmd[: i + 1], value, *cmd[i + 2 :]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        port: int = s.getsockname()[1]
        return port


# ---------------------------------------------------------------------------------------------- static checks


def test_services_are_wired_in_order() -> None:
    postgres, migrate, server = service("postgres"), service("migrate"), service("server")

    assert postgres["image"].startswith("postgres:16")
    assert postgres["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    assert any(str(v).split(":")[0] in load_compose().get("volumes", {}) for v in postgres["volumes"]), (
        "postgres data must live in a named volume"
    )
    assert "ports" not in postgres, "postgres must not be published beyond the compose network"

    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert command("migrate") == ["stagewatch", "db", "upgrade"]
    assert server["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    # Both run the image the compose file builds, against the same database.
    assert migrate["image"] == server["image"] and migrate["build"] == server["build"] == "."
    url = compose_environment("server")["STAGEWATCH_DATABASE_URL"]
    assert compose_environment("migrate")["STAGEWATCH_DATABASE_URL"] == url
    assert make_url(url).host == "postgres"


def test_server_is_published_on_loopback_only_with_auth_on() -> None:
    server_cmd = command("server")
    assert server_cmd[:2] == ["stagewatch", "serve"]
    assert server_cmd[server_cmd.index("--host") + 1] == "0.0.0.0"  # inside the container, behind the port map
    assert "--no-auth" not in server_cmd and "--allow-insecure-bind" not in server_cmd
    port = int(server_cmd[server_cmd.index("--port") + 1])
    assert port == CONTAINER_PORT
    # Only the balancer is published, on loopback; it reaches each replica on the compose network.
    assert "ports" not in service("server") and "ports" not in service("server-2")
    assert service("balancer")["ports"] == [f"127.0.0.1:{CONTAINER_PORT}:{CONTAINER_PORT}"]
    healthcheck = service("server")["healthcheck"]["test"]
    assert healthcheck[:3] == ["CMD", "python", "-c"] and f"127.0.0.1:{port}/healthz" in healthcheck[3]


def test_dockerfile_runs_the_compose_server_command_as_non_root() -> None:
    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    assert dockerfile_cmd() == command("server")
    assert ("EXPOSE", str(CONTAINER_PORT)) in instructions
    users = [args for instruction, args in instructions if instruction == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, "the image must not run as root"
    run_lines = " ".join(args for instruction, args in instructions if instruction == "RUN")
    assert "pip install" in run_lines and "torch" not in run_lines


def test_dockerfile_copies_everything_pip_install_needs() -> None:
    """`pip install .` in the image sees only what the Dockerfile copies: every package pyproject names, and
    the readme it declares."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    copied = {
        Path(source).parts[0]
        for instruction, args in dockerfile_instructions()
        if instruction == "COPY" and not args.startswith("--from")
        for source in args.split()[:-1]
    }
    needed = {"pyproject.toml", project["project"]["readme"]}
    needed |= {package.split(".")[0] for package in project["tool"]["setuptools"]["packages"]}
    assert needed <= copied, f"the Dockerfile does not copy {sorted(needed - copied)}"
    missing = sorted(name for name in needed if not (ROOT / name).exists())
    assert not missing, f"the Dockerfile copies {missing}, which do not exist: docker build would fail"
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert not needed & ignored, f".dockerignore excludes {sorted(needed & ignored)}"
    assert {".venv", ".git"} <= ignored


# ---------------------------------------------------------------------------- the compose commands, for real


@pytest.fixture
def deploy_db() -> Iterator[str]:
    """A fresh, empty Postgres database of its own (as the compose `postgres` service starts with)."""
    name = f"sw_deploy_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_url(POSTGRES_ADMIN).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def environment(name: str, database_url: str, home: Path) -> dict[str, str]:
    """The service's compose environment on top of this process's, minus any STAGEWATCH_* of the caller's."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("STAGEWATCH_")}
    env.update(compose_environment(name))
    env["STAGEWATCH_DATABASE_URL"] = database_url
    env["HOME"] = str(home)  # nothing may fall back to the caller's ~/.stagewatch
    return env


def run(cmd: list[str], env: dict[str, str], timeout: float = COMMAND_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def wait_healthy(proc: subprocess.Popen[bytes], url: str, log: Path) -> httpx.Response:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            response = httpx.get(f"{url}/healthz", timeout=2)
            if response.status_code == 200:
                return response
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"the server did not answer /healthz in {SERVER_START_TIMEOUT_S}s:\n{log.read_text()}")
        time.sleep(0.1)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_compose_commands_run_against_postgres(deploy_db: str, tmp_path: Path) -> None:
    port = free_port()
    server_cmd = with_option(local(command("server")), "--port", str(port))
    server_env = environment("server", deploy_db, tmp_path)
    url = f"http://127.0.0.1:{port}"

    # Without the migrate service the server refuses an unmigrated database, and says what to run: this is
    # why compose starts it only after `migrate` completed successfully.
    refused = run(server_cmd, server_env, timeout=SERVER_START_TIMEOUT_S)
    assert refused.returncode == 2, refused
    assert "stagewatch db upgrade" in refused.stderr

    migrated = run(local(command("migrate")), environment("migrate", deploy_db, tmp_path))
    assert migrated.returncode == 0, migrated
    head = head_revision(deploy_db)
    assert f"current: {head}" in migrated.stdout

    # Idempotent: compose runs the one-shot migrate on every `up`.
    again = run(local(command("migrate")), environment("migrate", deploy_db, tmp_path))
    assert again.returncode == 0, again

    created = run(local(["stagewatch", "token", "create", "--role", "worker", "--name", "deploy"]), server_env)
    assert created.returncode == 0, created
    token = created.stdout.strip().splitlines()[0]

    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(server_cmd, env=server_env, stdout=out, stderr=subprocess.STDOUT)
    try:
        health = wait_healthy(proc, url, log).json()
        assert health["database"] == "postgresql"
        assert health["schema_revision"] == head

        # The compose healthcheck, run as the container would run it, against this server.
        _, python, flag, code = service("server")["healthcheck"]["test"]
        assert python == "python"
        target = f"127.0.0.1:{CONTAINER_PORT}/"
        assert target in code, code
        ok = [sys.executable, flag, code.replace(target, f"127.0.0.1:{port}/")]
        assert subprocess.run(ok, timeout=30, check=False, capture_output=True).returncode == 0
        # ...and it fails when nothing answers, or it would report a dead server healthy.
        dead = [sys.executable, flag, code.replace(target, f"127.0.0.1:{free_port()}/")]
        assert subprocess.run(dead, timeout=30, check=False, capture_output=True).returncode != 0

        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.get("/api/v1/runs").status_code == 401
            assert client.post("/api/v1/runs", json={"name": "nope"}).status_code == 401
            auth = {"Authorization": f"Bearer {token}"}
            bad = {"Authorization": "Bearer not-a-token"}
            assert client.post("/api/v1/runs", json={"name": "x"}, headers=bad).status_code == 401

            response = client.post("/api/v1/runs", json={"name": "deployed"}, headers=auth)
            assert response.status_code == 201, response.text
            run_id = response.json()["id"]
            read = client.get(f"/api/v1/runs/{run_id}", headers=auth)
            assert read.status_code == 200 and read.json()["name"] == "deployed"
    finally:
        stop(proc)
    assert proc.returncode is not None


def test_the_balancer_fronts_identical_replicas_with_the_tested_configuration() -> None:
    """deploy/haproxy.cfg is what tests/test_replicas.py runs (Debian's haproxy 2.6, the image's version)."""
    balancer = service("balancer")
    assert balancer["image"] == "haproxy:2.6"
    assert balancer["volumes"] == ["./deploy/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro"]
    assert (ROOT / "deploy" / "haproxy.cfg").is_file()
    env = balancer["environment"]
    assert env["STAGEWATCH_BIND"] == f"0.0.0.0:{CONTAINER_PORT}"
    replicas = [value.split(":")[0] for key, value in sorted(env.items()) if key.startswith("STAGEWATCH_REPLICA_")]
    assert replicas == ["server", "server-2"]
    for name in replicas:  # each the same server: same command, image and database
        assert command(name) == command("server")
        assert compose_environment(name) == compose_environment("server")
        assert balancer["depends_on"][name]["condition"] == "service_healthy"
    config = (ROOT / "deploy" / "haproxy.cfg").read_text()
    assert all(f"${{STAGEWATCH_REPLICA_{i}}}" in config for i in range(1, len(replicas) + 1))
