"""A thin typed client of opd.v1.OPDTokenService for hospital systems, the display board, opdctl and the simulation.

Each call has one deadline, `timeout` seconds from when it is made, that its retries share, as gRPC's own retries do;
a call that changes state always carries a `request_id` (SPEC §9), so it can be replayed safely: UNAVAILABLE (and,
for those calls, DEADLINE_EXCEEDED answered before the deadline) is retried with the same `request_id`.
Refusals come back as `OPDError`s that a person can read. `watch` follows WatchQueue across reconnects and server
restarts, resuming after the last sequence seen per doctor (SPEC §10), and across a network path that died in
silence: keepalive pings find the dead connection, and a watch that hears nothing, not even a heartbeat, reconnects.
"""

from __future__ import annotations

import datetime as dt
import functools
import itertools
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator
from zoneinfo import ZoneInfo

import grpc
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from opd_grpc._gen.opd.v1 import opd_pb2 as pb
from opd_grpc._gen.opd.v1 import opd_pb2_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"  # the server's default LISTEN (SPEC §14)
MAX_RETRY_PAUSE = 0.5  # seconds between two attempts at most: a restarted server is found soon after it is back
# `attempts` for a caller that must learn at once that the server is away (0.1 + 0.2 + 0.4 s of pauses), rather than
# ride out a restart within its deadline: the board, which then shows "connecting…", and the simulation, which ends.
QUICK_ATTEMPTS = 4
MAX_RECONNECT_DELAY = 2.0  # seconds; a watch keeps trying at least this often while the server is away
LIST_PAGE_SIZE = 500
DEFAULT_STALL_SECONDS = 30.0  # 3x the server's default WATCH_HEARTBEAT_SECONDS: two heartbeats lost is not yet a stall

# Keepalive on the channels OPDClient opens (gRPC core's doc/keepalive.md). A path that dies in silence (a host
# frozen or unplugged, a NAT that forgot the flow: packets dropped, no RST) would otherwise hang an open call until
# TCP gives up, minutes to hours later; with these the connection is closed and the call fails UNAVAILABLE within
# KEEPALIVE_PING_SECONDS + KEEPALIVE_ACK_SECONDS (15 s), and is retried or, for a watch, reconnected.
KEEPALIVE_PING_SECONDS = 10  # ping after 10 s without a byte from the server; it permits pings every 5 s
KEEPALIVE_ACK_SECONDS = 5  # an ack takes one round trip: no ack in 5 s is a dead path, not a slow one
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", KEEPALIVE_PING_SECONDS * 1000),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_ACK_SECONDS * 1000),
    # What gRPC 1.85 actually waits for an ack before it closes the connection (1 min by default once keepalive
    # is on): keepalive_timeout_ms alone left a black-holed connection open past 40 s.
    ("grpc.http2.ping_timeout_ms", KEEPALIVE_ACK_SECONDS * 1000),
    # No pings while no call is open: an idle client costs the server nothing.
    ("grpc.keepalive_permit_without_calls", 0),
    # By default a client stops pinging after 2 pings without sending data; a watch sends nothing after its
    # request, so its connection would go unwatched from the third ping on.
    ("grpc.http2.max_pings_without_data", 0),
    # While the server is away the channel waits between attempts to connect, from 1 s growing to 2 min by
    # default, and calls fail at once meanwhile: a server back after a restart would be found seconds late, past
    # a call's deadline. Tried at least every second, it is found within about a second.
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class OPDError(Exception):
    """A failed call: the status code, the server's message, its ErrorInfo reason and BadRequest field problems."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str = "",
                 field_violations: list[tuple[str, str]] | None = None, metadata: dict[str, str] | None = None):
        self.code = code
        self.message = message
        self.reason = reason
        self.field_violations = field_violations or []
        self.metadata = metadata or {}  # ErrorInfo's: PATIENT_ALREADY_HAS_TOKEN names the held token's token_id
        # The request_id the change went with (made by OPDClient when the caller gave none): after UNAVAILABLE or
        # DEADLINE_EXCEEDED it may have been applied, and sending the same request with it again is safe (SPEC §9).
        self.request_id = ""
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.code.name} ({self.reason})" if self.reason else self.code.name
        text = f"{text}: {self.message}"
        unsaid = [f"{f}: {d}" for f, d in self.field_violations if d not in self.message]
        return f"{text} [{'; '.join(unsaid)}]" if unsaid else text

    @staticmethod
    def from_rpc_error(error: grpc.RpcError) -> OPDError:
        """The OPDError subclass for the error's code, with the rich status details when the server sent them."""
        code: grpc.StatusCode = error.code()  # type: ignore[attr-defined]
        message: str = error.details() or ""  # type: ignore[attr-defined]
        reason, violations, metadata = "", [], {}
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
        for detail in status.details if status else []:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, metadata = info.reason, dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations = [(v.field, v.description) for v in bad.field_violations]
        return _ERROR_BY_CODE.get(code, OPDError)(code, message, reason, violations, metadata)


