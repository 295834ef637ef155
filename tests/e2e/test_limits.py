"""The limits of a real server (README "Limits, deadlines and shutdown"): a key past RATE_LIMIT_PER_KEY, a
WatchQueue stream past MAX_WATCHERS, a request larger than MAX_MESSAGE_BYTES and a burst past
MAX_CONCURRENT_CALLS are refused with RESOURCE_EXHAUSTED and change nothing, while the server goes on serving;
a caller whose deadline has passed gets no work done."""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import grpc
import pytest
import sqlalchemy
from prometheus_client.parser import text_string_to_metric_families

from opd_grpc._gen.opd.v1 import opd_pb2 as pb
from tests.support import (
    DAY, TEST_DATABASE, LiveServer, add_key, all_tokens, bearer, failure, fresh_database, live_server, make_doctor,
    make_slots,
    patient,
)

RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
T = TypeVar("T")


serving = contextlib.contextmanager(live_server)  # a LiveServer with these settings, on a fresh database


def allocation(doctor_id: str, n: int, request_id: str = "") -> pb.AllocateTokenRequest:
    return pb.AllocateTokenRequest(patient=patient(n), doctor_id=doctor_id, date=DAY, source=pb.SOURCE_WALK_IN,
                                   request_id=request_id)


def outcome(call: Any, request: Any, **kw: Any) -> str:
    """"OK", or the refusal's code and ErrorInfo reason, e.g. "RESOURCE_EXHAUSTED RATE_LIMITED"."""
    try:
        call(request, **kw)
        return "OK"
    except grpc.RpcError as error:
        refusal = failure(error)
        return f"{refusal.code.name} {refusal.reason}".strip()


def hold_event_loop(live: LiveServer, seconds: float) -> None:
    """Keeps the server's event loop busy for about `seconds` after this returns (as one long engine call on
    SQLite would): calls that arrive meanwhile wait in gRPC's queues."""
    busy = threading.Event()

    def block() -> None:
        busy.set()
        time.sleep(seconds)

    live._loop.call_soon_threadsafe(block)
    assert busy.wait(5)


def at_once(calls: list[Callable[[], T]]) -> list[T]:
    """Runs each call on a thread of its own, all started together; answers their results in order."""
    results: list[Any] = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def run(i: int) -> None:
        start.wait()
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


def calls_counted(metrics_port: int, method: str) -> dict[str, float]:
    """opd_calls_total by code for `method`, as the server's metrics endpoint shows them, once they have stopped
    changing (a call the client gave up on may still be finishing on the server)."""
    last: dict[str, float] | None = None
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
        counts = {s.labels["code"]: s.value for family in text_string_to_metric_families(text)
                  for s in family.samples if s.name == "opd_calls_total" and s.labels.get("method") == method}
        if counts == last:
            return counts
        last = counts
        time.sleep(0.3)


# ---- RATE_LIMIT_PER_KEY ---------------------------------------------------------------------------------------


def all_tokens_as(live: LiveServer, doctor_id: str, key: str) -> list[pb.Token]:
    return list(live.stub.ListTokens(pb.ListTokensRequest(doctor_id=doctor_id, date=DAY, page_size=500),
                                     metadata=bearer(key)).tokens)


def test_a_key_past_its_rate_limit_is_refused_while_another_key_is_served_and_is_served_again_a_second_later(
        tmp_path: Path):
    with fresh_database(tmp_path) as url:
        admin, desk_a, desk_b = (add_key(url, role, name) for role, name in
                                 (("admin", "admin"), ("reception", "desk A"), ("reception", "desk B")))
        # The admin key's own calls (SetTime, CreateDoctor, CreateSlots, ListTokens) stay within its 5.
        live = LiveServer(url, admin_key=admin, RATE_LIMIT_PER_KEY=5)
        try:
            doctor = live.stub.CreateDoctor(pb.CreateDoctorRequest(name="Dr Asha Rao", specialization="ENT"),
                                            metadata=bearer(admin)).doctor.doctor_id
            live.stub.CreateSlots(pb.CreateSlotsRequest(doctor_id=doctor, slots=[pb.SlotSpec(
                date=DAY, start_time="09:00", end_time="12:00", max_capacity=100)]), metadata=bearer(admin))

            def burst(key: str, first: int, calls: int) -> list[str]:
                return [outcome(live.stub.AllocateToken, allocation(doctor, first + i), metadata=bearer(key))
                        for i in range(calls)]

            started = time.monotonic()
            a, b = at_once([functools.partial(burst, desk_a, 0, 20), functools.partial(burst, desk_b, 100, 5)])
            took = time.monotonic() - started
            assert b == ["OK"] * 5, "desk B's calls were refused for desk A's burst"
            served = a.count("OK")
            assert a[:5] == ["OK"] * 5
            # At 5 a second the burst earns one more call every 0.2 s it lasts.
            assert served <= 5 + int(took * 5) + 1, (served, took)
            assert set(a[5:]) <= {"OK", "RESOURCE_EXHAUSTED RATE_LIMITED"}, a

            time.sleep(1.0)  # a full second's calls again
            assert burst(desk_a, 200, 5) == ["OK"] * 5

            tokens = all_tokens_as(live, doctor, admin)
            assert len(tokens) == served + 5 + 5, "a call refused for its rate made a token"
        finally:
            live.close()


