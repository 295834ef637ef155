"""The day's plan, drawn from one `random.Random(seed)`: the doctors and their morning slots, and which patient
asks for what, when, and what they do next. Demand is above capacity, so waitlists, promotions and bumps happen.

Times are UTC; the server must run with `TIMEZONE=UTC` so that slot times and the test clock agree.
"""

from __future__ import annotations

import datetime as dt
import enum
import random
from dataclasses import dataclass

from opd_grpc._gen.opd.v1 import opd_pb2 as pb

UTC = dt.timezone.utc
DATE = dt.date(2030, 1, 7)  # a Monday, far from the wall clock
OPENS_AT = dt.datetime(2030, 1, 7, 7, 0, tzinfo=UTC)  # the desk opens; online bookings start arriving
OVERTIME = dt.timedelta(hours=3)  # how long after the last slot the day may run before it is stopped
NO_SHOW_GRACE = dt.timedelta(minutes=15)  # the server's NO_SHOW_GRACE_PERIOD_MINUTES (its default)

# The mix of sources of non-emergency patients: mostly walk-in and online booking.
SOURCE_WEIGHTS = {pb.SOURCE_WALK_IN: 40, pb.SOURCE_ONLINE_BOOKING: 35, pb.SOURCE_FOLLOW_UP: 13,
                  pb.SOURCE_PAID_PRIORITY: 12}
SPECIALIZATIONS = ("General Medicine", "Paediatrics", "Orthopaedics", "Dermatology", "ENT", "Cardiology",
                   "Gynaecology", "Ophthalmology")
FIRST_NAMES = ("Asha", "Ravi", "Meena", "Arjun", "Kavya", "Suresh", "Divya", "Farhan", "Lakshmi", "Vikram",
               "Neha", "Imran", "Priya", "Gopal", "Anita", "Rahul", "Fatima", "Kiran", "Sunita", "Manoj")
SURNAMES = ("Rao", "Iyer", "Khan", "Menon", "Reddy", "Sharma", "Das", "Nair", "Patel", "Gowda", "Singh",
            "Joshi", "Pillai", "Hegde", "Kulkarni")


class Fate(enum.Enum):
    ATTENDS = "attends"  # comes, checks in when confirmed, is seen
    CANCELS = "cancels"  # cancels later; a walk-in leaves the queue
    NO_SHOW = "no-show"  # never comes; the desk marks it once the grace period is over


@dataclass(frozen=True)
class Scale:
    name: str
    doctors: int
    first_hour: int
    sittings: int  # one-hour slots from first_hour on
    capacity: int
    consultation_minutes: int
    patients_per_doctor: int
    emergencies_per_doctor: int


SMALL = Scale("small", doctors=3, first_hour=9, sittings=3, capacity=6, consultation_minutes=10,
              patients_per_doctor=30, emergencies_per_doctor=2)
LARGE = Scale("large", doctors=20, first_hour=8, sittings=6, capacity=20, consultation_minutes=3,
              patients_per_doctor=160, emergencies_per_doctor=4)


@dataclass(frozen=True)
class SlotPlan:
    starts_at: dt.datetime
    ends_at: dt.datetime
    capacity: int
    consultation_minutes: int

    @property
    def start_time(self) -> str:
        return f"{self.starts_at:%H:%M}"

    @property
    def end_time(self) -> str:
        return f"{self.ends_at:%H:%M}"


@dataclass(frozen=True)
class DoctorPlan:
    name: str
    specialization: str
    slots: tuple[SlotPlan, ...]


@dataclass(frozen=True)
class PatientPlan:
    number: int
    doctor: int  # index into DayPlan.doctors
    name: str
    phone: str
    age: int
    gender: int
    mrn: str
    source: int
    request_at: dt.datetime
    preferred_slot_time: str  # "" lets the server choose
    flexible: bool
    fate: Fate
    arrival_offset: dt.timedelta  # when an attending patient comes, relative to the estimated time at booking
    cancel_at: dt.datetime  # for Fate.CANCELS
    retry_after: dt.timedelta | None  # sends the same AllocateToken again (same request_id) this much later
    cancel_sent_twice: bool  # for Fate.CANCELS: the cancel is retried with its request_id
    asks_twice: bool  # asks again with a new request_id while holding a token: ALREADY_EXISTS
    reuses_request_id: bool  # sends a different request under the same request_id: REQUEST_ID_REUSED
    through_allocate_emergency: bool  # emergencies: AllocateEmergency, else AllocateToken(SOURCE_EMERGENCY)

    def patient(self) -> pb.Patient:
        return pb.Patient(name=self.name, phone=self.phone, age=self.age, gender=self.gender, mrn=self.mrn)


@dataclass(frozen=True)
class CapacityChange:
    doctor: int
    slot: int  # index into the doctor's slots
    at: dt.datetime
    extra: int  # seats added; then the desk tries (and must fail) to cut the slot below its seat holders


@dataclass(frozen=True)
class DayPlan:
    seed: int
    scale: Scale
    doctors: tuple[DoctorPlan, ...]
    patients: tuple[PatientPlan, ...]  # in request order
    capacity_changes: tuple[CapacityChange, ...]

    @property
    def last_slot_end(self) -> dt.datetime:
        return max(s.ends_at for d in self.doctors for s in d.slots)

    @property
    def stops_at(self) -> dt.datetime:
        return self.last_slot_end + OVERTIME


