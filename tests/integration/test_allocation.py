"""SPEC §2, §3.4, §3.5, §4 and §8 through the real server: which slot, seat, number and time a request gets."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest

from opd_grpc._gen.opd.v1 import opd_pb2 as pb
from tests.support import (
    DAY, LiveServer, all_tokens, allocate, at, live_server, make_doctor, make_slots, patient, refused,
    spec_violations, statuses, waitlist_numbers,
)

NEXT_DAY = "2030-01-08"


def request(doctor: str, who: pb.Patient, slot_time: str = "", source: int = pb.SOURCE_WALK_IN,
            date: str = DAY, **kw: Any) -> pb.AllocateTokenRequest:
    return pb.AllocateTokenRequest(patient=who, doctor_id=doctor, date=date, preferred_slot_time=slot_time,
                                   source=source, **kw)


def slot_time_of(token: pb.Token) -> str:
    """The HH:MM start of a token's slot, read from its slot id (DOC001-20300107-0900 → 09:00)."""
    hhmm = token.slot_id.rsplit("-", 1)[1]
    return f"{hhmm[:2]}:{hhmm[2:]}"


def times(live: LiveServer, doctor: str) -> dict[int, str]:
    """Per token number: its estimated time as UTC HH:MM, or "wait N" for waitlist position N, or "-"."""
    shown = {}
    for t in all_tokens(live.stub, doctor):
        if t.HasField("estimated_time"):
            shown[t.token_number] = f"{t.estimated_time.ToDatetime():%H:%M}"
        elif t.waitlist_position:
            shown[t.token_number] = f"wait {t.waitlist_position}"
        else:
            shown[t.token_number] = "-"
    return shown


# ---- §2 priority order of the waitlist ------------------------------------------------------------


def test_waitlist_orders_by_priority_then_queue_time_then_token_number(live):
    """The waitlist is in §2 order, positions are 1..n, and freed seats go to it in that order."""
    doctor = make_doctor(live.stub)
    (slot,) = make_slots(live.stub, doctor, ("09:00", "12:00", 1))
    allocate(live.stub, doctor, 1)                                      # T1 takes the only seat
    live.set_time(at("07:10"))
    allocate(live.stub, doctor, 2)                                      # T2 walk-in, queued 07:10
    live.set_time(at("07:05"))                                          # the test clock may go back
    allocate(live.stub, doctor, 3)                                      # T3 walk-in, queued 07:05
    allocate(live.stub, doctor, 4)                                      # T4 walk-in, queued 07:05 too
    live.set_time(at("07:20"))
    allocate(live.stub, doctor, 5, source=pb.SOURCE_ONLINE_BOOKING)     # T5
    allocate(live.stub, doctor, 6, source=pb.SOURCE_FOLLOW_UP)          # T6
    allocate(live.stub, doctor, 7, source=pb.SOURCE_PAID_PRIORITY)      # T7

    expected = [7, 6, 5, 3, 4, 2]
    status = live.stub.GetSlotStatus(pb.GetSlotStatusRequest(slot_id=slot.slot_id))
    assert [t.token_number for t in status.waitlist] == expected
    assert [t.waitlist_position for t in status.waitlist] == [1, 2, 3, 4, 5, 6]
    assert [t.priority for t in status.waitlist] == [2, 3, 4, 5, 5, 5]
    assert spec_violations(live.stub, doctor) == []

    seat_holder, promoted_order = f"{doctor}-20300107-T1", []
    for _ in expected:
        answer = live.stub.CancelToken(pb.CancelTokenRequest(token_id=seat_holder))
        (promoted,) = answer.promoted
        promoted_order.append(promoted.token_number)
        seat_holder = promoted.token_id
    assert promoted_order == expected
    assert spec_violations(live.stub, doctor) == []


