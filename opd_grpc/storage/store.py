"""SQLAlchemy storage: one transaction per unit of work.

SQLite (the embedded default) runs in WAL mode; a write unit of work takes a process-wide writer lock and
then `BEGIN IMMEDIATE` on the one writer connection, so writers queue on a lock instead of spinning in
SQLite's busy handler, and a reader (on a pooled connection) never blocks a writer. On PostgreSQL a change locks
its doctor-day row with `SELECT … FOR UPDATE`, and a read runs in one REPEATABLE READ, READ ONLY snapshot with no
lock, so that reads (display boards, status screens) never wait for another replica's change.
"""

from __future__ import annotations

import contextlib
import functools
import datetime as dt
import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any, Iterator, Mapping

from sqlalchemy import (
    Connection, Engine, bindparam, create_engine, delete, event, func, insert, select, tuple_, update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from opd_grpc.engine.access import ApiKey
from opd_grpc.engine.audit import AuditEntry
from opd_grpc.engine.model import (
    DayChanges, Doctor, DoctorDay, EventKind, Patient, QueueEvent, Rules, Slot, Source, Status, Token,
)
from opd_grpc.engine.errors import Conflict, Unavailable
from opd_grpc.engine.schedule import Holiday, SlotTemplate, TemplateSlot
from opd_grpc.engine.service import DayKey, StoredRequest
from opd_grpc.storage.tables import (
    ApiKeyRow, AuditRow, DoctorDayRow, DoctorRow, HolidayRow, NoShowSweepRow, QueueEventRow, SlotRow,
    SlotTemplateRow, StoredRequestRow, TokenRow,
)

log = logging.getLogger(__name__)

doctors, days, slots, tokens, events, requests, api_keys, audit = (
    DoctorRow.__table__, DoctorDayRow.__table__, SlotRow.__table__, TokenRow.__table__,
    QueueEventRow.__table__, StoredRequestRow.__table__, ApiKeyRow.__table__, AuditRow.__table__)
templates, holidays, sweep = SlotTemplateRow.__table__, HolidayRow.__table__, NoShowSweepRow.__table__


def _insert(table: Any) -> Any:
    """All columns but an autoincrementing key, each from the parameter of its name."""
    return insert(table).values({c.name: bindparam(c.name) for c in table.c if c is not table.autoincrement_column})


def _update(table: Any, key: str, columns: tuple[str, ...]) -> Any:
    return update(table).where(table.c[key] == bindparam(f"k_{key}")).values({c: bindparam(c) for c in columns})


def _of_day(table: Any) -> tuple[Any, Any]:
    """The rows of one doctor-day, by the `doctor_id` and `date` parameters."""
    return table.c.doctor_id == bindparam("doctor_id"), table.c.date == bindparam("date")


class _HotStatements:
    """The statements of every allocation and move, compiled once for the engine's dialect and run on the
    driver's cursor: SQLAlchemy's per-execution work was most of an allocation's storage time."""

    def __init__(self, dialect: Any):
        def sql(statement: Any) -> str:
            return str(statement.compile(dialect=dialect))

        day_version = select(days.c.last_sequence).where(*_of_day(days))
        self.day_version = sql(day_version.with_for_update())
        self.day_version_read = sql(day_version)
        self.update_day = sql(_update(days, "doctor_id", ("last_token_number", "last_sequence"))
                              .where(days.c.date == bindparam("k_date")))
        self.insert_day = sql(_insert(days))
        self.insert_slot = sql(_insert(slots))
        self.update_slot = sql(_update(slots, "slot_id", ("max_capacity",)))
        self.insert_token = sql(_insert(tokens))
        self.update_token = sql(_update(tokens, "token_id", ("status", "updated_at", "checked_in_at", "called_at",
                                                             "completed_at", "bump_count")))
        self.insert_event = sql(_insert(events))
        self.stored_request = sql(select(requests.c.method, requests.c.fingerprint, requests.c.response,
                                         requests.c.refusal)
                                  .where(requests.c.request_id == bindparam("request_id")))
        self.insert_request = sql(_insert(requests))
        self.insert_audit = sql(_insert(audit))


_DAY_ROW = select(days.c.last_token_number, days.c.last_sequence).where(*_of_day(days))
_DAY_SLOTS = select(slots).where(*_of_day(slots))
_DAY_TOKENS = select(tokens).where(*_of_day(tokens))
_EVENTS_AFTER = (select(events, tokens.c.source, tokens.c.created_at)
                 .outerjoin(tokens, tokens.c.token_id == events.c.token_id)
                 .where(*_of_day(events), events.c.sequence > bindparam("after"))
                 .order_by(events.c.sequence).limit(bindparam("limit")))
_FIRST_EVENT = select(func.min(events.c.sequence)).where(*_of_day(events))
_NAMED_AFTER = (select(events.c.sequence, events.c.token_id, events.c.slot_id)
                .where(*_of_day(events), events.c.sequence > bindparam("after")).order_by(events.c.sequence))
_TOKENS_BY_ID = select(tokens).where(tokens.c.token_id.in_(bindparam("ids", expanding=True)))
_SLOTS_BY_ID = select(slots).where(slots.c.slot_id.in_(bindparam("ids", expanding=True)))
_ANY_DOCTOR = select(doctors.c.doctor_id).limit(1)
_KEYS_PER_QUERY = 500
# A read's transaction on PostgreSQL: one snapshot for all its statements, and no lock.
_BEGIN_SNAPSHOT = "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY"
CONNECT_TIMEOUT_SECONDS = 5
# libpq's own settings for a PostgreSQL connection, unless the URL sets them: a new connection to a host that does
# not answer fails after CONNECT_TIMEOUT_SECONDS; an open one whose packets are dropped (a lost network) is closed
# once what it sent has gone unacknowledged for 15 s, or its peer has not answered keepalives for about 25 s,
# instead of waiting the kernel's 15 minutes, its calls, health's check and a shutdown with it.
POSTGRES_CONNECTION = {"connect_timeout": CONNECT_TIMEOUT_SECONDS, "tcp_user_timeout": 15_000, "keepalives": 1,
                       "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}
# And PostgreSQL's own, SET on each new session, unless the URL's `options` set them: a unit of work waits on
# nothing but its own statements, so a transaction left idle this long belongs to a replica that froze (a paused
# VM) or lost its network mid-way. PostgreSQL ends that session and its locks with it; without this, that replica
# held a doctor-day's row lock for as long as it stayed frozen, and every other replica's calls on that doctor-day
# waited, until their threads were all taken and they answered nothing at all. A SET, not libpq's `options`
# startup parameter, which a connection pooler in between (PgBouncer) may refuse.
POSTGRES_SESSION = {"idle_in_transaction_session_timeout": "5s"}


class SqlStore:
    def __init__(self, url: str):
        self.url = make_url(url)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        # For messages: the URL without its password, an SQLite file's path made absolute (a relative one is the
        # process's folder's, which is what an operator in another folder gets wrong).
        self.shown_url = (self.url.set(database=str(Path(self.url.database).resolve()))
                          if self.is_sqlite and self.url.database not in (None, "", ":memory:")
                          else self.url).render_as_string()
        # SQLite takes named parameters (:name) natively, so hot statements run with plain dicts.
        options: dict[str, Any] = {"paramstyle": "named"} if self.is_sqlite else {
            "pool_pre_ping": True,
            "connect_args": {k: v for k, v in POSTGRES_CONNECTION.items() if k not in self.url.query}}
        self.engine: Engine = create_engine(url, **options)
        self._writer = threading.Lock() if self.is_sqlite else None
        self._writer_uow: SqlUnitOfWork | None = None
        self._checkpointer: _Checkpointer | None = None
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_connect)
            self._checkpointer = _Checkpointer(self.engine, self._writer)
        else:
            given = self.url.query.get("options", "")
            given = given if isinstance(given, str) else " ".join(given)  # `options` named more than once
            session = {name: value for name, value in POSTGRES_SESSION.items() if name not in given}
            if session:
                event.listen(self.engine, "connect", functools.partial(_postgres_connect, session))
        self.hot = _HotStatements(self.engine.dialect)

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
        with self._writer or contextlib.nullcontext():
            if self._writer_uow is not None:
                self._writer_uow.conn.close()
                self._writer_uow = None
        self.engine.dispose()

    @contextlib.contextmanager
    def unit_of_work(self, write: bool) -> Iterator[SqlUnitOfWork]:
        """One transaction; without commit() it rolls back. A race lost to another process's transaction comes
        out as `Conflict`, which the service answers by running the unit of work again."""
        uow = None
        try:
            with self._transaction(write) as uow:
                yield uow
        except Exception as error:  # the hot statements run on the driver: its own errors come out unwrapped
            cause = error.orig if isinstance(error, DBAPIError) else error
            if not isinstance(cause, self.engine.dialect.loaded_dbapi.Error):
                raise
            if self._connection_lost(error) and uow is not None and uow.committing:
                raise Unavailable("The database connection was lost while committing this change, so it may or may "
                                  "not have been saved; send the request again with the same request_id.",
                                  "COMMIT_OUTCOME_UNKNOWN") from error
            if self._connection_lost(error) or getattr(cause, "sqlstate", None) in _RACE_SQLSTATES:
                raise Conflict(str(cause).splitlines()[0] if str(cause) else type(cause).__name__) from error
            raise

    def check(self) -> None:
        """Reads a table (health): raises if the database does not answer."""
        with self.engine.connect() as conn:
            conn.execute(_ANY_DOCTOR)

    def _connection_lost(self, error: Exception) -> bool:
        """A dropped connection (a restarted database, a terminated backend), or SQLite's busy timeout."""
        if isinstance(error, DBAPIError):
            if error.connection_invalidated:
                return True
            error = error.orig
        if self.is_sqlite:
            return isinstance(error, sqlite3.OperationalError) and "database is locked" in str(error)
        return isinstance(error, self.engine.dialect.loaded_dbapi.OperationalError) and \
            getattr(error, "sqlstate", None) not in _RACE_SQLSTATES

    @contextlib.contextmanager
    def _transaction(self, write: bool) -> Iterator[SqlUnitOfWork]:
        if self._writer is not None and write:
            with self._writer:  # SQLite's one writer keeps its connection: no pool round trip per write
                if self._writer_uow is None:
                    self._writer_uow = SqlUnitOfWork(self.engine.connect(), self.hot, write=True)
                uow = self._writer_uow
                uow.committing = False
                uow.cursor.execute("BEGIN IMMEDIATE")
                try:
                    yield uow
                finally:
                    uow.rollback()  # a no-op after commit()
        else:
            with self.engine.connect() as conn:
                if self.is_sqlite:
                    conn.exec_driver_sql("BEGIN")
                    yield SqlUnitOfWork(conn, self.hot, write)
                else:
                    # The transaction is begun by hand (the driver in autocommit: psycopg would wait for its own
                    # BEGIN), so that BEGIN goes with the unit of work's first statements.
                    conn.execution_options(isolation_level="AUTOCOMMIT")
                    yield SqlUnitOfWork(conn, self.hot, write, begin="BEGIN" if write else _BEGIN_SNAPSHOT)


def _postgres_connect(session: Mapping[str, str], dbapi_connection: Any, _record: Any) -> None:
    """SETs `session` on a new connection, outside any transaction."""
    autocommit = dbapi_connection.autocommit
    dbapi_connection.autocommit = True
    with dbapi_connection.cursor() as cursor:
        for name, value in session.items():
            cursor.execute(f"SET {name} = '{value}'")
    dbapi_connection.autocommit = autocommit


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # transactions are begun explicitly (BEGIN / BEGIN IMMEDIATE)
    cursor = dbapi_connection.cursor()
    for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=10000", "foreign_keys=ON",
                   "wal_autocheckpoint=0"):  # _Checkpointer does it, off the writer's path
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


