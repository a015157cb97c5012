"""The locked-down web side: security headers and CSP on every response, JSON-only bodies, the Host check, and
offline API docs.

:class:`WebSecurity` is one pure ASGI middleware (not ``BaseHTTPMiddleware``, which buffers a response through a
task and breaks the live-event streams): it refuses a request whose Host is not one the server answers to (400,
against DNS rebinding), refuses a POST/PUT/PATCH/DELETE body that is not JSON (415: a page of another site can
send text/plain or a form without asking, a JSON body only after a CORS preflight that nothing here answers), and
adds the headers below to every response it lets out, its own refusals included. Both refusals use the error
shape of ``server.errors``.

``/docs`` (Swagger UI) and ``/redoc`` are served from the copies that the ``fastapi-offline`` package ships, on
this origin, with their start-up code in a file: they work with no internet and under the same policy.
"""

from __future__ import annotations

import functools
import html
import importlib.util
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from starlette.datastructures import Headers
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import web
from server.settings import Settings

JSON_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def content_security_policy(script_hashes: Iterable[str] = (), handler_hashes: Iterable[str] = ()) -> str:
    """The policy of every response. Scripts only from this origin, plus the inline code of the shipped pages by
    hash (``web.inline_script_hashes``: an injected script has another hash). ``'unsafe-hashes'`` lets only the
    listed event-handler attributes run (run.html's ``onerror`` that reports a failed plotly.js load).

    Styles allow ``'unsafe-inline'``: plotly.js writes style attributes into its SVG and adds ``<style>`` rules at
    run time, and Swagger UI and ReDoc (styled-components) insert ``<style>`` elements; none of them draws
    without. Styles cannot run code; the risk left is CSS-based content tampering by injected markup, which the
    dashboard does not allow (it escapes what it writes). ``data:`` images: the empty favicon of the pages,
    Swagger UI's icons and plotly's image export; ``blob:`` workers: ReDoc's search index.
    """
    script = ["'self'", *script_hashes]
    handlers = list(handler_hashes)
    if handlers:
        script += ["'unsafe-hashes'", *handlers]
    directives = {
        "default-src": ["'self'"],
        "script-src": script,
        "style-src": ["'self'", "'unsafe-inline'"],
        "img-src": ["'self'", "data:"],
        "worker-src": ["'self'", "blob:"],
        "connect-src": ["'self'"],
        "object-src": ["'none'"],
        "base-uri": ["'none'"],
        "form-action": ["'self'"],
        "frame-ancestors": ["'none'"],
    }
    return "; ".join(f"{name} {' '.join(values)}" for name, values in directives.items())


def security_headers(csp: str) -> list[tuple[bytes, bytes]]:
    return [
        (b"content-security-policy", csp.encode()),
        (b"x-content-type-options", b"nosniff"),  # a JSON body is never run as a script or a page
        (b"x-frame-options", b"DENY"),  # frame-ancestors for browsers that predate it: no clickjacking
        (b"referrer-policy", b"no-referrer"),  # run ids and ?token= of stream URLs never leave in a Referer
        (b"cross-origin-opener-policy", b"same-origin"),  # a page of another site opening ours gets no handle
        (b"cross-origin-resource-policy", b"same-origin"),  # and cannot embed our responses (no-cors reads)
    ]


def host_name(value: str) -> str:
    """The name of a Host header, without port: ``[::1]:8765`` -> ``::1``, ``Example.org.:80`` -> ``example.org``.
    (Starlette's TrustedHostMiddleware splits at the first colon, which refuses every IPv6 literal.)"""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[1:end] if end > 0 else value
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def has_body(headers: Headers) -> bool:
    length = headers.get("content-length")
    return (length is not None and length.strip() not in ("", "0")) or "transfer-encoding" in headers