def test_a_waitlisted_token_reports_its_position_and_no_time(live):
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("09:00", "10:00", 1))
    allocate(live.stub, doctor, 1)
    second = allocate(live.stub, doctor, 2).token
    third = allocate(live.stub, doctor, 3, source=pb.SOURCE_FOLLOW_UP).token
    assert (third.waitlist_position, third.HasField("estimated_time"), third.queue_position) == (1, False, 0)
    now = live.stub.GetToken(pb.GetTokenRequest(token_id=second.token_id)).token
    assert (now.status, now.waitlist_position, now.HasField("estimated_time")) == (pb.STATUS_WAITLISTED, 2, False)
    assert spec_violations(live.stub, doctor) == []


# ---- §4 slot choice ----------------------------------------------------------------------------


def test_preferred_slot_time_picks_that_slot_even_when_an_earlier_one_is_free(live):
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("09:00", "10:00", 2), ("10:00", "11:00", 2))
    answer = allocate(live.stub, doctor, 1, slot_time="10:00")
    assert (slot_time_of(answer.token), answer.token.status) == ("10:00", pb.STATUS_CONFIRMED)
    assert answer.moved_to_later_slot is False
    assert spec_violations(live.stub, doctor) == []


def test_without_a_preference_the_earliest_slot_with_a_free_seat_then_the_earliest_open_one(live):
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("09:00", "10:00", 1), ("10:00", "11:00", 1), ("11:00", "12:00", 1))
    placed = [allocate(live.stub, doctor, n).token for n in range(1, 5)]
    assert [(slot_time_of(t), t.status) for t in placed] == [
        ("09:00", pb.STATUS_CONFIRMED), ("10:00", pb.STATUS_CONFIRMED), ("11:00", pb.STATUS_CONFIRMED),
        ("09:00", pb.STATUS_WAITLISTED)]
    assert spec_violations(live.stub, doctor) == []


def test_a_slot_that_has_ended_is_skipped_even_with_a_free_seat(live):
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("09:00", "10:00", 2), ("10:00", "11:00", 1))
    allocate(live.stub, doctor, 1)
    live.set_time(at("10:00"))  # the 09:00 slot has just ended, with one seat still free
    second = allocate(live.stub, doctor, 2).token
    third = allocate(live.stub, doctor, 3).token
    assert (slot_time_of(second), second.status) == ("10:00", pb.STATUS_CONFIRMED)
    assert (slot_time_of(third), third.status) == ("10:00", pb.STATUS_WAITLISTED)
    assert spec_violations(live.stub, doctor) == []


def test_an_unknown_preferred_time_is_not_found_and_takes_no_number(live):
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("09:00", "10:00", 2))
    error = refused(live.stub.AllocateToken, request(doctor, patient(1), slot_time="09:30"))
    assert (error.code, error.reason, error.domain) == (grpc.StatusCode.NOT_FOUND, "SLOT_NOT_FOUND", "opd.v1")
    assert allocate(live.stub, doctor, 1).token.token_number == 1
    assert spec_violations(live.stub, doctor) == []


def test_a_preferred_slot_that_has_ended_is_closed_and_takes_no_number(live):
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("09:00", "10:00", 5), ("10:00", "11:00", 5))
    allocate(live.stub, doctor, 1, slot_time="09:00")
    live.set_time(at("10:01"))
    error = refused(live.stub.AllocateToken, request(doctor, patient(2), slot_time="09:00"))
    assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "SLOT_CLOSED")
    assert "09:00" in error.message or "0900" in error.message
    later = allocate(live.stub, doctor, 2, slot_time="10:00").token
    assert (later.token_number, slot_time_of(later)) == (2, "10:00")
    assert spec_violations(live.stub, doctor) == []


def test_when_every_slot_has_ended_the_day_is_closed(live):
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("09:00", "10:00", 5), ("10:00", "11:00", 5))
    allocate(live.stub, doctor, 1)
    live.set_time(at("11:00"))
    error = refused(live.stub.AllocateToken, request(doctor, patient(2)))
    assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "SLOT_CLOSED")
    assert statuses(live.stub, doctor) == {1: "CONFIRMED"}
    assert spec_violations(live.stub, doctor) == []


