"""The workload and the load generator: N workers, each making calls back-to-back for a fixed time.

Allocations are real confirmations: each allocation number n maps to one (doctor, date) that receives exactly
`per_day` numbers, and every such day has slots of `SEATS_PER_SLOT` seats for all of them, so no call is
waitlisted or refused. Calls name no slot: each takes the earliest slot with a free seat, as a desk does.
Every n is a distinct patient, and every call carries a fresh request_id, as a retrying client sends.
With several server addresses (replicas of one database), each call goes to one picked at random, as a load
balancer that knows nothing of doctors spreads them: strict turns would go in step with the doctors, which
allocations also take in turn, and tie each doctor-day to one replica.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import math
import random
import resource
import time
import uuid
from dataclasses import dataclass, field
from multiprocessing import get_context
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Awaitable, Callable, Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from opd_grpc._gen.opd.v1 import opd_pb2 as pb
from opd_grpc._gen.opd.v1 import opd_pb2_grpc

FIRST_DAY = dt.date(2030, 1, 7)  # after the wall clock's today: every slot of the pool is still open
DAY_START = dt.datetime(2030, 1, 7, 8, 0)
SLOT_MINUTES = 20
SEATS_PER_SLOT = 20  # an OPD sitting's size (twice DEFAULT_SLOT_CAPACITY); the day's tokens fill its slots in turn
NOOP, ALLOCATE = "health-check", "allocate"
# GetDoctor of a doctor the server holds in memory: no database, but the whole call pipeline an allocation also
# goes through (key, limits, parse, role, servicer, access log, metrics). Between the no-op and an allocation, it
# shows what the pipeline costs and what is left of the budget for the engine and storage.
PIPELINE = "get-doctor"


@dataclass(frozen=True)
class Pool:
    """Where allocations go: `doctors` x `days` doctor-days, each with `per_day` seats in slots of
    `seats_per_slot` (one slot of `per_day` seats makes every allocation of a day contend for one slot)."""

    doctor_ids: tuple[str, ...]
    days: int
    per_day: int
    seats_per_slot: int = SEATS_PER_SLOT

    @property
    def seats(self) -> int:
        return len(self.doctor_ids) * self.days * self.per_day

    def target(self, n: int) -> tuple[str, str]:
        """The doctor and date of allocation number n; each doctor-day gets exactly `per_day` numbers."""
        doctors = len(self.doctor_ids)
        day = n // (doctors * self.per_day)
        if day >= self.days:
            raise RuntimeError(f"the pool's {self.seats} seats are used up; run with more --days")
        return self.doctor_ids[n % doctors], (FIRST_DAY + dt.timedelta(days=day)).isoformat()


def create_pool(address: str, doctors: int, days: int, per_day: int, seats_per_slot: int = SEATS_PER_SLOT) -> Pool:
    """Doctors and their slots."""
    with grpc.insecure_channel(address) as channel:
        stub = opd_pb2_grpc.OPDTokenServiceStub(channel)
        doctor_ids = []
        for i in range(doctors):
            doctor_id = stub.CreateDoctor(pb.CreateDoctorRequest(
                name=f"Dr Bench {i + 1}", specialization="General Medicine")).doctor.doctor_id
            stub.CreateSlots(pb.CreateSlotsRequest(doctor_id=doctor_id, slots=[
                pb.SlotSpec(date=(FIRST_DAY + dt.timedelta(days=d)).isoformat(), start_time=f"{start:%H:%M}",
                            end_time=f"{start + dt.timedelta(minutes=SLOT_MINUTES):%H:%M}",
                            max_capacity=min(seats_per_slot, per_day - i * seats_per_slot), consultation_minutes=1)
                for d in range(days)
                for i, start in enumerate(DAY_START + dt.timedelta(minutes=SLOT_MINUTES * k)
                                          for k in range(math.ceil(per_day / seats_per_slot)))]))
            doctor_ids.append(doctor_id)
    return Pool(tuple(doctor_ids), days, per_day, seats_per_slot)


@dataclass(frozen=True)
class LoadSpec:
    """One client process's share of a measurement."""

    addresses: tuple[str, ...]  # one server, or replicas that share a database
    kind: str
    in_flight: int
    warmup: float
    seconds: float
    start_at: float  # time.time() at which every client process begins together
    pool: Pool
    first_n: int  # allocation numbers used: first_n + offset + stride * k
    offset: int = 0
    stride: int = 1


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)  # seconds, of calls that ended in the window
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    calls_made: int = 0  # warm-up included: what the server's CPU time was spent on
    last_n: int = -1
    client_cpu_seconds: float = 0.0

    def merge(self, other: LoadResult) -> None:
        self.latencies += other.latencies
        self.calls_made += other.calls_made
        self.errors += other.errors
        self.outcomes += other.outcomes
        self.last_n = max(self.last_n, other.last_n)
        self.client_cpu_seconds += other.client_cpu_seconds


@dataclass
class Totals:
    """One call kind at one number in flight, summed over the rounds."""

    load: LoadResult = field(default_factory=LoadResult)
    wall_seconds: float = 0.0
    server_cpu_seconds: float = 0.0  # of every server the calls went to
    database_cpu_seconds: float = 0.0  # of a PostgreSQL server on this machine, when one is measured


