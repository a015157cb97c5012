"""Schemathesis against the real server on both engines: every operation of the OpenAPI document, generated
valid and invalid inputs (boundaries, NUL, huge numbers, wrong types), then stateful sequences.

Checks: no 5xx, every status and body as documented, invalid inputs refused, auth enforced. Left out:
``positive_data_acceptance``, since some valid-looking inputs are refused by rules a JSON schema cannot state
(exactly one of ``factor`` and ``lr``, ``min_step <= max_step``, a cursor this API issued, a finished run).
The SSE streams never end, so they are left to tests/test_live_events.py and tests/test_hostile_inputs.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from server.app import create_app
from server.db import make_engine, make_session_factory, transaction
from server.settings import Settings
from server.store.tokens import create_token
from tests.conftest import LiveServer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SCHEMATHESIS = Path(sys.executable).parent / "st"
SEED = 20261204  # fixed: a failure reproduces with the same cases


def test_the_api_holds_under_schemathesis(migrated_url: str, tmp_path: Path) -> None:
    engine = make_engine(migrated_url)
    with transaction(make_session_factory(engine), write=True) as session:
        _, token = create_token(session, name="fuzz", role="operator")
    engine.dispose()
    with LiveServer(create_app(Settings(database_url=migrated_url, auth=True))) as live:
        command = [
            str(SCHEMATHESIS),
            "run",
            f"{live.url}/openapi.json",
            "--header",
            f"Authorization: Bearer {token}",
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance",
            "--exclude-path-regex",
            "stream$",
            "--phases",
            "coverage,fuzzing,stateful",
            "--max-examples",
            "30",
            "--seed",
            str(SEED),
            # One worker: with two, hypothesis's description of a filter lambda sometimes failed inside
            # schemathesis (a race in reading its source), an error of the tool, not of the API.
            "--workers",
            "1",
            "--request-timeout",
            "30",
            "--no-color",
            "--report",
            "junit",
            "--report-dir",
            str(tmp_path),
        ]
        env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks", "PYTHONPATH": str(ROOT)}
        result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=540)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    generated = re.search(r"(\d+) generated, (\d+) passed", output)
    assert generated is not None, output[-3000:]
    assert int(generated.group(1)) == int(generated.group(2)) >= 1000, generated.group(0)
    print(f"schemathesis: {generated.group(0)}")  # noqa: T201 -- the count for the record (pytest -s)
