"""The checker of the replica stress run (`simulation.replicas`): the database and the clients' records, judged
against a sequential model of SPEC §2 and §4–8 written here from the contract (not the engine's code).

What it holds the run to:
- storage: no half-done transaction — token numbers and event sequences 1..n matching the day counters, every
  token's latest row written by the same transaction as its latest event (PostgreSQL's `xmin`), and every event
  group written by exactly one stored request of the run;
- the model: each doctor-day's transactions, in sequence order, replayed through `SequentialDay` give exactly the
  events the table holds (in any order within one transaction: SPEC does not order them), the answers the clients
  got and the stored answers (including queue places), and at the end the statuses, places and waitlists the API
  shows;
- the clients: every acknowledged operation is in the table (none lost), no refused one is (a refusal changes
  nothing), each refusal is one the rules give in some state the call could have seen (between the transactions
  acknowledged before it began and those begun after it ended), and the table's order never contradicts real
  time (an operation acknowledged before another began is not ordered after it);
- copies (SPEC §9): a call sent to two replicas at once whose one copy landed and the other was refused is a
  violation, told apart as refused after the landed copy (the refusal is right only in states that include the
  call's own change: the copy did not answer the first answer) or before it (the copies answered differently).
"""

from __future__ import annotations

import bisect
import dataclasses
import datetime as dt
import itertools
import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable

import sqlalchemy
from google.protobuf.message import Message

from opd_grpc._gen.opd.v1 import opd_pb2 as pb
from simulation.ledger import patient_key

SEAT_HOLDING = frozenset({"CONFIRMED", "CHECKED_IN", "CALLED", "COMPLETED"})
ACTIVE = frozenset({"CONFIRMED", "WAITLISTED", "CHECKED_IN", "CALLED"})
IN_QUEUE = frozenset({"CONFIRMED", "CHECKED_IN", "CALLED"})
BUMPABLE = frozenset({"CONFIRMED", "CHECKED_IN"})
PRIORITY = {"EMERGENCY": 1, "PAID_PRIORITY": 2, "FOLLOW_UP": 3, "ONLINE_BOOKING": 4, "WALK_IN": 5}
RESPONSES: dict[str, type[Message]] = {
    "AllocateToken": pb.AllocateTokenResponse, "AllocateEmergency": pb.AllocateEmergencyResponse,
    "CancelToken": pb.CancelTokenResponse, "MarkNoShow": pb.MarkNoShowResponse,
    "CheckInToken": pb.CheckInTokenResponse, "CallNext": pb.CallNextResponse,
    "UpdateSlotCapacity": pb.UpdateSlotCapacityResponse, "CreateSlots": pb.CreateSlotsResponse,
}
SHOWN_VIOLATIONS_PER_KIND = 5


@dataclass
class Operation:
    """One client call as the client saw it: invoked, then ok (with the answer), failed (a refusal: code and
    reason) or unknown (no answer from any replica it tried; it may or may not have landed)."""

    number: int
    client: int
    method: str  # the gRPC method, e.g. "AllocateToken"
    request: Any
    doctor_id: str
    date: str
    invoked_at: float  # time.monotonic() of the first attempt
    answered_at: float | None = None
    outcome: str = "unknown"
    answer: Any = None
    code: str = ""
    reason: str = ""
    attempts: list[tuple[int, str]] = field(default_factory=list)  # (replica, status code name or "OK")
    # An ok call sent to two replicas at once whose other copy was refused: (code, reason, when it was answered).
    copy_refusal: tuple[str, str, float] | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def describe(self) -> str:
        r = self.request
        what = {"AllocateToken": lambda: f"{r.patient.name} {pb.Source.Name(r.source)} "
                                         f"slot {r.preferred_slot_time or 'any'}{' flexible' if r.flexible else ''}",
                "AllocateEmergency": lambda: f"{r.patient.name} slot {r.preferred_slot_time or 'any'}",
                "UpdateSlotCapacity": lambda: f"{r.slot_id} to {r.max_capacity}",
                "CallNext": lambda: r.doctor_id,
                "CreateSlots": lambda: r.doctor_id}.get(self.method, lambda: r.token_id)()
        answered = f"{self.outcome} {self.code} {self.reason}".strip()
        return f"op {self.number} ({self.method} {what}; {answered}; attempts {self.attempts})"


class Refused(Exception):
    def __init__(self, code: str, reason: str):
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason


@dataclass
class ModelSlot:
    slot_id: str
    start: dt.datetime
    end: dt.datetime
    capacity: int
    minutes: int


@dataclass(eq=False)
class ModelToken:
    token_id: str
    number: int
    slot_id: str
    source: str
    queued_at: dt.datetime
    patient: str
    status: str
    bumps: int = 0
    moved_at: dt.datetime | None = None  # its last change of status (or its creation)

    @property
    def order(self) -> tuple[int, dt.datetime, int]:
        """SPEC §2: priority, then queue time, then token number."""
        return PRIORITY[self.source], self.queued_at, self.number


