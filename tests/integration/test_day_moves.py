"""SPEC §7 (and the no-show rule of §6): every legal move of the clinic day works, every other move is refused
with FAILED_PRECONDITION and changes nothing; CallNext picks the right patient; no-show waits for the grace."""

from __future__ import annotations

import datetime as dt
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest

from opd_grpc._gen.opd.v1 import opd_pb2 as pb
from tests.support import (
    DAY, MORNING, LiveServer, all_tokens, allocate, live_server, make_doctor, make_slots, patient, refused,
    spec_violations,
)

NOON = MORNING.replace(hour=12)

# The token calls of §7, by method name.
TOKEN_CALLS: dict[str, Any] = {
    "CheckInToken": pb.CheckInTokenRequest,
    "CompleteToken": pb.CompleteTokenRequest,
    "MarkNoShow": pb.MarkNoShowRequest,
    "CancelToken": pb.CancelTokenRequest,
}
TERMINAL = (pb.STATUS_COMPLETED, pb.STATUS_CANCELLED, pb.STATUS_NO_SHOW)
NON_TERMINAL = (pb.STATUS_CONFIRMED, pb.STATUS_WAITLISTED, pb.STATUS_CHECKED_IN, pb.STATUS_CALLED)
LEGAL: dict[str, set[int]] = {
    "CheckInToken": {pb.STATUS_CONFIRMED},
    "CompleteToken": {pb.STATUS_CALLED},
    "MarkNoShow": {pb.STATUS_CONFIRMED, pb.STATUS_CHECKED_IN, pb.STATUS_CALLED},
    "CancelToken": set(NON_TERMINAL),
}
TARGET = {"CheckInToken": pb.STATUS_CHECKED_IN, "CompleteToken": pb.STATUS_COMPLETED,
          "MarkNoShow": pb.STATUS_NO_SHOW, "CancelToken": pb.STATUS_CANCELLED}
ILLEGAL = [(call, status) for call in TOKEN_CALLS for status in NON_TERMINAL + TERMINAL
           if status not in LEGAL[call]]
LEGAL_MOVES = [(call, status) for call in TOKEN_CALLS for status in sorted(LEGAL[call])]


def name(status: int) -> str:
    return pb.Status.Name(status)


def token_call(live: LiveServer, call: str, token_id: str) -> Any:
    return getattr(live.stub, call)(TOKEN_CALLS[call](token_id=token_id))


def status_of(live: LiveServer, token_id: str) -> int:
    return live.stub.GetToken(pb.GetTokenRequest(token_id=token_id)).token.status


def clinic_day(live: LiveServer) -> tuple[str, dict[int, str]]:
    """A doctor's day at noon with one token in each status of §7; answers the doctor and status → token_id.

    The 09:00 slot (4 seats) holds COMPLETED, CALLED, CHECKED_IN and CONFIRMED tokens and one WAITLISTED;
    the 10:00 slot holds the CANCELLED and NO_SHOW ones."""
    stub = live.stub
    doctor = make_doctor(stub)
    make_slots(stub, doctor, ("09:00", "10:00", 4), ("10:00", "11:00", 2))
    early = [allocate(stub, doctor, n, slot_time="09:00").token.token_id for n in range(1, 6)]
    cancelled, no_show = (allocate(stub, doctor, n, slot_time="10:00").token.token_id for n in (6, 7))
    live.set_time(NOON)
    completed, called, checked_in, confirmed, waitlisted = early
    stub.CheckInToken(pb.CheckInTokenRequest(token_id=completed))
    stub.CallNext(pb.CallNextRequest(doctor_id=doctor, date=DAY))
    stub.CompleteToken(pb.CompleteTokenRequest(token_id=completed))
    stub.CheckInToken(pb.CheckInTokenRequest(token_id=called))
    stub.CallNext(pb.CallNextRequest(doctor_id=doctor, date=DAY))
    stub.CheckInToken(pb.CheckInTokenRequest(token_id=checked_in))
    stub.CancelToken(pb.CancelTokenRequest(token_id=cancelled))
    stub.MarkNoShow(pb.MarkNoShowRequest(token_id=no_show))
    by_status = {pb.STATUS_COMPLETED: completed, pb.STATUS_CALLED: called, pb.STATUS_CHECKED_IN: checked_in,
                 pb.STATUS_CONFIRMED: confirmed, pb.STATUS_WAITLISTED: waitlisted,
                 pb.STATUS_CANCELLED: cancelled, pb.STATUS_NO_SHOW: no_show}
    assert {s: status_of(live, t) for s, t in by_status.items()} == {s: s for s in by_status}
    return doctor, by_status


