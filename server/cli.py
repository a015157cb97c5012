"""The ``stagewatch`` command line: serve, demo, db, token, replay, train."""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

from server.replay import add_arguments as add_replay_arguments
from server.replay import run as replay_run
from server.settings import InsecureBindError, Settings, check_bind, embedded_database_url

EXIT_USAGE = 2


def _database_url(args: argparse.Namespace) -> tuple[str, bool]:
    """The database to use and whether it is the embedded default (which may migrate itself)."""
    url = args.db or os.environ.get("STAGEWATCH_DATABASE_URL")
    return (url, False) if url else (embedded_database_url(), True)


def _add_db_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db",
        metavar="URL",
        help="database URL (sqlite:///path.db or postgresql://...); default: $STAGEWATCH_DATABASE_URL, "
        "else the embedded SQLite file ~/.stagewatch/stagewatch.db",
    )


def _serve(settings: Settings, *, embedded: bool, on_started: Callable[[], None] | None = None) -> int:
    import uvicorn

    from server.app import create_app
    from server.migrate import SchemaOutOfDate, ensure_schema

    try:
        check_bind(settings)
        ensure_schema(settings.database_url, auto_upgrade=embedded or settings.auto_upgrade)
    except (InsecureBindError, SchemaOutOfDate) as exc:
        print(f"stagewatch: {exc}", file=sys.stderr)
        return EXIT_USAGE
    app = create_app(settings)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    print(f"Stagewatch dashboard: http://{host}:{settings.port}/  (API docs: http://{host}:{settings.port}/docs)")
    print(f"Database: {settings.database_url}" + ("" if settings.auth else "  (auth disabled)"), flush=True)
    if on_started is not None:
        on_started()
    # Live-event streams never end by themselves: give them a moment, then close them, on shutdown.
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", timeout_graceful_shutdown=3)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    url, embedded = _database_url(args)
    settings = Settings(
        database_url=url,
        host=args.host,
        port=args.port,
        auth=not args.no_auth,
        allow_insecure_bind=args.allow_insecure_bind,
        # Absent: STAGEWATCH_ALLOWED_HOSTS, else the default of Settings.trusted_hosts.
        **({} if args.allowed_hosts is None else {"allowed_hosts": args.allowed_hosts}),
    )
    return _serve(settings, embedded=embedded)


WORKER_STOP_TIMEOUT_S = 10.0
WORKER_START_TIMEOUT_S = 60.0


def _worker_env() -> dict[str, str]:
    """The demo's environment, unbuffered so that the worker's lines show as they come."""
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


