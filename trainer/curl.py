"""The worker's metric batches over libcurl (``pycurl``), which holds no GIL while a request is on the wire.

Why not httpx for this one request: the sender thread shares the GIL with the training loop, and httpx builds the
request, runs httpcore's state machine and parses the answer in Python: about 1.2 ms of GIL per 250-point batch
on the reference machine, every millisecond of which the training thread can spend waiting for its next line of
Python. ``Curl.perform`` releases the GIL for the whole exchange (connection reuse, headers, body, answer), so
what remains in Python is a few ``setopt`` calls and wrapping the answer (``benchmarks/bench_train_overhead.py``
measures both). Everything else the worker sends (run creation, acknowledgements, long polls) stays on httpx:
those requests are rare, and the long poll waits outside the GIL anyway.

Same contract as the httpx path: an :class:`httpx.Response` for every answer the server gave (any status), an
:class:`httpx.TransportError` subclass when there was none, so the sender's retry and outage policy does not
know which one carried the batch. Proxies and certificates follow the same environment variables httpx reads:
``HTTP(S)_PROXY`` / ``ALL_PROXY`` / ``NO_PROXY`` (resolved here with :mod:`urllib.request`, as httpx does, rather
than by libcurl, which ignores upper-case ``HTTP_PROXY``), and ``SSL_CERT_FILE`` / ``SSL_CERT_DIR``, else
certifi's bundle.
"""

from __future__ import annotations

import os
import threading
import urllib.parse
import urllib.request
from typing import Final

import httpx

try:
    import pycurl
except ImportError:  # a platform without a wheel: the client falls back to httpx (trainer.client)
    pycurl = None  # type: ignore[assignment]

__all__ = ["CurlPoster", "available"]

# libcurl error codes, by what the sender should make of them (https://curl.se/libcurl/c/libcurl-errors.html).
_CONNECT_ERRORS: Final = frozenset({5, 6, 7, 35, 51, 58, 59, 60, 77, 83, 90, 91})  # proxy, DNS, refused, TLS
_TIMEOUT: Final = 28
_WRITE_ERRORS: Final = frozenset({55})  # send failed
_PROTOCOL_ERRORS: Final = frozenset({8, 18, 52, 56, 92})  # bad/partial/empty answer, receive failed, HTTP/2 stream


def available() -> bool:
    """Whether ``pycurl`` imported (its wheels bundle libcurl; without one, metric batches go over httpx)."""
    return pycurl is not None


def _transport_error(code: int, message: str) -> httpx.TransportError:
    text = f"libcurl error {code}: {message}"
    if code in _CONNECT_ERRORS:
        return httpx.ConnectError(text)
    if code == _TIMEOUT:
        return httpx.TimeoutException(text)
    if code in _WRITE_ERRORS:
        return httpx.WriteError(text)
    if code in _PROTOCOL_ERRORS:
        return httpx.RemoteProtocolError(text)
    return httpx.NetworkError(text)


def _proxy_for(url: str) -> str:
    """The proxy httpx would use for ``url`` (empty: none), from the same environment variables (``proxy_bypass``
    reads ``NO_PROXY`` when any proxy variable is set, which is the only case it is asked)."""
    parts = urllib.parse.urlsplit(url)
    proxies = urllib.request.getproxies_environment()
    if not proxies or (parts.hostname and urllib.request.proxy_bypass(parts.hostname)):
        return ""
    return proxies.get(parts.scheme) or proxies.get("all") or ""


class CurlPoster:
    """POSTs JSON bodies to one server over a kept-alive libcurl handle. Thread-safe: one request at a time."""

    def __init__(self, base_url: str, *, token: str | None, timeout: float, connect_timeout: float) -> None:
        if pycurl is None:
            raise RuntimeError("pycurl is not installed")
        self.base_url = base_url.rstrip("/")
        self._lock = threading.Lock()
        curl = pycurl.Curl()
        headers = ["Content-Type: application/json", "Expect:"]  # "Expect:": no 100-continue round trip
        if token:
            headers.append(f"Authorization: Bearer {token}")
        curl.setopt(pycurl.HTTPHEADER, headers)
        curl.setopt(pycurl.POST, 1)
        curl.setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_1_1)
        curl.setopt(pycurl.NOSIGNAL, 1)  # timeouts without SIGALRM: we are not the main thread
        curl.setopt(pycurl.CONNECTTIMEOUT_MS, max(1, int(connect_timeout * 1000)))
        # httpx's read timeout bounds each wait for bytes; libcurl's bounds the whole exchange. A batch of a
        # few thousand points is one short exchange, so the same number means the same thing here.
        curl.setopt(pycurl.TIMEOUT_MS, max(1, int(timeout * 1000)))
        curl.setopt(pycurl.PROXY, _proxy_for(self.base_url))
        if self.base_url.startswith("https:"):
            cafile = os.environ.get("SSL_CERT_FILE")
            capath = os.environ.get("SSL_CERT_DIR")
            if capath:
                curl.setopt(pycurl.CAPATH, capath)
            if cafile or not capath:
                import certifi  # httpx's dependency, and its default bundle

                curl.setopt(pycurl.CAINFO, cafile or certifi.where())
        self._curl: pycurl.Curl | None = curl

    def post(self, path: str, body: bytes) -> httpx.Response:
        """POSTs ``body`` (JSON) to ``base_url + path``; the answer, or an ``httpx.TransportError`` if none came."""
        chunks: list[bytes] = []
        with self._lock:
            curl = self._curl
            if curl is None:
                raise RuntimeError("the poster is closed")
            curl.setopt(pycurl.URL, self.base_url + path)
            curl.setopt(pycurl.POSTFIELDS, body)
            curl.setopt(pycurl.WRITEFUNCTION, chunks.append)
            try:
                curl.perform()  # no GIL held meanwhile, but for the callback that keeps the answer's bytes
            except pycurl.error as exc:
                code, message = exc.args if len(exc.args) == 2 else (-1, str(exc))
                raise _transport_error(int(code), str(message)) from exc
            status = int(curl.getinfo(pycurl.RESPONSE_CODE))
            content_type = curl.getinfo(pycurl.CONTENT_TYPE)
        headers = {"content-type": content_type} if content_type else None
        return httpx.Response(status, headers=headers, content=b"".join(chunks))

    def close(self) -> None:
        with self._lock:
            if self._curl is not None:
                self._curl.close()
                self._curl = None