@pytest.mark.parametrize("call,status", LEGAL_MOVES, ids=[f"{c}-{name(s)}" for c, s in LEGAL_MOVES])
def test_every_legal_token_move_works(live, call, status):
    doctor, by_status = clinic_day(live)
    token_id = by_status[status]
    before = {t.token_id: t.status for t in all_tokens(live.stub, doctor)}
    answer = token_call(live, call, token_id)
    assert answer.token.token_id == token_id
    assert answer.token.status == TARGET[call]
    assert status_of(live, token_id) == TARGET[call]
    after = {t.token_id: t.status for t in all_tokens(live.stub, doctor)}
    promoted = [t.token_id for t in getattr(answer, "promoted", [])]
    frees_a_seat = call in ("MarkNoShow", "CancelToken") and status != pb.STATUS_WAITLISTED
    assert promoted == ([by_status[pb.STATUS_WAITLISTED]] if frees_a_seat else [])
    expected = {**before, token_id: TARGET[call], **{p: pb.STATUS_CONFIRMED for p in promoted}}
    assert after == expected
    assert spec_violations(live.stub, doctor) == []


@pytest.mark.parametrize("call,status", ILLEGAL, ids=[f"{c}-{name(s)}" for c, s in ILLEGAL])
def test_every_illegal_token_move_is_refused_and_changes_nothing(live, call, status):
    doctor, by_status = clinic_day(live)
    before = all_tokens(live.stub, doctor)
    failure = refused(getattr(live.stub, call), TOKEN_CALLS[call](token_id=by_status[status]))
    assert failure.code == grpc.StatusCode.FAILED_PRECONDITION
    assert (failure.reason, failure.domain) == ("ILLEGAL_STATE_TRANSITION", "opd.v1")
    assert name(status).removeprefix("STATUS_") in failure.message  # it tells the person why
    if call == "CancelToken":  # the states it could be in, in the day's order
        assert failure.message.endswith("; only a CONFIRMED, WAITLISTED, CHECKED_IN or CALLED token can be "
                                        "cancelled."), failure.message
    assert all_tokens(live.stub, doctor) == before


def test_a_cancel_reason_is_audited_without_the_patients_own_name_mrn_or_phone(live):
    """The desk's words are kept (SPEC §13), but a desk that writes the patient into them does not put them in the
    audit log: their name (any word of it, in any case), their mrn and their phone, however spaced."""
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("09:00", "10:00", 2))
    who = pb.Patient(name="Meera Iyer", phone="4412", age=40, mrn="A7-19")
    token = live.stub.AllocateToken(pb.AllocateTokenRequest(patient=who, doctor_id=doctor, date=DAY,
                                                            source=pb.SOURCE_WALK_IN)).token.token_id
    live.stub.CancelToken(pb.CancelTokenRequest(
        token_id=token, reason="MEERA iyer (a7-19) rang from ext 44 12 to cancel; Meera's son will come instead"))
    rows = live.stub.ListAuditEntries(pb.ListAuditEntriesRequest(token_id=token)).entries
    assert [r.reason for r in rows if r.method == "CancelToken"] == [
        "reason given: … … (…) rang from ext … to cancel; …'s son will come instead"]
    # The name as the duplicate-patient guard compares it: another Unicode form, ß as SS, full-width letters.
    who = pb.Patient(name="Zoë Strauß", phone="+91 98765 43210", age=30, mrn="#123")
    token = live.stub.AllocateToken(pb.AllocateTokenRequest(patient=who, doctor_id=doctor, date=DAY,
                                                            source=pb.SOURCE_WALK_IN)).token.token_id
    live.stub.CancelToken(pb.CancelTokenRequest(token_id=token, reason="Zoe\u0308 STRAUSS (MRN#123): ＺＯË rang"))
    rows = live.stub.ListAuditEntries(pb.ListAuditEntriesRequest(token_id=token)).entries
    assert [r.reason for r in rows if r.method == "CancelToken"] == ["reason given: … … (MRN…): … rang"]


