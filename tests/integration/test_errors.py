"""SPEC §11–12 through the API: every method refuses bad input with the right code and a rich status (ErrorInfo
domain `opd.v1`, an UPPER_SNAKE reason, BadRequest naming the field), never INTERNAL or UNKNOWN, and a refused
call changes nothing. Also the reads: pages, doctors, stats, health, reflection and the test clock's absence."""

from __future__ import annotations

import asyncio
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from opd_grpc._gen.opd.v1 import opd_pb2 as pb
from opd_grpc._gen.opd.v1 import opd_pb2_grpc, test_clock_pb2, test_clock_pb2_grpc
from opd_grpc.engine.service import MAX_CREATE_SLOTS
from opd_grpc.server import OPDServer
from opd_grpc.settings import Settings
from tests.support import (
    DAY, MORNING, LiveServer, all_tokens, allocate, failure, make_doctor, make_slots, patient, refused,
)

NEXT_DAY = "2030-01-08"
UPPER_SNAKE = re.compile(r"^[A-Z][A-Z0-9]*(_[A-Z0-9]+)*$")
INVALID, NOT_FOUND, EXISTS = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                              grpc.StatusCode.ALREADY_EXISTS)


@dataclass(frozen=True)
class Case:
    """A request that must be refused with `code`; for INVALID_ARGUMENT, BadRequest must name `field`."""

    name: str
    method: str
    request: Callable[[], Any]
    code: grpc.StatusCode
    field: str = ""


def spec(**fields: Any) -> pb.SlotSpec:
    values: dict[str, Any] = {"date": DAY, "start_time": "11:00", "end_time": "12:00", "max_capacity": 2}
    values.update(fields)
    return pb.SlotSpec(**values)


def new_slots(*specs: pb.SlotSpec, doctor_id: str = "DOC001") -> pb.CreateSlotsRequest:
    return pb.CreateSlotsRequest(doctor_id=doctor_id, slots=list(specs))


def allocation(**fields: Any) -> pb.AllocateTokenRequest:
    values: dict[str, Any] = {"patient": patient(9), "doctor_id": "DOC001", "date": DAY,
                              "source": pb.SOURCE_WALK_IN}
    values.update(fields)
    return pb.AllocateTokenRequest(**values)


def emergency(**fields: Any) -> pb.AllocateEmergencyRequest:
    values: dict[str, Any] = {"patient": patient(9), "doctor_id": "DOC001", "date": DAY}
    values.update(fields)
    return pb.AllocateEmergencyRequest(**values)


TOKEN_METHODS: dict[str, Any] = {
    "CancelToken": pb.CancelTokenRequest, "MarkNoShow": pb.MarkNoShowRequest,
    "CheckInToken": pb.CheckInTokenRequest, "CompleteToken": pb.CompleteTokenRequest,
    "GetToken": pb.GetTokenRequest,
}
UNKNOWN_TOKENS = ["DOC001-20300107-T99", "DOC001-20300108-T1", "DOC999-20300107-T1", "DOC001-20300230-T1", "T1",
                  "DOC001-20300107-1"]
UNKNOWN_SLOTS = ["DOC001-20300107-1100", "DOC001-20300108-0900", "DOC999-20300107-0900", "DOC001-20300107",
                 "slot-1"]


