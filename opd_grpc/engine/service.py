"""The service layer: one use case per method, each one unit of work under the lock of its doctor-day.

It checks input, locks, loads the `DoctorDay` (from a cache that the day's event sequence validates),
applies the rule, and hands the changes, their events and the request's idempotency record to storage in
one transaction (SPEC §3.6, §3.7, §9).
"""

from __future__ import annotations

import base64
import collections
import datetime as dt
import enum
import functools
import hashlib
import random
import threading
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from operator import methodcaller
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence, TypeVar

from opd_grpc.engine.access import ROLES, SYSTEM, Actor, ApiKey, KeyRing, new_key
from opd_grpc.engine.audit import CHANGED, AuditEntry, change_entries, denied_entry, named
from opd_grpc.engine.clock import Clock
from opd_grpc.engine.errors import (
    AlreadyExists, Conflict, EngineError, FailedPrecondition, NotFound, OutOfRange, Unauthenticated, Unavailable,
    decode_refusal, encode_refusal, invalid,
)
from opd_grpc.engine.model import (
    GENDERS, Allocation, CallResult, CapacityChange, DayChanges, DayStats, Doctor, DoctorDay, Patient, QueueEvent,
    Release, Rules, Slot, SlotStatus, Source, TokenView, day_of_slot_id, day_of_token_id, skipped,
)
from opd_grpc.engine.parse import Violations, canonical_uuid
from opd_grpc.engine.schedule import (
    WEEKDAYS, Application, Holiday, NewHoliday, SlotRequest, SlotTemplate, TemplateSlot, dates, expand, in_order,
    overlapping,
)
from opd_grpc.engine.watch import EventHub, Snapshot

T = TypeVar("T")
DayKey = tuple[str, dt.date]


@dataclass(frozen=True)
class StoredRequest:
    method: str
    fingerprint: bytes
    response: bytes  # the first answer, or b"" when it was a refusal
    refusal: str | None = None  # errors.encode_refusal of the first answer's refusal


@dataclass(frozen=True)
class Retry:
    """SPEC §9: a request_id, the request's fingerprint, and how to store the first answer."""

    request_id: str
    method: str
    fingerprint: bytes
    encode: Callable[[Any], bytes]

    def __post_init__(self) -> None:
        object.__setattr__(self, "request_id", canonical_uuid(self.request_id))


@dataclass(frozen=True)
class Call:
    """A state-changing call: who makes it and which call it is, for the audit log (SPEC §13), and its
    request_id, if it has one (SPEC §9)."""

    actor: Actor
    method: str
    retry: Retry | None = None
    note: str = ""  # why, as the caller gave it (CancelToken's reason), for the audit log


class Missing(enum.Enum):
    """What a doctor-day without slots is to a call: refused (SLOT_NOT_FOUND), an empty day of a doctor that must
    exist (a list, CallNext's empty queue), or, for a token or slot named by its id, an empty day whatever the
    doctor in the id: the rule then refuses the token or slot it cannot find (TOKEN_NOT_FOUND, SLOT_NOT_FOUND)."""

    REFUSED = enum.auto()
    EMPTY = enum.auto()
    ID_UNKNOWN = enum.auto()


@dataclass(frozen=True)
class Replay:
    """The stored first answer to a repeated request_id."""

    response: bytes


class UnitOfWork(Protocol):
    def commit(self) -> None: ...
    def stored_request(self, request_id: str) -> StoredRequest | None: ...
    def store_request(self, request_id: str, stored: StoredRequest, now: dt.datetime) -> None: ...
    def day_version(self, key: DayKey) -> int | None: ...
    def lock_day(self, key: DayKey, request_id: str | None) -> tuple[int | None, StoredRequest | None]: ...
    def load_day(self, key: DayKey, rules: Rules) -> DoctorDay: ...
    def day_changes(self, key: DayKey, after: int) -> DayChanges | None: ...
    def save_day(self, day: DoctorDay) -> None: ...
    def events_after(self, key: DayKey, after: int, limit: int) -> list[QueueEvent]: ...
    def last_sequences(self, keys: list[DayKey]) -> dict[DayKey, int]: ...
    def event_range(self, key: DayKey) -> tuple[int | None, int]: ...
    def event_days_before(self, date: dt.date) -> list[tuple[DayKey, int, int]]: ...
    def delete_events(self, key: DayKey, through: int) -> int: ...
    def delete_requests(self, before: dt.datetime, limit: int) -> int: ...
    def doctor(self, doctor_id: str) -> Doctor | None: ...
    def add_doctor(self, name: str, specialization: str) -> Doctor: ...
    def doctors(self, offset: int, limit: int) -> list[Doctor]: ...
    def slots(self, doctor_id: str, date: dt.date | None, after: tuple[dt.date, dt.time] | None,
              limit: int) -> list[Slot]: ...
    def slots_on(self, date: dt.date, limit: int) -> tuple[list[Slot], int]: ...
    def doctors_on(self, date: dt.date) -> list[str]: ...
    def days_with_confirmed_tokens(self, since: dt.date | None, after: DayKey | None, before: dt.date,
                                   limit: int) -> list[DayKey]: ...
    def no_shows_swept_to(self) -> dt.date | None: ...
    def set_no_shows_swept_to(self, date: dt.date) -> None: ...
    def add_audit_entry(self, entry: AuditEntry) -> None: ...
    def audit_entries(self, token_id: str, start: dt.datetime | None, end: dt.datetime | None, offset: int,
                      limit: int) -> list[AuditEntry]: ...
    def api_keys(self) -> list[ApiKey]: ...
    def add_api_key(self, key: ApiKey) -> None: ...
    def revoke_api_key(self, key_id: str, now: dt.datetime) -> bool: ...
    def waitlist_lengths(self, date: dt.date) -> dict[str, int]: ...
    def slot_template(self, doctor_id: str) -> tuple[TemplateSlot, ...]: ...
    def set_slot_template(self, template: SlotTemplate) -> None: ...
    def holiday(self, date: dt.date) -> Holiday | None: ...
    def holidays(self, start: dt.date | None, end: dt.date | None, after: dt.date | None,
                 limit: int) -> list[Holiday]: ...
    def add_holiday(self, holiday: Holiday) -> None: ...
    def delete_holiday(self, date: dt.date) -> Holiday | None: ...


class Store(Protocol):
    def unit_of_work(self, write: bool) -> AbstractContextManager[UnitOfWork]: ...


@dataclass(frozen=True)
class AllocateCommand:
    patient: Patient
    doctor_id: str
    date: str
    preferred_slot_time: str
    source: Source | int | None  # None: not given; an int: a number the Source enum does not have
    flexible: bool


@dataclass(frozen=True)
class NewSlot:
    """A checked SlotRequest, with the settings' defaults in place of what it left unset."""

    date: dt.date
    start: dt.time
    end: dt.time
    max_capacity: int
    consultation_minutes: int


@dataclass(frozen=True)
class Page:
    items: list[Any]
    next_page_token: str


