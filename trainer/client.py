"""A thin, typed wrapper over ``httpx`` for the few REST v1 calls a worker makes.

It handles transport concerns only (base URL, bearer token, timeouts, JSON); retry and outage policy live in
:mod:`trainer.run`. Metric batches, the one request a training loop makes often, go over libcurl when ``pycurl``
is installed (:mod:`trainer.curl`: no GIL held while on the wire); pass ``transport=`` to send every request,
those included, over that ``httpx`` transport instead (tests, instrumentation, custom proxies).
"""

from __future__ import annotations

from typing import Any

import httpx

from trainer import curl

__all__ = ["Client"]

API = "/api/v1"


class Client:
    """REST v1 calls of a worker. Thread-safe (``httpx.Client`` is); close it when done."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
            transport=transport,
        )
        self._curl = (
            curl.CurlPoster(self.base_url, token=token, timeout=timeout, connect_timeout=min(timeout, 5.0))
            if transport is None and curl.available()
            else None
        )

    @property
    def metrics_over(self) -> str:
        """What carries metric batches: ``"libcurl"`` or ``"httpx"``."""
        return "httpx" if self._curl is None else "libcurl"

    def create_run(self, fields: dict[str, Any]) -> httpx.Response:
        return self._http.post(f"{API}/runs", json=fields)

    def get_run(self, run_id: int) -> httpx.Response:
        return self._http.get(f"{API}/runs/{run_id}")

    def update_run(self, run_id: int, fields: dict[str, Any]) -> httpx.Response:
        return self._http.patch(f"{API}/runs/{run_id}", json=fields)

    def heartbeat(self, run_id: int) -> httpx.Response:
        return self._http.post(f"{API}/runs/{run_id}/heartbeat")

    def post_metrics(self, run_id: int, body: bytes) -> httpx.Response:
        """``body`` is an encoded ``{"points": [...]}`` or ``{"tables": [...]}`` (:mod:`trainer.columns`)."""
        if self._curl is not None:
            return self._curl.post(f"{API}/runs/{run_id}/metrics", body)
        return self._http.post(
            f"{API}/runs/{run_id}/metrics", content=body, headers={"content-type": "application/json"}
        )

    def get_commands(self, run_id: int, *, after: int, wait: float) -> httpx.Response:
        """Long-polls the run's unacknowledged commands with ``id > after`` for up to ``wait`` seconds."""
        timeout = self._http.timeout
        read = (timeout.read or 10.0) + wait
        return self._http.get(
            f"{API}/runs/{run_id}/commands",
            params={"after": after, "wait": wait},
            timeout=httpx.Timeout(read, connect=timeout.connect),
        )

    def get_detection(self, run_id: int, *, wait: float) -> httpx.Response:
        """Live detection's progress on the run; with ``wait``, once it has caught up with what is stored."""
        timeout = self._http.timeout
        return self._http.get(
            f"{API}/runs/{run_id}/detection",
            params={"wait": wait},
            timeout=httpx.Timeout((timeout.read or 10.0) + wait, connect=timeout.connect),
        )

    def get_rewinds(self, run_id: int, *, after: int) -> httpx.Response:
        return self._http.get(f"{API}/runs/{run_id}/rewinds", params={"after": after})

    def rewind(self, run_id: int, step: int, *, reason: str) -> httpx.Response:
        return self._http.post(f"{API}/runs/{run_id}/rewind", json={"step": step, "reason": reason})

    def ack_command(self, run_id: int, command_id: int, body: dict[str, Any]) -> httpx.Response:
        return self._http.post(f"{API}/runs/{run_id}/commands/{command_id}/ack", json=body)

    def close(self) -> None:
        if self._curl is not None:
            self._curl.close()
        self._http.close()


def error_detail(response: httpx.Response) -> str:
    """The server's ``detail`` message, or the start of the body when it is not the usual JSON error."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    return str(detail) if detail is not None else response.text[:300]
