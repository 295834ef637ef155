"""The slot pattern language of `opdctl slots add` and `opdctl templates set` (clients/opdctl/pattern.py)."""

from __future__ import annotations

import datetime as dt
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clients.opdctl.pattern import PatternError, parse, slot_specs, template_slots, week_of
from opd_grpc._gen.opd.v1 import opd_pb2 as pb

pytestmark = pytest.mark.backend_independent

MONDAY = dt.date(2030, 1, 7)
WEEK = week_of(MONDAY)
DAYS = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]


def slots(text: str, dates: list[dt.date] = WEEK, minutes: int | None = None) -> list[tuple[str, str, str, int | None]]:
    """(date, start, end, seats) of each slot the pattern makes on `dates`."""
    return [(s.date, s.start_time, s.end_time, s.max_capacity if s.HasField("max_capacity") else None)
            for s in slot_specs(parse(text), dates, minutes)]


def test_the_example_makes_three_hourly_slots_of_ten_seats_on_each_weekday():
    made = slots("Mon-Fri 09:00-12:00/60 x10")
    assert len(made) == 15
    assert {date for date, *_ in made} == {f"2030-01-{d:02d}" for d in range(7, 12)}
    assert made[:3] == [("2030-01-07", "09:00", "10:00", 10), ("2030-01-07", "10:00", "11:00", 10),
                        ("2030-01-07", "11:00", "12:00", 10)]


def test_parts_give_each_day_its_own_hours_and_slots_come_by_date_and_time():
    made = slots("Sat 09:00-11:00 x5; Mon,Wed 14:00-15:00/30")
    assert made == [("2030-01-07", "14:00", "14:30", None), ("2030-01-07", "14:30", "15:00", None),
                    ("2030-01-09", "14:00", "14:30", None), ("2030-01-09", "14:30", "15:00", None),
                    ("2030-01-12", "09:00", "11:00", 5)]


@pytest.mark.parametrize("days, weekdays", [
    ("Sat-Mon", [6, 7, 1]),
    ("monday,WEDNESDAY,Fri", [1, 3, 5]),
    ("Mon - Wed , Sun", [1, 2, 3, 7]),
    ("Tue-Tue,Tue", [2]),
])
def test_days_are_names_lists_and_ranges_that_may_wrap_past_sunday(days: str, weekdays: list[int]):
    assert [s.weekday for s in template_slots(parse(f"{days} 09:00-10:00"), None)] == sorted(weekdays)


def test_without_days_a_part_is_every_day_and_a_single_date_takes_the_parts_of_its_weekday():
    assert len(slots("09:00-10:00")) == 7
    wednesday = [dt.date(2030, 1, 9)]
    assert slots("Mon 08:00-09:00; Wed 10:00-11:00; 12:00-13:00", wednesday) == [
        ("2030-01-09", "10:00", "11:00", None), ("2030-01-09", "12:00", "13:00", None)]
    assert slots("Mon-Fri 09:00-10:00", [dt.date(2030, 1, 12)]) == []  # a Saturday


def test_spaces_and_a_one_digit_hour_are_read_and_consultation_minutes_go_on_every_slot():
    specs = slot_specs(parse("  mon   9:00 - 10:00 / 30   x3 ;"), WEEK, 7)
    assert [(s.start_time, s.end_time, s.max_capacity, s.consultation_minutes) for s in specs] == [
        ("09:00", "09:30", 3, 7), ("09:30", "10:00", 3, 7)]


def test_a_template_is_the_same_pattern_by_weekday():
    template = template_slots(parse("Mon-Fri 09:00-11:00/60 x10; Sat 09:00-11:00 x5"), 10)
    assert len(template) == 11
    assert (template[0].weekday, template[0].start_time, template[0].max_capacity) == (pb.WEEKDAY_MONDAY, "09:00", 10)
    assert [(s.weekday, s.end_time, s.max_capacity) for s in template if s.weekday == pb.WEEKDAY_SATURDAY] == [
        (pb.WEEKDAY_SATURDAY, "11:00", 5)]
    assert {s.consultation_minutes for s in template} == {10}


@pytest.mark.parametrize("date", [dt.date(2030, 1, 7), dt.date(2030, 1, 10), dt.date(2030, 1, 13)])
def test_a_week_runs_from_the_monday_to_the_sunday_that_hold_the_date(date: dt.date):
    assert week_of(date) == [MONDAY + dt.timedelta(days=n) for n in range(7)]


@pytest.mark.parametrize("text, says", [
    ("", "the pattern is empty"),
    (" ; ", "the pattern is empty"),
    ("Mon-Fri", "cannot read 'Mon-Fri'"),
    ("Mon-Fri 09:00", "cannot read"),
    ("Mon-Fri 09:00-12:00 10", "cannot read"),
    ("Mox 09:00-10:00", "'mox' is not a day"),
    ("Mon-Wed-Fri 09:00-10:00", "'mon-wed-fri' is not a day or a range"),
    ("Mon-,Tue 09:00-10:00", "'' is not a day"),
    ("Mon 25:00-26:00", "'25:00' is not a time"),
    ("Mon 09:60-10:00", "'09:60' is not a time"),
    ("Mon 10:00-09:00", "must end after it starts"),
    ("Mon 09:00-09:00", "must end after it starts"),
    ("Mon 09:00-10:00/45", "60 minutes, which does not split into slots of 45 minutes"),
    ("Mon 09:00-10:00/0", "does not split into slots of 0 minutes"),
    ("Mon 09:00-10:00 x0", "at least one seat"),
    ("Mon 09:00-10:00; Tue 9-10", "cannot read 'Tue 9-10'"),
])
def test_a_pattern_that_cannot_be_read_says_which_part_and_why(text: str, says: str):
    with pytest.raises(PatternError, match=re.escape(says)):
        parse(text)


@st.composite
def sittings(draw: st.DrawFn) -> tuple[list[int], int, int, int, int | None]:
    """(weekdays, start minute, slot minutes, slot count, seats) of one part, all within one day."""
    weekdays = sorted(draw(st.sets(st.integers(1, 7), min_size=1)))
    length = draw(st.integers(1, 240))
    count = draw(st.integers(1, max(1, min(12, (24 * 60 - 1) // length))))
    start = draw(st.integers(0, 24 * 60 - 1 - length * count))
    return weekdays, start, length, count, draw(st.none() | st.integers(1, 500))


def hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


@given(part=sittings(), split=st.booleans())
def test_any_written_part_makes_exactly_its_slots_on_its_days(part: tuple[list[int], int, int, int, int | None],
                                                             split: bool):
    weekdays, start, length, count, seats = part
    end = start + length * count
    text = ",".join(DAYS[d - 1] for d in weekdays) + f" {hhmm(start)}-{hhmm(end)}"
    text += (f"/{length}" if split else "") + (f" x{seats}" if seats else "")
    starts = range(start, end, length) if split else [start]
    step = length if split else end - start
    expected = [(day.isoformat(), hhmm(m), hhmm(m + step), seats) for day in WEEK if day.isoweekday() in weekdays
                for m in starts]
    assert slots(text) == expected
