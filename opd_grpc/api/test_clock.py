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

_INVALID_ARGUMENT = 3


class TestClockServicer(test_clock_pb2_grpc.TestClockServiceServicer):
    __test__ = False

    def __init__(self, clock: TestClock):
        self.clock = clock

    async def SetTime(self, request: pb.SetTimeRequest, context: Any) -> pb.SetTimeResponse:
        if not request.HasField("time"):
            await context.abort_with_status(rich_status(
                _INVALID_ARGUMENT, "time is required", "INVALID_ARGUMENT", [FieldViolation("time", "is required")]))
        return pb.SetTimeResponse(now=timestamp(self.clock.set(request.time.ToDatetime(tzinfo=dt.timezone.utc))))

    async def AdvanceTime(self, request: pb.AdvanceTimeRequest, context: Any) -> pb.AdvanceTimeResponse:
        by = request.duration.ToTimedelta()
        if by.total_seconds() < 0:
            await context.abort_with_status(rich_status(
                _INVALID_ARGUMENT, "duration must not be negative; use SetTime to go back", "INVALID_ARGUMENT",
                [FieldViolation("duration", "is negative")]))
        return pb.AdvanceTimeResponse(now=timestamp(self.clock.advance(by)))

    async def GetTime(self, request: pb.GetTimeRequest, context: Any) -> pb.GetTimeResponse:
        return pb.GetTimeResponse(now=timestamp(self.clock.now()))

