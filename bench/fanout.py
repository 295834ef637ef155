"""Fan-out (issue 3): many WatchQueue streams on one doctor-day while this process changes it at a steady rate.

The watchers run in client processes of their own, each on its own connection as a display board is, so that
neither the changes nor the receipts queue behind the other. Every watcher must receive every event exactly
once and in order; latency is an event's receipt (this machine's wall clock) minus its `occurred_at`, which the
server takes from the same wall clock as it makes the change, just before the commit.
"""

from __future__ import annotations

import asyncio
import collections
import resource
import time
import uuid
from dataclasses import dataclass, field
from multiprocessing import get_context
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.load import FIRST_DAY
from bench.procfs import cpu_seconds, rss_mib
from opd_grpc._gen.opd.v1 import opd_pb2 as pb
from opd_grpc._gen.opd.v1 import opd_pb2_grpc

SETTLE_SECONDS = 1.0  # connected and idle before the server's memory is read
DRAIN_SECONDS = 15.0  # how long the watchers may take, after the last change, to receive it
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]  # one TCP connection per watcher, as boards have


@dataclass(frozen=True)
class WatchSpec:
    """One client process's share of the watchers."""

    address: str
    doctor_id: str
    date: str
    watchers: int


@dataclass
class WatchResult:
    """What a client process's watchers received, from their snapshot up to the day's last sequence."""

    watchers: int = 0
    expected: int = 0  # events after each watcher's snapshot, summed
    received: int = 0  # distinct events received in sequence order
    lost: int = 0
    duplicates: int = 0  # an event at or below the last sequence received
    complete: int = 0  # watchers that received every event
    latencies: list[float] = field(default_factory=list)  # seconds, receipt - occurred_at, of every event
    # per event sequence, the latency of its first and its last receipt: how long the server took to fan it out
    spread: dict[int, tuple[float, float]] = field(default_factory=dict)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)  # streams ended by the server
    last_receipt: float = 0.0  # time.time()
    connect_seconds: float = 0.0
    cpu_seconds: float = 0.0  # from the start of the changes to the last receipt

    def merge(self, other: WatchResult) -> None:
        self.watchers += other.watchers
        self.expected += other.expected
        self.received += other.received
        self.lost += other.lost
        self.duplicates += other.duplicates
        self.complete += other.complete
        self.latencies += other.latencies
        for sequence, (first, last) in other.spread.items():
            ours = self.spread.get(sequence, (first, last))
            self.spread[sequence] = min(ours[0], first), max(ours[1], last)
        self.errors += other.errors
        self.last_receipt = max(self.last_receipt, other.last_receipt)
        self.connect_seconds = max(self.connect_seconds, other.connect_seconds)
        self.cpu_seconds += other.cpu_seconds


class Watcher:
    """One stream: it checks that sequences follow on from its snapshot, and times each event's receipt."""

    def __init__(self, call: grpc.aio.UnaryStreamCall, snapshot_sequence: int):
        self.call = call
        self.snapshot_sequence = self.last = snapshot_sequence
        self.received = self.duplicates = self.skipped = 0
        self.latencies: dict[int, float] = {}  # by sequence
        self.last_receipt = 0.0
        self.error = ""

    async def read(self) -> None:
        try:
            while (update := await self.call.read()) is not grpc.aio.EOF:
                received_at = time.time()
                if update.WhichOneof("update") != "event":
                    continue  # a heartbeat
                event = update.event
                if event.sequence <= self.last:
                    self.duplicates += 1
                    continue
                self.skipped += event.sequence - self.last - 1
                self.last = event.sequence
                self.received += 1
                self.last_receipt = received_at
                self.latencies[event.sequence] = received_at - event.occurred_at.seconds - event.occurred_at.nanos / 1e9
        except grpc.aio.AioRpcError as error:
            self.error = error.code().name  # the server ended the stream
        except asyncio.CancelledError:
            if not self.call.cancelled():  # not the close at the end, which cancels the call itself
                raise


