"""A graceful stop under load (issue 5): SIGTERM while 16 clients change queues. Every call is answered OK or
refused UNAVAILABLE (retryable); queue watchers are told to reconnect; health says NOT_SERVING before its stream
ends, OK; the process exits 0 within its grace period. On a restarted server every request refused UNAVAILABLE,
sent again with the same request_id, is answered; what was answered OK is stored as answered; the invariants hold.
And a health Watch held open alone (as a load balancer holds one) does not keep a stop waiting for its grace."""

from __future__ import annotations

import asyncio
import collections
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from opd_grpc._gen.opd.v1 import opd_pb2 as pb
from opd_grpc._gen.opd.v1 import opd_pb2_grpc, test_clock_pb2, test_clock_pb2_grpc
from opd_grpc.api.convert import timestamp
from opd_grpc.process import ServerProcess
from tests.support import (DAY, MORNING, RpcFailure, all_tokens, failure, fresh_database, make_doctor, make_slots,
                           new_request_id, patient, spec_violations, stored_events)

GRACE_SECONDS = 5.0
EXIT_MARGIN_SECONDS = 3.0
LOAD_SECONDS = 1.0
CLIENTS = 16
WATCHERS = 3
DOCTORS = 4
CALL_TIMEOUT = 60.0  # far past the grace: a call cut short is the server's doing, not this deadline's
RETRY_PAUSE = 0.05
SETTINGS = {"METRICS_LISTEN": "", "SHUTDOWN_GRACE_SECONDS": GRACE_SECONDS,
            "MAX_WAITLIST_SIZE": 100_000,  # no WAITLIST_FULL: every request this load makes is one that succeeds
            "WATCH_BUFFER_EVENTS": 100_000}  # nor WATCHER_FELL_BEHIND: a watch ends only with the shutdown
WATCHED_GRACE_SECONDS = 20.0  # a stop that waited for the health Watch would take all of it
WATCHED_STOP_SECONDS = 5.0
HOLDING = {pb.STATUS_CONFIRMED, pb.STATUS_WAITLISTED, pb.STATUS_CHECKED_IN}
OK, UNAVAILABLE = grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE


@dataclass
class Request:
    """One logical change with its request_id, each attempt's status, and its answer once it came."""

    method: str
    message: Message
    attempts: list[tuple[grpc.StatusCode, str]] = field(default_factory=list)  # (code, details)
    answer: Message | None = None


@dataclass
class Watch:
    """A WatchQueue stream: the events it handed over, how it ended and when."""

    events: list[tuple[str, int, str, str, str]] = field(default_factory=list)  # as stored_events, with the doctor
    end: RpcFailure | None = None
    ended_at: float = 0.0


@dataclass
class Health:
    """A health Watch stream: the statuses it was sent, and how it ended (None: OK)."""

    statuses: list[int] = field(default_factory=list)
    end: RpcFailure | None = None


@dataclass
class Run:
    requests: list[Request] = field(default_factory=list)
    reads: list[tuple[grpc.StatusCode, str]] = field(default_factory=list)
    watches: list[Watch] = field(default_factory=list)
    health: Health = field(default_factory=Health)
    sigterm_at: float = 0.0
    exited_at: float = 0.0
    exit_code: int | None = None


def test_sigterm_under_load_leaves_no_half_done_change_and_every_refusal_retryable(tmp_path: Path):
    with fresh_database(tmp_path) as database:
        run, doctors = _shutdown_under_load(database)
        _check_the_calls(run)
        _check_the_streams(run, database)
        with ServerProcess(database, settings=SETTINGS) as restarted, \
                grpc.insecure_channel(restarted.address) as channel:
            test_clock_pb2_grpc.TestClockServiceStub(channel).SetTime(
                test_clock_pb2.SetTimeRequest(time=timestamp(MORNING)))
            stub = opd_pb2_grpc.OPDTokenServiceStub(channel)
            retried = _retry_unanswered(stub, run)
            assert retried, "no call was refused during the stop: the test did not reach the refusals"
            _check_the_store(stub, database, doctors, run)


