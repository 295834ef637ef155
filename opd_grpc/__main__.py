"""`python -m opd_grpc` (or `opd-grpc`): start the server with settings from the environment or a TOML file.

`--migrate` first brings the database's schema up to date, `--migrate-only` does that and exits (`make migrate`);
without them the server refuses to start on an older schema (opd_grpc/storage/schema.py)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from opd_grpc.server import serve
from opd_grpc.settings import Settings, SettingsError
from opd_grpc.storage import schema


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="opd-grpc", description=__doc__)
    parser.add_argument("--config", help="a TOML settings file (default: $OPD_CONFIG)")
    migration = parser.add_mutually_exclusive_group()
    migration.add_argument("--migrate", action="store_true",
                           help="upgrade the database's schema to this version's, then serve")
    migration.add_argument("--migrate-only", action="store_true",
                           help="upgrade the database's schema to this version's, then exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.load(file=args.config)
        if args.migrate_only:
            schema.upgrade(settings.DATABASE_URL)
            print(f"opd-grpc: the database is at schema revision {schema.head()}", flush=True)
            return
        asyncio.run(serve(settings, migrate=args.migrate))
    except (SettingsError, schema.SchemaMismatch) as exc:
        sys.exit(f"opd-grpc: {exc}")


if __name__ == "__main__":
    main()
