"""The figures of an end-of-day report, from what the service answers: GetStats, ListSlots and ListQueueEvents.

Pure: protobuf messages in, a `DayReport` out, with no gRPC and no I/O, so that hand-built events can test it.
GetStats gives what it counts (tokens by status and source, utilisation, the mean wait); the event history gives
what only it knows: when each token changed (the timelines), the waits by source, and the bumps, no-shows,
promotions and cancellations as they happened. History older than EVENT_RETENTION_DAYS is deleted by the server,
so a doctor whose history and GetStats disagree gets a note saying so.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from opd_grpc._gen.opd.v1 import opd_pb2 as pb

SEAT_HOLDING = frozenset({pb.STATUS_CONFIRMED, pb.STATUS_CHECKED_IN, pb.STATUS_CALLED, pb.STATUS_COMPLETED})
TERMINAL = frozenset({pb.STATUS_COMPLETED, pb.STATUS_CANCELLED, pb.STATUS_NO_SHOW})
# The changes drawn as marks on a token's bar; the other kinds only start a new segment.
MARKED = frozenset({pb.EVENT_KIND_BUMPED, pb.EVENT_KIND_PROMOTED, pb.EVENT_KIND_COMPLETED, pb.EVENT_KIND_CANCELLED,
                    pb.EVENT_KIND_NO_SHOW})
# SPEC §2: sources in priority order, emergency first.
SOURCES = (pb.SOURCE_EMERGENCY, pb.SOURCE_PAID_PRIORITY, pb.SOURCE_FOLLOW_UP, pb.SOURCE_ONLINE_BOOKING,
           pb.SOURCE_WALK_IN)
HOUR = dt.timedelta(hours=1)


@dataclass(frozen=True)
class Segment:
    """A stretch of time a token spent in one status; `end` None: still so when the history ends."""

    status: int  # pb.Status
    start: dt.datetime
    end: dt.datetime | None


@dataclass(frozen=True)
class Mark:
    """A change worth a mark on the bar: bumped, promoted, or the end (completed, cancelled, no-show)."""

    kind: int  # pb.EventKind
    at: dt.datetime


@dataclass(frozen=True)
class TokenLine:
    """One token's day: booked (ALLOCATED or WAITLISTED), then each status it went through."""

    token_id: str
    token_number: int
    source: int  # pb.Source
    booked_at: dt.datetime
    status: int  # pb.Status when the history ends
    segments: tuple[Segment, ...]
    marks: tuple[Mark, ...]


@dataclass(frozen=True)
class SlotTimeline:
    slot_id: str
    start_time: str  # HH:MM, the hospital's wall clock
    end_time: str
    starts_at: dt.datetime
    ends_at: dt.datetime
    max_capacity: int  # at the end of the day
    tokens: tuple[TokenLine, ...]  # by token number
    seat_holders: tuple[tuple[dt.datetime, int], ...]  # the slot's seat holders after each change of that count
    capacity_changed_at: tuple[dt.datetime, ...]  # capacity changes after the slot was created


@dataclass(frozen=True)
class Waits:
    """Minutes from check-in to call of one source's called tokens."""

    source: int  # pb.Source
    called: int
    mean_minutes: float
    max_minutes: float


@dataclass(frozen=True)
class Promotions:
    """Waitlisted tokens given a seat, by what freed it (SPEC §6)."""

    on_cancel: int = 0
    on_no_show: int = 0
    on_capacity_raise: int = 0

    @property
    def total(self) -> int:
        return self.on_cancel + self.on_no_show + self.on_capacity_raise


@dataclass(frozen=True)
class DoctorReport:
    doctor_id: str
    name: str
    specialization: str
    # From GetStats.
    total_tokens: int
    total_capacity: int
    seat_holders: int
    utilisation: float  # seat holders over capacity, 0 to 1
    by_status: Mapping[str, int]  # Status name -> tokens
    by_source: Mapping[str, int]  # Source name -> tokens
    mean_wait_minutes: float
    # From the event history.
    bumps: int
    no_shows: int
    cancellations: int
    promotions: Promotions
    waits: tuple[Waits, ...]  # sources with a called token, in priority order
    slots: tuple[SlotTimeline, ...]  # by start time
    notes: tuple[str, ...]  # where the history and GetStats disagree