def build_day(seed: int, scale: Scale) -> DayPlan:
    """The same seed and scale always give the same plan."""
    rng = random.Random(seed)
    doctors = tuple(_doctor(rng, i, scale) for i in range(scale.doctors))
    drafts: list[tuple[dt.datetime, int, dict]] = []
    for d, doctor in enumerate(doctors):
        for _ in range(scale.patients_per_doctor):
            source = rng.choices(list(SOURCE_WEIGHTS), weights=list(SOURCE_WEIGHTS.values()))[0]
            drafts.append(_request(rng, d, doctor, source, len(drafts)))
        for _ in range(scale.emergencies_per_doctor):
            drafts.append(_request(rng, d, doctor, pb.SOURCE_EMERGENCY, len(drafts)))
    drafts.sort(key=lambda draft: (draft[0], draft[1]))
    patients = tuple(_patient(rng, number, fields) for number, (_, _, fields) in enumerate(drafts, 1))
    first = doctors[0].slots[0].starts_at
    changes = tuple(CapacityChange(d, 0, first + dt.timedelta(minutes=40), 2) for d in range(0, scale.doctors, 5))
    return DayPlan(seed, scale, doctors, patients, changes)


def _doctor(rng: random.Random, index: int, scale: Scale) -> DoctorPlan:
    day_start = dt.datetime.combine(DATE, dt.time(scale.first_hour), UTC)
    slots = tuple(SlotPlan(day_start + dt.timedelta(hours=h), day_start + dt.timedelta(hours=h + 1),
                           scale.capacity, scale.consultation_minutes) for h in range(scale.sittings))
    name = f"Dr {rng.choice(FIRST_NAMES)} {rng.choice(SURNAMES)}"
    return DoctorPlan(name, SPECIALIZATIONS[index % len(SPECIALIZATIONS)], slots)


def _minute_between(rng: random.Random, start: dt.datetime, end: dt.datetime) -> dt.datetime:
    return start + dt.timedelta(minutes=rng.randint(0, max(int((end - start).total_seconds() // 60), 0)))


def _request(rng: random.Random, d: int, doctor: DoctorPlan, source: int, order: int) -> tuple[dt.datetime, int, dict]:
    """When a request comes and which slot it asks for, by source."""
    slots = doctor.slots
    first, last = slots[0].starts_at, slots[-1]
    minutes = dt.timedelta(minutes=1)
    preferred, flexible = "", False
    if source == pb.SOURCE_ONLINE_BOOKING:  # booked before the clinic opens; early sittings are popular
        at = _minute_between(rng, OPENS_AT, first - 10 * minutes)
        preferred = rng.choices(slots, weights=[2 ** i for i in range(len(slots), 0, -1)])[0].start_time
        flexible = rng.random() < 0.5
    elif source == pb.SOURCE_FOLLOW_UP:
        at = _minute_between(rng, OPENS_AT, first + 30 * minutes)
        preferred = rng.choice([s for s in slots if s.ends_at > at + 10 * minutes]).start_time
    elif source == pb.SOURCE_PAID_PRIORITY:
        at = _minute_between(rng, OPENS_AT + 30 * minutes, last.starts_at)
        if rng.random() < 0.5:
            preferred = rng.choice([s for s in slots if s.ends_at > at + 10 * minutes]).start_time
    elif source == pb.SOURCE_WALK_IN:  # at the desk in person; the server picks the slot
        at = _minute_between(rng, first - 90 * minutes, last.starts_at + 30 * minutes)
    else:  # an emergency, for the sitting in session
        at = _minute_between(rng, first + 10 * minutes, last.ends_at - 20 * minutes)
        preferred = next(s for s in slots if s.starts_at <= at < s.ends_at).start_time
    return at, order, {"doctor": d, "source": source, "request_at": at, "preferred_slot_time": preferred,
                       "flexible": flexible}


def _patient(rng: random.Random, number: int, fields: dict) -> PatientPlan:
    """Who the patient is and what they do after asking."""
    source = fields["source"]
    emergency = source == pb.SOURCE_EMERGENCY
    fate = Fate.ATTENDS if emergency else rng.choices(list(Fate), weights=(78, 12, 10))[0]
    known = source == pb.SOURCE_FOLLOW_UP or rng.random() < 0.2  # a registered patient has a record number
    return PatientPlan(
        number=number,
        name=f"{rng.choice(FIRST_NAMES)} {rng.choice(SURNAMES)}",
        phone=f"+91-98{number:08d}",
        age=rng.randint(1, 90),
        gender=rng.choice((pb.GENDER_FEMALE, pb.GENDER_MALE, pb.GENDER_OTHER)),
        mrn=f"MRN{400000 + number}" if known else "",
        fate=fate,
        arrival_offset=dt.timedelta(minutes=rng.randint(-20, 5)),
        cancel_at=fields["request_at"] + dt.timedelta(minutes=rng.randint(20, 180)),
        retry_after=dt.timedelta(minutes=rng.choice((0, 1, 5, 30))) if rng.random() < 0.12 else None,
        cancel_sent_twice=rng.random() < 0.3,
        asks_twice=not emergency and rng.random() < 0.04,
        reuses_request_id=not emergency and rng.random() < 0.02,
        through_allocate_emergency=rng.random() < 0.5,
        **fields,
    )
