"""Queue changes between replicas on PostgreSQL: NOTIFY is the wake-up, the event table stays the truth.

After a doctor-day's change commits, its new last sequence goes out on the `opd_queue_events` channel as
`<schema>|<sender>|<doctor_id>|<date>|<sequence>`; every replica LISTENs, drops its own notifications (its hub
already has those events) and those of other schemas, and wakes its watchers of the day, which read the events
from the table.

The notifications are sent after the commit, from a thread of their own that coalesces them per day and sends
each batch in one transaction that does not wait for the disk. A NOTIFY inside the change's own transaction
would be atomic with it, but PostgreSQL serializes the commits of every notifying transaction in the database on
one lock held through the commit's disk flush (measured here: 8 writers committed 40% less). A notification can
be lost either way (a replica killed between commit and notify, a dropped LISTEN connection): the hub's periodic
catch-up reads the store's last sequences, and a listener that (re)connects asks for that catch-up at once.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import uuid
from typing import Any, Callable

import psycopg
from sqlalchemy import Engine

from opd_grpc.engine.service import DayKey

log = logging.getLogger(__name__)

CHANNEL = "opd_queue_events"
LISTEN_WAIT_SECONDS = 1.0  # how often an idle listener looks whether it is being stopped
RECONNECT_FIRST_SECONDS = 0.1
RECONNECT_MAX_SECONDS = 5.0


class QueueNotifications:
    """Sends this process's queue changes to the other replicas and hands theirs to `on_change(key, sequence)`;
    `on_missed()` is called whenever notifications may have been lost (each time the listener connects)."""

    def __init__(self, engine: Engine, on_change: Callable[[DayKey, int], None], on_missed: Callable[[], None]):
        _, params = engine.dialect.create_connect_args(engine.url)
        self._connect_params = {"connect_timeout": 10,
                                **{k: v for k, v in params.items() if k != "context"}}  # (SQLAlchemy's adapters)
        self.on_change = on_change
        self.on_missed = on_missed
        self.sender = uuid.uuid4().hex[:12]
        self._pending: dict[DayKey, int] = {}
        self._pending_changed = threading.Condition()
        self._stopping = threading.Event()
        self._threads = [threading.Thread(target=self._send_forever, name="opd-pg-notify", daemon=True),
                         threading.Thread(target=self._listen_forever, name="opd-pg-listen", daemon=True)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Sends what is pending, then ends both threads (the last notification wakes the listener)."""
        self._stopping.set()
        with self._pending_changed:
            self._pending_changed.notify()
        for thread in self._threads:
            if thread.ident is not None:  # started
                thread.join()

    def send(self, key: DayKey, sequence: int) -> None:
        """After a commit: `key` reached `sequence`. Never waits for the database."""
        with self._pending_changed:
            if sequence > self._pending.get(key, 0):
                self._pending[key] = sequence
            self._pending_changed.notify()

    def _connect(self, role: str) -> tuple[psycopg.Connection[Any], str]:
        """An autocommit connection named for pg_stat_activity, and its schema (which scopes the channel)."""
        conn = psycopg.connect(**self._connect_params, autocommit=True,
                               application_name=f"opd-grpc {role} {os.getpid()}")
        try:
            row = conn.execute("SELECT current_schema()").fetchone()
        except BaseException:
            conn.close()
            raise
        return conn, row[0] if row else ""

    def _send_forever(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        schema = ""
        delay = RECONNECT_FIRST_SECONDS
        while True:
            with self._pending_changed:
                while not self._pending and not self._stopping.is_set():
                    self._pending_changed.wait()
                batch, self._pending = self._pending, {}
            stopping = self._stopping.is_set()
            try:
                if conn is None:
                    conn, schema = self._connect("notify")
                    conn.execute("SET synchronous_commit = off")  # a wake-up need not outlive a crash
                payloads = [f"{schema}|{self.sender}|{doctor_id}|{date.isoformat()}|{sequence}"
                            for (doctor_id, date), sequence in batch.items()]
                if stopping:
                    payloads.append(f"{schema}|{self.sender}|stopping")  # wakes this process's listener
                conn.execute("SELECT pg_notify(%s, payload) FROM unnest(%s::text[]) AS payload",
                             (CHANNEL, payloads))
                delay = RECONNECT_FIRST_SECONDS
            except psycopg.Error as error:
                log.warning("queue notifications could not be sent (%s); trying again in %.1f s", error, delay)
                if conn is not None:
                    conn.close()
                    conn = None
                with self._pending_changed:  # sent again after the newer ones: the highest sequence wins
                    for key, sequence in batch.items():
                        self._pending[key] = max(sequence, self._pending.get(key, 0))
                if not stopping:
                    self._stopping.wait(delay)
                    delay = min(delay * 2, RECONNECT_MAX_SECONDS)
            if stopping:
                break
        if conn is not None:
            conn.close()

    def _listen_forever(self) -> None:
        delay = RECONNECT_FIRST_SECONDS
        while not self._stopping.is_set():
            try:
                conn, schema = self._connect("listen")
                with conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.on_missed()  # whatever was sent while this process was not listening
                    delay = RECONNECT_FIRST_SECONDS
                    while not self._stopping.is_set():
                        for note in conn.notifies(timeout=LISTEN_WAIT_SECONDS):
                            if self._stopping.is_set():
                                break
                            self._received(note.payload, schema)
            except psycopg.Error as error:
                log.warning("the queue listener lost its connection (%s); reconnecting in %.1f s", error, delay)
                self._stopping.wait(delay)
                delay = min(delay * 2, RECONNECT_MAX_SECONDS)

    def _received(self, payload: str, schema: str) -> None:
        parts = payload.split("|")
        if len(parts) != 5 or parts[0] != schema or parts[1] == self.sender:
            return  # another schema's, this process's own, or a replica's "stopping"
        try:
            key, sequence = (parts[2], dt.date.fromisoformat(parts[3])), int(parts[4])
        except ValueError:
            log.warning("ignored a malformed queue notification %r", payload)
            return
        self.on_change(key, sequence)