# An event as compared: (kind, token_id, token_number, slot_id, status, caused_by_token_id).
Event = tuple[str, str, int, str, str, str]
# A token as an answer shows it: (token_id, token_number, slot_id, status, queue_position, waitlist_position, eta).
View = tuple[str, int, str, str, int, int, "dt.datetime | None"]


class SequentialDay:
    """One doctor-day under SPEC §2, §4–8, one call at a time. Each call checks before it changes anything (so a
    refusal leaves the day as it was), appends its events to `events` and answers what the API would show."""

    def __init__(self, grace_minutes: int, max_waitlist: int):
        self.grace = dt.timedelta(minutes=grace_minutes)
        self.max_waitlist = max_waitlist
        self.slots: dict[str, ModelSlot] = {}
        self.tokens: dict[str, ModelToken] = {}
        self.active: dict[str, ModelToken] = {}  # patient -> its one active token (SPEC §3.5)
        self.active_in: dict[str, list[ModelToken]] = {}  # slot -> its active tokens
        self.completed_in: dict[str, int] = {}  # slot -> its COMPLETED tokens (they keep their seats)
        self.last_number = 0
        self.events: list[Event] = []
        self.now: dt.datetime | None = None  # the service clock of the call being made: the time of its moves

    # ---- reading ----

    def _of_slot(self, slot_id: str, statuses: frozenset[str]) -> list[ModelToken]:
        """The slot's active tokens in `statuses`."""
        return [t for t in self.active_in[slot_id] if t.status in statuses]

    def holders(self, slot_id: str) -> int:
        return self.completed_in[slot_id] + len(self._of_slot(slot_id, IN_QUEUE))

    def free(self, slot: ModelSlot) -> int:
        return slot.capacity - self.holders(slot.slot_id)

    def waitlist(self, slot_id: str) -> list[ModelToken]:
        return sorted(self._of_slot(slot_id, frozenset({"WAITLISTED"})), key=lambda t: t.order)

    def serving(self, slot_id: str) -> list[ModelToken]:
        """SPEC §8: CALLED first, then §2 order."""
        return sorted(self._of_slot(slot_id, IN_QUEUE), key=lambda t: (t.status != "CALLED", t.order))

    def view(self, token: ModelToken) -> View:
        if token.status == "WAITLISTED":
            return (token.token_id, token.number, token.slot_id, token.status, 0,
                    self.waitlist(token.slot_id).index(token) + 1, None)
        if token.status in IN_QUEUE:
            slot = self.slots[token.slot_id]
            place = self.serving(token.slot_id).index(token) + 1
            return (token.token_id, token.number, token.slot_id, token.status, place, 0,
                    slot.start + (place - 1) * dt.timedelta(minutes=slot.minutes))
        return token.token_id, token.number, token.slot_id, token.status, 0, 0, None

    def _token(self, token_id: str) -> ModelToken:
        token = self.tokens.get(token_id)
        if token is None:
            raise Refused("NOT_FOUND", "TOKEN_NOT_FOUND")
        return token

    # ---- changing ----

    def _record(self, kind: str, token: ModelToken | None = None, caused_by: str = "", slot_id: str = "") -> None:
        if token is None:
            self.events.append((kind, "", 0, slot_id, "", ""))
        else:
            self.events.append((kind, token.token_id, token.number, token.slot_id, token.status, caused_by))

    def _move(self, token: ModelToken, to: str, kind: str, caused_by: str = "") -> None:
        if to not in ACTIVE:
            del self.active[token.patient]
            self.active_in[token.slot_id].remove(token)
            self.completed_in[token.slot_id] += to == "COMPLETED"
        token.status, token.moved_at = to, self.now
        self._record(kind, token, caused_by)

    def _fill(self, slot: ModelSlot, caused_by: str) -> list[ModelToken]:
        """SPEC §6: while a seat is free, the waitlist head takes it."""
        promoted = self.waitlist(slot.slot_id)[:max(self.free(slot), 0)]
        for head in promoted:
            self._move(head, "CONFIRMED", "PROMOTED", caused_by)
        return promoted

    def create_slots(self, slots: Iterable[pb.Slot]) -> dict[str, Any]:
        for s in slots:
            day = dt.date.fromisoformat(s.date)
            self.slots[s.slot_id] = ModelSlot(
                s.slot_id, dt.datetime.combine(day, dt.time.fromisoformat(s.start_time), dt.timezone.utc),
                dt.datetime.combine(day, dt.time.fromisoformat(s.end_time), dt.timezone.utc),
                s.max_capacity, s.consultation_minutes)
            self.active_in[s.slot_id], self.completed_in[s.slot_id] = [], 0
            self._record("SLOT_CHANGED", slot_id=s.slot_id)
        self.slots = dict(sorted(self.slots.items(), key=lambda kv: kv[1].start))
        return {}

    def decide_allocation(self, patient: str, source: str, preferred: str, flexible: bool,
                          now: dt.datetime) -> tuple[ModelSlot, str, ModelToken | None]:
        """SPEC §4–5: the slot and how the token gets it: "seat", "bump" (of the victim), "later" or "waitlist"."""
        if patient in self.active:
            raise Refused("ALREADY_EXISTS", "PATIENT_ALREADY_HAS_TOKEN")
        open_slots = [s for s in self.slots.values() if s.end > now]
        if preferred:
            slot = next((s for s in self.slots.values() if f"{s.start:%H:%M}" == preferred), None)
            if slot is None:
                raise Refused("NOT_FOUND", "SLOT_NOT_FOUND")
            if slot not in open_slots:
                raise Refused("FAILED_PRECONDITION", "SLOT_CLOSED")
        else:
            if not open_slots:
                raise Refused("FAILED_PRECONDITION", "SLOT_CLOSED")
            slot = next((s for s in open_slots if self.free(s) > 0), open_slots[0])
        if self.free(slot) > 0:
            return slot, "seat", None
        if source == "EMERGENCY":
            candidates = [t for t in self._of_slot(slot.slot_id, BUMPABLE) if t.source != "EMERGENCY"]
            if candidates:
                return slot, "bump", max(candidates, key=lambda t: t.order)
        if flexible:
            later = next((s for s in open_slots if s.start > slot.start and self.free(s) > 0), None)
            if later is not None:
                return later, "later", None
        if len(self.waitlist(slot.slot_id)) >= self.max_waitlist and source != "EMERGENCY":
            raise Refused("RESOURCE_EXHAUSTED", "WAITLIST_FULL")  # an emergency is waitlisted first in line anyway
        return slot, "waitlist", None

    def allocate(self, doctor_date: str, patient: str, source: str, preferred: str, flexible: bool,
                 now: dt.datetime) -> dict[str, Any]:
        slot, how, victim = self.decide_allocation(patient, source, preferred, flexible, now)
        self.now = now
        self.last_number += 1
        status = "WAITLISTED" if how == "waitlist" else "CONFIRMED"
        token = ModelToken(f"{doctor_date}-T{self.last_number}", self.last_number, slot.slot_id, source, now,
                           patient, status, moved_at=now)
        self.tokens[token.token_id] = token
        self.active[patient] = token
        self.active_in[slot.slot_id].append(token)
        if victim is not None:
            self._move(victim, "WAITLISTED", "BUMPED", token.token_id)
            victim.bumps += 1
        self._record("WAITLISTED" if how == "waitlist" else "ALLOCATED", token)
        return {"token": self.view(token), "moved": how == "later",
                "bumped": self.view(victim) if victim else None}

    def _release(self, token: ModelToken, to: str, now: dt.datetime, dry: bool) -> dict[str, Any]:
        self.now = now
        allowed = ACTIVE if to == "CANCELLED" else IN_QUEUE
        if token.status not in allowed:
            raise Refused("FAILED_PRECONDITION", "ILLEGAL_STATE_TRANSITION")
        if to == "NO_SHOW":
            eta, slot = self.view(token)[6], self.slots[token.slot_id]
            assert eta is not None and token.moved_at is not None
            gone = sum(1 for t in self.tokens.values()
                       if t.slot_id == token.slot_id and t.status in ("COMPLETED", "NO_SHOW"))
            since = eta + gone * dt.timedelta(minutes=slot.minutes)
            if token.status == "CONFIRMED":  # not come: the grace also runs from its seat, up to the slot's end
                since = max(since, min(token.moved_at, slot.end))
            if now < since + self.grace:
                raise Refused("FAILED_PRECONDITION", "GRACE_PERIOD_NOT_ELAPSED")
        if dry:
            return {}
        held = token.status in SEAT_HOLDING
        self._move(token, to, to)
        promoted = self._fill(self.slots[token.slot_id], token.token_id) if held else []
        return {"token": self.view(token), "promoted": [self.view(t) for t in promoted]}

    def cancel(self, token_id: str, now: dt.datetime, dry: bool = False) -> dict[str, Any]:
        return self._release(self._token(token_id), "CANCELLED", now, dry)

    def mark_no_show(self, token_id: str, now: dt.datetime, dry: bool = False) -> dict[str, Any]:
        return self._release(self._token(token_id), "NO_SHOW", now, dry)

    def check_in(self, token_id: str, now: dt.datetime, dry: bool = False) -> dict[str, Any]:
        self.now = now
        token = self._token(token_id)
        if token.status != "CONFIRMED":
            raise Refused("FAILED_PRECONDITION", "ILLEGAL_STATE_TRANSITION")
        if not dry:
            self._move(token, "CHECKED_IN", "CHECKED_IN")
        return {"token": self.view(token)}

    def call_next(self, now: dt.datetime, dry: bool = False) -> dict[str, Any]:
        """SPEC §7: the best CHECKED_IN token of the earliest slot that has one; the CALLED one is completed."""
        self.now = now
        for slot in self.slots.values():
            waiting = self._of_slot(slot.slot_id, frozenset({"CHECKED_IN"}))
            if waiting:
                break
        else:
            raise Refused("NOT_FOUND", "QUEUE_EMPTY")
        if dry:
            return {}
        called = sorted((t for t in self.active.values() if t.status == "CALLED"), key=lambda t: t.number)
        for t in called:
            self._move(t, "COMPLETED", "COMPLETED")
        nxt = min(waiting, key=lambda t: t.order)
        self._move(nxt, "CALLED", "CALLED")
        return {"token": self.view(nxt), "completed": self.view(called[-1]) if called else None}

    def set_capacity(self, slot_id: str, capacity: int, now: dt.datetime, dry: bool = False) -> dict[str, Any]:
        self.now = now
        slot = self.slots.get(slot_id)
        if slot is None:
            raise Refused("NOT_FOUND", "SLOT_NOT_FOUND")
        if capacity < self.holders(slot_id):
            raise Refused("FAILED_PRECONDITION", "CAPACITY_BELOW_SEAT_HOLDERS")
        if dry:
            return {}
        slot.capacity = capacity
        self._record("SLOT_CHANGED", slot_id=slot_id)
        return {"capacity": capacity, "promoted": [self.view(t) for t in self._fill(slot, "")]}

    def apply(self, op: Operation, now: dt.datetime, dry: bool = False) -> dict[str, Any]:
        """Runs one operation of the run; with `dry`, only whether (and how) the rules would refuse it."""
        r = op.request
        if op.method in ("AllocateToken", "AllocateEmergency"):
            source = "EMERGENCY" if op.method == "AllocateEmergency" else \
                pb.Source.Name(r.source).removeprefix("SOURCE_")
            if dry:
                self.decide_allocation(patient_key(r.patient), source, r.preferred_slot_time, r.flexible, now)
                return {}
            return self.allocate(f"{op.doctor_id}-{op.date.replace('-', '')}", patient_key(r.patient), source,
                                 r.preferred_slot_time, r.flexible, now)
        if op.method == "CancelToken":
            return self.cancel(r.token_id, now, dry)
        if op.method == "MarkNoShow":
            return self.mark_no_show(r.token_id, now, dry)
        if op.method == "CheckInToken":
            return self.check_in(r.token_id, now, dry)
        if op.method == "CallNext":
            return self.call_next(now, dry)
        if op.method == "UpdateSlotCapacity":
            return self.set_capacity(r.slot_id, r.max_capacity, now, dry)
        if op.method == "CreateSlots" and not dry:
            return self.create_slots(op.answer.slots)
        raise ValueError(f"the model does not know {op.method}")