MAX_PAGE_SIZE = 1000
MAX_PAGE_OFFSET = 2 ** 31 - 1  # an offset that every database takes
# Bounds that keep a day's total capacity within GetStats' int32 (at most 1440 slots a day); and the last
# estimated time of a slot (seats x consultation minutes on) within 1000 days, so within the years a Timestamp
# holds (with parse.LAST_DATE).
MAX_SLOT_CAPACITY = 1_000_000
MAX_CONSULTATION_MINUTES = 24 * 60
MAX_SLOT_SPAN_MINUTES = 1000 * 24 * 60
NO_SHOW_BACKLOG_DAYS_PER_PASS = 20  # AUTO_NO_SHOW's earlier days at each pass (one a second) while it catches up
MAX_IDENTITY = 300  # the width of tokens.patient_identity
MAX_NAME, MAX_MRN = 200, 64  # a patient's, as given
MAX_REASON = 200  # CancelToken's reason, as the audit log keeps it
MAX_APPLY_DAYS = 366  # the dates ApplySlotTemplate covers at once
# A weekly pattern's slots: 14 a day on every day of the week. One ApplySlotTemplate then makes at most 5,300 slots
# in one transaction (in about 0.2 s on SQLite, where other calls wait for it), and its answer stays far
# under gRPC's 4 MiB.
MAX_TEMPLATE_SLOTS = 100
# A CreateSlots batch: about as many as one ApplySlotTemplate makes at most. A batch of 140,000 took 10 s in one
# transaction, with every other call waiting on SQLite, and answered 8.7 MB, more than a stock client reads.
MAX_CREATE_SLOTS = 5_000
PRUNE_BATCH_ROWS = 1000
PRUNE_PAUSE_SECONDS = 0.01  # between two batches of pruning: the changes waiting for the database go first
MAX_WATCHED_DOCTORS = 50
CONFLICT_ATTEMPTS = 6


def _retried(method: Callable[..., T]) -> Callable[..., T]:
    """Runs a use case again when its unit of work lost a race with another replica's (it changed nothing, and
    the caches of its days were dropped): the second time it sees the winner's rows."""

    @functools.wraps(method)
    def run(self: OPDService, *args: Any) -> T:
        for attempt in range(CONFLICT_ATTEMPTS):
            try:
                return method(self, *args)
            except Conflict as conflict:
                lost = conflict
                time.sleep(random.uniform(0, 0.002 * 2 ** attempt))  # apart, so the racers do not meet again
        raise Unavailable(f"The database could not complete this call ({lost}): it stayed busy with conflicting "
                          "changes, or could not be reached. Try again (a change with the same request_id).",
                          "DATABASE_CONFLICT")

    return run
DEFAULT_PAGE_SIZE = 100
_DAY_CACHE_SIZE = 4096
# A cached day behind by at most this many events is brought up to date with the rows they name; further behind,
# it is read again whole.
_REFRESH_EVENTS = 256


