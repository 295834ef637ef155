"""Translation between `opd.v1` messages and the domain model; no rule lives here."""

from __future__ import annotations

import datetime as dt

from google.protobuf import timestamp_pb2

from opd_grpc._gen.opd.v1 import opd_pb2 as pb
from opd_grpc.engine.model import (
    PRIORITY, Allocation, CallResult, CapacityChange, DayStats, Doctor, EventKind, Patient, QueueEvent, Release,
    Slot, SlotStatus, Source, Status, TokenView,
)
from opd_grpc.engine.audit import AuditEntry
from opd_grpc.engine.schedule import Application, Holiday, NewHoliday, SlotRequest, SlotTemplate, TemplateSlot
from opd_grpc.engine.service import AllocateCommand
from opd_grpc.engine.watch import Heartbeat, Snapshot

SOURCE_FROM_PB = {pb.SOURCE_EMERGENCY: Source.EMERGENCY, pb.SOURCE_PAID_PRIORITY: Source.PAID_PRIORITY,
                  pb.SOURCE_FOLLOW_UP: Source.FOLLOW_UP, pb.SOURCE_ONLINE_BOOKING: Source.ONLINE_BOOKING,
                  pb.SOURCE_WALK_IN: Source.WALK_IN}
SOURCE_TO_PB = {v: k for k, v in SOURCE_FROM_PB.items()}
STATUS_TO_PB = {s: pb.Status.Value(f"STATUS_{s.value}") for s in Status}
EVENT_KIND_TO_PB = {k: pb.EventKind.Value(f"EVENT_KIND_{k.value}") for k in EventKind}
GENDER_FROM_PB = {pb.GENDER_FEMALE: "FEMALE", pb.GENDER_MALE: "MALE", pb.GENDER_OTHER: "OTHER"}
GENDER_TO_PB = {v: k for k, v in GENDER_FROM_PB.items()}