def view_of(token: pb.Token) -> View:
    eta = token.estimated_time.ToDatetime(tzinfo=dt.timezone.utc) if token.HasField("estimated_time") else None
    return (token.token_id, token.token_number, token.slot_id, pb.Status.Name(token.status).removeprefix("STATUS_"),
            token.queue_position, token.waitlist_position, eta)


def answer_shape(method: str, answer: Any) -> dict[str, Any]:
    """An answer in the model's terms, to compare with what the model says the call answers."""
    if method in ("AllocateToken", "AllocateEmergency"):
        return {"token": view_of(answer.token), "moved": answer.moved_to_later_slot,
                "bumped": view_of(answer.bumped_token) if answer.HasField("bumped_token") else None}
    if method in ("CancelToken", "MarkNoShow"):
        return {"token": view_of(answer.token), "promoted": [view_of(t) for t in answer.promoted]}
    if method == "CheckInToken":
        return {"token": view_of(answer.token)}
    if method == "CallNext":
        return {"token": view_of(answer.token),
                "completed": view_of(answer.completed_token) if answer.HasField("completed_token") else None}
    if method == "UpdateSlotCapacity":
        return {"capacity": answer.slot.max_capacity, "promoted": [view_of(t) for t in answer.promoted]}
    return {}


# ---- what the database holds ----------------------------------------------------------------------------