class OPDService:
    def __init__(self, store: Store, clock: Clock, rules: Rules):
        self.store = store
        self.clock = clock
        self.rules = rules
        self._guard = threading.Lock()
        self._day_locks: dict[DayKey, threading.Lock] = {}
        self._days: collections.OrderedDict[DayKey, DoctorDay] = collections.OrderedDict()
        self._doctors: dict[str, Doctor] = {}
        self._doctor_lock = threading.Lock()
        self._no_show_backlog_after: DayKey | None = None  # where AUTO_NO_SHOW's backlog stands while it catches up
        self.events = EventHub()

    # ---- doctors and slots --------------------------------------------------------------------

    @_retried
    def create_doctor(self, name: str, specialization: str, call: Call) -> Doctor | Replay:
        v = Violations()
        name = v.text("name", name)
        specialization = v.text("specialization", specialization)
        self._check(v, call)
        with self._doctor_lock, self.store.unit_of_work(write=True) as uow:
            if (replay := self._replay(uow, call.retry)) is not None:
                return replay
            doctor = uow.add_doctor(name, specialization)
            self._finish(uow, call, doctor, ())
        return doctor

    @_retried
    def get_doctor(self, doctor_id: str) -> Doctor:
        v = Violations()
        v.doctor_id("doctor_id", doctor_id)
        v.check()
        if doctor := self._doctors.get(doctor_id):
            return doctor
        with self.store.unit_of_work(write=False) as uow:
            return self._doctor(uow, doctor_id)

    @_retried
    def list_doctors(self, page_size: int, page_token: str) -> Page:
        query = ("doctors",)
        offset, limit = _page(page_size, page_token, query)
        with self.store.unit_of_work(write=False) as uow:
            return _paged(uow.doctors(offset, limit + 1), offset, limit, query)

    @_retried
    def create_slots(self, doctor_id: str, requests: list[SlotRequest], call: Call) -> list[Slot] | Replay:
        """SPEC §11: a batch on any dates, all or nothing. A holiday takes slots too (an OPD may open on one by
        hand): holidays steer only ApplySlotTemplate."""
        v = Violations()
        v.doctor_id("doctor_id", doctor_id)
        if not requests:
            v.add("slots", "at least one slot is required")
        if len(requests) > MAX_CREATE_SLOTS:
            v.add("slots", f"{len(requests)} slots are more than one call takes ({MAX_CREATE_SLOTS}); send them in "
                           "batches, or make them from a weekly pattern (ApplySlotTemplate)")
            self._check(v, call)
        new = [self._new_slot(v, f"slots[{i}]", r) for i, r in enumerate(requests)]
        if not v.items:
            for i, n in enumerate(new):
                for name, time in self._skipped_times(n):
                    v.add(f"slots[{i}].{name}", f"{time:%H:%M} does not happen on {n.date.isoformat()} in "
                                                f"{self.rules.timezone} (the clocks skip it)")
        self._check(v, call)
        if (pair := next(_overlapping(new), None)) is not None:
            first, later = (new[k] for k in pair)
            raise AlreadyExists(f"slots[{pair[1]}] {later.start:%H:%M}-{later.end:%H:%M} overlaps slots[{pair[0]}] "
                                f"{first.start:%H:%M}-{first.end:%H:%M} of this same request, on "
                                f"{first.date.isoformat()}.", "SLOT_OVERLAP")

        def add(_: UnitOfWork, days: dict[DayKey, DoctorDay], now: dt.datetime) -> list[Slot]:
            return [days[(doctor_id, n.date)].add_slot(n.start, n.end, n.max_capacity, n.consultation_minutes, now)
                    for n in new]

        return self._add_slots(doctor_id, sorted({(doctor_id, n.date) for n in new}), call, add)

    def _skipped_times(self, slot: NewSlot) -> list[tuple[str, dt.time]]:
        """The slot's start and end times that its date does not have in the hospital's zone (model.skipped)."""
        return [(name, time) for name, time in (("start_time", slot.start), ("end_time", slot.end))
                if skipped(slot.date, time, self.rules.timezone, ending=name == "end_time")]

    def _new_slot(self, v: Violations, field: str, r: SlotRequest) -> NewSlot:
        return NewSlot(v.date(f"{field}.date", r.date),
                       *self._slot_shape(v, field, r.start_time, r.end_time, r.max_capacity, r.consultation_minutes))

    def _slot_shape(self, v: Violations, field: str, start_time: str, end_time: str, max_capacity: int | None,
                    consultation_minutes: int | None) -> tuple[dt.time, dt.time, int, int]:
        """SPEC §1: a slot's times (end after start), and its seats and minutes (the settings' defaults when unset)
        within the bounds that keep its figures representable. For a slot of CreateSlots and of a pattern alike."""
        known = len(v.items)
        start, end = v.time(f"{field}.start_time", start_time), v.time(f"{field}.end_time", end_time)
        if len(v.items) == known and end <= start:
            v.add(f"{field}.end_time", f"{end_time} is not after start_time {start_time}")
        capacity = self.rules.default_slot_capacity if max_capacity is None else max_capacity
        if not 0 < capacity <= MAX_SLOT_CAPACITY:
            v.add(f"{field}.max_capacity", f"{capacity} is not a number of seats from 1 to {MAX_SLOT_CAPACITY}")
        minutes = self.rules.average_consultation_minutes if consultation_minutes is None else consultation_minutes
        if not 0 < minutes <= MAX_CONSULTATION_MINUTES:
            v.add(f"{field}.consultation_minutes",
                  f"{minutes} is not a number of minutes from 1 to {MAX_CONSULTATION_MINUTES}")
        elif 0 < capacity <= MAX_SLOT_CAPACITY and capacity * minutes > MAX_SLOT_SPAN_MINUTES:
            v.add(f"{field}.max_capacity", f"{capacity} seats of {minutes} minutes would take more than 1000 days")
        return start, end, capacity, minutes

    def _add_slots(self, doctor_id: str, keys: list[DayKey], call: Call,
                   add: Callable[[UnitOfWork, dict[DayKey, DoctorDay], dt.datetime], T],
                   describe: Callable[[T], str] | None = None) -> T | Replay:
        """Runs `add` on the doctor's days `keys` (new ones made empty) under their locks, and commits the slots it
        added with their events, in one transaction: all of them, or none when it refuses. `describe` gives the
        audit entry's reason (by default, the events)."""
        now = self.clock.now()
        with self._locked(keys) as uow:
            versions = {key: uow.day_version(key) for key in keys}  # the days' rows, locked before the replay check
            if (replay := self._replay(uow, call.retry)) is not None:
                return replay
            try:
                self._doctor(uow, doctor_id)
                days = {key: self._day(uow, key, versions[key], Missing.EMPTY) for key in keys}
                result = add(uow, days, now)
                changed = [day for day in days.values() if day.pending_events]
                for day in changed:
                    uow.save_day(day)
                self._finish(uow, call, result, [e for d in changed for e in d.pending_events],
                             describe(result) if describe else "")
            except EngineError as refusal:
                self._forget(keys)
                self._refused(uow, call.retry, refusal)
                raise
            except BaseException:
                self._forget(keys)
                raise
            for day in changed:
                self.events.publish(day.pending_events)
                day.clear_pending()
        return result

    @_retried
    def list_slots(self, doctor_id: str, date: str, page_size: int, page_token: str) -> Page:
        v = Violations()
        v.doctor_id("doctor_id", doctor_id)
        day = v.date("date", date) if date else None
        v.check()
        query = ("slots after", doctor_id, day)
        after, limit = _keyed_page(page_size, page_token, query, _slot_start)
        with self.store.unit_of_work(write=False) as uow:
            self._doctor(uow, doctor_id)
            return _keyed(uow.slots(doctor_id, day, after, limit + 1), limit, query,
                          lambda s: f"{s.date.isoformat()} {s.start_time:%H:%M}")

    @_retried
    def update_slot_capacity(self, slot_id: str, max_capacity: int, call: Call) -> CapacityChange | Replay:
        v = Violations()
        v.text("slot_id", slot_id)
        if max_capacity == 0:  # proto3 sends a field left out as 0
            v.add("max_capacity", f"is 0 or left out: give a number of seats from 1 to {MAX_SLOT_CAPACITY}")
        elif not 0 < max_capacity <= MAX_SLOT_CAPACITY:
            v.add("max_capacity", f"{max_capacity} is not a number of seats from 1 to {MAX_SLOT_CAPACITY}")
        self._check(v, call)
        return self._change(day_of_slot_id(slot_id), call,
                            lambda day, now: day.set_capacity(slot_id, max_capacity, now, MAX_SLOT_SPAN_MINUTES),
                            Missing.ID_UNKNOWN)

    @_retried
    def get_slot_status(self, slot_id: str) -> SlotStatus:
        v = Violations()
        v.text("slot_id", slot_id)
        v.check()
        return self._read(day_of_slot_id(slot_id), lambda day: day.slot_status(slot_id), Missing.ID_UNKNOWN)

    # ---- weekly patterns of slots, and holidays (schedule.py) ------------------------------------

    @_retried
    def set_slot_template(self, doctor_id: str, slots: list[TemplateSlot], call: Call) -> SlotTemplate | Replay:
        """Replaces the doctor's weekly pattern (no slots: the doctor has none). Each slot is checked as CreateSlots
        checks one, with the defaults of now for what it leaves unset; two slots of one weekday may not overlap."""
        v = Violations()
        v.doctor_id("doctor_id", doctor_id)
        if len(slots) > MAX_TEMPLATE_SLOTS:
            v.add("slots", f"{len(slots)} slots are more than a pattern holds ({MAX_TEMPLATE_SLOTS})")
        for i, slot in enumerate(slots):
            if slot.weekday not in WEEKDAYS:
                given = "is required" if slot.weekday == 0 else f"{slot.weekday} is not a day of the week"
                v.add(f"slots[{i}].weekday", f"{given}: one of {', '.join(f'WEEKDAY_{d}' for d in WEEKDAYS.values())}")
            self._slot_shape(v, f"slots[{i}]", slot.start_time, slot.end_time, slot.max_capacity,
                             slot.consultation_minutes)
        if not v.items:
            for i, j in overlapping(slots):
                v.add(f"slots[{j}]", f"overlaps slots[{i}]: both are on {WEEKDAYS[slots[i].weekday].title()}s")
        self._check(v, call)
        template = SlotTemplate(doctor_id, in_order(slots))

        def store(uow: UnitOfWork) -> SlotTemplate:
            self._doctor(uow, doctor_id)
            uow.set_slot_template(template)
            return template

        return self._write(call, store, lambda t: f"{t.doctor_id}'s slot template: {len(t.slots)} slots")

    @_retried
    def slot_template(self, doctor_id: str) -> SlotTemplate:
        v = Violations()
        v.doctor_id("doctor_id", doctor_id)
        v.check()
        with self.store.unit_of_work(write=False) as uow:
            self._doctor(uow, doctor_id)
            return SlotTemplate(doctor_id, uow.slot_template(doctor_id))

    @_retried
    def apply_slot_template(self, doctor_id: str, start_date: str, end_date: str,
                            call: Call) -> Application | Replay:
        """Creates the doctor's pattern's slots on every date from start_date to end_date (both included) but the
        holidays, through CreateSlots' checks (with the defaults of now) and rule: a slot that overlaps another
        refuses them all. A pattern slot that is there already (same date, start and end) is left as it is."""
        v = Violations()
        v.doctor_id("doctor_id", doctor_id)
        known = len(v.items)
        start, end = v.date("start_date", start_date), v.date("end_date", end_date)
        if len(v.items) == known:
            if end < start:
                v.add("end_date", f"{end_date} is before start_date {start_date}")
            elif (end - start).days >= MAX_APPLY_DAYS:
                v.add("end_date", f"{start_date} to {end_date} is more than {MAX_APPLY_DAYS} days; apply the "
                                  "template to one part of the range after another")
        self._check(v, call)
        with self.store.unit_of_work(write=False) as uow:  # the pattern says which days to lock
            self._doctor(uow, doctor_id)
            pattern = uow.slot_template(doctor_id)
        weekdays = {slot.weekday for slot in pattern}
        keys = [(doctor_id, date) for date in dates(start, end) if date.isoweekday() in weekdays]

        def add(uow: UnitOfWork, days: dict[DayKey, DoctorDay], now: dt.datetime) -> Application:
            if uow.slot_template(doctor_id) != pattern:
                raise Conflict(f"{doctor_id}'s slot template changed meanwhile")  # run again with the new one
            if not pattern:
                raise FailedPrecondition(f"{doctor_id} has no slot template; set its weekly pattern with "
                                         "SetSlotTemplate first.", "NO_SLOT_TEMPLATE")
            expansion = expand(pattern, start, end, uow.holidays(start, end, None, MAX_APPLY_DAYS))
            checks = Violations()
            new = [self._new_slot(checks, f"slot {r.date} {r.start_time}", r) for r in expansion.requests]
            if checks.items:  # the settings' defaults changed since the pattern was set
                first = checks.items[0]
                raise FailedPrecondition(f"{doctor_id}'s slot template does not fit the settings any more "
                                         f"({first.field}: {first.description}); set it again with SetSlotTemplate.",
                                         "SLOT_TEMPLATE_OUT_OF_BOUNDS")
            if (gap := next(((n, times) for n in new if (times := self._skipped_times(n))), None)) is not None:
                slot, times = gap
                raise FailedPrecondition(
                    f"{doctor_id}'s slot template puts a slot {slot.start:%H:%M}-{slot.end:%H:%M} on "
                    f"{slot.date.isoformat()}, where {self.rules.timezone}'s clocks skip "
                    f"{' and '.join(f'{t:%H:%M}' for _, t in times)}; apply the template to the "
                    "dates before and after that one, and make that date's slot with CreateSlots at times that happen.",
                    "SLOT_TIME_SKIPPED")
            created, existing = [], []
            for n in new:
                day = days[(doctor_id, n.date)]
                if (there := day.slot_spanning(n.start, n.end)) is not None:
                    existing.append(there)
                else:
                    created.append(day.add_slot(n.start, n.end, n.max_capacity, n.consultation_minutes, now))
            return Application(doctor_id, start, end, created, existing, expansion.skipped_holidays)

        return self._add_slots(doctor_id, keys, call, add, _applied)

    @_retried
    def create_holiday(self, date: str, name: str, call: Call) -> NewHoliday | Replay:
        """Marks a date on which the OPD is closed: ApplySlotTemplate creates no slot on it. Only patterns heed a
        holiday: the slots already on its date stay, and are in the answer, and CreateSlots still makes slots on it
        (an OPD may open on a holiday by hand)."""
        v = Violations()
        holiday = Holiday(v.date("date", date), v.text("name", name))
        self._check(v, call)

        def add(uow: UnitOfWork) -> NewHoliday:
            if (known := uow.holiday(holiday.date)) is not None:
                raise AlreadyExists(f"{date} is already a holiday ({known.name!r}); delete it first to rename it.",
                                    "HOLIDAY_EXISTS")
            uow.add_holiday(holiday)
            shown, total = uow.slots_on(holiday.date, DEFAULT_PAGE_SIZE)
            return NewHoliday(holiday, shown, total)

        def describe(new: NewHoliday) -> str:
            open_slots = f"; {new.slots_that_day_total} slots of that date stay open" if new.slots_that_day else ""
            return f"holiday {holiday.date.isoformat()} ({named(holiday.name)}) created{open_slots}"

        return self._write(call, add, describe)

    @_retried
    def list_holidays(self, start_date: str, end_date: str, page_size: int, page_token: str) -> Page:
        """The holidays from start_date to end_date (both included; an end left empty is open), by date."""
        v = Violations()
        start = v.date("start_date", start_date) if start_date else None
        end = v.date("end_date", end_date) if end_date else None
        if not v.items and start is not None and end is not None and end < start:
            v.add("end_date", f"{end_date} is before start_date {start_date}")
        v.check()
        query = ("holidays after", start, end)
        after, limit = _keyed_page(page_size, page_token, query, dt.date.fromisoformat)
        with self.store.unit_of_work(write=False) as uow:
            return _keyed(uow.holidays(start, end, after, limit + 1), limit, query, lambda h: h.date.isoformat())

    @_retried
    def delete_holiday(self, date: str, call: Call) -> Holiday | Replay:
        """Removes a holiday; the slots of its date, if any were made by hand, stay as they are."""
        v = Violations()
        day = v.date("date", date)
        self._check(v, call)

        def remove(uow: UnitOfWork) -> Holiday:
            holiday = uow.delete_holiday(day)
            if holiday is None:
                raise NotFound(f"{date} is not a holiday.", "HOLIDAY_NOT_FOUND")
            return holiday

        return self._write(call, remove, lambda h: f"holiday {h.date.isoformat()} ({named(h.name)}) deleted")

    # ---- tokens -------------------------------------------------------------------------------

    @_retried
    def allocate(self, cmd: AllocateCommand, call: Call) -> Allocation | Replay:
        """SPEC §4 (and §5 for SOURCE_EMERGENCY)."""
        v = Violations()
        p = cmd.patient
        patient = Patient(v.text("patient.name", p.name, MAX_NAME),
                          v.text("patient.phone", p.phone, 40, required=False),
                          p.age, p.gender, v.text("patient.mrn", p.mrn, MAX_MRN, required=False))
        if not patient.mrn and not any(ch.isdigit() for ch in patient.phone):
            v.add("patient.phone", "has no digits: give the patient's phone number, or their mrn" if patient.phone
                  else "is required when patient.mrn is not given")
        # Folding can lengthen a text ("ß" is "ss"): the field the schema keeps folded (the mrn, or without one
        # the name) must fit folded too, once it fits as given.
        kept, given, most = (("patient.mrn", patient.mrn, MAX_MRN) if patient.mrn
                             else ("patient.name", patient.name, MAX_NAME))
        if len(given) <= most and len(patient.identity) > MAX_IDENTITY:
            v.add(kept, f"is longer than {MAX_IDENTITY} characters once folded (case and Unicode form)")
        if not 0 <= p.age <= 150:
            v.add("patient.age", f"{p.age} is not an age in years (0 to 150)")
        if p.gender not in GENDERS:
            v.add("patient.gender", f"{p.gender} is not one of GENDER_FEMALE, GENDER_MALE, GENDER_OTHER (or leave "
                                    "it out)")
        v.doctor_id("doctor_id", cmd.doctor_id)
        date = v.date("date", cmd.date)
        preferred = v.time("preferred_slot_time", cmd.preferred_slot_time) if cmd.preferred_slot_time else None
        if not isinstance(cmd.source, Source):
            given = "is required" if cmd.source is None else f"{cmd.source} is not a source"
            v.add("source", f"{given}: one of SOURCE_EMERGENCY, SOURCE_PAID_PRIORITY, SOURCE_FOLLOW_UP, "
                            "SOURCE_ONLINE_BOOKING, SOURCE_WALK_IN")
        self._check(v, call)
        assert isinstance(cmd.source, Source)
        source = cmd.source
        return self._change((cmd.doctor_id, date), call,
                            lambda day, now: day.allocate(patient, source, preferred, cmd.flexible, now))

    @_retried
    def cancel(self, token_id: str, reason: str, call: Call) -> Release | Replay:
        """SPEC §6; the caller's reason goes to the audit log (SPEC §13)."""
        v = Violations()
        # A desk's text area may send lines: the audit log keeps the words on one line.
        note = v.text("reason", " ".join(reason.split()), MAX_REASON, required=False)
        return self._token_change(token_id, replace(call, note=note), lambda day, now: day.cancel(token_id, now), v)

    @_retried
    def mark_no_show(self, token_id: str, call: Call) -> Release | Replay:
        return self._token_change(token_id, call, lambda day, now: day.mark_no_show(token_id, now))

    @_retried
    def check_in(self, token_id: str, call: Call) -> TokenView | Replay:
        return self._token_change(token_id, call, lambda day, now: day.check_in(token_id, now))

    @_retried
    def complete(self, token_id: str, call: Call) -> TokenView | Replay:
        return self._token_change(token_id, call, lambda day, now: day.complete(token_id, now))

    @_retried
    def call_next(self, doctor_id: str, date: str, call: Call) -> CallResult | Replay:
        v = Violations()
        v.doctor_id("doctor_id", doctor_id)
        day = v.date("date", date)
        self._check(v, call)
        return self._change((doctor_id, day), call, lambda d, now: d.call_next(now), Missing.EMPTY)

    @_retried
    def get_token(self, token_id: str) -> TokenView:
        v = Violations()
        v.text("token_id", token_id)
        v.check()
        return self._read(day_of_token_id(token_id), lambda day: day.view(day.token(token_id)), Missing.ID_UNKNOWN)

    @_retried
    def list_tokens(self, doctor_id: str, date: str, page_size: int, page_token: str) -> Page:
        v = Violations()
        v.doctor_id("doctor_id", doctor_id)
        day = v.date("date", date)
        v.check()
        query = ("tokens", doctor_id, day)
        offset, limit = _page(page_size, page_token, query)
        views = self._read((doctor_id, day), lambda d: d.views(), Missing.EMPTY)
        return _paged(views[offset: offset + limit + 1], offset, limit, query)

    @_retried
    def stats(self, date: str, doctor_id: str) -> list[DayStats]:
        v = Violations()
        day = v.date("date", date)
        if doctor_id:
            v.doctor_id("doctor_id", doctor_id)
        v.check()
        if doctor_id:
            doctors = [doctor_id]
        else:
            with self.store.unit_of_work(write=False) as uow:
                doctors = uow.doctors_on(day)
        return [self._read((d, day), DoctorDay.stats, Missing.EMPTY) for d in doctors]

    # ---- watching (SPEC §10; the stream itself is watch.QueueWatch) ------------------------------------

    @_retried
    def watch_plan(self, doctor_ids: list[str], date: str, after_sequence: int | None,
                   after_sequences: dict[str, int]) -> list[tuple[DayKey, int | None]]:
        """Where each doctor's watch starts: None for a snapshot, else the sequence to resume after."""
        v = Violations()
        if not doctor_ids:
            v.add("doctor_ids", "name at least one doctor to watch")
        if len(doctor_ids) > MAX_WATCHED_DOCTORS:
            v.add("doctor_ids", f"{len(doctor_ids)} doctors is more than one stream watches "
                                f"({MAX_WATCHED_DOCTORS}); open another stream")
        for i, doctor_id in enumerate(doctor_ids):
            v.doctor_id(f"doctor_ids[{i}]", doctor_id)
        if len(set(doctor_ids)) < len(doctor_ids):
            v.add("doctor_ids", "names a doctor more than once")
        day = v.date("date", date)
        if after_sequence is not None and after_sequence < 0:
            v.add("after_sequence", f"{after_sequence} is negative; sequences count from 1")
        for doctor_id, sequence in after_sequences.items():
            if doctor_id not in doctor_ids:
                v.add(f"after_sequences[{doctor_id}]", "names a doctor that doctor_ids does not")
            if sequence < 0:
                v.add(f"after_sequences[{doctor_id}]", f"{sequence} is negative; sequences count from 1")
        v.check()
        plan: list[tuple[DayKey, int | None]] = []
        with self.store.unit_of_work(write=False) as uow:
            for doctor_id in doctor_ids:
                self._doctor(uow, doctor_id)
                after = after_sequences.get(doctor_id, after_sequence)
                if after is not None:
                    _check_kept(uow, (doctor_id, day), after,
                                ahead="resume from a sequence this service sent, or omit after_sequence for a snapshot",
                                pruned="omit after_sequence to start again from a snapshot")
                plan.append(((doctor_id, day), after))
        return plan

    @_retried
    def queue_events(self, doctor_id: str, date: str, after_sequence: int, page_size: int, page_token: str) -> Page:
        """A doctor-day's events after `after_sequence` (0: from the first), in sequence order, as WatchQueue sends
        them: the day's history, for reports and for reading back what happened."""
        v = Violations()
        v.doctor_id("doctor_id", doctor_id)
        day = v.date("date", date)
        if after_sequence < 0:
            v.add("after_sequence", f"{after_sequence} is negative; sequences count from 1 (0: from the first)")
        v.check()
        query = ("events", doctor_id, day, after_sequence)
        offset, limit = _page(page_size, page_token, query)
        after = after_sequence + offset  # a day's sequences have no gaps (SPEC §3.6): the page starts there
        with self.store.unit_of_work(write=False) as uow:
            self._doctor(uow, doctor_id)
            _check_kept(uow, (doctor_id, day), after, ahead="ask from a sequence this service sent (0: the first)",
                        pruned="ask from a later after_sequence")
            return _paged(uow.events_after((doctor_id, day), after, limit + 1), offset, limit, query)

    @_retried
    def queue_snapshot(self, key: DayKey) -> Snapshot:
        return self._read(key, lambda day: Snapshot(key[0], key[1], day.last_sequence, day.views()), Missing.EMPTY)

    @_retried
    def events_after(self, key: DayKey, after: int, limit: int) -> list[QueueEvent]:
        with self.store.unit_of_work(write=False) as uow:
            return uow.events_after(key, after, limit)

    @_retried
    def last_sequences(self, keys: list[DayKey]) -> dict[DayKey, int]:
        """The stored last event sequence of each day that has one (the watchers' catch-up)."""
        with self.store.unit_of_work(write=False) as uow:
            return uow.last_sequences(keys)

    @_retried
    def mark_overdue_no_shows(self) -> int:
        """Marks overdue confirmed tokens no-show (AUTO_NO_SHOW); answers how many. A pass looks at today and
        yesterday (a grace period may end after midnight). The store keeps the sweep date: the date of the last pass
        that had no earlier days left to look at. Once the service clock's date is past it (each midnight, a server
        that was down, a test clock set ahead), passes also look at the days from the day before the sweep date to
        the day before yesterday that still hold a confirmed token, a few at a time, so that a long backlog does not
        hold the server up. Older days were looked at after the day that followed them: what they still hold
        (patients who came, seats given after the sitting, a grace that ends later than that) is the desk's, and a
        restarted server does not load and lock them again. A test clock set back moves the sweep date back at the
        next pass; set back and ahead again between two passes (within a second), the days booked meanwhile are not
        looked at."""
        today = self.clock.now().astimezone(self.rules.timezone).date()
        yesterday = today - dt.timedelta(days=1)
        backlog: list[DayKey] = []
        with self.store.unit_of_work(write=False) as uow:
            keys = [(doctor_id, date) for date in (yesterday, today) for doctor_id in uow.doctors_on(date)]
            swept_to = uow.no_shows_swept_to()
            catching_up = swept_to is None or swept_to < today
            if catching_up:
                since = None if swept_to is None else swept_to - dt.timedelta(days=1)
                backlog = uow.days_with_confirmed_tokens(since, self._no_show_backlog_after, yesterday,
                                                         NO_SHOW_BACKLOG_DAYS_PER_PASS)
        marked = 0
        for key in backlog + keys:
            released = self._change(key, Call(SYSTEM, "AutoNoShow"), lambda day, now: day.mark_overdue_no_shows(now))
            assert not isinstance(released, Replay)
            marked += len(released)
        if catching_up and len(backlog) == NO_SHOW_BACKLOG_DAYS_PER_PASS:
            self._no_show_backlog_after = backlog[-1]  # more next pass
            return marked
        self._no_show_backlog_after = None
        if swept_to != today:  # once a day, or when a test clock moves (back too: then the days after it are open)
            with self.store.unit_of_work(write=True) as uow:
                uow.set_no_shows_swept_to(today)
                uow.commit()
        return marked

    # ---- who may do what, and what they did (SPEC §13) ------------------------------------------------

    @_retried
    def key_ring(self) -> KeyRing:
        """The keys as they are stored now (a server reloads them every API_KEYS_REFRESH_SECONDS)."""
        with self.store.unit_of_work(write=False) as uow:
            return KeyRing(uow.api_keys())

    def add_key(self, name: str, role: str, actor: Actor) -> tuple[ApiKey, str]:
        """A new key with one role; answers it and its text, which is shown once and stored only hashed."""
        v = Violations()
        name = " ".join(v.text("name", name).split())  # one line: `keys list` shows it as a row of its own
        if role not in ROLES:
            v.add("role", f"{role!r} is not a role; one of {', '.join(ROLES)}")
        v.check()
        now = self.clock.now()
        key, text = new_key(name, role, now)
        with self.store.unit_of_work(write=True) as uow:
            uow.add_api_key(key)
            uow.add_audit_entry(AuditEntry(now, CHANGED, actor.key_id, actor.role, "AddApiKey",
                                           reason=f"key {key.key_id} ({role}, {named(name)}) added"))
            uow.commit()
        return key, text

    def list_keys(self) -> list[ApiKey]:
        with self.store.unit_of_work(write=False) as uow:
            return uow.api_keys()

    def revoke_key(self, key_id: str, actor: Actor) -> None:
        now = self.clock.now()
        with self.store.unit_of_work(write=True) as uow:
            if not uow.revoke_api_key(key_id, now):
                raise NotFound(f"No key that is not already revoked has the id {key_id!r}.", "API_KEY_NOT_FOUND")
            uow.add_audit_entry(AuditEntry(now, CHANGED, actor.key_id, actor.role, "RevokeApiKey",
                                           reason=f"key {key_id} revoked"))
            uow.commit()

    @_retried
    def record_denied(self, actor: Actor, method: str, request_id: str, refusal: EngineError) -> None:
        """A call refused for its key or role leaves a trace of its own (it changed nothing else)."""
        message = refusal.message
        if isinstance(refusal, Unauthenticated) and refusal.presented:
            message += f" (presented: {refusal.presented})"
        with self.store.unit_of_work(write=True) as uow:
            uow.add_audit_entry(denied_entry(actor, method, request_id, self.clock.now(), refusal.reason, message))
            uow.commit()

    @_retried
    def audit_entries(self, token_id: str, start_time: tuple[int, int] | None, end_time: tuple[int, int] | None,
                      page_size: int, page_token: str) -> Page:
        """The audit log for one token, or a time range [start, end) given as (seconds, nanos) since the epoch,
        or both; oldest first."""
        v = Violations()
        v.text("token_id", token_id, 40, required=False)
        start, end = v.instant("start_time", start_time), v.instant("end_time", end_time)
        if start is not None and end is not None and end <= start:
            v.add("end_time", "is not after start_time")
        v.check()
        query = ("audit", token_id, start, end)
        offset, limit = _page(page_size, page_token, query)
        with self.store.unit_of_work(write=False) as uow:
            return _paged(uow.audit_entries(token_id, start, end, offset, limit + 1), offset, limit, query)

    @_retried
    def waitlist_lengths(self) -> dict[str, int]:
        """Today's WAITLISTED tokens per doctor (a metric), from the database: every replica's, not this one's."""
        with self.store.unit_of_work(write=False) as uow:
            return uow.waitlist_lengths(self.clock.now().astimezone(self.rules.timezone).date())

    # ---- history pruned by age (Rules.event_retention_days, request_retention_hours) ------------------

    def prune_history(self, stop: threading.Event | None = None) -> tuple[int, int]:
        """Deletes the queue events of doctor-days whose date is more than `event_retention_days` before today,
        and the stored answers of request_ids older than `request_retention_hours`; answers how many of each.

        It deletes `PRUNE_BATCH_ROWS` rows a transaction and pauses between them (on a thread of its own: the
        pause blocks), so that no change waits long behind it; setting `stop` ends it after the batch in hand.
        A day's events go together, by the day's date; its doctor_days row (last_sequence) and its tokens stay,
        so a watcher resuming into them is answered OUT_OF_RANGE (watch_plan) and a snapshot still works. A
        request_id whose answer is gone is a new request if it comes again."""
        now = self.clock.now()
        events_before = now.astimezone(self.rules.timezone).date() - dt.timedelta(days=self.rules.event_retention_days)
        requests_before = now - dt.timedelta(hours=self.rules.request_retention_hours)
        stop = stop or threading.Event()
        with self.store.unit_of_work(write=False) as uow:
            old_days = uow.event_days_before(events_before)
        events = requests = 0
        for key, first, last in old_days:
            for through in range(first - 1 + PRUNE_BATCH_ROWS, last + PRUNE_BATCH_ROWS, PRUNE_BATCH_ROWS):
                if stop.is_set():
                    return events, requests
                events += self._prune_batch(methodcaller("delete_events", key, through), stop)
        while not stop.is_set():
            deleted = self._prune_batch(methodcaller("delete_requests", requests_before, PRUNE_BATCH_ROWS), stop)
            requests += deleted
            if deleted < PRUNE_BATCH_ROWS:
                break
        return events, requests

    def _prune_batch(self, delete: Callable[[UnitOfWork], int], stop: threading.Event) -> int:
        with self.store.unit_of_work(write=True) as uow:
            deleted = delete(uow)
            uow.commit()
        stop.wait(PRUNE_PAUSE_SECONDS)
        return deleted

    # ---- the unit of work -----------------------------------------------------------------------

    def _check(self, v: Violations, call: Call) -> None:
        if call.retry is not None:
            v.request_id(call.retry.request_id)
        v.check()

    def _change(self, key: DayKey, call: Call, rule: Callable[[DoctorDay, dt.datetime], T],
                missing: Missing = Missing.REFUSED) -> T | Replay:
        """Runs one rule on one doctor-day and commits its changes, events and idempotency record; `missing` says
        what a day without slots is."""
        with self._locked([key]) as uow:
            # The day's row is locked first (PostgreSQL): a copy of this request that another replica committed
            # meanwhile is then visible to the replay check, instead of being run a second time.
            version, stored = uow.lock_day(key, call.retry.request_id if call.retry else None)
            if call.retry is not None and (replay := self._replay_of(call.retry, stored)) is not None:
                return replay
            try:
                day = self._day(uow, key, version, missing)
                result = rule(day, self.clock.now())
                if day.pending_events or call.retry is not None:  # else nothing changed (AUTO_NO_SHOW, none due)
                    uow.save_day(day)
                    self._finish(uow, call, result, day.pending_events)
            except EngineError as refusal:
                self._forget([key])
                self._refused(uow, call.retry, refusal)
                raise
            except BaseException:
                self._forget([key])
                raise
            self.events.publish(day.pending_events)
            day.clear_pending()
        return result

    def _write(self, call: Call, change: Callable[[UnitOfWork], T], describe: Callable[[T], str]) -> T | Replay:
        """A change outside the doctor-days (a pattern, a holiday) in one transaction with its request_id's answer
        and its audit entry (`describe` gives the reason). `change` refuses before it writes anything: its refusal
        is the request's first answer too."""
        with self.store.unit_of_work(write=True) as uow:
            if (replay := self._replay(uow, call.retry)) is not None:
                return replay
            try:
                result = change(uow)
            except EngineError as refusal:
                self._refused(uow, call.retry, refusal)
                raise
            self._finish(uow, call, result, (), describe(result))
        return result

    def _token_change(self, token_id: str, call: Call, rule: Callable[[DoctorDay, dt.datetime], T],
                      v: Violations | None = None) -> T | Replay:
        """A rule on one token's day; `v` holds the call's other fields' problems, to be named with the id's."""
        v = v if v is not None else Violations()
        v.text("token_id", token_id)
        self._check(v, call)
        return self._change(day_of_token_id(token_id), call, rule, Missing.ID_UNKNOWN)

    def _read(self, key: DayKey, query: Callable[[DoctorDay], T], missing: Missing = Missing.REFUSED) -> T:
        with self._locked([key], write=False) as uow:
            return query(self._day(uow, key, uow.day_version(key), missing))

    def _locked(self, keys: list[DayKey], write: bool = True) -> AbstractContextManager[UnitOfWork]:
        """The doctor-day locks, taken in sorted order (no deadlock), then a unit of work."""
        return _Locked([self._lock_for(k) for k in sorted(keys)], self.store.unit_of_work(write))

    def _lock_for(self, key: DayKey) -> threading.Lock:
        with self._guard:
            lock = self._day_locks.get(key)
            if lock is None:
                lock = self._day_locks[key] = threading.Lock()
            return lock

    def _day(self, uow: UnitOfWork, key: DayKey, version: int | None,
             missing: Missing = Missing.REFUSED) -> DoctorDay:
        """The doctor-day, from the cache when its event sequence is still the stored `version` (read by
        `uow.day_version`: in a change, with the day's row locked on PostgreSQL; in a read, from its snapshot)."""
        if version is None:
            if missing is not Missing.ID_UNKNOWN:
                self._doctor(uow, key[0])
            if missing is Missing.REFUSED:
                raise NotFound(f"{key[0]} has no slots on {key[1].isoformat()}; create slots first.",
                               "SLOT_NOT_FOUND")
            return DoctorDay(key[0], key[1], self.rules, exists=False)
        with self._guard:
            day = self._days.get(key)
            if day is not None and day.last_sequence == version:
                self._days.move_to_end(key)
                return day
        # Behind: another replica changed the day since this one read it (PostgreSQL). Its events name the rows
        # that changed, so only those are read, not the whole day, while the day's lock is held.
        if day is not None and day.last_sequence < version <= day.last_sequence + _REFRESH_EVENTS and \
                (changes := uow.day_changes(key, day.last_sequence)) is not None:
            day = day.refreshed(changes)
        else:
            day = uow.load_day(key, self.rules)
        with self._guard:
            self._days[key] = day
            while len(self._days) > _DAY_CACHE_SIZE:
                self._days.popitem(last=False)
        return day

    def _forget(self, keys: Iterable[DayKey]) -> None:
        with self._guard:
            for key in keys:
                self._days.pop(key, None)

    def _doctor(self, uow: UnitOfWork, doctor_id: str) -> Doctor:
        doctor = self._doctors.get(doctor_id) or uow.doctor(doctor_id)
        if doctor is None:
            raise NotFound(f"No doctor has the id {doctor_id!r}.", "DOCTOR_NOT_FOUND")
        self._doctors[doctor_id] = doctor
        return doctor

    def _replay(self, uow: UnitOfWork, retry: Retry | None) -> Replay | None:
        return None if retry is None else self._replay_of(retry, uow.stored_request(retry.request_id))

    @staticmethod
    def _replay_of(retry: Retry, stored: StoredRequest | None) -> Replay | None:
        """The first answer stored under the request's request_id, if one is (SPEC §9)."""
        if stored is None:
            return None
        if stored.method != retry.method or stored.fingerprint != retry.fingerprint:
            raise FailedPrecondition(f"request_id {retry.request_id} was already used for a different request "
                                     f"({stored.method}); use a new UUID for a new request.", "REQUEST_ID_REUSED")
        if stored.refusal is not None:
            raise decode_refusal(stored.refusal)
        return Replay(stored.response)

    def _refused(self, uow: UnitOfWork, retry: Retry | None, refusal: EngineError) -> None:
        """SPEC §9: a refusal that the state decided is the request's first answer too, stored under the day's
        lock like any answer; so a copy delayed in the network can never book after the caller was told no."""
        if retry is not None and not isinstance(refusal, Unavailable):  # an unknown outcome decides nothing
            uow.store_request(retry.request_id, StoredRequest(retry.method, retry.fingerprint, b"",
                                                              encode_refusal(refusal)), self.clock.now())
            uow.commit()

    def _finish(self, uow: UnitOfWork, call: Call, result: Any, events: Sequence[QueueEvent], reason: str = "") -> None:
        """Stores the answer for its request_id (SPEC §9) and the change's audit entries (SPEC §13, with `reason`
        when given), then commits: all in the change's own transaction."""
        now, retry = self.clock.now(), call.retry
        if retry is not None:
            uow.store_request(retry.request_id, StoredRequest(retry.method, retry.fingerprint, retry.encode(result)),
                              now)
        for entry in change_entries(call.actor, call.method, retry.request_id if retry else "", now, result, events,
                                    reason, call.note):
            uow.add_audit_entry(entry)
        uow.commit()


