"""Schemathesis hooks for tests/test_openapi_fuzz.py (loaded through ``SCHEMATHESIS_HOOKS``).

Long-polls (``wait``, up to 30-60 s) would make thousands of cases take hours: the fuzzer is shown the API
without that parameter (so it sends none: no wait). Its bounds and its behaviour are tested on their own
(tests/test_hostile_inputs.py, tests/test_commands.py, tests/test_live_detection.py)."""

from __future__ import annotations

from typing import Any

import schemathesis


@schemathesis.hook
def before_load_schema(_context: Any, raw_schema: dict[str, Any]) -> None:
    for operations in raw_schema.get("paths", {}).values():
        for operation in operations.values():
            if isinstance(operation, dict) and "parameters" in operation:
                operation["parameters"] = [p for p in operation["parameters"] if p.get("name") != "wait"]
