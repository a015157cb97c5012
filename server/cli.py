"""The ``stagewatch`` command line: serve, demo, db, token, replay."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

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


def _serve(settings: Settings, *, embedded: bool) -> int:
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
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    url, embedded = _database_url(args)
    settings = Settings(
        database_url=url,
        host=args.host,
        port=args.port,
        auth=not args.no_auth,
        allow_insecure_bind=args.allow_insecure_bind,
    )
    return _serve(settings, embedded=embedded)


def cmd_demo(args: argparse.Namespace) -> int:
    # Local demo: embedded SQLite on loopback, no tokens needed.
    settings = Settings(database_url=args.db or embedded_database_url(), host="127.0.0.1", port=args.port, auth=False)
    return _serve(settings, embedded=True)


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stagewatch", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)

    serve = verbs.add_parser("serve", help="run the service")
    _add_db_option(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8765)
    serve.add_argument("--no-auth", action="store_true", help="accept requests without a token")
    serve.add_argument("--allow-insecure-bind", action="store_true", help="allow --no-auth on a non-loopback address")
    serve.set_defaults(func=cmd_serve)

    demo = verbs.add_parser("demo", help="run the local demo on embedded SQLite, no tokens needed")
    demo.add_argument("--db", metavar="URL", help="SQLite URL (default: the embedded file)")
    demo.add_argument("--port", type=int, default=8765)
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