def cases() -> list[Case]:
    c = [
        # --- malformed or missing fields ---
        Case("doctor without name", "CreateDoctor", lambda: pb.CreateDoctorRequest(specialization="ENT"),
             INVALID, "name"),
        Case("doctor with blank name", "CreateDoctor",
             lambda: pb.CreateDoctorRequest(name="   ", specialization="ENT"), INVALID, "name"),
        Case("doctor without specialization", "CreateDoctor", lambda: pb.CreateDoctorRequest(name="Dr X"),
             INVALID, "specialization"),
        Case("get doctor without id", "GetDoctor", lambda: pb.GetDoctorRequest(), INVALID, "doctor_id"),
        Case("doctors negative page size", "ListDoctors", lambda: pb.ListDoctorsRequest(page_size=-1),
             INVALID, "page_size"),
        Case("doctors bad page token", "ListDoctors", lambda: pb.ListDoctorsRequest(page_token="not-a-page"),
             INVALID, "page_token"),
        Case("slots without doctor", "CreateSlots", lambda: new_slots(spec(), doctor_id=""), INVALID,
             "doctor_id"),
        Case("slots empty batch", "CreateSlots", lambda: new_slots(), INVALID, "slots"),
        Case("slots more than one call takes", "CreateSlots", lambda: new_slots(*[spec()] * (MAX_CREATE_SLOTS + 1)),
             INVALID, "slots"),
        Case("slot date 30 February", "CreateSlots", lambda: new_slots(spec(date="2030-02-30")), INVALID,
             "slots[0].date"),
        Case("slot date with slashes", "CreateSlots", lambda: new_slots(spec(date="2030/01/07")), INVALID,
             "slots[0].date"),
        Case("slot without date", "CreateSlots", lambda: new_slots(spec(date="")), INVALID, "slots[0].date"),
        Case("slot start 25:00", "CreateSlots", lambda: new_slots(spec(start_time="25:00", end_time="23:00")),
             INVALID, "slots[0].start_time"),
        Case("slot start 9am", "CreateSlots", lambda: new_slots(spec(start_time="9am")), INVALID,
             "slots[0].start_time"),
        Case("slot end 12:60", "CreateSlots", lambda: new_slots(spec(end_time="12:60")), INVALID,
             "slots[0].end_time"),
        Case("slot without end", "CreateSlots", lambda: new_slots(spec(end_time="")), INVALID,
             "slots[0].end_time"),
        Case("slot end before start", "CreateSlots", lambda: new_slots(spec(start_time="12:00", end_time="11:00")),
             INVALID, "slots[0].end_time"),
        Case("slot end equals start", "CreateSlots", lambda: new_slots(spec(start_time="11:00", end_time="11:00")),
             INVALID, "slots[0].end_time"),
        Case("slot capacity 0", "CreateSlots", lambda: new_slots(spec(max_capacity=0)), INVALID,
             "slots[0].max_capacity"),
        Case("slot capacity -3", "CreateSlots", lambda: new_slots(spec(max_capacity=-3)), INVALID,
             "slots[0].max_capacity"),
        Case("slot consultation 0 minutes", "CreateSlots", lambda: new_slots(spec(consultation_minutes=0)),
             INVALID, "slots[0].consultation_minutes"),
        Case("second slot of a batch bad", "CreateSlots",
             lambda: new_slots(spec(), spec(start_time="13:00", end_time="12:30")), INVALID, "slots[1].end_time"),
        Case("list slots without doctor", "ListSlots", lambda: pb.ListSlotsRequest(date=DAY), INVALID,
             "doctor_id"),
        Case("list slots month 13", "ListSlots", lambda: pb.ListSlotsRequest(doctor_id="DOC001", date="2030-13-01"),
             INVALID, "date"),
        Case("list slots negative page size", "ListSlots",
             lambda: pb.ListSlotsRequest(doctor_id="DOC001", page_size=-5), INVALID, "page_size"),
        Case("list slots bad page token", "ListSlots",
             lambda: pb.ListSlotsRequest(doctor_id="DOC001", page_token="%%%"), INVALID, "page_token"),
        Case("capacity 0", "UpdateSlotCapacity",
             lambda: pb.UpdateSlotCapacityRequest(slot_id="DOC001-20300107-0900", max_capacity=0), INVALID,
             "max_capacity"),
        Case("capacity -1", "UpdateSlotCapacity",
             lambda: pb.UpdateSlotCapacityRequest(slot_id="DOC001-20300107-0900", max_capacity=-1), INVALID,
             "max_capacity"),
        Case("capacity without slot", "UpdateSlotCapacity", lambda: pb.UpdateSlotCapacityRequest(max_capacity=3),
             INVALID, "slot_id"),
        Case("slot status without slot", "GetSlotStatus", lambda: pb.GetSlotStatusRequest(), INVALID, "slot_id"),
        Case("patient without name", "AllocateToken", lambda: allocation(patient=patient(9, name="")), INVALID,
             "patient.name"),
        Case("no patient at all", "AllocateToken", lambda: allocation(patient=None), INVALID, "patient.name"),
        Case("patient without phone or mrn", "AllocateToken", lambda: allocation(patient=patient(9, phone="")),
             INVALID, "patient.phone"),
        Case("patient aged 151", "AllocateToken", lambda: allocation(patient=patient(9, age=151)), INVALID,
             "patient.age"),
        Case("patient aged -1", "AllocateToken", lambda: allocation(patient=patient(9, age=-1)), INVALID,
             "patient.age"),
        Case("patient of an unknown gender", "AllocateToken", lambda: allocation(patient=patient(9, gender=99)),
             INVALID, "patient.gender"),
        Case("patient named with invisible marks", "AllocateToken",
             lambda: allocation(patient=patient(9, name="\u2060\u200b")), INVALID, "patient.name"),
        Case("doctor named with a zero-width space", "CreateDoctor",
             lambda: pb.CreateDoctorRequest(name="\u200b", specialization="ENT"), INVALID, "name"),
        Case("mrn of 65 characters", "AllocateToken", lambda: allocation(patient=patient(9, mrn="M" * 65)), INVALID,
             "patient.mrn"),
        Case("mrn longer than 300 once folded", "AllocateToken",
             lambda: allocation(patient=patient(9, mrn="\ufdfa" * 20)), INVALID, "patient.mrn"),
        Case("name longer than 300 once folded", "AllocateToken",
             lambda: allocation(patient=patient(9, name="\ufdfa" * 20)), INVALID, "patient.name"),
        Case("phone without a digit", "AllocateToken", lambda: allocation(patient=patient(9, phone="abc")), INVALID,
             "patient.phone"),
        Case("allocate without doctor", "AllocateToken", lambda: allocation(doctor_id=""), INVALID, "doctor_id"),
        Case("allocate without date", "AllocateToken", lambda: allocation(date=""), INVALID, "date"),
        Case("allocate 30 February", "AllocateToken", lambda: allocation(date="2030-02-30"), INVALID, "date"),
        Case("allocate date day-first", "AllocateToken", lambda: allocation(date="07-01-2030"), INVALID, "date"),
        Case("allocate at 25:00", "AllocateToken", lambda: allocation(preferred_slot_time="25:00"), INVALID,
             "preferred_slot_time"),
        Case("allocate at 9:00", "AllocateToken", lambda: allocation(preferred_slot_time="9:00"), INVALID,
             "preferred_slot_time"),
        Case("allocate without source", "AllocateToken", lambda: allocation(source=pb.SOURCE_UNSPECIFIED),
             INVALID, "source"),
        Case("allocate unknown source", "AllocateToken", lambda: allocation(source=42), INVALID, "source"),
        Case("emergency without name", "AllocateEmergency", lambda: emergency(patient=patient(9, name="")),
             INVALID, "patient.name"),
        Case("emergency 30 February", "AllocateEmergency", lambda: emergency(date="2030-02-30"), INVALID, "date"),
        Case("emergency at 24:00", "AllocateEmergency", lambda: emergency(preferred_slot_time="24:00"), INVALID,
             "preferred_slot_time"),
        Case("call next without doctor", "CallNext", lambda: pb.CallNextRequest(date=DAY), INVALID, "doctor_id"),
        Case("call next without date", "CallNext", lambda: pb.CallNextRequest(doctor_id="DOC001"), INVALID, "date"),
        Case("call next 29 February 2030", "CallNext",
             lambda: pb.CallNextRequest(doctor_id="DOC001", date="2030-02-29"), INVALID, "date"),
        Case("list tokens without date", "ListTokens", lambda: pb.ListTokensRequest(doctor_id="DOC001"), INVALID,
             "date"),
        Case("list tokens without doctor", "ListTokens", lambda: pb.ListTokensRequest(date=DAY), INVALID,
             "doctor_id"),
        Case("list tokens bad page token", "ListTokens",
             lambda: pb.ListTokensRequest(doctor_id="DOC001", date=DAY, page_token="bogus"), INVALID, "page_token"),
        Case("stats without date", "GetStats", lambda: pb.GetStatsRequest(doctor_id="DOC001"), INVALID, "date"),
        Case("stats 30 February", "GetStats", lambda: pb.GetStatsRequest(date="2030-02-30"), INVALID, "date"),
        # --- unknown doctors, slots and tokens ---
        Case("unknown doctor", "GetDoctor", lambda: pb.GetDoctorRequest(doctor_id="DOC999"), NOT_FOUND),
        Case("slots for unknown doctor", "CreateSlots", lambda: new_slots(spec(), doctor_id="DOC999"), NOT_FOUND),
        Case("list slots of unknown doctor", "ListSlots", lambda: pb.ListSlotsRequest(doctor_id="DOC999"),
             NOT_FOUND),
        Case("allocate with unknown doctor", "AllocateToken", lambda: allocation(doctor_id="DOC999"), NOT_FOUND),
        Case("allocate on a date without slots", "AllocateToken", lambda: allocation(date=NEXT_DAY), NOT_FOUND),
        Case("allocate at a time without slot", "AllocateToken", lambda: allocation(preferred_slot_time="11:00"),
             NOT_FOUND),
        Case("emergency with unknown doctor", "AllocateEmergency", lambda: emergency(doctor_id="DOC999"),
             NOT_FOUND),
        Case("call next of unknown doctor", "CallNext", lambda: pb.CallNextRequest(doctor_id="DOC999", date=DAY),
             NOT_FOUND),
        Case("call next on a date without slots", "CallNext",
             lambda: pb.CallNextRequest(doctor_id="DOC001", date=NEXT_DAY), NOT_FOUND),
        Case("tokens of unknown doctor", "ListTokens", lambda: pb.ListTokensRequest(doctor_id="DOC999", date=DAY),
             NOT_FOUND),
        Case("stats of unknown doctor", "GetStats", lambda: pb.GetStatsRequest(doctor_id="DOC999", date=DAY),
             NOT_FOUND),
        # --- already exists ---
        Case("slot overlapping a stored one", "CreateSlots", lambda: new_slots(spec(start_time="09:30",
                                                                                   end_time="10:30")), EXISTS),
        Case("slots overlapping in one batch", "CreateSlots",
             lambda: new_slots(spec(), spec(start_time="11:30", end_time="12:30")), EXISTS),
        Case("good slot then an overlapping one", "CreateSlots",
             lambda: new_slots(spec(date=NEXT_DAY), spec(), spec(start_time="08:00", end_time="09:01")), EXISTS),
        Case("patient who holds a token", "AllocateToken", lambda: allocation(patient=patient(1)), EXISTS),
        Case("same patient, other case and spacing", "AllocateToken",
             lambda: allocation(patient=patient(1, name="  patient   1 ")), EXISTS),
        Case("emergency for a patient who holds a token", "AllocateEmergency",
             lambda: emergency(patient=patient(2)), EXISTS),
        # --- a cancel's reason, which the audit log keeps ---
        Case("cancel with a NUL in its reason", "CancelToken",
             lambda: pb.CancelTokenRequest(token_id="DOC001-20300107-T1", reason="went\x00home"), INVALID, "reason"),
        Case("doctor whose name has a line break", "CreateDoctor",
             lambda: pb.CreateDoctorRequest(name="Dr Asha\r\nRao", specialization="ENT"), INVALID, "name"),
        Case("patient whose name runs on a second line", "AllocateToken",
             lambda: allocation(patient=patient(9, name="Meera\u2028Nair")), INVALID, "patient.name"),
        Case("cancel with a reason of 201 characters", "CancelToken",
             lambda: pb.CancelTokenRequest(token_id="DOC001-20300107-T1", reason="x" * 201), INVALID, "reason"),
    ]
    for method, request in TOKEN_METHODS.items():
        c.append(Case(f"{method} without token", method, lambda r=request: r(), INVALID, "token_id"))
        c += [Case(f"{method} {token_id}", method, lambda r=request, t=token_id: r(token_id=t), NOT_FOUND)
              for token_id in UNKNOWN_TOKENS]
    for slot_id in UNKNOWN_SLOTS:
        c.append(Case(f"status of {slot_id}", "GetSlotStatus",
                      lambda s=slot_id: pb.GetSlotStatusRequest(slot_id=s), NOT_FOUND))
        c.append(Case(f"capacity of {slot_id}", "UpdateSlotCapacity",
                      lambda s=slot_id: pb.UpdateSlotCapacityRequest(slot_id=s, max_capacity=5), NOT_FOUND))
    return c


