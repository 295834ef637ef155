"""SPEC §5 through the real server: an emergency takes a seat, bumping the worst-placed seat holder if need be."""

from __future__ import annotations

from typing import Any

from opd_grpc._gen.opd.v1 import opd_pb2 as pb
from tests.support import (
    DAY, LiveServer, allocate, at, make_doctor, make_slots, patient, spec_violations, statuses, waitlist_numbers,
)


def emergency(live: LiveServer, doctor: str, n: int, **kw: Any) -> pb.AllocateEmergencyResponse:
    return live.stub.AllocateEmergency(pb.AllocateEmergencyRequest(patient=patient(n), doctor_id=doctor, date=DAY,
                                                                   **kw))


def token_id(doctor: str, number: int) -> str:
    return f"{doctor}-20300107-T{number}"


def call(live: LiveServer, doctor: str, number: int) -> None:
    """Checks a patient in and has the doctor call them (they must be the best checked-in one)."""
    live.stub.CheckInToken(pb.CheckInTokenRequest(token_id=token_id(doctor, number)))
    called = live.stub.CallNext(pb.CallNextRequest(doctor_id=doctor, date=DAY)).token
    assert called.token_number == number


def test_an_emergency_with_a_free_seat_is_confirmed_and_bumps_nobody(live):
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("09:00", "10:00", 2))
    allocate(live.stub, doctor, 1)
    answer = emergency(live, doctor, 2)
    assert (answer.token.status, answer.token.source, answer.token.priority) == (
        pb.STATUS_CONFIRMED, pb.SOURCE_EMERGENCY, 1)
    assert answer.HasField("bumped_token") is False
    assert statuses(live.stub, doctor) == {1: "CONFIRMED", 2: "CONFIRMED"}
    assert spec_violations(live.stub, doctor) == []


def test_the_victim_is_the_lowest_priority_seat_holder_with_the_latest_queue_time(live):
    doctor = make_doctor(live.stub)
    (slot,) = make_slots(live.stub, doctor, ("09:00", "10:00", 4))
    allocate(live.stub, doctor, 1, source=pb.SOURCE_PAID_PRIORITY)   # T1 07:00
    live.set_time(at("07:10"))
    allocate(live.stub, doctor, 2)                                   # T2 walk-in 07:10: the latest walk-in
    live.set_time(at("07:05"))
    allocate(live.stub, doctor, 3)                                   # T3 walk-in 07:05, a higher number
    allocate(live.stub, doctor, 4, source=pb.SOURCE_FOLLOW_UP)       # T4
    answer = emergency(live, doctor, 5)
    assert answer.token.status == pb.STATUS_CONFIRMED
    bumped = answer.bumped_token
    assert (bumped.token_number, bumped.status, bumped.waitlist_position) == (2, pb.STATUS_WAITLISTED, 1)
    assert statuses(live.stub, doctor) == {1: "CONFIRMED", 2: "WAITLISTED", 3: "CONFIRMED", 4: "CONFIRMED",
                                           5: "CONFIRMED"}
    assert waitlist_numbers(live.stub, slot.slot_id) == [2]
    assert spec_violations(live.stub, doctor) == []


def test_among_equal_queue_times_the_higher_token_number_is_bumped(live):
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("09:00", "10:00", 2))
    allocate(live.stub, doctor, 1)
    allocate(live.stub, doctor, 2)
    assert emergency(live, doctor, 3).bumped_token.token_number == 2
    assert spec_violations(live.stub, doctor) == []


def test_a_checked_in_patient_can_be_bumped(live):
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("09:00", "10:00", 2))
    allocate(live.stub, doctor, 1)
    allocate(live.stub, doctor, 2, source=pb.SOURCE_PAID_PRIORITY)
    live.stub.CheckInToken(pb.CheckInTokenRequest(token_id=token_id(doctor, 1)))
    answer = emergency(live, doctor, 3)
    assert (answer.bumped_token.token_number, answer.bumped_token.status) == (1, pb.STATUS_WAITLISTED)
    assert spec_violations(live.stub, doctor) == []


def test_called_and_completed_patients_are_never_bumped(live):
    doctor = make_doctor(live.stub)
    (slot,) = make_slots(live.stub, doctor, ("09:00", "10:00", 3))
    allocate(live.stub, doctor, 1)                                     # walk-in: will be completed
    allocate(live.stub, doctor, 2)                                     # walk-in: will be called
    allocate(live.stub, doctor, 3, source=pb.SOURCE_PAID_PRIORITY)
    call(live, doctor, 1)
    call(live, doctor, 2)                                              # completes T1, calls T2
    answer = emergency(live, doctor, 4)
    assert answer.bumped_token.token_number == 3                       # the only CONFIRMED/CHECKED_IN one
    assert statuses(live.stub, doctor) == {1: "COMPLETED", 2: "CALLED", 3: "WAITLISTED", 4: "CONFIRMED"}

    late = emergency(live, doctor, 5)                                  # nobody left to bump
    assert (late.token.status, late.token.waitlist_position, late.HasField("bumped_token")) == (
        pb.STATUS_WAITLISTED, 1, False)
    assert waitlist_numbers(live.stub, slot.slot_id) == [5, 3]
    assert spec_violations(live.stub, doctor) == []


