"""`python -m simulation.replicas [--clients 32] [--operations 10000] [--replicas 3] [--faults none|kill|backend]
[--seed N] [--database URL]`: several server processes on one PostgreSQL, many clients on a few hot slots, faults
if asked, then a check of everything against a sequential model (`simulation.replica_checks`).

The run gets a schema of its own in the database (dropped at the end). Each replica connects with an
`application_name` of the run's (`opd-stress-<schema>-r<i>`), so that `--faults backend` terminates only its
backends. The clinic: two doctors on 2030-01-07, each with slot A 09:00-11:00 and slot B 11:00-12:00 of capacity 6
(one-minute consultations) and waitlists of at most 6. Every replica's test clock stands at 10:00 for the whole
run: with no grace period (NO_SHOW_GRACE_PERIOD_MINUTES=0), slot A's patients are due (no-shows succeed there while
their estimated times, counting the patients seen or marked no-show ahead, are not past 10:00), slot B's are not
(they are refused), and both slots take new tokens. A completed patient keeps a seat (SPEC §1), so after each
completion a client raises that slot's capacity to 6 + its completions (UpdateSlotCapacity), which keeps about six
seats in play.

Clients send each call to the replicas in turn, as a load balancer would, always with a fresh request_id. A call
that gets no answer (UNAVAILABLE, DEADLINE_EXCEEDED, a reset) is sent again with the same request_id to the next
replica, a few times; it ends ok, failed (a refusal) or unknown. Now and then (`--copies`, 3 %) a call goes to two
replicas at once, and an answered call is sent once more to another replica: SPEC §9 says that copies, even
arriving at once, answer the first answer.

Faults: `kill` SIGKILLs a random replica at random points (at least 10) and restarts it on the same port;
`backend` terminates one to three of the replicas' PostgreSQL backends at random points (at least 10), preferring
those inside a transaction. Prints one line — clients, operations (ok, failed, unknown), replicas, faults,
violations — and the violations if any; exits 1 if there is one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import random
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

import grpc
import sqlalchemy
from google.protobuf import json_format

from clients.library import OPDClient, OPDError
from opd_grpc._gen.opd.v1 import opd_pb2 as pb
from opd_grpc._gen.opd.v1 import opd_pb2_grpc, test_clock_pb2, test_clock_pb2_grpc
from opd_grpc.api.convert import timestamp
from opd_grpc.process import ServerProcess
from simulation import checks
from simulation.replica_checks import Operation, Verdict, check_run, read_stored, summarised

DEFAULT_DATABASE = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DATE = "2030-01-07"
CLOCK = dt.datetime(2030, 1, 7, 10, 0, tzinfo=dt.timezone.utc)
SLOTS = (("09:00", "11:00"), ("11:00", "12:00"))  # A: open and past the no-show grace at 10:00; B: open, not past
DOCTORS = 2
CAPACITY = 6
MAX_WAITLIST = 6
# No grace: every token is seated at 10:00, and SPEC §6's grace also runs from a seat's time, so with any grace
# no no-show would be taken in this run.
GRACE_MINUTES = 0
SERVER_SETTINGS = {"TIMEZONE": "UTC", "NO_SHOW_GRACE_PERIOD_MINUTES": GRACE_MINUTES, "AUTO_NO_SHOW": "false",
                   "MAX_WAITLIST_SIZE": MAX_WAITLIST}
PATIENTS = 3000
# How often each call is made (UpdateSlotCapacity comes after completions, see the module's docstring).
MIX = {"AllocateToken": 28, "AllocateEmergency": 5, "CancelToken": 12, "MarkNoShow": 11, "CheckInToken": 26,
       "CallNext": 18}
ATTEMPTS = 6
ATTEMPT_TIMEOUT_SECONDS = 5.0
# Codes that answer the call: the server refused it and changed nothing. Any other code leaves it unknown.
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
            grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE,
            grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED}
TERMINAL = {pb.STATUS_COMPLETED, pb.STATUS_CANCELLED, pb.STATUS_NO_SHOW}
MIN_FAULTS = 10
FAULT_SPAN = (0.05, 0.9)  # faults fall between these shares of the operations
KILL_EXCUSES_SECONDS = 5.0  # an INTERNAL/UNKNOWN status this close after a kill of that replica is the crash's
CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 500)]


@dataclass(frozen=True)
class Config:
    clients: int = 32
    operations: int = 10_000
    replicas: int = 3
    faults: str = "none"
    fault_count: int = 12
    seed: int = 7
    database: str = DEFAULT_DATABASE
    history: str = ""  # a JSON-lines file of every operation, when given
    copies: float = 0.03  # the share of calls sent to two replicas at once, and of answered ones sent once more


@dataclass
class Result:
    config: Config
    run: Run
    verdict: Verdict
    seconds: float

    @property
    def violations(self) -> list[str]:
        return self.verdict.violations

    @property
    def faults(self) -> int:
        return self.run.faults

    @property
    def outcomes(self) -> Counter[str]:
        return Counter(op.outcome for op in self.run.operations if op.method != "CreateSlots")

    def line(self) -> str:
        c, outcomes = self.config, self.outcomes
        return (f"replicas: clients {c.clients}, operations {sum(outcomes.values())} (ok {outcomes['ok']}, failed "
                f"{outcomes['failed']}, unknown {outcomes['unknown']}), replicas {c.replicas}, faults {self.faults} "
                f"({c.faults}), violations {len(self.violations)}")

    def details(self) -> str:
        v, r = self.verdict, self.run
        unanswered = ", ".join(f"{code} {n}" for code, n in sorted(r.attempt_codes.items())) or "none"
        terminated = ", ".join(f"{n} {state}" for state, n in sorted(r.terminated.items()))
        return (f"checked: {v.transactions} transactions and {v.events} events replayed through the sequential "
                f"model, {v.refusals_justified} refusals justified, {r.copies_compared} copies compared "
                f"({r.hedged} sent at once), {v.lost} acknowledged lost; attempts without an answer: {unanswered}"
                f"{'; backends terminated: ' + terminated if terminated else ''}; {self.seconds:.1f} s")


class Replica:
    """One server process, restarted on the same port after a kill, and the clients' channel to it."""

    def __init__(self, index: int, database_url: str):
        self.index = index
        self.database_url = database_url
        self.port = 0
        self.process: ServerProcess | None = None
        self.up = False
        self.channel: grpc.aio.Channel | None = None
        self.stub: opd_pb2_grpc.OPDTokenServiceStub | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        """Starts the process (blocking) and sets its test clock; the channel is opened by `open`."""
        self.process = ServerProcess(self.database_url, settings={**SERVER_SETTINGS, "LISTEN": self.address})
        self.port = int(self.process.start().rsplit(":", 1)[1])
        with grpc.insecure_channel(self.address) as channel:
            test_clock_pb2_grpc.TestClockServiceStub(channel).SetTime(
                test_clock_pb2.SetTimeRequest(time=timestamp(CLOCK)), timeout=10)

    async def open(self) -> None:
        old = self.channel
        self.channel = grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        self.stub = opd_pb2_grpc.OPDTokenServiceStub(self.channel)
        self.up = True
        if old is not None:
            await old.close()

    def kill(self) -> None:
        self.up = False
        if self.process is not None:
            self.process.kill()

    def stop(self) -> None:
        self.up = False
        if self.process is not None:
            self.process.stop()