# ---- MAX_WATCHERS ---------------------------------------------------------------------------------------------


def open_watch(live: LiveServer, doctor_id: str) -> Any:
    """A WatchQueue stream whose first answer (the snapshot) has arrived, so the server counts it as open."""
    stream = live.stub.WatchQueue(pb.WatchQueueRequest(doctor_ids=[doctor_id], date=DAY))
    assert next(stream).HasField("snapshot")
    return stream


def next_event(stream: Any) -> pb.QueueEvent:
    """The stream's next queue event, past any heartbeat."""
    for update in stream:
        if update.HasField("event"):
            return update.event
    raise AssertionError("the stream ended")


def test_one_watch_past_max_watchers_is_refused_calls_go_on_and_a_closed_watch_makes_room(tmp_path: Path):
    with serving(tmp_path, MAX_WATCHERS=3) as live:
        doctor = make_doctor(live.stub)
        make_slots(live.stub, doctor, ("09:00", "10:00", 5))
        watches = [open_watch(live, doctor) for _ in range(3)]
        try:
            fourth = live.stub.WatchQueue(pb.WatchQueueRequest(doctor_ids=[doctor], date=DAY))
            with pytest.raises(grpc.RpcError) as refused:
                next(fourth)
            refusal = failure(refused.value)
            assert (refusal.code, refusal.reason) == (RESOURCE_EXHAUSTED, "TOO_MANY_WATCHERS")
            assert "MAX_WATCHERS" in refusal.message

            # Unary calls are served beside the open watches, and those watches see the change.
            token = live.stub.AllocateToken(allocation(doctor, 1)).token
            for watch in watches:
                assert next_event(watch).token.token_id == token.token_id

            watches.pop(0).cancel()  # the server notices the caller has gone a moment later
            deadline = time.monotonic() + 5
            while True:
                try:
                    watches.append(open_watch(live, doctor))
                    break
                except grpc.RpcError as error:
                    assert failure(error).reason == "TOO_MANY_WATCHERS"
                    assert time.monotonic() < deadline, "a closed watch did not make room for a new one"
                    time.sleep(0.05)
        finally:
            for watch in watches:
                watch.cancel()


# ---- MAX_MESSAGE_BYTES ----------------------------------------------------------------------------------------


def slot_specs(days: int) -> list[pb.SlotSpec]:
    return [pb.SlotSpec(date=f"2030-{1 + d // 28:02d}-{1 + d % 28:02d}", start_time="09:00", end_time="10:00",
                        max_capacity=3) for d in range(days)]


