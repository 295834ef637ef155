"""A hypothesis state machine drives `OPDService` on a real SQLite store against a plain model of SPEC §2–9.

The model is our own bookkeeping, written from the SPEC and sharing no rule code with the engine: which seats
are free, who waits in which order, what each call must answer or refuse, and which events each change writes.
After every step the invariants of SPEC §3 (and the times of §8) are read back from storage: the tables with
SQLAlchemy, and the views through the running service or, now and then, a fresh one on the same database, so
that the engine's cache is not what is being checked.
"""

from __future__ import annotations

import collections
import datetime as dt
import itertools
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from zoneinfo import ZoneInfo

import hypothesis.strategies as st
from hypothesis import HealthCheck, event, settings
from hypothesis.stateful import (
    RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test,
)
import pytest
from sqlalchemy import select

from opd_grpc.engine.clock import TestClock
from opd_grpc.engine.errors import AlreadyExists, EngineError, FailedPrecondition, NotFound, ResourceExhausted
from opd_grpc.engine.model import Allocation, DayChanges, DoctorDay, Patient, Rules, Source, Status, TokenView
from opd_grpc.engine.access import ANONYMOUS
from opd_grpc.engine.service import AllocateCommand, Call, OPDService, Replay, Retry, SlotRequest
from opd_grpc.storage import schema
from opd_grpc.storage.store import SqlStore
from opd_grpc.storage.tables import DoctorDayRow, QueueEventRow, SlotRow, TokenRow

pytestmark = pytest.mark.backend_independent

DATE = dt.date(2030, 1, 7)
DAY = DATE.isoformat()
SLOT_TIMES = [("09:00", "09:20"), ("09:20", "09:40"), ("09:40", "10:00")]
CONSULTATION_MINUTES = 10
GRACE_MINUTES = 15
MAX_WAITLIST = 2

# SPEC §2, written out again so that the engine's own table is under test too.
PRIORITY_OF = {Source.EMERGENCY: 1, Source.PAID_PRIORITY: 2, Source.FOLLOW_UP: 3, Source.ONLINE_BOOKING: 4,
               Source.WALK_IN: 5}
SEATED = {Status.CONFIRMED, Status.CHECKED_IN, Status.CALLED, Status.COMPLETED}
WITH_TIME = {Status.CONFIRMED, Status.CHECKED_IN, Status.CALLED}
FINAL = {Status.COMPLETED, Status.CANCELLED, Status.NO_SHOW}
NOT_FINAL = set(Status) - FINAL

# A small pool, so that the same person books again, under SPEC §1's rule as `same_person` writes it out.
PATIENTS: list[Patient] = [
    Patient("Asha Rao", "9000000001", 34, "FEMALE"),
    Patient("  asha   RAO ", "9000000001", 34, "FEMALE"),  # case and spacing folded: Asha again
    Patient("Asha Rao", "+91 90000 00001", 34, "FEMALE"),  # with the country code: Asha again
    Patient("Asha Rao", "090000-00001", 34, "FEMALE"),  # with the trunk 0: Asha again
    Patient("Asha Rao", "9000000009", 61, "FEMALE"),  # another phone: someone else
    Patient("Asha Rao", "9000000001", 34, "FEMALE", mrn="MRN-0100"),  # Asha, where she has no mrn
    Patient("Asha Rao", "9000000001", 9, "FEMALE", mrn="MRN-0101"),  # her daughter: not MRN-0100
    Patient("Bilal Khan", "9000000002", 45, "MALE"),
    Patient("Chen Li", "9000000003", 29, "OTHER"),
    Patient("Devi Nair", "9000000004", 8, "FEMALE"),
    Patient("Meera Iyer", "9000000005", 52, "FEMALE", mrn="MRN-0077"),
    Patient("Meera S. Iyer", "9123456789", 52, "FEMALE", mrn="MRN-0077"),  # the same mrn: Meera
    Patient("meera iyer", "9000000005", 52, "FEMALE"),  # no mrn: Meera by phone and name (not by the other phone)
    Patient("Farid Ahmed", "9000000006", 70, "MALE"),
    Patient("Gita Sen", "9000000007", 23, "FEMALE"),
    Patient("Hari Das", "9000000008", 41, "MALE"),
    Patient("Irfan Ali", "9000000010", 37, "MALE"),
    Patient("Jaya Menon", "9000000011", 66, "FEMALE"),
    Patient("Kabir Singh", "9000000012", 12, "MALE"),
    Patient("Lata Joshi", "9000000013", 48, "FEMALE"),
    Patient("Mohan Pillai", "9000000014", 55, "MALE"),
]


def same_person(a: Patient, b: Patient) -> bool:
    """SPEC §1, written out apart from the engine: the same mrn; where either has none, the same phone (its last
    10 digits: a country code or trunk 0 before them left off) and the same name, case and spacing folded."""
    if a.mrn and b.mrn:
        return a.mrn.casefold() == b.mrn.casefold()
    return ("".join(filter(str.isdigit, a.phone))[-10:], " ".join(a.name.split()).casefold()) == \
        ("".join(filter(str.isdigit, b.phone))[-10:], " ".join(b.name.split()).casefold())