class InvalidArgument(OPDError):
    """A malformed or missing field: fix the request."""


class NotFound(OPDError):
    """An unknown doctor, slot or token."""


class AlreadyExists(OPDError):
    """The patient already holds an active token, or the slot overlaps another."""


class FailedPrecondition(OPDError):
    """The state does not allow this now (or a request_id was reused for another request)."""


class ResourceExhausted(OPDError):
    """A waitlist is full or a rate limit was hit."""


class OutOfRange(OPDError):
    """A watch's resume point is outside the history the server keeps."""


class Unavailable(OPDError):
    """The server could not be reached, even after the retries."""


class DeadlineExceeded(OPDError):
    """No answer within the call's timeout: a change may or may not have been made (send it again with its
    `request_id`)."""


class Unauthenticated(OPDError):
    """No API key, or an unknown one."""


class PermissionDenied(OPDError):
    """The API key's role may not make this call."""


class Aborted(OPDError):
    """The server ended the call early (a watcher that fell behind)."""


_ERROR_BY_CODE: dict[grpc.StatusCode, type[OPDError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRange,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.ABORTED: Aborted,
}


def tls_credentials(ca_cert: Path | None = None, cert: Path | None = None,
                    key: Path | None = None) -> grpc.ChannelCredentials:
    """TLS from PEM files: `ca_cert` to trust a server whose CA the system does not know, `cert` and `key` to present
    a client certificate to a server that asks for one (TLS_CLIENT_CA_FILE, mutual TLS). Reading a file may raise
    OSError; a file that is not the PEM it should be, ValueError (gRPC would only fail at the handshake, in its
    core's log)."""
    if (cert is None) != (key is None):
        raise ValueError("a client certificate needs its private key, and a key its certificate: give both")
    return grpc.ssl_channel_credentials(root_certificates=_pem(ca_cert, b"-----BEGIN CERTIFICATE-----", "certificate"),
                                        private_key=_pem(key, b"PRIVATE KEY-----", "private key"),
                                        certificate_chain=_pem(cert, b"-----BEGIN CERTIFICATE-----", "certificate"))


def _pem(path: Path | None, marker: bytes, what: str) -> bytes | None:
    if path is None:
        return None
    data = path.read_bytes()
    if marker not in data:
        raise ValueError(f"{path} is not a PEM {what}")
    return data


def hospital_today(zone: dt.tzinfo | None) -> str:
    """The hospital's date now: in its time zone, or this machine's."""
    return dt.datetime.now(zone).date().isoformat() if zone else dt.date.today().isoformat()


def server_zone(stats: pb.GetStatsResponse) -> dt.tzinfo:
    """The hospital's time zone, the server's TIMEZONE as GetStats names it: dates and slot times are its wall clock.
    An older server names none: UTC."""
    return ZoneInfo(stats.timezone) if stats.timezone else dt.timezone.utc


class OPDClient:
    """One connection to the OPD token service; a context manager that closes the channel it opened.

    With `credentials` (see `tls_credentials`) the channel it opens speaks TLS; without, plaintext. A channel it
    opens pings the server while a call is open (CHANNEL_OPTIONS); a `channel` passed in is used as is.
    A call may take `timeout` seconds in all: its attempts (as many as fit, or up to `attempts`) and the pauses
    between them (`backoff`, doubling up to MAX_RETRY_PAUSE) share it, so a call rides out a server's restart (a
    second or so) within its deadline. A watch has no deadline (see Watch)."""

    def __init__(self, address: str | None = None, *, channel: grpc.Channel | None = None, timeout: float = 5.0,
                 attempts: int | None = None, backoff: float = 0.1, api_key: str | None = None,
                 credentials: grpc.ChannelCredentials | None = None):
        if channel is not None and (address is not None or credentials is not None):
            raise ValueError("give an address (and credentials) or a channel, not both")
        if not (timeout > 0 and backoff > 0):  # no pause between retries would send them as fast as they fail
            raise ValueError(f"timeout and backoff must be positive, not {timeout} and {backoff}")
        target = address or DEFAULT_ADDRESS
        self._owned_channel = None if channel is not None else (
            grpc.secure_channel(target, credentials, CHANNEL_OPTIONS) if credentials
            else grpc.insecure_channel(target, CHANNEL_OPTIONS))
        self._stub = opd_pb2_grpc.OPDTokenServiceStub(channel or self._owned_channel)
        self.timeout = timeout
        self.attempts = None if attempts is None else max(1, attempts)
        self.backoff = backoff
        self.metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.closed = False  # close() was called: a watch ended CANCELLED then is not reconnected

    def close(self) -> None:
        self.closed = True
        if self._owned_channel is not None:
            self._owned_channel.close()

    def __enter__(self) -> OPDClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _call(self, method: str, request: Message) -> Any:
        """Calls `method`, retrying what is safe to retry, all within `timeout` seconds; failures become OPDError.

        The deadline is the call's, not an attempt's: each attempt gets what is left of it, and no retry starts
        (nor backoff sleeps) past it, so a server that hangs costs the caller `timeout` seconds, not `attempts` times
        that. A request with a `request_id` field changes state: it gets a fresh id unless the caller gave one, and
        every attempt sends that same id, so the server applies it once even if an earlier attempt did reach it."""
        retryable = {grpc.StatusCode.UNAVAILABLE}
        if "request_id" in request.DESCRIPTOR.fields_by_name:
            if not request.request_id:  # type: ignore[attr-defined]
                request.request_id = str(uuid.uuid4())  # type: ignore[attr-defined]
            retryable.add(grpc.StatusCode.DEADLINE_EXCEEDED)
        rpc = getattr(self._stub, method)
        deadline = time.monotonic() + self.timeout
        for attempt in itertools.count(1):
            try:
                return rpc(request, timeout=max(0.0, deadline - time.monotonic()), metadata=self.metadata)
            except ValueError as error:
                raise _closed(error) from None
            except grpc.RpcError as error:
                pause = min(self.backoff * 2 ** (attempt - 1), MAX_RETRY_PAUSE)
                if (error.code() not in retryable  # type: ignore[attr-defined]
                        or attempt == self.attempts or time.monotonic() + pause >= deadline):
                    failed = OPDError.from_rpc_error(error)
                    failed.request_id = getattr(request, "request_id", "")
                    raise failed from None
            time.sleep(pause)
        raise AssertionError("unreachable: the attempts go on until one returns or raises")

    # Doctors and slots

    def create_doctor(self, name: str, specialization: str = "", *, request_id: str = "") -> pb.CreateDoctorResponse:
        return self._call("CreateDoctor", pb.CreateDoctorRequest(name=name, specialization=specialization,
                                                                 request_id=request_id))

    def get_doctor(self, doctor_id: str) -> pb.GetDoctorResponse:
        return self._call("GetDoctor", pb.GetDoctorRequest(doctor_id=doctor_id))

    def list_doctors(self, *, page_size: int = 0, page_token: str = "") -> pb.ListDoctorsResponse:
        return self._call("ListDoctors", pb.ListDoctorsRequest(page_size=page_size, page_token=page_token))

    def create_slots(self, doctor_id: str, slots: Iterable[pb.SlotSpec], *,
                     request_id: str = "") -> pb.CreateSlotsResponse:
        return self._call("CreateSlots", pb.CreateSlotsRequest(doctor_id=doctor_id, slots=slots, request_id=request_id))

    def list_slots(self, doctor_id: str, date: str = "", *, page_size: int = 0,
                   page_token: str = "") -> pb.ListSlotsResponse:
        return self._call("ListSlots", pb.ListSlotsRequest(doctor_id=doctor_id, date=date, page_size=page_size,
                                                           page_token=page_token))

    def update_slot_capacity(self, slot_id: str, max_capacity: int, *,
                             request_id: str = "") -> pb.UpdateSlotCapacityResponse:
        return self._call("UpdateSlotCapacity", pb.UpdateSlotCapacityRequest(
            slot_id=slot_id, max_capacity=max_capacity, request_id=request_id))

    def get_slot_status(self, slot_id: str) -> pb.GetSlotStatusResponse:
        return self._call("GetSlotStatus", pb.GetSlotStatusRequest(slot_id=slot_id))

    # Tokens

    def allocate_token(self, *, patient: pb.Patient, doctor_id: str, date: str, source: pb.Source,
                       preferred_slot_time: str = "", flexible: bool = False,
                       request_id: str = "") -> pb.AllocateTokenResponse:
        return self._call("AllocateToken", pb.AllocateTokenRequest(
            patient=patient, doctor_id=doctor_id, date=date, source=source, preferred_slot_time=preferred_slot_time,
            flexible=flexible, request_id=request_id))

    def allocate_emergency(self, *, patient: pb.Patient, doctor_id: str, date: str, preferred_slot_time: str = "",
                           flexible: bool = False, request_id: str = "") -> pb.AllocateEmergencyResponse:
        return self._call("AllocateEmergency", pb.AllocateEmergencyRequest(
            patient=patient, doctor_id=doctor_id, date=date, preferred_slot_time=preferred_slot_time,
            flexible=flexible, request_id=request_id))

    def cancel_token(self, token_id: str, reason: str = "", *, request_id: str = "") -> pb.CancelTokenResponse:
        return self._call("CancelToken", pb.CancelTokenRequest(token_id=token_id, reason=reason, request_id=request_id))

    def mark_no_show(self, token_id: str, *, request_id: str = "") -> pb.MarkNoShowResponse:
        return self._call("MarkNoShow", pb.MarkNoShowRequest(token_id=token_id, request_id=request_id))

    def check_in_token(self, token_id: str, *, request_id: str = "") -> pb.CheckInTokenResponse:
        return self._call("CheckInToken", pb.CheckInTokenRequest(token_id=token_id, request_id=request_id))

    def call_next(self, doctor_id: str, date: str, *, request_id: str = "") -> pb.CallNextResponse:
        return self._call("CallNext", pb.CallNextRequest(doctor_id=doctor_id, date=date, request_id=request_id))

    def complete_token(self, token_id: str, *, request_id: str = "") -> pb.CompleteTokenResponse:
        return self._call("CompleteToken", pb.CompleteTokenRequest(token_id=token_id, request_id=request_id))

    def get_token(self, token_id: str) -> pb.GetTokenResponse:
        return self._call("GetToken", pb.GetTokenRequest(token_id=token_id))

    def list_tokens(self, doctor_id: str, date: str, *, page_size: int = 0,
                    page_token: str = "") -> pb.ListTokensResponse:
        return self._call("ListTokens", pb.ListTokensRequest(doctor_id=doctor_id, date=date, page_size=page_size,
                                                             page_token=page_token))

    def get_stats(self, date: str, doctor_id: str = "") -> pb.GetStatsResponse:
        return self._call("GetStats", pb.GetStatsRequest(date=date, doctor_id=doctor_id))

    def list_queue_events(self, doctor_id: str, date: str, *, after_sequence: int = 0, page_size: int = 0,
                          page_token: str = "") -> pb.ListQueueEventsResponse:
        return self._call("ListQueueEvents", pb.ListQueueEventsRequest(
            doctor_id=doctor_id, date=date, after_sequence=after_sequence, page_size=page_size,
            page_token=page_token))

    # Weekly templates and holidays

    def set_slot_template(self, doctor_id: str, slots: Iterable[pb.TemplateSlot], *,
                          request_id: str = "") -> pb.SetSlotTemplateResponse:
        return self._call("SetSlotTemplate", pb.SetSlotTemplateRequest(doctor_id=doctor_id, slots=slots,
                                                                       request_id=request_id))

    def get_slot_template(self, doctor_id: str) -> pb.GetSlotTemplateResponse:
        return self._call("GetSlotTemplate", pb.GetSlotTemplateRequest(doctor_id=doctor_id))

    def apply_slot_template(self, doctor_id: str, start_date: str, end_date: str, *,
                            request_id: str = "") -> pb.ApplySlotTemplateResponse:
        return self._call("ApplySlotTemplate", pb.ApplySlotTemplateRequest(
            doctor_id=doctor_id, start_date=start_date, end_date=end_date, request_id=request_id))

    def create_holiday(self, date: str, name: str, *, request_id: str = "") -> pb.CreateHolidayResponse:
        return self._call("CreateHoliday", pb.CreateHolidayRequest(date=date, name=name, request_id=request_id))

    def list_holidays(self, start_date: str = "", end_date: str = "", *, page_size: int = 0,
                      page_token: str = "") -> pb.ListHolidaysResponse:
        return self._call("ListHolidays", pb.ListHolidaysRequest(start_date=start_date, end_date=end_date,
                                                                 page_size=page_size, page_token=page_token))

    def delete_holiday(self, date: str, *, request_id: str = "") -> pb.DeleteHolidayResponse:
        return self._call("DeleteHoliday", pb.DeleteHolidayRequest(date=date, request_id=request_id))

    # Every page of a List call

    def iter_doctors(self) -> Iterator[pb.Doctor]:
        return self._every_page(self.list_doctors, "doctors")

    def iter_slots(self, doctor_id: str, date: str = "") -> Iterator[pb.Slot]:
        return self._every_page(self.list_slots, "slots", doctor_id, date)

    def iter_tokens(self, doctor_id: str, date: str) -> Iterator[pb.Token]:
        return self._every_page(self.list_tokens, "tokens", doctor_id, date)

    def iter_queue_events(self, doctor_id: str, date: str) -> Iterator[pb.QueueEvent]:
        return self._every_page(self.list_queue_events, "events", doctor_id, date)

    def iter_holidays(self, start_date: str = "", end_date: str = "") -> Iterator[pb.Holiday]:
        return self._every_page(self.list_holidays, "holidays", start_date, end_date)

    @staticmethod
    def _every_page(list_call: Callable[..., Any], items: str, *args: str) -> Iterator[Any]:
        page_token = ""
        while True:
            page = list_call(*args, page_size=LIST_PAGE_SIZE, page_token=page_token)
            yield from getattr(page, items)
            if not (page_token := page.next_page_token):
                return

    # Live queues

    def watch(self, doctor_ids: Iterable[str], date: str, *, after_sequence: int | None = None,
              after_sequences: dict[str, int] | None = None, reconnect: bool = True,
              on_reconnect: Callable[[OPDError], object] | None = None,
              stall_seconds: float = DEFAULT_STALL_SECONDS) -> Watch:
        """Follows the doctors' queues on `date`; iterate the answer for snapshots, events and heartbeats.

        A stream that brings nothing for `stall_seconds` is taken for a dead connection and reconnected, like one
        that failed UNAVAILABLE: set it to about 3x the server's WATCH_HEARTBEAT_SECONDS, so that only a lost
        path, never a quiet queue, counts as one."""
        if stall_seconds <= 0:
            raise ValueError(f"stall_seconds must be positive, not {stall_seconds}")
        return Watch(self, list(doctor_ids), date, after_sequence, after_sequences or {}, reconnect, on_reconnect,
                     stall_seconds)


def _closed(error: ValueError) -> OPDError:
    """What gRPC raises instead of starting a call on a closed channel (the client's `close()`), as an OPDError:
    CANCELLED, what a call already under way is told when its channel closes."""
    return OPDError(grpc.StatusCode.CANCELLED, str(error))


class Watch:
    """A WatchQueue stream that reconnects by itself and resumes where it left off, so each event comes once.

    Iterating opens the stream; leaving the loop (or `close()` on the iterator) cancels it, and iterating again
    resumes after `last_sequences`. `cancel()` may be called from any thread and ends the iteration for good;
    closing the client's channel (the client's `close()`, for one it opened) ends it with an OPDError (CANCELLED),
    whether its stream is open or it is reconnecting.
    The stream has no deadline: it is meant to stay open. But the server sends at least a heartbeat on a quiet
    stream, so a stream that brings nothing for `stall_seconds` while it is read has lost its server: it is cancelled
    and reconnected, as after UNAVAILABLE. Keepalive pings alone cannot tell: a proxy in between answers them
    itself, and a channel passed in to OPDClient may not ping at all."""

    def __init__(self, client: OPDClient, doctor_ids: list[str], date: str, after_sequence: int | None,
                 after_sequences: dict[str, int], reconnect: bool,
                 on_reconnect: Callable[[OPDError], object] | None, stall_seconds: float):
        self.doctor_ids = doctor_ids
        self.date = date
        self.reconnect = reconnect
        self.on_reconnect = on_reconnect
        self.stall_seconds = stall_seconds
        # The resume point per doctor: the last sequence seen, or the caller's start for doctors not seen yet.
        # A doctor that is absent here gets a snapshot (the caller asked for one and none has come yet).
        start = dict.fromkeys(doctor_ids, after_sequence) if after_sequence is not None else {}
        self.last_sequences: dict[str, int] = {**start, **after_sequences}
        self._after_sequence = after_sequence
        # What each doctor's last event must look like, from the last update seen of it: the event itself, or a
        # snapshot (whose last event changed one of its latest-changed tokens, at their time). A reconnect resumes one
        # event earlier, so that the server sends that event again: if it does not match, the server's history is
        # not the one this watch followed (its database restored from a backup, then written past our sequence)
        # and the watch raises OUT_OF_RANGE (HISTORY_CHANGED), as when the server no longer has our sequence at all.
        self._expected: dict[str, Callable[[pb.QueueEvent], bool]] = {}
        self._unverified: set[str] = set()  # doctors whose resumed stream has not yet sent that event again
        self.reconnects = 0  # attempts to reconnect, successful or not
        self.connected = False  # whether the stream open now has brought an update (False while reconnecting)
        self._client = client
        self._call: Any = None
        self._cancelled = threading.Event()

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cancel()

    def cancel(self) -> None:
        self._cancelled.set()
        if (call := self._call) is not None:
            call.cancel()

    def __iter__(self) -> Iterator[pb.WatchQueueResponse]:
        delay = self._client.backoff
        while not self._cancelled.is_set():
            try:
                call = self._call = self._client._stub.WatchQueue(self._request(), metadata=self._client.metadata)
            except ValueError as error:
                raise _closed(error) from None
            if self._cancelled.is_set():  # cancel() ran before the call was stored
                call.cancel()
                return
            stall = _StallWatchdog(call, self.stall_seconds)
            try:
                for update in call:
                    stall.pause()  # the time our caller spends on an update is not the network's
                    delay, self.connected = self._client.backoff, True
                    if self._is_new(update):
                        yield update
                    stall.restart()
                return  # the server ended the stream normally
            except grpc.RpcError as failure:
                if self._cancelled.is_set():
                    return
                error = stall.error() if stall.fired else OPDError.from_rpc_error(failure)
                if not (self.reconnect and not self._client.closed and _worth_reconnecting(error)):
                    raise error from None
            finally:
                stall.stop()
                call.cancel()
                self.connected = False
            self.reconnects += 1
            if self.on_reconnect is not None:
                self.on_reconnect(error)
            if self._cancelled.wait(delay):
                return
            delay = min(max(delay, 0.01) * 2, MAX_RECONNECT_DELAY)

    def _request(self) -> pb.WatchQueueRequest:
        """The caller's request, with each doctor seen so far resuming after its last sequence, or one earlier
        where the update this watch saw last (an event, or a snapshot past sequence 0) lets it check that event."""
        self._unverified = {d for d in self._expected if self.last_sequences.get(d, 0) > 0}
        after = {d: n - 1 if d in self._unverified else n for d, n in self.last_sequences.items()}
        return pb.WatchQueueRequest(doctor_ids=self.doctor_ids, date=self.date, after_sequence=self._after_sequence,
                                    after_sequences=after)

    def _is_new(self, update: pb.WatchQueueResponse) -> bool:
        """Remembers each doctor's sequence; drops an event already seen (a replay must never show twice), after
        checking that a resumed stream's first event of a doctor is the one seen last."""
        kind = update.WhichOneof("update")
        if kind == "heartbeat":
            return True
        item = update.snapshot if kind == "snapshot" else update.event
        if kind == "snapshot":
            self._expected[item.doctor_id] = _ended_snapshot(item)
        else:
            if item.doctor_id in self._unverified:
                self._unverified.discard(item.doctor_id)
                seen = self.last_sequences[item.doctor_id]
                if item.sequence != seen or not self._expected[item.doctor_id](item):
                    raise OutOfRange(grpc.StatusCode.OUT_OF_RANGE,
                                     f"Event {seen} of {item.doctor_id} on {item.date} is not the one this watch saw: "
                                     "the server's history has changed (its database restored from a backup). "
                                     "Start again from a snapshot.", "HISTORY_CHANGED")
            if item.sequence <= self.last_sequences.get(item.doctor_id, -1):
                return False
            self._expected[item.doctor_id] = functools.partial(_same_event, _fingerprint(item))
        self.last_sequences[item.doctor_id] = item.sequence
        return True


def _fingerprint(event: pb.QueueEvent) -> tuple[object, ...]:
    """What tells one event from another of its sequence: its kind, token, slot, cause and time (to the µs)."""
    return (event.kind, event.token.token_id, event.slot_id, event.caused_by_token_id, _micros(event.occurred_at))


def _same_event(fingerprint: tuple[object, ...], event: pb.QueueEvent) -> bool:
    return _fingerprint(event) == fingerprint


def _ended_snapshot(snapshot: pb.QueueSnapshot) -> Callable[[pb.QueueEvent], bool]:
    """Whether an event can be the one a snapshot ended with: it moved one of the tokens changed last, into the
    status the snapshot shows, at their time (a capacity change moves no token: it passes)."""
    latest = max((_micros(t.updated_at) for t in snapshot.tokens), default=None)
    last_moved = {(t.token_id, t.status) for t in snapshot.tokens if _micros(t.updated_at) == latest}

    def ended(event: pb.QueueEvent) -> bool:
        return event.kind == pb.EVENT_KIND_SLOT_CHANGED or (
            (event.token.token_id, event.token.status) in last_moved and _micros(event.occurred_at) == latest)
    return ended


def _micros(stamp: Any) -> int:
    return stamp.seconds * 1_000_000 + stamp.nanos // 1000


class _StallWatchdog:
    """Cancels a call that has brought no message for `seconds` while it was being read: on a path that died in
    silence no error ever comes, only silence. One thread per call, asleep until the deadline; `stop()` ends it."""

    def __init__(self, call: Any, seconds: float):
        self.seconds = seconds
        self.fired = False
        self._call = call
        self._deadline: float | None = time.monotonic() + seconds  # None while the reader holds a message
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="opd-watch-stall", daemon=True)
        self._thread.start()

    def pause(self) -> None:
        self._deadline = None

    def restart(self) -> None:
        self._deadline = time.monotonic() + self.seconds

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()

    def error(self) -> Unavailable:
        """What the watch reports for a stall: a dead connection, as UNAVAILABLE is."""
        return Unavailable(grpc.StatusCode.UNAVAILABLE,
                           f"no update came for {self.seconds:g} s, not even a heartbeat: the connection looks dead")

    def _watch(self) -> None:
        while not self._stopped.wait(self._seconds_left()):
            deadline = self._deadline
            if deadline is not None and time.monotonic() >= deadline:
                self.fired = True
                self._call.cancel()
                return

    def _seconds_left(self) -> float:
        """Until the deadline; while paused, `seconds`: a restart meanwhile sets a deadline later than that."""
        deadline = self._deadline
        return self.seconds if deadline is None else max(0.0, deadline - time.monotonic())


def _worth_reconnecting(error: OPDError) -> bool:
    """The server went away (shutdown, crash, reset transport, a path gone silent), has no room for a watcher just
    now, or dropped us for reading too slowly. CANCELLED that this watch did not ask for is gRPC's own answer to a
    stream that reached a server as its stop began (grpc/grpc#41785): a board reconnecting during a deploy had
    exited on it. (The client's own close() also ends a stream CANCELLED: Watch does not ask then.)"""
    if error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED) or "RST_STREAM" in error.message:
        return True
    if error.code is grpc.StatusCode.RESOURCE_EXHAUSTED and error.reason == "TOO_MANY_WATCHERS":
        return True  # the server may still count this watch's own stream from before a network failure
    return error.code is grpc.StatusCode.ABORTED and error.reason == "WATCHER_FELL_BEHIND"
