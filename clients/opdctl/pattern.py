"""The slot pattern language of `opdctl slots add` and `opdctl templates set`: a week's sittings in one line.

    Mon-Fri 09:00-12:00/60 x10; Sat 09:00-11:00 x5

Parts are separated by `;`. Each part is: the days (`Mon`, `Monday`, ranges `Mon-Fri`, lists `Mon,Wed,Fri`,
any case; none: every day), a time range `HH:MM-HH:MM`, optionally `/N` to split it into slots of N minutes
(without: one slot), and optionally `xC` for C seats per slot (without: the server's DEFAULT_SLOT_CAPACITY).
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from opd_grpc._gen.opd.v1 import opd_pb2 as pb

EXAMPLE = "Mon-Fri 09:00-12:00/60 x10; Sat 09:00-11:00 x5"
INT32_LIMIT = 2 ** 31  # the proto's int32 fields (seats, minutes, age) take numbers below this
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # ISO order: Monday is 1, as in the Weekday enum
FULL_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_TIME = r"(\d{1,2}:\d{2})"
_PART = re.compile(rf"(?:(?P<days>[a-z][a-z,\-]*)\s+)?{_TIME}-{_TIME}(?:/(?P<every>\d+))?(?:\s+x(?P<seats>\d+))?")


class PatternError(ValueError):
    """A pattern that cannot be read; the message says which part and why."""


@dataclass(frozen=True)
class Sitting:
    """One part of a pattern: on `weekdays` (ISO numbers, 1 is Monday), slots from `start` to `end`."""

    weekdays: tuple[int, ...]
    start: dt.time
    end: dt.time
    slot_minutes: int | None  # None: one slot for the whole range
    capacity: int | None  # None: the server's default

    def slot_times(self) -> list[tuple[str, str]]:
        """The (start, end) HH:MM pairs of the slots this part makes on each of its days."""
        first, last = _minutes(self.start), _minutes(self.end)
        step = self.slot_minutes or last - first
        return [(_hhmm(m), _hhmm(m + step)) for m in range(first, last, step)]


def parse(text: str) -> list[Sitting]:
    """The parts of a pattern, in the order written; PatternError says what is wrong with it."""
    parts = [part.strip() for part in text.split(";")]
    if not any(parts):
        raise PatternError(f"the pattern is empty; write for example {EXAMPLE!r}")
    return [_sitting(part) for part in parts if part]


def slot_specs(sittings: list[Sitting], dates: list[dt.date], consultation_minutes: int | None) -> list[pb.SlotSpec]:
    """The slots the pattern makes on `dates`, by date and start time."""
    specs = [pb.SlotSpec(date=date.isoformat(), start_time=start, end_time=end, max_capacity=sitting.capacity,
                         consultation_minutes=consultation_minutes)
             for date in dates for sitting in sittings if date.isoweekday() in sitting.weekdays
             for start, end in sitting.slot_times()]
    return sorted(specs, key=lambda spec: (spec.date, spec.start_time))


def template_slots(sittings: list[Sitting], consultation_minutes: int | None) -> list[pb.TemplateSlot]:
    """The pattern as a weekly template (pb.Weekday numbers are ISO weekdays), by weekday and start time."""
    slots = [pb.TemplateSlot(weekday=day, start_time=start, end_time=end, max_capacity=sitting.capacity,
                             consultation_minutes=consultation_minutes)
             for sitting in sittings for day in sitting.weekdays for start, end in sitting.slot_times()]
    return sorted(slots, key=lambda slot: (slot.weekday, slot.start_time))


def week_of(date: dt.date) -> list[dt.date]:
    """Monday to Sunday of the week that holds `date`."""
    monday = date - dt.timedelta(days=date.weekday())
    return [monday + dt.timedelta(days=n) for n in range(7)]


def _sitting(part: str) -> Sitting:
    # Spaces around `-` and `,` are allowed ("Mon - Fri", "09:00 - 12:00"); the regex then sees single tokens.
    text = re.sub(r"\s*([,\-/])\s*", r"\1", " ".join(part.lower().split()))
    match = _PART.fullmatch(text)
    if match is None:
        raise PatternError(f"cannot read {part!r}: write days, a time range, then /minutes and xseats if wanted, "
                           f"e.g. {EXAMPLE!r}")
    start, end = _time(match[2], part), _time(match[3], part)
    if end <= start:
        raise PatternError(f"in {part!r}: the range must end after it starts")
    every = int(match["every"]) if match["every"] else None
    length = _minutes(end) - _minutes(start)
    if every is not None and (every == 0 or length % every):
        raise PatternError(f"in {part!r}: {_hhmm(_minutes(start))}-{_hhmm(_minutes(end))} is {length} minutes, "
                           f"which does not split into slots of {every} minutes")
    seats = int(match["seats"]) if match["seats"] else None
    if seats == 0:
        raise PatternError(f"in {part!r}: a slot needs at least one seat (x1 or more)")
    if seats is not None and seats >= INT32_LIMIT:
        raise PatternError(f"in {part!r}: {seats} seats are too many (at most {INT32_LIMIT - 1:,})")
    weekdays = _weekdays(match["days"], part) if match["days"] else tuple(range(1, 8))
    return Sitting(weekdays, start, end, every, seats)


def _weekdays(text: str, part: str) -> tuple[int, ...]:
    """`mon-fri,sun` → (1, 2, 3, 4, 5, 7); a range may wrap past Sunday (`sat-mon`)."""
    days: set[int] = set()
    for item in text.split(","):
        ends = [_weekday(name, part) for name in item.split("-")]
        if len(ends) > 2:
            raise PatternError(f"in {part!r}: {item!r} is not a day or a range of days like Mon-Fri")
        first, last = ends[0], ends[-1]
        days.update((first - 1 + n) % 7 + 1 for n in range((last - first) % 7 + 1))
    return tuple(sorted(days))


def _weekday(name: str, part: str) -> int:
    for names in (WEEKDAYS, FULL_NAMES):
        if name in names:
            return names.index(name) + 1
    raise PatternError(f"in {part!r}: {name!r} is not a day; write Mon, Tue, Wed, Thu, Fri, Sat or Sun")


def _time(text: str, part: str) -> dt.time:
    try:
        return dt.time.fromisoformat(text.zfill(5))
    except ValueError:
        raise PatternError(f"in {part!r}: {text!r} is not a time of the day (HH:MM)") from None


def _minutes(time: dt.time) -> int:
    return time.hour * 60 + time.minute


def _hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"