CASES = cases()


def world(live: LiveServer) -> str:
    """DOC001 with a one-seat 09:00 slot on DAY: token 1 confirmed, token 2 waitlisted."""
    doctor = make_doctor(live.stub)
    assert doctor == "DOC001"
    make_slots(live.stub, doctor, ("09:00", "10:00", 1))
    allocate(live.stub, doctor, 1)
    allocate(live.stub, doctor, 2)
    return doctor


def snapshot(live: LiveServer) -> bytes:
    """What a client can see: doctors, their slots on every date, DAY's and NEXT_DAY's tokens and waitlists."""
    stub = live.stub
    parts: list[Any] = [stub.ListDoctors(pb.ListDoctorsRequest(page_size=1000))]
    for doctor in parts[0].doctors:
        slots = stub.ListSlots(pb.ListSlotsRequest(doctor_id=doctor.doctor_id, page_size=1000))
        parts += [slots, *all_tokens(stub, doctor.doctor_id), *all_tokens(stub, doctor.doctor_id, NEXT_DAY)]
        parts += [stub.GetSlotStatus(pb.GetSlotStatusRequest(slot_id=s.slot_id)) for s in slots.slots]
    return b"".join(p.SerializeToString(deterministic=True) for p in parts)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.method}: {c.name}" for c in CASES])
