"""A thin typed client of opd.v1.OPDTokenService for hospital systems, the display board, opdctl and the simulation.

Each call has its own deadline; a call that changes state always carries a `request_id` (SPEC §9), so it can be
replayed safely: UNAVAILABLE (and, for those calls, DEADLINE_EXCEEDED) is retried with the same `request_id`.
Refusals come back as `OPDError`s that a person can read. `watch` follows WatchQueue across reconnects and server
restarts, resuming after the last sequence seen per doctor (SPEC §10).
"""

from __future__ import annotations

import datetime as dt
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
MAX_RECONNECT_DELAY = 2.0  # seconds; a watch keeps trying at least this often while the server is away
LIST_PAGE_SIZE = 500


class OPDError(Exception):
    """A failed call: the status code, the server's message, its ErrorInfo reason and BadRequest field problems."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str = "",
                 field_violations: list[tuple[str, str]] | None = None):
        self.code = code
        self.message = message
        self.reason = reason
        self.field_violations = field_violations or []
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
        reason, violations = "", []
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
        for detail in status.details if status else []:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = info.reason
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations = [(v.field, v.description) for v in bad.field_violations]
        return _ERROR_BY_CODE.get(code, OPDError)(code, message, reason, violations)


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
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.ABORTED: Aborted,
}


def tls_credentials(ca_cert: Path | None = None, cert: Path | None = None,
                    key: Path | None = None) -> grpc.ChannelCredentials:
    """TLS from PEM files: `ca_cert` to trust a server whose CA the system does not know, `cert` and `key` to present
    a client certificate to a server that asks for one (TLS_CLIENT_CA_FILE, mutual TLS). Reading a file may raise
    OSError."""
    if (cert is None) != (key is None):
        raise ValueError("a client certificate needs its private key, and a key its certificate: give both")
    return grpc.ssl_channel_credentials(root_certificates=ca_cert.read_bytes() if ca_cert else None,
                                        private_key=key.read_bytes() if key else None,
                                        certificate_chain=cert.read_bytes() if cert else None)


def server_zone(stats: pb.GetStatsResponse) -> dt.tzinfo:
    """The hospital's time zone, the server's TIMEZONE as GetStats names it: dates and slot times are its wall clock.
    An older server names none: UTC."""
    return ZoneInfo(stats.timezone) if stats.timezone else dt.timezone.utc


class OPDClient:
    """One connection to the OPD token service; a context manager that closes the channel it opened.

    With `credentials` (see `tls_credentials`) the channel it opens speaks TLS; without, plaintext."""

    def __init__(self, address: str | None = None, *, channel: grpc.Channel | None = None, timeout: float = 5.0,
                 attempts: int = 4, backoff: float = 0.1, api_key: str | None = None,
                 credentials: grpc.ChannelCredentials | None = None):
        if channel is not None and (address is not None or credentials is not None):
            raise ValueError("give an address (and credentials) or a channel, not both")
        target = address or DEFAULT_ADDRESS
        self._owned_channel = None if channel is not None else (
            grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target))
        self._stub = opd_pb2_grpc.OPDTokenServiceStub(channel or self._owned_channel)
        self.timeout = timeout
        self.attempts = max(1, attempts)
        self.backoff = backoff
        self.metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    def close(self) -> None:
        if self._owned_channel is not None:
            self._owned_channel.close()

    def __enter__(self) -> OPDClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _call(self, method: str, request: Message) -> Any:
        """Calls `method` with a deadline per attempt, retrying what is safe to retry; failures become OPDError.

        A request with a `request_id` field changes state: it gets a fresh id unless the caller gave one, and every
        attempt sends that same id, so the server applies it once even if an earlier attempt did reach it."""
        retryable = {grpc.StatusCode.UNAVAILABLE}
        if "request_id" in request.DESCRIPTOR.fields_by_name:
            if not request.request_id:  # type: ignore[attr-defined]
                request.request_id = str(uuid.uuid4())  # type: ignore[attr-defined]
            retryable.add(grpc.StatusCode.DEADLINE_EXCEEDED)
        rpc = getattr(self._stub, method)
        for attempt in range(self.attempts):
            try:
                return rpc(request, timeout=self.timeout, metadata=self.metadata)
            except grpc.RpcError as error:
                if error.code() not in retryable or attempt + 1 == self.attempts:  # type: ignore[attr-defined]
                    raise OPDError.from_rpc_error(error) from None
            time.sleep(self.backoff * 2 ** attempt)
        raise AssertionError("unreachable: the last attempt returns or raises")

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
              on_reconnect: Callable[[OPDError], object] | None = None) -> Watch:
        """Follows the doctors' queues on `date`; iterate the answer for snapshots, events and heartbeats."""
        return Watch(self, list(doctor_ids), date, after_sequence, after_sequences or {}, reconnect, on_reconnect)


