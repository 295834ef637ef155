"""`python -m opd_grpc` (or `opd-grpc`): start the server with settings from the environment or a TOML file."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from opd_grpc.server import serve
from opd_grpc.settings import Settings, SettingsError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="opd-grpc", description=__doc__)
    parser.add_argument("--config", help="a TOML settings file (default: $OPD_CONFIG)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.load(file=args.config)
    except SettingsError as exc:
        sys.exit(f"opd-grpc: {exc}")
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
