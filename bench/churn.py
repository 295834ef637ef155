"""`python -m bench.churn`: watchers that come and go, and the server's memory. A memory figure, not a speed one,
and apart from `make bench`, which it would lengthen by minutes.

One server (SQLite, wall clock); one doctor-day of tokens. Then, `--rounds` times: `--watchers` WatchQueue
streams open at once, each reads its snapshot, `--events` tokens are cancelled (one event each, which every stream
reads), and every stream is cancelled. A cancelled token stays in the day and its snapshot, so the snapshot's size
stays the same from round to round, and a resident memory that kept rising would be something each stream leaves
behind; the first rounds set the peak (each new watcher's snapshot is rendered for it alone) that the allocator
keeps. Prints the server's resident memory after the day is filled and every `--every` rounds, and a last line of
JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid

import grpc

from bench.procfs import rss_mib
from opd_grpc._gen.opd.v1 import opd_pb2 as pb
from opd_grpc._gen.opd.v1 import opd_pb2_grpc
from opd_grpc.process import ServerProcess
from opd_grpc.settings import Settings

DATE = "2031-03-03"
SETTLE_SECONDS = 0.3  # after a round's cancels, for the server to end its streams before the memory is read


def day_size(args: argparse.Namespace) -> int:
    """Tokens in the day: one to cancel per event, and some left; a cancelled token stays in the day."""
    return args.rounds * args.events + 10


async def churn(address: str, pid: int, args: argparse.Namespace) -> list[tuple[int, float]]:
    """(rounds done, server MiB) after the day is filled (round 0) and every `args.every` rounds."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = opd_pb2_grpc.OPDTokenServiceStub(channel)
        doctor_id = (await stub.CreateDoctor(pb.CreateDoctorRequest(
            name="Dr Churn", specialization="General Medicine", request_id=str(uuid.uuid4())))).doctor.doctor_id
        await stub.CreateSlots(pb.CreateSlotsRequest(doctor_id=doctor_id, request_id=str(uuid.uuid4()), slots=[
            pb.SlotSpec(date=DATE, start_time="08:00", end_time="20:00", max_capacity=day_size(args))]))
        tokens = []
        for n in range(day_size(args)):
            answer = await stub.AllocateToken(pb.AllocateTokenRequest(
                patient=pb.Patient(name=f"Churn Patient {n}", phone=f"+91-90000-{n:07d}", age=30),
                doctor_id=doctor_id, date=DATE, source=pb.SOURCE_WALK_IN, request_id=str(uuid.uuid4())))
            tokens.append(answer.token.token_id)
        memory = [(0, rss_mib(pid))]
        for done in range(1, args.rounds + 1):
            streams = [stub.WatchQueue(pb.WatchQueueRequest(doctor_ids=[doctor_id], date=DATE))
                       for _ in range(args.watchers)]
            for stream in streams:
                await stream.read()  # the snapshot
            for _ in range(args.events):
                await stub.CancelToken(pb.CancelTokenRequest(token_id=tokens.pop(), request_id=str(uuid.uuid4())))
            for stream in streams:
                for _ in range(args.events):
                    await stream.read()
                stream.cancel()
            await asyncio.sleep(SETTLE_SECONDS)
            if done % args.every == 0 or done == args.rounds:
                memory.append((done, rss_mib(pid)))
                print(f"round {done}: server {memory[-1][1]:.1f} MiB", flush=True)
        return memory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.churn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--watchers", type=int, default=300, help="streams opened at once each round (default 300)")
    parser.add_argument("--rounds", type=int, default=45, help="rounds (default 45)")
    parser.add_argument("--events", type=int, default=5, help="cancellations each round (default 5)")
    parser.add_argument("--every", type=int, default=5, help="print the memory every N rounds (default 5)")
    args = parser.parse_args(argv)
    if min(args.watchers, args.rounds, args.events, args.every) < 1:
        parser.error("--watchers, --rounds, --events and --every are at least 1")
    server = ServerProcess(test_clock=False, settings={"MAX_WATCHERS": Settings.MAX_WATCHERS + args.watchers})
    server.start()
    try:
        memory = asyncio.run(churn(server.address, server.pid, args))
    finally:
        exit_code = server.stop()
    print(f"server {memory[0][1]:.1f} MiB with the day filled ({day_size(args)} tokens), "
          f"{memory[-1][1]:.1f} MiB after {args.rounds} rounds of {args.watchers} watchers")
    print(json.dumps({"watchers": args.watchers, "rounds": args.rounds, "events": args.events,
                      "tokens": day_size(args), "server_exit_code": exit_code,
                      "server_mib": [{"rounds": done, "mib": mib} for done, mib in memory]}))
    return 0 if exit_code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