def test_flexible_on_a_full_slot_takes_the_earliest_later_slot_with_a_free_seat(live):
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("08:00", "09:00", 1), ("09:00", "10:00", 1), ("10:00", "11:00", 1),
               ("11:00", "12:00", 1))
    allocate(live.stub, doctor, 1, slot_time="09:00")
    allocate(live.stub, doctor, 2, slot_time="10:00")
    answer = allocate(live.stub, doctor, 3, slot_time="09:00", flexible=True)
    assert (slot_time_of(answer.token), answer.token.status) == ("11:00", pb.STATUS_CONFIRMED)
    assert answer.moved_to_later_slot is True
    assert spec_violations(live.stub, doctor) == []


def test_flexible_with_a_free_seat_in_the_asked_slot_stays_there(live):
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("09:00", "10:00", 1), ("10:00", "11:00", 1))
    answer = allocate(live.stub, doctor, 1, slot_time="09:00", flexible=True)
    assert (slot_time_of(answer.token), answer.moved_to_later_slot) == ("09:00", False)
    assert spec_violations(live.stub, doctor) == []


def test_flexible_without_a_later_free_seat_is_waitlisted_in_the_asked_slot(live):
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("08:00", "09:00", 1), ("09:00", "10:00", 1), ("10:00", "11:00", 1))
    allocate(live.stub, doctor, 1, slot_time="09:00")
    allocate(live.stub, doctor, 2, slot_time="10:00")
    answer = allocate(live.stub, doctor, 3, slot_time="09:00", flexible=True)  # 08:00 is free but earlier
    assert (slot_time_of(answer.token), answer.token.status) == ("09:00", pb.STATUS_WAITLISTED)
    assert (answer.moved_to_later_slot, answer.token.waitlist_position) == (False, 1)
    assert spec_violations(live.stub, doctor) == []


def test_a_full_slot_without_flexible_waitlists_even_when_a_later_slot_is_free(live):
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("09:00", "10:00", 1), ("10:00", "11:00", 1))
    allocate(live.stub, doctor, 1, slot_time="09:00")
    answer = allocate(live.stub, doctor, 2, slot_time="09:00")
    assert (slot_time_of(answer.token), answer.token.status) == ("09:00", pb.STATUS_WAITLISTED)
    assert answer.moved_to_later_slot is False
    assert spec_violations(live.stub, doctor) == []


def test_source_emergency_through_allocate_token_bumps_like_allocate_emergency(live):
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("09:00", "10:00", 1))
    walk_in = allocate(live.stub, doctor, 1).token
    answer = allocate(live.stub, doctor, 2, source=pb.SOURCE_EMERGENCY)
    assert (answer.token.status, answer.token.source, answer.token.priority) == (
        pb.STATUS_CONFIRMED, pb.SOURCE_EMERGENCY, 1)
    assert (answer.bumped_token.token_id, answer.bumped_token.status) == (walk_in.token_id, pb.STATUS_WAITLISTED)
    assert statuses(live.stub, doctor) == {1: "WAITLISTED", 2: "CONFIRMED"}
    assert spec_violations(live.stub, doctor) == []


@pytest.fixture
def small_waitlist(tmp_path: Path) -> Iterator[LiveServer]:
    """A server whose slots keep at most two tokens on a waitlist."""
    yield from live_server(tmp_path, MAX_WAITLIST_SIZE=2)


def test_a_full_waitlist_refuses_one_more_and_takes_no_number(small_waitlist):
    live = small_waitlist
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("09:00", "10:00", 1), ("10:00", "11:00", 1))
    for n in (1, 2, 3):
        allocate(live.stub, doctor, n, slot_time="09:00")
    error = refused(live.stub.AllocateToken, request(doctor, patient(4), slot_time="09:00"))
    assert (error.code, error.reason, error.domain) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED, "WAITLIST_FULL", "opd.v1")
    assert statuses(live.stub, doctor) == {1: "CONFIRMED", 2: "WAITLISTED", 3: "WAITLISTED"}
    other_slot = allocate(live.stub, doctor, 4, slot_time="10:00").token
    assert (other_slot.token_number, other_slot.status) == (4, pb.STATUS_CONFIRMED)
    assert spec_violations(live.stub, doctor) == []