@dataclass(frozen=True)
class DayReport:
    date: str
    timezone: str  # the zone the times are shown in
    starts_at: dt.datetime  # the timelines' axis: whole hours around every slot and event of the day
    ends_at: dt.datetime
    doctors: tuple[DoctorReport, ...]


def build_report(date: str, stats: Sequence[pb.DoctorDayStats], events: Mapping[str, Sequence[pb.QueueEvent]],
                 slots: Mapping[str, Sequence[pb.Slot]], doctors: Mapping[str, pb.Doctor] | None = None,
                 timezone: dt.tzinfo = dt.timezone.utc) -> DayReport:
    """The report of `date` for each doctor of `stats`, whose events and slots are looked up by doctor_id.

    `timezone` is the server's TIMEZONE setting: slot times are wall-clock times there, and so are the report's."""
    day = dt.date.fromisoformat(date)
    doctors = doctors or {}
    reports = tuple(_doctor_report(s, sorted(events.get(s.doctor_id, ()), key=lambda e: e.sequence),
                                   slots.get(s.doctor_id, ()), doctors.get(s.doctor_id), day, timezone)
                    for s in stats)
    times = [t for r in reports for s in r.slots for t in (s.starts_at, s.ends_at)]
    times += [_when(e.occurred_at, timezone) for s in stats for e in events.get(s.doctor_id, ())]
    starts_at, ends_at = _axis(day, timezone, times)
    return DayReport(date, str(timezone), starts_at, ends_at, reports)


def _doctor_report(stats: pb.DoctorDayStats, events: list[pb.QueueEvent], slots: Iterable[pb.Slot],
                   doctor: pb.Doctor | None, day: dt.date, tz: dt.tzinfo) -> DoctorReport:
    counts: defaultdict[int, int] = defaultdict(int)
    promotions: defaultdict[str, int] = defaultdict(int)
    last_kind: dict[str, int] = {}  # token_id -> the kind of its latest event so far
    # token_id -> its first check-in: a patient bumped and promoted back checks in again, but has waited since they
    # came (GetStats's mean wait counts from there too)
    checked_in: dict[str, dt.datetime] = {}
    waits: defaultdict[int, list[float]] = defaultdict(list)
    for event in events:
        if not event.HasField("token"):
            continue
        token_id, at = event.token.token_id, _when(event.occurred_at, tz)
        counts[event.kind] += 1
        if event.kind == pb.EVENT_KIND_PROMOTED:
            promotions[_promotion_cause(event, last_kind)] += 1
        elif event.kind == pb.EVENT_KIND_CHECKED_IN:
            checked_in.setdefault(token_id, at)
        elif event.kind == pb.EVENT_KIND_CALLED and token_id in checked_in:
            waits[event.token.source].append((at - checked_in[token_id]).total_seconds() / 60)
        last_kind[token_id] = event.kind
    by_slot: defaultdict[str, list[pb.QueueEvent]] = defaultdict(list)
    for event in events:
        by_slot[event.slot_id].append(event)
    timelines = tuple(_slot_timeline(slot, by_slot[slot.slot_id], day, tz)
                      for slot in sorted(slots, key=lambda s: s.start_time))
    bumps, no_shows = counts[pb.EVENT_KIND_BUMPED], counts[pb.EVENT_KIND_NO_SHOW]
    cancellations = counts[pb.EVENT_KIND_CANCELLED]
    told = {"tokens": (len(last_kind), stats.total_tokens), "bumps": (bumps, stats.bumps),
            "no-shows": (no_shows, stats.no_shows),
            "cancellations": (cancellations, stats.by_status.get("STATUS_CANCELLED", 0))}
    notes = tuple(f"The event history counts {history} {what}, GetStats {counted}: part of this day's history "
                  "is missing (the server deletes it after EVENT_RETENTION_DAYS), so its figures and timelines "
                  "are short." for what, (history, counted) in told.items() if history != counted)
    return DoctorReport(
        doctor_id=stats.doctor_id, name=doctor.name if doctor else "",
        specialization=doctor.specialization if doctor else "",
        total_tokens=stats.total_tokens, total_capacity=stats.total_capacity, seat_holders=stats.seat_holders,
        utilisation=stats.utilisation, by_status={k: v for k, v in stats.by_status.items() if v},
        by_source={k: v for k, v in stats.by_source.items() if v}, mean_wait_minutes=stats.mean_wait_minutes,
        bumps=bumps, no_shows=no_shows, cancellations=cancellations,
        promotions=Promotions(promotions["cancel"], promotions["no-show"], promotions["capacity raise"]),
        waits=tuple(Waits(s, len(waits[s]), sum(waits[s]) / len(waits[s]), max(waits[s]))
                    for s in SOURCES if waits[s]),
        slots=timelines, notes=notes)


