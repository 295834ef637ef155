"""Plays a `DayPlan` against the server over gRPC, a minute of the test clock at a time.

In each minute: capacity changes, new requests (and their retries, second asks and reused request ids),
cancellations, check-ins of patients who are there, the desk's no-show marks, and each doctor's CallNext and
CompleteToken. Every answer goes into the ledger, the server's choices (bump victim, promoted heads, the called
patient) are compared with what SPEC §5–7 say, and SPEC §3 is checked through the API after each step (or, with
`check_every_minutes`, after each batch of minutes).

Each call goes through the client of the role that SPEC §13 gives it, presenting that role's key: a call refused
for its key or role is a violation like any other unexpected refusal, and the admin's refused clock or clinic
stops the day (`CannotRun`), as do a server that stops answering and a read (the checks, GetStats) refused for its
key or role.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, NoReturn

import grpc
from google.protobuf import timestamp_pb2

from clients.library import QUICK_ATTEMPTS, OPDClient, OPDError
from clients.report.figures import DayReport
from opd_grpc._gen.opd.v1 import opd_pb2 as pb
from opd_grpc._gen.opd.v1 import test_clock_pb2, test_clock_pb2_grpc
from simulation import checks
from simulation.boards import BoardsOutcome
from simulation.ledger import ACTIVE, IN_QUEUE, SEAT_HOLDING, Ledger, TokenRecord, when
from simulation.scenario import DATE, NO_SHOW_GRACE, OPENS_AT, DayPlan, Fate, PatientPlan

MINUTE = dt.timedelta(minutes=1)
CALL_TIMEOUT_SECONDS = 30.0
COMPLETES_BY_CALLING_NEXT = 0.3  # how often a doctor lets the next CallNext end the consultation
# What the day counts, per doctor, in the order the summary shows them.
EVENTS = {
    "requests": "requests answered",
    "confirmed": "confirmed at once",
    "waitlisted": "waitlisted",
    "moved_to_later_slot": "moved to a later slot (flexible)",
    "bumps": "emergency bumps",
    "promoted_on_cancel": "promotions on cancel",
    "promoted_on_no_show": "promotions on no-show",
    "promoted_on_capacity_raise": "promotions on capacity raise",
    "cancels": "cancellations",
    "no_shows": "no-shows marked",
    "no_show_too_early": "no-show refused: grace not elapsed",
    "completed_by_call_next": "completed by the next CallNext",
    "retries_replayed": "retries answered with the first answer",
    "asked_twice_refused": "second asks refused (already holds a token)",
    "request_id_reuse_refused": "request_id reuse refused",
    "capacity_cut_refused": "capacity cut below seat holders refused",
    "queue_empty": "CallNext on an empty queue",
    "turned_away": "turned away (waitlist full or slot closed)",
}
# The roles that change the day (SPEC §13), each with a key of its own; `display` reads, and so may any role.
CHANGING_ROLES = ("admin", "reception", "triage", "doctor")
ACCESS_REFUSALS = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
# The failures that end the day at once rather than count as a violation: the server is gone or cannot be reached
# (UNAVAILABLE, once the client library's retries are spent) or did not answer within CALL_TIMEOUT_SECONDS
# (DEADLINE_EXCEEDED). Every later call would fail alike, a violation per remaining step. The refusals SPEC defines
# (INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION, RESOURCE_EXHAUSTED, a key or role refused for a
# call) are the server's answer to one call: an unexpected one is a violation, and the day goes on.
SERVER_STOPPED_ANSWERING = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# A read refused for its key or role ends the day too: every later check would be refused, so none could be made.
READ_FAILURES_THAT_END_THE_DAY = SERVER_STOPPED_ANSWERING | frozenset(ACCESS_REFUSALS)


class CannotRun(Exception):
    """The day cannot be played: no suitable server, it refused to set up the clinic or move its clock, or it stopped
    answering (or refused the reads' key) before the day was over."""


def role_clients(channel: grpc.Channel, keys: Mapping[str, str], timeout: float) -> dict[str, OPDClient]:
    """A client per role on the one `channel`, each presenting its role's key (none without keys: a development
    server). Without a display key, `display` reads with the admin key. A server that is gone ends the day at once
    (QUICK_ATTEMPTS), while a slow answer on a busy machine still gets `timeout`."""
    clients = {role: OPDClient(channel=channel, timeout=timeout, attempts=QUICK_ATTEMPTS,
                               api_key=keys.get(role)) for role in CHANGING_ROLES}
    clients["display"] = OPDClient(channel=channel, timeout=timeout, attempts=QUICK_ATTEMPTS,
                                   api_key=keys.get("display", keys.get("admin")))
    return clients


def refusal(what: str, role: str, error: OPDError) -> str:
    """A refused call as the summary says it; one refused for its key or role (SPEC §13) names the role."""
    if error.code in ACCESS_REFUSALS:
        return f"{what}: the {role} key was refused: {error}"
    return f"{what}: refused {error.code.name} {error.reason} ({error.message})"


@dataclass(frozen=True)
class Allocation:
    """One AllocateToken (or AllocateEmergency) request, kept so that it can be sent again as it was."""

    emergency: bool  # through AllocateEmergency
    patient: pb.Patient
    doctor_id: str
    date: str
    source: int
    preferred_slot_time: str
    flexible: bool
    request_id: str

    @property
    def role(self) -> str:
        """Who books it (SPEC §13): triage an emergency, through either call; reception every other source."""
        return "triage" if self.source == pb.SOURCE_EMERGENCY else "reception"

    @property
    def about(self) -> str:
        """The call and whom it is for, for a violation's text."""
        return f"{'AllocateEmergency' if self.emergency else 'AllocateToken'} {self.doctor_id} for {self.patient.name}"

    def send(self, client: OPDClient) -> Any:
        if self.emergency:
            return client.allocate_emergency(patient=self.patient, doctor_id=self.doctor_id, date=self.date,
                                             preferred_slot_time=self.preferred_slot_time, flexible=self.flexible,
                                             request_id=self.request_id)
        return client.allocate_token(patient=self.patient, doctor_id=self.doctor_id, date=self.date,
                                     source=self.source, preferred_slot_time=self.preferred_slot_time,
                                     flexible=self.flexible, request_id=self.request_id)


@dataclass
class Visit:
    """One patient's request and what became of it."""

    plan: PatientPlan
    doctor_id: str
    request: Allocation
    token_id: str = ""
    first_answer: Any = None
    arrives_at: dt.datetime | None = None  # when the patient is at the clinic; None: never comes
    no_show_tried_early: bool = False


@dataclass
class DoctorAtWork:
    doctor_id: str
    starts_at: dt.datetime
    consultation_minutes: int
    current: str = ""  # the CALLED token
    busy_until: dt.datetime = OPENS_AT
    completes_by_calling_next: bool = False
    told_queue_empty: bool = False


@dataclass
class Outcome:
    plan: DayPlan
    doctors: list[str]
    tally: dict[str, Counter[str]]
    ledger: Ledger
    stats: dict[str, pb.DoctorDayStats]
    violations: dict[str, str]  # what broke -> when it was first seen
    steps: int = 0
    checks: int = 0
    calls: int = 0
    ended_at: dt.datetime = OPENS_AT
    seconds: float = 0.0
    boards: BoardsOutcome | None = None  # when boards ran beside the day
    report: DayReport | None = None  # the end-of-day report's figures, once written to report_path
    report_path: Path | None = None
    report_error: str = ""  # why the report could not be written


@dataclass
class Day:
    plan: DayPlan
    clients: dict[str, OPDClient]  # by role, see `role_clients`
    clock: test_clock_pb2_grpc.TestClockServiceStub
    check_every_minutes: int = 0  # 0: after every step
    on_open: Callable[[list[str]], None] = lambda doctor_ids: None  # the doctors exist, the day is about to start
    on_minute: Callable[[dt.datetime], None] = lambda now: None
    now: dt.datetime = OPENS_AT
    ledger: Ledger = field(default_factory=Ledger)
    doctors: list[DoctorAtWork] = field(default_factory=list)
    visits: list[Visit] = field(default_factory=list)
    later: dict[dt.datetime, collections.deque[Callable[[], None]]] = field(default_factory=dict)
    tally: dict[str, Counter[str]] = field(default_factory=dict)
    violations: dict[str, str] = field(default_factory=dict)
    steps: int = 0
    checks: int = 0
    calls: int = 0
    rng: random.Random = field(init=False)  # consultation lengths and how doctors end them
    date: str = DATE.isoformat()

    def __post_init__(self) -> None:
        self.rng = random.Random(f"{self.plan.seed}/play")

    # ---- the day ----------------------------------------------------------------------------------

    def run(self) -> Outcome:
        started = time.monotonic()
        self._set_clock(OPENS_AT)
        self._open_clinic()
        self.on_open([d.doctor_id for d in self.doctors])
        requests = collections.deque(self.plan.patients)
        minutes = 0
        while True:
            self._set_clock(OPENS_AT + minutes * MINUTE)
            self._play_minute(requests)
            minutes += 1
            if self.check_every_minutes and minutes % self.check_every_minutes == 0:
                self._check()
            self.on_minute(self.now)
            if self.now >= self.plan.stops_at or (not requests and self._settled()):
                break
        self._check()
        stats = {}
        for doctor in self.doctors:
            answer = self.read("display", f"GetStats {doctor.doctor_id}",
                                partial(OPDClient.get_stats, date=self.date, doctor_id=doctor.doctor_id))
            if isinstance(answer, OPDError):
                continue
            if len(answer.stats) != 1:
                self._violation(f"{doctor.doctor_id}: GetStats answered {len(answer.stats)} entries, not 1")
                continue
            stats[doctor.doctor_id] = answer.stats[0]
            for problem in checks.stats_violations(answer.stats[0], self.ledger,
                                                   self.tally[doctor.doctor_id]["bumps"]):
                self._violation(problem)
        return Outcome(self.plan, [d.doctor_id for d in self.doctors], self.tally, self.ledger, stats,
                       self.violations, self.steps, self.checks, self.calls, self.now, time.monotonic() - started)

    def _play_minute(self, requests: collections.deque[PatientPlan]) -> None:
        for change in self.plan.capacity_changes:
            if change.at == self.now:
                self._change_capacity(change.doctor, change.slot, change.extra)
        while requests and requests[0].request_at <= self.now:
            self._ask(requests.popleft())
        due = self.later.pop(self.now, collections.deque())
        while due:
            due.popleft()()
        for visit in self.visits:
            if visit.arrives_at is not None and visit.arrives_at <= self.now and \
                    self._status(visit) == pb.STATUS_CONFIRMED:
                self._check_in(visit)
        for visit in self.visits:
            if visit.plan.fate is Fate.NO_SHOW and self._status(visit) == pb.STATUS_CONFIRMED:
                self._desk_looks_for(visit)
        for doctor in self.doctors:
            self._doctor_minute(doctor)

    def _settled(self) -> bool:
        """Past the last slot, nobody with a seat still to use, no doctor busy, nothing scheduled."""
        return self.now >= self.plan.last_slot_end and not self.later \
            and all(not d.current for d in self.doctors) \
            and not any(t.status in IN_QUEUE for t in self.ledger.tokens.values())

    def _open_clinic(self) -> None:
        for plan in self.plan.doctors:
            what = f"CreateDoctor {plan.name}"
            created = self._step("admin", what, partial(OPDClient.create_doctor, name=plan.name,
                                                        specialization=plan.specialization,
                                                        request_id=self._request_id()))
            if isinstance(created, OPDError):
                self._stop(what, "admin", created)
            doctor = created.doctor
            self.tally[doctor.doctor_id] = Counter()
            specs = [pb.SlotSpec(date=self.date, start_time=s.start_time, end_time=s.end_time,
                                 max_capacity=s.capacity, consultation_minutes=s.consultation_minutes)
                     for s in plan.slots]
            what = f"CreateSlots {doctor.doctor_id}"
            answer = self._step("admin", what, partial(OPDClient.create_slots, doctor_id=doctor.doctor_id,
                                                       slots=specs, request_id=self._request_id()),
                                on_answer=lambda a: [self.ledger.add_slot(s) for s in a.slots])
            if isinstance(answer, OPDError):
                self._stop(what, "admin", answer)
            self.doctors.append(DoctorAtWork(doctor.doctor_id, plan.slots[0].starts_at,
                                             plan.slots[0].consultation_minutes))

    # ---- requests ---------------------------------------------------------------------------------

    def _ask(self, plan: PatientPlan) -> None:
        doctor_id = self.doctors[plan.doctor].doctor_id
        visit = Visit(plan, doctor_id, self._allocation_request(plan, doctor_id, plan.preferred_slot_time,
                                                                plan.flexible, self._request_id()))
        self.visits.append(visit)
        closed = self._all_closed(doctor_id, plan.preferred_slot_time)
        answer = self._allocate(visit.request, lambda a: self._allocated(visit, a),
                                expect="SLOT_CLOSED" if closed else "", accept={"WAITLIST_FULL"})
        if isinstance(answer, OPDError):
            self.tally[doctor_id]["turned_away"] += 1
            return
        if plan.retry_after is not None:
            self._at(self.now + plan.retry_after, lambda: self._retry(visit))
        if plan.asks_twice:
            self._at(self.now + MINUTE, lambda: self._ask_twice(visit))
        if plan.reuses_request_id:
            self._at(self.now + 2 * MINUTE, lambda: self._reuse_request_id(visit))
        if plan.fate is Fate.CANCELS:
            self._at(max(plan.cancel_at, self.now + MINUTE), lambda: self._cancel(visit))

    def _allocation_request(self, plan: PatientPlan, doctor_id: str, preferred: str, flexible: bool,
                            request_id: str) -> Allocation:
        emergency = plan.source == pb.SOURCE_EMERGENCY and plan.through_allocate_emergency
        return Allocation(emergency, plan.patient(), doctor_id, self.date, plan.source, preferred, flexible,
                          request_id)

    def _allocate(self, request: Allocation, on_answer: Callable[[Any], None] | None = None, expect: str = "",
                  accept: set[str] | frozenset[str] = frozenset()) -> Any:
        return self._step(request.role, request.about, request.send, on_answer, expect, accept)

    def _all_closed(self, doctor_id: str, preferred: str) -> bool:
        """SPEC §4: the asked slot, or without one every slot of the day, has ended."""
        slots = [s for s in self.ledger.slots_of(doctor_id) if not preferred or s.start_time == preferred]
        return all(dt.datetime.combine(DATE, dt.time.fromisoformat(s.end_time), dt.timezone.utc) <= self.now
                   for s in slots)

    def _allocated(self, visit: Visit, answer: Any) -> None:
        tally = self.tally[visit.doctor_id]
        tally["requests"] += 1
        token = answer.token
        if answer.HasField("bumped_token"):
            victim = self.ledger.bump_victim(token.slot_id)
            if victim is None or victim.token_id != answer.bumped_token.token_id:
                self._violation(f"{token.token_id}: bumped {answer.bumped_token.token_id}, §5 names "
                                f"{victim.token_id if victim else 'nobody'}")
            tally["bumps"] += 1
            self._absorb(answer.bumped_token)
        self._absorb(token)
        visit.token_id, visit.first_answer = token.token_id, answer
        tally["confirmed" if token.status == pb.STATUS_CONFIRMED else "waitlisted"] += 1
        tally["moved_to_later_slot"] += answer.moved_to_later_slot
        plan = visit.plan
        at_the_desk = plan.source in (pb.SOURCE_WALK_IN, pb.SOURCE_EMERGENCY)
        if at_the_desk and plan.fate is not Fate.NO_SHOW:
            visit.arrives_at = self.now
        elif plan.fate is Fate.ATTENDS:
            expected = when(token.estimated_time) if token.HasField("estimated_time") else self._slot_start(token)
            visit.arrives_at = max(self.now, expected + plan.arrival_offset)

    def _retry(self, visit: Visit) -> None:
        """The same request again, as a client that lost the answer: the first answer, nothing changed."""
        answer = self._allocate(visit.request)
        if not isinstance(answer, OPDError):
            if answer == visit.first_answer:
                self.tally[visit.doctor_id]["retries_replayed"] += 1
            else:
                self._violation(f"{visit.token_id}: a retry with the same request_id answered "
                                f"{_brief(answer.token)}, the first answer was {_brief(visit.first_answer.token)}")

    def _ask_twice(self, visit: Visit) -> None:
        """The patient asks again under a new request_id while holding an active token: ALREADY_EXISTS."""
        if self._status(visit) not in ACTIVE:
            return
        request = self._allocation_request(visit.plan, visit.doctor_id, "", True, self._request_id())
        if isinstance(self._allocate(request, expect="PATIENT_ALREADY_HAS_TOKEN"), OPDError):
            self.tally[visit.doctor_id]["asked_twice_refused"] += 1

    def _reuse_request_id(self, visit: Visit) -> None:
        """A different request under a used request_id: REQUEST_ID_REUSED, nothing changed."""
        request = dataclasses.replace(visit.request, flexible=not visit.request.flexible)
        if isinstance(self._allocate(request, expect="REQUEST_ID_REUSED"), OPDError):
            self.tally[visit.doctor_id]["request_id_reuse_refused"] += 1

    # ---- seats freed ------------------------------------------------------------------------------

    def _cancel(self, visit: Visit) -> None:
        record = self.ledger.tokens[visit.token_id]
        if record.status not in ACTIVE or record.status == pb.STATUS_CALLED:
            return
        reason = "left the queue" if record.status == pb.STATUS_CHECKED_IN else "patient cancelled"
        cancel = partial(OPDClient.cancel_token, token_id=visit.token_id, reason=reason,
                         request_id=self._request_id())
        answer = self._release("reception", f"CancelToken {visit.token_id}", cancel, record, "promoted_on_cancel")
        if visit.plan.cancel_sent_twice and not isinstance(answer, OPDError):
            again = self._step("reception", f"CancelToken {visit.token_id}", cancel)
            if again == answer:
                self.tally[visit.doctor_id]["retries_replayed"] += 1
            else:
                self._violation(f"{visit.token_id}: a retried cancel answered differently from the first")
        if not isinstance(answer, OPDError):
            self.tally[visit.doctor_id]["cancels"] += 1

    def _desk_looks_for(self, visit: Visit) -> None:
        """SPEC §6: a confirmed patient who has not come is marked no-show once the grace period is over;
        the desk tries once too early, which must be refused. The estimated time is the ledger's (SPEC §8),
        which the checks compare with the server's."""
        due = self.ledger.no_show_due(visit.token_id, NO_SHOW_GRACE)
        if self.now < due - NO_SHOW_GRACE or (self.now < due and visit.no_show_tried_early):
            return
        early = self.now < due
        visit.no_show_tried_early |= early
        answer = self._release("doctor", f"MarkNoShow {visit.token_id}",
                               partial(OPDClient.mark_no_show, token_id=visit.token_id, request_id=self._request_id()),
                               self.ledger.tokens[visit.token_id], "promoted_on_no_show",
                               expect="GRACE_PERIOD_NOT_ELAPSED" if early else "")
        if isinstance(answer, OPDError):
            self.tally[visit.doctor_id]["no_show_too_early"] += early
        else:
            self.tally[visit.doctor_id]["no_shows"] += 1

    def _release(self, role: str, what: str, call: Callable[[OPDClient], Any], record: TokenRecord, counter: str,
                 expect: str = "") -> Any:
        """A cancel or no-show: a freed seat must go to the slot's waitlist head (SPEC §6)."""
        heads = self.ledger.waitlist(record.slot_id)[:1] if record.status in SEAT_HOLDING else []

        def released(answer: Any) -> None:
            if [t.token_id for t in answer.promoted] != [t.token_id for t in heads]:
                self._violation(f"{record.token_id}: freeing its seat promoted "
                                f"{[t.token_id for t in answer.promoted]}, §6 says {[t.token_id for t in heads]}")
            self._absorb(answer.token)
            for promoted in answer.promoted:
                self._absorb(promoted)
            self.tally[record.doctor_id][counter] += len(answer.promoted)

        return self._step(role, what, call, released, expect=expect)

    def _change_capacity(self, doctor_index: int, slot_index: int, extra: int) -> None:
        """Raises a slot's capacity (the waitlist heads take the new seats), then tries to cut it below its
        seat holders, which must be refused."""
        doctor_id = self.doctors[doctor_index].doctor_id
        slot = self.ledger.slots_of(doctor_id)[slot_index]
        free = slot.max_capacity - self.ledger.seat_holders(slot.slot_id)
        heads = self.ledger.waitlist(slot.slot_id)[: free + extra]

        def raised(answer: pb.UpdateSlotCapacityResponse) -> None:
            if [t.token_id for t in answer.promoted] != [t.token_id for t in heads]:
                self._violation(f"{slot.slot_id}: a capacity raise promoted {[t.token_id for t in answer.promoted]}"
                                f", §6 says {[t.token_id for t in heads]}")
            self.ledger.add_slot(answer.slot)
            for promoted in answer.promoted:
                self._absorb(promoted)
            self.tally[doctor_id]["promoted_on_capacity_raise"] += len(answer.promoted)

        self._step("admin", f"UpdateSlotCapacity {slot.slot_id}", partial(
            OPDClient.update_slot_capacity, slot_id=slot.slot_id, max_capacity=slot.max_capacity + extra,
            request_id=self._request_id()), raised)
        holders = self.ledger.seat_holders(slot.slot_id)
        if holders > 1:
            answer = self._step("admin", f"UpdateSlotCapacity {slot.slot_id}", partial(
                OPDClient.update_slot_capacity, slot_id=slot.slot_id, max_capacity=holders - 1,
                request_id=self._request_id()),
                lambda a: self.ledger.add_slot(a.slot), expect="CAPACITY_BELOW_SEAT_HOLDERS")
            self.tally[doctor_id]["capacity_cut_refused"] += isinstance(answer, OPDError)

    # ---- the clinic -------------------------------------------------------------------------------

    def _check_in(self, visit: Visit) -> None:
        self._step("reception", f"CheckInToken {visit.token_id}",
                   partial(OPDClient.check_in_token, token_id=visit.token_id, request_id=self._request_id()),
                   lambda a: self._absorb(a.token))
        self.doctors[visit.plan.doctor].told_queue_empty = False

    def _doctor_minute(self, doctor: DoctorAtWork) -> None:
        """A doctor ends a consultation that has run its time, then calls the next patient (SPEC §7)."""
        if self.now < doctor.starts_at or (doctor.current and self.now < doctor.busy_until):
            return
        if doctor.current and not doctor.completes_by_calling_next:
            self._complete(doctor)
        expected = self.ledger.next_to_call(doctor.doctor_id)
        if expected is None:
            if doctor.current:
                self._complete(doctor)
            if not doctor.told_queue_empty:
                doctor.told_queue_empty = True
                self._step("doctor", f"CallNext {doctor.doctor_id}", self._call_next(doctor),
                           lambda a: self._absorb(a.token), expect="QUEUE_EMPTY")
                self.tally[doctor.doctor_id]["queue_empty"] += 1
            return

        def called(answer: pb.CallNextResponse) -> None:
            if answer.token.token_id != expected.token_id:
                self._violation(f"{doctor.doctor_id}: CallNext called {answer.token.token_id}, §7 says "
                                f"{expected.token_id}")
            completed = answer.completed_token.token_id if answer.HasField("completed_token") else ""
            if completed != doctor.current:
                self._violation(f"{doctor.doctor_id}: CallNext completed {completed or 'nobody'}, the doctor was "
                                f"with {doctor.current or 'nobody'}")
            if completed:
                self._absorb(answer.completed_token)
                self.tally[doctor.doctor_id]["completed_by_call_next"] += 1
            self._absorb(answer.token)
            doctor.current = answer.token.token_id
            spread = max(doctor.consultation_minutes // 3, 1)
            length = max(doctor.consultation_minutes + self.rng.randint(-spread, spread), 1)
            doctor.busy_until = self.now + length * MINUTE
            doctor.completes_by_calling_next = self.rng.random() < COMPLETES_BY_CALLING_NEXT

        answer = self._step("doctor", f"CallNext {doctor.doctor_id}", self._call_next(doctor), called)
        if isinstance(answer, OPDError):
            doctor.current = ""  # the server disagrees with the ledger, which the checks report

    def _call_next(self, doctor: DoctorAtWork) -> Callable[[OPDClient], pb.CallNextResponse]:
        return partial(OPDClient.call_next, doctor_id=doctor.doctor_id, date=self.date, request_id=self._request_id())

    def _complete(self, doctor: DoctorAtWork) -> None:
        self._step("doctor", f"CompleteToken {doctor.current}",
                   partial(OPDClient.complete_token, token_id=doctor.current, request_id=self._request_id()),
                   lambda a: self._absorb(a.token))
        doctor.current = ""

    # ---- calls, checks and bookkeeping ----------------------------------------------------------------

    def _step(self, role: str, what: str, call: Callable[[OPDClient], Any],
              on_answer: Callable[[Any], None] | None = None, expect: str = "",
              accept: set[str] | frozenset[str] = frozenset()) -> Any:
        """One call that may change state, made with `role`'s client (`what` names the call and what it is
        about): its answer goes to `on_answer`, then (per step) SPEC §3 is checked. A refusal is answered as the
        `OPDError`; `expect` names the refusal reason SPEC requires, `accept` refusals that may happen."""
        answer = self._call(role, what, call, SERVER_STOPPED_ANSWERING)
        if isinstance(answer, OPDError):
            if answer.reason != expect and answer.reason not in accept:
                self._violation(refusal(what, role, answer) + (f", expected {expect}" if expect else ""))
        else:
            if expect:
                self._violation(f"{what}: answered OK, SPEC says {expect}")
            if on_answer is not None:
                on_answer(answer)
        self.steps += 1
        if not self.check_every_minutes:
            self._check()
        return answer

    def read(self, role: str, what: str, call: Callable[[OPDClient], Any]) -> Any:
        """A call that changes nothing of the day (the checks, GetStats, the boards' last reads), made with `role`'s
        client; a refusal is a violation, answered as the `OPDError`."""
        answer = self._call(role, what, call, READ_FAILURES_THAT_END_THE_DAY)
        if isinstance(answer, OPDError):
            self._violation(refusal(what, role, answer))
        return answer

    def _call(self, role: str, what: str, call: Callable[[OPDClient], Any],
              ends_the_day: Collection[grpc.StatusCode]) -> Any:
        """`call` with `role`'s client: its answer, or the `OPDError` it was refused with; a failure whose code is
        one of `ends_the_day` ends the day there."""
        self.calls += 1
        try:
            return call(self.clients[role])
        except OPDError as error:
            if error.code in ends_the_day:
                self._stop(what, role, error)
            return error

    def _stop(self, what: str, role: str, error: OPDError) -> NoReturn:
        """Ends the day at `what`, made with `role`'s key: nothing after it could be played or checked."""
        if error.code in SERVER_STOPPED_ANSWERING:
            why = f"the server stopped answering at {self.now:%H:%M} ({what}: {error})"
        else:
            why = f"at {self.now:%H:%M}, {refusal(what, role, error)}"
        raise CannotRun(f"{why}; the day was not finished") from None

    def _check(self) -> None:
        """SPEC §3 through the API, for every doctor of the day, against the ledger of answers."""
        for doctor in self.doctors:
            what = f"the §3 check of {doctor.doctor_id} (ListSlots, GetSlotStatus, ListTokens)"
            day = self.read("display", what, partial(checks.fetch_day, doctor_id=doctor.doctor_id, date=self.date))
            if isinstance(day, OPDError):
                continue
            # ListSlots is counted by read; then a GetSlotStatus per slot and the pages of ListTokens
            self.calls += len(day.slots) + max(1, -(-len(day.tokens) // checks.PAGE_SIZE))
            for problem in checks.invariant_violations(day) + checks.answer_violations(day, self.ledger):
                self._violation(problem)
        self.checks += 1

    def _violation(self, problem: str) -> None:
        self.violations.setdefault(problem, f"{self.now:%H:%M}, step {self.steps}")

    def _absorb(self, token: pb.Token) -> None:
        for problem in self.ledger.absorb(token):
            self._violation(problem)

    def _status(self, visit: Visit) -> int:
        return self.ledger.tokens[visit.token_id].status if visit.token_id else pb.STATUS_UNSPECIFIED

    def _slot_start(self, token: Any) -> dt.datetime:
        slot = self.ledger.slots[token.slot_id]
        return dt.datetime.combine(DATE, dt.time.fromisoformat(slot.start_time), dt.timezone.utc)

    def _at(self, when_: dt.datetime, action: Callable[[], None]) -> None:
        self.later.setdefault(when_, collections.deque()).append(action)

    def _request_id(self) -> str:
        """Fresh in every run (never from the seed): a second run on the same server must not replay the first."""
        return str(uuid.uuid4())

    def _set_clock(self, now: dt.datetime) -> None:
        """Moves the test clock with the admin's key; the day cannot go on if it does not move."""
        stamp = timestamp_pb2.Timestamp()
        stamp.FromDatetime(now)

        def set_time(admin: OPDClient) -> None:
            try:
                self.clock.SetTime(test_clock_pb2.SetTimeRequest(time=stamp), timeout=CALL_TIMEOUT_SECONDS,
                                   metadata=admin.metadata)
            except grpc.RpcError as error:  # the test clock's stub is not the client library's
                raise OPDError.from_rpc_error(error) from None

        what = f"SetTime {now:%H:%M}"
        answer = self._call("admin", what, set_time, SERVER_STOPPED_ANSWERING)
        if isinstance(answer, OPDError):
            self._stop(what, "admin", answer)
        self.now = now


def _brief(token: pb.Token) -> str:
    return f"{token.token_id} {pb.Status.Name(token.status)}"