def test_a_refusal_has_the_right_code_a_rich_status_and_changes_nothing(live, case):
    doctor = world(live)
    before = snapshot(live)
    failure = refused(getattr(live.stub, case.method), case.request())
    assert failure.code == case.code, failure
    assert failure.domain == "opd.v1"
    assert UPPER_SNAKE.match(failure.reason), failure.reason
    assert failure.message.strip()
    if case.field:
        assert case.field in failure.fields, failure.fields
        assert failure.fields[case.field].strip()
    assert snapshot(live) == before
    assert allocate(live.stub, doctor, 3).token.token_number == 3  # the refusal took no token number


def test_a_long_mrn_is_named_alone(live):
    """An mrn too long, as given or folded, is the only field named: not the name beside it."""
    doctor = world(live)
    for mrn in ("M" * 300, "\ufdfa" * 20):
        bad = refused(live.stub.AllocateToken, allocation(patient=patient(9, name="Asha", mrn=mrn)))
        assert list(bad.fields) == ["patient.mrn"], bad.fields
    # With an mrn, the name is not what the schema keeps folded: a name that folds long is taken.
    long_folded = allocation(patient=patient(9, name="\ufdfa" * 20, mrn="A1"), doctor_id=doctor)
    assert live.stub.AllocateToken(long_folded).token.status == pb.STATUS_WAITLISTED


