"""The locked-down web side (server.web_security) through the real server: security headers and CSP on every kind of
response, only web assets under /ui/, JSON-only bodies, the Host check, /readyz, and offline API docs.

The browser tests (``slow``) drive Debian's Chromium with Playwright, as tests/test_dashboard.py does: each page is
loaded with a listener for ``securitypolicyviolation`` events, and every request it makes is recorded.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest
from playwright.sync_api import Browser, Page, Response

import web
from server.app import create_app
from server.cli import build_parser
from server.db import make_engine, make_session_factory, transaction
from server.settings import Settings
from server.store.tokens import create_token
from server.web_security import REDOC_CDN_LOGO, content_security_policy, host_name, redoc_js
from tests.conftest import POSTGRES_ADMIN, LiveServer, _database_url, make_run, points, sqlite_copy
from tests.server_process import ServerProcess
from tests.test_live_events import Subscriber

UI_TIMEOUT_MS = 15_000  # two CPU cores shared by the server and the browser
SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
}


@pytest.fixture
def migrated_url(tmp_path: Path, migrated_templates: dict[str, str]) -> str:
    """SQLite only: the web side does not depend on the engine (/readyz on PostgreSQL has its own test)."""
    return sqlite_copy(migrated_templates, tmp_path)


def assert_secured(response: httpx.Response) -> None:
    """Every header of the policy, with its value; the CSP without any way to run inline or injected script."""
    what = f"{response.request.method} {response.request.url.path} -> {response.status_code}"
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get(name) == value, f"{what}: {name} is {response.headers.get(name)!r}"
    directives = parse_csp(response.headers.get("content-security-policy", ""))
    assert directives.get("default-src") == ["'self'"], what
    assert directives.get("frame-ancestors") == ["'none'"], what
    assert directives.get("object-src") == ["'none'"], what
    assert directives.get("base-uri") == ["'none'"], what
    script = directives.get("script-src", [])
    assert script[:1] == ["'self'"], what
    assert not {"'unsafe-inline'", "'unsafe-eval'", "*", "data:", "blob:", "http:", "https:"} & set(script), what
    assert directives.get("connect-src") == ["'self'"], what


def parse_csp(header: str) -> dict[str, list[str]]:
    directives: dict[str, list[str]] = {}
    for part in header.split(";"):
        name, *values = part.split()
        directives[name] = values
    return directives


def auth_tokens(url: str) -> dict[str, str]:
    engine = make_engine(url)
    tokens: dict[str, str] = {}
    with transaction(make_session_factory(engine), write=True) as session:
        for role in ("viewer", "operator"):
            _, tokens[role] = create_token(session, name=role, role=role)
    engine.dispose()
    return tokens


# --- headers ------------------------------------------------------------------------------------------------------


def test_every_kind_of_response_carries_the_security_headers(migrated_url: str) -> None:
    tokens = auth_tokens(migrated_url)
    settings = Settings(database_url=migrated_url, auth=True, max_body_bytes=1024)
    with LiveServer(create_app(settings)) as live, httpx.Client(base_url=live.url, timeout=30) as http:
        operator = {"Authorization": f"Bearer {tokens['operator']}"}
        viewer = {"Authorization": f"Bearer {tokens['viewer']}"}
        created = http.post("/api/v1/runs", json={"name": "headers"}, headers=operator)
        assert created.status_code == 201, created.text
        run_id = created.json()["id"]
        cases: list[tuple[str, str, dict[str, Any], int]] = [
            ("GET", "/api/v1/runs", {"headers": operator}, 200),  # API JSON
            ("GET", f"/api/v1/runs/{run_id}", {"headers": operator}, 200),
            ("GET", "/api/v1/runs", {}, 401),  # no token
            ("POST", "/api/v1/runs", {"headers": viewer, "json": {"name": "x"}}, 403),  # a role short
            ("POST", f"/api/v1/runs/{run_id}/hold", {"headers": operator, "json": {"epochs": "x"}}, 422),
            ("POST", "/api/v1/runs", {"headers": operator, "json": {"name": "x" * 2000}}, 413),  # BodySizeLimit
            ("DELETE", "/api/v1/runs", {"headers": operator}, 405),
            ("GET", "/api/v1/runs/999999", {"headers": operator}, 404),
            ("GET", "/nowhere", {}, 404),
            ("GET", "/", {}, 307),  # the redirect to /ui/
            ("GET", "/ui/", {}, 200),  # pages
            ("GET", "/ui/run.html", {}, 200),
            ("GET", "/ui/compare.html", {}, 200),
            ("GET", "/ui/run.js", {}, 200),  # scripts, styles
            ("GET", "/ui/app.css", {}, 200),
            ("GET", "/ui/vendor/plotly.min.js", {}, 200),
            ("GET", "/ui/missing.js", {}, 404),
            ("GET", "/ui/__init__.py", {}, 404),
            ("GET", "/docs", {}, 200),  # docs
            ("GET", "/docs/swagger-init.js", {}, 200),
            ("GET", "/docs/assets/swagger-ui.css", {}, 200),
            ("GET", "/docs/assets/redoc.standalone.js", {}, 200),
            ("GET", "/redoc", {}, 200),
            ("GET", "/openapi.json", {}, 200),
            ("GET", "/healthz", {}, 200),
            ("GET", "/readyz", {}, 200),
            ("POST", "/api/v1/runs", {"headers": operator, "content": b"{}"}, 415),  # no Content-Type
            ("GET", "/healthz", {"headers": {"Host": "rebound.example"}}, 400),  # Host check
        ]
        for method, path, kwargs, expected in cases:
            response = http.request(method, path, follow_redirects=False, **kwargs)
            assert response.status_code == expected, f"{method} {path}: {response.status_code} {response.text[:200]}"
            assert_secured(response)


def test_streams_keep_streaming_with_the_headers(client: httpx.Client, server: LiveServer) -> None:
    """A pure ASGI middleware: a live-event stream sends its headers at once and each event as it happens
    (BaseHTTPMiddleware would hold them back)."""
    run_id = make_run(client)
    for path in (f"/api/v1/runs/{run_id}/stream", "/api/v1/stream"):
        with httpx.Client(timeout=httpx.Timeout(10, read=10)) as http, http.stream("GET", server.url + path) as head:
            assert head.status_code == 200
            assert_secured(head)
    stream = Subscriber(f"{server.url}/api/v1/runs/{run_id}/stream")
    try:
        assert stream.next().kind == "hello"
        response = client.post(f"/api/v1/runs/{run_id}/metrics", json={"points": points("loss", range(3))})
        assert response.status_code == 200, response.text
        assert [event.kind for event in stream.until("points")][-1] == "points"
    finally:
        stream.close()


# --- /ui/ serves web assets only ------------------------------------------------------------------------------------


def test_ui_serves_only_web_assets(client: httpx.Client) -> None:
    assert client.get("/ui/").headers["content-type"].startswith("text/html")
    assert client.get("/ui/index.html").status_code == 200
    assert client.get("/ui/api.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/ui/app.css").headers["content-type"].startswith("text/css")
    package = web.ROOT
    refused = ["/ui/__init__.py", "/ui/__pycache__/", "/ui/%5F%5Finit%5F%5F.py", "/ui/__init__.PY"]
    refused += [f"/ui/__pycache__/{p.name}" for p in sorted(package.glob("__pycache__/*.pyc"))[:1]]
    for path in refused:
        response = client.get(path)
        assert response.status_code == 404, f"{path} was served: {response.text[:100]}"
        assert response.json()["code"] == "http_404"


# --- JSON-only bodies -----------------------------------------------------------------------------------------------


def test_bodies_that_are_not_json_are_refused_and_nothing_is_stored(client: httpx.Client) -> None:
    """The --no-auth demo: what a page of any other site can send without a CORS preflight (text/plain, a form,
    multipart) and a body without a type are all 415, before any route; nothing is stored."""
    run_id = make_run(client, name="kept")
    events_before = client.get(f"/api/v1/runs/{run_id}/events").json()["data"]
    run_json = b'{"name": "planted"}'
    batch = b'{"points": [{"key": "loss", "step": 1, "value": 0.5}]}'
    text = {"Content-Type": "text/plain"}
    refused: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/api/v1/runs", {"content": run_json, "headers": text}),
        ("POST", "/api/v1/runs", {"data": {"name": "planted"}}),  # application/x-www-form-urlencoded
        ("POST", "/api/v1/runs", {"files": {"name": ("x.json", run_json)}}),  # multipart/form-data
        ("POST", "/api/v1/runs", {"content": run_json}),  # no Content-Type at all
        ("POST", "/api/v1/runs", {"content": run_json, "headers": {"Content-Type": "application/jsonx"}}),
        ("POST", f"/api/v1/runs/{run_id}/metrics", {"content": batch, "headers": text}),
        ("PATCH", f"/api/v1/runs/{run_id}", {"content": b'{"name": "renamed"}', "headers": text}),
        ("POST", f"/api/v1/runs/{run_id}/hold", {"content": b'{"epochs": 3}', "headers": text}),
    ]
    for method, path, kwargs in refused:
        response = client.request(method, path, **kwargs)
        assert response.status_code == 415, f"{method} {path} {kwargs}: {response.status_code} {response.text}"
        body = response.json()
        assert body["code"] == "unsupported_media_type" and "application/json" in body["detail"]
    runs = client.get("/api/v1/runs").json()["data"]
    assert [(run["name"], run["tags"]) for run in runs] == [("kept", [])]
    assert client.get(f"/api/v1/runs/{run_id}/metrics").json()["series"] == []
    assert client.get(f"/api/v1/runs/{run_id}/events").json()["data"] == events_before  # no hold, no change

    # A body-less POST (what a cross-site page can still send) changes nothing: every route that changes
    # something requires a JSON body, except the heartbeat.
    assert client.post("/api/v1/runs").status_code == 422
    assert client.post(f"/api/v1/runs/{run_id}/hold").status_code == 422
    assert client.get(f"/api/v1/runs/{run_id}/events").json()["data"] == events_before

    # JSON, with a charset or as a +json type, passes; a request without a body needs no type.
    typed = {"Content-Type": "application/json; charset=utf-8"}
    assert client.post(f"/api/v1/runs/{run_id}/metrics", content=batch, headers=typed).status_code == 200
    assert client.post(f"/api/v1/runs/{run_id}/heartbeat").status_code == 200
    patched = client.patch(
        f"/api/v1/runs/{run_id}", content=b'{"tags": ["a"]}', headers={"Content-Type": "application/merge-patch+json"}
    )
    assert patched.status_code != 415, patched.text  # fmt: skip


# --- Host header ----------------------------------------------------------------------------------------------------


def test_a_loopback_server_refuses_other_host_names(client: httpx.Client, server: LiveServer) -> None:
    """DNS rebinding: a page of attacker.example whose name now resolves to 127.0.0.1 sends Host: attacker.example."""
    rebound = ["attacker.example", f"attacker.example:{server.port}", "127.0.0.1.nip.io", "localhost.attacker.example"]
    for host in [*rebound, "[::2]:80", ""]:
        response = client.get("/api/v1/runs", headers={"Host": host})
        assert response.status_code == 400, f"Host {host!r}: {response.status_code}"
        assert response.json()["code"] == "invalid_host"
        posted = client.post("/api/v1/runs", json={"name": "planted"}, headers={"Host": host})
        assert posted.status_code == 400
    for host in (f"127.0.0.1:{server.port}", "localhost", f"LocalHost.:{server.port}", f"[::1]:{server.port}"):
        assert client.get("/api/v1/runs", headers={"Host": host}).status_code == 200, host
    assert client.get("/api/v1/runs").json()["data"] == []


def test_allowed_hosts_are_what_the_operator_lists(migrated_url: str) -> None:
    settings = Settings(database_url=migrated_url, auth=False, allowed_hosts="stagewatch.example.org, *.corp.example")
    with LiveServer(create_app(settings)) as live, httpx.Client(base_url=live.url) as http:
        for host, expected in [
            ("stagewatch.example.org", 200),
            ("STAGEWATCH.example.org:443", 200),
            ("gpu.corp.example", 200),
            ("corp.example", 400),  # "*.corp.example" is its subdomains only
            ("example.org", 400),
            ("127.0.0.1", 200),  # loopback names stay accepted
        ]:
            assert http.get("/healthz", headers={"Host": host}).status_code == expected, host


def test_the_host_default_depends_on_the_bind() -> None:
    loopback = Settings(host="127.0.0.1").trusted_hosts()
    assert sorted(loopback) == ["127.0.0.1", "::1", "localhost"]
    assert Settings(host="::1").trusted_hosts() == loopback
    # Another bind: the names it is reached by are unknown to it (auth protects it there).
    assert Settings(host="0.0.0.0").trusted_hosts() == ["*"]
    listed = Settings(host="0.0.0.0", allowed_hosts=["runs.example.org"]).trusted_hosts()
    assert sorted(listed) == ["127.0.0.1", "::1", "localhost", "runs.example.org"]
    assert "10.1.2.3" in Settings(host="10.1.2.3", allowed_hosts=["a.example"]).trusted_hosts()
    assert [host_name(h) for h in ("[::1]:8765", "Example.ORG.", "a.example:80", "::1")] == [
        "::1",
        "example.org",
        "a.example",
        "::1",
    ]


def test_the_allowed_hosts_flag_and_variable(
    migrated_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STAGEWATCH_ALLOWED_HOSTS", "a.example,  *.b.example")
    assert Settings().allowed_hosts == ["a.example", "*.b.example"]
    args = build_parser().parse_args(["serve", "--allowed-hosts", "runs.example.org"])
    assert args.allowed_hosts == "runs.example.org"

    class Served(ServerProcess):
        def command(self) -> list[str]:
            return [*super().command(), "--allowed-hosts", "runs.example.org,*.lab.example"]

    monkeypatch.delenv("STAGEWATCH_ALLOWED_HOSTS")
    with Served(migrated_url, tmp_path) as served, httpx.Client(base_url=served.url) as http:
        assert http.get("/healthz", headers={"Host": "runs.example.org:8765"}).status_code == 200
        assert http.get("/healthz", headers={"Host": "gpu1.lab.example"}).status_code == 200
        assert http.get("/healthz", headers={"Host": "attacker.example"}).status_code == 400


# --- /readyz --------------------------------------------------------------------------------------------------------


def test_readyz_answers_from_the_database_and_healthz_does_not(client: httpx.Client) -> None:
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "database": "sqlite"}
    assert client.get("/healthz").json()["status"] == "ok"


def test_readyz_is_503_while_the_postgres_database_is_gone(migrated_templates: dict[str, str]) -> None:
    """A real outage: the server's database is dropped under it (its connections cut), then made again."""
    name = f"t_ready_{uuid.uuid4().hex[:12]}"

    def create() -> None:
        with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name} TEMPLATE {migrated_templates['postgres']}")

    def drop() -> None:
        with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    create()
    try:
        settings = Settings(database_url=_database_url(name), auth=False)
        with LiveServer(create_app(settings)) as live, httpx.Client(base_url=live.url, timeout=30) as http:
            assert http.get("/readyz").json() == {"status": "ready", "database": "postgresql"}
            drop()
            gone = http.get("/readyz")
            assert gone.status_code == 503, gone.text
            assert gone.json()["code"] == "not_ready"
            assert name not in gone.text and "5432" not in gone.text  # no connection details to anyone who asks
            assert_secured(gone)
            assert http.get("/healthz").status_code == 200  # liveness: the process is fine
            create()
            assert http.get("/readyz").status_code == 200  # ready again, nothing latched
    finally:
        drop()


