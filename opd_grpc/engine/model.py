"""The domain model: doctors, slots, tokens and the rules of SPEC §2–8, in plain Python.

`DoctorDay` is the aggregate: one doctor's slots and tokens on one date. Every rule that decides who gets
a seat lives in its methods, and each change is recorded as exactly one `QueueEvent` (SPEC §3.6) that the
storage layer writes in the same transaction. No gRPC and no SQL here.
"""

from __future__ import annotations

import datetime as dt
import enum
import functools
import operator
import re
import unicodedata
from dataclasses import dataclass, field, replace
from typing import Iterable

from opd_grpc.engine.errors import AlreadyExists, FailedPrecondition, NotFound, ResourceExhausted, invalid


class Source(enum.StrEnum):
    EMERGENCY = "EMERGENCY"
    PAID_PRIORITY = "PAID_PRIORITY"
    FOLLOW_UP = "FOLLOW_UP"
    ONLINE_BOOKING = "ONLINE_BOOKING"
    WALK_IN = "WALK_IN"


# SPEC §2: the priority of each source; 1 is served first.
PRIORITY: dict[Source, int] = {
    Source.EMERGENCY: 1,
    Source.PAID_PRIORITY: 2,
    Source.FOLLOW_UP: 3,
    Source.ONLINE_BOOKING: 4,
    Source.WALK_IN: 5,
}


class Status(enum.StrEnum):
    CONFIRMED = "CONFIRMED"
    WAITLISTED = "WAITLISTED"
    CHECKED_IN = "CHECKED_IN"
    CALLED = "CALLED"
    COMPLETED = "COMPLETED"
    CANCELLED = "CANCELLED"
    NO_SHOW = "NO_SHOW"


SEAT_HOLDING = frozenset({Status.CONFIRMED, Status.CHECKED_IN, Status.CALLED, Status.COMPLETED})
TERMINAL = frozenset({Status.COMPLETED, Status.CANCELLED, Status.NO_SHOW})
ACTIVE = frozenset(Status) - TERMINAL
# Seat holders that still wait for (or are in) their consultation, and so have an estimated time.
IN_QUEUE = frozenset({Status.CONFIRMED, Status.CHECKED_IN, Status.CALLED})
# Tokens that held a seat and are done with it: still counted ahead of the rest for the no-show grace (SPEC §6).
_GONE_AHEAD = frozenset({Status.COMPLETED, Status.NO_SHOW})


class EventKind(enum.StrEnum):
    ALLOCATED = "ALLOCATED"
    WAITLISTED = "WAITLISTED"
    PROMOTED = "PROMOTED"
    BUMPED = "BUMPED"
    CHECKED_IN = "CHECKED_IN"
    CALLED = "CALLED"
    COMPLETED = "COMPLETED"
    CANCELLED = "CANCELLED"
    NO_SHOW = "NO_SHOW"
    SLOT_CHANGED = "SLOT_CHANGED"


@dataclass(frozen=True)
class Move:
    """One legal state move of SPEC §7: from which statuses, to which, and the event it writes."""

    allowed_from: frozenset[Status]
    to: Status
    event: EventKind
    verb: str


# SPEC §7, the one table of legal moves. Anything else is refused with FAILED_PRECONDITION.
PROMOTE = Move(frozenset({Status.WAITLISTED}), Status.CONFIRMED, EventKind.PROMOTED, "promoted")
BUMP = Move(frozenset({Status.CONFIRMED, Status.CHECKED_IN}), Status.WAITLISTED, EventKind.BUMPED, "bumped")
CHECK_IN = Move(frozenset({Status.CONFIRMED}), Status.CHECKED_IN, EventKind.CHECKED_IN, "checked in")
CALL = Move(frozenset({Status.CHECKED_IN}), Status.CALLED, EventKind.CALLED, "called")
COMPLETE = Move(frozenset({Status.CALLED}), Status.COMPLETED, EventKind.COMPLETED, "completed")
NO_SHOW = Move(frozenset(IN_QUEUE), Status.NO_SHOW, EventKind.NO_SHOW, "marked no-show")
CANCEL = Move(frozenset(ACTIVE), Status.CANCELLED, EventKind.CANCELLED, "cancelled")


