"""SPEC §3.7: an answered request survives a crash of the server process (SIGKILL)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc

from opd_grpc._gen.opd.v1 import opd_pb2 as pb
from opd_grpc._gen.opd.v1 import opd_pb2_grpc, test_clock_pb2, test_clock_pb2_grpc
from opd_grpc.api.convert import timestamp
from opd_grpc.process import ServerProcess
from tests.support import DAY, MORNING, all_tokens, fresh_database, make_doctor, make_slots, patient, spec_violations


async def _allocate_until_killed(server: ServerProcess, doctor: str, count: int) -> dict[str, int]:
    """Sends `count` allocations, 16 in flight, and kills the server once half are answered."""
    acknowledged: dict[str, int] = {}
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = opd_pb2_grpc.OPDTokenServiceStub(channel)
        queue: asyncio.Queue[int] = asyncio.Queue()
        for n in range(count):
            queue.put_nowait(n)

        async def worker() -> None:
            while not queue.empty():
                n = queue.get_nowait()
                try:
                    answer = await stub.AllocateToken(pb.AllocateTokenRequest(
                        patient=patient(n), doctor_id=doctor, date=DAY, source=pb.SOURCE_ONLINE_BOOKING),
                        timeout=10)
                except grpc.aio.AioRpcError:
                    continue  # unanswered: it may or may not have landed
                acknowledged[answer.token.token_id] = answer.token.token_number
                if len(acknowledged) == count // 2:
                    server.kill()

        await asyncio.gather(*(worker() for _ in range(16)))
    return acknowledged


def test_acknowledged_allocations_survive_sigkill(tmp_path: Path):
    with fresh_database(tmp_path) as database:
        _allocations_survive_sigkill(database)


def _allocations_survive_sigkill(database: str) -> None:
    server = ServerProcess(database)
    server.start()
    with grpc.insecure_channel(server.address) as channel:
        test_clock_pb2_grpc.TestClockServiceStub(channel).SetTime(test_clock_pb2.SetTimeRequest(time=timestamp(MORNING)))
        stub = opd_pb2_grpc.OPDTokenServiceStub(channel)
        doctor = make_doctor(stub)
        make_slots(stub, doctor, ("09:00", "12:00", 120), ("12:00", "13:00", 60))
    acknowledged = asyncio.run(_allocate_until_killed(server, doctor, 400))
    assert server.proc is not None and server.proc.returncode == -9
    assert len(acknowledged) >= 200

    with ServerProcess(database) as restarted, grpc.insecure_channel(restarted.address) as channel:
        test_clock_pb2_grpc.TestClockServiceStub(channel).SetTime(test_clock_pb2.SetTimeRequest(time=timestamp(MORNING)))
        stub = opd_pb2_grpc.OPDTokenServiceStub(channel)
        stored = {t.token_id: t.token_number for t in all_tokens(stub, doctor)}
        assert acknowledged.items() <= stored.items()
        assert spec_violations(stub, doctor) == []
        after = stub.AllocateToken(pb.AllocateTokenRequest(patient=patient(10_000), doctor_id=doctor, date=DAY,
                                                           source=pb.SOURCE_WALK_IN))
        assert after.token.token_number == len(stored) + 1