def test_an_emergency_with_nobody_to_bump_is_waitlisted_first_even_on_a_full_waitlist(small_waitlist):
    """SPEC §5: no victim (the seat holder is an emergency), so the emergency waits first in line; the waitlist cap
    of §4 is for bookings, and triage is never turned away by it."""
    live = small_waitlist
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("09:00", "10:00", 1))
    live.stub.AllocateEmergency(pb.AllocateEmergencyRequest(patient=patient(1), doctor_id=doctor, date=DAY))
    for n in (2, 3):
        allocate(live.stub, doctor, n, slot_time="09:00")
    second = live.stub.AllocateEmergency(pb.AllocateEmergencyRequest(patient=patient(4), doctor_id=doctor,
                                                                     date=DAY)).token
    assert (second.status, second.waitlist_position) == (pb.STATUS_WAITLISTED, 1)
    error = refused(live.stub.AllocateToken, request(doctor, patient(5), slot_time="09:00"))
    assert error.reason == "WAITLIST_FULL"  # bookings still are
    assert statuses(live.stub, doctor) == {1: "CONFIRMED", 2: "WAITLISTED", 3: "WAITLISTED", 4: "WAITLISTED"}
    assert spec_violations(live.stub, doctor) == []


# ---- §3.4 token numbers -------------------------------------------------------------------------


def test_token_numbers_count_per_doctor_and_date_and_never_change(live):
    doctor, other_doctor = make_doctor(live.stub), make_doctor(live.stub, name="Dr Vikram Iyer")
    slot, _ = make_slots(live.stub, doctor, ("09:00", "10:00", 1), ("10:00", "11:00", 1))
    make_slots(live.stub, doctor, ("09:00", "10:00", 1), date=NEXT_DAY)
    make_slots(live.stub, other_doctor, ("09:00", "10:00", 1))

    assert allocate(live.stub, doctor, 1, slot_time="09:00").token.token_number == 1
    assert allocate(live.stub, doctor, 2, slot_time="09:00").token.token_number == 2     # waitlisted
    refusals = [
        refused(live.stub.AllocateToken, request(doctor, patient(1))),                   # already holds one
        refused(live.stub.AllocateToken, request(doctor, patient(3), slot_time="13:00")),  # no such slot
    ]
    assert [r.reason for r in refusals] == ["PATIENT_ALREADY_HAS_TOKEN", "SLOT_NOT_FOUND"]
    emergency = live.stub.AllocateEmergency(pb.AllocateEmergencyRequest(
        patient=patient(3), doctor_id=doctor, date=DAY, preferred_slot_time="09:00"))
    assert (emergency.token.token_number, emergency.bumped_token.token_number) == (3, 1)
    live.stub.CancelToken(pb.CancelTokenRequest(token_id=emergency.token.token_id))      # T1 promoted again
    assert allocate(live.stub, doctor, 4, slot_time="10:00").token.token_number == 4     # 3 is not reused

    tokens = all_tokens(live.stub, doctor)
    assert [(t.token_number, t.token_id) for t in tokens] == [(n, f"{doctor}-20300107-T{n}") for n in (1, 2, 3, 4)]
    assert statuses(live.stub, doctor) == {1: "CONFIRMED", 2: "WAITLISTED", 3: "CANCELLED", 4: "CONFIRMED"}
    assert waitlist_numbers(live.stub, slot.slot_id) == [2]

    next_day = allocate(live.stub, doctor, 5, date=NEXT_DAY).token
    assert (next_day.token_number, next_day.token_id) == (1, f"{doctor}-20300108-T1")
    assert allocate(live.stub, other_doctor, 5).token.token_number == 1
    assert allocate(live.stub, other_doctor, 6).token.token_number == 2
    for who, date in ((doctor, DAY), (doctor, NEXT_DAY), (other_doctor, DAY)):
        assert spec_violations(live.stub, who, date) == []


# ---- §3.5 one active token per patient, doctor and date --------------------------------------------