@dataclass(frozen=True)
class Rules:
    """The settings that the rules read (SPEC §14)."""

    default_slot_capacity: int = 10
    average_consultation_minutes: int = 5
    no_show_grace_period_minutes: int = 15
    max_waitlist_size: int = 50
    timezone: dt.tzinfo = dt.timezone.utc
    # How long history is kept (OPDService.prune_history): a doctor-day's queue events, in days after its date,
    # and a request_id's stored answer, in hours (SPEC §9: at least 24).
    event_retention_days: int = 30
    request_retention_hours: int = 48


@dataclass(frozen=True)
class Doctor:
    doctor_id: str
    name: str
    specialization: str


_SPACES = re.compile(r"\s+")
# A phone is compared by its last 10 digits: a national number's length in India (and North America), so that a
# mobile typed as 98765 43210 at the desk, 098765 43210 with the trunk 0, and +91 98765 43210 by the booking
# portal is one phone. A shorter number is compared whole; two people would need one name as well as these digits.
PHONE_DIGITS_COMPARED = 10
GENDERS = frozenset({"", "FEMALE", "MALE", "OTHER"})  # "": not given


@dataclass(frozen=True)
class Patient:
    name: str
    phone: str
    age: int
    gender: str
    mrn: str = ""

    @functools.cached_property
    def contact(self) -> str:
        """The phone's last PHONE_DIGITS_COMPARED digits (0-9, in whatever script they were typed) and the name,
        folded."""
        digits = "".join(str(unicodedata.digit(ch)) for ch in self.phone if ch.isdigit())
        return f"phone:{digits[-PHONE_DIGITS_COMPARED:]}:{folded(self.name)}"

    @functools.cached_property
    def identity(self) -> str:
        """The mrn, folded, or without one the contact: what the schema holds unique among a day's active tokens."""
        return "mrn:" + folded(self.mrn) if self.mrn else self.contact

    @functools.cached_property
    def keys(self) -> tuple[str, ...]:
        """What the same person shares with this one: the identity, and with an mrn the contact too."""
        return (self.identity, self.contact) if self.mrn else (self.contact,)

    def is_same_person(self, other: Patient) -> bool:
        """SPEC §1: the same mrn; where either has none, the same phone and name. Two mrns are two people."""
        return self.identity == other.identity if self.mrn and other.mrn else self.contact == other.contact


def folded(text: str) -> str:
    """Case, spacing and Unicode form folded: one desk's "Zoë" may arrive as Z, o, e and a combining diaeresis from
    another's, and a Devanagari nukta letter as one character or two."""
    return _SPACES.sub(" ", unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())).strip()


def skipped(date: dt.date, time: dt.time, tz: dt.tzinfo, ending: bool = False) -> bool:
    """Whether the clocks skip this wall-clock time on that date (the hour a change to summer time jumps, or a
    date a zone left out): a slot there would start or end at an instant an hour off, after it ends. A slot may
    end (`ending`) at the first minute skipped, which is the instant the clocks jump (01:00 in London, which then
    reads 02:00)."""
    def missing(moment: dt.datetime) -> bool:
        return moment.astimezone(dt.timezone.utc).astimezone(tz).replace(tzinfo=None) != moment.replace(tzinfo=None)

    local = dt.datetime.combine(date, time, tz)
    return missing(local) and (not ending or missing(local - dt.timedelta(minutes=1)))


@dataclass
class Slot:
    slot_id: str
    doctor_id: str
    date: dt.date
    start_time: dt.time
    end_time: dt.time
    max_capacity: int
    consultation_minutes: int

    def starts_at(self, tz: dt.tzinfo) -> dt.datetime:
        return dt.datetime.combine(self.date, self.start_time, tz)

    def ends_at(self, tz: dt.tzinfo) -> dt.datetime:
        return dt.datetime.combine(self.date, self.end_time, tz)

    def estimated_time(self, place: int, tz: dt.tzinfo) -> dt.datetime:
        """SPEC §8: slot start + (place − 1) × consultation_minutes, in real minutes: added in UTC, since across a
        clock change minutes added to the wall clock would be an hour off."""
        return self.starts_at(tz).astimezone(dt.timezone.utc) + dt.timedelta(
            minutes=(place - 1) * self.consultation_minutes)