# What the state machine met, over all its examples: the test fails if it never met the interesting cases.
SEEN: collections.Counter[str] = collections.Counter()


def note(what: str) -> None:
    event(what)
    SEEN[what] += 1


Refusal = tuple[type[EngineError], str | None]  # the kind of refusal, and its reason when the SPEC names it


@dataclass
class ModelSlot:
    slot_id: str
    start: dt.datetime
    end: dt.datetime
    capacity: int


@dataclass
class ModelToken:
    token_id: str
    number: int
    slot_id: str
    source: Source
    status: Status
    queue_time: dt.datetime
    patient: Patient
    moved_at: dt.datetime  # its last change of status (or its creation)
    arrived: bool = False  # checked in once: a bump and a promotion back do not undo that

    def order(self) -> tuple[int, dt.datetime, int]:
        """SPEC §2."""
        return PRIORITY_OF[self.source], self.queue_time, self.number


@dataclass
class AllocationPlan:
    slot_id: str
    status: Status
    victim: ModelToken | None = None
    moved: bool = False


@dataclass
class Expectation:
    """What a call may answer: refusals that are allowed, and the plan if it may succeed (None: it must not)."""

    refusals: list[Refusal] = field(default_factory=list)
    plan: AllocationPlan | None = None


class ModelDay:
    """One doctor's day as the SPEC says it must be."""

    def __init__(self, doctor_id: str, slots: list[ModelSlot], clock: TestClock):
        self.doctor_id = doctor_id
        self.clock = clock
        self.slots = {s.slot_id: s for s in slots}
        self.tokens: dict[str, ModelToken] = {}
        self.token_events: list[tuple[str, str, Status]] = []  # (token_id, kind, status after the change)
        self.bumps: list[tuple[str, str]] = []  # (victim, emergency)
        self.slot_events = collections.Counter({s.slot_id: 1 for s in slots})  # created: one SLOT_CHANGED each

    def in_slot(self, slot_id: str, statuses: set[Status]) -> list[ModelToken]:
        return [t for t in self.tokens.values() if t.slot_id == slot_id and t.status in statuses]

    def free_seats(self, slot_id: str) -> int:
        return self.slots[slot_id].capacity - len(self.in_slot(slot_id, SEATED))

    def waitlist(self, slot_id: str) -> list[ModelToken]:
        return sorted(self.in_slot(slot_id, {Status.WAITLISTED}), key=ModelToken.order)

    def serving_order(self, slot_id: str) -> list[ModelToken]:
        """SPEC §8: CALLED first, then §2."""
        return sorted(self.in_slot(slot_id, WITH_TIME), key=lambda t: (t.status is not Status.CALLED, t.order()))

    def expected_view(self, token: ModelToken) -> tuple[dt.datetime | None, int, int]:
        """(estimated_time, queue_position, waitlist_position) by SPEC §8."""
        if token.status is Status.WAITLISTED:
            return None, 0, self.waitlist(token.slot_id).index(token) + 1
        if token.status in WITH_TIME:
            place = self.serving_order(token.slot_id).index(token) + 1
            slot = self.slots[token.slot_id]
            start = slot.start.astimezone(dt.timezone.utc)  # real minutes, not the wall clock's
            return start + dt.timedelta(minutes=(place - 1) * CONSULTATION_MINUTES), place, 0
        return None, 0, 0

    def no_show_due(self, token: ModelToken) -> dt.datetime:
        """SPEC §6's first minute for a no-show: the grace period after the estimated time with the slot's patients
        already seen or marked no-show counted ahead of it, or, for a patient who has not come, after the time
        they got their seat if later (but not after the slot's end)."""
        eta, place, _ = self.expected_view(token)
        assert eta is not None
        since = eta + dt.timedelta(minutes=len(self.in_slot(token.slot_id, {Status.COMPLETED, Status.NO_SHOW}))
                                   * CONSULTATION_MINUTES)
        if token.status is Status.CONFIRMED:
            since = max(since, min(token.moved_at, self.slots[token.slot_id].end))
        return since + dt.timedelta(minutes=GRACE_MINUTES)

    def move(self, token: ModelToken, to: Status, kind: str) -> None:
        token.status, token.moved_at = to, self.clock.now()
        token.arrived |= to is Status.CHECKED_IN
        self.token_events.append((token.token_id, kind, to))

    def fill_seats(self, slot_id: str) -> list[ModelToken]:
        """SPEC §6: waitlist heads take free seats."""
        promoted = self.waitlist(slot_id)[: max(self.free_seats(slot_id), 0)]
        for head in promoted:
            self.move(head, Status.CONFIRMED, "PROMOTED")
        return promoted

    # ---- SPEC §4, §5 ----

    def expect_allocation(self, patient: Patient, source: Source, preferred: str, flexible: bool,
                          now: dt.datetime) -> Expectation:
        expect = Expectation()
        if any(same_person(t.patient, patient) and t.status in NOT_FINAL for t in self.tokens.values()):
            expect.refusals.append((AlreadyExists, None))
        ordered = sorted(self.slots.values(), key=lambda s: s.start)
        open_slots = [s for s in ordered if now < s.end]
        if preferred:
            slot = next((s for s in ordered if f"{s.start:%H:%M}" == preferred), None)
            if slot is None:
                expect.refusals.append((NotFound, None))
                return expect
            if slot not in open_slots:
                expect.refusals.append((FailedPrecondition, "SLOT_CLOSED"))
                return expect
        elif not open_slots:
            expect.refusals.append((FailedPrecondition, "SLOT_CLOSED"))
            return expect
        else:
            slot = next((s for s in open_slots if self.free_seats(s.slot_id) > 0), open_slots[0])
        waitlist_full = len(self.waitlist(slot.slot_id)) >= MAX_WAITLIST
        if self.free_seats(slot.slot_id) > 0:
            plan = AllocationPlan(slot.slot_id, Status.CONFIRMED)
        elif source is Source.EMERGENCY and (victim := self.bump_victim(slot.slot_id)) is not None:
            plan = AllocationPlan(slot.slot_id, Status.CONFIRMED, victim=victim)  # even onto a full waitlist
        elif flexible and (later := next((s for s in open_slots if s.start > slot.start
                                          and self.free_seats(s.slot_id) > 0), None)) is not None:
            plan = AllocationPlan(later.slot_id, Status.CONFIRMED, moved=True)
        elif waitlist_full and source is not Source.EMERGENCY:  # an emergency is waitlisted first in line anyway
            expect.refusals.append((ResourceExhausted, "WAITLIST_FULL"))
            return expect
        else:
            plan = AllocationPlan(slot.slot_id, Status.WAITLISTED)
        if not any(kind is AlreadyExists for kind, _ in expect.refusals):
            expect.plan = plan
        return expect

    def bump_victim(self, slot_id: str) -> ModelToken | None:
        """SPEC §5: the non-emergency CONFIRMED or CHECKED_IN seat holder with the worst §2 order."""
        candidates = [t for t in self.in_slot(slot_id, {Status.CONFIRMED, Status.CHECKED_IN})
                      if t.source is not Source.EMERGENCY]
        return max(candidates, key=ModelToken.order, default=None)

    def allocate(self, plan: AllocationPlan, patient: Patient, source: Source, now: dt.datetime) -> ModelToken:
        number = len(self.tokens) + 1
        token = ModelToken(f"{self.doctor_id}-{DATE:%Y%m%d}-T{number}", number, plan.slot_id, source,
                           plan.status, now, patient, now)
        self.tokens[token.token_id] = token
        if plan.victim is not None:
            self.move(plan.victim, Status.WAITLISTED, "BUMPED")
            self.bumps.append((plan.victim.token_id, token.token_id))
        self.token_events.append((token.token_id, "ALLOCATED" if plan.status is Status.CONFIRMED else "WAITLISTED",
                                  plan.status))
        return token