class WebSecurity:
    """Host check, JSON-only bodies and security headers (see the module's docstring)."""

    def __init__(self, app: ASGIApp, *, allowed_hosts: Sequence[str], csp: str) -> None:
        self.app = app
        self.any_host = "*" in allowed_hosts
        self.hosts = frozenset(host_name(h) for h in allowed_hosts if not h.startswith("*"))
        self.suffixes = tuple(h[1:].lower() for h in allowed_hosts if h.startswith("*."))  # "*.x.org" -> ".x.org"
        self.headers = security_headers(csp)

    def host_allowed(self, header: str | None) -> bool:
        if self.any_host:
            return True
        if not header:
            return False
        name = host_name(header)
        return name in self.hosts or name.endswith(self.suffixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host = headers.get("host")
        if scope["type"] == "websocket":
            if not self.host_allowed(host):
                await send({"type": "websocket.close", "code": 1008})
                return
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(name, value) for name, value in self.headers if name not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        if not self.host_allowed(host):
            detail = (
                f"Host {(host or '')[:100]!r} is not a name this server answers to; the operator lists accepted "
                "names with --allowed-hosts (STAGEWATCH_ALLOWED_HOSTS)"
            )
            await reject(send_with_headers, 400, detail, "invalid_host")
            return
        if scope["method"] in JSON_METHODS and has_body(headers) and not is_json(headers.get("content-type")):
            given = (headers.get("content-type") or "none")[:100]
            detail = f"body: Content-Type {given} is not accepted; send JSON with Content-Type: application/json"
            await reject(send_with_headers, 415, detail, "unsupported_media_type")
            return
        await self.app(scope, receive, send_with_headers)


async def reject(send: Send, status: int, detail: str, code: str) -> None:
    body = json.dumps({"detail": detail, "code": code}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# --- offline API docs --------------------------------------------------------------------------------------------

DOCS_ASSETS = "/docs/assets"

SWAGGER_INIT_JS = """// Swagger UI's start-up, in a file: the Content-Security-Policy runs no inline script.
const root = document.getElementById("swagger-ui");
window.ui = SwaggerUIBundle({
  url: root.dataset.openapiUrl,
  dom_id: "#swagger-ui",
  layout: "BaseLayout",
  deepLinking: true,
  showExtensions: true,
  showCommonExtensions: true,
  validatorUrl: null, // no badge from the public validator: nothing is fetched from another origin
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
});
"""


def docs_assets_dir() -> Path:
    """Swagger UI and ReDoc as shipped by the ``fastapi-offline`` package (``fastapi_offline/static``)."""
    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or spec.origin is None:
        raise RuntimeError("the fastapi-offline package is not installed: pip install fastapi-offline")
    path = Path(spec.origin).parent / "static"
    if not (path / "swagger-ui-bundle.js").is_file() or not (path / "redoc.standalone.js").is_file():
        raise RuntimeError(f"{path} lacks Swagger UI or ReDoc: reinstall the fastapi-offline package")
    return path


# ReDoc's bundle names one resource on a CDN: the Redocly logo of its sidebar's footer. The copy served here has it
# replaced by an empty image (which fails to decode, so ReDoc hides it): no request leaves for another origin.
REDOC_CDN_LOGO = b"https://cdn.redoc.ly/redoc/logo-mini.svg"


@functools.lru_cache(maxsize=1)
def redoc_js() -> bytes:
    source = (docs_assets_dir() / "redoc.standalone.js").read_bytes()
    return source.replace(REDOC_CDN_LOGO, b"data:,")


def _page(title: str, head: str, body: str) -> HTMLResponse:
    return HTMLResponse(
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f'<title>{html.escape(title)}</title>\n<link rel="icon" href="data:,">\n{head}</head>\n<body>\n{body}</body>\n'
        "</html>\n"
    )


def install_docs(app: FastAPI) -> None:
    """``/docs`` and ``/redoc`` from packaged assets (create the app with ``docs_url=None, redoc_url=None``)."""

    @app.get(DOCS_ASSETS + "/redoc.standalone.js", include_in_schema=False)
    def redoc_bundle() -> Response:  # before the mount, which would answer this path first
        return Response(redoc_js(), media_type="text/javascript; charset=utf-8", headers={"Cache-Control": "no-cache"})

    app.mount(DOCS_ASSETS, StaticFiles(directory=docs_assets_dir()), name="docs-assets")

    def attr(request: Request, path: str) -> str:
        return html.escape(request.scope.get("root_path", "") + path, quote=True)

    @app.get("/docs", include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        return _page(
            f"{app.title} · API (Swagger UI)",
            f'<link rel="stylesheet" href="{attr(request, DOCS_ASSETS + "/swagger-ui.css")}">\n',
            f'<div id="swagger-ui" data-openapi-url="{attr(request, app.openapi_url or "/openapi.json")}"></div>\n'
            f'<script src="{attr(request, DOCS_ASSETS + "/swagger-ui-bundle.js")}"></script>\n'
            f'<script src="{attr(request, "/docs/swagger-init.js")}"></script>\n',
        )

    @app.get("/docs/swagger-init.js", include_in_schema=False)
    def swagger_init() -> Response:
        return Response(SWAGGER_INIT_JS, media_type="text/javascript; charset=utf-8")

    @app.get("/redoc", include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        return _page(
            f"{app.title} · API (ReDoc)",
            "",
            f'<redoc spec-url="{attr(request, app.openapi_url or "/openapi.json")}"></redoc>\n'
            f'<script src="{attr(request, DOCS_ASSETS + "/redoc.standalone.js")}"></script>\n',
        )


def install(app: FastAPI, settings: Settings) -> None:
    """Everything above on ``app``; call after the other middleware so that this one is the outermost."""
    install_docs(app)
    scripts, handlers = web.inline_script_hashes()
    app.add_middleware(
        WebSecurity, allowed_hosts=settings.trusted_hosts(), csp=content_security_policy(scripts, handlers)
    )
