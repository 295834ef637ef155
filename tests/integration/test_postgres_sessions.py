"""On PostgreSQL, a transaction left idle by a replica that froze (a paused VM) or lost its network mid-way does
not hold its locks for good: the store's sessions ask PostgreSQL to end any of theirs left idle in a transaction
for 5 s (POSTGRES_SESSION), and a URL's own `options` are kept beside that."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import sqlalchemy

from opd_grpc.storage.store import SqlStore
from tests.support import TEST_DATABASE, fresh_database

pytestmark = pytest.mark.skipif(TEST_DATABASE != "postgresql", reason="PostgreSQL's sessions")
IDLE_SECONDS = 5.0
LOCK = "SELECT pg_advisory_xact_lock(4242)"  # a lock held until its transaction ends, as a doctor-day's row lock


def test_a_transaction_left_idle_loses_its_session_and_its_lock_and_the_url_options_stay(tmp_path: Path):
    """Another replica froze holding a doctor-day's lock: every call of that doctor-day on every other replica
    waited for as long as it stayed frozen, until their threads were all taken (a reviewer's find)."""
    with fresh_database(tmp_path) as url:  # its URL sets the search_path with `options`
        store = SqlStore(url)
        try:
            frozen = store.engine.connect()
            frozen.exec_driver_sql(LOCK)  # and then nothing more, as from a frozen process
            waited: list[float] = []
            search_path: list[str] = []

            def other_replica() -> None:
                with store.engine.connect() as conn:
                    started = time.monotonic()
                    conn.exec_driver_sql(LOCK)
                    waited.append(time.monotonic() - started)
                    search_path.append(conn.exec_driver_sql("SHOW search_path").scalar())
                    conn.rollback()

            waiter = threading.Thread(target=other_replica)
            waiter.start()
            waiter.join(timeout=IDLE_SECONDS + 10)
            assert len(waited) == 1 and IDLE_SECONDS - 1 < waited[0] < IDLE_SECONDS + 3, waited
            assert search_path[0].startswith("test_"), search_path  # the URL's own options kept
            with pytest.raises(sqlalchemy.exc.DBAPIError) as ended:  # its session was ended for it
                frozen.exec_driver_sql("SELECT 1")
            assert ended.value.connection_invalidated  # the store takes it as a lost connection, as it is
            frozen.close()
        finally:
            store.close()


def test_a_url_that_sets_the_timeout_itself_keeps_its_own(tmp_path: Path):
    with fresh_database(tmp_path) as url:
        store = SqlStore(url + "%20-cidle_in_transaction_session_timeout%3D0")
        try:
            with store.engine.connect() as conn:
                assert conn.exec_driver_sql("SHOW idle_in_transaction_session_timeout").scalar() == "0"
        finally:
            store.close()