@dataclass(frozen=True)
class EventRow:
    xmin: int
    sequence: int
    kind: str
    token_id: str
    token_number: int
    slot_id: str
    status: str
    caused_by: str
    occurred_at: str

    @property
    def compared(self) -> Event:
        return self.kind, self.token_id, self.token_number, self.slot_id, self.status, self.caused_by


@dataclass
class Stored:
    """The tables of one run's schema, read beside the servers, with each row's writing transaction (xmin)."""

    days: dict[tuple[str, str], Any]
    events: dict[tuple[str, str], list[EventRow]]
    tokens: dict[str, Any]
    slots: dict[str, Any]
    requests: dict[str, Any]  # request_id -> (xmin, method, response, refusal reason or None)


def read_stored(database_url: str) -> Stored:
    engine = sqlalchemy.create_engine(database_url, poolclass=sqlalchemy.NullPool)
    try:
        with engine.connect() as conn:
            def rows(sql: str) -> list[Any]:
                return list(conn.exec_driver_sql(sql))

            days = {(r.doctor_id, r.date): r for r in rows(
                "SELECT xmin::text::bigint AS xmin, doctor_id, date, last_token_number, last_sequence "
                "FROM doctor_days")}
            events: dict[tuple[str, str], list[EventRow]] = defaultdict(list)
            for r in rows("SELECT xmin::text::bigint AS xmin, doctor_id, date, sequence, kind, token_id, token_number, "
                          "slot_id, status, caused_by_token_id, occurred_at FROM queue_events "
                          "ORDER BY doctor_id, date, sequence"):
                events[(r.doctor_id, r.date)].append(EventRow(
                    r.xmin, r.sequence, r.kind, r.token_id, r.token_number, r.slot_id, r.status,
                    r.caused_by_token_id, r.occurred_at))
            tokens = {r.token_id: r for r in rows(
                "SELECT xmin::text::bigint AS xmin, token_id, token_number, doctor_id, date, slot_id, source, status, "
                "patient_identity, created_at, bump_count FROM tokens")}
            slots = {r.slot_id: r for r in rows(
                "SELECT xmin::text::bigint AS xmin, slot_id, doctor_id, date, max_capacity FROM slots")}
            requests = {r.request_id: (r.xmin, r.method, bytes(r.response),
                                       json.loads(r.refusal)["reason"] if r.refusal else None) for r in rows(
                "SELECT xmin::text::bigint AS xmin, request_id, method, response, refusal FROM stored_requests")}
    finally:
        engine.dispose()
    return Stored(days, dict(events), tokens, slots, requests)


