"""SPEC §9: a retried request (same request_id, same request) gets the first answer and changes nothing more;
the same request_id for another request is refused; a refused call stores nothing."""

from __future__ import annotations

import datetime as dt
import threading
from dataclasses import dataclass
from typing import Any, Callable

import grpc
import pytest

from opd_grpc._gen.opd.v1 import opd_pb2 as pb
from opd_grpc.engine.errors import Conflict
from opd_grpc.storage.store import SqlUnitOfWork
from tests.support import (
    DAY, MORNING, LiveServer, all_tokens, allocate, make_doctor, make_slots, new_request_id, patient, refused, statuses,
    spec_violations,
)


@dataclass
class Case:
    """One state-changing call: its method, a request on a prepared day, and a different request."""

    method: str
    request: Any
    other: Any


def world(live: LiveServer) -> dict[str, str]:
    """A doctor with a full 09:00 slot (2 seats: one called, one checked in) and one waitlisted token, and a
    10:00 slot with one confirmed token; the clock at 09:30, past the grace of the 09:00 slot's tokens."""
    stub = live.stub
    doctor = make_doctor(stub)
    make_slots(stub, doctor, ("09:00", "10:00", 2), ("10:00", "11:00", 3))
    called, checked_in, waitlisted = (allocate(stub, doctor, n, slot_time="09:00").token.token_id
                                      for n in (1, 2, 3))
    confirmed = allocate(stub, doctor, 4, slot_time="10:00").token.token_id
    live.set_time(MORNING.replace(hour=9, minute=30))
    for token_id in (called, checked_in):
        stub.CheckInToken(pb.CheckInTokenRequest(token_id=token_id))
    stub.CallNext(pb.CallNextRequest(doctor_id=doctor, date=DAY))
    return {"doctor": doctor, "called": called, "checked_in": checked_in, "waitlisted": waitlisted,
            "confirmed": confirmed, "slot": f"{doctor}-20300107-0900"}


def cases(w: dict[str, str]) -> dict[str, Case]:
    doctor = w["doctor"]
    later = "2030-01-08"
    return {c.method: c for c in [
        Case("CreateDoctor", pb.CreateDoctorRequest(name="Dr Meena Iyer", specialization="ENT"),
             pb.CreateDoctorRequest(name="Dr Meena Iyer", specialization="Dermatology")),
        Case("CreateSlots",
             pb.CreateSlotsRequest(doctor_id=doctor, slots=[pb.SlotSpec(date=later, start_time="09:00",
                                                                        end_time="10:00", max_capacity=4)]),
             pb.CreateSlotsRequest(doctor_id=doctor, slots=[pb.SlotSpec(date=later, start_time="10:00",
                                                                        end_time="11:00", max_capacity=4)])),
        Case("UpdateSlotCapacity", pb.UpdateSlotCapacityRequest(slot_id=w["slot"], max_capacity=3),
             pb.UpdateSlotCapacityRequest(slot_id=w["slot"], max_capacity=4)),
        Case("AllocateToken",
             pb.AllocateTokenRequest(patient=patient(20), doctor_id=doctor, date=DAY, preferred_slot_time="09:00",
                                     source=pb.SOURCE_FOLLOW_UP),
             pb.AllocateTokenRequest(patient=patient(21), doctor_id=doctor, date=DAY, preferred_slot_time="09:00",
                                     source=pb.SOURCE_FOLLOW_UP)),
        Case("AllocateEmergency",
             pb.AllocateEmergencyRequest(patient=patient(30), doctor_id=doctor, date=DAY,
                                         preferred_slot_time="09:00"),
             pb.AllocateEmergencyRequest(patient=patient(30), doctor_id=doctor, date=DAY,
                                         preferred_slot_time="10:00")),
        Case("CancelToken", pb.CancelTokenRequest(token_id=w["checked_in"], reason="went home"),
             pb.CancelTokenRequest(token_id=w["checked_in"], reason="felt better")),
        Case("MarkNoShow", pb.MarkNoShowRequest(token_id=w["checked_in"]),
             pb.MarkNoShowRequest(token_id=w["called"])),
        Case("CheckInToken", pb.CheckInTokenRequest(token_id=w["confirmed"]),
             pb.CheckInTokenRequest(token_id=w["waitlisted"])),
        Case("CallNext", pb.CallNextRequest(doctor_id=doctor, date=DAY),
             pb.CallNextRequest(doctor_id=doctor, date="2030-01-08")),
        Case("CompleteToken", pb.CompleteTokenRequest(token_id=w["called"]),
             pb.CompleteTokenRequest(token_id=w["checked_in"])),
    ]}


