"""Issue 5's fuzz acceptance test: at least 10,000 malformed or hostile calls (tests/fuzz_requests.py) across
every method of OPDTokenService and TestClockService, and a few that no service has, on a real server process.

Every answer must be a code of SPEC §12 (never INTERNAL or UNKNOWN, nor a deadline missed), and every refusal the
server makes must carry ErrorInfo (domain opd.v1, a reason) and a message; the server must still run and answer
a health check. Then the changes that answered OK (and the test clock's moves) are replayed, in order, on a
second server seeded alike: their tables must match the fuzzed server's row for row, so a refused call changed
nothing. The two things a refusal does write by design stay out of the comparison: a request_id's stored
refusal (SPEC §9) and an audit entry of a denied call (SPEC §13)."""

from __future__ import annotations

import collections
import contextlib
import multiprocessing
import multiprocessing.process
import multiprocessing.queues
import queue
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest
import sqlalchemy
from grpc_health.v1 import health_pb2, health_pb2_grpc

from opd_grpc._gen.opd.v1 import opd_pb2 as pb
from opd_grpc._gen.opd.v1 import opd_pb2_grpc, test_clock_pb2, test_clock_pb2_grpc
from opd_grpc.api.convert import timestamp
from opd_grpc.process import ServerProcess
from opd_grpc.storage.tables import Base
from tests.fuzz_requests import (
    DAY, DOCTORS, METHODS, MORNING, NEXT_DAY, OVER_LIMITS, SHARP_EDGES, Request, put_rounds,
)
from tests.support import allocate, failure, fresh_database, make_doctor, make_slots

MIN_CALLS = 10_000
ROUNDS, PER_METHOD = 20, 18  # 18 requests a method in each of 20 rounds: 10,680 calls with 29 methods
DRAW_TIMEOUT_SECONDS = 60.0
DEADLINE_SECONDS = 5.0
# Heartbeats every 20 ms: a WatchQueue that resumes at the last event answers at once, so the test reads
# every stream's first message (or its refusal) and cancels it.
SERVER_SETTINGS = {"METRICS_LISTEN": "", "WATCH_HEARTBEAT_SECONDS": 0.02}
SPEC_CODES = {grpc.StatusCode[name] for name in (
    "OK", "INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED",
    "OUT_OF_RANGE", "UNAUTHENTICATED", "PERMISSION_DENIED", "ABORTED", "UNIMPLEMENTED")}


@dataclass
class Outcomes:
    codes: collections.Counter[str] = field(default_factory=collections.Counter)
    # Answers outside SPEC §12 or refusals without ErrorInfo: (method, code, what was wrong) -> the requests.
    faults: dict[tuple[str, str, str], list[Request]] = field(default_factory=dict)
    changes: list[Request] = field(default_factory=list)  # the state-changing calls that answered OK, in order
    seen: set[int] = field(default_factory=set)  # hashes of the requests sent

    @property
    def distinct(self) -> int:
        return len(self.seen)

    @property
    def calls(self) -> int:
        return sum(self.codes.values())

    def fault(self, request: Request, code: grpc.StatusCode, problem: str) -> None:
        self.faults.setdefault((request.method.name, code.name, problem[:200]), []).append(request)

    def fault_report(self) -> str:
        return "\n".join(f"{len(requests)} x {method} {code} {problem}\n    e.g. {requests[0]!r}"
                         for (method, code, problem), requests in self.faults.items())


