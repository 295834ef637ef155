"""On PostgreSQL, a change's hot writes wait and go with its COMMIT in one round trip (psycopg's pipeline mode),
and its BEGIN and first reads (the day's lock, the request_id's stored answer) go in one too: an allocation waits
for the database a handful of times, not once per statement, which on a database across a network is most of its
time. Statements that wait still run before any statement that comes after them in the same transaction, and a
unit of work that does not commit leaves nothing, however its statements were sent."""

from __future__ import annotations

import datetime as dt
import hashlib
import struct
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest

from opd_grpc.engine.access import SYSTEM
from opd_grpc.engine.audit import AuditEntry
from opd_grpc.engine.model import Patient, Source
from opd_grpc.engine.service import AllocateCommand, Call, OPDService, Replay, Retry, StoredRequest
from opd_grpc.engine.schedule import Holiday, SlotRequest
from opd_grpc.offline import offline_service
from opd_grpc.settings import Settings
from tests.support import DAY, POSTGRES, TEST_DATABASE, Cuttable, fresh_database, through

NOW = dt.datetime(2030, 1, 7, 7, 0, tzinfo=dt.timezone.utc)
# The most an allocation into a cached doctor-day waits for PostgreSQL: the pool's liveness ping, BEGIN with the
# day's lock and the request_id's answer, the writes with COMMIT. One statement at a time, it was 10; with psycopg
# sending BEGIN on its own and waiting for it, 4.
ALLOCATION_ROUND_TRIPS = 3
# A read of a cached doctor-day: the ping, BEGIN with the day's version, ROLLBACK (it was 5: BEGIN and the
# snapshot's SET TRANSACTION waited one each).
READ_ROUND_TRIPS = 3


class RoundTrips:
    """Counts PostgreSQL's ReadyForQuery messages: one ends each round trip (a query, or a pipeline's sync)."""

    def __init__(self) -> None:
        self.count = 0

    def reader(self) -> Callable[[bytes], None]:
        pending = bytearray()

        def hear(data: bytes) -> None:
            pending.extend(data)
            while len(pending) >= 5:
                kind, length = pending[0], struct.unpack("!I", pending[1:5])[0]
                if len(pending) < 1 + length:
                    return
                self.count += kind == ord("Z")
                del pending[:1 + length]

        return hear


@pytest.fixture
def counted(tmp_path: Path) -> Iterator[tuple[OPDService, RoundTrips]]:
    if TEST_DATABASE != "postgresql":
        pytest.skip("round trips to a database over the network")
    trips = RoundTrips()
    proxy = Cuttable(POSTGRES, replies=trips.reader)
    with fresh_database(tmp_path) as url:
        # Plain text on the wire, so that the proxy can read PostgreSQL's messages.
        proxied = through(proxy, url) + "&sslmode=disable&gssencmode=disable"
        with offline_service(proxied, Settings().rules()) as offline:
            yield offline.service, trips
    proxy.cut()


def allocation(doctor_id: str, n: int) -> AllocateCommand:
    return AllocateCommand(Patient(f"Patient {n}", f"98765{n:05d}", 40, "", ""), doctor_id, DAY, "",
                           Source.WALK_IN, False)


def retry(request_id: str) -> Retry:
    return Retry(request_id, "AllocateTokenRequest", hashlib.sha256(request_id.encode()).digest(),
                 lambda result: result.token.token.token_id.encode())


def test_an_allocation_waits_for_postgresql_three_times_a_read_too_and_a_replay_answers_the_same(counted):
    service, trips = counted
    doctor = service.create_doctor("Dr Round", "General Medicine", Call(SYSTEM, "CreateDoctor"))
    service.create_slots(doctor.doctor_id, [SlotRequest(DAY, "09:00", "10:00", 10, 5)], Call(SYSTEM, "CreateSlots"))
    first_id = str(uuid.uuid4())
    service.allocate(allocation(doctor.doctor_id, 1), Call(SYSTEM, "AllocateToken", retry(first_id)))  # day cached
    request_id = str(uuid.uuid4())
    before = trips.count
    made = service.allocate(allocation(doctor.doctor_id, 2),
                            Call(SYSTEM, "AllocateToken", retry(request_id)))
    assert trips.count - before <= ALLOCATION_ROUND_TRIPS
    assert made.token.token.token_number == 2

    replayed = service.allocate(allocation(doctor.doctor_id, 2),
                                Call(SYSTEM, "AllocateToken", retry(request_id)))
    assert replayed == Replay(made.token.token.token_id.encode())
    before = trips.count
    assert [t.token.token_number for t in service.list_tokens(doctor.doctor_id, DAY, 10, "").items] == [1, 2]
    assert trips.count - before <= READ_ROUND_TRIPS


def test_writes_that_wait_for_the_commit_are_seen_by_the_reads_after_them_in_the_same_transaction(counted):
    service, _ = counted
    request_id = str(uuid.uuid4())
    entry = AuditEntry(NOW, "CHANGED", "system", "admin", "CreateDoctor", request_id, reason="pipelined")
    with service.store.unit_of_work(write=True) as uow:
        uow.add_audit_entry(entry)
        assert [e.reason for e in uow.audit_entries("", None, None, 0, 10)] == ["pipelined"]  # one of SQLAlchemy's
        uow.store_request(request_id, StoredRequest("CreateDoctorRequest", b"f", b"answer"), NOW)
        assert uow.stored_request(request_id) == StoredRequest("CreateDoctorRequest", b"f", b"answer")  # a hot read
        uow.commit()
    with service.store.unit_of_work(write=False) as uow:
        assert uow.stored_request(request_id) is not None


def test_a_unit_of_work_that_does_not_commit_leaves_nothing_and_gives_its_connection_back_as_it_found_it(counted):
    """The transaction is begun by hand on a driver in autocommit: a statement sent outside it would commit on its
    own. A hot write that waited and one of SQLAlchemy's, then a failure: neither is kept."""
    service, _ = counted
    request_id = str(uuid.uuid4())
    with pytest.raises(RuntimeError), service.store.unit_of_work(write=True) as uow:
        uow.add_audit_entry(AuditEntry(NOW, "CHANGED", "system", "admin", "AddHoliday", request_id, reason="lost"))
        uow.add_holiday(Holiday(NOW.date(), "Never kept"))  # SQLAlchemy's: the waiting BEGIN and audit entry go first
        raise RuntimeError("the change fails before its commit")
    with service.store.unit_of_work(write=False) as uow:
        assert uow.holiday(NOW.date()) is None
        assert uow.audit_entries("", None, None, 0, 10) == []
    with service.store.engine.connect() as conn:
        assert conn.connection.dbapi_connection.autocommit is False  # what migrations and other users expect