METHODS = ["CreateDoctor", "CreateSlots", "UpdateSlotCapacity", "AllocateToken", "AllocateEmergency",
           "CancelToken", "MarkNoShow", "CheckInToken", "CallNext", "CompleteToken"]


def with_id(request: Any, request_id: str) -> Any:
    copy = type(request)()
    copy.CopyFrom(request)
    copy.request_id = request_id
    return copy


def snapshot(live: LiveServer, doctor: str) -> bytes:
    """Everything a client can see of the world: doctors, every slot, the day's tokens and waitlists."""
    stub = live.stub
    parts = [stub.ListDoctors(pb.ListDoctorsRequest(page_size=1000)),
             stub.ListSlots(pb.ListSlotsRequest(doctor_id=doctor, page_size=1000))]
    parts += all_tokens(stub, doctor) + all_tokens(stub, doctor, "2030-01-08")
    parts += [stub.GetSlotStatus(pb.GetSlotStatusRequest(slot_id=s.slot_id)) for s in parts[1].slots]
    return b"".join(p.SerializeToString(deterministic=True) for p in parts)


@pytest.mark.parametrize("method", METHODS)
def test_a_retry_answers_the_first_answer_and_changes_nothing_more(live, method):
    w = world(live)
    case = cases(w)[method]
    call: Callable[[Any], Any] = getattr(live.stub, method)
    request = with_id(case.request, new_request_id())
    first = call(request)
    after_first = snapshot(live, w["doctor"])
    live.set_time(MORNING.replace(hour=9, minute=45))  # a re-run would stamp other times
    again = call(request)
    assert again.SerializeToString(deterministic=True) == first.SerializeToString(deterministic=True)
    assert snapshot(live, w["doctor"]) == after_first
    assert spec_violations(live.stub, w["doctor"]) == []


@pytest.mark.parametrize("method", METHODS)
def test_the_same_request_id_for_another_request_is_refused_and_changes_nothing(live, method):
    w = world(live)
    case = cases(w)[method]
    call = getattr(live.stub, method)
    request_id = new_request_id()
    call(with_id(case.request, request_id))
    before = snapshot(live, w["doctor"])
    failure = refused(call, with_id(case.other, request_id))
    assert failure.code == grpc.StatusCode.FAILED_PRECONDITION
    assert (failure.reason, failure.domain) == ("REQUEST_ID_REUSED", "opd.v1")
    assert request_id in failure.message
    assert snapshot(live, w["doctor"]) == before


def test_a_request_id_used_by_another_method_is_refused(live):
    w = world(live)
    request_id = new_request_id()
    live.stub.CheckInToken(pb.CheckInTokenRequest(token_id=w["confirmed"], request_id=request_id))
    before = snapshot(live, w["doctor"])
    failure = refused(live.stub.CancelToken, pb.CancelTokenRequest(token_id=w["confirmed"], request_id=request_id))
    assert (failure.code, failure.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "REQUEST_ID_REUSED")
    assert snapshot(live, w["doctor"]) == before


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bad_id", ["not-a-uuid", "12345", "0f8fad5b-d9cb-469f-a165-70867728950"])
def test_a_request_id_that_is_not_a_uuid_is_invalid(live, method, bad_id):
    w = world(live)
    before = snapshot(live, w["doctor"])
    failure = refused(getattr(live.stub, method), with_id(cases(w)[method].request, bad_id))
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "request_id" in failure.fields
    assert failure.domain == "opd.v1"
    assert snapshot(live, w["doctor"]) == before


def test_a_retried_call_answers_the_first_answer_even_after_the_token_moved_on(live):
    w = world(live)
    request = pb.CheckInTokenRequest(token_id=w["confirmed"], request_id=new_request_id())
    first = live.stub.CheckInToken(request)
    live.stub.CallNext(pb.CallNextRequest(doctor_id=w["doctor"], date=DAY))  # completes "called", calls one
    live.stub.CallNext(pb.CallNextRequest(doctor_id=w["doctor"], date=DAY))  # ... and then "confirmed"
    again = live.stub.CheckInToken(request)
    assert again == first
    assert again.token.status == pb.STATUS_CHECKED_IN
    current = live.stub.GetToken(pb.GetTokenRequest(token_id=w["confirmed"])).token
    assert current.status == pb.STATUS_CALLED


