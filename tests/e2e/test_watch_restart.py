"""SPEC §10 across a crash: a board's watch (the client library's) follows the queue through a SIGKILL of the
server and its restart on the same file, and sees every event exactly once, equal to the event table."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from clients.library import OPDClient
from opd_grpc._gen.opd.v1 import opd_pb2 as pb
from opd_grpc.process import ServerProcess
from tests.support import DAY, fresh_database, patient, stored_events

WATCHERS = 6
RESTARTS = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _event_table(database: str, doctor_id: str) -> list[tuple[int, str]]:
    return [(seq, kind) for seq, kind, _, _ in stored_events(database, doctor_id)]


def test_a_watcher_across_a_sigkill_and_restart_misses_nothing_and_sees_nothing_twice(tmp_path: Path):
    with fresh_database(tmp_path) as database:
        _watch_across_a_restart(database)


def _watch_across_a_restart(database: str) -> None:
    settings = {"LISTEN": f"127.0.0.1:{_free_port()}"}  # the restarted server comes back where the clients look
    server = ServerProcess(database, settings=settings)
    server.start()
    # The library's defaults outlast the restart (a second or so): each allocation is retried with its own
    # request_id until its 5 s deadline, so it lands once.
    client = OPDClient(server.address)
    try:
        doctor = client.create_doctor("Dr Asha Rao", "General Medicine").doctor.doctor_id
        client.create_slots(doctor, [pb.SlotSpec(date=DAY, start_time="09:00", end_time="12:00", max_capacity=400)])
        watch = client.watch([doctor], DAY)
        seen: list[tuple[int, str]] = []
        snapshots: list[int] = []

        def follow() -> None:
            for update in watch:
                if update.WhichOneof("update") == "snapshot":
                    snapshots.append(update.snapshot.sequence)
                elif update.WhichOneof("update") == "event":
                    seen.append((update.event.sequence, pb.EventKind.Name(update.event.kind)))

        reader = threading.Thread(target=follow, daemon=True)
        reader.start()
        numbers: list[int] = []

        def allocate(first: int, count: int) -> None:
            for n in range(first, first + count):
                numbers.append(client.allocate_token(patient=patient(n), doctor_id=doctor, date=DAY,
                                                     source=pb.SOURCE_WALK_IN).token.token_number)

        allocate(0, 40)
        writer = threading.Thread(target=allocate, args=(40, 160))
        writer.start()
        while len(numbers) < 100:
            time.sleep(0.005)
        server.kill()  # mid-stream, with allocations in flight
        server = ServerProcess(database, settings=settings)
        server.start()
        writer.join(timeout=60)
        allocate(200, 20)

        table = _event_table(database, doctor)
        deadline = time.monotonic() + 20
        while len(seen) < len(table) - snapshots[0] and time.monotonic() < deadline:
            time.sleep(0.05)
        watch.cancel()
        reader.join(timeout=10)
    finally:
        client.close()
        server.stop()

    assert sorted(numbers) == list(range(1, 221))  # every allocation landed once, retries included
    assert len(snapshots) == 1 and watch.reconnects >= 1  # resumed after the restart: no second snapshot
    assert seen == _event_table(database, doctor)[snapshots[0]:]  # every later sequence once, in order


def test_watchers_ride_out_graceful_restarts_however_they_meet_the_stop(tmp_path: Path):
    """A board reconnecting as the server's stop began met gRPC's own CANCELLED and exited: through 8 restarts,
    4 of 6 watches of the old library ended so (a reviewer saw 2 of 3 boards die on a deploy). Each restart here
    comes at another moment after the last; every watch must live through all of them and see every event."""
    with fresh_database(tmp_path) as database:
        settings = {"LISTEN": f"127.0.0.1:{_free_port()}", "METRICS_LISTEN": ""}
        server = ServerProcess(database, settings=settings)
        server.start()
        client = OPDClient(server.address)
        failures: list[str] = []
        seen: dict[int, list[int]] = {n: [] for n in range(WATCHERS)}  # each watch's event sequences, in order
        try:
            doctor = client.create_doctor("Dr Asha Rao", "General Medicine").doctor.doctor_id
            client.create_slots(doctor, [pb.SlotSpec(date=DAY, start_time="09:00", end_time="12:00",
                                                     max_capacity=400)])
            for n in (100, 101):  # the snapshots are of a day that has begun: the first resume checks against them
                client.allocate_token(patient=patient(n), doctor_id=doctor, date=DAY, source=pb.SOURCE_WALK_IN)
            watchers = [OPDClient(server.address) for _ in range(WATCHERS)]

            def follow(n: int) -> None:
                try:
                    for update in watchers[n].watch([doctor], DAY):
                        if update.WhichOneof("update") == "snapshot":
                            seen[n].append(update.snapshot.sequence)
                        elif update.WhichOneof("update") == "event":
                            seen[n].append(update.event.sequence)
                except Exception as error:  # an OPDError: the watch gave up
                    failures.append(repr(error))

            readers = [threading.Thread(target=follow, args=(n,), daemon=True) for n in range(WATCHERS)]
            for reader in readers:
                reader.start()
            time.sleep(0.5)
            for restart in range(RESTARTS):
                server.stop()
                time.sleep(0.05 * (restart % 4))
                server = ServerProcess(database, settings=settings)
                server.start()
                time.sleep(0.5)
                client.allocate_token(patient=patient(restart), doctor_id=doctor, date=DAY, source=pb.SOURCE_WALK_IN)
            last = _event_table(database, doctor)[-1][0]
            deadline = time.monotonic() + 20
            while any(seen[n][-1:] != [last] for n in range(WATCHERS)) and time.monotonic() < deadline \
                    and not failures:
                time.sleep(0.05)
            assert failures == [] and all(reader.is_alive() for reader in readers)
            # one snapshot, then every later event once, in order, through all the restarts
            assert all(seen[n] == list(range(seen[n][0], last + 1)) for n in range(WATCHERS)), seen
            for watcher in watchers:
                watcher.close()
        finally:
            client.close()
            server.stop()
