"""The expansion of a weekly pattern into slot requests (opd_grpc/engine/schedule.py), under hypothesis: every
pattern slot on every date of its weekday in the range, none on a holiday, in date and time order; the holidays
reported are those that cost the pattern slots; a range split in two expands to the same requests; and the
overlaps found in a pattern are the pairs of slots that share a weekday and a minute."""

from __future__ import annotations

import datetime as dt

import hypothesis.strategies as st
import pytest
from hypothesis import given

from opd_grpc.engine.errors import AlreadyExists
from opd_grpc.engine.model import DoctorDay, Rules
from opd_grpc.engine.schedule import Holiday, SlotRequest, TemplateSlot, dates, expand, in_order, overlapping

pytestmark = pytest.mark.backend_independent

FIRST = dt.date(2030, 1, 1)
NOW = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)


def hhmm(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


@st.composite
def template_slots(draw: st.DrawFn) -> TemplateSlot:
    start = draw(st.integers(0, 24 * 60 - 2))
    end = draw(st.integers(start + 1, 24 * 60 - 1))
    return TemplateSlot(draw(st.integers(1, 7)), hhmm(start), hhmm(end), draw(st.none() | st.integers(1, 50)),
                        draw(st.none() | st.integers(1, 30)))


def without_overlaps(slots: list[TemplateSlot]) -> list[TemplateSlot]:
    """The slots, but each that shares a minute of its weekday with one kept before it."""
    kept: list[TemplateSlot] = []
    for slot in slots:
        if not any(k.weekday == slot.weekday and minutes(k) & minutes(slot) for k in kept):
            kept.append(slot)
    return kept


def minutes(slot: TemplateSlot) -> set[int]:
    """The minutes of the day the slot takes (its end's minute is the next sitting's)."""
    def of(text: str) -> int:
        hours, mins = text.split(":")
        return int(hours) * 60 + int(mins)
    return set(range(of(slot.start_time), of(slot.end_time)))


patterns = st.lists(template_slots(), max_size=12).map(without_overlaps)
days = st.integers(0, 60).map(lambda n: FIRST + dt.timedelta(days=n))
ranges = st.tuples(days, st.integers(0, 40)).map(lambda r: (r[0], r[0] + dt.timedelta(days=r[1])))
holiday_sets = st.lists(days, max_size=10, unique=True).map(lambda ds: [Holiday(d, f"Holiday {d}") for d in ds])


def weekday_of(date: dt.date) -> int:
    return int(date.strftime("%u"))  # ISO 8601: 1 Monday … 7 Sunday, worked out apart from isoweekday()


@given(patterns, ranges, holiday_sets)
def test_every_pattern_slot_comes_on_every_date_of_its_weekday_but_the_holidays(pattern, span, holidays):
    start, end = span
    expansion = expand(pattern, start, end, holidays)
    closed = {h.date for h in holidays}
    in_range = [start + dt.timedelta(days=n) for n in range((end - start).days + 1)]
    expected = sorted(
        (SlotRequest(date.isoformat(), s.start_time, s.end_time, s.max_capacity, s.consultation_minutes)
         for date in in_range if date not in closed for s in pattern if s.weekday == weekday_of(date)),
        key=lambda r: (r.date, r.start_time))
    assert expansion.requests == expected


@given(patterns, ranges, holiday_sets)
def test_the_holidays_reported_are_those_in_range_on_a_weekday_with_slots(pattern, span, holidays):
    start, end = span
    skipped = expand(pattern, start, end, holidays).skipped_holidays
    busy = {s.weekday for s in pattern}
    assert skipped == sorted((h for h in holidays if start <= h.date <= end and weekday_of(h.date) in busy),
                             key=lambda h: h.date)


@given(patterns, ranges, st.integers(0, 40), holiday_sets)
def test_a_range_split_in_two_expands_to_the_same_requests(pattern, span, cut, holidays):
    start, end = span
    middle = min(start + dt.timedelta(days=cut), end)
    whole = expand(pattern, start, end, holidays)
    first = expand(pattern, start, middle, holidays)
    second = expand(pattern, middle + dt.timedelta(days=1), end, holidays)
    assert first.requests + second.requests == whole.requests
    assert first.skipped_holidays + second.skipped_holidays == whole.skipped_holidays


@given(st.lists(template_slots(), max_size=10))
def test_overlaps_are_the_pairs_that_share_a_weekday_and_a_minute(slots):
    expected = [(i, j) for i in range(len(slots)) for j in range(i + 1, len(slots))
                if slots[i].weekday == slots[j].weekday and minutes(slots[i]) & minutes(slots[j])]
    assert overlapping(slots) == expected


@given(st.lists(template_slots(), max_size=10))
def test_a_pattern_without_overlaps_is_a_week_of_slots_a_doctor_can_have(slots):
    """What SetSlotTemplate lets through, CreateSlots' rule (DoctorDay.add_slot) takes on every date."""
    week = expand(slots, dt.date(2030, 1, 7), dt.date(2030, 1, 13), [])
    by_date: dict[str, DoctorDay] = {}
    try:
        for r in week.requests:
            day = by_date.setdefault(r.date, DoctorDay("DOC001", dt.date.fromisoformat(r.date), Rules(), exists=False))
            day.add_slot(dt.time.fromisoformat(r.start_time), dt.time.fromisoformat(r.end_time), 1, 1, NOW)
    except AlreadyExists:
        assert overlapping(slots)
    else:
        assert overlapping(slots) == []


def test_in_order_is_by_weekday_then_start_time():
    slots = [TemplateSlot(3, "09:00", "10:00"), TemplateSlot(1, "14:00", "15:00"), TemplateSlot(1, "08:30", "09:00")]
    assert [(s.weekday, s.start_time) for s in in_order(slots)] == [(1, "08:30"), (1, "14:00"), (3, "09:00")]


def test_dates_include_both_ends():
    assert list(dates(dt.date(2030, 2, 27), dt.date(2030, 3, 2))) == [
        dt.date(2030, 2, 27), dt.date(2030, 2, 28), dt.date(2030, 3, 1), dt.date(2030, 3, 2)]
    assert list(dates(FIRST, FIRST)) == [FIRST]