def test_twenty_copies_of_one_allocation_at_once_create_one_token(live):
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("09:00", "10:00", 5))
    request = pb.AllocateTokenRequest(patient=patient(1), doctor_id=doctor, date=DAY, source=pb.SOURCE_WALK_IN,
                                      request_id=new_request_id())
    copies = 20
    start = threading.Barrier(copies)
    answers: list[bytes] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def send() -> None:
        start.wait()
        try:
            answer = live.stub.AllocateToken(request).SerializeToString(deterministic=True)
            with lock:
                answers.append(answer)
        except grpc.RpcError as error:
            with lock:
                errors.append(error)

    threads = [threading.Thread(target=send) for _ in range(copies)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    assert len(answers) == copies and len(set(answers)) == 1
    tokens = all_tokens(live.stub, doctor)
    assert [t.token_number for t in tokens] == [1]
    assert pb.AllocateTokenResponse.FromString(answers[0]).token.token_id == tokens[0].token_id


def test_one_request_id_sent_at_once_for_different_requests_succeeds_once(live):
    """Copies of one request_id racing on different doctor-days: one wins, the others are told it is taken."""
    doctors = [make_doctor(live.stub, f"Dr {n}") for n in range(8)]
    for doctor in doctors:
        make_slots(live.stub, doctor, ("09:00", "10:00", 5))
    request_id = new_request_id()
    start = threading.Barrier(len(doctors))
    outcomes: list[str] = []
    lock = threading.Lock()

    def send(doctor: str) -> None:
        start.wait()
        try:
            allocate(live.stub, doctor, 1, request_id=request_id)
            outcome = "OK"
        except grpc.RpcError as error:
            outcome = f"{error.code().name}"
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=send, args=(d,)) for d in doctors]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(outcomes) == ["FAILED_PRECONDITION"] * (len(doctors) - 1) + ["OK"]
    assert sum(len(all_tokens(live.stub, d)) for d in doctors) == 1


def test_a_refused_check_in_is_replayed_as_refused_even_once_the_state_allows(live):
    """SPEC §9: the refusal is the first answer; a copy arriving after the state changed must not check in."""
    w = world(live)
    request = pb.CheckInTokenRequest(token_id=w["waitlisted"], request_id=new_request_id())
    first = refused(live.stub.CheckInToken, request)
    assert first.reason == "ILLEGAL_STATE_TRANSITION"
    promoted = live.stub.CancelToken(pb.CancelTokenRequest(token_id=w["checked_in"])).promoted
    assert [t.token_id for t in promoted] == [w["waitlisted"]]
    assert refused(live.stub.CheckInToken, request) == first
    assert statuses(live.stub, w["doctor"])[int(w["waitlisted"].rsplit("T", 1)[1])] == "CONFIRMED"
    request.request_id = new_request_id()  # a new attempt is a new request
    assert live.stub.CheckInToken(request).token.status == pb.STATUS_CHECKED_IN


def test_a_refused_allocation_takes_no_number_and_its_copy_books_nothing(live):
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("09:00", "10:00", 5))
    held = allocate(live.stub, doctor, 1).token
    request = pb.AllocateTokenRequest(patient=patient(1), doctor_id=doctor, date=DAY, source=pb.SOURCE_WALK_IN,
                                      request_id=new_request_id())
    assert refused(live.stub.AllocateToken, request).reason == "PATIENT_ALREADY_HAS_TOKEN"
    live.stub.CancelToken(pb.CancelTokenRequest(token_id=held.token_id))
    assert refused(live.stub.AllocateToken, request).reason == "PATIENT_ALREADY_HAS_TOKEN"
    assert len(all_tokens(live.stub, doctor)) == 1
    request.request_id = new_request_id()
    retried = live.stub.AllocateToken(request).token
    assert (retried.token_number, retried.status) == (2, pb.STATUS_CONFIRMED)
    assert live.stub.AllocateToken(request).token == retried


