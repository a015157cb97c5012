"""The worker's metric batches over libcurl (trainer.curl): the same contract as over httpx, proved on real sockets.

Every answer the server gives comes back as an ``httpx.Response`` (any status); every way of getting no answer
(nothing listening, a peer that never answers or hangs up, a server SIGKILLed between two batches) is an
``httpx.TransportError``, which is what the sender's outage policy is built on. Proxies follow the same
environment variables as httpx.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import trustme

import trainer
from tests.conftest import LiveServer, free_port, make_run
from tests.server_process import ServerProcess
from trainer.client import Client


def tables_body(key: str, steps: range, value: float = 0.5) -> bytes:
    return json.dumps({"tables": [{"keys": [key], "steps": list(steps), "values": [[value] * len(steps)]}]}).encode()


@contextlib.contextmanager
def raw_listener(handle: Callable[[socket.socket], object]) -> Iterator[str]:
    """A loopback TCP listener handing each accepted connection to ``handle`` (in a thread); yields its URL."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                handle(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def read_request(conn: socket.socket) -> bytes:
    """Reads one request (headers and a Content-Length body) off ``conn``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")),
        0,
    )
    while len(body) < length:
        body += conn.recv(65536)
    return data


@pytest.mark.parametrize("over", ["libcurl", "httpx"])
def test_a_run_stores_every_point_over_either_path(server: LiveServer, client: httpx.Client, tmp_path: Path, over: str):
    transport = httpx.HTTPTransport() if over == "httpx" else None
    assert Client(server.url, transport=transport).metrics_over == over
    with trainer.start_run(server.url, name=over, spool_dir=tmp_path, transport=transport) as run:
        for step in range(3000):
            run.log({"loss": 1.0 / (step + 1), "lr": 0.1}, step=step)
        assert run.flush(timeout=30)
        run_id = run.id
    assert run.points_sent == 6000 and run.batches_sent >= 1
    latest = client.get(f"/api/v1/runs/{run_id}").json()["latest"]
    assert {k: v["count"] for k, v in latest.items()} == {"loss": 3000, "lr": 3000}


def test_any_answer_is_a_response_with_its_status_and_detail(server: LiveServer, client: httpx.Client):
    run_id = make_run(client)
    curl = Client(server.url)
    try:
        stored = curl.post_metrics(run_id, tables_body("loss", range(5)))
        assert stored.status_code == 200 and stored.json()["accepted"] == 5
        bad = curl.post_metrics(run_id, b'{"tables": [{"keys": ["loss"], "steps": [1, 2], "values": [[1.0]]}]}')
        assert bad.status_code == 422
        assert "tables[0].values[0]" in json.dumps(bad.json())
        missing = curl.post_metrics(run_id + 1000, tables_body("loss", range(5)))
        assert missing.status_code == 404
    finally:
        curl.close()
    assert client.get(f"/api/v1/runs/{run_id}").json()["latest"]["loss"]["count"] == 5


def test_the_token_travels_with_every_batch(secured: tuple[str, dict[str, str]]):
    url, tokens = secured
    worker = Client(url, token=tokens["worker"])
    anonymous = Client(url)
    try:
        created = worker.create_run({"name": "token"})
        assert created.status_code == 201, created.text
        run_id = created.json()["id"]
        assert worker.post_metrics(run_id, tables_body("loss", range(3))).status_code == 200
        refused = anonymous.post_metrics(run_id, tables_body("loss", range(3, 6)))
        assert refused.status_code == 401
    finally:
        worker.close()
        anonymous.close()


def test_nothing_listening_is_a_connect_error():
    curl = Client(f"http://127.0.0.1:{free_port()}", timeout=2.0)
    try:
        with pytest.raises(httpx.ConnectError):
            curl.post_metrics(1, tables_body("loss", range(3)))
    finally:
        curl.close()


def test_a_peer_that_never_answers_is_a_timeout():
    gate = threading.Event()

    def hold(conn: socket.socket) -> None:
        read_request(conn)
        gate.wait(10)  # keeps the connection open, answering nothing, until the client has given up

    with raw_listener(hold) as url:
        curl = Client(url, timeout=0.5)
        try:
            started = time.monotonic()
            with pytest.raises(httpx.TimeoutException):
                curl.post_metrics(1, tables_body("loss", range(3)))
            assert time.monotonic() - started < 5
        finally:
            gate.set()
            curl.close()


def test_a_peer_that_hangs_up_without_an_answer_is_a_transport_error():
    with raw_listener(read_request) as url:  # reads the request, then closes the connection
        curl = Client(url, timeout=5.0)
        try:
            with pytest.raises(httpx.RemoteProtocolError):
                curl.post_metrics(1, tables_body("loss", range(3)))
        finally:
            curl.close()


def test_a_kept_alive_connection_survives_a_server_sigkill(migrated_url: str, tmp_path: Path):
    """The handle keeps its connection between batches; after the server is SIGKILLed and started again on the
    same port, the next batch goes out on a new connection, or fails as a transport error the sender retries."""
    with ServerProcess(migrated_url, tmp_path) as process:
        with httpx.Client(base_url=process.url, timeout=30) as http:
            run_id = make_run(http)
        curl = Client(process.url)
        try:
            assert curl.post_metrics(run_id, tables_body("loss", range(0, 10))).status_code == 200
            process.kill()
            with pytest.raises(httpx.TransportError):
                curl.post_metrics(run_id, tables_body("loss", range(10, 20)))
            process.start()
            attempts = 0
            while True:  # at most one more failure: a connection libcurl had not yet seen die
                attempts += 1
                try:
                    answer = curl.post_metrics(run_id, tables_body("loss", range(10, 20)))
                    break
                except httpx.TransportError:
                    assert attempts < 2
            assert answer.status_code == 200 and answer.json()["accepted"] == 10
        finally:
            curl.close()
        with httpx.Client(base_url=process.url, timeout=30) as http:
            assert http.get(f"/api/v1/runs/{run_id}").json()["latest"]["loss"]["count"] == 20


def test_batches_follow_the_proxy_environment_as_httpx_does(
    server: LiveServer, client: httpx.Client, monkeypatch: pytest.MonkeyPatch
):
    run_id = make_run(client)
    dead_proxy = f"http://127.0.0.1:{free_port()}"
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "NO_PROXY", "ALL_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", dead_proxy)  # upper case: httpx reads it, libcurl alone would not
    through_proxy = Client(server.url, timeout=2.0)
    try:
        with pytest.raises(httpx.ConnectError):  # it went to the proxy, which is not there
            through_proxy.post_metrics(run_id, tables_body("loss", range(3)))
    finally:
        through_proxy.close()
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    direct = Client(server.url, timeout=2.0)
    try:
        assert direct.post_metrics(run_id, tables_body("loss", range(3))).status_code == 200
    finally:
        direct.close()


def test_https_batches_verify_the_server_certificate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Over TLS the server's certificate is checked: against certifi's bundle by default (a private CA fails, as
    with httpx), against ``SSL_CERT_FILE`` when set."""
    ca = trustme.CA()
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    answer = b'{"accepted": 3}'

    def serve_tls(conn: socket.socket) -> None:
        # The client refusing the certificate ends the handshake with an error here.
        with contextlib.suppress(ssl.SSLError, OSError), server_context.wrap_socket(conn, server_side=True) as tls:
            read_request(tls)
            tls.sendall(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                + f"content-length: {len(answer)}\r\n\r\n".encode()
                + answer
            )

    for name in ("SSL_CERT_FILE", "SSL_CERT_DIR", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    with raw_listener(serve_tls) as url:
        https = url.replace("http://", "https://")
        untrusted = Client(https, timeout=5.0)
        try:
            assert untrusted.metrics_over == "libcurl"
            with pytest.raises(httpx.ConnectError, match="certificate"):
                untrusted.post_metrics(1, tables_body("loss", range(3)))
        finally:
            untrusted.close()
        ca_file = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
        trusted = Client(https, timeout=5.0)
        try:
            response = trusted.post_metrics(1, tables_body("loss", range(3)))
            assert response.status_code == 200 and response.json() == {"accepted": 3}
        finally:
            trusted.close()