def storage_violations(stored: Stored) -> list[str]:
    """No half-done transaction: counters, numbers and sequences agree, each token's (and slot's) latest row and
    its latest event were written by one transaction, and each token began with its creation event."""
    problems = []
    tokens_of: dict[tuple[str, str], list[Any]] = defaultdict(list)
    for t in stored.tokens.values():
        tokens_of[(t.doctor_id, t.date)].append(t)
    for key, day in stored.days.items():
        name = f"{key[0]} {key[1]}"
        numbers = sorted(t.token_number for t in tokens_of[key])
        if numbers != list(range(1, day.last_token_number + 1)):
            problems.append(f"storage: {name}: last_token_number {day.last_token_number}, token numbers "
                            f"{_runs(numbers)}")
        events = stored.events.get(key, [])
        sequences = [e.sequence for e in events]
        if sequences != list(range(1, day.last_sequence + 1)):
            problems.append(f"storage: {name}: last_sequence {day.last_sequence}, event sequences {_runs(sequences)}")
        if events and day.xmin != events[-1].xmin:
            problems.append(f"storage: {name}: the day row was last written by transaction {day.xmin}, its last "
                            f"event by {events[-1].xmin}")
        history: dict[str, list[EventRow]] = defaultdict(list)
        for e in events:
            history[e.token_id or e.slot_id].append(e)
        for slot in (s for s in stored.slots.values() if (s.doctor_id, s.date) == key):
            changes = [e for e in history.pop(slot.slot_id, []) if e.kind == "SLOT_CHANGED"]
            if not changes or changes[-1].xmin != slot.xmin:
                problems.append(f"storage: {slot.slot_id}: the slot row was last written by transaction {slot.xmin}, "
                                f"its last SLOT_CHANGED event by {changes[-1].xmin if changes else 'none'}")
        for token_id in history.keys() - {t.token_id for t in tokens_of[key]}:
            problems.append(f"storage: {token_id}: has events but no token row")
        for t in tokens_of[key]:
            mine = history.get(t.token_id)
            if not mine:
                problems.append(f"storage: {t.token_id}: a token row without any event")
                continue
            first, last = mine[0], mine[-1]
            if first.kind not in ("ALLOCATED", "WAITLISTED") or first.occurred_at != t.created_at:
                problems.append(f"storage: {t.token_id}: first event {first.kind} at {first.occurred_at}, created "
                                f"{t.created_at}")
            if last.status != t.status or last.xmin != t.xmin:
                problems.append(f"storage: {t.token_id}: row says {t.status} (transaction {t.xmin}), its last event "
                                f"{last.kind} says {last.status} (transaction {last.xmin})")
            if any(e.token_number != t.token_number or e.slot_id != t.slot_id for e in mine):
                problems.append(f"storage: {t.token_id}: an event names another number or slot than the token")
    for key in stored.events.keys() - stored.days.keys():
        problems.append(f"storage: {key}: events without a doctor-day row")
    return problems


