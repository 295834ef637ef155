"""ListQueueEvents through a real server: a doctor-day's history in sequence order, the same events WatchQueue
sends, page by page; an empty day, an unknown doctor, and history outside what is kept (SPEC §10: OUT_OF_RANGE)."""

from __future__ import annotations

import grpc
import pytest
import sqlalchemy

from opd_grpc._gen.opd.v1 import opd_pb2 as pb
from tests.support import (
    DAY, LiveServer, allocate, make_doctor, make_slots, new_request_id, refused, stored_events,
)

OUT_OF_RANGE, NOT_FOUND, INVALID = grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.NOT_FOUND, \
    grpc.StatusCode.INVALID_ARGUMENT


def busy_day(live: LiveServer) -> str:
    """A doctor whose DAY has slots, allocations (a waitlist among them), a check-in, a call and a cancellation."""
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("09:00", "10:00", 2), ("10:00", "11:00", 2))
    first = allocate(live.stub, doctor, 1, slot_time="09:00").token
    allocate(live.stub, doctor, 2, slot_time="09:00")
    third = allocate(live.stub, doctor, 3, slot_time="09:00").token  # waitlisted
    allocate(live.stub, doctor, 4, source=pb.SOURCE_EMERGENCY, slot_time="09:00")  # bumps one
    live.stub.CheckInToken(pb.CheckInTokenRequest(token_id=first.token_id))
    live.stub.CallNext(pb.CallNextRequest(doctor_id=doctor, date=DAY))
    live.stub.CancelToken(pb.CancelTokenRequest(token_id=third.token_id))
    return doctor


def listed(live: LiveServer, doctor: str, page_size: int = 0, **request) -> tuple[list[pb.QueueEvent], int]:
    """Every event that ListQueueEvents answers, following next_page_token to the end, and how many pages."""
    events, token, pages = [], "", 0
    while True:
        page = live.stub.ListQueueEvents(pb.ListQueueEventsRequest(doctor_id=doctor, date=DAY, page_size=page_size,
                                                                   page_token=token, **request))
        events += page.events
        pages += 1
        if not (token := page.next_page_token):
            return events, pages


def watched(live: LiveServer, doctor: str, count: int) -> list[pb.QueueEvent]:
    """The first `count` events a WatchQueue resumed after sequence 0 sends."""
    stream = live.stub.WatchQueue(pb.WatchQueueRequest(doctor_ids=[doctor], date=DAY, after_sequence=0), timeout=10)
    events = []
    for update in stream:
        if update.WhichOneof("update") == "event":
            events.append(update.event)
        if len(events) == count:
            stream.cancel()
            return events
    raise AssertionError(f"the stream ended after {len(events)} events")


def test_a_days_events_come_in_sequence_order_as_watch_queue_sends_them(live: LiveServer):
    doctor = busy_day(live)
    stored = stored_events(live.settings.DATABASE_URL, doctor)
    events, pages = listed(live, doctor)
    assert pages == 1
    assert [(e.sequence, pb.EventKind.Name(e.kind), e.token.token_id, pb.Status.Name(e.token.status))
            for e in events] == stored
    assert [e.sequence for e in events] == list(range(1, len(stored) + 1))
    assert events == watched(live, doctor, len(stored))  # field for field
    kinds = [pb.EventKind.Name(e.kind).removeprefix("EVENT_KIND_") for e in events]
    assert kinds == ["SLOT_CHANGED", "SLOT_CHANGED", "ALLOCATED", "ALLOCATED", "WAITLISTED", "BUMPED", "ALLOCATED",
                     "CHECKED_IN", "CALLED", "CANCELLED"]
    bumped = events[5]
    assert bumped.caused_by_token_id == events[6].token.token_id
    assert all(not e.token.HasField("patient") for e in events), "events never carry a patient's details"