def test_the_same_mrn_is_the_same_patient(live):
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("09:00", "10:00", 5))
    held = live.stub.AllocateToken(request(doctor, patient(1, mrn="MRN-0042"))).token.token_id
    error = refused(live.stub.AllocateToken, request(doctor, patient(2, mrn="MRN-0042")))
    assert (error.code, error.reason, error.domain, error.metadata) == (
        grpc.StatusCode.ALREADY_EXISTS, "PATIENT_ALREADY_HAS_TOKEN", "opd.v1", {"token_id": held})
    assert statuses(live.stub, doctor) == {1: "CONFIRMED"}
    assert spec_violations(live.stub, doctor) == []


def test_the_same_phone_and_name_in_other_case_and_spacing_is_the_same_patient(live):
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("09:00", "10:00", 1))
    allocate(live.stub, doctor, 9)                                                      # holds the seat
    live.stub.AllocateToken(request(doctor, patient(1, name="Meera Nair")))            # waitlisted
    for spelling in ("meera nair", "  MEERA   Nair ", "Meera\tNAIR"):
        error = refused(live.stub.AllocateToken, request(doctor, patient(1, name=spelling),
                                                        source=pb.SOURCE_PAID_PRIORITY))
        assert (error.code, error.reason) == (grpc.StatusCode.ALREADY_EXISTS, "PATIENT_ALREADY_HAS_TOKEN")
    assert statuses(live.stub, doctor) == {1: "CONFIRMED", 2: "WAITLISTED"}
    assert spec_violations(live.stub, doctor) == []


def test_the_same_name_mrn_and_phone_typed_in_other_unicode_forms_are_the_same_patient(live):
    """Desks send one name in different Unicode forms (Zoë as "e" and a combining diaeresis; a Devanagari nukta
    letter as one character or two), an mrn in full-width letters, a phone in Devanagari digits."""
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("09:00", "10:00", 9))
    for first, again in [
            ({"name": "Zoë Fernandes", "phone": "+91 90000 77777"},
             {"name": "Zoe\u0308 Fernandes", "phone": "+91 90000 77777"}),
            ({"name": "\u095b\u093e\u0915\u093f\u0930", "phone": "+91 90000 88888"},          # zakir, ज़ one letter
             {"name": "\u091c\u093c\u093e\u0915\u093f\u0930", "phone": "+91 90000 88888"}),  # ज and a nukta
            ({"name": "Asha Rao", "phone": "+91 90000 99999"},
             {"name": "Asha Rao", "phone": "+९१ ९०००० ९९९९९"}),
            ({"name": "Ravi K", "phone": "1", "mrn": "MRN-77"},
             {"name": "R K", "phone": "2", "mrn": "ＭＲＮ－７７"})]:
        live.stub.AllocateToken(request(doctor, patient(1, **first)))
        error = refused(live.stub.AllocateToken, request(doctor, patient(1, **again)))
        assert (error.code, error.reason) == (grpc.StatusCode.ALREADY_EXISTS, "PATIENT_ALREADY_HAS_TOKEN"), again
    assert statuses(live.stub, doctor) == {1: "CONFIRMED", 2: "CONFIRMED", 3: "CONFIRMED", 4: "CONFIRMED"}


def test_one_phone_with_or_without_its_country_code_or_trunk_zero_is_the_same_phone(live):
    """The portal sends +91 98765 43210, one desk types 98765 43210 and another 098765 43210: one patient, who
    had held three tokens of one doctor-day (a reviewer's find). A shorter number is compared whole."""
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("09:00", "10:00", 9))
    live.stub.AllocateToken(request(doctor, patient(1, name="Ravi Kumar", phone="9876543210")))
    for typed in ("+919876543210", "09876543210", "+91 (0) 98765-43210", "0091 98765 43210"):
        error = refused(live.stub.AllocateToken, request(doctor, patient(1, name="Ravi Kumar", phone=typed)))
        assert (error.code, error.reason) == (grpc.StatusCode.ALREADY_EXISTS, "PATIENT_ALREADY_HAS_TOKEN"), typed
    live.stub.AllocateToken(request(doctor, patient(2, name="Ravi Kumar", phone="+91 98765 43211")))  # another phone
    live.stub.AllocateToken(request(doctor, patient(3, name="Sita Das", phone="2345678")))           # a short one
    live.stub.AllocateToken(request(doctor, patient(4, name="Sita Das", phone="12345678")))          # not the same
    assert statuses(live.stub, doctor) == {1: "CONFIRMED", 2: "CONFIRMED", 3: "CONFIRMED", 4: "CONFIRMED"}
    assert spec_violations(live.stub, doctor) == []


