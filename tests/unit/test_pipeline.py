"""The call pipeline (opd_grpc/api/interceptors.py) around a handler that records whether it ran, with a fake
grpc.aio ServicerContext (grpcio-testing serves no asyncio servers): who is refused, with what, and that a
caller whose deadline has passed gets no work done; every call is counted once."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from opd_grpc._gen.opd.v1 import opd_pb2 as pb
from opd_grpc.api import auth
from opd_grpc.api.interceptors import CallPipeline
from opd_grpc.api.limits import RateLimiter, calls_in_flight, watchers
from opd_grpc.api.runner import EngineRunner
from opd_grpc.api.status import from_engine_error
from opd_grpc.engine.access import ANONYMOUS, Actor, ApiKey, KeyRing, new_key
from opd_grpc.engine.errors import EngineError, NotFound

pytestmark = pytest.mark.backend_independent

GET_DOCTOR = auth.OPD + "GetDoctor"  # every role
CREATE_DOCTOR = auth.OPD + "CreateDoctor"  # admin only
WATCH_QUEUE = auth.OPD + "WatchQueue"
NOW = dt.datetime(2030, 1, 7, 7, 0, tzinfo=dt.timezone.utc)
ADMIN_KEY, ADMIN_TEXT = new_key("admin desk", "admin", NOW)
DISPLAY_KEY, DISPLAY_TEXT = new_key("hall screen", "display", NOW)
OK = grpc.StatusCode.OK
REQUEST_ID = "5f0c6b1e-2d8a-4c3b-9e47-0a1b2c3d4e5f"


class FakeContext:
    """What the pipeline reads of a grpc.aio ServicerContext; `abort` ends the call as gRPC's does, by raising."""

    def __init__(self, key: str = "", time_remaining: float | None = None, cancelled: bool = False):
        self.metadata = (("authorization", f"Bearer {key}"),) if key else ()
        self.unsendable = False  # gRPC's core ended the call: a status fails to go out, as ExecuteBatchError
        self.remaining = time_remaining
        self.gone = cancelled
        self.status: grpc.StatusCode | None = None
        self.trailers: tuple[tuple[str, Any], ...] = ()

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    def time_remaining(self) -> float | None:
        return self.remaining

    def cancelled(self) -> bool:
        return self.gone

    def peer(self) -> str:
        return "ipv4:127.0.0.1:40000"

    def code(self) -> grpc.StatusCode | None:
        return self.status

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> None:
        assert self.status is None, "a call was aborted twice"
        self.status, self.trailers = code, tuple(trailing_metadata)
        if self.unsendable:
            raise RuntimeError('Failed "execute_batch"')
        raise grpc.aio.AbortError()

    async def abort_with_status(self, status: grpc.Status) -> None:
        await self.abort(status.code, status.details, status.trailing_metadata)

    def reason(self) -> str:
        """The ErrorInfo reason of the status the call was ended with."""
        for name, value in self.trailers:
            if name == "grpc-status-details-bin":
                for detail in status_pb2.Status.FromString(value).details:
                    info = error_details_pb2.ErrorInfo()
                    if detail.Unpack(info):
                        return info.reason
        return ""


@dataclass
class Recorded:
    """What the pipeline reported and what the handler saw."""

    denied: list[tuple[Actor, str, str, str]] = field(default_factory=list)  # actor, method, request_id, reason
    finished: list[tuple[str, grpc.StatusCode, Actor, str]] = field(default_factory=list)  # method, code, ...
    caller_gone: list[bool] = field(default_factory=list)  # for each of `finished`
    ran: list[Actor] = field(default_factory=list)  # the caller, as the handler saw it, each time it ran


@dataclass(frozen=True)
class _Details:
    method: str
    invocation_metadata: tuple[tuple[str, str], ...]