def _promotion_cause(event: pb.QueueEvent, last_kind: Mapping[str, int]) -> str:
    """A promotion names the token whose release freed the seat (cancelled or no-show); none: a capacity raise."""
    if not event.caused_by_token_id:
        return "capacity raise"
    return "no-show" if last_kind.get(event.caused_by_token_id) == pb.EVENT_KIND_NO_SHOW else "cancel"


def _slot_timeline(slot: pb.Slot, events: list[pb.QueueEvent], day: dt.date, tz: dt.tzinfo) -> SlotTimeline:
    """The slot's tokens, each as segments between its events, and its seat holders over the day."""
    booked: dict[str, tuple[pb.Token, dt.datetime]] = {}
    segments: defaultdict[str, list[Segment]] = defaultdict(list)
    marks: defaultdict[str, list[Mark]] = defaultdict(list)
    status: dict[str, int] = {}
    seat_holders: list[tuple[dt.datetime, int]] = []
    capacity_changes: list[dt.datetime] = []
    holders = 0
    for event in events:
        at = _when(event.occurred_at, tz)
        if not event.HasField("token"):
            capacity_changes.append(at)
            continue
        token = event.token
        booked.setdefault(token.token_id, (token, at))
        if (open_segments := segments[token.token_id]) and open_segments[-1].end is None:
            open_segments[-1] = Segment(open_segments[-1].status, open_segments[-1].start, at)
        if token.status not in TERMINAL:
            open_segments.append(Segment(token.status, at, None))
        if event.kind in MARKED:
            marks[token.token_id].append(Mark(event.kind, at))
        holders += (token.status in SEAT_HOLDING) - (status.get(token.token_id) in SEAT_HOLDING)
        status[token.token_id] = token.status
        if not seat_holders or seat_holders[-1][1] != holders:
            seat_holders.append((at, holders))
    lines = tuple(TokenLine(token_id, first.token_number, first.source, at, status[token_id],
                            tuple(segments[token_id]), tuple(marks[token_id]))
                  for token_id, (first, at) in sorted(booked.items(), key=lambda kv: kv[1][0].token_number))
    return SlotTimeline(slot.slot_id, slot.start_time, slot.end_time, _wall_clock(day, slot.start_time, tz),
                        _wall_clock(day, slot.end_time, tz), slot.max_capacity, lines, tuple(seat_holders),
                        tuple(capacity_changes[1:]))  # the first SLOT_CHANGED of a slot is its creation


def _axis(day: dt.date, tz: dt.tzinfo, times: list[dt.datetime]) -> tuple[dt.datetime, dt.datetime]:
    """Whole hours of `day` around `times` (at least one hour); a booking made on an earlier day starts at the
    left edge."""
    midnight = dt.datetime.combine(day, dt.time(0), tz)
    if not times:
        return midnight, midnight + HOUR
    start = max(min(times), midnight).replace(minute=0, second=0, microsecond=0)
    last = min(max(times), dt.datetime.combine(day + dt.timedelta(days=1), dt.time(0), tz))
    end = last.replace(minute=0, second=0, microsecond=0)
    if end < last or end == start:
        end += HOUR
    return start, end


def _wall_clock(day: dt.date, hh_mm: str, tz: dt.tzinfo) -> dt.datetime:
    return dt.datetime.combine(day, dt.time.fromisoformat(hh_mm), tz)


def _when(stamp: object, tz: dt.tzinfo) -> dt.datetime:
    return stamp.ToDatetime(tzinfo=dt.timezone.utc).astimezone(tz)  # type: ignore[attr-defined]