def test_phone_and_name_decide_where_either_request_has_no_mrn(live):
    """SPEC §1: the same mrn, or, without one, the same phone and name. A desk that books Ravi without his record
    number, after the portal booked him with it, books the same person; two record numbers are two people, even
    a father and son of one name and one phone."""
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("09:00", "10:00", 5))
    ravi = {"name": "Ravi Kumar", "phone": "+91-98450-11111"}
    live.stub.AllocateToken(request(doctor, patient(1, **ravi, mrn="MRN-0042")))
    error = refused(live.stub.AllocateToken, request(doctor, patient(1, name="ravi  KUMAR", phone="+91 98450 11111")))
    assert (error.code, error.reason) == (grpc.StatusCode.ALREADY_EXISTS, "PATIENT_ALREADY_HAS_TOKEN")
    live.stub.AllocateToken(request(doctor, patient(1, **ravi, mrn="MRN-0043")))         # his son
    meera = {"name": "Meera Nair", "phone": "+91-98450-22222"}
    live.stub.AllocateToken(request(doctor, patient(2, **meera)))
    error = refused(live.stub.AllocateToken, request(doctor, patient(2, **meera, mrn="MRN-0077")))
    assert (error.code, error.reason) == (grpc.StatusCode.ALREADY_EXISTS, "PATIENT_ALREADY_HAS_TOKEN")
    assert statuses(live.stub, doctor) == {1: "CONFIRMED", 2: "CONFIRMED", 3: "CONFIRMED"}
    assert spec_violations(live.stub, doctor) == []


def test_a_patient_may_book_again_once_the_first_token_is_cancelled(live):
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("09:00", "10:00", 5))
    first = allocate(live.stub, doctor, 1).token
    live.stub.CancelToken(pb.CancelTokenRequest(token_id=first.token_id))
    again = allocate(live.stub, doctor, 1).token
    assert (again.token_number, again.status) == (2, pb.STATUS_CONFIRMED)
    assert spec_violations(live.stub, doctor) == []


def test_a_patient_may_hold_tokens_with_another_doctor_and_on_another_date(live):
    doctor, other_doctor = make_doctor(live.stub), make_doctor(live.stub, name="Dr Vikram Iyer")
    make_slots(live.stub, doctor, ("09:00", "10:00", 5))
    make_slots(live.stub, doctor, ("09:00", "10:00", 5), date=NEXT_DAY)
    make_slots(live.stub, other_doctor, ("09:00", "10:00", 5))
    held = [allocate(live.stub, doctor, 1).token, allocate(live.stub, doctor, 1, date=NEXT_DAY).token,
            allocate(live.stub, other_doctor, 1).token]
    assert [t.status for t in held] == [pb.STATUS_CONFIRMED] * 3
    for who, date in ((doctor, DAY), (doctor, NEXT_DAY), (other_doctor, DAY)):
        assert spec_violations(live.stub, who, date) == []


def test_another_name_on_the_same_phone_is_another_patient(live):
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("09:00", "10:00", 5))
    mother = live.stub.AllocateToken(request(doctor, patient(1, name="Lakshmi Rao"))).token
    child = live.stub.AllocateToken(request(doctor, patient(1, name="Anika Rao", age=6))).token
    assert (mother.token_number, child.token_number, child.status) == (1, 2, pb.STATUS_CONFIRMED)
    assert spec_violations(live.stub, doctor) == []


# ---- §8 estimated times ---------------------------------------------------------------------------