class _Locked(AbstractContextManager):
    def __init__(self, locks: list[threading.Lock], uow: AbstractContextManager[UnitOfWork]):
        self.locks = locks
        self.uow_cm = uow

    def __enter__(self) -> UnitOfWork:
        for lock in self.locks:
            lock.acquire()
        try:
            return self.uow_cm.__enter__()
        except BaseException:
            self._release()
            raise

    def __exit__(self, *exc: Any) -> None:
        try:
            self.uow_cm.__exit__(*exc)
        finally:
            self._release()

    def _release(self) -> None:
        for lock in reversed(self.locks):
            lock.release()


def _applied(a: Application) -> str:
    holidays = len(a.skipped_holidays)
    return (f"applied {a.doctor_id} {a.start.isoformat()}..{a.end.isoformat()}: {len(a.created)} created, "
            f"{len(a.existing)} existing, {holidays} {'holiday' if holidays == 1 else 'holidays'}")


def _check_kept(uow: UnitOfWork, key: DayKey, after: int, ahead: str, pruned: str) -> None:
    """SPEC §10: a day's events can be read after `after` only within the history kept: not past its last event
    (SEQUENCE_AHEAD), nor from before its oldest kept one (HISTORY_NOT_KEPT: pruned by age). `ahead` and `pruned`
    tell the caller what to do instead."""
    doctor_id, date = key
    first, last = uow.event_range(key)
    if after > last:
        raise OutOfRange(f"Sequence {after} is past {doctor_id}'s last event on {date.isoformat()} ({last}); "
                         f"{ahead}.", "SEQUENCE_AHEAD")
    kept_from = last + 1 if first is None else first  # None: all pruned (the day keeps its last)
    if after < kept_from - 1:
        raise OutOfRange(f"{doctor_id}'s events on {date.isoformat()} before sequence {kept_from} are no longer "
                         f"kept; {pruned}.", "HISTORY_NOT_KEPT")