def test_an_open_health_watch_is_told_not_serving_then_ends_ok_and_does_not_hold_the_stop(tmp_path: Path):
    """What a load balancer holds open: on SIGTERM the health Watch is sent NOT_SERVING, then its stream ends OK,
    so gRPC's stop has nothing left to wait for and the process exits well within its grace."""
    with fresh_database(tmp_path) as database:
        server = ServerProcess(database, settings={"METRICS_LISTEN": "",
                                                   "SHUTDOWN_GRACE_SECONDS": WATCHED_GRACE_SECONDS})
        server.start()
        try:
            health, took, exit_code = asyncio.run(_sigterm_while_health_is_watched(server))
        finally:
            server.kill()
    assert [health_pb2.HealthCheckResponse.ServingStatus.Name(s) for s in health.statuses] == \
        ["SERVING", "NOT_SERVING"], health.statuses
    assert health.end is None, f"the health Watch ended {health.end}, not OK"
    assert exit_code == 0, f"the server exited with {exit_code}"
    assert took < WATCHED_STOP_SECONDS, \
        f"the server took {took:.1f} s to exit after SIGTERM (grace {WATCHED_GRACE_SECONDS:.0f} s)"


async def _sigterm_while_health_is_watched(server: ServerProcess) -> tuple[Health, float, int]:
    """The Watch, how long from SIGTERM to the process's exit, and its exit code."""
    async with grpc.aio.insecure_channel(server.address) as channel:
        started = asyncio.Event()
        watching = asyncio.create_task(_watch_health(health_pb2_grpc.HealthStub(channel), started))
        await asyncio.wait_for(started.wait(), 10)
        sigterm_at = time.monotonic()
        exit_code = await asyncio.to_thread(server.stop, WATCHED_GRACE_SECONDS + 30)
        took = time.monotonic() - sigterm_at
        return await watching, took, exit_code


def _shutdown_under_load(database: str) -> tuple[Run, list[str]]:
    """Seeds doctors, starts the load, watchers and a health watch, sends SIGTERM after LOAD_SECONDS and keeps
    calling until the process is gone."""
    server = ServerProcess(database, settings=SETTINGS)
    server.start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            test_clock_pb2_grpc.TestClockServiceStub(channel).SetTime(
                test_clock_pb2.SetTimeRequest(time=timestamp(MORNING)))
            stub = opd_pb2_grpc.OPDTokenServiceStub(channel)
            doctors = [make_doctor(stub, f"Dr {n}") for n in range(DOCTORS)]
            for doctor in doctors:  # small slots: waitlists and promotions are part of the load
                make_slots(stub, doctor, ("09:00", "10:00", 20), ("10:00", "12:00", 40))
        return asyncio.run(_load_then_sigterm(server, doctors)), doctors
    finally:
        server.kill()


async def _load_then_sigterm(server: ServerProcess, doctors: list[str]) -> Run:
    run = Run()
    gone = asyncio.Event()
    assert server.proc is not None
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = opd_pb2_grpc.OPDTokenServiceStub(channel)
        watching = [asyncio.Event() for _ in range(WATCHERS + 1)]
        streams = [asyncio.create_task(_watch(stub, doctors, started)) for started in watching[:-1]]
        health = asyncio.create_task(_watch_health(health_pb2_grpc.HealthStub(channel), watching[-1]))
        for started in watching:
            await asyncio.wait_for(started.wait(), 10)
        clients = [asyncio.create_task(_client(stub, doctors, random.Random(n), 100_000 * n, gone, run))
                   for n in range(CLIENTS)]
        await asyncio.sleep(LOAD_SECONDS)
        run.sigterm_at = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        run.exit_code = await asyncio.to_thread(server.proc.wait, GRACE_SECONDS + 30)
        run.exited_at = time.monotonic()
        gone.set()
        await asyncio.gather(*clients)
        run.watches = list(await asyncio.gather(*streams))
        run.health = await health
    return run


