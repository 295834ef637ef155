"""`opd.v1.OPDTokenService`: each method translates its request, runs one use case of the engine (through
the `EngineRunner`: the engine and storage are synchronous), and translates the answer or the refusal."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import AsyncIterator
from typing import Any, Callable, NoReturn, TypeVar

import grpc
from google.protobuf.message import Message

from opd_grpc._gen.opd.v1 import opd_pb2 as pb
from opd_grpc._gen.opd.v1 import opd_pb2_grpc
from opd_grpc.api import auth, convert
from opd_grpc.api.runner import EngineRunner
from opd_grpc.api.status import from_engine_error
from opd_grpc.engine.errors import EngineError
from opd_grpc.engine.model import QueueEvent, Source
from opd_grpc.engine.service import Call, OPDService, Replay, Retry
from opd_grpc.engine.watch import QueueWatch

R = TypeVar("R", bound=Message)


class OPDTokenServicer(opd_pb2_grpc.OPDTokenServiceServicer):
    def __init__(self, service: OPDService, run: EngineRunner, watch: QueueWatch):
        self.service = service
        self.run = run
        self.watch = watch

    async def _call(self, context: grpc.aio.ServicerContext, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return await self.run(fn, *args)
        except Exception as error:
            await _refuse(context, error)

    async def _change(self, context: grpc.aio.ServicerContext, request: Message, response: type[R],
                      render: Callable[[Any], R], fn: Callable[..., Any], *args: Any) -> R:
        """A state-changing call, audited under its caller (SPEC §13): with a request_id, its first answer is
        stored and replayed (SPEC §9)."""
        retry, rendered = None, []

        def encode(result: Any) -> bytes:
            """The reply, rendered once for the store and the caller. An attempt that the engine runs again after
            it lost a race (service._retried) renders its own result: the failed attempt's reply is dropped."""
            rendered[:] = [render(result)]
            return rendered[0].SerializeToString()

        if request_id := request.request_id:
            retry = Retry(request_id, type(request).__name__, _fingerprint(request), encode)
        call = Call(auth.CALLER.get(), type(request).__name__.removesuffix("Request"), retry)
        result = await self._call(context, fn, *args, call)
        if isinstance(result, Replay):
            return response.FromString(result.response)
        return rendered[0] if rendered else render(result)

    # ---- doctors and slots ----

    async def CreateDoctor(self, request: pb.CreateDoctorRequest, context: Any) -> pb.CreateDoctorResponse:
        return await self._change(context, request, pb.CreateDoctorResponse,
                                  lambda d: pb.CreateDoctorResponse(doctor=convert.doctor(d)),
                                  self.service.create_doctor, request.name, request.specialization)

    async def GetDoctor(self, request: pb.GetDoctorRequest, context: Any) -> pb.GetDoctorResponse:
        doctor = await self._call(context, self.service.get_doctor, request.doctor_id)
        return pb.GetDoctorResponse(doctor=convert.doctor(doctor))

    async def ListDoctors(self, request: pb.ListDoctorsRequest, context: Any) -> pb.ListDoctorsResponse:
        page = await self._call(context, self.service.list_doctors, request.page_size, request.page_token)
        return pb.ListDoctorsResponse(doctors=[convert.doctor(d) for d in page.items],
                                      next_page_token=page.next_page_token)

    async def CreateSlots(self, request: pb.CreateSlotsRequest, context: Any) -> pb.CreateSlotsResponse:
        return await self._change(context, request, pb.CreateSlotsResponse,
                                  lambda slots: pb.CreateSlotsResponse(slots=[convert.slot(s) for s in slots]),
                                  self.service.create_slots, request.doctor_id, convert.slot_requests(request))

    async def ListSlots(self, request: pb.ListSlotsRequest, context: Any) -> pb.ListSlotsResponse:
        page = await self._call(context, self.service.list_slots, request.doctor_id, request.date,
                                request.page_size, request.page_token)
        return pb.ListSlotsResponse(slots=[convert.slot(s) for s in page.items], next_page_token=page.next_page_token)

    async def UpdateSlotCapacity(self, request: pb.UpdateSlotCapacityRequest,
                                 context: Any) -> pb.UpdateSlotCapacityResponse:
        return await self._change(context, request, pb.UpdateSlotCapacityResponse, convert.capacity_change,
                                  self.service.update_slot_capacity, request.slot_id, request.max_capacity)

    async def GetSlotStatus(self, request: pb.GetSlotStatusRequest, context: Any) -> pb.GetSlotStatusResponse:
        return convert.slot_status(await self._call(context, self.service.get_slot_status, request.slot_id))

    # ---- weekly patterns of slots, and holidays ----

    async def SetSlotTemplate(self, request: pb.SetSlotTemplateRequest, context: Any) -> pb.SetSlotTemplateResponse:
        return await self._change(context, request, pb.SetSlotTemplateResponse,
                                  lambda t: pb.SetSlotTemplateResponse(template=convert.slot_template(t)),
                                  self.service.set_slot_template, request.doctor_id, convert.template_slots(request))

    async def GetSlotTemplate(self, request: pb.GetSlotTemplateRequest, context: Any) -> pb.GetSlotTemplateResponse:
        template = await self._call(context, self.service.slot_template, request.doctor_id)
        return pb.GetSlotTemplateResponse(template=convert.slot_template(template))

    async def ApplySlotTemplate(self, request: pb.ApplySlotTemplateRequest,
                                context: Any) -> pb.ApplySlotTemplateResponse:
        return await self._change(context, request, pb.ApplySlotTemplateResponse, convert.application,
                                  self.service.apply_slot_template, request.doctor_id, request.start_date,
                                  request.end_date)

    async def CreateHoliday(self, request: pb.CreateHolidayRequest, context: Any) -> pb.CreateHolidayResponse:
        return await self._change(context, request, pb.CreateHolidayResponse,
                                  convert.new_holiday,
                                  self.service.create_holiday, request.date, request.name)

    async def ListHolidays(self, request: pb.ListHolidaysRequest, context: Any) -> pb.ListHolidaysResponse:
        page = await self._call(context, self.service.list_holidays, request.start_date, request.end_date,
                                request.page_size, request.page_token)
        return pb.ListHolidaysResponse(holidays=[convert.holiday(h) for h in page.items],
                                       next_page_token=page.next_page_token)

    async def DeleteHoliday(self, request: pb.DeleteHolidayRequest, context: Any) -> pb.DeleteHolidayResponse:
        return await self._change(context, request, pb.DeleteHolidayResponse,
                                  lambda h: pb.DeleteHolidayResponse(holiday=convert.holiday(h)),
                                  self.service.delete_holiday, request.date)

    # ---- tokens ----

    async def AllocateToken(self, request: pb.AllocateTokenRequest, context: Any) -> pb.AllocateTokenResponse:
        command = convert.allocate_command(request, convert.source(request.source))
        return await self._change(context, request, pb.AllocateTokenResponse,
                                  functools.partial(convert.allocation, response=pb.AllocateTokenResponse),
                                  self.service.allocate, command)

    async def AllocateEmergency(self, request: pb.AllocateEmergencyRequest,
                                context: Any) -> pb.AllocateEmergencyResponse:
        command = convert.allocate_command(request, Source.EMERGENCY)
        return await self._change(context, request, pb.AllocateEmergencyResponse,
                                  functools.partial(convert.allocation, response=pb.AllocateEmergencyResponse),
                                  self.service.allocate, command)

    async def CancelToken(self, request: pb.CancelTokenRequest, context: Any) -> pb.CancelTokenResponse:
        return await self._change(context, request, pb.CancelTokenResponse,
                                  functools.partial(convert.release, response=pb.CancelTokenResponse),
                                  self.service.cancel, request.token_id, request.reason)

    async def MarkNoShow(self, request: pb.MarkNoShowRequest, context: Any) -> pb.MarkNoShowResponse:
        return await self._change(context, request, pb.MarkNoShowResponse,
                                  functools.partial(convert.release, response=pb.MarkNoShowResponse),
                                  self.service.mark_no_show, request.token_id)

    async def CheckInToken(self, request: pb.CheckInTokenRequest, context: Any) -> pb.CheckInTokenResponse:
        return await self._change(context, request, pb.CheckInTokenResponse,
                                  lambda v: pb.CheckInTokenResponse(token=convert.token(v)),
                                  self.service.check_in, request.token_id)

    async def CallNext(self, request: pb.CallNextRequest, context: Any) -> pb.CallNextResponse:
        return await self._change(context, request, pb.CallNextResponse, convert.call_result,
                                  self.service.call_next, request.doctor_id, request.date)

    async def CompleteToken(self, request: pb.CompleteTokenRequest, context: Any) -> pb.CompleteTokenResponse:
        return await self._change(context, request, pb.CompleteTokenResponse,
                                  lambda v: pb.CompleteTokenResponse(token=convert.token(v)),
                                  self.service.complete, request.token_id)

    async def GetToken(self, request: pb.GetTokenRequest, context: Any) -> pb.GetTokenResponse:
        return pb.GetTokenResponse(token=convert.token(
            await self._call(context, self.service.get_token, request.token_id)))

    async def ListTokens(self, request: pb.ListTokensRequest, context: Any) -> pb.ListTokensResponse:
        page = await self._call(context, self.service.list_tokens, request.doctor_id, request.date,
                                request.page_size, request.page_token)
        return pb.ListTokensResponse(tokens=[convert.token(v) for v in page.items],
                                     next_page_token=page.next_page_token)

    async def GetStats(self, request: pb.GetStatsRequest, context: Any) -> pb.GetStatsResponse:
        stats = await self._call(context, self.service.stats, request.date, request.doctor_id)
        return pb.GetStatsResponse(stats=[convert.stats(s) for s in stats], timezone=str(self.service.rules.timezone))

    async def ListAuditEntries(self, request: pb.ListAuditEntriesRequest,
                               context: Any) -> pb.ListAuditEntriesResponse:
        start = (request.start_time.seconds, request.start_time.nanos) if request.HasField("start_time") else None
        end = (request.end_time.seconds, request.end_time.nanos) if request.HasField("end_time") else None
        page = await self._call(context, self.service.audit_entries, request.token_id, start, end,
                                request.page_size, request.page_token)
        return pb.ListAuditEntriesResponse(entries=[convert.audit_entry(e) for e in page.items],
                                           next_page_token=page.next_page_token)

    async def ListQueueEvents(self, request: pb.ListQueueEventsRequest, context: Any) -> pb.ListQueueEventsResponse:
        page = await self._call(context, self.service.queue_events, request.doctor_id, request.date,
                                request.after_sequence, request.page_size, request.page_token)
        return pb.ListQueueEventsResponse(events=[convert.queue_event(e) for e in page.items],
                                          next_page_token=page.next_page_token)

    # ---- watching ----

    async def WatchQueue(self, request: pb.WatchQueueRequest, context: Any) -> AsyncIterator[pb.WatchQueueResponse]:
        after = request.after_sequence if request.HasField("after_sequence") else None
        plan = await self._call(context, self.service.watch_plan, list(request.doctor_ids), request.date, after,
                                dict(request.after_sequences))
        try:
            async for update in self.watch.stream(plan, auth.CALLER.get()):
                yield _rendered_event(update) if isinstance(update, QueueEvent) else convert.watch_update(update)
        except Exception as error:
            await _refuse(context, error)


@functools.lru_cache(maxsize=1024)
def _rendered_event(event: QueueEvent) -> pb.WatchQueueResponse:
    """One rendering for all of an event's watchers (the hub hands each the same event): with 1000 watchers the
    rendering was a fifth of the server's time per delivered event."""
    return convert.watch_update(event)


async def _refuse(context: grpc.aio.ServicerContext, error: Exception) -> NoReturn:
    """Ends the call with the engine's refusal; anything else is a bug, which the call pipeline logs and answers
    INTERNAL (api/interceptors.py)."""
    if isinstance(error, EngineError):
        await context.abort_with_status(from_engine_error(error))
    raise error


def _fingerprint(request: Message) -> bytes:
    """The request without its request_id, serialized deterministically and hashed."""
    copy = type(request)()
    copy.CopyFrom(request)
    copy.ClearField("request_id")
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).digest()