def _overlapping(new: list[NewSlot]) -> Iterator[tuple[int, int]]:
    """Pairs (i, j) of a batch's slots whose times overlap on one date, each later-starting slot j with one slot i
    it overlaps: sorted once, for a batch may hold thousands."""
    reach: int | None = None  # of the date's slots so far, the one that ends last
    for j in sorted(range(len(new)), key=lambda k: (new[k].date, new[k].start)):
        same_date = reach is not None and new[reach].date == new[j].date
        if same_date and new[j].start < new[reach].end:
            yield reach, j
        if not same_date or new[j].end > new[reach].end:
            reach = j


def _slot_start(position: str) -> tuple[dt.date, dt.time]:
    date, time = position.split(" ")
    return dt.date.fromisoformat(date), dt.time.fromisoformat(time)


def _page(page_size: int, page_token: str, query: tuple[Any, ...]) -> tuple[int, int]:
    """The offset and size of the page asked for, in a list that only grows at its end (doctors, tokens, events,
    audit entries): an offset there stays where it was."""
    position, limit = _page_position(page_size, page_token, query)
    try:
        offset = int(position or 0)
    except ValueError:
        offset = -1
    if not 0 <= offset <= MAX_PAGE_OFFSET:
        raise invalid("page_token", _NOT_A_PAGE_TOKEN)
    return offset, limit


