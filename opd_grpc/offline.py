"""The engine on a database with no server in front of it: what `opd-grpc keys` works with, and what a tool that
makes keys the same way (the simulation's own server, the tests) opens."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

from opd_grpc.engine.clock import WallClock
from opd_grpc.engine.model import Rules
from opd_grpc.engine.service import OPDService
from opd_grpc.storage import schema
from opd_grpc.storage.store import SqlStore


@dataclass(frozen=True)
class Offline:
    service: OPDService
    # The database was empty (an SQLite file that was not there is made): no server has used it. A command run in
    # the wrong folder, or with another DATABASE_URL than the server's, says so rather than seem to work.
    created: bool
    database: str  # the URL without its password, an SQLite file's path made absolute


@contextlib.contextmanager
def offline_service(database_url: str, rules: Rules) -> Iterator[Offline]:
    """The service on `database_url` (an empty database gets the schema; an older one is refused, as a server
    refuses it), closed when the block ends."""
    store = SqlStore(database_url)
    try:
        created = schema.prepare(store.engine, migrate=False)
        yield Offline(OPDService(store, WallClock(), rules), created, store.shown_url)
    finally:
        store.close()