class _Checkpointer:
    """Copies SQLite's write-ahead log into the database file from a thread of its own, every
    `CHECKPOINT_SECONDS`. Left to SQLite, the commit that fills the log does it (copying megabytes and waiting
    for the disk) while every other call waits; here it runs beside them (sqlite3 releases the GIL)."""

    CHECKPOINT_SECONDS = 1.0
    FEW_FRAMES = 200  # left for the pass under the writer lock
    MAX_PASSES = 4

    def __init__(self, engine: Engine, writer: threading.Lock):
        self.engine = engine
        self.writer = writer
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="opd-sqlite-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.wait(self.CHECKPOINT_SECONDS):
            try:
                self.checkpoint()
            except Exception:  # the log only grows until the next pass succeeds
                log.exception("SQLite checkpoint failed; it is tried again shortly")

    def checkpoint(self) -> None:
        """PASSIVE passes copy what no reader still needs, beside the writer, until a pass finds little new;
        then one more, holding the writer lock, copies the last few frames (1-5 ms, once a second). With the
        whole log copied, the next write starts the log again from its beginning, over file blocks it already
        has. Under steady writes a log never wholly copied only grows (800 MiB in 15 s of the bench), and each
        commit then pays the file system for new blocks, and each page lookup searches a longer log index."""
        with self.engine.connect() as conn:
            logged = -self.FEW_FRAMES
            for _ in range(self.MAX_PASSES):
                before, logged = logged, conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").one()[1]
                if logged - before <= self.FEW_FRAMES:
                    break
            with self.writer:
                conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()
        self.checkpoint()


