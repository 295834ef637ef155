"""SPEC §10 through a real server: snapshot then live, resume after a sequence, heartbeats, history limits,
many watchers agreeing with the event table, and a cancelled stream leaving nothing behind."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import grpc
import pytest
import sqlalchemy

from opd_grpc._gen.opd.v1 import opd_pb2 as pb
from opd_grpc._gen.opd.v1 import opd_pb2_grpc
from tests.support import (
    DAY, LiveServer, allocate, at, failure, fresh_database, live_server, make_doctor, make_slots,
    random_move, stored_events,
)

EventKey = tuple[int, str, str, str]  # sequence, kind, token_id, status


def event_key(e: pb.QueueEvent) -> EventKey:
    return e.sequence, pb.EventKind.Name(e.kind), e.token.token_id, pb.Status.Name(e.token.status)


class Watcher:
    """One WatchQueue stream read on a thread of its own."""

    def __init__(self, stub: opd_pb2_grpc.OPDTokenServiceStub, **request: Any):
        self.call = stub.WatchQueue(pb.WatchQueueRequest(**request))
        self.updates: list[pb.WatchQueueResponse] = []
        self.error: grpc.RpcError | None = None
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for update in self.call:
                with self._changed:
                    self.updates.append(update)
                    self._changed.notify_all()
        except grpc.RpcError as error:
            with self._changed:
                self.error = error
                self._changed.notify_all()

    def wait_until(self, done: Callable[[Watcher], bool], timeout: float = 10.0) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: done(self) or self.error is not None, timeout), \
                f"gave up waiting; got {len(self.updates)} updates"
        if self.error is not None and self.error.code() != grpc.StatusCode.CANCELLED:
            assert done(self), f"stream failed: {self.error}"

    @property
    def events(self) -> list[pb.QueueEvent]:
        return [u.event for u in self.updates if u.WhichOneof("update") == "event"]

    def events_of(self, doctor_id: str) -> list[pb.QueueEvent]:
        return [e for e in self.events if e.doctor_id == doctor_id]

    def last_sequence(self, doctor_id: str) -> int:
        seqs = [u.snapshot.sequence for u in self.updates if u.WhichOneof("update") == "snapshot"
                and u.snapshot.doctor_id == doctor_id] + [e.sequence for e in self.events_of(doctor_id)]
        return max(seqs, default=0)

    def close(self) -> None:
        self.call.cancel()
        self._thread.join(timeout=10)


@pytest.fixture
def clinic(live: LiveServer) -> tuple[LiveServer, str]:
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("09:00", "10:00", 2), ("10:00", "11:00", 2))
    return live, doctor


def test_snapshot_then_live_events_in_order(clinic: tuple[LiveServer, str]):
    live, doctor = clinic
    first = allocate(live.stub, doctor, 1).token
    watcher = Watcher(live.stub, doctor_ids=[doctor], date=DAY)
    try:
        watcher.wait_until(lambda w: len(w.updates) >= 1)
        snapshot = watcher.updates[0].snapshot
        assert watcher.updates[0].WhichOneof("update") == "snapshot"
        assert (snapshot.doctor_id, snapshot.date) == (doctor, DAY)
        assert snapshot.sequence == len(stored_events(live.settings.DATABASE_URL, doctor))
        assert [(t.token_number, t.status) for t in snapshot.tokens] == [(1, pb.STATUS_CONFIRMED)]
        assert not snapshot.tokens[0].HasField("patient"), "a display stream never carries patient details"

        allocate(live.stub, doctor, 2)
        third = allocate(live.stub, doctor, 3, slot_time="09:00").token
        live.stub.CheckInToken(pb.CheckInTokenRequest(token_id=first.token_id))
        live.stub.CallNext(pb.CallNextRequest(doctor_id=doctor, date=DAY))
        watcher.wait_until(lambda w: len(w.events) >= 4)
        assert [event_key(e) for e in watcher.events] == stored_events(live.settings.DATABASE_URL, doctor)[snapshot.sequence:]
        assert [pb.EventKind.Name(e.kind) for e in watcher.events] == [
            "EVENT_KIND_ALLOCATED", "EVENT_KIND_WAITLISTED", "EVENT_KIND_CHECKED_IN", "EVENT_KIND_CALLED"]
        placed = watcher.events[1].token
        assert placed.token_number == third.token_number == 3 and placed.status == pb.STATUS_WAITLISTED
        assert placed.source == pb.SOURCE_WALK_IN
        assert placed.priority == 5 and placed.HasField("created_at") and not placed.HasField("patient")
    finally:
        watcher.close()


def test_snapshot_of_a_day_with_nothing_yet(clinic: tuple[LiveServer, str]):
    live, doctor = clinic
    watcher = Watcher(live.stub, doctor_ids=[doctor], date="2030-01-08")
    try:
        watcher.wait_until(lambda w: len(w.updates) >= 1)
        assert watcher.updates[0].snapshot == pb.QueueSnapshot(doctor_id=doctor, date="2030-01-08", sequence=0)
        make_slots(live.stub, doctor, ("09:00", "10:00", 1), date="2030-01-08")
        watcher.wait_until(lambda w: len(w.events) >= 1)
        assert pb.EventKind.Name(watcher.events[0].kind) == "EVENT_KIND_SLOT_CHANGED"
        assert watcher.events[0].sequence == 1 and not watcher.events[0].HasField("token")
    finally:
        watcher.close()


@pytest.mark.parametrize("after", [0, 3, 6])
def test_resume_after_n_gives_exactly_the_events_after_n(clinic: tuple[LiveServer, str], after: int):
    live, doctor = clinic
    for n in range(1, 6):
        allocate(live.stub, doctor, n)
    stored = stored_events(live.settings.DATABASE_URL, doctor)
    assert len(stored) == 7  # two slots created, five tokens
    watcher = Watcher(live.stub, doctor_ids=[doctor], date=DAY, after_sequence=after)
    try:
        watcher.wait_until(lambda w: len(w.events) >= 7 - after)
        allocate(live.stub, doctor, 6)
        watcher.wait_until(lambda w: len(w.events) >= 8 - after)
        assert not any(u.WhichOneof("update") == "snapshot" for u in watcher.updates)
        assert [event_key(e) for e in watcher.events] == stored_events(live.settings.DATABASE_URL, doctor)[after:]
    finally:
        watcher.close()


def test_several_doctors_in_one_stream_with_a_resume_point_each(live: LiveServer):
    a, b = make_doctor(live.stub, "Dr A"), make_doctor(live.stub, "Dr B")
    for doctor in (a, b):
        make_slots(live.stub, doctor, ("09:00", "10:00", 3))
    for n in range(3):
        allocate(live.stub, a, n)
        allocate(live.stub, b, 10 + n)
    watcher = Watcher(live.stub, doctor_ids=[a, b], date=DAY, after_sequences={a: 2, b: 3})
    try:
        allocate(live.stub, b, 20)
        allocate(live.stub, a, 21)
        watcher.wait_until(lambda w: len(w.events_of(a)) >= 3 and len(w.events_of(b)) >= 2)
        assert [event_key(e) for e in watcher.events_of(a)] == stored_events(live.settings.DATABASE_URL, a)[2:]
        assert [event_key(e) for e in watcher.events_of(b)] == stored_events(live.settings.DATABASE_URL, b)[3:]
    finally:
        watcher.close()

    snapshots = Watcher(live.stub, doctor_ids=[a, b], date=DAY)
    try:
        snapshots.wait_until(lambda w: len(w.updates) >= 2)
        assert [(u.snapshot.doctor_id, u.snapshot.sequence) for u in snapshots.updates[:2]] == [(a, 5), (b, 5)]
    finally:
        snapshots.close()


@pytest.fixture
def quick_heartbeats(tmp_path: Path) -> Iterator[LiveServer]:
    yield from live_server(tmp_path, WATCH_HEARTBEAT_SECONDS=0.2)


@pytest.fixture
def small_buffers(tmp_path: Path) -> Iterator[LiveServer]:
    yield from live_server(tmp_path, WATCH_BUFFER_EVENTS=20)


def test_a_quiet_stream_gets_heartbeats_with_the_latest_sequence(quick_heartbeats: LiveServer):
    live = quick_heartbeats
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("09:00", "10:00", 2))
    allocate(live.stub, doctor, 1)
    watcher = Watcher(live.stub, doctor_ids=[doctor], date=DAY)
    try:
        watcher.wait_until(lambda w: sum(u.WhichOneof("update") == "heartbeat" for u in w.updates) >= 2)
        beat = next(u.heartbeat for u in watcher.updates if u.WhichOneof("update") == "heartbeat")
        assert dict(beat.latest_sequences) == {doctor: 2}
        assert beat.time.ToDatetime().year == 2030  # the service clock (the test clock here)
    finally:
        watcher.close()


def test_resume_points_outside_the_kept_history_are_out_of_range(clinic: tuple[LiveServer, str]):
    live, doctor = clinic
    for n in range(4):
        allocate(live.stub, doctor, n)

    def first_error(**request: Any) -> Any:
        try:
            next(iter(live.stub.WatchQueue(pb.WatchQueueRequest(doctor_ids=[doctor], date=DAY, **request),
                                           timeout=5)))
        except grpc.RpcError as error:
            return failure(error)
        raise AssertionError("the stream started")

    ahead = first_error(after_sequence=7)
    assert (ahead.code, ahead.reason) == (grpc.StatusCode.OUT_OF_RANGE, "SEQUENCE_AHEAD")
    engine = sqlalchemy.create_engine(live.settings.DATABASE_URL, poolclass=sqlalchemy.NullPool)
    with engine.begin() as conn:  # what pruning by age does: the oldest events go
        conn.execute(sqlalchemy.text("DELETE FROM queue_events WHERE doctor_id = :doctor AND sequence <= 3"),
                     {"doctor": doctor})
    engine.dispose()
    pruned = first_error(after_sequence=1)
    assert (pruned.code, pruned.reason) == (grpc.StatusCode.OUT_OF_RANGE, "HISTORY_NOT_KEPT")
    watcher = Watcher(live.stub, doctor_ids=[doctor], date=DAY, after_sequence=3)  # nothing kept is missed
    try:
        watcher.wait_until(lambda w: len(w.events) >= 3)
        assert [e.sequence for e in watcher.events] == [4, 5, 6]
    finally:
        watcher.close()


@pytest.mark.parametrize("request_fields, code, field", [
    ({"date": DAY}, grpc.StatusCode.INVALID_ARGUMENT, "doctor_ids"),
    ({"doctor_ids": ["DOC001"], "date": "07-01-2030"}, grpc.StatusCode.INVALID_ARGUMENT, "date"),
    ({"doctor_ids": ["DOC001", "DOC001"], "date": DAY}, grpc.StatusCode.INVALID_ARGUMENT, "doctor_ids"),
    ({"doctor_ids": ["nurse"], "date": DAY}, grpc.StatusCode.INVALID_ARGUMENT, "doctor_ids[0]"),
    ({"doctor_ids": [f"DOC{n:03d}" for n in range(1, 52)], "date": DAY}, grpc.StatusCode.INVALID_ARGUMENT,
     "doctor_ids"),
    ({"doctor_ids": ["DOC001"], "date": DAY, "after_sequence": -1}, grpc.StatusCode.INVALID_ARGUMENT,
     "after_sequence"),
    ({"doctor_ids": ["DOC001"], "date": DAY, "after_sequences": {"DOC002": 1}}, grpc.StatusCode.INVALID_ARGUMENT,
     "after_sequences[DOC002]"),
    ({"doctor_ids": ["DOC001", "DOC404"], "date": DAY}, grpc.StatusCode.NOT_FOUND, ""),
])
def test_bad_watch_requests_are_refused_with_a_clear_status(clinic: tuple[LiveServer, str], request_fields: dict,
                                                            code: grpc.StatusCode, field: str):
    live, _ = clinic
    try:
        next(iter(live.stub.WatchQueue(pb.WatchQueueRequest(**request_fields), timeout=5)))
    except grpc.RpcError as error:
        refusal = failure(error)
    else:
        raise AssertionError("the stream started")
    assert refusal.code == code and refusal.domain == "opd.v1"
    if field:
        assert field in refusal.fields
    assert live.server.service.events.watchers == 0


def _random_operations(live: LiveServer, doctors: list[str], count: int, seed: int) -> None:
    rng = random.Random(seed)
    for i in range(count):
        random_move(live.stub, rng.choice(doctors), i, rng,
                    before_no_show=lambda: live.set_time(at(rng.choice(["09:30", "10:30", "11:30"]))))


def test_fifty_watchers_all_see_the_event_table_in_order(live: LiveServer):
    doctors = [make_doctor(live.stub, f"Dr {n}") for n in range(3)]
    for doctor in doctors:
        make_slots(live.stub, doctor, ("09:00", "10:00", 3), ("10:00", "11:00", 3))

    async def watch_during_random_operations() -> tuple[list[dict[str, list[EventKey]]], dict[str, list[EventKey]]]:
        loop = asyncio.get_running_loop()
        async with grpc.aio.insecure_channel(live.address) as channel:
            stub = opd_pb2_grpc.OPDTokenServiceStub(channel)
            calls = [stub.WatchQueue(pb.WatchQueueRequest(doctor_ids=doctors, date=DAY, after_sequence=0))
                     for _ in range(50)]
            seen: list[dict[str, list[EventKey]]] = [{d: [] for d in doctors} for _ in calls]

            async def read(call: Any, into: dict[str, list[EventKey]]) -> None:
                async for update in call:
                    if update.WhichOneof("update") == "event":
                        into[update.event.doctor_id].append(event_key(update.event))

            readers = [asyncio.ensure_future(read(c, s)) for c, s in zip(calls, seen)]
            await loop.run_in_executor(None, _random_operations, live, doctors, 300, 7)
            table = {d: stored_events(live.settings.DATABASE_URL, d) for d in doctors}
            deadline = loop.time() + 20
            while loop.time() < deadline and any(len(s[d]) < len(table[d]) for s in seen for d in doctors):
                await asyncio.sleep(0.05)
            for call in calls:
                call.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            return seen, table

    seen, table = asyncio.run(watch_during_random_operations())
    for doctor in doctors:
        assert [k[0] for k in table[doctor]] == list(range(1, len(table[doctor]) + 1))
        assert len(table[doctor]) > 20
        for watcher in seen:
            assert watcher[doctor] == table[doctor]


def test_a_cancelled_stream_leaves_no_task_thread_or_buffer_behind(clinic: tuple[LiveServer, str]):
    live, doctor = clinic
    hub = live.server.service.events
    loop = live._loop
    threads_before = _threads_outside_the_engine_pool()
    tasks_before = asyncio.run_coroutine_threadsafe(_task_count(), loop).result()
    watchers = [Watcher(live.stub, doctor_ids=[doctor], date=DAY) for _ in range(20)]
    for w in watchers:
        w.wait_until(lambda w: len(w.updates) >= 1)
    allocate(live.stub, doctor, 1)
    assert hub.watchers == 20
    assert asyncio.run_coroutine_threadsafe(_task_count(), loop).result() >= tasks_before + 20
    for w in watchers:
        w.close()
    deadline = time.monotonic() + 5
    while (hub.watchers or asyncio.run_coroutine_threadsafe(_task_count(), loop).result() > tasks_before) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert hub.watchers == 0
    assert asyncio.run_coroutine_threadsafe(_task_count(), loop).result() <= tasks_before
    assert _threads_outside_the_engine_pool() <= threads_before  # a stream costs a coroutine, not a thread
    allocate(live.stub, doctor, 2)  # publishing to nobody is fine


def _threads_outside_the_engine_pool() -> int:
    """Threads other than the engine's bounded pool (PostgreSQL's snapshot reads start its threads on demand) and the
    event loop's default executor, bounded too, whose threads the server's background tasks (history pruning, key
    reloads) start when they first run, which may be after this test's first count (one CI run: 6 against 5)."""
    return sum(not t.name.startswith(("opd-engine", "asyncio_")) for t in threading.enumerate())


