"""SPEC §6 through the real server: a freed seat goes to the waitlist head in the same call; capacity cuts
never take a seat away."""

from __future__ import annotations

import grpc

from opd_grpc._gen.opd.v1 import opd_pb2 as pb
from tests.support import (
    DAY, LiveServer, allocate, at, make_doctor, make_slots, refused, spec_violations, statuses, waitlist_numbers,
)


def token_id(doctor: str, number: int) -> str:
    return f"{doctor}-20300107-T{number}"


def capacity(live: LiveServer, slot_id: str, seats: int) -> pb.UpdateSlotCapacityResponse:
    return live.stub.UpdateSlotCapacity(pb.UpdateSlotCapacityRequest(slot_id=slot_id, max_capacity=seats))


def test_cancelling_a_seat_holder_promotes_the_waitlist_head(live):
    doctor = make_doctor(live.stub)
    (slot,) = make_slots(live.stub, doctor, ("09:00", "10:00", 1))
    allocate(live.stub, doctor, 1)
    allocate(live.stub, doctor, 2)
    allocate(live.stub, doctor, 3, source=pb.SOURCE_PAID_PRIORITY)
    answer = live.stub.CancelToken(pb.CancelTokenRequest(token_id=token_id(doctor, 1)))
    assert answer.token.status == pb.STATUS_CANCELLED
    assert [(t.token_number, t.status, t.queue_position) for t in answer.promoted] == [(3, pb.STATUS_CONFIRMED, 1)]
    assert waitlist_numbers(live.stub, slot.slot_id) == [2]
    assert spec_violations(live.stub, doctor) == []


def test_cancelling_a_waitlisted_token_promotes_nobody(live):
    doctor = make_doctor(live.stub)
    (slot,) = make_slots(live.stub, doctor, ("09:00", "10:00", 1))
    for n in (1, 2, 3):
        allocate(live.stub, doctor, n)
    answer = live.stub.CancelToken(pb.CancelTokenRequest(token_id=token_id(doctor, 2)))
    assert list(answer.promoted) == []
    status = live.stub.GetSlotStatus(pb.GetSlotStatusRequest(slot_id=slot.slot_id))
    assert [(t.token_number, t.waitlist_position) for t in status.waitlist] == [(3, 1)]
    assert statuses(live.stub, doctor) == {1: "CONFIRMED", 2: "CANCELLED", 3: "WAITLISTED"}
    assert spec_violations(live.stub, doctor) == []


def test_a_no_show_after_the_grace_period_promotes_the_waitlist_head(live):
    """T2's estimated time is 09:05 (second of two seats), so it may be marked no-show from 09:20."""
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("09:00", "10:00", 2))
    for n in (1, 2, 3):
        allocate(live.stub, doctor, n)
    live.set_time(at("09:19"))
    error = refused(live.stub.MarkNoShow, pb.MarkNoShowRequest(token_id=token_id(doctor, 2)))
    assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "GRACE_PERIOD_NOT_ELAPSED")
    assert statuses(live.stub, doctor) == {1: "CONFIRMED", 2: "CONFIRMED", 3: "WAITLISTED"}

    live.set_time(at("09:20"))
    answer = live.stub.MarkNoShow(pb.MarkNoShowRequest(token_id=token_id(doctor, 2)))
    assert answer.token.status == pb.STATUS_NO_SHOW
    assert [(t.token_number, t.status) for t in answer.promoted] == [(3, pb.STATUS_CONFIRMED)]
    assert statuses(live.stub, doctor) == {1: "CONFIRMED", 2: "NO_SHOW", 3: "CONFIRMED"}
    assert spec_violations(live.stub, doctor) == []