async def _watch(spec: WatchSpec, conn: Connection) -> WatchResult:
    """Connects the watchers and reports it; then, told the day's last sequence, waits until every watcher has
    it (or DRAIN_SECONDS pass), closes every stream and answers what they received."""
    loop = asyncio.get_running_loop()
    request = pb.WatchQueueRequest(doctor_ids=[spec.doctor_id], date=spec.date)
    channels = [grpc.aio.insecure_channel(spec.address, options=OWN_CONNECTION) for _ in range(spec.watchers)]
    try:
        began = time.perf_counter()

        async def connect(channel: grpc.aio.Channel) -> Watcher:
            call = opd_pb2_grpc.OPDTokenServiceStub(channel).WatchQueue(request)
            first = await call.read()
            if first is grpc.aio.EOF or first.WhichOneof("update") != "snapshot":
                raise RuntimeError(f"a watch began with {first!r}, not a snapshot")
            return Watcher(call, first.snapshot.sequence)

        watchers = await asyncio.gather(*(connect(c) for c in channels))
        readers = [asyncio.ensure_future(w.read()) for w in watchers]
        result = WatchResult(watchers=len(watchers), connect_seconds=time.perf_counter() - began)
        conn.send("connected")
        await loop.run_in_executor(None, conn.recv)  # the changes start
        cpu_before = _cpu_seconds()
        last_sequence: int = await loop.run_in_executor(None, conn.recv)
        deadline = time.perf_counter() + DRAIN_SECONDS
        while any(w.last < last_sequence and not w.error for w in watchers) and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        result.cpu_seconds = _cpu_seconds() - cpu_before
        for w in watchers:
            w.call.cancel()
        await asyncio.gather(*readers)
        for w in watchers:
            expected = last_sequence - w.snapshot_sequence
            result.expected += expected
            result.received += w.received
            result.lost += expected - w.received
            result.duplicates += w.duplicates
            result.complete += w.received == expected and not w.duplicates and not w.skipped
            result.latencies += w.latencies.values()
            for sequence, latency in w.latencies.items():
                first, last = result.spread.get(sequence, (latency, latency))
                result.spread[sequence] = min(first, latency), max(last, latency)
            result.last_receipt = max(result.last_receipt, w.last_receipt)
            if w.error:
                result.errors[w.error] += 1
        return result
    finally:
        await asyncio.gather(*(c.close() for c in channels))


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _watcher_process(conn: Connection) -> None:
    """A client process: for each WatchSpec it receives, runs the watch and sends back the result."""
    while (spec := conn.recv()) is not None:
        conn.send(asyncio.run(_watch(spec, conn)))


@dataclass
class Changes:
    """What the generator did: allocations at a steady rate, each one event on the watched day."""

    made: int = 0
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    started_at: float = 0.0  # time.time() of the first change
    first_sequence: int = 0  # the day's last sequence before the changes
    last_sequence: int = 0  # after them, read by a fresh stream once they are done


@dataclass
class FanoutResult:
    watchers: int
    events_per_second: float
    seconds: float
    changes: Changes
    received: WatchResult
    server_rss_mib_idle: float  # before the watchers connected
    server_rss_mib_watched: float  # with them connected and idle
    server_rss_mib_closed: float  # after every stream closed
    server_cpu_seconds: float  # from the first change to the last receipt
    wall_seconds: float
    healthy_after: bool  # a fresh stream and a health check answer once every stream is closed


