"""What the tests share: a live server on a free loopback port, stubs, and readers of rich errors."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import random
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import grpc
import sqlalchemy
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from opd_grpc._gen.opd.v1 import opd_pb2 as pb
from opd_grpc._gen.opd.v1 import opd_pb2_grpc, test_clock_pb2, test_clock_pb2_grpc
from opd_grpc.api.convert import timestamp
from opd_grpc.server import OPDServer
from opd_grpc.engine.access import Actor
from opd_grpc.offline import offline_service
from opd_grpc.settings import Settings
from simulation.ledger import one_patient_twice

KEY_MAKER = Actor("tests", "operator")  # the audit log's "who" for keys the tests make
DAY = "2030-01-07"  # a Monday, far from the wall clock
MORNING = dt.datetime(2030, 1, 7, 7, 0, tzinfo=dt.timezone.utc)


# `make test` runs the suite twice: on SQLite files, then with TEST_DATABASE=postgresql on the PostgreSQL at
# TEST_POSTGRES_URL, each test in a schema of its own.
TEST_DATABASE = os.environ.get("TEST_DATABASE", "sqlite")
POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
_POSTGRES_AT = sqlalchemy.engine.make_url(POSTGRES_URL)
POSTGRES = (_POSTGRES_AT.host or "127.0.0.1", _POSTGRES_AT.port or 5432)  # where a proxy in front of it forwards


def through(proxy: Cuttable, database_url: str) -> str:
    """`database_url` (a schema of the PostgreSQL at POSTGRES) reached through `proxy` (a Cuttable to POSTGRES)."""
    return database_url.replace(f"{POSTGRES[0]}:{POSTGRES[1]}", proxy.address)


@contextlib.contextmanager
def fresh_database(folder: Path) -> Iterator[str]:
    """The URL of an empty database for one test: an SQLite file in `folder`, or a PostgreSQL schema of its own
    that is dropped afterwards."""
    if TEST_DATABASE != "postgresql":
        yield f"sqlite:///{folder / 'opd.db'}"
        return
    schema = f"test_{uuid.uuid4().hex[:16]}"
    admin = sqlalchemy.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.NullPool)
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    try:
        yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()


def stored_events(database_url: str, doctor_id: str, date: str = DAY) -> list[tuple[int, str, str, str]]:
    """The event table itself, read beside the server: (sequence, EVENT_KIND_…, token_id, STATUS_…) rows."""
    engine = sqlalchemy.create_engine(database_url, poolclass=sqlalchemy.NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sqlalchemy.text(
                "SELECT sequence, kind, token_id, status FROM queue_events WHERE doctor_id = :doctor AND date = :date "
                "ORDER BY sequence"), {"doctor": doctor_id, "date": date}).all()
    finally:
        engine.dispose()
    return [(seq, f"EVENT_KIND_{kind}", token_id, f"STATUS_{status}" if status else "STATUS_UNSPECIFIED")
            for seq, kind, token_id, status in rows]


class LiveServer:
    """An OPDServer on its own event loop in a background thread, listening on 127.0.0.1:<free port>."""

    def __init__(self, database_url: str, admin_key: str = "", **settings: Any):
        """With `admin_key` (a database that holds keys), the test clock is set with it."""
        self.admin_key = admin_key
        env = {"OPD_DATABASE_URL": database_url, "OPD_LISTEN": "127.0.0.1:0", "OPD_TEST_CLOCK": "1",
               "OPD_METRICS_LISTEN": ""}
        env.update({f"OPD_{k}": str(v) for k, v in settings.items()})
        self.settings = Settings.load(env=env)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.server: OPDServer = self._run(self._build())
        self.address = f"127.0.0.1:{self.server.port}"
        self.channel = grpc.insecure_channel(self.address)
        self.stub = opd_pb2_grpc.OPDTokenServiceStub(self.channel)
        self.clock = test_clock_pb2_grpc.TestClockServiceStub(self.channel)
        self.set_time(MORNING)

    async def _build(self) -> OPDServer:
        server = OPDServer(self.settings)
        await server.start()
        return server

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    def set_time(self, when: dt.datetime) -> None:
        self.clock.SetTime(test_clock_pb2.SetTimeRequest(time=timestamp(when)), metadata=bearer(self.admin_key))

    def close(self) -> None:
        self.channel.close()
        self._run(self.server.stop(grace=1))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


class Cuttable:
    """A TCP proxy to `upstream` on a port of its own, for tests of a network that fails.

    `cut()` closes every connection through it and refuses new ones (a host that went away); `stall()` closes them
    and takes new ones but never answers (a network that drops packets, as a client that connects anew sees it);
    `black_hole()` keeps every connection open, old and new, and moves no byte on any (a path that died in silence
    under open connections: a host frozen or unplugged, a NAT that forgot the flow). `restore()` forwards again,
    on the same port; after a black hole it delivers what was held back, as TCP does once the path is back.
    With `replies`, each connection gets `replies()`, which is handed every chunk the upstream sends on it."""

    def __init__(self, upstream: tuple[str, int], replies: Callable[[], Callable[[bytes], None]] | None = None):
        self.upstream = upstream
        self._replies = replies
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stalled = False
        self._flowing = threading.Event()
        self._flowing.set()
        self._accept_in_thread()

    def _accept_in_thread(self) -> None:
        threading.Thread(target=self._accept, args=(self._listener,), name="proxy-accept", daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # cut
                return
            with self._lock:
                self._open.append(client)
                if self._stalled:
                    continue
            upstream = socket.create_connection(self.upstream)
            with self._lock:
                self._open.append(upstream)
            for end in (client, upstream):  # as libpq, PostgreSQL and gRPC set it: no 40 ms delayed-ACK stalls
                end.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            heard = self._replies() if self._replies else None
            for source, sink, hear in ((client, upstream, None), (upstream, client, heard)):
                threading.Thread(target=self._pump, args=(source, sink, hear), name="proxy-pump", daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, hear: Callable[[bytes], None] | None) -> None:
        try:
            while data := source.recv(65536):
                self._flowing.wait()  # black-holed: held, not lost
                if hear is not None:
                    hear(data)
                sink.sendall(data)
        except OSError:
            pass
        self._flowing.wait()  # a close is held back too: a silent path carries no FIN
        _close(sink)

    def cut(self) -> None:
        self._listener.close()
        self._close_all()
        self._flowing.set()  # what was held finds its connection closed

    def stall(self) -> None:
        with self._lock:
            self._stalled = True
        self._close_all()

    def black_hole(self) -> None:
        self._flowing.clear()

    def restore(self) -> None:
        if self._listener.fileno() == -1:
            self._listener = socket.create_server(("127.0.0.1", self.port))
            self._accept_in_thread()
        with self._lock:
            self._stalled = False
        self._flowing.set()

    def _close_all(self) -> None:
        with self._lock:
            for conn in self._open:
                _close(conn)
            self._open.clear()


def _close(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    conn.close()


def eventually(what: Callable[[], Any], wanted: Any, timeout: float = 10.0) -> None:
    """Waits until `what()` answers `wanted`; fails with what it answered last once `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while (seen := what()) != wanted:
        assert time.monotonic() < deadline, f"still {seen!r}, not {wanted!r}"
        time.sleep(0.05)


def add_key(database_url: str, role: str, name: str = "test key") -> str:
    """A new API key with `role` in the database (as `opd-grpc keys add` makes one); answers its text."""
    with offline_service(database_url, Settings().rules()) as offline:
        return offline.service.add_key(name, role, KEY_MAKER)[1]


def revoke_key(database_url: str, key: str) -> None:
    with offline_service(database_url, Settings().rules()) as offline:
        offline.service.revoke_key(key.split("_")[1], KEY_MAKER)


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    """The call metadata that presents `key` (none for "")."""
    return (("authorization", f"Bearer {key}"),) if key else ()


@dataclass
class RpcFailure:
    code: grpc.StatusCode
    message: str
    reason: str
    domain: str
    fields: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)  # ErrorInfo's


def failure(error: grpc.RpcError) -> RpcFailure:
    """The rich status of a failed call: code, message, ErrorInfo reason/domain, BadRequest fields."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    result = RpcFailure(error.code(), error.details() or "", "", "")
    if status is None:
        return result
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            result.reason, result.domain, result.metadata = info.reason, info.domain, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            result.fields = {v.field: v.description for v in bad.field_violations}
    return result


def refused(call: Any, request: Any) -> RpcFailure:
    """Makes a call that must fail and answers its rich status."""
    try:
        call(request)
    except grpc.RpcError as error:
        return failure(error)
    raise AssertionError(f"{request!r} was expected to be refused")


def new_request_id() -> str:
    return str(uuid.uuid4())


def patient(n: int, **overrides: Any) -> pb.Patient:
    values = {"name": f"Patient {n}", "phone": f"+91-98450-{n:05d}", "age": 30 + n % 50,
              "gender": pb.GENDER_FEMALE if n % 2 else pb.GENDER_MALE}
    values.update(overrides)
    return pb.Patient(**values)


def make_doctor(stub: opd_pb2_grpc.OPDTokenServiceStub, name: str = "Dr Asha Rao",
                specialization: str = "General Medicine") -> str:
    return stub.CreateDoctor(pb.CreateDoctorRequest(name=name, specialization=specialization)).doctor.doctor_id


def make_slots(stub: opd_pb2_grpc.OPDTokenServiceStub, doctor_id: str, *times: tuple[str, str, int],
               date: str = DAY, consultation_minutes: int = 5) -> list[pb.Slot]:
    """Slots from (start, end, capacity) triples."""
    specs = [pb.SlotSpec(date=date, start_time=s, end_time=e, max_capacity=c,
                         consultation_minutes=consultation_minutes) for s, e, c in times]
    return list(stub.CreateSlots(pb.CreateSlotsRequest(doctor_id=doctor_id, slots=specs)).slots)


def allocate(stub: opd_pb2_grpc.OPDTokenServiceStub, doctor_id: str, n: int, source: int = pb.SOURCE_WALK_IN,
             slot_time: str = "", date: str = DAY, **kw: Any) -> pb.AllocateTokenResponse:
    return stub.AllocateToken(pb.AllocateTokenRequest(patient=patient(n), doctor_id=doctor_id, date=date,
                                                      preferred_slot_time=slot_time, source=source, **kw))


def all_tokens(stub: opd_pb2_grpc.OPDTokenServiceStub, doctor_id: str, date: str = DAY) -> list[pb.Token]:
    tokens, page_token = [], ""
    while True:
        page = stub.ListTokens(pb.ListTokensRequest(doctor_id=doctor_id, date=date, page_size=500,
                                                    page_token=page_token))
        tokens += page.tokens
        if not (page_token := page.next_page_token):
            return tokens


SEAT_HOLDING = {pb.STATUS_CONFIRMED, pb.STATUS_CHECKED_IN, pb.STATUS_CALLED, pb.STATUS_COMPLETED}
ACTIVE = {pb.STATUS_CONFIRMED, pb.STATUS_WAITLISTED, pb.STATUS_CHECKED_IN, pb.STATUS_CALLED}


def spec_violations(stub: opd_pb2_grpc.OPDTokenServiceStub, doctor_id: str, date: str = DAY) -> list[str]:
    """Checks SPEC §3.1–3.5 through the API for one doctor-day; answers what is broken."""
    problems = []
    tokens = all_tokens(stub, doctor_id, date)
    slots = stub.ListSlots(pb.ListSlotsRequest(doctor_id=doctor_id, date=date)).slots
    numbers = [t.token_number for t in tokens]
    if numbers != list(range(1, len(tokens) + 1)):
        problems.append(f"token numbers are not 1..{len(tokens)}: {numbers}")
    for slot in slots:
        status = stub.GetSlotStatus(pb.GetSlotStatusRequest(slot_id=slot.slot_id))
        mine = [t for t in tokens if t.slot_id == slot.slot_id]
        holders = sum(1 for t in mine if t.status in SEAT_HOLDING)
        if holders > slot.max_capacity:
            problems.append(f"{slot.slot_id}: {holders} seat holders > capacity {slot.max_capacity}")
        if status.seat_holders != holders:
            problems.append(f"{slot.slot_id}: GetSlotStatus says {status.seat_holders} holders, tokens say {holders}")
        waiting = [t for t in mine if t.status == pb.STATUS_WAITLISTED]
        if holders < slot.max_capacity and waiting:
            problems.append(f"{slot.slot_id}: a free seat and {len(waiting)} waiting")
        expected = sorted(waiting, key=lambda t: (t.priority, t.created_at.ToDatetime(), t.token_number))
        if [t.token_id for t in status.waitlist] != [t.token_id for t in expected]:
            problems.append(f"{slot.slot_id}: waitlist out of order")
        if [t.waitlist_position for t in status.waitlist] != list(range(1, len(waiting) + 1)):
            problems.append(f"{slot.slot_id}: waitlist positions are not 1..n")
    problems += [f"one patient holds {' and '.join(ids)}"
                 for ids in one_patient_twice([t for t in tokens if t.status in ACTIVE])]
    return problems


def live_server(tmp_path: Path, **settings: Any) -> Iterator[LiveServer]:
    with fresh_database(tmp_path) as url:
        server = LiveServer(url, **settings)
        try:
            yield server
        finally:
            server.close()


def at(hhmm: str, date: str = DAY) -> dt.datetime:
    """An instant on `date` at `hhmm` UTC (the default TIMEZONE), for `live.set_time`."""
    return dt.datetime.fromisoformat(f"{date}T{hhmm}").replace(tzinfo=dt.timezone.utc)


def statuses(stub: opd_pb2_grpc.OPDTokenServiceStub, doctor_id: str, date: str = DAY) -> dict[int, str]:
    """Each token's status by token number, e.g. {1: "CONFIRMED", 2: "WAITLISTED"}."""
    return {t.token_number: pb.Status.Name(t.status).removeprefix("STATUS_")
            for t in all_tokens(stub, doctor_id, date)}


def waitlist_numbers(stub: opd_pb2_grpc.OPDTokenServiceStub, slot_id: str) -> list[int]:
    """The token numbers on a slot's waitlist, next to be promoted first."""
    return [t.token_number for t in stub.GetSlotStatus(pb.GetSlotStatusRequest(slot_id=slot_id)).waitlist]


def random_move(stub: opd_pb2_grpc.OPDTokenServiceStub, doctor_id: str, n: int, rng: random.Random,
                before_no_show: Callable[[], None] = lambda: None) -> None:
    """One random change to a doctor's day, as a busy clinic makes them: an allocation of any source (now and
    then an emergency), a check-in, a call, a cancellation, a completion, a no-show or a capacity change.
    Refusals are part of the mix; a server fault is not."""
    tokens = stub.ListTokens(pb.ListTokensRequest(doctor_id=doctor_id, date=DAY, page_size=500)).tokens
    move = rng.random()
    try:
        if move < 0.45 or not tokens:
            if rng.random() < 0.1:
                stub.AllocateEmergency(pb.AllocateEmergencyRequest(patient=patient(n), doctor_id=doctor_id, date=DAY))
            else:
                allocate(stub, doctor_id, n, source=rng.choice([pb.SOURCE_PAID_PRIORITY, pb.SOURCE_FOLLOW_UP,
                                                                 pb.SOURCE_ONLINE_BOOKING, pb.SOURCE_WALK_IN]),
                         slot_time=rng.choice(["09:00", "10:00", ""]))
        elif move < 0.6:
            stub.CheckInToken(pb.CheckInTokenRequest(token_id=rng.choice(tokens).token_id))
        elif move < 0.7:
            stub.CallNext(pb.CallNextRequest(doctor_id=doctor_id, date=DAY))
        elif move < 0.8:
            stub.CancelToken(pb.CancelTokenRequest(token_id=rng.choice(tokens).token_id))
        elif move < 0.88:
            stub.CompleteToken(pb.CompleteTokenRequest(token_id=rng.choice(tokens).token_id))
        elif move < 0.94:
            before_no_show()
            stub.MarkNoShow(pb.MarkNoShowRequest(token_id=rng.choice(tokens).token_id))
        else:
            slot = rng.choice(stub.ListSlots(pb.ListSlotsRequest(doctor_id=doctor_id, date=DAY)).slots)
            stub.UpdateSlotCapacity(pb.UpdateSlotCapacityRequest(slot_id=slot.slot_id,
                                                                 max_capacity=rng.randint(1, 5)))
    except grpc.RpcError as error:
        assert error.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), error