def _paged(rows: list, offset: int, limit: int, query: tuple[Any, ...]) -> Page:
    return Page(rows[:limit], _page_token(query, str(offset + limit)) if len(rows) > limit else "")


def _keyed_page(page_size: int, page_token: str, query: tuple[Any, ...],
                key: Callable[[str], T]) -> tuple[T | None, int]:
    """The last key shown before the page asked for (None: the first page), and its size, in a list that may
    change in its middle (slots made, holidays deleted): a page then starts after that key, so that a change
    between two pages neither repeats a row nor skips one, as an offset would."""
    position, limit = _page_position(page_size, page_token, query)
    try:
        return (None if position is None else key(position)), limit
    except ValueError:
        raise invalid("page_token", _NOT_A_PAGE_TOKEN) from None


def _keyed(rows: list, limit: int, query: tuple[Any, ...], key: Callable[[Any], str]) -> Page:
    return Page(rows[:limit], _page_token(query, key(rows[limit - 1])) if len(rows) > limit else "")


_NOT_A_PAGE_TOKEN = "is not a token from a previous page; start again without it"


def _page_position(page_size: int, page_token: str, query: tuple[Any, ...]) -> tuple[str | None, int]:
    """Where a page token says the page starts (None without one), and the page's size. A page token holds its
    list's `query` (the list and its filters) as a digest: one used with other filters would page through a list it
    does not belong to."""
    if page_size < 0:
        raise invalid("page_size", f"{page_size} is negative")
    position = None
    if page_token:
        try:
            digest, colon, position = base64.urlsafe_b64decode(page_token.encode()).decode().partition(":")
        except ValueError:
            raise invalid("page_token", _NOT_A_PAGE_TOKEN) from None
        if not colon:
            raise invalid("page_token", _NOT_A_PAGE_TOKEN)
        if digest != _query_digest(query):
            raise invalid("page_token", "is not a token of this list (its filters differ, or it is from before an "
                                        "upgrade): send the first page's filters with it, or start again without it")
    return position, min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _page_token(query: tuple[Any, ...], position: str) -> str:
    return base64.urlsafe_b64encode(f"{_query_digest(query)}:{position}".encode()).decode()


def _query_digest(query: tuple[Any, ...]) -> str:
    return hashlib.blake2s(repr(query).encode(), digest_size=6).hexdigest()