class RawCaller:
    """Calls any method with raw bytes (so that anything can be sent), each with a deadline."""

    def __init__(self, channel: grpc.Channel):
        self.channel = channel
        self._unary: dict[str, Any] = {}
        self._stream: dict[str, Any] = {}

    def __call__(self, request: Request) -> tuple[grpc.StatusCode, grpc.RpcError | None]:
        path, metadata = request.method.path, list(request.metadata)
        try:
            if request.method.streaming:
                return self._first_message(path, request.body, metadata)
            call = self._unary.get(path) or self._unary.setdefault(path, self.channel.unary_unary(path))
            call(request.body, timeout=DEADLINE_SECONDS, metadata=metadata)
        except grpc.RpcError as error:
            return error.code(), error
        return grpc.StatusCode.OK, None

    def _first_message(self, path: str, body: bytes, metadata: list) -> tuple[grpc.StatusCode, grpc.RpcError | None]:
        """A stream is OK once its first message arrives; it is cancelled then."""
        call = self._stream.get(path) or self._stream.setdefault(path, self.channel.unary_stream(path))
        stream = call(body, timeout=DEADLINE_SECONDS, metadata=metadata)
        try:
            next(stream)
        except StopIteration:
            return stream.code(), None
        finally:
            stream.cancel()
        return grpc.StatusCode.OK, None


def seed(channel: grpc.Channel) -> None:
    """The clinic that tests.fuzz_requests aims at: DOC001 with a full slot and a waitlist on DAY, another slot
    that day and one on NEXT_DAY; DOC002 with one slot on DAY; tokens confirmed, waitlisted, checked in, called
    and cancelled."""
    test_clock_pb2_grpc.TestClockServiceStub(channel).SetTime(test_clock_pb2.SetTimeRequest(time=timestamp(MORNING)))
    stub = opd_pb2_grpc.OPDTokenServiceStub(channel)
    assert (make_doctor(stub), make_doctor(stub, "Dr Vikram Shah", "Cardiology")) == DOCTORS
    first, second = DOCTORS
    make_slots(stub, first, ("09:00", "10:00", 3), ("10:00", "11:00", 2))
    make_slots(stub, first, ("09:00", "10:00", 3), date=NEXT_DAY)
    make_slots(stub, second, ("09:00", "12:00", 4))
    for n in range(7):
        allocate(stub, first, n, slot_time="09:00" if n < 5 else "")
    for n in range(7, 10):
        allocate(stub, second, n)
    for token_number in (1, 2):
        stub.CheckInToken(pb.CheckInTokenRequest(token_id=f"{first}-20300107-T{token_number}"))
    stub.CallNext(pb.CallNextRequest(doctor_id=first, date=DAY))
    stub.CancelToken(pb.CancelTokenRequest(token_id=f"{second}-20300107-T1"))


def fuzz(caller: RawCaller) -> Outcomes:
    """The sharp edges, then the rounds of requests that hypothesis draws (tests.fuzz_requests, in a process of its
    own, so that drawing and sending overlap), in order; then the few past the server's limits."""
    outcomes = Outcomes()
    for request in SHARP_EDGES:
        _record(outcomes, request, *caller(request))
    spawn = multiprocessing.get_context("spawn")  # no fork of a process with gRPC threads
    drawn: multiprocessing.queues.Queue[list[Request] | None] = spawn.Queue(maxsize=4)
    drawer = spawn.Process(target=put_rounds, args=(drawn, ROUNDS, PER_METHOD), daemon=True)
    drawer.start()
    try:
        while (batch := _next_round(drawn, drawer)) is not None:
            for request in batch:
                _record(outcomes, request, *caller(request))
    finally:
        drawer.join(timeout=DRAW_TIMEOUT_SECONDS)
        drawer.kill()
    for request in OVER_LIMITS:
        code, _ = caller(request)
        outcomes.codes[code.name] += 1
        if code != grpc.StatusCode.RESOURCE_EXHAUSTED:
            outcomes.fault(request, code, "past the server's limits, but not refused RESOURCE_EXHAUSTED")
    return outcomes


def _next_round(drawn: multiprocessing.queues.Queue[list[Request] | None],
                drawer: multiprocessing.process.BaseProcess) -> list[Request] | None:
    try:
        return drawn.get(timeout=DRAW_TIMEOUT_SECONDS)
    except queue.Empty:
        raise AssertionError(f"the process drawing the requests stopped (exit code {drawer.exitcode}); its "
                             "traceback is in the captured stderr") from None