class SqlUnitOfWork:
    def __init__(self, conn: Connection, hot: _HotStatements, write: bool, begin: str | None = None):
        self._conn = conn
        self.hot = hot
        self.write = write
        self.driver = conn.connection.dbapi_connection
        self.cursor = self.driver.cursor()
        self.committing = False
        # Pipelined (PostgreSQL: `begin` is the transaction's BEGIN, on a driver in autocommit), statements wait
        # here and go to the database together, in one round trip (psycopg's pipeline mode) instead of one each:
        # BEGIN with the first reads, the hot writes with the COMMIT. A statement that comes after waiting ones (a
        # read, or one of SQLAlchemy's) sends them first, so every statement still runs in the order it was written.
        self._waiting: list[tuple[str, Any, bool]] | None = None if begin is None else [(begin, None, False)]

    @property
    def conn(self) -> Connection:
        """SQLAlchemy's connection, once the waiting statements (BEGIN, hot writes) have gone ahead of what it is used
        for."""
        self._send_waiting(commit=False)
        return self._conn

    def commit(self) -> None:
        """Ends the transaction, whether the hot statements (on the driver) or SQLAlchemy began it; pipelined, the
        waiting writes go with the COMMIT. A connection lost meanwhile leaves the outcome unknown (`committing` tells
        the store so)."""
        self.committing = True
        self._send_waiting(commit=True)
        self._conn.commit()
        self.driver.commit()
        self.committing = False

    def rollback(self) -> None:
        if self._waiting:
            self._waiting.clear()
        self._conn.rollback()
        self.driver.rollback()

    def _written(self, statement: str, params: Any, many: bool = False) -> None:
        """A hot write (with `many`, one for each of the rows in `params`), now or, pipelined, with what comes
        next."""
        if self._waiting is None:
            self._run(statement, params, many)
        else:
            self._waiting.append((statement, params, many))

    def _run(self, statement: str, params: Any, many: bool) -> None:
        if many:
            self.cursor.executemany(statement, params)
        else:
            self.cursor.execute(statement, params)

    def _read(self, statement: str, params: Any) -> Any:
        """A hot read's one row, after the waiting statements (pipelined, in one round trip with them)."""
        return self._reads((statement, params))[0]

    def _reads(self, *reads: tuple[str, Any]) -> list[Any]:
        """Hot reads' first rows, after the waiting statements; pipelined, all in one round trip. Each read has a
        cursor of its own, for a cursor keeps only its last statement's rows."""
        if self._waiting is None:
            return [self.cursor.execute(statement, params).fetchone() for statement, params in reads]
        with self.driver.pipeline():
            self._run_waiting()
            cursors = [self.driver.cursor().execute(statement, params) for statement, params in reads]
        return [cursor.fetchone() for cursor in cursors]

    def _send_waiting(self, commit: bool) -> None:
        if not self._waiting:
            return
        with self.driver.pipeline():
            self._run_waiting()
            if commit:  # as a statement: the driver's commit() would wait for its own sync, one more round trip
                self.cursor.execute("COMMIT")

    def _run_waiting(self) -> None:
        assert self._waiting is not None
        for waiting in self._waiting:
            self._run(*waiting)
        self._waiting.clear()

    # ---- idempotency ----

    def stored_request(self, request_id: str) -> StoredRequest | None:
        return _stored_request(self._read(self.hot.stored_request, {"request_id": request_id}))

    def store_request(self, request_id: str, stored: StoredRequest, now: dt.datetime) -> None:
        self._written(self.hot.insert_request, {
            "request_id": request_id, "method": stored.method, "fingerprint": stored.fingerprint,
            "response": stored.response, "refusal": stored.refusal, "created_at": _iso(now)})

    # ---- doctors ----

    def doctor(self, doctor_id: str) -> Doctor | None:
        row = self.conn.execute(select(doctors).where(doctors.c.doctor_id == doctor_id)).first()
        return None if row is None else Doctor(row.doctor_id, row.name, row.specialization)

    def add_doctor(self, name: str, specialization: str) -> Doctor:
        number = (self.conn.execute(select(func.max(doctors.c.number))).scalar() or 0) + 1
        doctor = Doctor(f"DOC{number:03d}", name, specialization)
        self.conn.execute(insert(doctors).values(doctor_id=doctor.doctor_id, number=number, name=name,
                                                 specialization=specialization))
        return doctor

    def doctors(self, offset: int, limit: int) -> list[Doctor]:
        rows = self.conn.execute(select(doctors).order_by(doctors.c.number).offset(offset).limit(limit))
        return [Doctor(r.doctor_id, r.name, r.specialization) for r in rows]

    def doctors_on(self, date: dt.date) -> list[str]:
        rows = self.conn.execute(select(days.c.doctor_id).where(days.c.date == date.isoformat())
                                 .order_by(days.c.doctor_id))
        return list(rows.scalars())

    def days_with_confirmed_tokens(self, since: dt.date | None, after: DayKey | None, before: dt.date,
                                   limit: int) -> list[DayKey]:
        """Up to `limit` doctor-days from `since` and before `before`, in order of date then doctor from just after
        `after`, where a token is still CONFIRMED: AUTO_NO_SHOW's backlog (a scan of the tokens, only while it catches
        up)."""
        query = select(tokens.c.doctor_id, tokens.c.date).distinct().where(
            tokens.c.status == Status.CONFIRMED.value, tokens.c.date < before.isoformat())
        if since is not None:
            query = query.where(tokens.c.date >= since.isoformat())
        if after is not None:
            query = query.where(tuple_(tokens.c.date, tokens.c.doctor_id) > tuple_(after[1].isoformat(), after[0]))
        rows = self.conn.execute(query.order_by(tokens.c.date, tokens.c.doctor_id).limit(limit))
        return [(doctor_id, dt.date.fromisoformat(date)) for doctor_id, date in rows]

    def no_shows_swept_to(self) -> dt.date | None:
        swept_to = self.conn.execute(select(sweep.c.swept_to)).scalar_one_or_none()  # no row: never swept
        return None if swept_to is None else dt.date.fromisoformat(swept_to)

    def set_no_shows_swept_to(self, date: dt.date) -> None:
        if not self.conn.execute(update(sweep).values(swept_to=date.isoformat())).rowcount:
            self.conn.execute(insert(sweep).values(sweep_id=1, swept_to=date.isoformat()))  # its one row was deleted

    def slots(self, doctor_id: str, date: dt.date | None, after: tuple[dt.date, dt.time] | None,
              limit: int) -> list[Slot]:
        """The doctor's slots (of one date), by date and start, from just after the start `after`."""
        query = select(slots).where(slots.c.doctor_id == doctor_id)
        if date is not None:
            query = query.where(slots.c.date == date.isoformat())
        if after is not None:
            query = query.where(tuple_(slots.c.date, slots.c.start_time) > tuple_(after[0].isoformat(),
                                                                                  f"{after[1]:%H:%M}"))
        rows = self.conn.execute(query.order_by(slots.c.date, slots.c.start_time).limit(limit))
        return [_slot(r) for r in rows]

    def slots_on(self, date: dt.date, limit: int) -> tuple[list[Slot], int]:
        """Every doctor's slots of one date, the first `limit` by doctor and start time, and how many in all."""
        on_date = slots.c.date == date.isoformat()
        rows = self.conn.execute(select(slots).where(on_date).order_by(slots.c.doctor_id, slots.c.start_time)
                                 .limit(limit))
        total = self.conn.execute(select(func.count()).select_from(slots).where(on_date)).scalar_one()
        return [_slot(r) for r in rows], total

    # ---- weekly patterns of slots, and holidays ----

    def slot_template(self, doctor_id: str) -> tuple[TemplateSlot, ...]:
        rows = self.conn.execute(select(templates).where(templates.c.doctor_id == doctor_id)
                                 .order_by(templates.c.weekday, templates.c.start_time))
        return tuple(TemplateSlot(r.weekday, r.start_time, r.end_time, r.max_capacity, r.consultation_minutes)
                     for r in rows)

    def set_slot_template(self, template: SlotTemplate) -> None:
        """Replaces the doctor's pattern. The doctor's row is locked first (on PostgreSQL; FOR NO KEY UPDATE, which
        lets its new doctor-days in), so that two replacements at once do not mix their slots."""
        doctor_id = template.doctor_id
        self.conn.execute(select(doctors.c.doctor_id).where(doctors.c.doctor_id == doctor_id)
                          .with_for_update(key_share=True))
        self.conn.execute(delete(templates).where(templates.c.doctor_id == doctor_id))
        if template.slots:
            self.conn.execute(insert(templates), [
                {"doctor_id": doctor_id, "weekday": s.weekday, "start_time": s.start_time, "end_time": s.end_time,
                 "max_capacity": s.max_capacity, "consultation_minutes": s.consultation_minutes}
                for s in template.slots])

    def holiday(self, date: dt.date) -> Holiday | None:
        name = self.conn.execute(select(holidays.c.name).where(holidays.c.date == date.isoformat())).scalar()
        return None if name is None else Holiday(date, name)

    def holidays(self, start: dt.date | None, end: dt.date | None, after: dt.date | None,
                 limit: int) -> list[Holiday]:
        """The holidays from `start` to `end`, both included (None: open on that side), by date, after `after`."""
        query = select(holidays)
        if start is not None:
            query = query.where(holidays.c.date >= start.isoformat())
        if end is not None:
            query = query.where(holidays.c.date <= end.isoformat())
        if after is not None:
            query = query.where(holidays.c.date > after.isoformat())
        rows = self.conn.execute(query.order_by(holidays.c.date).limit(limit))
        return [Holiday(dt.date.fromisoformat(r.date), r.name) for r in rows]

    def add_holiday(self, holiday: Holiday) -> None:
        self.conn.execute(insert(holidays).values(date=holiday.date.isoformat(), name=holiday.name))

    def delete_holiday(self, date: dt.date) -> Holiday | None:
        """Deletes the date's holiday and answers it; None when it was not a holiday (or another call deleted it
        first)."""
        name = self.conn.execute(delete(holidays).where(holidays.c.date == date.isoformat())
                                 .returning(holidays.c.name)).scalar()
        return None if name is None else Holiday(date, name)

    # ---- doctor-days ----

    def day_version(self, key: DayKey) -> int | None:
        """The day's last event sequence; in a change, locking its row for the transaction (a no-op lock on
        SQLite, where BEGIN IMMEDIATE already holds the database)."""
        statement = self.hot.day_version if self.write else self.hot.day_version_read
        return _first(self._read(statement, _key(key)))

    def lock_day(self, key: DayKey, request_id: str | None) -> tuple[int | None, StoredRequest | None]:
        """A change's first reads: the day's version, its row locked for the transaction, then the stored answer
        to `request_id`, if one is. Pipelined, both go in one round trip (with the transaction's BEGIN)."""
        if request_id is None:
            return self.day_version(key), None
        version, stored = self._reads((self.hot.day_version, _key(key)),
                                      (self.hot.stored_request, {"request_id": request_id}))
        return _first(version), _stored_request(stored)

    def load_day(self, key: DayKey, rules: Rules) -> DoctorDay:
        params = _key(key)
        counters = self.conn.execute(_DAY_ROW, params).one()
        return DoctorDay(key[0], key[1], rules,
                         slots=[_slot(r) for r in self.conn.execute(_DAY_SLOTS, params)],
                         tokens=[_token(r) for r in self.conn.execute(_DAY_TOKENS, params)],
                         last_token_number=counters.last_token_number, last_sequence=counters.last_sequence)

    def day_changes(self, key: DayKey, after: int) -> DayChanges | None:
        """The rows that the day's events after sequence `after` name (a token's event, its token; a slot's, its
        slot), and the day's counters; None when some of those events are no longer kept (pruned)."""
        params = _key(key)
        named = self.conn.execute(_NAMED_AFTER, {**params, "after": after}).all()
        if not named or named[0].sequence != after + 1:
            return None
        token_ids = list({r.token_id for r in named if r.token_id})
        slot_ids = list({r.slot_id for r in named if not r.token_id})
        counters = self.conn.execute(_DAY_ROW, params).one()
        changed_slots = [_slot(r) for r in self.conn.execute(_SLOTS_BY_ID, {"ids": slot_ids})] if slot_ids else []
        changed_tokens = [_token(r) for r in self.conn.execute(_TOKENS_BY_ID, {"ids": token_ids})] if token_ids else []
        return DayChanges(changed_slots, changed_tokens, counters.last_token_number, counters.last_sequence)

    def events_after(self, key: DayKey, after: int, limit: int) -> list[QueueEvent]:
        rows = self.conn.execute(_EVENTS_AFTER, {**_key(key), "after": after, "limit": limit})
        return [QueueEvent(r.doctor_id, key[1], r.sequence, EventKind(r.kind), _instant(r.occurred_at), r.token_id,
                           r.token_number, r.slot_id, Status(r.status) if r.status else None, r.caused_by_token_id,
                           Source(r.source) if r.source else None, _instant(r.created_at)) for r in rows]

    def event_range(self, key: DayKey) -> tuple[int | None, int]:
        """The oldest sequence still kept (SPEC §10: older history answers OUT_OF_RANGE) and the last one."""
        params = _key(key)
        day = self.conn.execute(_DAY_ROW, params).first()
        return self.conn.execute(_FIRST_EVENT, params).scalar(), 0 if day is None else day.last_sequence

    def last_sequences(self, keys: list[DayKey]) -> dict[DayKey, int]:
        """The last sequence of each day that has a row, `_KEYS_PER_QUERY` days a query."""
        found: dict[DayKey, int] = {}
        for start in range(0, len(keys), _KEYS_PER_QUERY):
            wanted = {(doctor_id, date.isoformat()): (doctor_id, date)
                      for doctor_id, date in keys[start:start + _KEYS_PER_QUERY]}
            rows = self.conn.execute(select(days.c.doctor_id, days.c.date, days.c.last_sequence)
                                     .where(tuple_(days.c.doctor_id, days.c.date).in_(list(wanted))))
            found.update({wanted[(doctor_id, date)]: sequence for doctor_id, date, sequence in rows})
        return found

    def save_day(self, day: DoctorDay) -> None:
        """Writes what the day's rules changed: counters, slots, tokens and their events."""
        write, hot = self._written, self.hot
        date = day.date.isoformat()
        counters = {"last_token_number": day.last_token_number, "last_sequence": day.last_sequence}
        if not day.exists:
            write(hot.insert_day, {"doctor_id": day.doctor_id, "date": date, **counters})
        elif day.pending_events:
            write(hot.update_day, {"k_doctor_id": day.doctor_id, "k_date": date, **counters})
        if day.new_slots:
            write(hot.insert_slot, [_slot_row(day.slots[s]) for s in day.new_slots], many=True)
        changed_slots = day.dirty_slots.difference(day.new_slots)
        if changed_slots:
            write(hot.update_slot, [{"k_slot_id": s, "max_capacity": day.slots[s].max_capacity}
                                    for s in changed_slots], many=True)
        if day.new_tokens:
            write(hot.insert_token, [_token_row(day.tokens[t]) for t in day.new_tokens], many=True)
        changed_tokens = day.dirty_tokens.difference(day.new_tokens)
        if changed_tokens:
            write(hot.update_token, [_token_update(day.tokens[t]) for t in changed_tokens], many=True)
        if day.pending_events:
            write(hot.insert_event, [{
                "doctor_id": e.doctor_id, "date": date, "sequence": e.sequence, "kind": e.kind.value,
                "token_id": e.token_id, "token_number": e.token_number, "slot_id": e.slot_id,
                "status": e.status.value if e.status else "", "caused_by_token_id": e.caused_by_token_id,
                "occurred_at": _iso(e.occurred_at)} for e in day.pending_events], many=True)

    # ---- keys and the audit log (SPEC §13) ----

    def add_audit_entry(self, entry: AuditEntry) -> None:
        self._written(self.hot.insert_audit, {
            "occurred_at": _iso(entry.occurred_at), "outcome": entry.outcome, "key_id": entry.key_id,
            "role": entry.role, "method": entry.method, "request_id": entry.request_id, "token_id": entry.token_id,
            "from_status": entry.from_status, "to_status": entry.to_status, "reason": entry.reason})

    def audit_entries(self, token_id: str, start: dt.datetime | None, end: dt.datetime | None, offset: int,
                      limit: int) -> list[AuditEntry]:
        query = select(audit)
        if token_id:
            query = query.where(audit.c.token_id == token_id)
        if start is not None:
            query = query.where(audit.c.occurred_at >= _iso(start))
        if end is not None:
            query = query.where(audit.c.occurred_at < _iso(end))
        rows = self.conn.execute(query.order_by(audit.c.entry_id).offset(offset).limit(limit))
        return [AuditEntry(_instant(r.occurred_at), r.outcome, r.key_id, r.role, r.method, r.request_id, r.token_id,
                           r.from_status, r.to_status, r.reason, r.entry_id) for r in rows]

    def api_keys(self) -> list[ApiKey]:
        rows = self.conn.execute(select(api_keys).order_by(api_keys.c.created_at, api_keys.c.key_id))
        return [ApiKey(r.key_id, r.name, r.role, bytes(r.secret_sha256), _instant(r.created_at),
                       _instant(r.revoked_at)) for r in rows]

    def add_api_key(self, key: ApiKey) -> None:
        self.conn.execute(insert(api_keys).values(key_id=key.key_id, name=key.name, role=key.role,
                                                  secret_sha256=key.secret_sha256, created_at=_iso(key.created_at)))

    def revoke_api_key(self, key_id: str, now: dt.datetime) -> bool:
        """Answers whether a key that was not revoked yet is now."""
        return self.conn.execute(update(api_keys).where(api_keys.c.key_id == key_id, api_keys.c.revoked_at.is_(None))
                                 .values(revoked_at=_iso(now))).rowcount == 1

    def waitlist_lengths(self, date: dt.date) -> dict[str, int]:
        rows = self.conn.execute(select(tokens.c.doctor_id, func.count())
                                 .where(tokens.c.date == date.isoformat(), tokens.c.status == Status.WAITLISTED.value)
                                 .group_by(tokens.c.doctor_id))
        return dict(rows.tuples().all())

    # ---- history pruned by age (OPDService.prune_history) ----

    def event_days_before(self, date: dt.date) -> list[tuple[DayKey, int, int]]:
        """The doctor-days before `date` that still keep events, each with its first kept and its last sequence
        (one index probe a day: the events table is never scanned)."""
        first = (select(func.min(events.c.sequence))
                 .where(events.c.doctor_id == days.c.doctor_id, events.c.date == days.c.date).scalar_subquery())
        rows = self.conn.execute(select(days.c.doctor_id, days.c.date, first, days.c.last_sequence)
                                 .where(days.c.date < date.isoformat()).order_by(days.c.date, days.c.doctor_id))
        return [((doctor_id, dt.date.fromisoformat(day)), kept, last)
                for doctor_id, day, kept, last in rows if kept is not None]

    def delete_events(self, key: DayKey, through: int) -> int:
        """Deletes the day's events up to sequence `through`; answers how many."""
        return self.conn.execute(delete(events).where(*_of_day(events), events.c.sequence <= bindparam("through")),
                                 {**_key(key), "through": through}).rowcount

    def delete_requests(self, before: dt.datetime, limit: int) -> int:
        """Deletes up to `limit` of the oldest stored requests made before `before` (stored_requests_by_age);
        answers how many."""
        oldest = (select(requests.c.request_id).where(requests.c.created_at < _iso(before))
                  .order_by(requests.c.created_at).limit(limit))
        return self.conn.execute(delete(requests).where(requests.c.request_id.in_(oldest))).rowcount


