"""Service configuration, read from arguments or ``STAGEWATCH_*`` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
WILDCARD_BINDS = frozenset({"0.0.0.0", "::", ""})  # listen on every address: not a name anyone is reached by


def default_home() -> Path:
    """Where the embedded SQLite database lives unless told otherwise."""
    return Path.home() / ".stagewatch"


def embedded_database_url(home: Path | None = None) -> str:
    return f"sqlite:///{(home or default_home()) / 'stagewatch.db'}"


class Settings(BaseSettings):
    """Everything the app factory needs; no module-level instance exists on purpose."""

    model_config = SettingsConfigDict(env_prefix="STAGEWATCH_", extra="ignore")

    database_url: str = Field(default_factory=embedded_database_url)
    host: str = "127.0.0.1"
    port: int = 8765
    auth: bool = True
    # Binding a non-loopback address without auth exposes every run to the network; it takes this flag.
    allow_insecure_bind: bool = False
    # The embedded default may migrate itself; an explicit database must be migrated as a visible step.
    auto_upgrade: bool = False
    heartbeat_grace_s: float = Field(default=300.0, gt=0)
    max_body_bytes: int = Field(default=32 * 1024 * 1024, gt=0)
    max_points_per_batch: int = Field(default=100_000, gt=0)
    default_max_points: int = Field(default=2000, ge=3)
    # How often a waiting long-poll or live stream also reads the database, for a change nothing woke it for (a
    # server process that could not notify it, see server.replicas). None: each waiter's own default (1 s, 2 s).
    recheck_s: float | None = Field(default=None, gt=0, le=3600)
    # Threads running detection passes (server.live.engine). None: 1 on SQLite (its writers take turns anyway),
    # 4 on PostgreSQL (passes of different runs write at once).
    detection_threads: int | None = Field(default=None, ge=1, le=64)
    # Host header values to accept besides the loopback names and the bound address (see trusted_hosts); "*" is
    # any, "*.example.com" any subdomain. STAGEWATCH_ALLOWED_HOSTS takes them comma-separated.
    allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def trusted_hosts(self) -> list[str]:
        """The Host header values the server answers (server.web_security refuses the others with 400).

        The loopback names are always accepted: only a browser that really talks to this machine sends them,
        never a DNS-rebinding page, whose requests carry the attacker's name. On a loopback bind that is all,
        plus ``allowed_hosts``, so a rebinding page cannot reach a local (``--no-auth``) server. On any other
        bind the names the server is reached by (DNS names, a proxy's, a container's service name) are unknown
        to it: every Host is accepted unless ``allowed_hosts`` lists them, and tokens (auth is required there)
        are what keep other pages out -- a rebinding page has none.
        """
        if self.host not in LOOPBACK_HOSTS and not self.allowed_hosts:
            return ["*"]
        bound = set() if self.host in WILDCARD_BINDS else {self.host}
        return sorted(LOOPBACK_HOSTS | bound | set(self.allowed_hosts))


class InsecureBindError(ValueError):
    """Raised when asked to listen beyond loopback with authentication off."""


def check_bind(settings: Settings) -> None:
    if settings.host not in LOOPBACK_HOSTS and not settings.auth and not settings.allow_insecure_bind:
        raise InsecureBindError(
            f"refusing to listen on {settings.host} with authentication disabled: anyone who can reach "
            "this address could change runs. Enable auth (create tokens with `stagewatch token create`), "
            "bind to 127.0.0.1, or pass --allow-insecure-bind if you really mean it."
        )
