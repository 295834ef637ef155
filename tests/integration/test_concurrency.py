"""Race tests: many calls at once on one slot over real gRPC, the seat count must never exceed capacity."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from opd_grpc._gen.opd.v1 import opd_pb2 as pb
from opd_grpc._gen.opd.v1 import opd_pb2_grpc
from tests.support import DAY, LiveServer, all_tokens, live_server, make_doctor, make_slots, patient, spec_violations


@pytest.fixture
def roomy(tmp_path: Path) -> Iterator[LiveServer]:
    """A server whose waitlists hold everyone, so that 200 calls give 50 seats and 150 waitlisted."""
    yield from live_server(tmp_path, MAX_WAITLIST_SIZE=500)


async def _allocate_at_once(address: str, doctor: str, count: int) -> list[pb.AllocateTokenResponse | grpc.StatusCode]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = opd_pb2_grpc.OPDTokenServiceStub(channel)

        async def one(n: int) -> pb.AllocateTokenResponse | grpc.StatusCode:
            request = pb.AllocateTokenRequest(patient=patient(n), doctor_id=doctor, date=DAY,
                                              preferred_slot_time="09:00", source=pb.SOURCE_WALK_IN)
            try:
                return await stub.AllocateToken(request, timeout=60)
            except grpc.aio.AioRpcError as error:
                return error.code()

        return await asyncio.gather(*(one(n) for n in range(count)))


def test_200_concurrent_allocations_fill_50_seats_and_waitlist_150(roomy):
    doctor = make_doctor(roomy.stub)
    make_slots(roomy.stub, doctor, ("09:00", "13:00", 50))
    answers = asyncio.run(_allocate_at_once(roomy.address, doctor, 200))
    assert all(isinstance(a, pb.AllocateTokenResponse) for a in answers), Counter(map(str, answers))
    statuses = Counter(a.token.status for a in answers)
    assert statuses == {pb.STATUS_CONFIRMED: 50, pb.STATUS_WAITLISTED: 150}
    numbers = sorted(a.token.token_number for a in answers)
    assert numbers == list(range(1, 201))
    slot = roomy.stub.GetSlotStatus(pb.GetSlotStatusRequest(slot_id=f"{doctor}-20300107-0900"))
    assert (slot.seat_holders, slot.free_seats, len(slot.waitlist)) == (50, 0, 150)
    assert spec_violations(roomy.stub, doctor) == []


def test_200_concurrent_allocations_with_default_waitlist_refuse_the_rest_cleanly(live):
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("09:00", "13:00", 50))
    answers = asyncio.run(_allocate_at_once(live.address, doctor, 200))
    outcomes = Counter(a.token.status if isinstance(a, pb.AllocateTokenResponse) else a for a in answers)
    assert outcomes == {pb.STATUS_CONFIRMED: 50, pb.STATUS_WAITLISTED: 50,
                        grpc.StatusCode.RESOURCE_EXHAUSTED: 100}
    assert [t.token_number for t in all_tokens(live.stub, doctor)] == list(range(1, 101))
    assert spec_violations(live.stub, doctor) == []


async def _mixed_storm(address: str, doctor: str, seed: int) -> Counter[str]:
    """Allocations, emergencies and cancels racing on two small slots."""
    rng = random.Random(seed)
    outcomes: Counter[str] = Counter()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = opd_pb2_grpc.OPDTokenServiceStub(channel)
        issued: list[str] = []

        async def one(n: int) -> None:
            kind = rng.choice(["walk_in", "walk_in", "online", "emergency", "cancel"])
            try:
                if kind == "cancel" and issued:
                    await stub.CancelToken(pb.CancelTokenRequest(token_id=rng.choice(issued)), timeout=60)
                else:
                    source = {"walk_in": pb.SOURCE_WALK_IN, "online": pb.SOURCE_ONLINE_BOOKING,
                              "emergency": pb.SOURCE_EMERGENCY, "cancel": pb.SOURCE_FOLLOW_UP}[kind]
                    answer = await stub.AllocateToken(pb.AllocateTokenRequest(
                        patient=patient(n), doctor_id=doctor, date=DAY, source=source,
                        preferred_slot_time=rng.choice(["09:00", "10:00"])), timeout=60)
                    issued.append(answer.token.token_id)
                outcomes[f"{kind}:OK"] += 1
            except grpc.aio.AioRpcError as error:
                outcomes[f"{kind}:{error.code().name}"] += 1

        await asyncio.gather(*(one(n) for n in range(300)))
    return outcomes


def test_a_storm_of_mixed_calls_keeps_every_invariant(roomy):
    doctor = make_doctor(roomy.stub)
    make_slots(roomy.stub, doctor, ("09:00", "10:00", 5), ("10:00", "11:00", 5))
    outcomes = asyncio.run(_mixed_storm(roomy.address, doctor, seed=11))
    assert not [k for k in outcomes if k.endswith(("INTERNAL", "UNKNOWN"))], outcomes
    assert spec_violations(roomy.stub, doctor) == []