async def _client(stub: opd_pb2_grpc.OPDTokenServiceStub, doctors: list[str], rng: random.Random, first: int,
                  gone: asyncio.Event, run: Run) -> None:
    """A reception desk as fast as it goes: allocations, check-ins, cancellations of its own tokens (so that
    none is ever refused), and now and then a read."""
    held: dict[str, int] = {}  # token_id -> status, for this desk's tokens whose every change was answered
    n = first
    while not gone.is_set():
        move = rng.random()
        if held and move < 0.1:
            try:
                await stub.GetToken(pb.GetTokenRequest(token_id=rng.choice(list(held))), timeout=CALL_TIMEOUT)
                run.reads.append((OK, ""))
            except grpc.aio.AioRpcError as error:
                run.reads.append((error.code(), error.details() or ""))
            continue
        if held and move < 0.55:
            token_id = rng.choice(list(held))
            status = held.pop(token_id)  # back in `held` only once the change is answered
            if status == pb.STATUS_CONFIRMED and rng.random() < 0.6:
                request = Request("CheckInToken", pb.CheckInTokenRequest(token_id=token_id,
                                                                         request_id=new_request_id()))
            else:
                request = Request("CancelToken", pb.CancelTokenRequest(token_id=token_id, request_id=new_request_id()))
        else:
            n += 1
            request = Request("AllocateToken", pb.AllocateTokenRequest(
                patient=patient(n), doctor_id=rng.choice(doctors), date=DAY, source=pb.SOURCE_WALK_IN,
                request_id=new_request_id()))
        run.requests.append(request)
        if (answer := await _send(stub, request, gone)) is not None and answer.token.status in HOLDING:
            held[answer.token.token_id] = answer.token.status


async def _send(stub: opd_pb2_grpc.OPDTokenServiceStub, request: Request, gone: asyncio.Event) -> Message | None:
    """As a client that retries does: the same request, same request_id, again after UNAVAILABLE, until it is
    answered or the server is gone (None)."""
    while True:
        try:
            request.answer = await getattr(stub, request.method)(request.message, timeout=CALL_TIMEOUT)
            request.attempts.append((OK, ""))
            return request.answer
        except grpc.aio.AioRpcError as error:
            request.attempts.append((error.code(), error.details() or ""))
            if error.code() != UNAVAILABLE or gone.is_set():
                return None
        await asyncio.sleep(RETRY_PAUSE)


async def _watch(stub: opd_pb2_grpc.OPDTokenServiceStub, doctors: list[str], started: asyncio.Event) -> Watch:
    watch = Watch()
    call = stub.WatchQueue(pb.WatchQueueRequest(doctor_ids=doctors, date=DAY))
    try:
        async for update in call:
            started.set()
            if update.WhichOneof("update") == "event":
                event = update.event
                watch.events.append((event.doctor_id, event.sequence, pb.EventKind.Name(event.kind),
                                     event.token.token_id, pb.Status.Name(event.token.status)))
    except grpc.aio.AioRpcError as error:
        watch.end = failure(error)
    watch.ended_at = time.monotonic()
    return watch


async def _watch_health(stub: health_pb2_grpc.HealthStub, started: asyncio.Event) -> Health:
    health = Health()
    try:
        async for answer in stub.Watch(health_pb2.HealthCheckRequest(service="")):
            started.set()
            health.statuses.append(answer.status)
    except grpc.aio.AioRpcError as error:
        health.end = failure(error)
    return health


