"""Who the caller is: the dashboard asks before it offers controls, so a viewer sees why they are disabled instead
of a 403 after a click, and a wrong token is named as such instead of "signed in"."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel, Field

from server.auth import ROLES, bearer
from server.errors import ERROR_RESPONSES, Unauthorized
from server.state import State
from server.store.tokens import lookup_active_token

router = APIRouter(prefix="/api/v1", tags=["auth"], responses=ERROR_RESPONSES)


class WhoAmI(BaseModel):
    role: str | None = Field(description=f"One of {', '.join(ROLES)}; null: no token sent to a server with auth on.")
    name: str | None = Field(description="The token's name (`local` with auth off); null without a token.")
    auth: bool = Field(description="Whether the server checks tokens (false: started with --no-auth).")


# The token is optional here: `{}` added to the requirements tells OpenAPI clients (and the fuzzer) so.
@router.get("/whoami", response_model=WhoAmI, openapi_extra={"security": [{}]})
def read_whoami(state: State, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> WhoAmI:
    """The caller's role and token name. Needs no token (without one the role is null); a token that is unknown
    or revoked is a 401, as on every other route."""
    if not state.settings.auth:
        return WhoAmI(role="operator", name="local", auth=False)
    if credentials is None:
        return WhoAmI(role=None, name=None, auth=True)
    token = lookup_active_token(state.engine, credentials.credentials)
    if token is None:
        raise Unauthorized("invalid or revoked token")
    return WhoAmI(role=token.role, name=token.name, auth=True)