def test_a_cancel_reason_of_several_lines_is_kept_on_one_and_a_name_loses_its_direction_controls(live):
    """A desk's text area sends lines: the cancel is made, its words kept on one line of the audit log. A phone's
    keyboard wraps a right-to-left name in bidirectional controls: the name is kept without them, for they would
    show a board's line reversed."""
    doctor = make_doctor(live.stub, name="Dr \u2067\u0632\u064a\u0646\u0628\u2069 Rao")  # زينب, in an isolate
    assert live.stub.GetDoctor(pb.GetDoctorRequest(doctor_id=doctor)).doctor.name == "Dr \u0632\u064a\u0646\u0628 Rao"
    make_slots(live.stub, doctor, ("09:00", "10:00", 2))
    token = allocate(live.stub, doctor, 1).token.token_id
    cancelled = live.stub.CancelToken(pb.CancelTokenRequest(token_id=token, reason="went home\r\nwill come tomorrow"))
    assert cancelled.token.status == pb.STATUS_CANCELLED
    rows = live.stub.ListAuditEntries(pb.ListAuditEntriesRequest(token_id=token)).entries
    assert [r.reason for r in rows if r.method == "CancelToken"] == ["reason given: went home will come tomorrow"]


def test_check_in_then_call_next_then_complete(live):
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("09:00", "10:00", 3))
    token_id = allocate(live.stub, doctor, 1).token.token_id
    live.set_time(MORNING.replace(hour=8, minute=50))
    checked = live.stub.CheckInToken(pb.CheckInTokenRequest(token_id=token_id)).token
    assert checked.status == pb.STATUS_CHECKED_IN
    assert checked.checked_in_at.ToDatetime(dt.timezone.utc) == MORNING.replace(hour=8, minute=50)
    live.set_time(MORNING.replace(hour=9))
    call = live.stub.CallNext(pb.CallNextRequest(doctor_id=doctor, date=DAY))
    assert (call.token.token_id, call.token.status) == (token_id, pb.STATUS_CALLED)
    assert call.token.called_at.ToDatetime(dt.timezone.utc) == MORNING.replace(hour=9)
    assert call.token.queue_position == 1
    assert not call.HasField("completed_token")
    live.set_time(MORNING.replace(hour=9, minute=7))
    done = live.stub.CompleteToken(pb.CompleteTokenRequest(token_id=token_id)).token
    assert done.status == pb.STATUS_COMPLETED
    assert done.completed_at.ToDatetime(dt.timezone.utc) == MORNING.replace(hour=9, minute=7)


def test_the_next_call_completes_the_called_token_and_returns_it(live):
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("09:00", "10:00", 3))
    first, second = (allocate(live.stub, doctor, n).token.token_id for n in (1, 2))
    for token_id in (first, second):
        live.stub.CheckInToken(pb.CheckInTokenRequest(token_id=token_id))
    live.stub.CallNext(pb.CallNextRequest(doctor_id=doctor, date=DAY))
    live.set_time(MORNING.replace(hour=9, minute=4))
    call = live.stub.CallNext(pb.CallNextRequest(doctor_id=doctor, date=DAY))
    assert (call.token.token_id, call.token.status) == (second, pb.STATUS_CALLED)
    assert (call.completed_token.token_id, call.completed_token.status) == (first, pb.STATUS_COMPLETED)
    assert call.completed_token.completed_at.ToDatetime(dt.timezone.utc) == MORNING.replace(hour=9, minute=4)
    assert status_of(live, first) == pb.STATUS_COMPLETED