@dataclass(frozen=True)
class AllocationArgs:
    doctor: int
    patient: int
    source: Source
    preferred: int | None
    flexible: bool


@dataclass(frozen=True)
class AnsweredRequest:
    request_id: str
    args: AllocationArgs
    response: bytes


# The day as stored: tokens, slots, events and the doctor-day rows with their counters.
STORED_DAY = [select(row.__table__).where(row.date == DAY)
              for row in (TokenRow, SlotRow, QueueEventRow, DoctorDayRow)]


def instant(stored: str) -> dt.datetime:
    """An instant as the schema stores it: ISO-8601 UTC text."""
    return dt.datetime.fromisoformat(stored)


def allocation_args() -> st.SearchStrategy[AllocationArgs]:
    return st.builds(AllocationArgs, doctor=st.integers(0, 1), patient=st.integers(0, len(PATIENTS) - 1),
                     source=st.sampled_from(Source), preferred=st.none() | st.integers(0, len(SLOT_TIMES) - 1),
                     flexible=st.booleans())


def encode_allocation(result: Allocation) -> bytes:
    token = result.token.token
    return f"{token.token_id} {token.status.value} {token.slot_id}".encode()


class EngineMachine(RuleBasedStateMachine):
    """Drives the engine with random calls; each either matches the model or is a refusal the model allows."""

    def __init__(self) -> None:
        super().__init__()
        self.workdir = Path(tempfile.mkdtemp(prefix="opd-properties-"))
        self.store = SqlStore(f"sqlite:///{self.workdir / 'opd.db'}")
        schema.prepare(self.store.engine)
        self.days: dict[str, ModelDay] = {}
        self.answered: list[AnsweredRequest] = []
        self.request_ids = 0
        self.views_checked = 0

    @initialize(timezone=st.sampled_from(["UTC", "Asia/Kolkata"]),
                capacities=st.lists(st.lists(st.integers(1, 3), min_size=2, max_size=3), min_size=1, max_size=2),
                bookings=st.lists(allocation_args(), min_size=3, max_size=12))
    def open_clinic(self, timezone: str, capacities: list[list[int]], bookings: list[AllocationArgs]) -> None:
        """Doctors with small slots, and the first bookings, so that every example starts with a clinic to
        work on, whatever rules a run leaves out."""
        self.tz = ZoneInfo(timezone)
        self.rules = Rules(average_consultation_minutes=CONSULTATION_MINUTES,
                           no_show_grace_period_minutes=GRACE_MINUTES, max_waitlist_size=MAX_WAITLIST,
                           timezone=self.tz)
        self.clock = TestClock(dt.datetime.combine(DATE, dt.time(8, 50), self.tz))
        self.service = OPDService(self.store, self.clock, self.rules)
        self.replica = OPDService(self.store, self.clock, self.rules)  # a second process on the same database
        for n, doctor_capacities in enumerate(capacities, 1):
            doctor = self.service.create_doctor(f"Dr Number {n}", "General Medicine", Call(ANONYMOUS, "CreateDoctor"))
            requests = [SlotRequest(DAY, start, end, capacity, CONSULTATION_MINUTES)
                        for (start, end), capacity in zip(SLOT_TIMES, doctor_capacities)]
            created = self.service.create_slots(doctor.doctor_id, requests, Call(ANONYMOUS, "CreateSlots"))
            assert not isinstance(created, Replay)
            self.days[doctor.doctor_id] = ModelDay(doctor.doctor_id, [
                ModelSlot(s.slot_id, self.local(s.start_time), self.local(s.end_time), s.max_capacity)
                for s in created], self.clock)
        for args in bookings:
            self.allocate_and_check(args, None)

    def local(self, time: dt.time) -> dt.datetime:
        return dt.datetime.combine(DATE, time, self.tz)

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # ---- allocation and retries (SPEC §4, §5, §9) ----

    @rule(args=allocation_args(), with_request_id=st.booleans())
    def allocate(self, args: AllocationArgs, with_request_id: bool) -> None:
        retry = None
        if with_request_id:
            self.request_ids += 1
            retry = self.retry(str(uuid.UUID(int=self.request_ids)), args)
        result = self.allocate_and_check(args, retry)
        if retry is not None and result is not None:
            self.answered.append(AnsweredRequest(retry.request_id, args, encode_allocation(result)))

    @rule(doctor=st.integers(0, 1), patient=st.integers(0, len(PATIENTS) - 1),
          preferred=st.none() | st.integers(0, len(SLOT_TIMES) - 1))
    def allocate_emergency(self, doctor: int, patient: int, preferred: int | None) -> None:
        """SPEC §5, drawn often enough that full slots meet emergencies."""
        self.allocate_and_check(AllocationArgs(doctor, patient, Source.EMERGENCY, preferred, False), None)

    @rule(doctor=st.integers(0, 1), patient=st.integers(0, len(PATIENTS) - 1), preferred=st.integers(0, 1),
          source=st.sampled_from([s for s in Source if s is not Source.EMERGENCY]))
    def allocate_flexibly(self, doctor: int, patient: int, preferred: int, source: Source) -> None:
        """SPEC §4 flexible, aimed at the early slots, which fill first, so that a later slot takes the token."""
        self.allocate_and_check(AllocationArgs(doctor, patient, source, preferred, True), None)

    @precondition(lambda self: self.answered)
    @rule(data=st.data(), change=st.sampled_from(["nothing", "the patient", "the call"]))
    def repeat_a_request_id(self, data: st.DataObject, change: str) -> None:
        """SPEC §9: the same request_id with the same request answers the first answer and changes nothing;
        with a different request it is refused."""
        first = data.draw(st.sampled_from(self.answered))
        if change == "nothing":
            reply = self.service.allocate(self.command(first.args), self.call(self.retry(first.request_id, first.args)))
            assert isinstance(reply, Replay), f"a repeated request_id ran again: {reply}"
            assert reply.response == first.response
            note("replayed a request_id")
            return
        try:
            if change == "the call":
                token_id = data.draw(st.sampled_from(sorted(self.all_tokens())))
                self.service.cancel(token_id, "", Call(ANONYMOUS, "CancelToken", Retry(
                    first.request_id, "CancelTokenRequest", token_id.encode(), lambda result: b"")))
            else:
                other = AllocationArgs(first.args.doctor, (first.args.patient + 1) % len(PATIENTS),
                                       first.args.source, first.args.preferred, first.args.flexible)
                self.service.allocate(self.command(other), self.call(self.retry(first.request_id, other)))
        except FailedPrecondition as error:
            assert error.reason == "REQUEST_ID_REUSED", error
        else:
            raise AssertionError(f"request_id {first.request_id} was accepted for a different request")

    @staticmethod
    def call(retry: Retry | None) -> Call:
        return Call(ANONYMOUS, "AllocateToken", retry)

    def retry(self, request_id: str, args: AllocationArgs) -> Retry:
        return Retry(request_id, "AllocateTokenRequest", repr(self.command(args)).encode(), encode_allocation)

    def command(self, args: AllocationArgs) -> AllocateCommand:
        doctor_id = self.doctor_id(args.doctor)
        preferred = "" if args.preferred is None else SLOT_TIMES[args.preferred][0]
        # Whether an emergency may move to a later slot is not said by the SPEC (§4 vs §5): not asked here.
        flexible = args.flexible and args.source is not Source.EMERGENCY
        return AllocateCommand(PATIENTS[args.patient], doctor_id, DAY, preferred, args.source, flexible)

    def allocate_and_check(self, args: AllocationArgs, retry: Retry | None) -> Allocation | None:
        command = self.command(args)
        day = self.days[command.doctor_id]
        now = self.clock.now()
        expect = day.expect_allocation(command.patient, args.source, command.preferred_slot_time, command.flexible, now)
        try:
            result = self.service.allocate(command, self.call(retry))
        except EngineError as error:
            self.check_refusal(error, expect.refusals)
            return None
        assert expect.plan is not None, f"expected a refusal {expect.refusals}, got {result}"
        assert isinstance(result, Allocation), result
        plan = expect.plan
        token = day.allocate(plan, command.patient, args.source, now)
        got = result.token.token
        assert (got.token_id, got.token_number, got.slot_id, got.status, got.source) == \
            (token.token_id, token.number, plan.slot_id, plan.status, args.source)
        assert result.moved_to_later_slot == plan.moved
        self.check_view(day, result.token)
        if plan.victim is None:
            assert result.bumped is None, f"{result.bumped} was bumped needlessly"
        else:
            assert result.bumped is not None and result.bumped.token.token_id == plan.victim.token_id, \
                f"bumped {result.bumped}, not the worst seat holder {plan.victim}"
            self.check_view(day, result.bumped)
            note("emergency bumped a seat holder")
        note("moved to a later slot" if plan.moved else f"allocated {plan.status.value}")
        return result

    # ---- the day in the clinic (SPEC §6, §7) ----

    @precondition(lambda self: self.all_tokens())
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        self.release(self.pick_token(data, NOT_FINAL), Status.CANCELLED, "CANCELLED")

    def release(self, token_id: str, to: Status, kind: str) -> None:
        """CancelToken and MarkNoShow: the freed seat goes to the waitlist head(s) in the same change."""
        day, token = self.find(token_id)
        refusals: list[Refusal] = []
        if token is None:
            refusals.append((NotFound, None))
        elif token.status not in (WITH_TIME if to is Status.NO_SHOW else NOT_FINAL):
            refusals.append((FailedPrecondition, None))
        elif to is Status.NO_SHOW and self.clock.now() < day.no_show_due(token):
            refusals.append((FailedPrecondition, "GRACE_PERIOD_NOT_ELAPSED"))
        try:
            if to is Status.CANCELLED:
                result = self.service.cancel(token_id, "patient went home", Call(ANONYMOUS, "CancelToken"))
            else:
                result = self.service.mark_no_show(token_id, Call(ANONYMOUS, "MarkNoShow"))
        except EngineError as error:
            self.check_refusal(error, refusals)
            return
        assert not refusals and token is not None, f"expected a refusal {refusals}, got {result}"
        day.move(token, to, kind)
        promoted = day.fill_seats(token.slot_id)
        assert not isinstance(result, Replay)
        self.check_view(day, result.token)
        assert [v.token.token_id for v in result.promoted] == [t.token_id for t in promoted]
        for view in result.promoted:
            self.check_view(day, view)
        note(f"{kind} a token")
        if promoted:
            note("promoted from a waitlist")

    @precondition(lambda self: self.all_tokens())
    @rule(data=st.data(), when=st.sampled_from(["now", "on the minute", "a minute early"]))
    def mark_no_show(self, data: st.DataObject, when: str) -> None:
        """SPEC §6, now or at its edge: the clock moved to the minute the first grace period ends, or one
        minute before, and that token marked."""
        due = sorted((day.no_show_due(token), token.token_id)
                     for day in self.days.values() for token in day.tokens.values() if token.status in WITH_TIME)
        if when == "now" or not due:
            self.release(self.pick_token(data, WITH_TIME), Status.NO_SHOW, "NO_SHOW")
            return
        first_due, token_id = due[0]
        self.clock.set(max(first_due - dt.timedelta(minutes=when == "a minute early"), self.clock.now()))
        self.release(token_id, Status.NO_SHOW, "NO_SHOW")

    @precondition(lambda self: self.all_tokens())
    @rule(data=st.data(), everyone=st.booleans())
    def check_in(self, data: st.DataObject, everyone: bool) -> None:
        """One patient arrives, or everyone confirmed at once, so that CallNext has a choice to make."""
        if everyone:
            arrived = sorted(i for i, t in self.all_tokens().items() if t.status is Status.CONFIRMED)
        else:
            arrived = [self.pick_token(data, {Status.CONFIRMED})]
        for token_id in arrived:
            self.simple_move(token_id, {Status.CONFIRMED}, Status.CHECKED_IN, "CHECKED_IN", self.service.check_in)

    @precondition(lambda self: self.all_tokens())
    @rule(data=st.data())
    def complete(self, data: st.DataObject) -> None:
        self.simple_move(self.pick_token(data, {Status.CALLED}), {Status.CALLED}, Status.COMPLETED, "COMPLETED",
                         self.service.complete)

    def simple_move(self, token_id: str, allowed_from: set[Status], to: Status, kind: str,
                    move: Callable[[str, Call], TokenView | Replay]) -> None:
        day, token = self.find(token_id)
        refusals: list[Refusal] = []
        if token is None:
            refusals.append((NotFound, None))
        elif token.status not in allowed_from:
            refusals.append((FailedPrecondition, None))
        try:
            result = move(token_id, Call(ANONYMOUS, kind))
        except EngineError as error:
            self.check_refusal(error, refusals)
            return
        assert not refusals and token is not None, f"expected a refusal {refusals}, got {result}"
        day.move(token, to, kind)
        self.check_view(day, result)
        note(f"{kind} a token")

    @rule(doctor=st.integers(0, 1))
    def call_next(self, doctor: int) -> None:
        """SPEC §7: the best CHECKED_IN token of the earliest slot that has one; the CALLED one completes."""
        day = self.days[self.doctor_id(doctor)]
        nxt = None
        for slot in sorted(day.slots.values(), key=lambda s: s.start):
            if waiting := day.in_slot(slot.slot_id, {Status.CHECKED_IN}):
                nxt = min(waiting, key=ModelToken.order)
                break
        try:
            result = self.service.call_next(day.doctor_id, DAY, Call(ANONYMOUS, "CallNext"))
        except EngineError as error:
            self.check_refusal(error, [(NotFound, "QUEUE_EMPTY")] if nxt is None else [])
            return
        assert nxt is not None, f"called {result} with nobody checked in"
        assert not isinstance(result, Replay)
        called = [t for t in day.tokens.values() if t.status is Status.CALLED]
        assert len(called) <= 1, called
        for token in called:
            day.move(token, Status.COMPLETED, "COMPLETED")
        day.move(nxt, Status.CALLED, "CALLED")
        assert result.token.token.token_id == nxt.token_id
        self.check_view(day, result.token)
        assert (result.completed.token.token_id if result.completed else None) == \
            (called[0].token_id if called else None)
        if result.completed:
            self.check_view(day, result.completed)
            note("COMPLETED a token")
        note("called the next patient")

    @rule(doctor=st.integers(0, 1), slot=st.integers(0, len(SLOT_TIMES) - 1), data=st.data())
    def change_capacity(self, doctor: int, slot: int, data: st.DataObject) -> None:
        day = self.days[self.doctor_id(doctor)]
        model_slot = sorted(day.slots.values(), key=lambda s: s.start)[slot % len(day.slots)]
        self.set_capacity(day, model_slot,
                          data.draw(st.sampled_from([c for c in range(1, 4) if c != model_slot.capacity])))

    @precondition(lambda self: self.slots_with_a_waitlist())
    @rule(data=st.data(), how=st.sampled_from(["cancel", "no-show", "raise capacity"]))
    def free_a_seat_before_a_waitlist(self, data: st.DataObject, how: str) -> None:
        """SPEC §6 aimed where it matters: a seat freed in a slot whose waitlist must take it at once."""
        day, slot = data.draw(st.sampled_from(self.slots_with_a_waitlist()))
        if how == "raise capacity":
            raise_by = data.draw(st.integers(1, len(day.waitlist(slot.slot_id)) + 1))
            self.set_capacity(day, slot, slot.capacity + raise_by)
            return
        holders = sorted(t.token_id for t in day.in_slot(slot.slot_id, WITH_TIME))
        if holders:
            token_id = data.draw(st.sampled_from(holders))
            if how == "cancel":
                self.release(token_id, Status.CANCELLED, "CANCELLED")
            else:
                self.release(token_id, Status.NO_SHOW, "NO_SHOW")

    def slots_with_a_waitlist(self) -> list[tuple[ModelDay, ModelSlot]]:
        return [(day, slot) for day in self.days.values() for slot in day.slots.values()
                if day.waitlist(slot.slot_id)]

    def set_capacity(self, day: ModelDay, slot: ModelSlot, capacity: int) -> None:
        """SPEC §6: a raise promotes at once; a cut below the seat holders is refused."""
        holders = slot.capacity - day.free_seats(slot.slot_id)
        try:
            result = self.service.update_slot_capacity(slot.slot_id, capacity, Call(ANONYMOUS, "UpdateSlotCapacity"))
        except EngineError as error:
            self.check_refusal(error, [(FailedPrecondition, "CAPACITY_BELOW_SEAT_HOLDERS")] if capacity < holders
                               else [])
            return
        assert capacity >= holders, f"capacity {capacity} accepted below {holders} seat holders"
        assert not isinstance(result, Replay)
        slot.capacity = capacity
        day.slot_events[slot.slot_id] += 1
        promoted = day.fill_seats(slot.slot_id)
        assert result.slot.max_capacity == capacity
        assert [v.token.token_id for v in result.promoted] == [t.token_id for t in promoted]
        for view in result.promoted:
            self.check_view(day, view)
        note("raised a capacity for a waitlist" if promoted else "changed a capacity")
        if len(promoted) > 1:
            note("promoted more than one at once")

    @rule()
    def auto_no_show_pass(self) -> None:
        """SPEC §6 with AUTO_NO_SHOW: a pass marks the confirmed tokens past their grace that the clinic was
        waiting for (never checked in, seated before their slot's end), in token number order, each freed seat going
        to the waitlist at once. Marking one never makes the rest overdue, nor does a promotion."""
        now, marked = self.clock.now(), 0
        for day in self.days.values():
            overdue = sorted((t for t in day.tokens.values() if t.status is Status.CONFIRMED and not t.arrived
                              and t.moved_at < day.slots[t.slot_id].end and day.no_show_due(t) <= now),
                             key=lambda t: t.number)
            for token in overdue:
                day.move(token, Status.NO_SHOW, "NO_SHOW")
                day.fill_seats(token.slot_id)
            marked += len(overdue)
        assert self.service.mark_overdue_no_shows() == marked
        note("AUTO_NO_SHOW marked a token" if marked else "AUTO_NO_SHOW marked nobody")

    @rule(minutes=st.sampled_from([5, 10, 20, 30]))
    def advance_clock(self, minutes: int) -> None:
        """Slots end and grace periods pass (SPEC §4 SLOT_CLOSED, §6 no-show)."""
        self.clock.advance(dt.timedelta(minutes=minutes))

    @rule()
    def restart_service(self) -> None:
        """A new process on the same database: nothing it answers may depend on the old one's memory."""
        self.service = OPDService(self.store, self.clock, self.rules)

    @rule()
    def switch_replica(self) -> None:
        """The calls go to the other of two processes on the same database from now on: the days it holds are
        as it last saw them, behind by what this one changed since."""
        self.service, self.replica = self.replica, self.service

    # ---- helpers ----

    def doctor_id(self, n: int) -> str:
        ids = list(self.days)
        return ids[n % len(ids)]

    def all_tokens(self) -> dict[str, ModelToken]:
        return {t.token_id: t for day in self.days.values() for t in day.tokens.values()}

    def pick_token(self, data: st.DataObject, legal: set[Status]) -> str:
        """Mostly a token in a state the move is legal from; else any token, or now and then one that does not
        exist."""
        tokens = self.all_tokens()
        legal_ids = sorted(i for i, t in tokens.items() if t.status in legal)
        kind = data.draw(st.sampled_from(["legal", "legal", "legal", "any", "unknown"]))
        if kind == "unknown":
            return f"{self.doctor_id(0)}-{DATE:%Y%m%d}-T999"
        return data.draw(st.sampled_from(legal_ids if kind == "legal" and legal_ids else sorted(tokens)))

    def find(self, token_id: str) -> tuple[ModelDay, ModelToken | None]:
        day = self.days[token_id.split("-")[0]]
        return day, day.tokens.get(token_id)

    def check_refusal(self, error: EngineError, allowed: list[Refusal]) -> None:
        match = next(((kind, reason) for kind, reason in allowed
                      if isinstance(error, kind) and reason in (None, error.reason)), None)
        assert match is not None, f"refused with {type(error).__name__} {error.reason} ({error}); allowed: {allowed}"
        note(f"refused: {match[0].__name__} {match[1] or ''}".rstrip())

    def check_view(self, day: ModelDay, view: TokenView) -> None:
        token = day.tokens[view.token.token_id]
        eta, queue_position, waitlist_position = day.expected_view(token)
        got = view.token
        assert (got.token_number, got.slot_id, got.status, got.source, got.priority) == \
            (token.number, token.slot_id, token.status, token.source, PRIORITY_OF[token.source]), got
        assert (view.estimated_time, view.queue_position, view.waitlist_position) == \
            (eta, queue_position, waitlist_position), f"{got.token_id} {got.status.value}"

    # ---- SPEC §3, read back after every step ----

    @invariant()
    def storage_holds_section_3(self) -> None:
        with self.store.engine.connect() as conn:
            token_rows, slot_rows, event_rows, day_rows = (conn.execute(query).all() for query in STORED_DAY)
        counters = {r.doctor_id: r for r in day_rows}
        assert set(counters) == set(self.days)
        for doctor_id, day in self.days.items():
            tokens = [r for r in token_rows if r.doctor_id == doctor_id]
            # The stored tokens are the model's, with numbers, slots, sources and queue times never changed.
            assert {r.token_id: (r.token_number, r.slot_id, Status(r.status), Source(r.source), instant(r.created_at))
                    for r in tokens} == \
                {t.token_id: (t.number, t.slot_id, t.status, t.source, t.queue_time) for t in day.tokens.values()}
            # §3.4: numbers 1..n without gaps.
            assert sorted(r.token_number for r in tokens) == list(range(1, len(tokens) + 1))
            assert counters[doctor_id].last_token_number == len(tokens)
            for slot in (r for r in slot_rows if r.doctor_id == doctor_id):
                assert slot.max_capacity == day.slots[slot.slot_id].capacity
                holders = sum(1 for r in tokens if r.slot_id == slot.slot_id and Status(r.status) in SEATED)
                waiting = sum(1 for r in tokens if r.slot_id == slot.slot_id and r.status == "WAITLISTED")
                assert holders <= slot.max_capacity, f"§3.1: {slot.slot_id} has {holders} seat holders"
                assert holders == slot.max_capacity or waiting == 0, f"§3.2: {slot.slot_id} free seat, waitlist"
                if waiting:
                    note(f"a waitlist of {waiting}")
            # §3.5: one active token per person (as SPEC §1 says who is the same person).
            active = [day.tokens[r.token_id] for r in tokens if Status(r.status) in NOT_FINAL]
            twice = [(a.token_id, b.token_id) for a, b in itertools.combinations(active, 2)
                     if same_person(a.patient, b.patient)]
            assert not twice, f"§3.5: {twice}"
            self.check_events(day, [r for r in event_rows if r.doctor_id == doctor_id],
                              counters[doctor_id].last_sequence)

    def check_events(self, day: ModelDay, rows: list, last_sequence: int) -> None:
        """§3.6: one event per token change, sequences 1..n without gaps, the day row's last_sequence the max."""
        rows = sorted(rows, key=lambda r: r.sequence)
        assert [r.sequence for r in rows] == list(range(1, len(rows) + 1))
        assert last_sequence == len(rows)
        expected_count = len(day.token_events) + sum(day.slot_events.values())
        assert len(rows) == expected_count, f"{len(rows)} events for {expected_count} changes"
        per_token: dict[str, list[tuple[str, Status]]] = collections.defaultdict(list)
        for token_id, kind, status in day.token_events:
            per_token[token_id].append((kind, status))
        stored: dict[str, list[tuple[str, Status]]] = collections.defaultdict(list)
        for r in rows:
            if r.kind != "SLOT_CHANGED":
                stored[r.token_id].append((r.kind, Status(r.status)))
        assert stored == per_token
        assert collections.Counter(r.slot_id for r in rows if r.kind == "SLOT_CHANGED") == day.slot_events
        assert sorted((r.token_id, r.caused_by_token_id) for r in rows if r.kind == "BUMPED") == sorted(day.bumps)

    @invariant()
    def views_follow_sections_2_and_8(self) -> None:
        """§3.3 and §8, and the slots, through the service (whose days may have been brought up to date with
        another replica's changes); every third time through a fresh service with nothing cached."""
        self.views_checked += 1
        fresh = self.views_checked % 3 == 0
        service = OPDService(self.store, self.clock, self.rules) if fresh else self.service
        for doctor_id, day in self.days.items():
            views = service.list_tokens(doctor_id, DAY, 1000, "").items
            assert [v.token.token_id for v in views] == \
                [t.token_id for t in sorted(day.tokens.values(), key=lambda t: t.number)]
            for view in views:
                self.check_view(day, view)
            for slot_id in day.slots:
                status = service.get_slot_status(slot_id)
                assert (status.slot.max_capacity, status.seat_holders, status.free_seats) == \
                    (day.slots[slot_id].capacity, day.slots[slot_id].capacity - day.free_seats(slot_id),
                     day.free_seats(slot_id))
                assert [v.token.token_id for v in status.waitlist] == [t.token_id for t in day.waitlist(slot_id)]
                assert [v.waitlist_position for v in status.waitlist] == list(range(1, len(status.waitlist) + 1))


