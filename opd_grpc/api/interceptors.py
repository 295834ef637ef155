"""The call pipeline: one server interceptor that every call of the OPD (and test clock) service goes through.

In order: the API key (UNAUTHENTICATED), the key's rate limit, the request's bytes (INVALID_ARGUMENT
`MALFORMED_REQUEST` where gRPC would say UNKNOWN), the role (PERMISSION_DENIED), the deadline (a caller that is
gone gets no work done), the calls or streams in flight (RESOURCE_EXHAUSTED); then the servicer, with the
caller in `auth.CALLER`; and at the end, whatever happened, one access-log line and the call's metrics (just after
the answer, which does not wait for them).
A call denied for its key or role is also written to the audit log. Health and reflection pass untouched.
Each method's handler is wrapped once, on its first call."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Awaitable, Callable, Iterator, NoReturn

import grpc
from google.protobuf.message import DecodeError

from opd_grpc.api import auth
from opd_grpc.api.limits import InFlight, RateLimiter
from opd_grpc.api.runner import UNHEARD
from opd_grpc.api.status import from_engine_error, rich_status
from opd_grpc.engine.access import ANONYMOUS, Actor
from opd_grpc.engine.errors import EngineError, PermissionDenied, ResourceExhausted, Unauthenticated, Unavailable
from opd_grpc.engine.parse import is_uuid

# method (short name), code, seconds, actor, request_id, peer, caller_gone
Finished = Callable[[str, grpc.StatusCode, float, Actor, str, str, bool], None]
Denied = Callable[[Actor, str, str, EngineError, str], Awaitable[None]]  # actor, method, request_id, refusal, peer


class CallPipeline(grpc.aio.ServerInterceptor):
    def __init__(self, gate: auth.Gate, rate: RateLimiter, calls: InFlight, watchers: InFlight,
                 max_message_bytes: int, denied: Denied, finished: Finished):
        self.gate = gate
        self.max_message_bytes = max_message_bytes
        self.rate = rate
        self.calls = calls
        self.watchers = watchers
        self.denied = denied
        self.finished = finished
        self._wrapped: dict[str, Any] = {}
        self.stopping = False  # from the server's stop on, every call that arrives is held, then refused
        self.last_held = 0.0  # time.monotonic() when the last of those arrived
        self._refuse = asyncio.Event()

    def hold_new_calls(self) -> None:
        """A call arriving from now on waits, and so does its caller, until `refuse_held_calls`; then it is
        refused UNAVAILABLE (it did nothing: the caller sends it again, to another replica or later)."""
        self.stopping = True
        self.last_held = time.monotonic()

    def refuse_held_calls(self) -> None:
        self._refuse.set()

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        wrapped = self._wrapped.get(details.method)
        if wrapped is None:
            handler = await continuation(details)
            if handler is None or auth.is_open(details.method):  # unknown (UNIMPLEMENTED), or open to all
                return handler
            wrapped = self._wrapped[details.method] = self._wrap(details.method, handler)
        return wrapped

    def _wrap(self, method: str, handler: Any) -> Any:
        name = method.rsplit("/", 1)[-1]
        parse = handler.request_deserializer

        async def admitted(raw: bytes, context: grpc.aio.ServicerContext, call: _Call) -> Any:
            """The request, once the caller may make this call now; else the call ends with the refusal."""
            try:
                if self.stopping:
                    self.last_held = time.monotonic()
                    await self._refuse.wait()
                    raise Unavailable("The server is shutting down and did nothing with this call; send it again "
                                      "(a change with the same request_id) to another replica, or once this one is "
                                      "back.", "SERVER_SHUTTING_DOWN")
                call.actor = self.gate.authenticate(context.invocation_metadata())
                self.rate.admit(call.actor.key_id)
                if len(raw) > self.max_message_bytes:
                    raise ResourceExhausted(f"The request has {len(raw)} bytes, more than this server takes "
                                            f"({self.max_message_bytes}, MAX_MESSAGE_BYTES); send a smaller one (a "
                                            "slot batch in parts).", "MESSAGE_TOO_LARGE")
                try:
                    request = parse(raw)
                except (DecodeError, UnicodeDecodeError) as error:
                    await context.abort_with_status(rich_status(
                        grpc.StatusCode.INVALID_ARGUMENT.value[0], f"The request is not a valid message for "
                        f"{name}: {error}. Send the method's request message, with strings in UTF-8.",
                        "MALFORMED_REQUEST"))
                request_id = getattr(request, "request_id", "")
                # Logged and audited only in the form a UUID has: whatever else a caller put there (a phone
                # number, say) stays out of the logs.
                call.request_id = request_id if is_uuid(request_id) else ""
                self.gate.authorize(call.actor, method, request)
            except (Unauthenticated, PermissionDenied) as refusal:
                await self.denied(call.actor, name, call.request_id, refusal, call.peer)
                await context.abort_with_status(from_engine_error(refusal))
            except EngineError as refusal:
                await context.abort_with_status(from_engine_error(refusal))
            if _caller_gone(context):
                _end_unanswered(call, grpc.StatusCode.DEADLINE_EXCEEDED)  # nothing was done
            auth.CALLER.set(call.actor)
            return request

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary_unary(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
                call = _Call(self, name, context)
                with call.recorded(context):
                    request = await admitted(raw, context, call)
                    UNHEARD.set(call.unheard)
                    try:
                        with self.calls:
                            response = await inner(request, context)
                    except Exception as error:
                        if _unsent(context, error) and _caller_gone(context):
                            _end_unanswered(call, _code(context))  # its refusal could not reach the caller
                        await _failed(context, error, name)
                    if _caller_gone(context):
                        _end_unanswered(call, grpc.StatusCode.OK)  # done, with nobody waiting for the answer
                    return response

            return grpc.unary_unary_rpc_method_handler(unary_unary, response_serializer=handler.response_serializer)
        inner_stream = handler.unary_stream

        async def unary_stream(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            call = _Call(self, name, context)
            with call.recorded(context):
                request = await admitted(raw, context, call)
                try:
                    with self.watchers:
                        async for item in inner_stream(request, context):
                            yield item
                except Exception as error:
                    await _failed(context, error, name)

        return grpc.unary_stream_rpc_method_handler(unary_stream, response_serializer=handler.response_serializer)


async def _failed(context: grpc.aio.ServicerContext, error: Exception, name: str) -> None:
    """A status the servicer chose passes on; a limit in flight is refused with its reason (the servicer itself
    answers the engine's refusals); anything else is a bug (never bad input, SPEC §12): logged, and answered
    INTERNAL with no internals instead of gRPC's UNKNOWN with the exception's text.
    A call the servicer already aborted (its code is set) is not answered again, for gRPC refuses a second abort
    (`UsageError`): the error is that abort's status failing to go out, as when the caller's connection had just
    closed (`ExecuteBatchError`), which gRPC, handed the error, passes over in silence; anything else it logs."""
    if isinstance(error, grpc.aio.AbortError) or _unsent(context, error):
        raise error
    if isinstance(error, ResourceExhausted):
        await context.abort_with_status(from_engine_error(error))
    log.error("unexpected failure in %s", name, exc_info=error)
    await context.abort_with_status(rich_status(
        grpc.StatusCode.INTERNAL.value[0], "The server failed to handle this request; it changed nothing that was "
        "not committed. Try again, and report it if it persists.", "INTERNAL_ERROR"))


class _Call:
    """What the access log and metrics need of one call, gathered as it goes."""

    __slots__ = ("pipeline", "name", "peer", "started", "actor", "request_id", "code", "caller_gone", "unheard")

    def __init__(self, pipeline: CallPipeline, name: str, context: grpc.aio.ServicerContext):
        # The peer is read now: once a stream has ended (a server shutting down), its context is not to be touched.
        self.pipeline, self.name, self.peer = pipeline, name, context.peer()
        self.started = time.perf_counter()
        self.actor: Actor = ANONYMOUS
        self.request_id = ""
        self.code = grpc.StatusCode.UNKNOWN  # set by recorded() as the call ends
        self.caller_gone = False  # set by recorded() too: the caller had stopped waiting, so it never saw `code`
        self.unheard: list[asyncio.Future[Any]] = []  # an engine call that ran on after the call was cancelled

    @contextlib.contextmanager
    def recorded(self, context: grpc.aio.ServicerContext) -> Iterator[None]:
        """Around the whole call: its status, however it ends, then its access-log line and metrics. Those are
        written on the event loop's next turn, once gRPC has the answer in hand: the caller does not wait for them
        (at 1 call in flight that made an allocation 4-6% faster).
        A call that ran to its end after its caller left (its deadline passed, or it cancelled) is logged with the
        code of what it did and `caller_gone`: a change it committed is not hidden behind CANCELLED."""
        try:
            yield
            self.code, self.caller_gone = grpc.StatusCode.OK, _caller_gone(context)
        except (asyncio.CancelledError, GeneratorExit):
            # The caller went away or the server stopped (its task was cancelled, or its stream closed: then its
            # context is not to be touched).
            if self.unheard:
                self.code, self.caller_gone = _engine_code(self.unheard[0]), True
            elif not self.caller_gone:  # else its deadline passed before it started (`admitted`)
                self.code = grpc.StatusCode.CANCELLED
            raise
        except BaseException:
            self.code, self.caller_gone = _code(context), _caller_gone(context)
            raise
        finally:
            asyncio.get_running_loop().call_soon(self.pipeline.finished, self.name, self.code,
                                                 time.perf_counter() - self.started, self.actor, self.request_id,
                                                 self.peer, self.caller_gone)


def _unsent(context: grpc.aio.ServicerContext, error: Exception) -> bool:
    """Whether `error` is the failure of an abort's status to go out (the servicer set its code, and the abort
    raised something else than its AbortError)."""
    return context.code() is not None and not isinstance(error, grpc.aio.AbortError)


def _end_unanswered(call: _Call, code: grpc.StatusCode) -> NoReturn:
    """Ends a call whose caller stopped waiting, without an answer: gRPC may have ended the call already, and an
    answer would then fail in its core, which it logs as an error with a traceback (tens a minute under load with
    short deadlines). Ended as a cancelled call is, which gRPC passes over; the access log says what was done."""
    call.code, call.caller_gone = code, True
    raise asyncio.CancelledError


def _engine_code(engine_call: asyncio.Future[Any]) -> grpc.StatusCode:
    """The code the servicer would have answered for an engine call that ended with nobody waiting: OK, the
    engine's refusal, or INTERNAL for a bug (logged here, as `_failed` would have)."""
    error = engine_call.exception()
    if error is None:
        return grpc.StatusCode.OK
    if isinstance(error, EngineError):
        return from_engine_error(error).code
    log.error("unexpected failure in a call whose caller had gone", exc_info=error)
    return grpc.StatusCode.INTERNAL


def _code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """The status a call ended with when it did not return: the one it aborted with."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):
        return _BY_NUMBER.get(code, grpc.StatusCode.UNKNOWN)
    return grpc.StatusCode.UNKNOWN


def _caller_gone(context: grpc.aio.ServicerContext) -> bool:
    """Whether the caller had stopped waiting (its deadline passed, or it cancelled) by the call's end."""
    remaining = context.time_remaining()
    return context.cancelled() or (remaining is not None and remaining <= 0)


log = logging.getLogger(__name__)
_BY_NUMBER = {c.value[0]: c for c in grpc.StatusCode}
