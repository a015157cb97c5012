"""Exceptions raised by the training client, all under one base class.

Only *synchronous* calls raise: opening a run, misusing a run's lifecycle, and logging values that are not
numbers. The background sender never raises into the training loop; network trouble there is logged
(logger ``trainer``) and the points are kept, spilled to disk and re-sent.

- ``TrackerError`` -- base class of everything below.
    - ``RunStateError`` (also a ``RuntimeError``) -- the run is used outside its lifecycle: logging before
      ``__enter__`` or after ``__exit__``, entering a run twice, reopening a closed run.
    - ``ServerError`` -- the server answered an opening request (create, resume) with an error it will keep
      giving: 4xx other than auth, e.g. an invalid ``config`` (422) or an unknown ``run_id`` (404). Carries
      ``status_code`` and the server's ``detail``.
        - ``AuthError`` -- 401 or 403: the token is missing, wrong, revoked, or its role is too low.

``TypeError``/``ValueError`` (not ``TrackerError``) are raised at once by ``Run.log`` for values that are not
real numbers or steps that are not non-negative integers: those are programming errors, not network ones.
"""

from __future__ import annotations

__all__ = ["AuthError", "RunStateError", "ServerError", "TrackerError"]


class TrackerError(Exception):
    """Base class of the training client's exceptions."""


class RunStateError(TrackerError, RuntimeError):
    """A run was used outside its lifecycle (UNOPENED -> OPENED -> CLOSED)."""


class ServerError(TrackerError):
    """The server refused an opening request for a reason retrying will not fix."""

    def __init__(self, message: str, *, status_code: int, detail: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.detail = detail


class AuthError(ServerError):
    """The server answered 401 or 403."""
