"""Stage detectors: pure code that turns a metric stream into learning-rate decisions with evidence.

``make_detector(name, params)`` builds one by name with validated parameters; ``DETECTORS`` lists them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from server.detectors.base import Decision, Detector, DetectorParams, Evidence

DETECTORS: dict[str, type[Detector[Any]]] = {}


class DetectorError(ValueError):
    """An unknown detector or an invalid parameter; the message names it."""


def register(cls: type[Detector[Any]]) -> type[Detector[Any]]:
    DETECTORS[cls.name] = cls
    return cls


def make_detector(name: str, params: Mapping[str, Any] | None = None) -> Detector[Any]:
    _load_builtin()
    cls = DETECTORS.get(name)
    if cls is None:
        raise DetectorError(f"unknown detector {name!r}; choose one of: {', '.join(sorted(DETECTORS))}")
    try:
        parsed = cls.Params.model_validate(dict(params or {}))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'params'}: {e['msg']}" for e in exc.errors())
        raise DetectorError(f"detector {name!r}: {problems}") from None
    return cls(parsed)


def _load_builtin() -> None:
    # Imported here, not at module import, so that a detector module can import this package's names.
    from server.detectors import autodecay, plateau, slope, stationarity  # noqa: F401


__all__ = ["DETECTORS", "Decision", "Detector", "DetectorError", "DetectorParams", "Evidence", "make_detector"]