def test_a_day_or_doctor_not_found_is_a_first_answer_too(live):
    """SPEC §9: an allocation and a CallNext refused because the day had no slots (nobody could be waiting), and
    slots refused because the doctor did not exist, stay refused when their copies arrive after the slots or the
    doctor were made."""
    doctor = make_doctor(live.stub)
    allocation = pb.AllocateTokenRequest(patient=patient(1), doctor_id=doctor, date=DAY, source=pb.SOURCE_WALK_IN,
                                         request_id=new_request_id())
    call_next = pb.CallNextRequest(doctor_id=doctor, date=DAY, request_id=new_request_id())
    assert refused(live.stub.AllocateToken, allocation).reason == "SLOT_NOT_FOUND"
    assert refused(live.stub.CallNext, call_next).reason == "QUEUE_EMPTY"
    make_slots(live.stub, doctor, ("09:00", "10:00", 5))
    live.stub.CheckInToken(pb.CheckInTokenRequest(token_id=allocate(live.stub, doctor, 2).token.token_id))
    assert refused(live.stub.AllocateToken, allocation).reason == "SLOT_NOT_FOUND"
    assert refused(live.stub.CallNext, call_next).reason == "QUEUE_EMPTY"
    assert statuses(live.stub, doctor) == {1: "CHECKED_IN"}
    slots = pb.CreateSlotsRequest(doctor_id="DOC002", request_id=new_request_id(), slots=[
        pb.SlotSpec(date=DAY, start_time="09:00", end_time="10:00")])
    assert refused(live.stub.CreateSlots, slots).reason == "DOCTOR_NOT_FOUND"
    assert make_doctor(live.stub) == "DOC002"
    assert refused(live.stub.CreateSlots, slots).reason == "DOCTOR_NOT_FOUND"
    assert list(live.stub.ListSlots(pb.ListSlotsRequest(doctor_id="DOC002", date=DAY)).slots) == []


def test_a_no_show_refused_for_the_grace_period_needs_a_new_request_id_once_it_has_passed(live):
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("09:00", "10:00", 5))
    token_id = allocate(live.stub, doctor, 1).token.token_id
    request = pb.MarkNoShowRequest(token_id=token_id, request_id=new_request_id())
    live.set_time(MORNING.replace(hour=9, minute=10))
    assert refused(live.stub.MarkNoShow, request).reason == "GRACE_PERIOD_NOT_ELAPSED"
    live.set_time(MORNING.replace(hour=9, minute=15))
    assert refused(live.stub.MarkNoShow, request).reason == "GRACE_PERIOD_NOT_ELAPSED"
    request.request_id = new_request_id()
    assert live.stub.MarkNoShow(request).token.status == pb.STATUS_NO_SHOW


def test_a_change_run_again_after_a_lost_race_answers_and_stores_what_it_committed(
        live: LiveServer, monkeypatch: pytest.MonkeyPatch):
    """The engine runs a use case again when its unit of work lost a race (a replica's connection cut mid-way:
    the stress test's backend faults). The reply rendered by the failed attempt must not be the one stored and
    answered: here the first attempt is refused at its audit row after the clock moved, so the two attempts'
    tokens differ in their queue time, and the answer must be the committed one's."""
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("09:00", "10:00", 5))
    audited = SqlUnitOfWork.add_audit_entry
    lost: list[object] = []

    def lose_the_first_race(uow: SqlUnitOfWork, entry: object) -> None:
        if not lost:
            lost.append(entry)
            live.server.clock.advance(dt.timedelta(minutes=5))
            raise Conflict("could not serialize access due to concurrent update")
        audited(uow, entry)

    monkeypatch.setattr(SqlUnitOfWork, "add_audit_entry", lose_the_first_race)
    request_id = new_request_id()
    answer = allocate(live.stub, doctor, 1, request_id=request_id).token
    again = allocate(live.stub, doctor, 1, request_id=request_id).token

    booked = live.stub.GetToken(pb.GetTokenRequest(token_id=answer.token_id)).token
    assert lost  # the first attempt did lose its race
    assert answer.created_at == booked.created_at  # 07:05, not the failed attempt's 07:00
    assert again == answer  # and the stored answer is that one too


def test_one_uuid_is_one_request_id_however_it_is_written(live):
    """SPEC §9: a request_id is a UUID, and a UUID in capitals or without its hyphens is the same UUID: a retry
    written so gets the first answer, not a second doctor or a PATIENT_ALREADY_HAS_TOKEN."""
    request_id = new_request_id()
    spellings = (request_id, request_id.upper(), request_id.replace("-", ""))
    doctors = {live.stub.CreateDoctor(pb.CreateDoctorRequest(name="Dr Asha Rao", specialization="General Medicine",
                                                             request_id=r)).doctor.doctor_id for r in spellings}
    assert len(doctors) == 1
    (doctor,) = doctors
    make_slots(live.stub, doctor, ("09:00", "10:00", 5))
    booking = new_request_id().upper()
    answers = [allocate(live.stub, doctor, 1, request_id=r).token for r in (booking, booking.lower())]
    assert answers[0] == answers[1]
    assert len(all_tokens(live.stub, doctor)) == 1