def test_call_next_takes_the_best_checked_in_token_of_the_earliest_slot_that_has_one(live):
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("09:00", "10:00", 5), ("10:00", "11:00", 5))
    walk_in = allocate(live.stub, doctor, 1, pb.SOURCE_WALK_IN, "09:00").token.token_id
    online = allocate(live.stub, doctor, 2, pb.SOURCE_ONLINE_BOOKING, "09:00").token.token_id
    follow_up = allocate(live.stub, doctor, 3, pb.SOURCE_FOLLOW_UP, "09:00").token.token_id
    absent_paid = allocate(live.stub, doctor, 4, pb.SOURCE_PAID_PRIORITY, "09:00").token.token_id
    live.set_time(MORNING.replace(hour=7, minute=5))
    later_follow_up = allocate(live.stub, doctor, 5, pb.SOURCE_FOLLOW_UP, "09:00").token.token_id
    later_slot_emergency = allocate(live.stub, doctor, 6, pb.SOURCE_EMERGENCY, "10:00").token.token_id
    # Check-in order is deliberately not the serving order: it must not matter.
    for token_id in (later_slot_emergency, later_follow_up, walk_in, follow_up, online):
        live.stub.CheckInToken(pb.CheckInTokenRequest(token_id=token_id))
    called = []
    for _ in range(5):
        called.append(live.stub.CallNext(pb.CallNextRequest(doctor_id=doctor, date=DAY)).token.token_id)
    assert called == [follow_up, later_follow_up, online, walk_in, later_slot_emergency]
    assert status_of(live, absent_paid) == pb.STATUS_CONFIRMED


def test_call_next_with_nobody_checked_in_is_queue_empty_and_the_called_token_stays_called(live):
    doctor = make_doctor(live.stub)
    no_slots = refused(live.stub.CallNext, pb.CallNextRequest(doctor_id=doctor, date=DAY))
    assert (no_slots.code, no_slots.reason) == (grpc.StatusCode.NOT_FOUND, "QUEUE_EMPTY")
    assert "no slots that day" in no_slots.message
    make_slots(live.stub, doctor, ("09:00", "10:00", 3))
    first, _confirmed = (allocate(live.stub, doctor, n).token.token_id for n in (1, 2))
    empty = refused(live.stub.CallNext, pb.CallNextRequest(doctor_id=doctor, date=DAY))
    assert (empty.code, empty.reason, empty.domain) == (grpc.StatusCode.NOT_FOUND, "QUEUE_EMPTY", "opd.v1")
    live.stub.CheckInToken(pb.CheckInTokenRequest(token_id=first))
    live.stub.CallNext(pb.CallNextRequest(doctor_id=doctor, date=DAY))
    before = all_tokens(live.stub, doctor)
    empty = refused(live.stub.CallNext, pb.CallNextRequest(doctor_id=doctor, date=DAY))
    assert (empty.code, empty.reason) == (grpc.StatusCode.NOT_FOUND, "QUEUE_EMPTY")
    assert status_of(live, first) == pb.STATUS_CALLED
    assert all_tokens(live.stub, doctor) == before


def test_mark_no_show_waits_for_the_grace_period_after_the_estimated_time(live):
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("09:00", "10:00", 3), consultation_minutes=5)
    tokens = [allocate(live.stub, doctor, n).token for n in (1, 2, 3)]
    second = tokens[1]
    assert second.estimated_time.ToDatetime(dt.timezone.utc) == MORNING.replace(hour=9, minute=5)
    live.set_time(MORNING.replace(hour=9, minute=19, second=59))
    before = all_tokens(live.stub, doctor)
    early = refused(live.stub.MarkNoShow, pb.MarkNoShowRequest(token_id=second.token_id))
    assert (early.code, early.reason, early.domain) == (
        grpc.StatusCode.FAILED_PRECONDITION, "GRACE_PERIOD_NOT_ELAPSED", "opd.v1")
    # when it may be marked, for a desk's program: the estimated time counts the seen and absent ahead (README)
    assert early.metadata == {"no_show_from": f"{DAY}T09:20:00Z"}
    assert all_tokens(live.stub, doctor) == before
    live.set_time(MORNING.replace(hour=9, minute=20))
    marked = live.stub.MarkNoShow(pb.MarkNoShowRequest(token_id=second.token_id)).token
    assert marked.status == pb.STATUS_NO_SHOW
    third = live.stub.GetToken(pb.GetTokenRequest(token_id=tokens[2].token_id)).token
    assert third.estimated_time.ToDatetime(dt.timezone.utc) == MORNING.replace(hour=9, minute=5)


def test_the_grace_period_is_the_setting(tmp_path: Path):
    with server(tmp_path, NO_SHOW_GRACE_PERIOD_MINUTES=30) as live:
        doctor = make_doctor(live.stub)
        make_slots(live.stub, doctor, ("09:00", "10:00", 3))
        token_id = allocate(live.stub, doctor, 1).token.token_id
        live.set_time(MORNING.replace(hour=9, minute=29))
        early = refused(live.stub.MarkNoShow, pb.MarkNoShowRequest(token_id=token_id))
        assert early.reason == "GRACE_PERIOD_NOT_ELAPSED"
        live.set_time(MORNING.replace(hour=9, minute=30))
        assert live.stub.MarkNoShow(pb.MarkNoShowRequest(token_id=token_id)).token.status == pb.STATUS_NO_SHOW


