"""Service configuration, read from arguments or ``STAGEWATCH_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


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

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


class InsecureBindError(ValueError):
    """Raised when asked to listen beyond loopback with authentication off."""


def check_bind(settings: Settings) -> None:
    if settings.host not in LOOPBACK_HOSTS and not settings.auth and not settings.allow_insecure_bind:
        raise InsecureBindError(
            f"refusing to listen on {settings.host} with authentication disabled: anyone who can reach "
            "this address could change runs. Enable auth (create tokens with `stagewatch token create`), "
            "bind to 127.0.0.1, or pass --allow-insecure-bind if you really mean it."
        )