def test_an_emergency_is_never_bumped_and_when_all_seats_are_emergencies_it_waits_first_in_line(live):
    doctor = make_doctor(live.stub)
    (slot,) = make_slots(live.stub, doctor, ("09:00", "10:00", 2))
    emergency(live, doctor, 1)
    allocate(live.stub, doctor, 2)
    live.set_time(at("07:05"))
    allocate(live.stub, doctor, 3, source=pb.SOURCE_PAID_PRIORITY)      # waitlisted
    second = emergency(live, doctor, 4)
    assert second.bumped_token.token_number == 2                        # the walk-in, not emergency T1
    third = emergency(live, doctor, 5)
    assert (third.token.status, third.token.waitlist_position) == (pb.STATUS_WAITLISTED, 1)
    assert third.HasField("bumped_token") is False
    assert waitlist_numbers(live.stub, slot.slot_id) == [5, 3, 2]
    assert statuses(live.stub, doctor) == {1: "CONFIRMED", 2: "WAITLISTED", 3: "WAITLISTED", 4: "CONFIRMED",
                                           5: "WAITLISTED"}
    assert spec_violations(live.stub, doctor) == []


def test_the_victim_keeps_its_place_and_is_promoted_first_of_its_class(live):
    doctor = make_doctor(live.stub)
    (slot,) = make_slots(live.stub, doctor, ("09:00", "10:00", 2))
    allocate(live.stub, doctor, 1)                                      # T1 walk-in 07:00
    live.set_time(at("07:05"))
    before = allocate(live.stub, doctor, 2).token                       # T2 walk-in 07:05
    live.set_time(at("07:10"))
    allocate(live.stub, doctor, 3)                                      # T3 walk-in 07:10, waitlisted
    live.set_time(at("07:15"))
    allocate(live.stub, doctor, 4, source=pb.SOURCE_ONLINE_BOOKING)     # T4 online, waitlisted
    live.set_time(at("07:20"))
    bumped = emergency(live, doctor, 5).bumped_token
    assert bumped.token_number == 2
    assert (bumped.priority, bumped.created_at) == (before.priority, before.created_at)
    assert waitlist_numbers(live.stub, slot.slot_id) == [4, 2, 3]

    first = live.stub.CancelToken(pb.CancelTokenRequest(token_id=token_id(doctor, 1))).promoted
    second = live.stub.CancelToken(pb.CancelTokenRequest(token_id=token_id(doctor, 5))).promoted
    assert [t.token_number for t in (*first, *second)] == [4, 2]
    assert statuses(live.stub, doctor) == {1: "CANCELLED", 2: "CONFIRMED", 3: "WAITLISTED", 4: "CONFIRMED",
                                           5: "CANCELLED"}
    assert spec_violations(live.stub, doctor) == []


def test_the_audit_log_of_a_bumped_token_holds_its_every_move(live):
    """SPEC §13: a bump and the promotion after it are changes to the victim's token too, so a search of the audit
    log by its id finds them, each under the call that caused it."""
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("09:00", "10:00", 1))
    victim = allocate(live.stub, doctor, 1).token.token_id
    rescue = emergency(live, doctor, 2, request_id="8c1f0a55-4a52-4a8e-9a53-0d1f8a2b7c11").token.token_id
    live.stub.CancelToken(pb.CancelTokenRequest(token_id=rescue))
    moves = [(e.method, e.request_id, pb.Status.Name(e.from_status), pb.Status.Name(e.to_status), e.reason)
             for e in live.stub.ListAuditEntries(pb.ListAuditEntriesRequest(token_id=victim)).entries]
    assert moves == [
        ("AllocateToken", "", "STATUS_UNSPECIFIED", "STATUS_CONFIRMED", ""),
        ("AllocateEmergency", "8c1f0a55-4a52-4a8e-9a53-0d1f8a2b7c11", "STATUS_CONFIRMED", "STATUS_WAITLISTED",
         f"BUMPED by {rescue}"),
        ("CancelToken", "", "STATUS_WAITLISTED", "STATUS_CONFIRMED", f"PROMOTED by {rescue}"),
    ]