async def run_load(spec: LoadSpec) -> LoadResult:
    """`in_flight` workers call back-to-back from `start_at` for warmup + seconds; only calls that end in
    the last `seconds` (the measured window) count toward throughput and latency."""
    result = LoadResult()
    counter = iter(range(spec.first_n + spec.offset, 1 << 62, spec.stride))
    channels = [grpc.aio.insecure_channel(address) for address in spec.addresses]
    try:
        call = _caller(spec, channels, counter, result)
        await asyncio.gather(*(channel.channel_ready() for channel in channels))
        await asyncio.sleep(max(0.0, spec.start_at - time.time()))
        cpu_before = _cpu_seconds()
        begin = time.perf_counter()
        window_start, deadline = begin + spec.warmup, begin + spec.warmup + spec.seconds

        async def worker() -> None:
            while (started := time.perf_counter()) < deadline:
                try:
                    outcome = await call()
                except grpc.aio.AioRpcError as error:  # counted in the warm-up too: no call may fail
                    outcome = ""
                    result.errors[error.code().name] += 1
                ended = time.perf_counter()
                result.calls_made += 1
                if window_start <= ended <= deadline and outcome:
                    result.latencies.append(ended - started)
                    result.outcomes[outcome] += 1

        await asyncio.gather(*(worker() for _ in range(spec.in_flight)))
        result.client_cpu_seconds = _cpu_seconds() - cpu_before
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))
    return result


def _caller(spec: LoadSpec, channels: list[grpc.aio.Channel], counter: Iterator[int],
            result: LoadResult) -> Callable[[], Awaitable[str]]:
    """The call of one kind, each to one of the servers; it answers the outcome to count (the token's status
    for allocations)."""
    pick = random.Random(spec.offset).randrange
    if spec.kind == NOOP:
        healths = [health_pb2_grpc.HealthStub(channel) for channel in channels]
        request = health_pb2.HealthCheckRequest()

        async def check() -> str:
            response = await healths[pick(len(healths))].Check(request)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        return check

    stubs = [opd_pb2_grpc.OPDTokenServiceStub(channel) for channel in channels]
    if spec.kind == PIPELINE:
        lookup = pb.GetDoctorRequest(doctor_id=spec.pool.doctor_ids[0])

        async def get_doctor() -> str:
            response = await stubs[pick(len(stubs))].GetDoctor(lookup)
            return "FOUND" if response.doctor.doctor_id else "EMPTY"
        return get_doctor

    async def allocate() -> str:
        n = next(counter)
        result.last_n = max(result.last_n, n)
        doctor_id, date = spec.pool.target(n)
        response = await stubs[pick(len(stubs))].AllocateToken(pb.AllocateTokenRequest(
            patient=pb.Patient(name=f"Bench Patient {n}", phone=f"+91-90000-{n:07d}", age=20 + n % 60,
                               gender=pb.GENDER_FEMALE if n % 2 else pb.GENDER_MALE),
            doctor_id=doctor_id, date=date, source=pb.SOURCE_WALK_IN, request_id=str(uuid.uuid4())))
        return pb.Status.Name(response.token.status)
    return allocate


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _client_process(conn: Connection) -> None:
    """A client process: runs each LoadSpec it receives and sends back the result, until it receives None."""
    while (spec := conn.recv()) is not None:
        conn.send(asyncio.run(run_load(spec)))


class LoadGenerator:
    """Runs a measurement from this process, or split over `processes` client processes, each with its share
    of the calls in flight (so that the client is not what limits the figures). Each pool's allocation numbers
    carry on from one measurement to the next."""

    START_DELAY_SECONDS = 0.5  # room for every client process to connect before the common start

    def __init__(self, processes: int):
        self.processes = processes
        self._next_n: dict[Pool, int] = {}
        self._clients: list[tuple[BaseProcess, Connection]] = []
        if processes > 1:
            context = get_context("spawn")
            for _ in range(processes):
                ours, theirs = context.Pipe()
                process = context.Process(target=_client_process, args=(theirs,), daemon=True)
                process.start()
                self._clients.append((process, ours))

    def measure(self, addresses: tuple[str, ...], pool: Pool, kind: str, in_flight: int, warmup: float,
                seconds: float) -> LoadResult:
        first_n = self._next_n.get(pool, 0)
        shares = [in_flight // self.processes + (i < in_flight % self.processes) for i in range(self.processes)]
        shares = [s for s in shares if s]
        start_at = time.time() + (self.START_DELAY_SECONDS if self._clients else 0.0)
        specs = [LoadSpec(addresses, kind, share, warmup, seconds, start_at, pool, first_n, i, len(shares))
                 for i, share in enumerate(shares)]
        result = LoadResult()
        if not self._clients:
            result.merge(asyncio.run(run_load(specs[0])))
        else:
            for spec, (_, conn) in zip(specs, self._clients):
                conn.send(spec)
            for _, (_, conn) in zip(specs, self._clients):
                result.merge(conn.recv())
        if result.last_n >= 0:
            self._next_n[pool] = result.last_n + 1
        return result

    def close(self) -> None:
        for process, conn in self._clients:
            if process.is_alive():
                conn.send(None)
                process.join(timeout=10)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1) of unsorted values; 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]