@contextlib.contextmanager
def run_schema(database: str) -> Iterator[tuple[str, str]]:
    """A fresh schema for the run: (its name, the URL whose connections use it); dropped afterwards."""
    schema = f"stress_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(database, isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.NullPool)
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    try:
        url = sqlalchemy.engine.make_url(database).update_query_dict({"options": f"-csearch_path={schema}"})
        yield schema, url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()


def replica_url(url: str, schema: str, index: int) -> str:
    """The run's URL with an application_name that names the run and the replica."""
    named = sqlalchemy.engine.make_url(url).update_query_dict({"application_name": f"opd-stress-{schema}-r{index}"})
    return named.render_as_string(hide_password=False)


@dataclass
class Beliefs:
    """What the clients know from the answers so far: each token's slot and latest status, completions per slot."""

    tokens: dict[str, dict[str, tuple[str, int]]] = field(default_factory=dict)  # doctor -> token -> (slot, status)
    completed: Counter[str] = field(default_factory=Counter)

    def learn(self, answer: Any) -> None:
        for name in ("token", "bumped_token", "completed_token"):
            if name in answer.DESCRIPTOR.fields_by_name and answer.HasField(name):
                self._note(getattr(answer, name))
        for token in getattr(answer, "promoted", ()):
            self._note(token)

    def _note(self, token: pb.Token) -> None:
        """Answers arrive out of order; an end (COMPLETED, CANCELLED, NO_SHOW) is for good."""
        known = self.tokens.setdefault(token.doctor_id, {})
        if known.get(token.token_id, ("", pb.STATUS_CONFIRMED))[1] not in TERMINAL:
            known[token.token_id] = (token.slot_id, token.status)

    def pick(self, rng: random.Random, doctor_id: str, statuses: set[int]) -> str:
        """A token believed to be in `statuses` (one in ten times any known token); "" if none is known."""
        known = self.tokens.get(doctor_id, {})
        if not known:
            return ""
        if rng.random() < 0.1:
            return rng.choice(list(known))
        fitting = [t for t, (_, status) in known.items() if status in statuses]
        return rng.choice(fitting) if fitting else rng.choice(list(known))


