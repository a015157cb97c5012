"""Bearer-token authentication with three roles, each allowed what the one before it is, and more:
``viewer`` reads; ``worker`` also creates runs, ingests metrics and receives commands; ``operator`` also
decides on learning-rate decays."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from server.errors import Forbidden, Unauthorized
from server.state import AppState
from server.store.tokens import lookup_active_token

ROLES = ("viewer", "worker", "operator")
ROLE_RANK = {role: rank for rank, role in enumerate(ROLES)}

bearer = HTTPBearer(auto_error=False, description="A token from `stagewatch token create --role ...`.")


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's name (``local`` when auth is off) and its role."""

    name: str
    role: str
    token_id: int | None = None  # None: auth is off

    @property
    def actor(self) -> str:
        return self.name


def _authenticate(state: AppState, credentials: HTTPAuthorizationCredentials | None) -> Principal:
    if not state.settings.auth:
        return Principal("local", "operator")
    if credentials is None:
        raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
    token = lookup_active_token(state.engine, credentials.credentials)
    if token is None:
        raise Unauthorized("invalid or revoked token")
    return Principal(f"token:{token.name}", token.role, token.id)


# The bearer credentials as sent, unchecked: for a route that authorizes inside its own worker-thread call.
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def authorize(state: AppState, credentials: HTTPAuthorizationCredentials | None, role: str) -> Principal:
    """The caller, if its token is active and has ``role`` or a higher one; else a 401 or 403. Blocking I/O."""
    principal = _authenticate(state, credentials)
    if ROLE_RANK[principal.role] < ROLE_RANK[role]:
        raise Forbidden(f"this needs the {role} role; the token has {principal.role}")
    return principal


def require(role: str) -> Callable[..., Principal]:
    if role not in ROLE_RANK:  # fail when the routes are built, not at the first request
        raise ValueError(f"unknown role {role!r}")

    def dependency(request: Request, credentials: Credentials) -> Principal:
        # Synchronous (FastAPI runs it in its thread pool: the token lookup is blocking I/O), and so is its use by
        # server.routes.stream; app_state is a coroutine, so the state is read here directly.
        return authorize(request.app.state.stagewatch, credentials, role)

    return dependency


Viewer = Annotated[Principal, Depends(require("viewer"))]
Worker = Annotated[Principal, Depends(require("worker"))]
Operator = Annotated[Principal, Depends(require("operator"))]