def test_auto_no_show_marks_confirmed_tokens_past_their_grace_and_nothing_else(tmp_path: Path):
    with server(tmp_path, AUTO_NO_SHOW="true") as live:
        doctor = make_doctor(live.stub)
        make_slots(live.stub, doctor, ("09:00", "09:30", 2), ("09:30", "10:00", 2))
        absent = allocate(live.stub, doctor, 1, slot_time="09:00").token.token_id        # due 09:15
        arrived = allocate(live.stub, doctor, 2, slot_time="09:00").token.token_id       # checked in
        waiting = allocate(live.stub, doctor, 3, slot_time="09:00").token.token_id       # waitlisted
        later = allocate(live.stub, doctor, 4, slot_time="09:30").token.token_id         # due 09:45
        live.stub.CheckInToken(pb.CheckInTokenRequest(token_id=arrived))
        live.set_time(MORNING.replace(hour=9, minute=16))
        assert poll_status(live, absent, pb.STATUS_NO_SHOW) == pb.STATUS_NO_SHOW
        # The same pass saw the other tokens: only the overdue CONFIRMED one was marked.
        assert status_of(live, arrived) == pb.STATUS_CHECKED_IN
        assert status_of(live, waiting) == pb.STATUS_CONFIRMED  # promoted into the freed seat
        assert status_of(live, later) == pb.STATUS_CONFIRMED
        assert spec_violations(live.stub, doctor) == []
        # The audit entries of the pass that marked one (its own, then one per token it moved); none for the passes
        # since, which changed nothing.
        time.sleep(2.5)
        passes = [(e.token_id, e.reason.split(" ", 2)[:2]) for e in live.stub.ListAuditEntries(
            pb.ListAuditEntriesRequest(page_size=1000)).entries if e.method == "AutoNoShow"]
        assert passes == [("", ["NO_SHOW", absent]), (absent, ["NO_SHOW"]), (waiting, ["PROMOTED", "by"])]


def test_auto_no_show_marks_a_token_whose_grace_ends_after_midnight(tmp_path: Path):
    with server(tmp_path, AUTO_NO_SHOW="true") as live:
        doctor = make_doctor(live.stub)
        make_slots(live.stub, doctor, ("23:30", "23:59", 2), consultation_minutes=20)
        arrived = allocate(live.stub, doctor, 1).token.token_id
        live.stub.CheckInToken(pb.CheckInTokenRequest(token_id=arrived))
        late = allocate(live.stub, doctor, 2).token  # estimated 23:50, grace until 00:05 the next day
        assert late.estimated_time.ToDatetime(dt.timezone.utc) == MORNING.replace(hour=23, minute=50)
        live.set_time(MORNING.replace(hour=0, minute=6) + dt.timedelta(days=1))
        assert name(poll_status(live, late.token_id, pb.STATUS_NO_SHOW)) == "STATUS_NO_SHOW"


def test_auto_no_show_catches_up_on_every_earlier_day_once_the_clock_has_moved_on_by_days(tmp_path: Path):
    """A server that was down (or a test clock set ahead) finds confirmed tokens of days before yesterday: they
    are marked too, more days than one pass takes (NO_SHOW_BACKLOG_DAYS_PER_PASS); a patient promoted into a freed
    seat of a day long over is not (nobody was waiting for them), so it stays CONFIRMED for the desk."""
    with server(tmp_path, AUTO_NO_SHOW="true") as live:
        doctor = make_doctor(live.stub)
        dates = [(MORNING + dt.timedelta(days=n)).date().isoformat() for n in range(25)]
        live.stub.CreateSlots(pb.CreateSlotsRequest(doctor_id=doctor, slots=[
            pb.SlotSpec(date=date, start_time="09:00", end_time="10:00", max_capacity=1) for date in dates]))
        absent = [allocate(live.stub, doctor, n, date=date).token.token_id for n, date in enumerate(dates)]
        waiting = allocate(live.stub, doctor, 99, date=dates[0]).token
        assert waiting.status == pb.STATUS_WAITLISTED
        live.set_time(MORNING + dt.timedelta(days=40))
        for token_id in absent:
            assert name(poll_status(live, token_id, pb.STATUS_NO_SHOW, timeout=15)) == "STATUS_NO_SHOW", token_id
        time.sleep(2.5)  # passes after the one that promoted it
        assert name(status_of(live, waiting.token_id)) == "STATUS_CONFIRMED"
        for date in dates:
            assert spec_violations(live.stub, doctor, date) == []


