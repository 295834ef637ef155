"""Weekly patterns of slots (slot templates) and holidays: the pure part of ApplySlotTemplate.

A doctor's pattern says which slots each weekday has; `expand` turns it into the slot requests of a range of
dates, as CreateSlots takes them, leaving the holidays out. Holidays steer only this expansion: CreateSlots still
makes a slot on a holiday (an OPD may open on one by hand), and a holiday marked later, or removed, leaves the
slots of its date as they are. No gRPC, no SQL.
"""

from __future__ import annotations

import datetime as dt
import itertools
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from opd_grpc.engine.model import Slot, overlap

# A pattern's weekdays are ISO 8601's numbers (`date.isoweekday()`), as the API's Weekday enum numbers them.
WEEKDAYS = {1: "MONDAY", 2: "TUESDAY", 3: "WEDNESDAY", 4: "THURSDAY", 5: "FRIDAY", 6: "SATURDAY", 7: "SUNDAY"}


@dataclass(frozen=True)
class SlotRequest:
    """One slot to create, as a caller asks for it (checked by OPDService); unset capacity and minutes take the
    settings' defaults."""

    date: str
    start_time: str
    end_time: str
    max_capacity: int | None
    consultation_minutes: int | None


@dataclass(frozen=True)
class TemplateSlot:
    """One slot of a weekly pattern: every `weekday` (1 Monday … 7 Sunday), from start_time to end_time (HH:MM).
    Capacity and minutes left unset take the settings' defaults when the pattern is applied, not when it is set."""

    weekday: int
    start_time: str
    end_time: str
    max_capacity: int | None = None
    consultation_minutes: int | None = None


@dataclass(frozen=True)
class SlotTemplate:
    doctor_id: str
    slots: tuple[TemplateSlot, ...]  # by weekday and start time (`in_order`)


@dataclass(frozen=True)
class Holiday:
    """A date on which the OPD is closed."""

    date: dt.date
    name: str


@dataclass(frozen=True)
class NewHoliday:
    """A holiday as created, with the slots its date already had, every doctor's (the first few, and how many in
    all): they stay open (a holiday steers only ApplySlotTemplate), so the desk is shown what it may want to
    cancel."""

    holiday: Holiday
    slots_that_day: list[Slot]
    slots_that_day_total: int


@dataclass(frozen=True)
class Expansion:
    requests: list[SlotRequest]  # by date and start time
    skipped_holidays: list[Holiday]  # the holidays of the range on which the pattern has slots, by date


@dataclass(frozen=True)
class Application:
    """What applying a pattern to a range of dates did."""

    doctor_id: str
    start: dt.date
    end: dt.date
    created: list[Slot]  # by date and start time
    existing: list[Slot]  # the pattern's slots that were there already (same date, start and end), left as they are
    skipped_holidays: list[Holiday]


def in_order(slots: Iterable[TemplateSlot]) -> tuple[TemplateSlot, ...]:
    """A pattern's slots by weekday and start time (HH:MM text sorts as the times do)."""
    return tuple(sorted(slots, key=lambda s: (s.weekday, s.start_time)))


def overlapping(slots: Sequence[TemplateSlot]) -> list[tuple[int, int]]:
    """The pairs (i, j), i < j, of a pattern's slots that overlap on their weekday: they would give a doctor
    overlapping slots on every such date (SPEC §1). The slots' times must be valid HH:MM."""
    times = [(dt.time.fromisoformat(s.start_time), dt.time.fromisoformat(s.end_time)) for s in slots]
    return [(i, j) for i, j in itertools.combinations(range(len(slots)), 2)
            if slots[i].weekday == slots[j].weekday and overlap(*times[i], *times[j])]


def dates(start: dt.date, end: dt.date) -> Iterator[dt.date]:
    """Every date from `start` to `end`, both included."""
    for n in range((end - start).days + 1):
        yield start + dt.timedelta(days=n)


def expand(slots: Iterable[TemplateSlot], start: dt.date, end: dt.date, holidays: Iterable[Holiday]) -> Expansion:
    """The pattern's slots on every date from `start` to `end` (both included) that is not a holiday, as
    CreateSlots requests; and the holidays of the range that this left without their slots."""
    by_weekday: dict[int, list[TemplateSlot]] = {}
    for slot in in_order(slots):
        by_weekday.setdefault(slot.weekday, []).append(slot)
    closed = {h.date: h for h in holidays}
    requests: list[SlotRequest] = []
    skipped: list[Holiday] = []
    for date in dates(start, end):
        pattern = by_weekday.get(date.isoweekday())
        if not pattern:
            continue
        if date in closed:
            skipped.append(closed[date])
            continue
        requests += [SlotRequest(date.isoformat(), s.start_time, s.end_time, s.max_capacity, s.consultation_minutes)
                     for s in pattern]
    return Expansion(requests, skipped)