class Run:
    """The clients, the faults and the record of every call, on a started cluster."""

    def __init__(self, config: Config, replicas: list[Replica], doctors: list[str], schema: str, admin_url: str):
        self.config = config
        self.replicas = replicas
        self.doctors = doctors
        self.schema = schema
        self.admin_url = admin_url
        self.operations: list[Operation] = []
        self.beliefs = Beliefs()
        self.started = 0
        self.done = asyncio.Event()
        self.faults = 0
        self.kills: list[tuple[int, float]] = []  # (replica, time.monotonic())
        self.terminated: Counter[str] = Counter()  # backends terminated, by their state then
        self.server_errors: list[str] = []
        self.attempt_codes: Counter[str] = Counter()
        self.copies_compared = 0
        self.hedged = 0
        self.capacity_due: dict[int, list[str]] = {}  # client -> slots whose capacity it raises next

    async def play(self) -> None:
        clients = [asyncio.create_task(self._client(i)) for i in range(self.config.clients)]
        faults = asyncio.create_task(self._faults())
        await asyncio.gather(*clients)
        self.done.set()
        await faults

    # ---- clients ----

    async def _client(self, index: int) -> None:
        rng = random.Random(self.config.seed * 1000 + index)
        turn = index
        while self.started < self.config.operations:
            self.started += 1
            method, request, doctor_id = self._next_call(rng, index)
            op = Operation(len(self.operations) + 1, index, method, request, doctor_id, DATE, time.monotonic())
            self.operations.append(op)
            await self._perform(op, turn, hedge=rng.random() < self.config.copies)
            turn += 1
            if op.outcome == "ok":
                self.beliefs.learn(op.answer)
                if method == "CallNext" and op.answer.HasField("completed_token"):
                    slot_id = op.answer.completed_token.slot_id
                    self.beliefs.completed[slot_id] += 1
                    self.capacity_due.setdefault(index, []).append(slot_id)
                if rng.random() < self.config.copies:
                    await self._compare_copy(op, turn)

    def _next_call(self, rng: random.Random, client: int) -> tuple[str, Any, str]:
        request_id = str(uuid.uuid4())
        if due := self.capacity_due.get(client):
            slot_id = due.pop()
            capacity = CAPACITY + self.beliefs.completed[slot_id]
            return ("UpdateSlotCapacity", pb.UpdateSlotCapacityRequest(
                slot_id=slot_id, max_capacity=capacity, request_id=request_id), slot_id.split("-")[0])
        doctor_id = rng.choice(self.doctors)
        method = rng.choices(list(MIX), weights=list(MIX.values()))[0]
        if method in ("AllocateToken", "AllocateEmergency"):
            n = rng.randrange(PATIENTS)
            patient = pb.Patient(name=f"Stress Patient {n}", phone=f"+91-90000-{n:05d}", age=20 + n % 60,
                                 gender=pb.GENDER_FEMALE if n % 2 else pb.GENDER_MALE)
            preferred = rng.choice(["", SLOTS[0][0], SLOTS[1][0]])
            if method == "AllocateEmergency":
                return method, pb.AllocateEmergencyRequest(patient=patient, doctor_id=doctor_id, date=DATE,
                                                           preferred_slot_time=preferred, request_id=request_id), doctor_id
            if rng.random() < 0.1:  # SPEC §4: SOURCE_EMERGENCY through AllocateToken is an emergency too
                return method, pb.AllocateTokenRequest(patient=patient, doctor_id=doctor_id, date=DATE,
                                                       source=pb.SOURCE_EMERGENCY, preferred_slot_time=preferred,
                                                       request_id=request_id), doctor_id
            source = rng.choice([pb.SOURCE_PAID_PRIORITY, pb.SOURCE_FOLLOW_UP, pb.SOURCE_ONLINE_BOOKING,
                                 pb.SOURCE_WALK_IN])
            return method, pb.AllocateTokenRequest(patient=patient, doctor_id=doctor_id, date=DATE, source=source,
                                                   preferred_slot_time=preferred, flexible=rng.random() < 0.3,
                                                   request_id=request_id), doctor_id
        if method == "CallNext":
            return method, pb.CallNextRequest(doctor_id=doctor_id, date=DATE, request_id=request_id), doctor_id
        wanted = {"CancelToken": {pb.STATUS_CONFIRMED, pb.STATUS_WAITLISTED, pb.STATUS_CHECKED_IN, pb.STATUS_CALLED},
                  "MarkNoShow": {pb.STATUS_CONFIRMED, pb.STATUS_CHECKED_IN, pb.STATUS_CALLED},
                  "CheckInToken": {pb.STATUS_CONFIRMED}}[method]
        token_id = self.beliefs.pick(rng, doctor_id, wanted)
        if not token_id:
            return "CallNext", pb.CallNextRequest(doctor_id=doctor_id, date=DATE, request_id=request_id), doctor_id
        request = {"CancelToken": pb.CancelTokenRequest, "MarkNoShow": pb.MarkNoShowRequest,
                   "CheckInToken": pb.CheckInTokenRequest}[method](token_id=token_id, request_id=request_id)
        return method, request, doctor_id

    def _replica(self, turn: int) -> Replica | None:
        """The next replica that is up, in turn from `turn`."""
        n = len(self.replicas)
        for step in range(n):
            replica = self.replicas[(turn + step) % n]
            if replica.up:
                return replica
        return None

    async def _perform(self, op: Operation, turn: int, hedge: bool) -> None:
        """Until an answer: with `hedge`, first two copies at once to two replicas; then one replica after another."""
        if hedge and await self._hedged(op, turn):
            return
        for attempt in range(ATTEMPTS):
            replica = self._replica(turn + attempt)
            if replica is not None:
                outcome, value, at = await self._attempt(op, replica)
                if outcome != "none":
                    self._settle(op, outcome, value, at)
                    return
            await asyncio.sleep(min(1.0, 0.05 * 2 ** attempt))

    async def _hedged(self, op: Operation, turn: int) -> bool:
        """SPEC §9: copies that arrive at once answer alike — both the first answer, or the same refusal."""
        pair = self._replica(turn), self._replica(turn + 1)
        if pair[0] is None or pair[1] is None or pair[0] is pair[1]:
            return False
        self.hedged += 1
        answered = [a for a in await asyncio.gather(*(self._attempt(op, r) for r in pair)) if a[0] != "none"]
        if not answered:
            return False
        landed = [a for a in answered if a[0] == "ok"]
        self._settle(op, *(landed[0] if landed else answered[0]))
        if len(answered) < 2:
            return True
        self.copies_compared += 1
        (first, said, _), (second, other, at) = sorted(answered, key=lambda a: a[0] != "ok")
        if first == "ok" and second == "failed":
            op.copy_refusal = (*other, at)  # the checker tells when the refusing copy ran (simulation.replica_checks)
        elif said != other:
            self.server_errors.append(f"copies answered differently: {op.describe()} was sent to replicas "
                                      f"{pair[0].index} and {pair[1].index} at once; they answered "
                                      f"{_said(first, said)} and {_said(second, other)} (SPEC §9)")
        return True

    async def _attempt(self, op: Operation, replica: Replica) -> tuple[str, Any, float]:
        """One attempt: ("ok", the answer), ("failed", (code, reason)) or ("none", the code that is no answer),
        with the time it came."""
        assert replica.stub is not None
        try:
            answer = await getattr(replica.stub, op.method)(op.request, timeout=ATTEMPT_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as error:
            code = error.code()
            op.attempts.append((replica.index, code.name))
            if code in REFUSALS:
                return "failed", (code.name, OPDError.from_rpc_error(error).reason), time.monotonic()
            self.attempt_codes[" ".join(filter(None, (code.name, OPDError.from_rpc_error(error).reason)))] += 1
            if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                self._server_error(replica, op, error)
            return "none", code.name, time.monotonic()
        op.attempts.append((replica.index, "OK"))
        return "ok", answer, time.monotonic()

    @staticmethod
    def _settle(op: Operation, outcome: str, value: Any, at: float) -> None:
        op.outcome, op.answered_at = outcome, at
        if outcome == "ok":
            op.answer = value
        else:
            op.code, op.reason = value

    def _server_error(self, replica: Replica, op: Operation, error: grpc.aio.AioRpcError) -> None:
        """SPEC §12: never INTERNAL or UNKNOWN — unless the replica was just killed (the transport's words)."""
        now = time.monotonic()
        if any(r == replica.index and 0 <= now - at <= KILL_EXCUSES_SECONDS for r, at in self.kills):
            return
        self.server_errors.append(f"status: replica {replica.index} answered {op.describe()} with "
                                  f"{error.code().name}: {error.details()}")

    async def _compare_copy(self, op: Operation, turn: int) -> None:
        """SPEC §9: the same request_id, sent to another replica, answers the first answer."""
        replica = self._replica(turn + 1)
        if replica is None or replica.stub is None:
            return
        try:
            copy = await getattr(replica.stub, op.method)(op.request, timeout=ATTEMPT_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as error:
            if error.code() in REFUSALS:
                self.server_errors.append(f"copy sent again refused: {op.describe()}: sent again to replica "
                                          f"{replica.index}, refused {error.code().name} "
                                          f"{OPDError.from_rpc_error(error).reason} (SPEC §9)")
            return
        self.copies_compared += 1
        if copy != op.answer:
            self.server_errors.append(f"copy sent again answered differently: {op.describe()}: replica "
                                      f"{replica.index} did not answer the first answer (SPEC §9)")

    # ---- faults ----

    async def _faults(self) -> None:
        if self.config.faults == "none":
            return
        rng = random.Random(self.config.seed)
        low, high = (int(share * self.config.operations) for share in FAULT_SPAN)
        points = sorted(rng.sample(range(low, high), self.config.fault_count))
        restarts: list[asyncio.Task[None]] = []
        for point in points:
            while self.started < point and not self.done.is_set():
                await asyncio.sleep(0.005)
            if self.done.is_set():
                break
            if self.config.faults == "kill":
                while sum(r.up for r in self.replicas) < 2 and not self.done.is_set():
                    await asyncio.sleep(0.01)  # one replica at least stays up
                if self.done.is_set():
                    break
                victim = rng.choice([r for r in self.replicas if r.up])
                victim.up = False  # at once: until it is back, no call and no other fault picks it
                restarts.append(asyncio.create_task(self._kill_and_restart(victim)))
                self.faults += 1
            elif await asyncio.to_thread(self._terminate_backends, rng):
                self.faults += 1
        await asyncio.gather(*restarts)

    async def _kill_and_restart(self, replica: Replica) -> None:
        self.kills.append((replica.index, time.monotonic()))
        await asyncio.to_thread(replica.kill)
        await asyncio.to_thread(replica.start)
        await replica.open()

    def _terminate_backends(self, rng: random.Random) -> int:
        """Terminates one to three of the replicas' backends, those in a transaction first; answers how many."""
        engine = sqlalchemy.create_engine(self.admin_url, poolclass=sqlalchemy.NullPool)
        try:
            with engine.connect() as conn:
                backends = list(conn.exec_driver_sql(
                    "SELECT pid, state FROM pg_stat_activity WHERE application_name LIKE %(pattern)s "
                    "AND pid <> pg_backend_pid() ORDER BY state IN ('active', 'idle in transaction') DESC, random() "
                    "LIMIT %(count)s", {"pattern": f"opd-stress-{self.schema}-r%", "count": rng.randint(1, 3)})
                    )
                killed = 0
                for pid, state in backends:
                    if conn.exec_driver_sql("SELECT pg_terminate_backend(%(pid)s)", {"pid": pid}).scalar():
                        self.terminated[state or "unknown"] += 1  # pg_stat_activity.state may be NULL
                        killed += 1
                conn.commit()
        finally:
            engine.dispose()
        return killed


def _said(outcome: str, value: Any) -> str:
    return f"OK {value.token.token_id}" if outcome == "ok" and hasattr(value, "token") else \
        "OK" if outcome == "ok" else " ".join(value)


def _setup(replica: Replica) -> tuple[list[str], list[Operation]]:
    """The doctors and their hot slots, made through the first replica; the CreateSlots calls are recorded (their
    events open each day's table)."""
    doctors, setup = [], []
    with OPDClient(replica.address, timeout=30) as client:
        for d in range(DOCTORS):
            doctor_id = client.create_doctor(f"Dr Stress {d + 1}", "General Medicine").doctor.doctor_id
            request = pb.CreateSlotsRequest(doctor_id=doctor_id, request_id=str(uuid.uuid4()), slots=[
                pb.SlotSpec(date=DATE, start_time=start, end_time=end, max_capacity=CAPACITY, consultation_minutes=1)
                for start, end in SLOTS])
            op = Operation(0, -1, "CreateSlots", request, doctor_id, DATE, time.monotonic())
            op.answer = client.create_slots(doctor_id, request.slots, request_id=request.request_id)
            op.outcome, op.answered_at = "ok", time.monotonic()
            doctors.append(doctor_id)
            setup.append(op)
    return doctors, setup


@contextlib.contextmanager
def cluster(config: Config) -> Iterator[Cluster]:
    """The replicas, started on a fresh schema; stopped, and the schema dropped, at the end."""
    with run_schema(config.database) as (schema, url):
        replicas = [Replica(i, replica_url(url, schema, i)) for i in range(config.replicas)]
        try:
            replicas[0].start()  # the first creates the schema; the others find it at head
            for replica in replicas[1:]:
                replica.start()
            yield Cluster(config, schema, url, replicas)
        finally:
            for replica in replicas:
                replica.stop()


@dataclass
class Cluster:
    config: Config
    schema: str
    url: str  # the run's schema, for reading the tables beside the servers
    replicas: list[Replica]

    def play(self) -> Run:
        """Sets up the clinic and plays the clients (and the faults) to the end."""
        doctors, setup = _setup(self.replicas[0])
        stress = Run(self.config, self.replicas, doctors, self.schema, self.url)
        stress.operations[:0] = setup

        async def play() -> None:
            for replica in self.replicas:
                await replica.open()
            try:
                await stress.play()
            finally:
                for replica in self.replicas:
                    if replica.channel is not None:
                        await replica.channel.close()

        asyncio.run(play())
        return stress

    def check(self, stress: Run, seconds: float) -> Result:
        """SPEC §3 through every replica, then the tables and the record against the sequential model."""
        api_tokens, api_problems = _final_state(self.replicas, stress.doctors)
        verdict = check_run(read_stored(self.url), stress.operations, GRACE_MINUTES, MAX_WAITLIST, CLOCK,
                            api_tokens)
        verdict.violations[:0] = stress.server_errors + api_problems
        if self.config.history:
            _write_history(self.config.history, stress.operations)
        return Result(self.config, stress, verdict, seconds)


def run(config: Config) -> Result:
    began = time.monotonic()
    with cluster(config) as replicas:
        stress = replicas.play()
        return replicas.check(stress, time.monotonic() - began)


def _final_state(replicas: list[Replica], doctors: list[str]) -> tuple[dict[tuple[str, str], list[pb.Token]],
                                                                       list[str]]:
    """Each doctor-day through the API: SPEC §3 (and §8's places) through every replica, which must all show the
    same tokens."""
    tokens: dict[tuple[str, str], list[pb.Token]] = {}
    problems = []
    for doctor_id in doctors:
        shown = []
        for replica in replicas:
            with OPDClient(replica.address, timeout=30) as client:
                day = checks.fetch_day(client, doctor_id, DATE)
            problems += [f"spec: replica {replica.index}: {p}" for p in checks.invariant_violations(day)]
            shown.append(day.tokens)
        if any(other != shown[0] for other in shown[1:]):
            problems.append(f"spec: {doctor_id}: the replicas list different tokens for {DATE}")
        tokens[(doctor_id, DATE)] = shown[0]
    return tokens, problems


def _write_history(path: str, operations: list[Operation]) -> None:
    with open(path, "w") as out:
        for op in operations:
            out.write(json.dumps({
                "number": op.number, "client": op.client, "method": op.method,
                "request": json_format.MessageToDict(op.request), "invoked_at": op.invoked_at,
                "answered_at": op.answered_at, "outcome": op.outcome, "code": op.code, "reason": op.reason,
                "attempts": op.attempts,
                "answer": json_format.MessageToDict(op.answer) if op.answer is not None else None}) + "\n")


def _unreachable(database: str) -> str:
    """Why the database cannot be reached; "" when it can."""
    engine = sqlalchemy.create_engine(database, poolclass=sqlalchemy.NullPool, connect_args={"connect_timeout": 5})
    try:
        with engine.connect():
            return ""
    except sqlalchemy.exc.OperationalError as error:
        return str(error.orig).strip().splitlines()[0]
    finally:
        engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulation.replicas", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--operations", type=int, default=10_000)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--faults", choices=("none", "kill", "backend"), default="none")
    parser.add_argument("--fault-count", type=int, default=12, help=f"faults to inject (at least {MIN_FAULTS})")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--database", default=DEFAULT_DATABASE, help="a PostgreSQL URL (SQLAlchemy form)")
    parser.add_argument("--copies", type=float, default=Config.copies,
                        help="the share of calls sent to two replicas at once, and of answered ones sent again")
    parser.add_argument("--history", default="", help="write every operation to this JSON-lines file")
    args = parser.parse_args(argv)
    if args.fault_count < MIN_FAULTS:
        parser.error(f"--fault-count must be at least {MIN_FAULTS}")
    if sqlalchemy.engine.make_url(args.database).get_backend_name() != "postgresql":
        parser.error("--database must be a PostgreSQL URL: the replicas share one PostgreSQL")
    if problem := _unreachable(args.database):
        print(f"replicas: no PostgreSQL answers at {args.database}: {problem}", file=sys.stderr)
        return 2
    config = Config(args.clients, args.operations, args.replicas, args.faults, args.fault_count, args.seed,
                    args.database, args.history, args.copies)
    result = run(config)
    print(result.line())
    print(result.details())
    for line in summarised(result.violations):
        print(f"  {line}")
    if config.faults != "none" and result.faults < MIN_FAULTS:
        print(f"  only {result.faults} faults were injected; at least {MIN_FAULTS} were asked for")
        return 1
    return 1 if result.violations else 0


if __name__ == "__main__":
    sys.exit(main())