# --- docs -----------------------------------------------------------------------------------------------------------


def test_docs_pages_name_only_this_origin(client: httpx.Client) -> None:
    for path in ("/docs", "/redoc"):
        page = client.get(path)
        assert page.status_code == 200
        assert "http://" not in page.text and "https://" not in page.text, f"{path} links to another host"
        assert "<script>" not in page.text, f"{path} has an inline script"
    assert REDOC_CDN_LOGO not in redoc_js()
    assert client.get("/docs/assets/redoc.standalone.js").content == redoc_js()
    assert client.get("/openapi.json").json()["info"]["title"] == "Stagewatch"


def test_the_policy_allows_inline_code_only_by_hash() -> None:
    policy = parse_csp(content_security_policy(["'sha256-abc='"], ["'sha256-def='"]))
    assert policy["script-src"] == ["'self'", "'sha256-abc='", "'unsafe-hashes'", "'sha256-def='"]
    assert parse_csp(content_security_policy())["script-src"] == ["'self'"]  # no handlers: no 'unsafe-hashes'


# --- in Chromium ----------------------------------------------------------------------------------------------------


class Watched:
    """A page in a fresh context, with the CSP violations it reported, its console errors, every request it made
    and every response it got."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.requests: list[str] = []
        self.responses: list[Response] = []
        self.console: list[str] = []
        page.on("request", lambda request: self.requests.append(request.url))
        page.on("response", lambda response: self.responses.append(response))
        page.on("console", lambda message: self.console.append(f"{message.type}: {message.text}"))
        page.on("pageerror", lambda error: self.console.append(f"pageerror: {error}"))
        # Installed before any of the page's own scripts run: each violation, whatever directive it broke.
        page.add_init_script(
            """window.__violations = [];
               document.addEventListener('securitypolicyviolation', (e) =>
                 window.__violations.push(`${e.effectiveDirective} ${e.blockedURI} ${e.sample}`));"""
        )

    def violations(self) -> list[str]:
        found: list[str] = self.page.evaluate("window.__violations")
        return found

    def foreign(self, origin: str) -> list[str]:
        def other(url: str) -> bool:
            parts = urlsplit(url)
            return parts.scheme not in ("data", "blob") and f"{parts.scheme}://{parts.netloc}" != origin

        return [url for url in self.requests if other(url)]


@contextlib.contextmanager
def watched_page(browser: Browser) -> Iterator[Watched]:
    context = browser.new_context()
    context.set_default_timeout(UI_TIMEOUT_MS)
    try:
        yield Watched(context.new_page())
    finally:
        context.close()


def check_clean(watched: Watched, origin: str) -> None:
    assert watched.violations() == [], f"CSP violations on {watched.page.url}: {watched.violations()}"
    assert not [line for line in watched.console if line.startswith(("error", "pageerror"))], watched.console
    assert watched.foreign(origin) == [], f"requests to another origin: {watched.foreign(origin)}"
    for response in watched.responses:
        if response.url.startswith(origin):
            missing = {k: v for k, v in SECURITY_HEADERS.items() if response.headers.get(k) != v}
            assert not missing, f"{response.url} lacks {missing}"
            assert "frame-ancestors 'none'" in response.headers.get("content-security-policy", ""), response.url


@pytest.mark.slow
def test_dashboard_pages_run_under_the_policy_with_no_violation(
    browser: Browser, server: LiveServer, client: httpx.Client
) -> None:
    run_id = make_run(client, name="csp")
    assert client.post(f"/api/v1/runs/{run_id}/metrics", json={"points": points("loss", range(50))}).status_code == 200
    drawn = "() => window.__stagewatch && window.__stagewatch.firstChart != null"
    pages: list[tuple[str, Callable[[Page], object]]] = [
        ("/ui/", lambda page: page.locator("#runs tr").first.wait_for()),
        (f"/ui/run.html?id={run_id}", lambda page: page.wait_for_function(drawn)),
        (f"/ui/compare.html?runs={run_id}", lambda page: page.wait_for_function(drawn)),
    ]
    for path, ready in pages:
        with watched_page(browser) as watched:
            watched.page.goto(server.url + path)
            ready(watched.page)
            # The live-event stream is up (its response is checked with the others) and a point arrives live.
            if "run.html" in path:
                watched.page.locator("#live-state[data-state='live']").wait_for()
            check_clean(watched, server.url)
            assert any(r.url.endswith(".js") for r in watched.responses)
            # The policy is in force: a script injected into the page does not run, and is reported.
            ran = watched.page.evaluate(
                """() => { const s = document.createElement('script'); s.textContent = 'window.__injected = 1';
                           document.head.append(s); return window.__injected === 1; }"""
            )
            assert ran is False
            watched.page.wait_for_function("() => window.__violations.length === 1")
            assert watched.violations()[0].startswith("script-src-elem inline")


@pytest.mark.slow
def test_the_hashed_onerror_handler_still_reports_a_failed_plotly(browser: Browser, server: LiveServer) -> None:
    """run.html's ``onerror`` attribute runs under 'unsafe-hashes' with its hash: a plotly.js that cannot load is
    reported to the page (window.__plotlyFailed), without a violation."""
    with watched_page(browser) as watched:
        watched.page.route("**/vendor/plotly.min.js", lambda route: route.abort())
        watched.page.goto(f"{server.url}/ui/run.html?id=1")
        watched.page.wait_for_function("() => window.__plotlyFailed === true")
        assert watched.violations() == []


@pytest.mark.slow
def test_api_docs_load_offline_from_this_origin(browser: Browser, server: LiveServer) -> None:
    with watched_page(browser) as watched:
        watched.page.goto(server.url + "/docs")
        watched.page.locator(".opblock").first.wait_for()
        assert watched.page.locator(".opblock").count() > 10  # every operation of the API is listed
        check_clean(watched, server.url)
    with watched_page(browser) as watched:
        watched.page.goto(server.url + "/redoc")
        watched.page.get_by_role("heading", name="Stagewatch").first.wait_for()
        watched.page.get_by_role("heading", name="Read Health").wait_for()  # an operation, rendered
        check_clean(watched, server.url)