class DemoWorker:
    """``stagewatch train`` as a subprocess of the demo, started once the server answers ``/healthz``.

    Its output is read by a thread that prints which run it trains and forwards the rest with a prefix.
    :meth:`stop` ends it (terminate, then kill) when the server exits, so no worker outlives the demo.
    """

    def __init__(self, base_url: str, argv: list[str]) -> None:
        self.base_url = base_url
        self.argv = argv
        self.popen: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="stagewatch-demo-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        import httpx

        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        while True:
            if self._stopping:
                return
            try:
                if httpx.get(f"{self.base_url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                print(f"stagewatch demo: the server did not answer in {WORKER_START_TIMEOUT_S:g}s; no worker")
                return
            time.sleep(0.1)
        with self._lock:
            if self._stopping:
                return
            self.popen = subprocess.Popen(
                self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=_worker_env()
            )
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            text = line.rstrip("\n")
            if text.startswith("stagewatch train: run ") and " on " in text and "(" in text:
                run_id = text.removeprefix("stagewatch train: run ").split(" ", 1)[0]
                print(f"Worker (pid {self.popen.pid}) is training run {run_id}", flush=True)
            print(f"[worker] {text}", flush=True)
        code = self.popen.wait()
        if not self._stopping:
            print(f"stagewatch demo: the worker exited with status {code}", flush=True)

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            popen = self.popen
        if popen is None or popen.poll() is not None:
            return
        popen.terminate()
        try:
            popen.wait(timeout=WORKER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(timeout=WORKER_STOP_TIMEOUT_S)


DEMO_AUTO_APPROVE_S = 60.0


def demo_worker_command(base_url: str, *, auto_approve_after_s: float = DEMO_AUTO_APPROVE_S) -> list[str]:
    """The demo's worker: MNIST-1D with AutoDecay in approve mode, a proposal nobody decides on approved after a
    minute. One place, so that the end-to-end test of the demo's story runs exactly these settings."""
    return [
        sys.executable, "-m", "server.cli", "train",
        "--recipe", "mnist1d-cnn",
        "--schedule", "autodecay",
        "--mode", "approve",
        "--auto-approve-after", f"{auto_approve_after_s:g}",
        "--epochs", "100",
        "--server", base_url,
    ]  # fmt: skip


def cmd_demo(args: argparse.Namespace) -> int:
    # Local demo: embedded SQLite on loopback, no tokens needed, and a real worker training MNIST-1D.
    settings = Settings(database_url=args.db or embedded_database_url(), host="127.0.0.1", port=args.port, auth=False)
    if args.no_worker:
        return _serve(settings, embedded=True)
    missing = [m for m in ("torch", "mnist1d") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"stagewatch demo: no worker ({', '.join(missing)} not installed: pip install '.[train]')")
        return _serve(settings, embedded=True)
    base_url = f"http://127.0.0.1:{args.port}"
    worker = DemoWorker(base_url, demo_worker_command(base_url))
    # uvicorn re-raises SIGTERM once it has shut down; make that an exception so that `finally` stops the worker.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return _serve(settings, embedded=True, on_started=worker.start)
    finally:
        worker.stop()
        signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum: int, frame: object) -> None:  # noqa: ARG001 - the handler signature is fixed
    raise SystemExit(128 + signum)


def cmd_db(args: argparse.Namespace) -> int:
    from server.db import make_engine
    from server.migrate import current_revision, downgrade, head_revision, upgrade

    url, _ = _database_url(args)
    if args.action == "upgrade":
        upgrade(url, args.revision or "head")
    elif args.action == "downgrade":
        if not args.revision:
            print("stagewatch: db downgrade needs a revision (e.g. 'base' or '-1')", file=sys.stderr)
            return EXIT_USAGE
        downgrade(url, args.revision)
    engine = make_engine(url)
    try:
        print(f"current: {current_revision(engine) or '(empty)'}  head: {head_revision(url)}")
    finally:
        engine.dispose()
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from server.db import make_engine, make_session_factory, transaction
    from server.migrate import SchemaOutOfDate, ensure_schema
    from server.store.tokens import create_token, list_tokens, revoke_token

    url, embedded = _database_url(args)
    try:
        ensure_schema(url, auto_upgrade=embedded)
    except SchemaOutOfDate as exc:
        print(f"stagewatch: {exc}", file=sys.stderr)
        return EXIT_USAGE
    engine = make_engine(url)
    try:
        with transaction(make_session_factory(engine), write=True) as session:
            if args.action == "create":
                row, plaintext = create_token(session, name=args.name, role=args.role)
                print(plaintext)
                print(f"token {row.id} ({row.role}, {row.name!r}): shown once, store it now", file=sys.stderr)
            elif args.action == "list":
                for row in list_tokens(session):
                    state = f"revoked {row.revoked_at:%Y-%m-%d}" if row.revoked_at else "active"
                    print(f"{row.id}\t{row.role}\t{row.name}\t{state}")
            elif not revoke_token(session, args.id):
                print(f"stagewatch: no active token with id {args.id}", file=sys.stderr)
                return EXIT_USAGE
    finally:
        engine.dispose()
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    return replay_run(args)


def cmd_train(argv: Sequence[str]) -> int:
    # Imported here: the service must not need torch (trainer.train_cli imports it only when training).
    from trainer.train_cli import main as train_main

    return train_main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stagewatch", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)

    serve = verbs.add_parser("serve", help="run the service")
    _add_db_option(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8765)
    serve.add_argument("--no-auth", action="store_true", help="accept requests without a token")
    serve.add_argument("--allow-insecure-bind", action="store_true", help="allow --no-auth on a non-loopback address")
    serve.add_argument(
        "--allowed-hosts",
        metavar="NAMES",
        help="comma-separated Host header names to answer besides localhost, 127.0.0.1, ::1 and the bound address "
        "('*.example.org': its subdomains, '*': any); others get 400 (DNS rebinding). Default: none more on a "
        "loopback bind, any Host on another bind. Also $STAGEWATCH_ALLOWED_HOSTS",
    )
    serve.set_defaults(func=cmd_serve)

    demo = verbs.add_parser("demo", help="run the local demo on embedded SQLite, no tokens needed")
    demo.add_argument("--db", metavar="URL", help="SQLite URL (default: the embedded file)")
    demo.add_argument("--port", type=int, default=8765)
    demo.add_argument("--no-worker", action="store_true", help="serve only; do not start a training worker")
    demo.set_defaults(func=cmd_demo)

    db = verbs.add_parser("db", help="schema migrations")
    db.add_argument("action", choices=["upgrade", "downgrade", "current"])
    db.add_argument("revision", nargs="?", help="target revision (default for upgrade: head)")
    _add_db_option(db)
    db.set_defaults(func=cmd_db)

    token = verbs.add_parser("token", help="API tokens")
    token_verbs = token.add_subparsers(dest="action", required=True)
    create = token_verbs.add_parser("create", help="create a token and print it (once)")
    create.add_argument("--role", required=True, choices=["viewer", "worker", "operator"])
    create.add_argument("--name", default="token", help="a label to recognise it by")
    _add_db_option(create)
    listing = token_verbs.add_parser("list", help="list tokens (never their secrets)")
    _add_db_option(listing)
    revoke = token_verbs.add_parser("revoke", help="revoke a token by id")
    revoke.add_argument("id", type=int)
    _add_db_option(revoke)
    token.set_defaults(func=cmd_token)

    replay = verbs.add_parser(
        "replay",
        help="run a detector over a recorded run (CSV or TensorBoard log): decisions as JSON lines",
        description="Run a detector over a recorded run, point by point, and print each decision as one JSON line.",
    )
    add_replay_arguments(replay)
    replay.set_defaults(func=cmd_replay)

    # Listed here for --help; main() hands everything after "train" to trainer.train_cli, which parses it.
    verbs.add_parser(
        "train",
        add_help=False,
        help="train a reference recipe (mnist1d-cnn) and stream it to a server; see stagewatch train --help",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == ["train"]:
        return cmd_train(words[1:])
    args = build_parser().parse_args(words)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