# PostgreSQL's codes for a race lost to a concurrent transaction: a key both inserted (the loser sees the
# winner's row when it runs again), a serialization failure, a deadlock.
_RACE_SQLSTATES = {"23505", "40001", "40P01"}


def _first(row: Any) -> Any:
    return None if row is None else row[0]


def _stored_request(row: Any) -> StoredRequest | None:
    return None if row is None else StoredRequest(row[0], bytes(row[1]), bytes(row[2]), row[3])


def _iso(when: dt.datetime | None) -> str | None:
    return None if when is None else when.astimezone(dt.timezone.utc).isoformat(timespec="microseconds")


def _instant(text: str | None) -> dt.datetime | None:
    return None if text is None else dt.datetime.fromisoformat(text)


def _key(key: DayKey) -> dict[str, str]:
    return {"doctor_id": key[0], "date": key[1].isoformat()}


def _slot(r: Any) -> Slot:
    return Slot(r.slot_id, r.doctor_id, dt.date.fromisoformat(r.date), dt.time.fromisoformat(r.start_time),
                dt.time.fromisoformat(r.end_time), r.max_capacity, r.consultation_minutes)


def _slot_row(s: Slot) -> dict[str, Any]:
    return {"slot_id": s.slot_id, "doctor_id": s.doctor_id, "date": s.date.isoformat(),
            "start_time": f"{s.start_time:%H:%M}", "end_time": f"{s.end_time:%H:%M}",
            "max_capacity": s.max_capacity, "consultation_minutes": s.consultation_minutes}


