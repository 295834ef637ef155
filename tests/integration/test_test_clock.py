"""opd.v1.TestClockService: it moves the clock every rule reads, and refuses times it cannot hold."""

from __future__ import annotations

import datetime as dt

import grpc
import pytest
from google.protobuf import duration_pb2, timestamp_pb2

from opd_grpc._gen.opd.v1 import opd_pb2 as pb
from opd_grpc._gen.opd.v1 import test_clock_pb2 as tc
from tests.support import MORNING, allocate, make_doctor, make_slots, refused


def test_advance_moves_the_clock_the_rules_read(live):
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("09:00", "10:00", 5))
    now = live.clock.AdvanceTime(tc.AdvanceTimeRequest(duration=duration_pb2.Duration(seconds=3 * 3600)))
    assert now.now.ToDatetime(tzinfo=dt.timezone.utc) == MORNING + dt.timedelta(hours=3)
    assert live.clock.GetTime(tc.GetTimeRequest()).now == now.now
    assert refused(live.stub.AllocateToken, pb.AllocateTokenRequest(
        patient=pb.Patient(name="Late", phone="1"), doctor_id=doctor, date="2030-01-07",
        source=pb.SOURCE_WALK_IN)).reason == "SLOT_CLOSED"


@pytest.mark.parametrize("call, request_, field", [
    ("SetTime", tc.SetTimeRequest(), "time"),
    ("SetTime", tc.SetTimeRequest(time=timestamp_pb2.Timestamp(seconds=10**13)), "time"),
    ("SetTime", tc.SetTimeRequest(time=timestamp_pb2.Timestamp(seconds=253_402_297_200)), "time"),  # 9999-12-31 23:00
    ("SetTime", tc.SetTimeRequest(time=timestamp_pb2.Timestamp(seconds=-5_000_000_000)), "time"),  # 1811
    ("AdvanceTime", tc.AdvanceTimeRequest(duration=duration_pb2.Duration(seconds=8000 * 366 * 86400)), "duration"),
    ("AdvanceTime", tc.AdvanceTimeRequest(duration=duration_pb2.Duration(seconds=-60)), "duration"),
    ("AdvanceTime", tc.AdvanceTimeRequest(duration=duration_pb2.Duration(seconds=10**12)), "duration"),
    ("SetTime", tc.SetTimeRequest(time=timestamp_pb2.Timestamp(seconds=1_900_000_000, nanos=10**9)), "time"),
    ("SetTime", tc.SetTimeRequest(time=timestamp_pb2.Timestamp(seconds=1_900_000_000, nanos=-1)), "time"),
    ("AdvanceTime", tc.AdvanceTimeRequest(), "duration"),
    ("AdvanceTime", tc.AdvanceTimeRequest(duration=duration_pb2.Duration(nanos=-5)), "duration"),
    ("AdvanceTime", tc.AdvanceTimeRequest(duration=duration_pb2.Duration(seconds=1, nanos=-5)), "duration"),
    ("AdvanceTime", tc.AdvanceTimeRequest(duration=duration_pb2.Duration(nanos=10**9)), "duration"),
])
def test_times_the_clock_cannot_hold_are_invalid_and_change_nothing(live, call, request_, field):
    failure = refused(getattr(live.clock, call), request_)
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT and field in failure.fields
    assert live.clock.GetTime(tc.GetTimeRequest()).now.ToDatetime(tzinfo=dt.timezone.utc) == MORNING
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("09:00", "10:00", 5))
    assert allocate(live.stub, doctor, 1).token.status == pb.STATUS_CONFIRMED