def test_estimated_times_follow_serving_order_and_are_recomputed_after_every_change(live):
    """Slot 13:45 with 10-minute consultations: place p is served at 13:45 + (p − 1) × 10 min."""
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("13:45", "16:00", 4), consultation_minutes=10)
    for n, source in enumerate((pb.SOURCE_WALK_IN, pb.SOURCE_ONLINE_BOOKING, pb.SOURCE_FOLLOW_UP,
                                pb.SOURCE_PAID_PRIORITY, pb.SOURCE_WALK_IN), 1):
        allocate(live.stub, doctor, n, source=source)
    assert times(live, doctor) == {4: "13:45", 3: "13:55", 2: "14:05", 1: "14:15", 5: "wait 1"}
    assert [t.queue_position for t in all_tokens(live.stub, doctor)] == [4, 3, 2, 1, 0]

    live.stub.CheckInToken(pb.CheckInTokenRequest(token_id=f"{doctor}-20300107-T1"))
    live.stub.CallNext(pb.CallNextRequest(doctor_id=doctor, date=DAY))                # the called one goes first
    assert times(live, doctor) == {1: "13:45", 4: "13:55", 3: "14:05", 2: "14:15", 5: "wait 1"}

    emergency = live.stub.AllocateEmergency(pb.AllocateEmergencyRequest(patient=patient(6), doctor_id=doctor,
                                                                        date=DAY))
    assert emergency.bumped_token.token_number == 2
    assert times(live, doctor) == {1: "13:45", 6: "13:55", 4: "14:05", 3: "14:15", 2: "wait 1", 5: "wait 2"}

    live.stub.CancelToken(pb.CancelTokenRequest(token_id=f"{doctor}-20300107-T4"))    # T2 promoted
    assert times(live, doctor) == {1: "13:45", 6: "13:55", 3: "14:05", 2: "14:15", 4: "-", 5: "wait 1"}

    live.stub.CompleteToken(pb.CompleteTokenRequest(token_id=f"{doctor}-20300107-T1"))  # done: no longer queued
    assert times(live, doctor) == {6: "13:45", 3: "13:55", 2: "14:05", 1: "-", 4: "-", 5: "wait 1"}
    assert spec_violations(live.stub, doctor) == []


@pytest.fixture
def kolkata(tmp_path: Path) -> Iterator[LiveServer]:
    """A server in the hospital time zone Asia/Kolkata (UTC+05:30); its test clock starts at 12:30 there."""
    yield from live_server(tmp_path, TIMEZONE="Asia/Kolkata")


def test_slot_times_are_wall_clock_times_of_the_hospital_time_zone(kolkata):
    live = kolkata
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("14:30", "16:00", 5), consultation_minutes=10)
    first, second = allocate(live.stub, doctor, 1).token, allocate(live.stub, doctor, 2).token
    utc = dt.timezone.utc
    assert first.estimated_time.ToDatetime(tzinfo=utc) == dt.datetime(2030, 1, 7, 9, 0, tzinfo=utc)
    assert second.estimated_time.ToDatetime(tzinfo=utc) == dt.datetime(2030, 1, 7, 9, 10, tzinfo=utc)
    live.set_time(dt.datetime(2030, 1, 7, 10, 30, tzinfo=utc))                         # 16:00 in Kolkata
    error = refused(live.stub.AllocateToken, request(doctor, patient(3)))
    assert error.reason == "SLOT_CLOSED"
    assert spec_violations(live.stub, doctor) == []


@pytest.fixture
def london(tmp_path: Path) -> Iterator[LiveServer]:
    """A server in Europe/London, whose clocks go back from 02:00 BST to 01:00 GMT on 2030-10-27."""
    yield from live_server(tmp_path, TIMEZONE="Europe/London")


def test_estimated_times_count_real_minutes_across_a_clock_change(london):
    """A night sitting from 00:30 BST with 30-minute consultations sees its fourth patient 90 real minutes after
    its start, at 01:00 Z, not at the 02:00 Z that adding minutes to the wall clock would give (the sixth's)."""
    live = london
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("00:30", "04:00", 6), date="2030-10-27", consultation_minutes=30)
    times = [allocate(live.stub, doctor, n, date="2030-10-27").token.estimated_time.ToDatetime()
             for n in range(1, 7)]
    start = dt.datetime(2030, 10, 26, 23, 30)  # 00:30 BST, in UTC
    assert times == [start + dt.timedelta(minutes=30 * k) for k in range(6)]