def test_an_unknown_token_or_slot_is_named_as_such_whatever_doctor_its_id_names(live):
    """A token or slot id names its doctor; for one that does not exist the caller is told the token or slot is
    unknown, not a doctor they never sent."""
    world(live)
    for method, request, reason in (
            ("GetToken", pb.GetTokenRequest(token_id="DOC999-20300107-T1"), "TOKEN_NOT_FOUND"),
            ("CancelToken", pb.CancelTokenRequest(token_id="DOC999-20300107-T1"), "TOKEN_NOT_FOUND"),
            ("GetSlotStatus", pb.GetSlotStatusRequest(slot_id="DOC999-20300107-0900"), "SLOT_NOT_FOUND"),
            ("UpdateSlotCapacity", pb.UpdateSlotCapacityRequest(slot_id="DOC999-20300107-0900", max_capacity=2),
             "SLOT_NOT_FOUND")):
        failure = refused(getattr(live.stub, method), request)
        assert (failure.code, failure.reason) == (NOT_FOUND, reason), (method, failure)
        assert "DOC999" in failure.message and "doctor" not in failure.message.lower(), failure.message


def test_malformed_doctor_ids_are_refused_as_such(live):
    """A doctor id of the wrong shape is either malformed (naming doctor_id) or unknown; never a failure."""
    world(live)
    for doctor_id in ("doc001", "DOC 001", "DOC001; DROP TABLE doctors", "001"):
        failure = refused(live.stub.GetDoctor, pb.GetDoctorRequest(doctor_id=doctor_id))
        assert failure.code in (INVALID, NOT_FOUND), failure
        assert failure.code == NOT_FOUND or "doctor_id" in failure.fields
        assert failure.domain == "opd.v1" and failure.message


def test_several_bad_fields_are_all_named_in_one_answer(live):
    world(live)
    failure = refused(live.stub.AllocateToken,
                      allocation(patient=patient(9, name="", age=200), date="2030-02-30", source=pb.SOURCE_UNSPECIFIED))
    assert failure.code == INVALID
    assert {"patient.name", "patient.age", "date", "source"} <= set(failure.fields)
    cancel = refused(live.stub.CancelToken, pb.CancelTokenRequest(token_id="", reason="x" * 201))
    assert cancel.code == INVALID and {"token_id", "reason"} <= set(cancel.fields)