class FanoutBench:
    """Runs fan-out scenarios on one server: a fresh doctor-day each, watched by `watchers` streams spread over
    `processes` client processes, changed `events_per_second` times a second for `seconds`."""

    def __init__(self, address: str, server_pid: int, processes: int):
        self.address = address
        self.server_pid = server_pid
        self.patients = 0
        context = get_context("spawn")
        self._clients: list[tuple[BaseProcess, Connection]] = []
        for _ in range(processes):
            ours, theirs = context.Pipe()
            process = context.Process(target=_watcher_process, args=(theirs,), daemon=True)
            process.start()
            self._clients.append((process, ours))

    def measure(self, watchers: int, events_per_second: float, seconds: float) -> FanoutResult:
        changes_count = max(1, round(events_per_second * seconds))
        doctor_id, date = self._watched_day(watchers, changes_count)
        shares = [watchers // len(self._clients) + (i < watchers % len(self._clients))
                  for i in range(len(self._clients))]
        clients = [(spec, conn) for spec, (_, conn) in zip(
            (WatchSpec(self.address, doctor_id, date, share) for share in shares), self._clients) if spec.watchers]
        rss_idle = rss_mib(self.server_pid)
        for spec, conn in clients:
            conn.send(spec)
        for _, conn in clients:
            assert conn.recv() == "connected"
        time.sleep(SETTLE_SECONDS)
        rss_watched = rss_mib(self.server_pid)
        cpu_before, wall_before = cpu_seconds(self.server_pid), time.perf_counter()
        for _, conn in clients:
            conn.send("start")
        changes = asyncio.run(self._make_changes(doctor_id, date, events_per_second, changes_count))
        for _, conn in clients:
            conn.send(changes.last_sequence)
        received = WatchResult()
        for _, conn in clients:
            received.merge(conn.recv())
        server_cpu = cpu_seconds(self.server_pid) - cpu_before
        wall = time.perf_counter() - wall_before
        healthy = asyncio.run(self._healthy(doctor_id, date, changes.last_sequence))
        return FanoutResult(watchers, events_per_second, seconds, changes, received, rss_idle, rss_watched,
                            rss_mib(self.server_pid), server_cpu, wall, healthy)

    def _watched_day(self, watchers: int, changes: int) -> tuple[str, str]:
        """A doctor of its own, with one slot big enough for every change (no allocation is waitlisted)."""
        with grpc.insecure_channel(self.address) as channel:
            stub = opd_pb2_grpc.OPDTokenServiceStub(channel)
            doctor_id = stub.CreateDoctor(pb.CreateDoctorRequest(
                name=f"Dr Fan-out {watchers}", specialization="General Medicine")).doctor.doctor_id
            stub.CreateSlots(pb.CreateSlotsRequest(doctor_id=doctor_id, slots=[pb.SlotSpec(
                date=FIRST_DAY.isoformat(), start_time="08:00", end_time="20:00", max_capacity=changes,
                consultation_minutes=1)]))
        return doctor_id, FIRST_DAY.isoformat()

    async def _make_changes(self, doctor_id: str, date: str, events_per_second: float, count: int) -> Changes:
        """Allocations paced to the rate by the clock (a late one does not shift the next), one at a time."""
        changes = Changes()
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = opd_pb2_grpc.OPDTokenServiceStub(channel)
            changes.first_sequence = await _last_sequence(stub, doctor_id, date)
            begin = time.perf_counter()
            changes.started_at = time.time()
            for k in range(count):
                await asyncio.sleep(max(0.0, begin + k / events_per_second - time.perf_counter()))
                n = self.patients = self.patients + 1
                try:
                    await stub.AllocateToken(pb.AllocateTokenRequest(
                        patient=pb.Patient(name=f"Watched Patient {n}", phone=f"+91-80000-{n:07d}", age=20 + n % 60,
                                           gender=pb.GENDER_FEMALE if n % 2 else pb.GENDER_MALE),
                        doctor_id=doctor_id, date=date, source=pb.SOURCE_WALK_IN, request_id=str(uuid.uuid4())))
                    changes.made += 1
                except grpc.aio.AioRpcError as error:
                    changes.errors[error.code().name] += 1
            changes.last_sequence = await _last_sequence(stub, doctor_id, date)
        return changes

    async def _healthy(self, doctor_id: str, date: str, last_sequence: int) -> bool:
        async with grpc.aio.insecure_channel(self.address) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            sequence = await _last_sequence(opd_pb2_grpc.OPDTokenServiceStub(channel), doctor_id, date)
        return health.status == health_pb2.HealthCheckResponse.SERVING and sequence == last_sequence

    def close(self) -> None:
        for process, conn in self._clients:
            if process.is_alive():
                conn.send(None)
                process.join(timeout=10)


async def _last_sequence(stub: opd_pb2_grpc.OPDTokenServiceStub, doctor_id: str, date: str) -> int:
    """The day's last sequence, from the snapshot of a short stream of its own."""
    call = stub.WatchQueue(pb.WatchQueueRequest(doctor_ids=[doctor_id], date=date), timeout=5)
    try:
        return (await call.read()).snapshot.sequence
    finally:
        call.cancel()