def _check_the_calls(run: Run) -> None:
    """Every attempt of every call, before and during the stop: OK or UNAVAILABLE, nothing else."""
    answered = sum(1 for r in run.requests if r.answer is not None)
    assert answered >= 50, f"only {answered} changes answered: the load did not run"
    others = collections.Counter((r.method, code.name, details) for r in run.requests for code, details in r.attempts
                                 if code not in (OK, UNAVAILABLE))
    others.update(("GetToken", code.name, details) for code, details in run.reads if code not in (OK, UNAVAILABLE))
    assert not others, f"calls ended neither OK nor UNAVAILABLE: {dict(others)}"
    assert run.exit_code == 0, f"the server exited with {run.exit_code}"
    took = run.exited_at - run.sigterm_at
    assert took <= GRACE_SECONDS + EXIT_MARGIN_SECONDS, f"the server took {took:.1f} s to exit after SIGTERM"


def _check_the_streams(run: Run, database: str) -> None:
    """Each queue watcher was told to reconnect, within the grace, and had been handed only committed events;
    health said NOT_SERVING, then its stream ended OK."""
    for watch in run.watches:
        assert watch.end is not None and (watch.end.code, watch.end.reason) == (UNAVAILABLE, "SERVER_SHUTTING_DOWN"), \
            watch.end
        assert watch.ended_at - run.sigterm_at < GRACE_SECONDS
    table = {(doctor, seq): (kind, token, status) for doctor in {e[0] for w in run.watches for e in w.events}
             for seq, kind, token, status in stored_events(database, doctor)}
    for watch in run.watches:
        assert watch.events, "a watcher saw no event under load"
        assert [table.get(e[:2]) for e in watch.events] == [e[2:] for e in watch.events]
    statuses = [health_pb2.HealthCheckResponse.ServingStatus.Name(s) for s in run.health.statuses]
    assert statuses == ["SERVING", "NOT_SERVING"], statuses
    assert run.health.end is None, f"the health Watch ended {run.health.end}, not OK"


def _retry_unanswered(stub: opd_pb2_grpc.OPDTokenServiceStub, run: Run) -> list[Request]:
    """Sends again, same request_id and body, each change last refused UNAVAILABLE: now each is answered."""
    retried = [r for r in run.requests if r.answer is None]
    refused = []
    for request in retried:
        try:
            request.answer = getattr(stub, request.method)(request.message, timeout=CALL_TIMEOUT)
        except grpc.RpcError as error:
            refused.append((request.method, failure(error)))
    assert not refused, f"retries after the restart were refused: {refused}"
    return retried


def _check_the_store(stub: opd_pb2_grpc.OPDTokenServiceStub, database: str, doctors: list[str], run: Run) -> None:
    """Each token is as its last answer said (a waitlisted one may since have been promoted), each allocation made
    exactly one token, and SPEC §3's invariants hold, events included."""
    expected: dict[str, set[int]] = {}
    allocated: dict[str, tuple[int, str]] = {}
    for request in run.requests:  # a token's changes come from one desk, one after another, in this order
        assert request.answer is not None
        token = request.answer.token
        expected[token.token_id] = {token.status}
        if request.method == "AllocateToken":
            allocated[token.token_id] = (token.token_number, token.slot_id)
            if token.status == pb.STATUS_WAITLISTED:
                expected[token.token_id].add(pb.STATUS_CONFIRMED)
    stored = {t.token_id: t for doctor in doctors for t in all_tokens(stub, doctor)}
    assert len(allocated) == sum(r.method == "AllocateToken" for r in run.requests)
    assert stored.keys() == allocated.keys()
    wrong = {i: (pb.Status.Name(t.status), sorted(pb.Status.Name(s) for s in expected[i]))
             for i, t in stored.items() if t.status not in expected[i]}
    assert not wrong, f"tokens not as answered (stored, answered): {wrong}"
    assert {i: (t.token_number, t.slot_id) for i, t in stored.items()} == allocated
    for doctor in doctors:
        assert spec_violations(stub, doctor) == []
        events = stored_events(database, doctor)
        assert [seq for seq, *_ in events] == list(range(1, len(events) + 1))
        last_event = {token_id: status for _, _, token_id, status in events if token_id}
        assert last_event == {i: pb.Status.Name(t.status) for i, t in stored.items() if t.doctor_id == doctor}