class Harness:
    """A pipeline around three handlers (GetDoctor, CreateDoctor, WatchQueue) that record each run; with `hold`
    set, a handler that starts waits for `release` before it ends."""

    def __init__(self, pipeline: CallPipeline, seen: Recorded):
        self.pipeline = pipeline
        self.seen = seen
        self.hold = False
        self.release = asyncio.Event()
        self.handlers = {
            GET_DOCTOR: grpc.unary_unary_rpc_method_handler(
                self._get_doctor, request_deserializer=pb.GetDoctorRequest.FromString,
                response_serializer=pb.GetDoctorResponse.SerializeToString),
            CREATE_DOCTOR: grpc.unary_unary_rpc_method_handler(
                self._create_doctor, request_deserializer=pb.CreateDoctorRequest.FromString,
                response_serializer=pb.CreateDoctorResponse.SerializeToString),
            WATCH_QUEUE: grpc.unary_stream_rpc_method_handler(
                self._watch, request_deserializer=pb.WatchQueueRequest.FromString,
                response_serializer=pb.WatchQueueResponse.SerializeToString),
        }

    async def unary(self, method: str, request: bytes, context: FakeContext) -> Any:
        """One unary call: its answer, the status code it ended with, or UNANSWERED; once its access-log line and
        metrics, which follow the answer on the loop's next turn, are recorded too."""
        wrapped = await self.pipeline.intercept_service(self._continuation, _Details(method, context.metadata))
        try:
            return await wrapped.unary_unary(request, context)
        except grpc.aio.AbortError:
            return context.status
        except asyncio.CancelledError:
            return _unanswered()
        finally:
            await asyncio.sleep(0)

    async def stream(self, request: bytes, context: FakeContext) -> list[Any] | grpc.StatusCode | str | None:
        """One WatchQueue stream, read to its end: its items, the status code it ended with, or UNANSWERED (its
        access-log line and metrics recorded too, as for `unary`)."""
        wrapped = await self.pipeline.intercept_service(self._continuation, _Details(WATCH_QUEUE, context.metadata))
        try:
            return [item async for item in wrapped.unary_stream(request, context)]
        except grpc.aio.AbortError:
            return context.status
        except asyncio.CancelledError:
            return _unanswered()
        finally:
            await asyncio.sleep(0)

    async def _continuation(self, details: _Details) -> grpc.RpcMethodHandler:
        return self.handlers[details.method]

    async def _get_doctor(self, request: pb.GetDoctorRequest, context: FakeContext) -> pb.GetDoctorResponse:
        self.seen.ran.append(auth.CALLER.get())
        if self.hold:
            await self.release.wait()
        if request.doctor_id == "missing":
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such doctor")
        if request.doctor_id == "bug":
            raise ValueError("Value out of range: 2147483652")  # e.g. a reply field that cannot hold a value
        return pb.GetDoctorResponse(doctor=pb.Doctor(doctor_id=request.doctor_id))

    async def _create_doctor(self, request: pb.CreateDoctorRequest, context: FakeContext) -> pb.CreateDoctorResponse:
        self.seen.ran.append(auth.CALLER.get())
        return pb.CreateDoctorResponse(doctor=pb.Doctor(doctor_id="D1", name=request.name))

    async def _watch(self, request: pb.WatchQueueRequest, context: FakeContext) -> AsyncIterator[pb.WatchQueueResponse]:
        self.seen.ran.append(auth.CALLER.get())
        yield pb.WatchQueueResponse()
        if self.hold:
            await self.release.wait()


UNANSWERED = "ended without an answer, as a cancelled call"


