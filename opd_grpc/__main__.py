"""`python -m opd_grpc` (or `opd-grpc`): start the server with settings from the environment or a TOML file.

`--migrate` first brings the database's schema up to date, `--migrate-only` does that and exits (`make migrate`);
without them the server refuses to start on an older schema (opd_grpc/storage/schema.py).

`opd-grpc keys add --role ROLE --name WHO`, `keys list`, `keys revoke KEY_ID` manage the API keys (SPEC §13) in the
settings' database; a running server sees the change within API_KEYS_REFRESH_SECONDS.

`opd-grpc backup --to PATH` writes a consistent copy of the settings' SQLite database to the new file PATH, beside
a running server (opd_grpc/storage/backup.py); on PostgreSQL, pg_dump does that job."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

import sqlalchemy

from opd_grpc.api import observe
from opd_grpc.engine.access import ROLES, Actor
from opd_grpc.engine.errors import EngineError
from opd_grpc.offline import offline_service
from opd_grpc.server import serve
from opd_grpc.settings import Settings, SettingsError
from opd_grpc.storage import schema
from opd_grpc.storage.backup import BackupError, backup

# Who the audit log names for a key made or revoked on the command line: someone with the database's settings.
OPERATOR = Actor("command", "operator")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="opd-grpc", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a TOML settings file (default: $OPD_CONFIG)")
    migration = parser.add_mutually_exclusive_group()
    migration.add_argument("--migrate", action="store_true",
                           help="upgrade the database's schema to this version's, then serve")
    migration.add_argument("--migrate-only", action="store_true",
                           help="upgrade the database's schema to this version's, then exit")
    commands = parser.add_subparsers(dest="command")
    keys = commands.add_parser("keys", help="add, list or revoke API keys").add_subparsers(dest="action",
                                                                                            required=True)
    add = keys.add_parser("add", help="make a key and print it (once: only its hash is kept)")
    add.add_argument("--role", required=True, choices=ROLES)
    add.add_argument("--name", required=True, help="who or what holds it, e.g. reception-desk-2")
    keys.add_parser("list", help="every key: id, role, name, made, revoked")
    revoke = keys.add_parser("revoke", help="revoke a key by its id (the 8 hex digits after opd_)")
    revoke.add_argument("key_id")
    backup_command = commands.add_parser("backup", help="copy the SQLite database to a new file beside a running "
                                                        "server")
    backup_command.add_argument("--to", required=True, type=Path, metavar="PATH",
                                help="the new file (never overwritten)")
    args = parser.parse_args(argv)
    observe.configure_logging()
    if args.command:  # a one-line answer, without notes on how the schema was opened (a new one is said below)
        for noisy in ("alembic", "opd_grpc.storage.schema"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        settings = Settings.load(file=args.config)
        if args.command == "keys":
            _keys(settings, args)
        elif args.command == "backup":
            made = backup(settings.DATABASE_URL, args.to)
            print(f"opd-grpc: backed up {made.source} to {made.path} ({made.size_bytes:,} bytes, schema revision "
                  f"{made.revision}, {made.tokens:,} tokens)", flush=True)
        elif args.migrate_only:
            schema.upgrade(settings.DATABASE_URL)
            print(f"opd-grpc: the database is at schema revision {schema.head()}", flush=True)
        else:
            asyncio.run(serve(settings, migrate=args.migrate))
    except (SettingsError, schema.SchemaMismatch, EngineError, BackupError, OSError) as exc:
        sys.exit(f"opd-grpc: {exc}")
    except sqlalchemy.exc.SQLAlchemyError as exc:  # a URL it cannot read, a driver it lacks, a database away
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        sys.exit(f"opd-grpc: cannot use the database at DATABASE_URL {_shown(settings.DATABASE_URL)}: {first}")


def _shown(url: str) -> str:
    """The URL without its password, for a message."""
    try:
        return sqlalchemy.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return repr(url)


def _keys(settings: Settings, args: argparse.Namespace) -> None:
    with offline_service(settings.DATABASE_URL, settings.rules()) as offline:
        if offline.created:
            file = offline.database.startswith("sqlite")
            made = (f"there was no database at {offline.database}: a new, empty one was made" if file else
                    f"the database at {offline.database} was empty: the schema was made in it")
            folder = ", or run this in the server's folder" if file else ""
            print(f"opd-grpc: {made}. A server uses it only if its DATABASE_URL names it (set OPD_DATABASE_URL or "
                  f"--config as the server's{folder}).", file=sys.stderr, flush=True)
        service = offline.service
        if args.action == "add":
            key, text = service.add_key(args.name, args.role, OPERATOR)
            print(f"key {key.key_id} ({key.role}, {key.name}): {text}\n"
                  "Give it to its holder now: it is not shown again.")
        elif args.action == "list":
            for key in service.list_keys():
                revoked = f"revoked {key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "active"
                print(f"{key.key_id}  {key.role:<9}  {key.created_at:%Y-%m-%d %H:%M}  {revoked:<24}  {key.name}")
        else:
            service.revoke_key(args.key_id, OPERATOR)
            print(f"key {args.key_id} revoked; servers refuse it within {settings.API_KEYS_REFRESH_SECONDS:g} s")


if __name__ == "__main__":
    main()
