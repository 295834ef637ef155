"""The engine on a database with no server in front of it: what `opd-grpc keys` works with, and what a tool that
makes keys the same way (the simulation's own server, the tests) opens."""

from __future__ import annotations

import contextlib
from typing import Iterator

from opd_grpc.engine.clock import WallClock
from opd_grpc.engine.model import Rules
from opd_grpc.engine.service import OPDService
from opd_grpc.storage import schema
from opd_grpc.storage.store import SqlStore


@contextlib.contextmanager
def offline_service(database_url: str, rules: Rules) -> Iterator[OPDService]:
    """The service on `database_url` (an empty database gets the schema; an older one is refused, as a server
    refuses it), closed when the block ends."""
    store = SqlStore(database_url)
    try:
        schema.prepare(store.engine, migrate=False)
        yield OPDService(store, WallClock(), rules)
    finally:
        store.close()