def _unanswered() -> str:
    """A call the pipeline ended as cancelled without an answer (its caller had gone); a real cancellation of the
    test's own task goes on."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
    return UNANSWERED


def harness(keys: tuple[ApiKey, ...] = (), rate: int = 0, calls: int = 10, streams: int = 10,
            clock: Any = None) -> Harness:
    seen = Recorded()

    async def denied(actor: Actor, method: str, request_id: str, refusal: EngineError, peer: str) -> None:
        seen.denied.append((actor, method, request_id, refusal.reason))

    def finished(method: str, code: grpc.StatusCode, seconds: float, actor: Actor, request_id: str,
                 peer: str, caller_gone: bool) -> None:
        assert seconds >= 0 and peer == "ipv4:127.0.0.1:40000"
        seen.finished.append((method, code, actor, request_id))
        seen.caller_gone.append(caller_gone)

    limiter = RateLimiter(rate, clock=clock or (lambda: 0.0))
    pipeline = CallPipeline(auth.Gate(KeyRing(list(keys))), limiter, calls_in_flight(calls), watchers(streams),
                            MAX_MESSAGE_BYTES, denied, finished)
    return Harness(pipeline, seen)


MAX_MESSAGE_BYTES = 1000


def get_doctor(doctor_id: str = "D1") -> bytes:
    return pb.GetDoctorRequest(doctor_id=doctor_id).SerializeToString()


def codes(seen: Recorded) -> list[grpc.StatusCode]:
    return [code for _, code, _, _ in seen.finished]


# ---- admitted calls -----------------------------------------------------------------------------------------


def test_an_admitted_call_runs_once_as_its_caller_and_is_counted_once_as_ok():
    async def scenario() -> None:
        h = harness(keys=(ADMIN_KEY,))
        answer = await h.unary(CREATE_DOCTOR, pb.CreateDoctorRequest(name="Dr Rao", request_id=REQUEST_ID)
                               .SerializeToString(), FakeContext(ADMIN_TEXT, time_remaining=5.0))
        assert answer.doctor.name == "Dr Rao"
        assert h.seen.ran == [ADMIN_KEY.actor]
        assert h.seen.finished == [("CreateDoctor", OK, ADMIN_KEY.actor, REQUEST_ID)]
        assert h.seen.denied == []

    asyncio.run(scenario())


def test_a_request_id_that_is_not_a_uuid_stays_out_of_the_access_log_and_the_audit_log():
    """A caller may put anything there, a phone number say; no log line may show it (SPEC §13)."""
    async def scenario() -> None:
        h = harness(keys=(ADMIN_KEY, DISPLAY_KEY))
        request = pb.CreateDoctorRequest(name="Dr Rao", request_id="+91-98450-00001").SerializeToString()
        await h.unary(CREATE_DOCTOR, request, FakeContext(ADMIN_TEXT))
        await h.unary(CREATE_DOCTOR, request, FakeContext(DISPLAY_TEXT))
        assert [request_id for _, _, _, request_id in h.seen.finished] == ["", ""]
        assert [request_id for _, _, request_id, _ in h.seen.denied] == [""]

    asyncio.run(scenario())


def test_a_keyless_development_server_admits_callers_without_a_key():
    async def scenario() -> None:
        h = harness()
        answer = await h.unary(CREATE_DOCTOR, pb.CreateDoctorRequest(name="Dr Rao").SerializeToString(),
                               FakeContext())
        assert answer.doctor.doctor_id == "D1"
        assert h.seen.ran == [ANONYMOUS]
        assert codes(h.seen) == [OK]

    asyncio.run(scenario())


def test_a_status_the_handler_ends_with_is_the_one_counted():
    async def scenario() -> None:
        h = harness()
        assert await h.unary(GET_DOCTOR, get_doctor("missing"), FakeContext()) == grpc.StatusCode.NOT_FOUND
        assert codes(h.seen) == [grpc.StatusCode.NOT_FOUND]

    asyncio.run(scenario())


def test_a_bug_in_a_handler_is_internal_with_a_reason_not_unknown_with_its_text():
    async def scenario() -> None:
        h = harness()
        context = FakeContext()
        assert await h.unary(GET_DOCTOR, get_doctor("bug"), context) == grpc.StatusCode.INTERNAL
        assert context.reason() == "INTERNAL_ERROR"
        assert codes(h.seen) == [grpc.StatusCode.INTERNAL]

    asyncio.run(scenario())


def test_health_reflection_and_unknown_methods_pass_the_pipeline_untouched():
    async def scenario() -> None:
        h = harness(keys=(ADMIN_KEY,), rate=1)
        health = grpc.unary_unary_rpc_method_handler(lambda request, context: None)

        async def to_health(details: Any) -> Any:
            return health

        async def to_nothing(details: Any) -> None:
            return None

        check = _Details("/grpc.health.v1.Health/Check", ())
        for _ in range(3):  # no key and past the rate limit: still the health service's own handler
            assert await h.pipeline.intercept_service(to_health, check) is health
        assert await h.pipeline.intercept_service(to_nothing, _Details(auth.OPD + "NoSuchMethod", ())) is None
        assert h.seen.finished == [] and h.seen.denied == []

    asyncio.run(scenario())


# ---- refusals: never the handler, counted once, denials audited once ----------------------------------------


def test_a_call_without_a_key_is_unauthenticated_and_audited_once():
    async def scenario() -> None:
        h = harness(keys=(ADMIN_KEY,))
        context = FakeContext()
        assert await h.unary(GET_DOCTOR, get_doctor(), context) == grpc.StatusCode.UNAUTHENTICATED
        assert context.reason() == "API_KEY_MISSING"
        assert h.seen.ran == []
        assert h.seen.denied == [(ANONYMOUS, "GetDoctor", "", "API_KEY_MISSING")]
        assert h.seen.finished == [("GetDoctor", grpc.StatusCode.UNAUTHENTICATED, ANONYMOUS, "")]

    asyncio.run(scenario())


def test_a_call_with_an_unknown_key_is_unauthenticated():
    async def scenario() -> None:
        h = harness(keys=(ADMIN_KEY,))
        context = FakeContext(DISPLAY_TEXT)  # a well-formed key that this server does not hold
        assert await h.unary(GET_DOCTOR, get_doctor(), context) == grpc.StatusCode.UNAUTHENTICATED
        assert context.reason() == "API_KEY_INVALID"
        assert h.seen.ran == [] and len(h.seen.denied) == 1
        assert codes(h.seen) == [grpc.StatusCode.UNAUTHENTICATED]

    asyncio.run(scenario())


def test_a_role_that_may_not_make_the_call_is_denied_and_audited_under_its_key():
    async def scenario() -> None:
        h = harness(keys=(ADMIN_KEY, DISPLAY_KEY))
        context = FakeContext(DISPLAY_TEXT)
        request = pb.CreateDoctorRequest(name="Dr Rao", request_id=REQUEST_ID).SerializeToString()
        assert await h.unary(CREATE_DOCTOR, request, context) == grpc.StatusCode.PERMISSION_DENIED
        assert context.reason() == "ROLE_NOT_ALLOWED"
        assert h.seen.ran == []
        assert h.seen.denied == [(DISPLAY_KEY.actor, "CreateDoctor", REQUEST_ID, "ROLE_NOT_ALLOWED")]
        assert h.seen.finished == [("CreateDoctor", grpc.StatusCode.PERMISSION_DENIED, DISPLAY_KEY.actor,
                                    REQUEST_ID)]

    asyncio.run(scenario())


@pytest.mark.parametrize("raw", [b"\x0a\x05ab", b"\x0a\x02\xff\xfe", b"\xff"],
                         ids=["truncated", "string-not-utf8", "bad-tag"])
def test_bytes_that_are_not_the_request_message_are_invalid_argument_not_unknown(raw: bytes):
    async def scenario() -> None:
        h = harness(keys=(ADMIN_KEY,))
        context = FakeContext(ADMIN_TEXT)
        assert await h.unary(GET_DOCTOR, raw, context) == grpc.StatusCode.INVALID_ARGUMENT
        assert context.reason() == "MALFORMED_REQUEST"
        assert h.seen.ran == [] and h.seen.denied == []
        assert h.seen.finished == [("GetDoctor", grpc.StatusCode.INVALID_ARGUMENT, ADMIN_KEY.actor, "")]

    asyncio.run(scenario())


def test_a_key_past_its_rate_is_refused_with_resource_exhausted_and_is_not_audited_as_denied():
    async def scenario() -> None:
        clock = [0.0]
        h = harness(keys=(DISPLAY_KEY,), rate=2, clock=lambda: clock[0])
        answers = [await h.unary(GET_DOCTOR, get_doctor(), FakeContext(DISPLAY_TEXT)) for _ in range(3)]
        assert [isinstance(a, pb.GetDoctorResponse) for a in answers] == [True, True, False]
        assert answers[2] == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert len(h.seen.ran) == 2 and h.seen.denied == []
        assert codes(h.seen) == [OK, OK, grpc.StatusCode.RESOURCE_EXHAUSTED]
        clock[0] += 0.5  # one call's worth at 2 a second
        assert isinstance(await h.unary(GET_DOCTOR, get_doctor(), FakeContext(DISPLAY_TEXT)), pb.GetDoctorResponse)

    asyncio.run(scenario())


def test_the_rate_limit_reason_reaches_the_caller():
    async def scenario() -> None:
        h = harness(rate=1)
        await h.unary(GET_DOCTOR, get_doctor(), FakeContext())
        context = FakeContext()
        assert await h.unary(GET_DOCTOR, get_doctor(), context) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert context.reason() == "RATE_LIMITED"

    asyncio.run(scenario())


# ---- deadlines: a caller that has gone gets no work done ----------------------------------------------------


@pytest.mark.parametrize("context", [FakeContext(time_remaining=0.0), FakeContext(time_remaining=-0.5),
                                     FakeContext(time_remaining=2.0, cancelled=True)],
                         ids=["deadline-now", "deadline-past", "cancelled"])
def test_a_call_whose_caller_is_gone_before_it_starts_does_not_run(context: FakeContext):
    async def scenario() -> None:
        h = harness()
        assert await h.unary(CREATE_DOCTOR, pb.CreateDoctorRequest(name="Dr Rao").SerializeToString(),
                             context) == UNANSWERED
        assert h.seen.ran == []
        assert codes(h.seen) == [grpc.StatusCode.DEADLINE_EXCEEDED] and h.seen.caller_gone == [True]

    asyncio.run(scenario())


def test_a_watch_whose_deadline_has_passed_does_not_open():
    async def scenario() -> None:
        h = harness()
        answer = await h.stream(pb.WatchQueueRequest().SerializeToString(), FakeContext(time_remaining=0.0))
        assert answer == UNANSWERED
        assert h.seen.ran == [] and h.pipeline.watchers.count == 0
        assert codes(h.seen) == [grpc.StatusCode.DEADLINE_EXCEEDED]

    asyncio.run(scenario())


@pytest.mark.parametrize("remaining", [None, 0.001, 30.0], ids=["no-deadline", "just-in-time", "plenty"])
def test_a_call_with_time_left_or_no_deadline_runs(remaining: float | None):
    async def scenario() -> None:
        h = harness()
        answer = await h.unary(GET_DOCTOR, get_doctor(), FakeContext(time_remaining=remaining))
        assert answer.doctor.doctor_id == "D1"
        assert codes(h.seen) == [OK]

    asyncio.run(scenario())


def test_a_call_cancelled_while_it_runs_is_counted_once_as_cancelled_and_gives_its_place_back():
    async def scenario() -> None:
        h = harness(calls=1)
        h.hold = True
        call = asyncio.create_task(h.unary(GET_DOCTOR, get_doctor(), FakeContext()))
        while not h.seen.ran:
            await asyncio.sleep(0)
        call.cancel()  # what gRPC does when the caller goes away
        with pytest.raises(asyncio.CancelledError):
            await call
        assert codes(h.seen) == [grpc.StatusCode.CANCELLED]
        h.hold = False
        assert isinstance(await h.unary(GET_DOCTOR, get_doctor(), FakeContext()), pb.GetDoctorResponse)

    asyncio.run(scenario())


@pytest.mark.parametrize("engine_answer", ["OK", "NOT_FOUND"])
def test_a_call_cancelled_while_its_engine_call_runs_on_a_thread_is_logged_with_what_the_engine_did(
        engine_answer: str):
    """PostgreSQL: the engine runs on a thread, which a cancel cannot stop, and its transaction commits (or is
    refused). The call ends once it has, and its line says so with caller_gone, instead of CANCELLED."""
    async def scenario() -> None:
        h = harness()
        runner, running, finish = EngineRunner(threads=1), threading.Event(), threading.Event()

        def engine_call() -> str:
            running.set()
            finish.wait(5)
            if engine_answer == "NOT_FOUND":
                raise NotFound("No doctor has the id 'D9'.", "DOCTOR_NOT_FOUND")
            return "committed"

        async def create_doctor(request: pb.CreateDoctorRequest, context: FakeContext) -> pb.CreateDoctorResponse:
            try:
                await runner(engine_call)
            except EngineError as refusal:
                await context.abort_with_status(from_engine_error(refusal))
            return pb.CreateDoctorResponse()

        h.handlers[CREATE_DOCTOR] = grpc.unary_unary_rpc_method_handler(
            create_doctor, request_deserializer=pb.CreateDoctorRequest.FromString)
        call = asyncio.create_task(h.unary(CREATE_DOCTOR, b"", FakeContext(ADMIN_TEXT)))
        await asyncio.to_thread(running.wait, 5)
        call.cancel()  # the caller's deadline passed
        await asyncio.sleep(0.05)
        assert not call.done(), "the call ended while its transaction was still running"
        finish.set()
        with pytest.raises(asyncio.CancelledError):
            await call
        await asyncio.sleep(0)
        assert codes(h.seen) == [grpc.StatusCode[engine_answer]] and h.seen.caller_gone == [True]
        runner.shutdown()

    asyncio.run(scenario())


def test_a_call_that_ends_after_its_deadline_is_logged_with_its_code_and_caller_gone():
    """SQLite: the engine runs on the event loop, so a deadline that passes meanwhile cancels nothing; the call
    did its work, is ended without an answer (gRPC may have ended it already: an answer would fail in its core,
    which logs an error), and its line says OK with the caller gone."""
    async def scenario() -> None:
        h = harness()
        h.hold = True
        context = FakeContext(time_remaining=0.5)
        call = asyncio.create_task(h.unary(GET_DOCTOR, get_doctor(), context))
        while not h.seen.ran:
            await asyncio.sleep(0)
        context.remaining = -0.01
        h.release.set()
        assert await call == UNANSWERED
        assert codes(h.seen) == [OK] and h.seen.caller_gone == [True]
        assert isinstance(await h.unary(GET_DOCTOR, get_doctor(), FakeContext(time_remaining=0.5)),
                          pb.GetDoctorResponse)
        assert h.seen.caller_gone == [True, False]

    asyncio.run(scenario())


def test_a_refusal_that_cannot_reach_a_caller_gone_ends_the_call_unanswered_and_is_logged_as_the_refusal():
    """The servicer refuses (NOT_FOUND) just after the caller's deadline passed and gRPC ended the call: the
    abort's status cannot go out. Raised on, gRPC would log that as an error with a traceback; the call ends as a
    cancelled one, and its line says NOT_FOUND with the caller gone."""
    async def scenario() -> None:
        h = harness()
        h.hold = True
        context = FakeContext(time_remaining=0.5)
        call = asyncio.create_task(h.unary(GET_DOCTOR, get_doctor("missing"), context))
        while not h.seen.ran:
            await asyncio.sleep(0)
        context.remaining, context.unsendable = -0.01, True
        h.release.set()
        assert await call == UNANSWERED
        assert codes(h.seen) == [grpc.StatusCode.NOT_FOUND] and h.seen.caller_gone == [True]

    asyncio.run(scenario())


# ---- calls and streams in flight -----------------------------------------------------------------------------


def test_a_call_past_max_concurrent_calls_is_refused_without_running_and_the_place_comes_back():
    async def scenario() -> None:
        h = harness(calls=2)
        h.hold = True
        first = [asyncio.create_task(h.unary(GET_DOCTOR, get_doctor(), FakeContext())) for _ in range(2)]
        while len(h.seen.ran) < 2:
            await asyncio.sleep(0)
        context = FakeContext()
        assert await h.unary(GET_DOCTOR, get_doctor(), context) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert context.reason() == "TOO_MANY_CALLS"
        assert len(h.seen.ran) == 2
        h.release.set()
        assert all(isinstance(answer, pb.GetDoctorResponse) for answer in await asyncio.gather(*first))
        assert isinstance(await h.unary(GET_DOCTOR, get_doctor(), FakeContext()), pb.GetDoctorResponse)
        assert sorted(c.name for c in codes(h.seen)) == ["OK", "OK", "OK", "RESOURCE_EXHAUSTED"]

    asyncio.run(scenario())


def test_a_watch_past_max_watchers_is_refused_and_open_watches_leave_calls_alone():
    async def scenario() -> None:
        h = harness(calls=1, streams=1)
        h.hold = True
        watching = asyncio.create_task(h.stream(pb.WatchQueueRequest().SerializeToString(), FakeContext()))
        while not h.seen.ran:
            await asyncio.sleep(0)
        context = FakeContext()
        assert await h.stream(pb.WatchQueueRequest().SerializeToString(), context) == \
            grpc.StatusCode.RESOURCE_EXHAUSTED
        assert context.reason() == "TOO_MANY_WATCHERS"
        h.hold = False
        # MAX_CONCURRENT_CALLS=1 and a watch open: unary calls are still served.
        assert isinstance(await h.unary(GET_DOCTOR, get_doctor(), FakeContext()), pb.GetDoctorResponse)
        h.release.set()
        assert len(await watching) == 1
        assert len(await h.stream(pb.WatchQueueRequest().SerializeToString(), FakeContext())) == 1
        assert len(h.seen.ran) == 3  # two watches and the call; never the refused watch
        assert codes(h.seen) == [grpc.StatusCode.RESOURCE_EXHAUSTED, OK, OK, OK]

    asyncio.run(scenario())


def test_a_watch_whose_caller_goes_away_is_counted_as_cancelled_and_frees_its_place():
    async def scenario() -> None:
        h = harness(streams=1)
        h.hold = True
        watching = asyncio.create_task(h.stream(pb.WatchQueueRequest().SerializeToString(), FakeContext()))
        while not h.seen.ran:
            await asyncio.sleep(0)
        watching.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watching
        assert codes(h.seen) == [grpc.StatusCode.CANCELLED]
        assert h.pipeline.watchers.count == 0
        h.hold = False
        assert len(await h.stream(pb.WatchQueueRequest().SerializeToString(), FakeContext())) == 1

    asyncio.run(scenario())


def test_a_request_past_max_message_bytes_is_refused_with_its_reason_without_running():
    async def scenario() -> None:
        h = harness()
        context = FakeContext()
        answer = await h.unary(CREATE_DOCTOR, pb.CreateDoctorRequest(name="D" * MAX_MESSAGE_BYTES)
                               .SerializeToString(), context)
        assert answer == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (context.status, context.reason()) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "MESSAGE_TOO_LARGE")
        assert h.seen.ran == [] and codes(h.seen) == [grpc.StatusCode.RESOURCE_EXHAUSTED]

    asyncio.run(scenario())
