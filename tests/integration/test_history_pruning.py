"""History pruned by age (EVENT_RETENTION_DAYS, REQUEST_RETENTION_HOURS) through a real server: a day's queue
events go once its date is past the retention and the rest stay, a watcher resuming into pruned history is
told OUT_OF_RANGE, a request_id whose stored answer is gone is a new request, and the server prunes by itself."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest
import sqlalchemy

from opd_grpc._gen.opd.v1 import opd_pb2 as pb
from opd_grpc.engine import service
from tests.support import (
    DAY, MORNING, LiveServer, all_tokens, allocate, at, failure, fresh_database, live_server, make_doctor, make_slots,
    new_request_id, stored_events,
)

LATER = "2030-02-10"  # 34 days after DAY


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveServer]:
    yield from live_server(tmp_path, EVENT_RETENTION_DAYS=30, REQUEST_RETENTION_HOURS=24)


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two rows a transaction, so that every test runs pruning over several batches."""
    monkeypatch.setattr(service, "PRUNE_BATCH_ROWS", 2)


def prune(live: LiveServer) -> tuple[int, int]:
    """A pruning pass at the server's current time, on a thread of its own as the server runs it."""
    return live.server.service.prune_history()


def stored_request_count(live: LiveServer) -> int:
    engine = sqlalchemy.create_engine(live.settings.DATABASE_URL, poolclass=sqlalchemy.NullPool)
    try:
        with engine.connect() as conn:
            return conn.exec_driver_sql("SELECT count(*) FROM stored_requests").scalar_one()
    finally:
        engine.dispose()


def watch_failure(live: LiveServer, doctor: str, **request: Any) -> Any:
    try:
        next(iter(live.stub.WatchQueue(pb.WatchQueueRequest(doctor_ids=[doctor], date=DAY, **request), timeout=5)))
    except grpc.RpcError as error:
        return failure(error)
    raise AssertionError("the stream started")


def test_a_days_events_go_once_its_date_is_past_the_retention_and_the_rest_stay(live: LiveServer,
                                                                                  small_batches: None):
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("09:00", "10:00", 2))
    make_slots(live.stub, doctor, ("09:00", "10:00", 2), date=LATER)
    for n in range(5):
        allocate(live.stub, doctor, n)
    allocate(live.stub, doctor, 9, date=LATER)
    url = live.settings.DATABASE_URL
    day_events, later_events = stored_events(url, doctor, DAY), stored_events(url, doctor, LATER)
    assert len(day_events) >= 5 and later_events

    live.set_time(at("23:59", "2030-02-06"))  # DAY is 30 days back: kept
    assert prune(live) == (0, 0)
    live.set_time(at("00:00", "2030-02-07"))  # 31 days back: gone
    assert prune(live) == (len(day_events), 0)
    assert stored_events(url, doctor, DAY) == [] and stored_events(url, doctor, LATER) == later_events
    assert prune(live) == (0, 0)  # nothing left to prune; the day itself stays
    assert len(all_tokens(live.stub, doctor, DAY)) == 5


def test_a_watcher_resuming_into_pruned_history_is_told_it_is_out_of_range(live: LiveServer):
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("09:00", "10:00", 2))
    tokens = [allocate(live.stub, doctor, n).token for n in range(3)]
    last = stored_events(live.settings.DATABASE_URL, doctor)[-1][0]
    live.set_time(at("08:00", LATER))
    assert prune(live)[0] == last

    for after in (1, last - 1):
        gone = watch_failure(live, doctor, after_sequence=after)
        assert (gone.code, gone.reason) == (grpc.StatusCode.OUT_OF_RANGE, "HISTORY_NOT_KEPT")
        assert f"before sequence {last + 1} are no longer kept" in gone.message
    snapshot = next(iter(live.stub.WatchQueue(pb.WatchQueueRequest(doctor_ids=[doctor], date=DAY), timeout=5)))
    assert snapshot.snapshot.sequence == last and len(snapshot.snapshot.tokens) == 3
    resumed = live.stub.WatchQueue(pb.WatchQueueRequest(doctor_ids=[doctor], date=DAY, after_sequence=last),
                                   timeout=5)
    try:  # resuming at the last sequence misses nothing: the next change follows it
        live.stub.CancelToken(pb.CancelTokenRequest(token_id=tokens[0].token_id))
        event = next(u.event for u in resumed if u.WhichOneof("update") == "event")
        assert (event.sequence, event.kind) == (last + 1, pb.EVENT_KIND_CANCELLED)
    finally:
        resumed.cancel()


def test_a_stored_answer_goes_after_the_retention_and_its_request_id_is_then_a_new_request(live: LiveServer,
                                                                                          small_batches: None):
    def create(request_id: str) -> str:
        return live.stub.CreateDoctor(pb.CreateDoctorRequest(name="Dr Asha Rao", specialization="General Medicine",
                                                             request_id=request_id)).doctor.doctor_id

    old_ids = [new_request_id() for _ in range(5)]
    first_answers = [create(request_id) for request_id in old_ids]
    live.set_time(MORNING + dt.timedelta(hours=23))
    recent_id = new_request_id()
    recent = create(recent_id)
    live.set_time(MORNING + dt.timedelta(hours=24, minutes=1))
    assert prune(live) == (0, 5)
    assert stored_request_count(live) == 1
    assert create(recent_id) == recent  # within the retention: the first answer again
    again = create(old_ids[0])  # past it: the request runs again, as a new one (a new doctor here)
    assert again not in first_answers + [recent]


def test_the_server_prunes_by_itself_when_it_starts(tmp_path: Path):
    with fresh_database(tmp_path) as url:
        first = LiveServer(url)
        try:  # a clinic day long past, by the wall clock that a restarted server's test clock starts at
            first.set_time(dt.datetime(2020, 3, 2, 8, 0, tzinfo=dt.timezone.utc))
            doctor = make_doctor(first.stub)
            make_slots(first.stub, doctor, ("09:00", "10:00", 2), date="2020-03-02")
            first.stub.AllocateToken(pb.AllocateTokenRequest(
                patient=pb.Patient(name="Patient 1", phone="+91-98450-00001", age=31, gender=pb.GENDER_FEMALE),
                doctor_id=doctor, date="2020-03-02", source=pb.SOURCE_WALK_IN, request_id=new_request_id()))
            assert stored_events(url, doctor, "2020-03-02") and stored_request_count(first) == 1
        finally:
            first.close()
        restarted = LiveServer(url)
        try:
            deadline = time.monotonic() + 10
            while stored_events(url, doctor, "2020-03-02") or stored_request_count(restarted):
                assert time.monotonic() < deadline, "the server did not prune at start"
                time.sleep(0.05)
        finally:
            restarted.close()