def _token(r: Any) -> Token:
    return Token(r.token_id, r.token_number, r.doctor_id, dt.date.fromisoformat(r.date), r.slot_id,
                 Source(r.source), Status(r.status),
                 Patient(r.patient_name, r.patient_phone, r.patient_age, r.patient_gender, r.patient_mrn),
                 _instant(r.created_at), _instant(r.updated_at), _instant(r.checked_in_at), _instant(r.called_at),
                 _instant(r.completed_at), r.bump_count)


def _token_update(t: Token) -> dict[str, Any]:
    return {"k_token_id": t.token_id, "status": t.status.value, "updated_at": _iso(t.updated_at),
            "checked_in_at": _iso(t.checked_in_at), "called_at": _iso(t.called_at),
            "completed_at": _iso(t.completed_at), "bump_count": t.bump_count}


def _token_row(t: Token) -> dict[str, Any]:
    p = t.patient
    return {"token_id": t.token_id, "token_number": t.token_number, "doctor_id": t.doctor_id,
            "date": t.date.isoformat(), "slot_id": t.slot_id, "source": t.source.value, "status": t.status.value,
            "patient_identity": p.identity, "patient_name": p.name, "patient_phone": p.phone,
            "patient_age": p.age, "patient_gender": p.gender, "patient_mrn": p.mrn, "created_at": _iso(t.created_at),
            "updated_at": _iso(t.updated_at), "checked_in_at": _iso(t.checked_in_at), "called_at": _iso(t.called_at),
            "completed_at": _iso(t.completed_at), "bump_count": t.bump_count}