def test_a_request_larger_than_max_message_bytes_is_refused_and_changes_nothing(tmp_path: Path):
    with serving(tmp_path, MAX_MESSAGE_BYTES=4096) as live:
        with pytest.raises(grpc.RpcError) as too_big:
            live.stub.CreateDoctor(pb.CreateDoctorRequest(name="D" * 10_000, specialization="ENT"))
        # Past twice the limit, gRPC's own refusal, before any of the server's code (no ErrorInfo); not
        # INVALID_ARGUMENT for the name's length, which a smaller request with a long name gets.
        assert too_big.value.code() == RESOURCE_EXHAUSTED
        with pytest.raises(grpc.RpcError) as too_big:
            live.stub.CreateDoctor(pb.CreateDoctorRequest(name="D" * 5_000, specialization="ENT"))
        assert (failure(too_big.value).code, failure(too_big.value).reason) == (RESOURCE_EXHAUSTED,
                                                                               "MESSAGE_TOO_LARGE")

        doctor = make_doctor(live.stub)
        slots = slot_specs(200)
        batch = pb.CreateSlotsRequest(doctor_id=doctor, slots=slots)
        assert 4096 < batch.ByteSize() <= 2 * 4096  # past the setting, short of gRPC's own cap
        with pytest.raises(grpc.RpcError) as too_big:
            live.stub.CreateSlots(batch)  # a valid batch, only too large
        assert failure(too_big.value).reason == "MESSAGE_TOO_LARGE"
        assert list(live.stub.ListDoctors(pb.ListDoctorsRequest()).doctors) == [
            live.stub.GetDoctor(pb.GetDoctorRequest(doctor_id=doctor)).doctor]
        dates = {s.date for s in slots}
        assert not any(live.stub.ListSlots(pb.ListSlotsRequest(doctor_id=doctor, date=d)).slots for d in dates)

        # The same slots in batches under the limit are made: the server took no harm.
        for i in range(0, len(slots), 50):
            live.stub.CreateSlots(pb.CreateSlotsRequest(doctor_id=doctor, slots=slots[i:i + 50]))
        made = sum(len(live.stub.ListSlots(pb.ListSlotsRequest(doctor_id=doctor, date=d)).slots) for d in dates)
        assert made == 200

        # The limit is on requests: an answer larger than it still reaches the caller.
        for n in range(40):
            make_doctor(live.stub, name=f"Dr {n} " + "Rao" * 60)
        doctors = live.stub.ListDoctors(pb.ListDoctorsRequest(page_size=100))
        assert len(doctors.doctors) == 41 and doctors.ByteSize() > 4096


# ---- deadlines ------------------------------------------------------------------------------------------------


def test_calls_whose_deadline_passes_while_the_server_is_busy_are_not_run_later(tmp_path: Path):
    """The callers give up while the server is busy; once free, it must not do their work. (gRPC itself drops
    most such calls before any handler runs; the next test reaches the call pipeline's own check.)"""
    with serving(tmp_path) as live:
        doctor = make_doctor(live.stub)
        make_slots(live.stub, doctor, ("09:00", "12:00", 50))
        hold_event_loop(live, 1.0)
        results = at_once([functools.partial(outcome, live.stub.AllocateToken, allocation(doctor, n), timeout=0.3)
                           for n in range(10)])
        assert results == ["DEADLINE_EXCEEDED"] * 10
        time.sleep(1.0)  # the server is free again and has had its chance to run them
        assert all_tokens(live.stub, doctor) == []