# ---- the replay --------------------------------------------------------------------------------------------

@dataclass
class Group:
    """The events one transaction wrote (one xmin), and the operation whose stored request it wrote."""

    xmin: int
    events: list[EventRow]
    op: Operation | None = None


@dataclass
class Verdict:
    violations: list[str]
    transactions: int = 0
    events: int = 0
    refusals_justified: int = 0
    lost: int = 0


def check_run(stored: Stored, operations: list[Operation], grace_minutes: int, max_waitlist: int,
              clock: dt.datetime, api_tokens: dict[tuple[str, str], list[pb.Token]]) -> Verdict:
    """Everything above, for every doctor-day of the run. `api_tokens` is ListTokens of each day at the end."""
    verdict = Verdict(storage_violations(stored))
    by_request = {op.request_id: op for op in operations}
    requests_by_xmin: dict[int, list[str]] = defaultdict(list)
    for request_id, (xmin, _, _, _) in stored.requests.items():
        requests_by_xmin[xmin].append(request_id)
    landed: set[str] = set()
    for key, events in sorted(stored.events.items()):
        groups = _groups(key, events, requests_by_xmin, by_request, verdict.violations)
        landed.update(g.op.request_id for g in groups if g.op is not None)
        mine = [op for op in operations if (op.doctor_id, op.date) == key]
        failed = [op for op in mine if op.outcome == "failed"]
        copies = [op for op in mine if op.copy_refusal is not None and op.request_id in landed]
        _replay_day(key, groups, failed, copies, grace_minutes, max_waitlist, clock, stored, api_tokens.get(key, []),
                    verdict)
    for op in operations:
        if op.method not in RESPONSES:
            continue
        if op.outcome == "ok" and op.request_id not in landed:
            verdict.lost += 1
            verdict.violations.append(f"lost: {op.describe()} was acknowledged, but no transaction of the table "
                                      "wrote its request")
        if op.outcome == "failed" and op.request_id in landed:
            verdict.violations.append(f"refused but landed: {op.describe()} was refused, yet its request_id is "
                                      "stored with a change (SPEC §9: a copy of a request answers the first answer)")
        if op.outcome == "ok" and op.request_id in stored.requests:
            response = stored.requests[op.request_id][2]
            if RESPONSES[op.method].FromString(response) != op.answer:
                verdict.violations.append(f"answer: {op.describe()}: the stored answer differs from the one given")
    of_the_run = {op.request_id for op in operations}
    for request_id, (xmin, method, _, refusal) in stored.requests.items():
        if refusal is not None:  # a stored refusal (SPEC §9): no change, and the refusal its caller was given
            op = by_request.get(request_id)
            if request_id in landed:
                verdict.violations.append(f"storage: request {request_id} ({method}) is stored as refused "
                                          f"({refusal}) by a transaction that changed the queue")
            elif op is not None and op.outcome == "ok":
                verdict.violations.append(f"answer: {op.describe()} was answered OK, but its request_id is stored "
                                          f"as refused ({refusal})")
            elif op is not None and op.outcome == "failed" and op.reason != refusal:
                verdict.violations.append(f"answer: {op.describe()} was refused {op.reason}, but its request_id is "
                                          f"stored as refused {refusal}")
        elif request_id in of_the_run and method != "CreateDoctorRequest" and request_id not in landed:
            verdict.violations.append(f"storage: request {request_id} ({method}) is stored by transaction {xmin}, "
                                      "which wrote no event: a stored answer without its change")
    return verdict


def _groups(key: tuple[str, str], events: list[EventRow], requests_by_xmin: dict[int, list[str]],
            by_request: dict[str, Operation], problems: list[str]) -> list[Group]:
    """The day's events cut into transactions (consecutive events with one xmin), each with its operation."""
    groups: list[Group] = []
    seen: set[int] = set()
    for xmin, run in itertools.groupby(events, key=lambda e: e.xmin):
        if xmin in seen:
            problems.append(f"storage: {key[0]} {key[1]}: transaction {xmin}'s events are not consecutive")
        seen.add(xmin)
        group = Group(xmin, list(run))
        request_ids = requests_by_xmin.get(xmin, [])
        ops = [by_request[r] for r in request_ids if r in by_request]
        if len(request_ids) != 1 or len(ops) != 1:
            problems.append(f"storage: {key[0]} {key[1]}: transaction {xmin} (events {group.events[0].sequence}-"
                            f"{group.events[-1].sequence}) stored {len(ops)} requests of the run and "
                            f"{len(request_ids) - len(ops)} others; one was expected")
        if ops:
            group.op = ops[0]
            if (group.op.doctor_id, group.op.date) != key:
                problems.append(f"storage: {group.op.describe()} changed {key}, not its own doctor-day")
        groups.append(group)
    return groups


