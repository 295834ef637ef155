"""SPEC §10 across replicas (issue 4): watchers spread over three server processes on one PostgreSQL, while
changes go to all three, each see every doctor's events exactly as the event table holds them: gapless, in
order, once. Also when wake-ups are lost: a replica's LISTEN connection killed, or a writer that never notifies
(as a replica killed between its commit and its notification), whose changes the periodic catch-up finds.

Where the wake-ups themselves are under test, the periodic catch-up is set to a minute, so that it cannot
stand in for them."""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import grpc
import pytest
import sqlalchemy

from opd_grpc._gen.opd.v1 import opd_pb2 as pb
from opd_grpc._gen.opd.v1 import opd_pb2_grpc, test_clock_pb2, test_clock_pb2_grpc
from opd_grpc.api.convert import timestamp
from opd_grpc.engine.clock import TestClock
from opd_grpc.engine.model import Patient, Source
from opd_grpc.engine.access import ANONYMOUS
from opd_grpc.engine.service import AllocateCommand, Call, OPDService
from opd_grpc.process import ServerProcess
from opd_grpc.settings import Settings
from opd_grpc.storage.store import SqlStore
from tests.support import (
    DAY, TEST_DATABASE, allocate, at, fresh_database, make_doctor, make_slots, random_move, stored_events,
)

pytestmark = pytest.mark.skipif(TEST_DATABASE != "postgresql",
                                reason="replicas share one PostgreSQL database: run with TEST_DATABASE=postgresql")

REPLICAS = 3
WATCHERS_PER_REPLICA = 5
EventKey = tuple[int, str, str, str]  # sequence, kind, token_id, status: a row of stored_events


class Replicas:
    """Server processes on one database, each with a stub, their test clocks all at the same instant."""

    def __init__(self, url: str, servers: list[ServerProcess]):
        self.url = url
        self.servers = servers
        self.channels = [grpc.insecure_channel(s.address) for s in servers]
        self.stubs = [opd_pb2_grpc.OPDTokenServiceStub(c) for c in self.channels]
        for channel in self.channels:
            test_clock_pb2_grpc.TestClockServiceStub(channel).SetTime(
                test_clock_pb2.SetTimeRequest(time=timestamp(at("09:30"))))

    def close(self) -> None:
        for channel in self.channels:
            channel.close()


@contextlib.contextmanager
def _replicas(folder: Path, **settings: Any) -> Iterator[Replicas]:
    with fresh_database(folder) as url:
        servers: list[ServerProcess] = []
        try:
            for _ in range(REPLICAS):  # one after another: the first gives the empty database its schema
                servers.append(ServerProcess(url, settings=settings))
                servers[-1].start()
            running = Replicas(url, servers)
            try:
                yield running
            finally:
                running.close()
        finally:
            for server in servers:
                server.stop()


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[Replicas]:
    """Replicas that learn of each other's changes only from wake-ups (and a listener's reconnection)."""
    with _replicas(tmp_path, WATCH_CATCH_UP_SECONDS=60) as running:
        yield running


@pytest.fixture
def replicas_catching_up(tmp_path: Path) -> Iterator[Replicas]:
    """Replicas with the default periodic catch-up (every second)."""
    with _replicas(tmp_path) as running:
        yield running


def _clinic(replicas: Replicas, doctors: int) -> list[str]:
    stub = replicas.stubs[0]
    ids = [make_doctor(stub, f"Dr {n}") for n in range(doctors)]
    for doctor in ids:
        make_slots(stub, doctor, ("09:00", "10:00", 3), ("10:00", "11:00", 3))
    return ids


def _watch_while(replicas: Replicas, doctors: list[str], changes: Callable[[], None],
                 patience: float = 20.0) -> tuple[list[dict[str, list[EventKey]]], dict[str, list[EventKey]], float]:
    """Watchers on every replica (all events from sequence 1) while `changes` runs; answers what each saw, the
    event table, and how long after `changes` ended the last watcher had the whole table."""

    async def run() -> tuple[list[dict[str, list[EventKey]]], dict[str, list[EventKey]], float]:
        loop = asyncio.get_running_loop()
        channels = [grpc.aio.insecure_channel(s.address) for s in replicas.servers]
        try:
            calls = [opd_pb2_grpc.OPDTokenServiceStub(channel).WatchQueue(
                pb.WatchQueueRequest(doctor_ids=doctors, date=DAY, after_sequence=0))
                for channel in channels for _ in range(WATCHERS_PER_REPLICA)]
            seen: list[dict[str, list[EventKey]]] = [{d: [] for d in doctors} for _ in calls]

            async def read(call: Any, into: dict[str, list[EventKey]]) -> None:
                async for update in call:
                    if update.WhichOneof("update") == "event":
                        e = update.event
                        into[e.doctor_id].append((e.sequence, pb.EventKind.Name(e.kind), e.token.token_id,
                                                  pb.Status.Name(e.token.status)))

            readers = [asyncio.ensure_future(read(c, s)) for c, s in zip(calls, seen)]
            await loop.run_in_executor(None, changes)
            ended = loop.time()
            table = {d: stored_events(replicas.url, d) for d in doctors}
            while loop.time() < ended + patience and \
                    any(len(s[d]) < len(table[d]) for s in seen for d in doctors):
                await asyncio.sleep(0.02)
            caught_up_after = loop.time() - ended
            for call in calls:
                call.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            return seen, table, caught_up_after
        finally:
            for channel in channels:
                await channel.close()

    return asyncio.run(run())