def field_violations(error: grpc.RpcError) -> list[tuple[str, str]]:
    """Every BadRequest field violation of a refusal, in order, duplicates kept."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    found = []
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found += [(v.field, v.description) for v in bad.field_violations]
    return found


@pytest.mark.parametrize("start,end,field", [("11:00", "12:60", "end_time"), ("11:00", "noon", "end_time"),
                                             ("25:00", "12:00", "start_time")])
def test_a_malformed_slot_time_is_named_once_for_what_is_wrong(live, start, end, field):
    """A time that cannot be read is reported as unreadable, not also as out of order with the other one."""
    world(live)
    with pytest.raises(grpc.RpcError) as refusal:
        live.stub.CreateSlots(new_slots(spec(start_time=start, end_time=end)))
    violations = field_violations(refusal.value)
    assert [f for f, _ in violations] == [f"slots[0].{field}"], violations


def assert_refused_as_invalid(live: LiveServer, method: str, payload: bytes) -> None:
    before = snapshot(live)
    call = live.channel.unary_unary(f"/opd.v1.OPDTokenService/{method}")
    with pytest.raises(grpc.RpcError) as refusal:
        call(payload, timeout=10)
    answer = failure(refusal.value)
    assert answer.code == INVALID, answer
    assert answer.domain == "opd.v1" and UPPER_SNAKE.match(answer.reason)
    assert snapshot(live) == before


@pytest.mark.parametrize("method", sorted(pb.DESCRIPTOR.services_by_name["OPDTokenService"].methods_by_name))
def test_bytes_that_are_not_a_request_are_invalid_argument(live, method):
    """SPEC §12: bad input never yields UNKNOWN or INTERNAL, even when it is not a protobuf message at all."""
    world(live)
    assert_refused_as_invalid(live, method, b"\xff\xff\xff\xff")


def test_a_name_that_is_not_utf8_is_invalid_argument(live):
    """A client that sends Latin-1 text in a string field gets told so, not UNKNOWN."""
    world(live)
    name_in_latin1 = "Dr Jos\u00e9".encode("latin-1")
    assert_refused_as_invalid(live, "CreateDoctor", b"\x0a" + bytes([len(name_in_latin1)]) + name_in_latin1
                              + b"\x12\x03ENT")


def test_a_batch_with_an_overlap_creates_none_of_its_slots(live):
    doctor = world(live)
    failure = refused(live.stub.CreateSlots, new_slots(spec(date=NEXT_DAY), spec(start_time="12:00",
                                                                                 end_time="13:00"),
                                                       spec(start_time="12:30", end_time="13:30")))
    assert failure.code == EXISTS
    slots = live.stub.ListSlots(pb.ListSlotsRequest(doctor_id=doctor)).slots
    assert [s.slot_id for s in slots] == ["DOC001-20300107-0900"]
    again = live.stub.CreateSlots(new_slots(spec(date=NEXT_DAY), spec(start_time="12:00", end_time="13:00")))
    assert [s.slot_id for s in again.slots] == ["DOC001-20300108-1100", "DOC001-20300107-1200"]


def test_slots_of_one_request_that_overlap_are_named_by_their_places_in_it(live):
    """Not as a stored slot that the doctor does not have: the desk is told which two entries to fix."""
    world(live)
    failure = refused(live.stub.CreateSlots, new_slots(spec(date=NEXT_DAY), spec(start_time="12:00", end_time="13:00"),
                                                       spec(start_time="09:30", end_time="10:30", date=NEXT_DAY),
                                                       spec(start_time="10:00", end_time="10:20", date=NEXT_DAY)))
    assert (failure.code, failure.reason) == (EXISTS, "SLOT_OVERLAP")
    assert failure.message == ("slots[3] 10:00-10:20 overlaps slots[2] 09:30-10:30 of this same request, on "
                               "2030-01-08."), failure.message


def test_slots_that_touch_do_not_overlap(live):
    doctor = world(live)
    created = live.stub.CreateSlots(new_slots(spec(start_time="08:00", end_time="09:00"),
                                              spec(start_time="10:00", end_time="10:30")))
    assert [s.start_time for s in created.slots] == ["08:00", "10:00"]
    listed = live.stub.ListSlots(pb.ListSlotsRequest(doctor_id=doctor, date=DAY)).slots
    assert [(s.start_time, s.end_time) for s in listed] == [("08:00", "09:00"), ("09:00", "10:00"),
                                                            ("10:00", "10:30")]


# ---- pages ---------------------------------------------------------------------------------------------


def pages(call: Callable[[Any], Any], request: Any, items: str) -> list[list[Any]]:
    """Every page of a list call, following next_page_token to the end."""
    result = []
    while True:
        page = call(request)
        result.append(list(getattr(page, items)))
        if not page.next_page_token:
            return result
        request.page_token = page.next_page_token


def test_list_doctors_pages_through_every_doctor_once_in_id_order(live):
    made = [make_doctor(live.stub, f"Dr {n}", "Cardiology") for n in range(5)]
    assert made == [f"DOC00{n}" for n in range(1, 6)]
    paged = pages(live.stub.ListDoctors, pb.ListDoctorsRequest(page_size=2), "doctors")
    assert [len(p) for p in paged] == [2, 2, 1]
    assert [d.doctor_id for p in paged for d in p] == made
    everything = live.stub.ListDoctors(pb.ListDoctorsRequest())
    assert [d.doctor_id for d in everything.doctors] == made and everything.next_page_token == ""


def test_list_slots_pages_by_date_and_start_time_with_an_optional_date(live):
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("14:00", "15:00", 2), date=NEXT_DAY)
    make_slots(live.stub, doctor, ("11:00", "12:00", 2), ("09:00", "10:00", 2), ("16:00", "17:00", 2))
    make_slots(live.stub, doctor, ("08:00", "09:00", 2), date=NEXT_DAY)
    paged = pages(live.stub.ListSlots, pb.ListSlotsRequest(doctor_id=doctor, page_size=2), "slots")
    assert [len(p) for p in paged] == [2, 2, 1]
    assert [(s.date, s.start_time) for p in paged for s in p] == [
        (DAY, "09:00"), (DAY, "11:00"), (DAY, "16:00"), (NEXT_DAY, "08:00"), (NEXT_DAY, "14:00")]
    one_day = pages(live.stub.ListSlots, pb.ListSlotsRequest(doctor_id=doctor, date=NEXT_DAY, page_size=1),
                    "slots")
    assert [[s.start_time for s in p] for p in one_day] == [["08:00"], ["14:00"]]


def test_slots_made_between_two_pages_neither_repeat_nor_push_one_out(live):
    """Slots are made in the middle of the list: the next page starts after the last slot shown, not at an offset
    (an earlier slot made meanwhile had made the next page repeat the last one)."""
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("09:00", "10:00", 2), ("10:00", "11:00", 2))
    make_slots(live.stub, doctor, ("09:00", "10:00", 2), date=NEXT_DAY)
    first = live.stub.ListSlots(pb.ListSlotsRequest(doctor_id=doctor, page_size=2))
    assert [s.start_time for s in first.slots] == ["09:00", "10:00"]
    make_slots(live.stub, doctor, ("08:00", "09:00", 2), ("11:00", "12:00", 2))
    rest = live.stub.ListSlots(pb.ListSlotsRequest(doctor_id=doctor, page_size=2, page_token=first.next_page_token))
    assert [(s.date, s.start_time) for s in rest.slots] == [(DAY, "11:00"), (NEXT_DAY, "09:00")]
    assert rest.next_page_token == ""


def test_list_tokens_pages_in_token_number_order(live):
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("09:00", "10:00", 3))
    for n in range(1, 8):
        allocate(live.stub, doctor, n)
    paged = pages(live.stub.ListTokens, pb.ListTokensRequest(doctor_id=doctor, date=DAY, page_size=3), "tokens")
    assert [[t.token_number for t in p] for p in paged] == [[1, 2, 3], [4, 5, 6], [7]]
    assert [t.waitlist_position for p in paged for t in p] == [0, 0, 0, 1, 2, 3, 4]
    empty = live.stub.ListTokens(pb.ListTokensRequest(doctor_id=doctor, date=NEXT_DAY))
    assert list(empty.tokens) == [] and empty.next_page_token == ""



def test_a_page_token_is_refused_with_other_filters_than_its_first_page(live):
    """A next_page_token is an offset into one list: sent with another doctor, date or list call it would page
    through a list it does not belong to, skipping that list's first rows without a word."""
    doctor, other = make_doctor(live.stub), make_doctor(live.stub, "Dr Other")
    for who in (doctor, other):
        make_slots(live.stub, who, ("09:00", "10:00", 3), ("10:00", "11:00", 3))
        for n in range(1, 5):
            allocate(live.stub, who, n)
    first = live.stub.ListTokens(pb.ListTokensRequest(doctor_id=doctor, date=DAY, page_size=2))
    token = first.next_page_token
    for call, request in [
            (live.stub.ListTokens, pb.ListTokensRequest(doctor_id=other, date=DAY, page_token=token)),
            (live.stub.ListTokens, pb.ListTokensRequest(doctor_id=doctor, date=NEXT_DAY, page_token=token)),
            (live.stub.ListSlots, pb.ListSlotsRequest(doctor_id=doctor, date=DAY, page_token=token)),
            (live.stub.ListQueueEvents, pb.ListQueueEventsRequest(doctor_id=doctor, date=DAY, page_token=token))]:
        bad = refused(call, request)
        assert (bad.code, bad.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"), request
        assert "not a token of this list" in bad.fields["page_token"], request
    # With its own filters (and any page size) it goes on where the first page ended.
    rest = live.stub.ListTokens(pb.ListTokensRequest(doctor_id=doctor, date=DAY, page_size=10, page_token=token))
    assert [t.token_number for t in rest.tokens] == [3, 4]


# ---- doctors, stats --------------------------------------------------------------------------------------


def test_a_created_doctor_can_be_read_back(live):
    created = live.stub.CreateDoctor(pb.CreateDoctorRequest(name="Dr Kavya Menon", specialization="Paediatrics"))
    assert re.fullmatch(r"DOC\d{3,}", created.doctor.doctor_id)
    got = live.stub.GetDoctor(pb.GetDoctorRequest(doctor_id=created.doctor.doctor_id)).doctor
    assert got == created.doctor
    assert (got.name, got.specialization) == ("Dr Kavya Menon", "Paediatrics")
    second = make_doctor(live.stub, "Dr Arjun Das", "Orthopaedics")
    assert second != got.doctor_id
    listed = live.stub.ListDoctors(pb.ListDoctorsRequest()).doctors
    assert [(d.doctor_id, d.name) for d in listed] == [(got.doctor_id, "Dr Kavya Menon"), (second, "Dr Arjun Das")]


def at(hour: int, minute: int = 0) -> Any:
    return MORNING.replace(hour=hour, minute=minute)


def test_stats_of_a_scripted_day(live):
    """Six tokens through a morning: one bump, two consultations (waits of 10 and 15 minutes), one no-show,
    one cancellation; capacity 5 over two slots."""
    stub = live.stub
    doctor = make_doctor(stub)
    idle = make_doctor(stub, "Dr Idle")
    make_slots(stub, doctor, ("09:00", "10:00", 3), ("10:00", "11:00", 2))
    make_slots(stub, idle, ("09:00", "10:00", 4))
    make_doctor(stub, "Dr Elsewhere")  # no slots on DAY: not in the day's stats
    bumped = allocate(stub, doctor, 1, pb.SOURCE_WALK_IN, "09:00").token.token_id
    no_show = allocate(stub, doctor, 2, pb.SOURCE_ONLINE_BOOKING, "09:00").token.token_id
    follow_up = allocate(stub, doctor, 3, pb.SOURCE_FOLLOW_UP, "09:00").token.token_id
    cancelled = allocate(stub, doctor, 4, pb.SOURCE_WALK_IN, "09:00").token.token_id
    urgent = stub.AllocateEmergency(pb.AllocateEmergencyRequest(patient=patient(5), doctor_id=doctor, date=DAY,
                                                                preferred_slot_time="09:00"))
    assert urgent.bumped_token.token_id == bumped
    allocate(stub, doctor, 6, pb.SOURCE_PAID_PRIORITY, "10:00")
    live.set_time(at(8, 50))
    stub.CheckInToken(pb.CheckInTokenRequest(token_id=urgent.token.token_id))
    live.set_time(at(8, 55))
    stub.CheckInToken(pb.CheckInTokenRequest(token_id=follow_up))
    live.set_time(at(9))
    assert stub.CallNext(pb.CallNextRequest(doctor_id=doctor, date=DAY)).token.token_id == urgent.token.token_id
    live.set_time(at(9, 10))
    assert stub.CallNext(pb.CallNextRequest(doctor_id=doctor, date=DAY)).token.token_id == follow_up
    live.set_time(at(9, 20))
    stub.CompleteToken(pb.CompleteTokenRequest(token_id=follow_up))
    live.set_time(at(9, 30))
    promoted = stub.MarkNoShow(pb.MarkNoShowRequest(token_id=no_show)).promoted
    assert [t.token_id for t in promoted] == [bumped]
    stub.CancelToken(pb.CancelTokenRequest(token_id=cancelled))

    (stats,) = stub.GetStats(pb.GetStatsRequest(date=DAY, doctor_id=doctor)).stats
    assert (stats.doctor_id, stats.date) == (doctor, DAY)
    assert {k: v for k, v in stats.by_status.items() if v} == {
        "STATUS_CONFIRMED": 2, "STATUS_COMPLETED": 2, "STATUS_NO_SHOW": 1, "STATUS_CANCELLED": 1}
    assert {k: v for k, v in stats.by_source.items() if v} == {
        "SOURCE_WALK_IN": 2, "SOURCE_ONLINE_BOOKING": 1, "SOURCE_FOLLOW_UP": 1, "SOURCE_EMERGENCY": 1,
        "SOURCE_PAID_PRIORITY": 1}
    assert (stats.total_tokens, stats.total_capacity, stats.seat_holders) == (6, 5, 4)
    assert stats.utilisation == pytest.approx(0.8)
    assert (stats.bumps, stats.no_shows) == (1, 1)
    assert stats.mean_wait_minutes == pytest.approx(12.5)

    every = stub.GetStats(pb.GetStatsRequest(date=DAY)).stats
    assert [s.doctor_id for s in every] == [doctor, idle]
    quiet = every[1]
    assert (quiet.total_tokens, quiet.total_capacity, quiet.seat_holders, quiet.utilisation,
            quiet.mean_wait_minutes) == (0, 4, 0, 0.0, 0.0)


# ---- health, reflection, the test clock ------------------------------------------------------------------


def test_health_says_serving(live):
    health = health_pb2_grpc.HealthStub(live.channel)
    for service in ("", "opd.v1.OPDTokenService"):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


def reflected_services(channel: grpc.Channel) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    (answer,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    return {s.name for s in answer.list_services_response.service}


def test_reflection_lists_the_service_and_describes_it(live):
    assert {"opd.v1.OPDTokenService", "grpc.health.v1.Health"} <= reflected_services(live.channel)
    stub = reflection_pb2_grpc.ServerReflectionStub(live.channel)
    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="opd.v1.OPDTokenService")
    (answer,) = stub.ServerReflectionInfo(iter([request]))
    assert answer.file_descriptor_response.file_descriptor_proto, answer


@contextmanager
def server_without_test_clock(tmp_path: Path) -> Iterator[grpc.Channel]:
    """An OPDServer started from settings as production would be: no OPD_TEST_CLOCK."""
    settings = Settings.load(env={"OPD_DATABASE_URL": f"sqlite:///{tmp_path / 'plain.db'}", "OPD_METRICS_LISTEN": "",
                                  "OPD_LISTEN": "127.0.0.1:0"})
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=30)

    async def build() -> OPDServer:
        server = OPDServer(settings)
        await server.start()
        return server

    server = run(build())
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield channel
    finally:
        run(server.stop(grace=1))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def test_a_server_without_the_test_clock_setting_does_not_serve_it(tmp_path: Path):
    with server_without_test_clock(tmp_path) as channel:
        clock = test_clock_pb2_grpc.TestClockServiceStub(channel)
        for call, request in ((clock.GetTime, test_clock_pb2.GetTimeRequest()),
                              (clock.SetTime, test_clock_pb2.SetTimeRequest())):
            with pytest.raises(grpc.RpcError) as refusal:
                call(request)
            assert refusal.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "opd.v1.TestClockService" not in reflected_services(channel)
        assert "opd.v1.OPDTokenService" in reflected_services(channel)
        stub = opd_pb2_grpc.OPDTokenServiceStub(channel)
        assert make_doctor(stub) == "DOC001"


@pytest.mark.parametrize("date", ["0001-01-01", "9999-12-31"])
def test_dates_whose_times_a_timestamp_cannot_hold_are_invalid(live, date):
    doctor = make_doctor(live.stub)
    failure = refused(live.stub.CreateSlots, pb.CreateSlotsRequest(doctor_id=doctor, slots=[
        pb.SlotSpec(date=date, start_time="23:00", end_time="23:59")]))
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT and "slots[0].date" in failure.fields