def _replay_day(key: tuple[str, str], groups: list[Group], failed: list[Operation], copies: list[Operation],
                grace_minutes: int, max_waitlist: int, clock: dt.datetime, stored: Stored,
                api_tokens: list[pb.Token], verdict: Verdict) -> None:
    problems = verdict.violations
    name = f"{key[0]} {key[1]}"
    model = SequentialDay(grace_minutes, max_waitlist)
    windows = _refusal_windows(groups, failed)
    refusals = _Refusals(failed, windows)
    copy_refusals = _copy_refusals(groups, copies)
    broken = ""
    for index, group in enumerate(itertools.chain(groups, [None])):
        if not broken:
            refusals.try_in(model, index, clock)
            copy_refusals.try_in(model, index, clock)
        if group is None:
            break
        op = group.op
        if broken or op is None:
            broken = broken or f"transaction {group.xmin} has no operation"
            continue
        verdict.transactions += 1
        verdict.events += len(group.events)
        moments = {e.occurred_at for e in group.events}
        now = dt.datetime.fromisoformat(min(moments))
        if len(moments) > 1:
            problems.append(f"storage: {name}: transaction {group.xmin} has events at {sorted(moments)}")
        model.events = []
        try:
            expected = model.apply(op, now)
        except Refused as refusal:
            broken = f"{op.describe()} committed events {[e.compared for e in group.events]}, but the model " \
                     f"refuses it ({refusal}) in the state the table's earlier transactions leave"
            continue
        if sorted(model.events) != sorted(e.compared for e in group.events):
            broken = f"{op.describe()} committed {[e.compared for e in group.events]}, the model's events are " \
                     f"{model.events}"
            continue
        answers = [("answer", op.answer)] if op.outcome == "ok" else []
        if op.request_id in stored.requests:
            answers.append(("stored answer", RESPONSES[op.method].FromString(stored.requests[op.request_id][2])))
        for what, answer in answers:
            if op.method != "CreateSlots" and answer_shape(op.method, answer) != expected:
                problems.append(f"model: {name}: {op.describe()}: the {what} is {answer_shape(op.method, answer)}, "
                                f"the model's {expected}")
    if broken:
        problems.append(f"model: {name}: the replay stopped: {broken}")
        return
    for i, op in enumerate(copies):
        code, reason, _ = op.copy_refusal  # type: ignore[misc]
        when, why = ("after", "it did not answer the first answer") if i in copy_refusals.unjustified else \
            ("before", "the two copies answered differently")
        problems.append(f"copy refused {when} landing: {name}: {op.describe()} was sent to two replicas at once; one "
                        f"copy landed, the other was refused {code} {reason} {when} it landed: {why} (SPEC §9)")
    verdict.refusals_justified += len(failed) - len(refusals.unjustified)
    for i in sorted(refusals.unjustified, key=lambda i: failed[i].number):
        problems.append(f"refusal: {name}: {failed[i].describe()}: the rules refuse it that way in none of the states "
                        f"{windows[i][0]}..{windows[i][1]} (after that many transactions) that the call could see")
    problems += _final_violations(key, model, stored, api_tokens)
    problems += _real_time_violations(name, groups)


def _refusal_windows(groups: list[Group], failed: list[Operation]) -> list[tuple[int, int]]:
    """For each refused call, the states it could have seen, as counts of the day's transactions: at least every
    transaction acknowledged before the call began, and none of those begun after it was answered."""
    acked = sorted((g.op.answered_at, i) for i, g in enumerate(groups)
                   if g.op is not None and g.op.outcome == "ok" and g.op.answered_at is not None)
    highest_acked = list(itertools.accumulate((i for _, i in acked), max))
    invoked = sorted((g.op.invoked_at, i) for i, g in enumerate(groups) if g.op is not None)
    lowest_later = list(itertools.accumulate((i for _, i in reversed(invoked)), min))[::-1]
    windows = []
    for op in failed:
        before = bisect.bisect_left(acked, (op.invoked_at, -1))
        low = highest_acked[before - 1] + 1 if before else 0
        after = bisect.bisect_right(invoked, (op.answered_at or float("inf"), len(groups)))
        high = lowest_later[after] if after < len(invoked) else len(groups)
        windows.append((low, high))
    return windows


def _copy_refusals(groups: list[Group], copies: list[Operation]) -> _Refusals:
    """The refused copies of calls that landed, each to be tried only in states before its call's transaction:
    justified there, the copy ran first; not, it ran after the landed copy and should have answered its answer."""
    position = {g.op.request_id: i for i, g in enumerate(groups) if g.op is not None}
    shadows = [dataclasses.replace(op, outcome="failed", code=op.copy_refusal[0], reason=op.copy_refusal[1],
                                   answered_at=op.copy_refusal[2]) for op in copies if op.copy_refusal]
    windows = [(low, min(high, position[op.request_id]))
               for op, (low, high) in zip(shadows, _refusal_windows(groups, shadows))]
    return _Refusals(shadows, windows)