# The cases every run meets, or it did not explore what it is for. Rarer ones (a full waitlist refusing, a
# replayed request_id, two promotions at once) show with `pytest --hypothesis-show-statistics`.
MUST_MEET = {
    "allocated WAITLISTED", "emergency bumped a seat holder", "promoted from a waitlist",
    "raised a capacity for a waitlist", "moved to a later slot", "NO_SHOW a token", "called the next patient",
    "refused: AlreadyExists", "refused: FailedPrecondition SLOT_CLOSED",
    "refused: FailedPrecondition GRACE_PERIOD_NOT_ELAPSED", "caught up with another replica's changes",
    "AUTO_NO_SHOW marked a token",
}


def test_engine_keeps_the_spec_invariants() -> None:
    SEEN.clear()
    refreshed = DoctorDay.refreshed

    def noted(day: DoctorDay, changes: DayChanges) -> DoctorDay:
        note("caught up with another replica's changes")
        return refreshed(day, changes)

    DoctorDay.refreshed = noted  # type: ignore[method-assign]
    try:
        run_state_machine_as_test(EngineMachine, settings=settings(
            max_examples=80, stateful_step_count=100, deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
    finally:
        DoctorDay.refreshed = refreshed  # type: ignore[method-assign]
    assert not MUST_MEET - SEEN.keys(), f"never met: {sorted(MUST_MEET - SEEN.keys())}; met: {dict(SEEN)}"


# A Hypothesis test for pytest's plugin, so that --hypothesis-show-statistics reports the events above.
test_engine_keeps_the_spec_invariants.is_hypothesis_test = True  # type: ignore[attr-defined]
