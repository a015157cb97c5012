"""API tokens: random bearer secrets, stored as SHA-256 digests.

A token has 256 bits of entropy, so a fast unsalted digest is enough: there is nothing to brute-force, and a
lookup by digest stays one indexed query per request.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import NamedTuple

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from server.models import ApiToken, utcnow

TOKEN_PREFIX = "sw_"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(session: Session, *, name: str, role: str) -> tuple[ApiToken, str]:
    """Returns the stored row and the plaintext token, which is never stored or shown again."""
    plaintext = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(name=name, role=role, token_hash=hash_token(plaintext))
    session.add(row)
    session.flush()
    return row, plaintext


def find_active_token(session: Session, plaintext: str) -> ApiToken | None:
    row = session.scalar(select(ApiToken).where(ApiToken.token_hash == hash_token(plaintext)))
    return row if row is not None and row.revoked_at is None else None


class ActiveToken(NamedTuple):
    id: int
    name: str
    role: str


def lookup_active_token(engine: Engine, plaintext: str) -> ActiveToken | None:
    """``find_active_token`` for every authenticated request: one indexed SELECT on a pooled DB-API connection,
    no session, no transaction of our own (an ORM session and transaction around it cost ~0.4 ms). Read at
    every request, never cached, so a revocation takes effect at the next request."""
    mark = "%s" if engine.dialect.name == "postgresql" else "?"
    connection = engine.raw_connection()
    try:
        cursor = connection.cursor()
        try:
            cursor.execute(
                f"SELECT id, name, role FROM api_tokens WHERE token_hash = {mark} AND revoked_at IS NULL",
                (hash_token(plaintext),),
            )
            row = cursor.fetchone()
        finally:
            cursor.close()
    finally:
        connection.close()  # back to the pool, which ends the read transaction the driver may have begun
    return ActiveToken(*row) if row is not None else None


def token_is_active(session: Session, token_id: int) -> bool:
    row = session.execute(select(ApiToken.revoked_at).where(ApiToken.id == token_id)).first()
    return row is not None and row.revoked_at is None


def list_tokens(session: Session) -> list[ApiToken]:
    return list(session.scalars(select(ApiToken).order_by(ApiToken.id)))


def revoke_token(session: Session, token_id: int) -> bool:
    row = session.get(ApiToken, token_id)
    if row is None or row.revoked_at is not None:
        return False
    row.revoked_at = utcnow()
    return True