def _record(outcomes: Outcomes, request: Request, code: grpc.StatusCode, error: grpc.RpcError | None) -> None:
    outcomes.codes[code.name] += 1
    outcomes.seen.add(hash(request))
    details = (error.details() or "") if error is not None else ""
    if code not in SPEC_CODES:
        outcomes.fault(request, code, details)
    elif error is not None and code != grpc.StatusCode.UNIMPLEMENTED:  # gRPC's own answer to an unknown method
        try:
            refusal = failure(error)
        except ValueError as mismatch:  # the status details say another code: gRPC replaced the server's answer
            outcomes.fault(request, code, f"{details} ({mismatch})")
            return
        if refusal.domain != "opd.v1" or not refusal.reason or not refusal.message:
            outcomes.fault(request, code, f"{details} (no ErrorInfo)")
    elif code == grpc.StatusCode.OK and request.method.changes_state:
        outcomes.changes.append(request)


def replay(caller: RawCaller, changes: list[Request]) -> list[str]:
    """Sends the recorded changes again, in order; answers those that did not answer OK this time."""
    return [f"{code.name} for {request!r}" for request in changes
            if (code := caller(request)[0]) != grpc.StatusCode.OK]


def table_rows(database: str) -> dict[str, list[tuple]]:
    """Every table's rows in key order, but a request_id's stored refusal and the audit entries of denied calls,
    which a refused call writes by design."""
    engine = sqlalchemy.create_engine(database, poolclass=sqlalchemy.NullPool)
    rows = {}
    try:
        with engine.connect() as conn:
            for table in Base.metadata.sorted_tables:
                columns = [c for c in table.columns if not (table.name == "audit_log" and c.name == "entry_id")]
                query = sqlalchemy.select(*columns).order_by(*table.primary_key.columns)
                if table.name == "stored_requests":
                    query = query.where(table.c.refusal.is_(None))
                elif table.name == "audit_log":
                    query = query.where(table.c.outcome != "DENIED")
                rows[table.name] = [tuple(row) for row in conn.execute(query)]
    finally:
        engine.dispose()
    return rows


@contextlib.contextmanager
def seeded_server(database: str) -> Iterator[tuple[ServerProcess, grpc.Channel]]:
    server = ServerProcess(database, settings=SERVER_SETTINGS)
    server.start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            seed(channel)
            yield server, channel
    finally:
        server.stop()


@pytest.mark.slow
def test_hostile_requests_get_spec_codes_and_change_only_what_valid_ones_change(tmp_path: Path):
    (tmp_path / "fuzzed").mkdir()
    (tmp_path / "replayed").mkdir()
    with fresh_database(tmp_path / "fuzzed") as fuzzed, fresh_database(tmp_path / "replayed") as replayed:
        started = time.monotonic()
        with seeded_server(fuzzed) as (server, channel):
            outcomes = fuzz(RawCaller(channel))
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                              timeout=DEADLINE_SECONDS)
            assert server.proc is not None and server.proc.poll() is None, "".join(server.output)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        print(f"\nfuzz: {outcomes.calls} calls ({outcomes.distinct} different) in {time.monotonic() - started:.1f} s, "
              f"{len(outcomes.changes)} changes answered OK; by code: "
              + ", ".join(f"{code} {n}" for code, n in outcomes.codes.most_common()))

        with seeded_server(replayed) as (_, channel):
            not_replayed = replay(RawCaller(channel), outcomes.changes)
        fuzzed_rows, replayed_rows = table_rows(fuzzed), table_rows(replayed)
        differ = [table for table, rows in replayed_rows.items() if fuzzed_rows[table] != rows]
        print(f"replay: {len(outcomes.changes) - len(not_replayed)} of {len(outcomes.changes)} changes answered OK "
              f"again; tables that differ: {differ or 'none'}")

        assert outcomes.calls >= MIN_CALLS
        assert not outcomes.faults, "answers that break SPEC §12:\n" + outcomes.fault_report()
        # Each kind of change got past the checks now and then: the fuzz reached the rules, not only the parsing.
        assert {r.method.name for r in outcomes.changes} == {m.name for m in METHODS if m.changes_state}
        assert not_replayed == []
        for table in differ:
            assert fuzzed_rows[table] == replayed_rows[table], f"{table} differs: a refused call changed it"