def test_raising_capacity_promotes_several_in_waitlist_order(live):
    doctor = make_doctor(live.stub)
    (slot,) = make_slots(live.stub, doctor, ("09:00", "10:00", 1))
    allocate(live.stub, doctor, 1)
    for n, source in ((2, pb.SOURCE_WALK_IN), (3, pb.SOURCE_ONLINE_BOOKING), (4, pb.SOURCE_PAID_PRIORITY),
                      (5, pb.SOURCE_FOLLOW_UP)):
        allocate(live.stub, doctor, n, source=source)

    answer = capacity(live, slot.slot_id, 3)
    assert answer.slot.max_capacity == 3
    assert [(t.token_number, t.status) for t in answer.promoted] == [(4, pb.STATUS_CONFIRMED),
                                                                    (5, pb.STATUS_CONFIRMED)]
    assert waitlist_numbers(live.stub, slot.slot_id) == [3, 2]
    assert spec_violations(live.stub, doctor) == []

    answer = capacity(live, slot.slot_id, 10)                          # more seats than waiting patients
    assert [t.token_number for t in answer.promoted] == [3, 2]
    status = live.stub.GetSlotStatus(pb.GetSlotStatusRequest(slot_id=slot.slot_id))
    assert (status.max_capacity, status.seat_holders, status.free_seats, len(status.waitlist)) == (10, 5, 5, 0)
    assert spec_violations(live.stub, doctor) == []


def test_capacity_cannot_go_below_the_seat_holders_and_a_refusal_changes_nothing(live):
    """Completed and called patients hold seats too."""
    doctor = make_doctor(live.stub)
    (slot,) = make_slots(live.stub, doctor, ("09:00", "10:00", 3))
    for n in (1, 2, 3, 4):
        allocate(live.stub, doctor, n)
    live.stub.CheckInToken(pb.CheckInTokenRequest(token_id=token_id(doctor, 1)))
    live.stub.CallNext(pb.CallNextRequest(doctor_id=doctor, date=DAY))
    live.stub.CompleteToken(pb.CompleteTokenRequest(token_id=token_id(doctor, 1)))
    before = statuses(live.stub, doctor)
    assert before == {1: "COMPLETED", 2: "CONFIRMED", 3: "CONFIRMED", 4: "WAITLISTED"}

    error = refused(live.stub.UpdateSlotCapacity, pb.UpdateSlotCapacityRequest(slot_id=slot.slot_id, max_capacity=2))
    assert (error.code, error.reason, error.domain) == (
        grpc.StatusCode.FAILED_PRECONDITION, "CAPACITY_BELOW_SEAT_HOLDERS", "opd.v1")
    assert error.message.endswith("cannot go below 3 (asked 2): cancel tokens not yet called first (the 1 seen or "
                                  "with the doctor keeps its seat)."), error.message
    status = live.stub.GetSlotStatus(pb.GetSlotStatusRequest(slot_id=slot.slot_id))
    assert (status.max_capacity, status.seat_holders) == (3, 3)
    assert statuses(live.stub, doctor) == before
    assert spec_violations(live.stub, doctor) == []


def test_lowering_capacity_to_exactly_the_seat_holders_is_allowed(live):
    doctor = make_doctor(live.stub)
    (slot,) = make_slots(live.stub, doctor, ("09:00", "10:00", 5))
    for n in (1, 2, 3):
        allocate(live.stub, doctor, n)
    answer = capacity(live, slot.slot_id, 3)
    assert (answer.slot.max_capacity, list(answer.promoted)) == (3, [])
    status = live.stub.GetSlotStatus(pb.GetSlotStatusRequest(slot_id=slot.slot_id))
    assert (status.max_capacity, status.seat_holders, status.free_seats) == (3, 3, 0)
    assert allocate(live.stub, doctor, 4).token.status == pb.STATUS_WAITLISTED
    assert statuses(live.stub, doctor) == {1: "CONFIRMED", 2: "CONFIRMED", 3: "CONFIRMED", 4: "WAITLISTED"}
    assert spec_violations(live.stub, doctor) == []


def test_a_capacity_left_out_is_said_to_be_required(live):
    doctor = make_doctor(live.stub)
    (slot,) = make_slots(live.stub, doctor, ("09:00", "10:00", 2))
    error = refused(live.stub.UpdateSlotCapacity, pb.UpdateSlotCapacityRequest(slot_id=slot.slot_id))
    assert (error.code, list(error.fields)) == (grpc.StatusCode.INVALID_ARGUMENT, ["max_capacity"])
    assert error.fields["max_capacity"].startswith("is 0 or left out: give a number of seats from 1 to ")