def test_auto_no_show_marks_the_absent_seat_holder_of_a_sitting_over_and_not_its_waitlist(tmp_path: Path):
    """A clock that comes back after the sitting (a server that was down, a test clock set ahead): the absent
    patient who held the seat is a no-show; the waitlisted ones promoted into it only now never had a seat while
    the doctor sat, so they are not marked, and one no-show does not turn the waitlist into four."""
    with server(tmp_path, AUTO_NO_SHOW="true") as live:
        doctor = make_doctor(live.stub)
        make_slots(live.stub, doctor, ("09:00", "10:00", 1))
        seated, *waitlist = [allocate(live.stub, doctor, n).token.token_id for n in (1, 2, 3, 4)]
        live.set_time(MORNING.replace(hour=10, minute=30))
        assert name(poll_status(live, seated, pb.STATUS_NO_SHOW)) == "STATUS_NO_SHOW"
        time.sleep(2.5)  # two passes more
        assert [name(status_of(live, t)) for t in waitlist] == [
            "STATUS_CONFIRMED", "STATUS_WAITLISTED", "STATUS_WAITLISTED"]
        stats = live.stub.GetStats(pb.GetStatsRequest(doctor_id=doctor, date=DAY)).stats
        assert [s.no_shows for s in stats] == [1]
        assert spec_violations(live.stub, doctor) == []


def test_auto_no_show_leaves_a_patient_who_checked_in_then_was_bumped_and_promoted_back(tmp_path: Path):
    """A patient in the waiting room, bumped by an emergency and given the seat back when it is cancelled, is
    CONFIRMED again (SPEC §7) but has come: never marked by itself. Checking in again keeps the first arrival, from
    which the day's mean wait counts."""
    with server(tmp_path, AUTO_NO_SHOW="true") as live:
        doctor = make_doctor(live.stub)
        make_slots(live.stub, doctor, ("09:00", "10:00", 1))
        live.set_time(MORNING.replace(hour=8, minute=55))
        present = allocate(live.stub, doctor, 1).token.token_id
        arrived = live.stub.CheckInToken(pb.CheckInTokenRequest(token_id=present)).token.checked_in_at
        live.set_time(MORNING.replace(hour=9, minute=20))
        urgent = live.stub.AllocateEmergency(pb.AllocateEmergencyRequest(
            patient=patient(2), doctor_id=doctor, date=DAY)).token.token_id
        assert name(status_of(live, present)) == "STATUS_WAITLISTED"
        live.set_time(MORNING.replace(hour=9, minute=21))
        promoted = live.stub.CancelToken(pb.CancelTokenRequest(token_id=urgent)).promoted
        assert [(t.token_id, name(t.status), t.checked_in_at) for t in promoted] == [
            (present, "STATUS_CONFIRMED", arrived)]
        live.set_time(MORNING.replace(hour=9, minute=50))  # past any grace
        time.sleep(2.5)
        assert name(status_of(live, present)) == "STATUS_CONFIRMED"
        again = live.stub.CheckInToken(pb.CheckInTokenRequest(token_id=present)).token
        assert (name(again.status), again.checked_in_at) == ("STATUS_CHECKED_IN", arrived)


def poll_status(live: LiveServer, token_id: str, wanted: int, timeout: float = 5.0) -> int:
    """The token's status once it is `wanted`, or its last status after `timeout` seconds (the background
    pass of AUTO_NO_SHOW runs every second, on its own schedule)."""
    deadline = time.monotonic() + timeout
    while (status := status_of(live, token_id)) != wanted and time.monotonic() < deadline:
        time.sleep(0.1)
    return status


@contextmanager
def server(tmp_path: Path, **settings: Any) -> Iterator[LiveServer]:
    yield from live_server(tmp_path, **settings)
