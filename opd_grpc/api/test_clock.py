"""`opd.v1.TestClockService`: served only when the server was started with OPD_TEST_CLOCK=1."""

from __future__ import annotations

import datetime as dt
from typing import Any

from opd_grpc._gen.opd.v1 import test_clock_pb2 as pb
from opd_grpc._gen.opd.v1 import test_clock_pb2_grpc
from opd_grpc.api.convert import timestamp
from opd_grpc.api.status import rich_status
from opd_grpc.engine.clock import TestClock
from opd_grpc.engine.errors import FieldViolation
from opd_grpc.engine.parse import FIRST_DATE, LAST_DATE

_INVALID_ARGUMENT = 3
_NANOS = 1_000_000_000  # a Timestamp's and a Duration's nanos lie below this
# The dates a request may name: a clock past them would put the service's own passes (AUTO_NO_SHOW) past the
# calendar's end.
_OUT_OF_RANGE = f"is not a time from {FIRST_DATE.isoformat()} to {LAST_DATE.isoformat()}, the dates the service keeps"


class TestClockServicer(test_clock_pb2_grpc.TestClockServiceServicer):
    __test__ = False

    def __init__(self, clock: TestClock):
        self.clock = clock

    async def SetTime(self, request: pb.SetTimeRequest, context: Any) -> pb.SetTimeResponse:
        if not request.HasField("time"):
            await _refuse(context, "time", "is required")
        if not 0 <= request.time.nanos < _NANOS:
            await _refuse(context, "time", f"has nanos {request.time.nanos}, not between 0 and {_NANOS - 1}")
        try:
            when = request.time.ToDatetime(tzinfo=dt.timezone.utc)
        except (ValueError, OverflowError):
            when = None
        if when is None or not FIRST_DATE <= when.date() <= LAST_DATE:
            await _refuse(context, "time", _OUT_OF_RANGE)
        return pb.SetTimeResponse(now=timestamp(self.clock.set(when)))

    async def AdvanceTime(self, request: pb.AdvanceTimeRequest, context: Any) -> pb.AdvanceTimeResponse:
        if not request.HasField("duration"):
            await _refuse(context, "duration", 'is required (e.g. {"duration": "600s"})')
        seconds, nanos = request.duration.seconds, request.duration.nanos
        if seconds < 0 or nanos < 0:
            await _refuse(context, "duration", "is negative; use SetTime to go back")
        if nanos >= _NANOS:
            await _refuse(context, "duration", f"has nanos {nanos}, not between 0 and {_NANOS - 1}")
        try:
            by = request.duration.ToTimedelta()
        except (ValueError, OverflowError):
            await _refuse(context, "duration", "is not a valid duration")
        try:
            later = (self.clock.now() + by).date()
        except OverflowError:
            later = dt.date.max
        if later > LAST_DATE:
            await _refuse(context, "duration", f"moves the clock past {LAST_DATE.isoformat()}, the last date the "
                                               "service keeps")
        return pb.AdvanceTimeResponse(now=timestamp(self.clock.advance(by)))

    async def GetTime(self, request: pb.GetTimeRequest, context: Any) -> pb.GetTimeResponse:
        return pb.GetTimeResponse(now=timestamp(self.clock.now()))


async def _refuse(context: Any, field: str, problem: str) -> None:
    await context.abort_with_status(rich_status(_INVALID_ARGUMENT, f"{field} {problem}", "INVALID_ARGUMENT",
                                                [FieldViolation(field, problem)]))