async def _task_count() -> int:
    return len(asyncio.all_tasks())


def test_a_watcher_that_stops_reading_is_told_to_resume_and_slows_nobody(small_buffers: LiveServer):
    live = small_buffers
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("09:00", "12:00", 1000))

    async def run() -> tuple[Any, int, list[int]]:
        # the slow board's transport buffers little, so the server's writes to it block at once
        tight = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
        async with grpc.aio.insecure_channel(live.address, options=tight) as slow_channel, \
                grpc.aio.insecure_channel(live.address) as channel:
            slow = opd_pb2_grpc.OPDTokenServiceStub(slow_channel).WatchQueue(
                pb.WatchQueueRequest(doctor_ids=[doctor], date=DAY))
            fast = opd_pb2_grpc.OPDTokenServiceStub(channel).WatchQueue(
                pb.WatchQueueRequest(doctor_ids=[doctor], date=DAY))
            assert (await slow.read()).snapshot.sequence == (await fast.read()).snapshot.sequence == 1
            changes = asyncio.get_running_loop().run_in_executor(
                None, lambda: [allocate(live.stub, doctor, n) for n in range(300)])
            fast_sequences = []
            while len(fast_sequences) < 300:
                fast_sequences.append((await fast.read()).event.sequence)
            await changes
            fast.cancel()
            received = 0
            try:
                while (update := await slow.read()) is not grpc.aio.EOF:
                    received = update.event.sequence
            except grpc.aio.AioRpcError as error:
                return failure(error), received, fast_sequences
            raise AssertionError("the slow stream ended without an error")

    refusal, last_read, fast_sequences = asyncio.run(run())
    assert (refusal.code, refusal.reason) == (grpc.StatusCode.ABORTED, "WATCHER_FELL_BEHIND")
    assert fast_sequences == list(range(2, 302))  # the other board saw every event, in order
    assert live.server.service.events.watchers == 0
    resumed = Watcher(live.stub, doctor_ids=[doctor], date=DAY, after_sequence=last_read)
    try:  # resuming where it stopped, it gets the rest from the event table
        resumed.wait_until(lambda w: len(w.events) >= 301 - last_read)
        assert [e.sequence for e in resumed.events] == list(range(last_read + 1, 302))
    finally:
        resumed.close()


def test_shutdown_tells_watchers_to_reconnect(tmp_path: Path):
    with fresh_database(tmp_path) as url:
        _shutdown_tells_watchers_to_reconnect(LiveServer(url))


def _shutdown_tells_watchers_to_reconnect(server: LiveServer) -> None:
    doctor = make_doctor(server.stub)
    with grpc.insecure_channel(server.address) as channel:
        watcher = Watcher(opd_pb2_grpc.OPDTokenServiceStub(channel), doctor_ids=[doctor], date=DAY)
        watcher.wait_until(lambda w: len(w.updates) >= 1)
        server.close()
        watcher.wait_until(lambda w: w.error is not None)
        assert watcher.error is not None
        refusal = failure(watcher.error)
        assert (refusal.code, refusal.reason) == (grpc.StatusCode.UNAVAILABLE, "SERVER_SHUTTING_DOWN")