@dataclass(eq=False)  # an entity: the same token is the same object, whatever its fields
class Token:
    token_id: str
    token_number: int
    doctor_id: str
    date: dt.date
    slot_id: str
    source: Source
    status: Status
    patient: Patient
    created_at: dt.datetime
    updated_at: dt.datetime
    checked_in_at: dt.datetime | None = None
    called_at: dt.datetime | None = None
    completed_at: dt.datetime | None = None
    bump_count: int = 0
    # SPEC §2: lower priority number first, then earlier queue time, then lower token number. A token keeps
    # its priority and queue time for life, so the key is computed once.
    order: tuple[int, dt.datetime, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.order = (PRIORITY[self.source], self.created_at, self.token_number)

    @property
    def priority(self) -> int:
        return PRIORITY[self.source]

    def serving_key(self) -> tuple[bool, tuple[int, dt.datetime, int]]:
        """SPEC §8: the CALLED token first, then §2 order."""
        return (self.status is not Status.CALLED, self.order)


@dataclass(frozen=True)
class QueueEvent:
    doctor_id: str
    date: dt.date
    sequence: int
    kind: EventKind
    occurred_at: dt.datetime
    token_id: str = ""
    token_number: int = 0
    slot_id: str = ""
    status: Status | None = None
    caused_by_token_id: str = ""
    source: Source | None = None  # the token's, for watchers: with queued_at they order a queue (SPEC §2)
    queued_at: dt.datetime | None = None
    # The token's status before this change, for the audit log; not stored with the event (None when read back).
    previous_status: Status | None = field(default=None, compare=False)


@dataclass(frozen=True)
class TokenView:
    """A token as callers see it: with its place in the queue and estimated time (SPEC §8)."""

    token: Token
    estimated_time: dt.datetime | None
    queue_position: int
    waitlist_position: int


@dataclass(frozen=True)
class SlotStatus:
    slot: Slot
    seat_holders: int
    free_seats: int
    waitlist: list[TokenView]


@dataclass(frozen=True)
class DayStats:
    doctor_id: str
    date: dt.date
    by_status: dict[Status, int]
    by_source: dict[Source, int]
    total_tokens: int
    total_capacity: int
    seat_holders: int
    utilisation: float
    bumps: int
    no_shows: int
    mean_wait_minutes: float


_BY_ORDER = operator.attrgetter("order")


def overlap(start: dt.time, end: dt.time, other_start: dt.time, other_end: dt.time) -> bool:
    """SPEC §1: two sittings of one doctor overlap when each starts before the other ends (touching is not)."""
    return start < other_end and other_start < end


def day_id(doctor_id: str, date: dt.date) -> str:
    """The prefix of the ids of a doctor-day's slots and tokens: DOC001-20300107."""
    return f"{doctor_id}-{date:%Y%m%d}"


_SLOT_ID = re.compile(r"^(?P<doctor>[A-Z]+\d+)-(?P<date>\d{8})-(?P<hhmm>\d{4})$")
_TOKEN_ID = re.compile(r"^(?P<doctor>[A-Z]+\d+)-(?P<date>\d{8})-T(?P<number>\d+)$")


def day_of_slot_id(slot_id: str) -> tuple[str, dt.date]:
    """The doctor and date a slot id belongs to; an id of another shape names no slot."""
    return _day_of(_SLOT_ID, slot_id, "slot")


def day_of_token_id(token_id: str) -> tuple[str, dt.date]:
    """The doctor and date a token id belongs to; an id of another shape names no token."""
    return _day_of(_TOKEN_ID, token_id, "token")


def _day_of(pattern: re.Pattern[str], text: str, what: str) -> tuple[str, dt.date]:
    match = pattern.match(text)
    if match:
        try:
            return match["doctor"], dt.datetime.strptime(match["date"], "%Y%m%d").date()
        except ValueError:
            pass
    raise NotFound(f"No {what} has the id {text!r}.", f"{what.upper()}_NOT_FOUND")


@dataclass
class Allocation:
    token: TokenView
    moved_to_later_slot: bool = False
    bumped: TokenView | None = None


@dataclass
class Release:
    """A token moved by a call, with the waitlisted tokens that a freed seat promoted."""

    token: TokenView
    promoted: list[TokenView] = field(default_factory=list)


@dataclass
class CallResult:
    token: TokenView
    completed: TokenView | None


@dataclass
class CapacityChange:
    slot: Slot
    promoted: list[TokenView]


@dataclass(frozen=True)
class DayChanges:
    """The rows of a doctor-day that changed after a sequence: each change names its slot or token in its event,
    so these, with the day's counters, are all that differs from a copy read at that sequence."""

    slots: list[Slot]
    tokens: list[Token]
    last_token_number: int
    last_sequence: int


class DoctorDay:
    """One doctor's slots and tokens on one date: the unit of consistency, locked as a whole.

    Methods check everything before they change anything, so a refusal leaves the day as it was.
    Changes accumulate in `pending_events`, `dirty_tokens` and `dirty_slots` until storage saves them.
    """

    def __init__(self, doctor_id: str, date: dt.date, rules: Rules, slots: Iterable[Slot] = (),
                 tokens: Iterable[Token] = (), last_token_number: int = 0, last_sequence: int = 0,
                 exists: bool = True):
        self.doctor_id = doctor_id
        self.date = date
        self.day_id = day_id(doctor_id, date)
        self.rules = rules
        self.slots: dict[str, Slot] = {s.slot_id: s for s in sorted(slots, key=lambda s: s.start_time)}
        self.tokens: dict[str, Token] = {t.token_id: t for t in tokens}
        # A token never leaves its slot, so each slot's tokens are indexed once.
        self.by_slot: dict[str, list[Token]] = {slot_id: [] for slot_id in self.slots}
        # Kept by _new_token and _move, the only places where a token appears or changes status:
        self.holders: dict[str, int] = {slot_id: 0 for slot_id in self.slots}  # seat holders per slot
        self.active: dict[str, list[Token]] = {}  # SPEC §3.5: the active tokens under each of their patients' keys
        for t in self.tokens.values():
            self.by_slot[t.slot_id].append(t)
            self.holders[t.slot_id] += t.status in SEAT_HOLDING
            if t.status in ACTIVE:
                self._file_active(t)
        self.last_token_number = last_token_number
        self.last_sequence = last_sequence
        self.exists = exists
        self.pending_events: list[QueueEvent] = []
        self.new_tokens: list[str] = []
        self.dirty_tokens: set[str] = set()
        self.new_slots: list[str] = []
        self.dirty_slots: set[str] = set()

    def refreshed(self, changes: DayChanges) -> DoctorDay:
        """The day as it is now, from this copy and the rows changed since (another replica's changes)."""
        slots = {**self.slots, **{s.slot_id: s for s in changes.slots}}
        tokens = {**self.tokens, **{t.token_id: t for t in changes.tokens}}
        return DoctorDay(self.doctor_id, self.date, self.rules, slots.values(), tokens.values(),
                         changes.last_token_number, changes.last_sequence)

    # ---- reading -------------------------------------------------------------------------------

    def slot(self, slot_id: str) -> Slot:
        try:
            return self.slots[slot_id]
        except KeyError:
            raise NotFound(f"No slot has the id {slot_id!r}.", "SLOT_NOT_FOUND") from None

    def token(self, token_id: str) -> Token:
        try:
            return self.tokens[token_id]
        except KeyError:
            raise NotFound(f"No token has the id {token_id!r}.", "TOKEN_NOT_FOUND") from None

    def slot_spanning(self, start: dt.time, end: dt.time) -> Slot | None:
        """The day's slot from `start` to `end` exactly, if it has one."""
        return next((s for s in self.slots.values() if s.start_time == start and s.end_time == end), None)

    def seat_holders(self, slot_id: str) -> int:
        return self.holders[slot_id]

    def free_seats(self, slot: Slot) -> int:
        return slot.max_capacity - self.seat_holders(slot.slot_id)

    def waitlist(self, slot_id: str) -> list[Token]:
        """SPEC §3.3: the waitlist in the order of §2; the first is promoted next."""
        waiting = [t for t in self.by_slot[slot_id] if t.status is Status.WAITLISTED]
        return sorted(waiting, key=_BY_ORDER)

    def serving_order(self, slot_id: str) -> list[Token]:
        """SPEC §8: not-yet-completed seat holders, CALLED first, then in the order of §2."""
        in_queue = [t for t in self.by_slot[slot_id] if t.status in IN_QUEUE]
        return sorted(in_queue, key=Token.serving_key)

    def view(self, token: Token) -> TokenView:
        """The token with its place: the number of tokens ahead of it, counted without sorting."""
        peers = self.by_slot[token.slot_id]
        if token.status is Status.WAITLISTED:
            place = 1 + sum(1 for t in peers if t.status is Status.WAITLISTED and t.order < token.order)
            return TokenView(replace(token), None, 0, place)
        if token.status in IN_QUEUE:
            slot = self.slots[token.slot_id]
            key = token.serving_key()
            place = 1 + sum(1 for t in peers if t.status in IN_QUEUE and t.serving_key() < key)
            return TokenView(replace(token), slot.estimated_time(place, self.rules.timezone), place, 0)
        return TokenView(replace(token), None, 0, 0)

    def views(self) -> list[TokenView]:
        """Every token of the day in token_number order, computed in one pass per slot."""
        positions: dict[str, tuple[dt.datetime | None, int, int]] = {}
        for slot in self.slots.values():
            for place, t in enumerate(self.serving_order(slot.slot_id), 1):
                positions[t.token_id] = (slot.estimated_time(place, self.rules.timezone), place, 0)
            for place, t in enumerate(self.waitlist(slot.slot_id), 1):
                positions[t.token_id] = (None, 0, place)
        ordered = sorted(self.tokens.values(), key=lambda t: t.token_number)
        return [TokenView(replace(t), *positions.get(t.token_id, (None, 0, 0))) for t in ordered]

    def slot_status(self, slot_id: str) -> SlotStatus:
        slot = self.slot(slot_id)
        return SlotStatus(replace(slot), self.seat_holders(slot_id), self.free_seats(slot),
                          [self.view(t) for t in self.waitlist(slot_id)])

    def stats(self) -> DayStats:
        tokens = list(self.tokens.values())
        capacity = sum(s.max_capacity for s in self.slots.values())
        holders = sum(1 for t in tokens if t.status in SEAT_HOLDING)
        waits = [(t.called_at - t.checked_in_at).total_seconds() / 60 for t in tokens
                 if t.called_at and t.checked_in_at]
        return DayStats(
            doctor_id=self.doctor_id, date=self.date,
            by_status={s: n for s in Status if (n := sum(1 for t in tokens if t.status is s))},
            by_source={s: n for s in Source if (n := sum(1 for t in tokens if t.source is s))},
            total_tokens=len(tokens), total_capacity=capacity, seat_holders=holders,
            utilisation=holders / capacity if capacity else 0.0,
            bumps=sum(t.bump_count for t in tokens),
            no_shows=sum(1 for t in tokens if t.status is Status.NO_SHOW),
            mean_wait_minutes=sum(waits) / len(waits) if waits else 0.0,
        )

    # ---- slots ---------------------------------------------------------------------------------

    def add_slot(self, start: dt.time, end: dt.time, max_capacity: int, consultation_minutes: int,
                 now: dt.datetime) -> Slot:
        """Adds a slot; a doctor's slots never overlap (SPEC §1)."""
        for other in self.slots.values():
            if overlap(start, end, other.start_time, other.end_time):
                raise AlreadyExists(
                    f"{start:%H:%M}-{end:%H:%M} overlaps {self.doctor_id}'s slot {other.start_time:%H:%M}-"
                    f"{other.end_time:%H:%M} on {self.date.isoformat()}.", "SLOT_OVERLAP")
        slot = Slot(f"{self.day_id}-{start:%H%M}", self.doctor_id, self.date, start, end,
                    max_capacity, consultation_minutes)
        self.slots = dict(sorted({**self.slots, slot.slot_id: slot}.items(), key=lambda kv: kv[1].start_time))
        self.by_slot[slot.slot_id] = []
        self.holders[slot.slot_id] = 0
        self.new_slots.append(slot.slot_id)
        self._record(EventKind.SLOT_CHANGED, now, slot_id=slot.slot_id)
        return slot

    def set_capacity(self, slot_id: str, max_capacity: int, now: dt.datetime, span_minutes: int) -> CapacityChange:
        """SPEC §6: a raise promotes at once; a cut below the seat holders is refused. The seats' consultations
        must fit in `span_minutes` (see service.MAX_SLOT_SPAN_MINUTES)."""
        slot = self.slot(slot_id)
        if max_capacity * slot.consultation_minutes > span_minutes:
            raise invalid("max_capacity", f"{max_capacity} seats of {slot.consultation_minutes} minutes would take "
                                          f"more than {span_minutes // 1440} days")
        holders = self.seat_holders(slot_id)
        if max_capacity < holders:
            seen = sum(1 for t in self.by_slot[slot_id] if t.status in (Status.COMPLETED, Status.CALLED))
            kept = f" (the {seen} seen or with the doctor keep{'s its seat' if seen == 1 else ' their seats'})"
            fix = (f"all {holders} have been seen or are with the doctor" if seen == holders
                   else "cancel tokens not yet called first" + (kept if seen else ""))
            raise FailedPrecondition(
                f"Slot {slot_id} has {holders} seat holders, so its capacity cannot go below {holders} (asked "
                f"{max_capacity}): {fix}.", "CAPACITY_BELOW_SEAT_HOLDERS")
        slot.max_capacity = max_capacity
        self.dirty_slots.add(slot_id)
        self._record(EventKind.SLOT_CHANGED, now, slot_id=slot_id)
        promoted = self._fill_seats(slot, now, caused_by="")
        return CapacityChange(replace(slot), [self.view(t) for t in promoted])

    # ---- allocation (SPEC §4, §5) ----------------------------------------------------------------

    def allocate(self, patient: Patient, source: Source, preferred_start: dt.time | None, flexible: bool,
                 now: dt.datetime) -> Allocation:
        self._refuse_duplicate(patient)
        tz = self.rules.timezone
        open_slots = [s for s in self.slots.values() if s.ends_at(tz) > now]
        if preferred_start is not None:
            slot = next((s for s in self.slots.values() if s.start_time == preferred_start), None)
            if slot is None:
                raise NotFound(f"{self.doctor_id} has no slot starting at {preferred_start:%H:%M} on "
                               f"{self.date.isoformat()}.", "SLOT_NOT_FOUND")
            if slot not in open_slots:
                raise FailedPrecondition(f"Slot {slot.slot_id} ended at {slot.end_time:%H:%M}; it takes no "
                                         "new tokens. Choose a later slot.", "SLOT_CLOSED")
        else:
            if not open_slots:
                raise FailedPrecondition(f"All of {self.doctor_id}'s slots on {self.date.isoformat()} have "
                                         "ended; choose another date.", "SLOT_CLOSED")
            slot = next((s for s in open_slots if self.free_seats(s) > 0), open_slots[0])

        if self.free_seats(slot) > 0:
            return Allocation(self.view(self._new_token(patient, source, slot, Status.CONFIRMED, now)))
        if source is Source.EMERGENCY:
            victim = self._bump_victim(slot)
            if victim is not None:
                token = self._new_token(patient, source, slot, Status.CONFIRMED, now, before=victim)
                return Allocation(self.view(token), bumped=self.view(victim))
        if flexible:
            later_free = next((s for s in open_slots if s.start_time > slot.start_time and self.free_seats(s) > 0),
                              None)
            if later_free is not None:
                token = self._new_token(patient, source, later_free, Status.CONFIRMED, now)
                return Allocation(self.view(token), moved_to_later_slot=True)
        waiting = len(self.waitlist(slot.slot_id))
        # An emergency with nobody to bump is waitlisted first in line (SPEC §5) however long the waitlist: triage is
        # not turned away by a cap meant for bookings, as a bump's victim is not either.
        if waiting >= self.rules.max_waitlist_size and source is not Source.EMERGENCY:
            raise ResourceExhausted(f"Slot {slot.slot_id} is full and its waitlist already holds {waiting} "
                                    "tokens; choose another slot or date.", "WAITLIST_FULL")
        return Allocation(self.view(self._new_token(patient, source, slot, Status.WAITLISTED, now)))

    def _refuse_duplicate(self, patient: Patient) -> None:
        """SPEC §3.5: at most one active token per patient per doctor and date."""
        t = next((t for key in patient.keys for t in self.active.get(key, ()) if patient.is_same_person(t.patient)),
                 None)
        if t is not None:
            raise AlreadyExists(f"This patient already holds token {t.token_number} ({t.token_id}, "
                                f"{t.status.value}) with {self.doctor_id} on {self.date.isoformat()}.",
                                "PATIENT_ALREADY_HAS_TOKEN", metadata={"token_id": t.token_id})

    def _file_active(self, token: Token) -> None:
        for key in token.patient.keys:
            self.active.setdefault(key, []).append(token)

    def _bump_victim(self, slot: Slot) -> Token | None:
        """SPEC §5: the CONFIRMED or CHECKED_IN non-emergency seat holder with the worst §2 order."""
        candidates = [t for t in self.by_slot[slot.slot_id]
                      if t.status in BUMP.allowed_from and t.source is not Source.EMERGENCY]
        return max(candidates, key=_BY_ORDER, default=None)

    def _new_token(self, patient: Patient, source: Source, slot: Slot, status: Status, now: dt.datetime,
                   before: Token | None = None) -> Token:
        """Creates a token with the next number; with `before`, that seat holder is bumped for it first."""
        self.last_token_number += 1
        number = self.last_token_number
        token = Token(f"{self.day_id}-T{number}", number, self.doctor_id, self.date,
                      slot.slot_id, source, status, patient, created_at=now, updated_at=now)
        self.tokens[token.token_id] = token
        self.by_slot[slot.slot_id].append(token)
        self.holders[slot.slot_id] += status in SEAT_HOLDING
        self._file_active(token)
        self.new_tokens.append(token.token_id)
        if before is not None:
            self._move(before, BUMP, now, caused_by=token.token_id)  # a patient who arrived keeps checked_in_at
            before.bump_count += 1
        kind = EventKind.ALLOCATED if status is Status.CONFIRMED else EventKind.WAITLISTED
        self._record(kind, now, token)
        return token

    # ---- the day in the clinic (SPEC §6, §7) -------------------------------------------------------

    def cancel(self, token_id: str, now: dt.datetime) -> Release:
        return self._release(self.token(token_id), CANCEL, now)

    def mark_no_show(self, token_id: str, now: dt.datetime) -> Release:
        token = self.token(token_id)
        self._check_move(token, NO_SHOW)
        due, since = self._no_show_due(token)
        if now < due:
            local = due.astimezone(self.rules.timezone)
            raise FailedPrecondition(
                f"Token {token.token_number} ({token_id}) can be marked no-show from {local:%Y-%m-%d %H:%M}, "
                f"{self.rules.no_show_grace_period_minutes} minutes after {since}.", "GRACE_PERIOD_NOT_ELAPSED",
                # for a desk's program to show or wait for: RFC 3339, UTC (the time may differ from
                # estimated_time + grace, see _no_show_due)
                metadata={"no_show_from": due.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")})
        return self._release(token, NO_SHOW, now)

    def mark_overdue_no_shows(self, now: dt.datetime) -> list[Release]:
        """SPEC §6 with AUTO_NO_SHOW: confirmed patients past their grace period whom the clinic was waiting for.
        Not those who checked in before (bumped by an emergency and promoted back: they are in the waiting room),
        nor those seated only once their sitting was over (promoted after its end, as when a pass catches up on a
        day gone by): nobody expected them, and marking each would promote and mark the next, turning a whole
        waitlist into no-shows at once. The desk can still mark either (MarkNoShow)."""
        overdue = [t for t in self.tokens.values() if t.status is Status.CONFIRMED and t.checked_in_at is None
                   and t.updated_at < self.slots[t.slot_id].ends_at(self.rules.timezone)
                   and self._no_show_due(t)[0] <= now]
        return [self._release(t, NO_SHOW, now) for t in sorted(overdue, key=lambda t: t.token_number)]

    def _no_show_due(self, token: Token) -> tuple[dt.datetime, str]:
        """SPEC §6: no-show only from estimated_time + NO_SHOW_GRACE_PERIOD_MINUTES; and what the grace runs from,
        for a person. Taken literally that time moves earlier whenever a patient ahead is seen or marked no-show,
        and lies in the past for a patient seated in a sitting already under way: a patient told 09:50 could be
        marked at 09:15, one booked at 09:20 was overdue at once, and with AUTO_NO_SHOW one absent patient emptied
        the whole slot, each marking making the next patient overdue. So the time counts the slot's patients
        already seen or marked no-show as still ahead, and a patient who has not come is given the grace from
        when they got their seat (a CONFIRMED token's last move) if that is later, up to the slot's end (a seat
        given once the sitting was over is no promise; AUTO_NO_SHOW leaves it to the desk). Never earlier than
        SPEC's."""
        slot = self.slots[token.slot_id]
        place = self.view(token).queue_position
        gone = sum(1 for t in self.by_slot[token.slot_id] if t.status in _GONE_AHEAD)
        since = slot.estimated_time(place + gone, self.rules.timezone)
        patients = f"{gone} patient" if gone == 1 else f"{gone} patients"
        why = "its estimated time" + (f" with the {patients} already seen or marked no-show in its slot still "
                                      "counted ahead of it" if gone else "")
        ends = slot.ends_at(self.rules.timezone)
        seated = min(token.updated_at, ends)
        if token.status is Status.CONFIRMED and seated > since:
            since = seated
            why = f"{'it got its seat' if seated < ends else 'its slot ended'} " \
                  f"({since.astimezone(self.rules.timezone):%H:%M})"
        return since + dt.timedelta(minutes=self.rules.no_show_grace_period_minutes), why

    def check_in(self, token_id: str, now: dt.datetime) -> TokenView:
        token = self.token(token_id)
        self._move(token, CHECK_IN, now)
        token.checked_in_at = token.checked_in_at or now  # a patient bumped and promoted back arrived earlier
        return self.view(token)

    def complete(self, token_id: str, now: dt.datetime) -> TokenView:
        token = self.token(token_id)
        self._move(token, COMPLETE, now)
        token.completed_at = now
        return self.view(token)

    def call_next(self, now: dt.datetime) -> CallResult:
        """SPEC §7: the best CHECKED_IN token of the earliest slot that has one; the doctor's CALLED
        token, if any, is completed by it."""
        for slot in self.slots.values():
            waiting = [t for t in self.by_slot[slot.slot_id] if t.status is Status.CHECKED_IN]
            if waiting:
                break
        else:
            why = "" if self.slots else " (the doctor has no slots that day)"
            raise NotFound(f"Nobody is checked in and waiting for {self.doctor_id} on {self.date.isoformat()}{why}.",
                           "QUEUE_EMPTY")
        nxt = min(waiting, key=_BY_ORDER)
        completed = None
        for t in sorted(self.tokens.values(), key=lambda t: t.called_at or now):
            if t.status is Status.CALLED:
                self._move(t, COMPLETE, now)
                t.completed_at = now
                completed = t
        self._move(nxt, CALL, now)
        nxt.called_at = now
        return CallResult(self.view(nxt), self.view(completed) if completed else None)

    def _release(self, token: Token, move: Move, now: dt.datetime) -> Release:
        held_seat = token.status in SEAT_HOLDING
        self._move(token, move, now)
        promoted = self._fill_seats(self.slots[token.slot_id], now, token.token_id) if held_seat else []
        return Release(self.view(token), [self.view(t) for t in promoted])

    def _fill_seats(self, slot: Slot, now: dt.datetime, caused_by: str) -> list[Token]:
        """SPEC §3.2 and §6: while a seat is free, the waitlist head takes it."""
        promoted = []
        for head in self.waitlist(slot.slot_id)[: max(self.free_seats(slot), 0)]:
            self._move(head, PROMOTE, now, caused_by=caused_by)
            promoted.append(head)
        return promoted

    def _check_move(self, token: Token, move: Move) -> None:
        if token.status not in move.allowed_from:
            *others, last = [s.value for s in Status if s in move.allowed_from]  # in the day's order
            allowed = f"{', '.join(others)} or {last}" if others else last
            raise FailedPrecondition(
                f"Token {token.token_number} ({token.token_id}) is {token.status.value}; only a {allowed} "
                f"token can be {move.verb}.", "ILLEGAL_STATE_TRANSITION")

    def _move(self, token: Token, move: Move, now: dt.datetime, caused_by: str = "") -> None:
        self._check_move(token, move)
        self.holders[token.slot_id] += (move.to in SEAT_HOLDING) - (token.status in SEAT_HOLDING)
        if move.to in TERMINAL:
            for key in token.patient.keys:
                if len(sharing := self.active[key]) > 1:
                    sharing.remove(token)
                else:
                    del self.active[key]
        previous, token.status = token.status, move.to
        token.updated_at = now
        self.dirty_tokens.add(token.token_id)
        self._record(move.event, now, token, caused_by, previous=previous)

    def _record(self, kind: EventKind, now: dt.datetime, token: Token | None = None, caused_by: str = "",
                slot_id: str = "", previous: Status | None = None) -> None:
        """SPEC §3.6: one event per change, numbered without gaps per doctor and date."""
        self.last_sequence += 1
        if token is None:
            event = QueueEvent(self.doctor_id, self.date, self.last_sequence, kind, now, slot_id=slot_id)
        else:
            event = QueueEvent(self.doctor_id, self.date, self.last_sequence, kind, now, token.token_id,
                               token.token_number, token.slot_id, token.status, caused_by, token.source,
                               token.created_at, previous)
        self.pending_events.append(event)

    def clear_pending(self) -> None:
        self.pending_events.clear()
        self.new_tokens.clear()
        self.dirty_tokens.clear()
        self.new_slots.clear()
        self.dirty_slots.clear()
        self.exists = True