def test_calls_that_reach_the_server_after_their_deadline_change_nothing_and_retries_settle_every_one(
        tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """Calls with a deadline of a microsecond: gRPC rounds deadlines to milliseconds, so some are answered,
    some reach the server after their deadline (the call pipeline refuses them: DEADLINE_EXCEEDED in the
    server's metrics) and some fail at the client while they still run on the server. That is legitimate, as a
    call that started in time finishes its one transaction; so a token may exist for a call that the client saw
    fail. What must hold: the server counts as OK exactly the calls that made a token (a commit is never counted
    CANCELLED), the calls it refused made nothing, and a retry with the same request_id settles every call
    exactly once. None of it is a server error: a call whose caller has gone ends without an answer, which gRPC
    would fail to send and log as an error with a traceback."""
    with serving(tmp_path, METRICS_LISTEN="127.0.0.1:0") as live, caplog.at_level(logging.WARNING):
        doctor = make_doctor(live.stub)
        make_slots(live.stub, doctor, ("09:00", "12:00", 500))
        request_ids = [str(uuid.uuid4()) for _ in range(200)]
        seen = [outcome(live.stub.AllocateToken, allocation(doctor, n, request_ids[n]), timeout=1e-6)
                for n in range(200)]
        assert set(seen) <= {"OK", "DEADLINE_EXCEEDED"}, collections.Counter(seen)

        counted = calls_counted(live.server.metrics_port, "AllocateToken")
        assert set(counted) <= {"OK", "DEADLINE_EXCEEDED", "CANCELLED"}, counted
        assert counted.get("DEADLINE_EXCEEDED", 0) >= 1, f"no call reached the server late: {counted}"
        made = len(all_tokens(live.stub, doctor))
        assert seen.count("OK") <= counted.get("OK", 0) == made, counted

        for n in (n for n, result in enumerate(seen) if result != "OK"):
            assert outcome(live.stub.AllocateToken, allocation(doctor, n, request_ids[n]), timeout=10) == "OK"
        tokens = all_tokens(live.stub, doctor)
        assert sorted(t.patient.phone for t in tokens) == sorted(patient(n).phone for n in range(200))
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_a_call_whose_caller_gives_up_while_it_waits_for_the_database_is_logged_as_what_it_did(
        tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """The database is held by someone else for a second; the caller's deadline is 0.3 s. Once the database is
    free the allocation commits, and its access-log line says OK with caller_gone (not CANCELLED: an operator
    looking for the token finds the call that made it). A retry with the same request_id gets that token."""
    request_id = str(uuid.uuid4())
    with serving(tmp_path) as live, caplog.at_level(logging.INFO, "opd_grpc.access"):
        doctor = make_doctor(live.stub)
        make_slots(live.stub, doctor, ("09:00", "12:00", 5))
        with database_held(live.settings.DATABASE_URL, seconds=1.0):
            assert outcome(live.stub.AllocateToken, allocation(doctor, 1, request_id), timeout=0.3) == \
                "DEADLINE_EXCEEDED"
        deadline = time.monotonic() + 10
        while not (lines := [r.fields for r in caplog.records if getattr(r, "fields", {}).get("request_id") ==
                             request_id]):
            assert time.monotonic() < deadline, "the call was never logged"
            time.sleep(0.05)
        (line,) = lines
        assert (line["method"], line["code"], line["caller_gone"]) == ("AllocateToken", "OK", True), line
        assert line["duration_ms"] >= 900
        (token,) = all_tokens(live.stub, doctor)
        assert live.stub.AllocateToken(allocation(doctor, 1, request_id)).token.token_id == token.token_id


@contextlib.contextmanager
def database_held(url: str, seconds: float) -> Iterator[None]:
    """Another client holds the write lock (SQLite) or the doctor-days table (PostgreSQL: an allocation locks its
    day's row first) from entry until `seconds` later, whenever the block ends."""
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.NullPool)
    conn = engine.connect()
    conn.exec_driver_sql("BEGIN IMMEDIATE" if url.startswith("sqlite") else "LOCK TABLE doctor_days IN EXCLUSIVE MODE")
    timer = threading.Timer(seconds, lambda: (conn.rollback(), conn.close(), engine.dispose()))
    timer.start()
    try:
        yield
    finally:
        timer.join()


# ---- MAX_CONCURRENT_CALLS -------------------------------------------------------------------------------------


def test_a_burst_past_max_concurrent_calls_is_refused_in_part_never_with_a_fault_and_the_server_recovers(
        tmp_path: Path):
    """MAX_CONCURRENT_CALLS=2, MAX_WATCHERS=1: gRPC itself takes 3 calls at once and the call pipeline runs 2.
    Forty calls arrive together while the server is busy. On PostgreSQL engine calls wait in threads, so calls
    pile up and the rest are refused; on SQLite they run on the event loop one after the other, so the burst is
    served in turn rather than refused (either is right: none may fail otherwise)."""
    with serving(tmp_path, MAX_CONCURRENT_CALLS=2, MAX_WATCHERS=1) as live:
        doctor = make_doctor(live.stub)
        make_slots(live.stub, doctor, ("09:00", "12:00", 100))
        hold_event_loop(live, 0.3)
        results = at_once([functools.partial(outcome, live.stub.AllocateToken, allocation(doctor, n), timeout=10)
                           for n in range(40)])
        kinds = collections.Counter(r.split()[0] for r in results)
        assert set(kinds) <= {"OK", "RESOURCE_EXHAUSTED"}, kinds
        assert kinds["OK"] >= 1
        if TEST_DATABASE == "postgresql":
            assert kinds["RESOURCE_EXHAUSTED"] >= 1, kinds
        assert len(all_tokens(live.stub, doctor)) == kinds["OK"], "a refused call made a token"

        # Recovered: calls one at a time, and two at a time (within the limit), are all served.
        assert [outcome(live.stub.AllocateToken, allocation(doctor, 100 + n)) for n in range(5)] == ["OK"] * 5
        for n in range(5):
            stats = functools.partial(outcome, live.stub.GetStats, pb.GetStatsRequest(doctor_id=doctor, date=DAY))
            pair = at_once([stats, stats])
            assert pair == ["OK", "OK"], (n, pair)