class _Refusals:
    """The refused calls of a day, each tried in the states of its window as the replay passes them."""

    def __init__(self, failed: list[Operation], windows: list[tuple[int, int]]):
        self.failed = failed
        self.windows = windows
        self.waiting = sorted(range(len(failed)), key=lambda i: windows[i][0], reverse=True)  # next low last
        self.open: set[int] = set()
        self.unjustified = set(range(len(failed)))

    def try_in(self, model: SequentialDay, state: int, clock: dt.datetime) -> None:
        """Tries, in the state after `state` transactions, each unjustified call whose window holds that state."""
        while self.waiting and self.windows[self.waiting[-1]][0] <= state:
            self.open.add(self.waiting.pop())
        for i in list(self.open):
            if self.windows[i][1] < state:
                self.open.discard(i)
                continue
            op = self.failed[i]
            try:
                model.apply(op, clock, dry=True)
            except Refused as refusal:
                if (refusal.code, refusal.reason) == (op.code, op.reason):
                    self.unjustified.discard(i)
                    self.open.discard(i)


def _final_violations(key: tuple[str, str], model: SequentialDay, stored: Stored,
                      api_tokens: list[pb.Token]) -> list[str]:
    """The end state: the model's tokens are the table's and the API's, statuses and places alike."""
    problems = []
    table = {t.token_id: t for t in stored.tokens.values() if (t.doctor_id, t.date) == key}
    for token_id in table.keys() - model.tokens.keys():
        problems.append(f"final: {token_id} is in the table, the model never created it")
    shown = {t.token_id: view_of(t) for t in api_tokens}
    for token in model.tokens.values():
        row = table.get(token.token_id)
        if row is None:
            problems.append(f"final: {token.token_id} is missing from the table")
            continue
        said = (row.token_number, row.slot_id, row.source, row.status, row.patient_identity,
                dt.datetime.fromisoformat(row.created_at), row.bump_count)
        own = (token.number, token.slot_id, token.source, token.status, token.patient, token.queued_at, token.bumps)
        if said != own:
            problems.append(f"final: {token.token_id}: the table has {said}, the model {own}")
        if shown.get(token.token_id) != model.view(token):
            problems.append(f"final: {token.token_id}: the API shows {shown.get(token.token_id)}, the model "
                            f"{model.view(token)}")
    for slot in model.slots.values():
        row = stored.slots.get(slot.slot_id)
        if row is None or row.max_capacity != slot.capacity:
            problems.append(f"final: {slot.slot_id}: capacity {row.max_capacity if row else 'none'} in the table, "
                            f"{slot.capacity} in the model")
        if [t.token_id for t in model.waitlist(slot.slot_id)] != \
                [t.token_id for t in sorted(api_tokens, key=lambda t: t.waitlist_position)
                 if t.slot_id == slot.slot_id and t.status == pb.STATUS_WAITLISTED]:
            problems.append(f"final: {slot.slot_id}: the API's waitlist order is not the model's")
    return problems


def _real_time_violations(name: str, groups: list[Group]) -> list[str]:
    """An operation acknowledged before another was invoked must come first in the table."""
    problems = []
    latest_invoked: tuple[float, Operation | None] = (float("-inf"), None)
    for group in groups:
        op = group.op
        if op is None or op.method == "CreateSlots":
            continue
        if op.outcome == "ok" and op.answered_at is not None and op.answered_at < latest_invoked[0]:
            problems.append(f"order: {name}: {op.describe()} was acknowledged before {latest_invoked[1].describe()} "
                            "was invoked, yet the table orders it after")  # type: ignore[union-attr]
        latest_invoked = max(latest_invoked, (op.invoked_at, op), key=lambda x: x[0])
    return problems


def summarised(violations: list[str]) -> list[str]:
    """At most a few violations of each kind (the word before the colon), with a count of the rest."""
    kinds: dict[str, list[str]] = defaultdict(list)
    for v in violations:
        kinds[v.split(":", 1)[0]].append(v)
    lines = []
    for kind, items in kinds.items():
        lines += items[:SHOWN_VIOLATIONS_PER_KIND]
        if len(items) > SHOWN_VIOLATIONS_PER_KIND:
            lines.append(f"... and {len(items) - SHOWN_VIOLATIONS_PER_KIND} more {kind} violations")
    return lines


def _runs(numbers: list[int]) -> str:
    return str(numbers) if len(numbers) <= 12 else f"{numbers[:6]} ... {numbers[-6:]} ({len(numbers)})"