def timestamp(when: dt.datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(when)
    return ts


def source(number: int) -> Source | int | None:
    """The Source of an enum number: None when unset, and a number the enum does not have handed on as it is, for
    the engine to refuse."""
    return SOURCE_FROM_PB.get(number, number or None)


def allocate_command(r: pb.AllocateTokenRequest | pb.AllocateEmergencyRequest,
                     source: Source | int | None) -> AllocateCommand:
    """The patient's gender as the engine names it: "" when unset, and a number the enum does not have as its
    digits, for the engine to refuse."""
    p = r.patient
    patient = Patient(p.name, p.phone, p.age, GENDER_FROM_PB.get(p.gender, str(p.gender) if p.gender else ""), p.mrn)
    return AllocateCommand(patient, r.doctor_id, r.date, r.preferred_slot_time, source, r.flexible)


def slot_requests(r: pb.CreateSlotsRequest) -> list[SlotRequest]:
    return [SlotRequest(s.date, s.start_time, s.end_time,
                        s.max_capacity if s.HasField("max_capacity") else None,
                        s.consultation_minutes if s.HasField("consultation_minutes") else None)
            for s in r.slots]


def template_slots(r: pb.SetSlotTemplateRequest) -> list[TemplateSlot]:
    """The Weekday enum's numbers are ISO weekdays (1 Monday … 7 Sunday), as the engine's; any other number is
    handed on for the engine to refuse."""
    return [TemplateSlot(s.weekday, s.start_time, s.end_time,
                         s.max_capacity if s.HasField("max_capacity") else None,
                         s.consultation_minutes if s.HasField("consultation_minutes") else None)
            for s in r.slots]


def slot_template(t: SlotTemplate) -> pb.SlotTemplate:
    return pb.SlotTemplate(doctor_id=t.doctor_id, slots=[
        pb.TemplateSlot(weekday=s.weekday, start_time=s.start_time, end_time=s.end_time, max_capacity=s.max_capacity,
                        consultation_minutes=s.consultation_minutes) for s in t.slots])


def holiday(h: Holiday) -> pb.Holiday:
    return pb.Holiday(date=h.date.isoformat(), name=h.name)


def new_holiday(new: NewHoliday) -> pb.CreateHolidayResponse:
    return pb.CreateHolidayResponse(holiday=holiday(new.holiday), slots_that_day=[slot(s) for s in new.slots_that_day],
                                    slots_that_day_total=new.slots_that_day_total)


def application(a: Application) -> pb.ApplySlotTemplateResponse:
    return pb.ApplySlotTemplateResponse(created=[slot(s) for s in a.created], existing=[slot(s) for s in a.existing],
                                        skipped_holidays=[holiday(h) for h in a.skipped_holidays])


def doctor(d: Doctor) -> pb.Doctor:
    return pb.Doctor(doctor_id=d.doctor_id, name=d.name, specialization=d.specialization)


def slot(s: Slot) -> pb.Slot:
    return pb.Slot(slot_id=s.slot_id, doctor_id=s.doctor_id, date=s.date.isoformat(),
                   start_time=f"{s.start_time:%H:%M}", end_time=f"{s.end_time:%H:%M}",
                   max_capacity=s.max_capacity, consultation_minutes=s.consultation_minutes)


def token(v: TokenView, with_patient: bool = True) -> pb.Token:
    """`with_patient=False` for watchers: display boards show numbers, never a patient's details."""
    t = v.token
    p = t.patient
    msg = pb.Token(
        token_id=t.token_id, token_number=t.token_number, slot_id=t.slot_id, doctor_id=t.doctor_id,
        date=t.date.isoformat(), source=SOURCE_TO_PB[t.source], priority=PRIORITY[t.source],
        status=STATUS_TO_PB[t.status], queue_position=v.queue_position, waitlist_position=v.waitlist_position,
        created_at=timestamp(t.created_at), updated_at=timestamp(t.updated_at))
    if with_patient:
        msg.patient.CopyFrom(pb.Patient(name=p.name, phone=p.phone, age=p.age, gender=GENDER_TO_PB.get(p.gender, 0),
                                        mrn=p.mrn))
    for name in ("checked_in_at", "called_at", "completed_at"):
        if (when := getattr(t, name)) is not None:
            getattr(msg, name).CopyFrom(timestamp(when))
    if v.estimated_time is not None:
        msg.estimated_time.CopyFrom(timestamp(v.estimated_time))
    return msg


def allocation(a: Allocation, response: type[pb.AllocateTokenResponse] | type[pb.AllocateEmergencyResponse]):
    msg = response(token=token(a.token), moved_to_later_slot=a.moved_to_later_slot)
    if a.bumped is not None:
        msg.bumped_token.CopyFrom(token(a.bumped))
    return msg


def release(r: Release, response: type[pb.CancelTokenResponse] | type[pb.MarkNoShowResponse]):
    return response(token=token(r.token), promoted=[token(p) for p in r.promoted])


def call_result(r: CallResult) -> pb.CallNextResponse:
    msg = pb.CallNextResponse(token=token(r.token))
    if r.completed is not None:
        msg.completed_token.CopyFrom(token(r.completed))
    return msg


def capacity_change(c: CapacityChange) -> pb.UpdateSlotCapacityResponse:
    return pb.UpdateSlotCapacityResponse(slot=slot(c.slot), promoted=[token(p) for p in c.promoted])


def slot_status(s: SlotStatus) -> pb.GetSlotStatusResponse:
    return pb.GetSlotStatusResponse(slot=slot(s.slot), max_capacity=s.slot.max_capacity,
                                    seat_holders=s.seat_holders, free_seats=s.free_seats,
                                    waitlist=[token(t) for t in s.waitlist])


def stats(s: DayStats) -> pb.DoctorDayStats:
    return pb.DoctorDayStats(
        doctor_id=s.doctor_id, date=s.date.isoformat(),
        by_status={f"STATUS_{k.value}": n for k, n in s.by_status.items()},
        by_source={f"SOURCE_{k.value}": n for k, n in s.by_source.items()},
        total_tokens=s.total_tokens, total_capacity=s.total_capacity, seat_holders=s.seat_holders,
        utilisation=s.utilisation, bumps=s.bumps, no_shows=s.no_shows, mean_wait_minutes=s.mean_wait_minutes)


def watch_update(u: Snapshot | QueueEvent | Heartbeat) -> pb.WatchQueueResponse:
    if isinstance(u, QueueEvent):
        return pb.WatchQueueResponse(event=queue_event(u))
    if isinstance(u, Snapshot):
        return pb.WatchQueueResponse(snapshot=pb.QueueSnapshot(
            doctor_id=u.doctor_id, date=u.date.isoformat(), sequence=u.sequence,
            tokens=[token(v, with_patient=False) for v in u.tokens]))
    return pb.WatchQueueResponse(heartbeat=pb.Heartbeat(time=timestamp(u.time), latest_sequences=u.latest_sequences))


def queue_event(e: QueueEvent) -> pb.QueueEvent:
    msg = pb.QueueEvent(doctor_id=e.doctor_id, date=e.date.isoformat(), sequence=e.sequence,
                        kind=EVENT_KIND_TO_PB[e.kind], occurred_at=timestamp(e.occurred_at), slot_id=e.slot_id,
                        caused_by_token_id=e.caused_by_token_id)
    if e.token_id:
        assert e.source is not None and e.status is not None and e.queued_at is not None
        msg.token.CopyFrom(pb.Token(
            token_id=e.token_id, token_number=e.token_number, slot_id=e.slot_id, doctor_id=e.doctor_id,
            date=e.date.isoformat(), source=SOURCE_TO_PB[e.source], priority=PRIORITY[e.source],
            status=STATUS_TO_PB[e.status], created_at=timestamp(e.queued_at)))
    return msg


def audit_entry(e: AuditEntry) -> pb.AuditEntry:
    return pb.AuditEntry(entry_id=e.entry_id, occurred_at=timestamp(e.occurred_at),
                         outcome=pb.AuditOutcome.Value(f"AUDIT_OUTCOME_{e.outcome}"), key_id=e.key_id, role=e.role,
                         method=e.method, request_id=e.request_id, token_id=e.token_id,
                         from_status=pb.Status.Value(f"STATUS_{e.from_status}") if e.from_status else 0,
                         to_status=pb.Status.Value(f"STATUS_{e.to_status}") if e.to_status else 0, reason=e.reason)