def test_pages_follow_each_other_without_a_gap_or_a_repeat(live: LiveServer):
    doctor = busy_day(live)
    everything, _ = listed(live, doctor)
    for size in (1, 3, 4):
        paged, pages = listed(live, doctor, page_size=size)
        assert paged == everything
        assert pages == -(-len(everything) // size)  # a full last page says there is no next one
    first = live.stub.ListQueueEvents(pb.ListQueueEventsRequest(doctor_id=doctor, date=DAY, page_size=3))
    assert [e.sequence for e in first.events] == [1, 2, 3] and first.next_page_token


def test_after_sequence_starts_after_that_event_and_pages_from_there(live: LiveServer):
    doctor = busy_day(live)
    events, _ = listed(live, doctor, page_size=2, after_sequence=4)
    assert [e.sequence for e in events] == list(range(5, 11))
    last, _ = listed(live, doctor, after_sequence=10)
    assert last == []


def test_a_day_without_events_is_an_empty_list(live: LiveServer):
    doctor = make_doctor(live.stub)
    page = live.stub.ListQueueEvents(pb.ListQueueEventsRequest(doctor_id=doctor, date=DAY))
    assert list(page.events) == [] and page.next_page_token == ""


def test_new_events_are_listed_once_they_are_committed(live: LiveServer):
    doctor = busy_day(live)
    before, _ = listed(live, doctor)
    allocate(live.stub, doctor, 9, slot_time="10:00", request_id=new_request_id())
    after, _ = listed(live, doctor, after_sequence=before[-1].sequence)
    assert [(e.sequence, e.kind, e.token.token_number) for e in after] == [(11, pb.EVENT_KIND_ALLOCATED, 5)]


def test_an_unknown_doctor_is_not_found(live: LiveServer):
    make_doctor(live.stub)
    answer = refused(live.stub.ListQueueEvents, pb.ListQueueEventsRequest(doctor_id="DOC404", date=DAY))
    assert (answer.code, answer.reason) == (NOT_FOUND, "DOCTOR_NOT_FOUND")


def test_a_sequence_past_the_last_event_is_out_of_range(live: LiveServer):
    doctor = busy_day(live)
    answer = refused(live.stub.ListQueueEvents, pb.ListQueueEventsRequest(doctor_id=doctor, date=DAY,
                                                                          after_sequence=11))
    assert (answer.code, answer.reason) == (OUT_OF_RANGE, "SEQUENCE_AHEAD")
    assert "past DOC001's last event on 2030-01-07 (10)" in answer.message
    empty = make_doctor(live.stub)
    answer = refused(live.stub.ListQueueEvents, pb.ListQueueEventsRequest(doctor_id=empty, date=DAY,
                                                                          after_sequence=1))
    assert (answer.code, answer.reason) == (OUT_OF_RANGE, "SEQUENCE_AHEAD")
    huge = refused(live.stub.ListQueueEvents, pb.ListQueueEventsRequest(doctor_id=doctor, date=DAY,
                                                                        after_sequence=2 ** 63 - 1))
    assert (huge.code, huge.reason) == (OUT_OF_RANGE, "SEQUENCE_AHEAD")


def prune_through(live: LiveServer, doctor: str, sequence: int) -> None:
    """What pruning by age does to a day: its oldest events go, its last sequence stays."""
    engine = sqlalchemy.create_engine(live.settings.DATABASE_URL, poolclass=sqlalchemy.NullPool)
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text("DELETE FROM queue_events WHERE doctor_id = :doctor AND sequence <= :through"),
                     {"doctor": doctor, "through": sequence})
    engine.dispose()


def test_history_no_longer_kept_is_out_of_range_and_what_is_kept_is_listed(live: LiveServer):
    doctor = busy_day(live)
    prune_through(live, doctor, 3)
    for after in (0, 2):
        answer = refused(live.stub.ListQueueEvents, pb.ListQueueEventsRequest(doctor_id=doctor, date=DAY,
                                                                              after_sequence=after))
        assert (answer.code, answer.reason) == (OUT_OF_RANGE, "HISTORY_NOT_KEPT")
        assert "before sequence 4 are no longer kept" in answer.message
    kept, _ = listed(live, doctor, after_sequence=3)
    assert [e.sequence for e in kept] == list(range(4, 11))


def test_a_page_token_into_history_pruned_meanwhile_is_out_of_range(live: LiveServer):
    doctor = busy_day(live)
    first = live.stub.ListQueueEvents(pb.ListQueueEventsRequest(doctor_id=doctor, date=DAY, page_size=2))
    prune_through(live, doctor, 5)
    answer = refused(live.stub.ListQueueEvents, pb.ListQueueEventsRequest(doctor_id=doctor, date=DAY, page_size=2,
                                                                          page_token=first.next_page_token))
    assert (answer.code, answer.reason) == (OUT_OF_RANGE, "HISTORY_NOT_KEPT")


@pytest.mark.parametrize("request_fields, field", [
    ({"after_sequence": -1}, "after_sequence"),
    ({"date": "2030-02-30"}, "date"),
    ({"date": ""}, "date"),
    ({"doctor_id": "doc001"}, "doctor_id"),
    ({"page_size": -1}, "page_size"),
    ({"page_token": "not a token"}, "page_token"),
])
def test_malformed_requests_name_the_field(live: LiveServer, request_fields, field):
    doctor = busy_day(live)
    request = {"doctor_id": doctor, "date": DAY, **request_fields}
    answer = refused(live.stub.ListQueueEvents, pb.ListQueueEventsRequest(**request))
    assert answer.code == INVALID and field in answer.fields, answer


def test_the_events_of_one_doctor_are_not_anothers(live: LiveServer):
    doctor = busy_day(live)
    other = make_doctor(live.stub, "Dr Vikram Shah")
    make_slots(live.stub, other, ("09:00", "10:00", 1))
    events = live.stub.ListQueueEvents(pb.ListQueueEventsRequest(doctor_id=other, date=DAY)).events
    assert [(e.doctor_id, e.sequence, e.kind) for e in events] == [(other, 1, pb.EVENT_KIND_SLOT_CHANGED)]
    assert len(listed(live, doctor)[0]) == 10