def _mixed_changes(replicas: Replicas, doctors: list[str], writers: int, per_writer: int) -> None:
    """Allocations of every source, emergencies, check-ins, calls, completions, cancellations, no-shows and
    capacity changes from several threads at once, each sending its calls to the replicas in turn."""

    def write(seed: int) -> None:
        rng = random.Random(seed)
        for i in range(per_writer):
            random_move(replicas.stubs[(seed + i) % REPLICAS], rng.choice(doctors), seed * 1000 + i, rng)

    threads = [threading.Thread(target=write, args=(seed,)) for seed in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _assert_all_saw_the_table(seen: list[dict[str, list[EventKey]]], table: dict[str, list[EventKey]]) -> None:
    for doctor, events in table.items():
        assert [e[0] for e in events] == list(range(1, len(events) + 1)), f"{doctor}'s table has a gap"
        for n, watcher in enumerate(seen):
            assert watcher[doctor] == events, \
                f"watcher {n} (replica {n // WATCHERS_PER_REPLICA}) saw {len(watcher[doctor])} of {doctor}'s " \
                f"{len(events)} events, or not in the table's order"


def test_watchers_spread_over_the_replicas_all_see_the_same_gapless_sequence(replicas: Replicas):
    doctors = _clinic(replicas, 3)
    seen, table, _ = _watch_while(replicas, doctors, lambda: _mixed_changes(replicas, doctors, 6, 80))
    assert len(seen) == REPLICAS * WATCHERS_PER_REPLICA
    assert all(len(events) > 40 for events in table.values())
    _assert_all_saw_the_table(seen, table)


def _listener_backends(url: str, server: ServerProcess) -> list[int]:
    """The PostgreSQL backend of a replica's LISTEN connection (storage/notify.py names it)."""
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.NullPool)
    try:
        with engine.connect() as conn:
            return list(conn.execute(sqlalchemy.text(
                "SELECT pid FROM pg_stat_activity WHERE application_name = :name AND query LIKE 'LISTEN%'"),
                {"name": f"opd-grpc listen {server.pid}"}).scalars())
    finally:
        engine.dispose()


def _terminate(url: str, backends: list[int]) -> None:
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.NullPool)
    try:
        with engine.connect() as conn:
            for backend in backends:
                conn.execute(sqlalchemy.text("SELECT pg_terminate_backend(:pid)"), {"pid": backend})
    finally:
        engine.dispose()


def test_a_replica_whose_listen_connection_is_killed_still_gets_every_event(replicas: Replicas):
    doctors = _clinic(replicas, 2)
    deaf, writer = replicas.servers[0], replicas.stubs[1]
    killed = _listener_backends(replicas.url, deaf)
    assert len(killed) == 1

    def changes() -> None:
        for n in range(10):
            allocate(writer, doctors[n % 2], n)
        for burst in range(1, 4):  # the notifications sent meanwhile are lost to the deaf replica
            _terminate(replicas.url, _listener_backends(replicas.url, deaf))
            for n in range(10):
                allocate(writer, doctors[n % 2], 100 * burst + n)

    seen, table, _ = _watch_while(replicas, doctors, changes)
    _assert_all_saw_the_table(seen, table)
    deadline = time.monotonic() + 10
    while not (listening := _listener_backends(replicas.url, deaf)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert listening and listening != killed, "the replica listens again, on a new connection"


def test_changes_whose_notifications_never_came_are_caught_up_within_seconds(replicas_catching_up: Replicas):
    replicas = replicas_catching_up
    doctors = _clinic(replicas, 2)
    silent = SqlStore(replicas.url)  # commits like a replica, never notifies: one killed after its commits
    service = OPDService(silent, TestClock(at("09:30")), Settings().rules())

    def changes() -> None:
        for n in range(20):
            service.allocate(AllocateCommand(Patient(f"Patient {n}", f"+91-98450-{n:05d}", 40, "FEMALE"),
                                             doctors[n % 2], DAY, "", Source.WALK_IN, False),
                             Call(ANONYMOUS, "AllocateToken"))

    try:
        seen, table, caught_up_after = _watch_while(replicas, doctors, changes)
    finally:
        silent.close()
    _assert_all_saw_the_table(seen, table)
    assert caught_up_after < 5, "the periodic catch-up runs every second"