class Watch:
    """A WatchQueue stream that reconnects by itself and resumes where it left off, so each event comes once.

    Iterating opens the stream; leaving the loop (or `close()` on the iterator) cancels it, and iterating again
    resumes after `last_sequences`. `cancel()` may be called from any thread and ends the iteration for good.
    The stream has no deadline: it is meant to stay open."""

    def __init__(self, client: OPDClient, doctor_ids: list[str], date: str, after_sequence: int | None,
                 after_sequences: dict[str, int], reconnect: bool,
                 on_reconnect: Callable[[OPDError], object] | None):
        self.doctor_ids = doctor_ids
        self.date = date
        self.reconnect = reconnect
        self.on_reconnect = on_reconnect
        # The resume point per doctor: the last sequence seen, or the caller's start for doctors not seen yet.
        # A doctor that is absent here gets a snapshot (the caller asked for one and none has come yet).
        start = dict.fromkeys(doctor_ids, after_sequence) if after_sequence is not None else {}
        self.last_sequences: dict[str, int] = {**start, **after_sequences}
        self._after_sequence = after_sequence
        self.reconnects = 0
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
        try:
            while not self._cancelled.is_set():
                self._call = self._client._stub.WatchQueue(self._request(), metadata=self._client.metadata)
                if self._cancelled.is_set():  # cancel() ran before the call was stored
                    return
                try:
                    for update in self._call:
                        delay = self._client.backoff
                        if self._is_new(update):
                            yield update
                    return  # the server ended the stream normally
                except grpc.RpcError as failure:
                    if self._cancelled.is_set():
                        return
                    error = OPDError.from_rpc_error(failure)
                    if not (self.reconnect and _worth_reconnecting(error)):
                        raise error from None
                self.reconnects += 1
                if self.on_reconnect is not None:
                    self.on_reconnect(error)
                if self._cancelled.wait(delay):
                    return
                delay = min(max(delay, 0.01) * 2, MAX_RECONNECT_DELAY)
        finally:
            if self._call is not None:
                self._call.cancel()

    def _request(self) -> pb.WatchQueueRequest:
        """The caller's request, with each doctor seen so far resuming after its last sequence."""
        return pb.WatchQueueRequest(doctor_ids=self.doctor_ids, date=self.date, after_sequence=self._after_sequence,
                                    after_sequences=self.last_sequences)

    def _is_new(self, update: pb.WatchQueueResponse) -> bool:
        """Remembers each doctor's sequence; drops an event already seen (a replay must never show twice)."""
        kind = update.WhichOneof("update")
        if kind == "heartbeat":
            return True
        item = update.snapshot if kind == "snapshot" else update.event
        if kind == "event" and item.sequence <= self.last_sequences.get(item.doctor_id, -1):
            return False
        self.last_sequences[item.doctor_id] = item.sequence
        return True


def _worth_reconnecting(error: OPDError) -> bool:
    """The server went away (shutdown, crash, reset transport) or dropped us for reading too slowly."""
    if error.code is grpc.StatusCode.UNAVAILABLE or "RST_STREAM" in error.message:
        return True
    return error.code is grpc.StatusCode.ABORTED and error.reason == "WATCHER_FELL_BEHIND"
