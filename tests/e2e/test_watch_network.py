"""A network path that dies in silence (a host frozen or unplugged, a NAT that forgot the flow: packets dropped, no
RST, the connection left open) under a display board's watch. The board's watch notices within seconds, with no
error ever coming, and reconnects, missing nothing and showing nothing twice once the path is back; the server
notices the dead board and frees its MAX_WATCHERS place. The path is a TCP proxy that black-holes it."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import grpc
import pytest

from clients.library import OPDClient, OPDError, Watch
from opd_grpc import server as server_module
from opd_grpc._gen.opd.v1 import opd_pb2 as pb
from tests.support import DAY, Cuttable, LiveServer, eventually, make_doctor, patient

pytestmark = pytest.mark.backend_independent  # its own SQLite file: what is tested is the network

HEARTBEAT_SECONDS = 0.5
STALL_SECONDS = 2.0  # well under the client's keepalive (a ping after 10 s of silence, 5 s for its ack)


@contextlib.contextmanager
def behind_a_proxy(tmp_path: Path) -> Iterator[tuple[LiveServer, Cuttable]]:
    """A server with quick heartbeats, and a proxy in front of it for the board to connect through."""
    live = LiveServer(f"sqlite:///{tmp_path / 'opd.db'}", WATCH_HEARTBEAT_SECONDS=HEARTBEAT_SECONDS)
    proxy = Cuttable(("127.0.0.1", live.server.port))
    try:
        yield live, proxy
    finally:
        live.close()  # first: its streams end while their connections are still open
        proxy.cut()


class Board:
    """A watch read on a thread of its own, as clients/board.py reads one: the snapshots and events it was shown."""

    def __init__(self, watch: Watch):
        self.watch = watch
        self.snapshots: list[int] = []
        self.events: list[tuple[int, str]] = []  # (sequence, kind)
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for update in self.watch:
            with self._changed:
                if update.WhichOneof("update") == "snapshot":
                    self.snapshots.append(update.snapshot.sequence)
                elif update.WhichOneof("update") == "event":
                    self.events.append((update.event.sequence, pb.EventKind.Name(update.event.kind)))
                self._changed.notify_all()

    def wait_until(self, shown: Callable[[Board], bool], timeout: float = 10.0) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: shown(self), timeout), \
                f"gave up waiting; shown {self.snapshots} then {self.events}"

    def end(self, within: float = 1.0) -> None:
        """Cancels the watch from this thread and waits, at most `within` seconds, for the reading to end."""
        self.watch.cancel()
        self._thread.join(timeout=within)
        assert not self._thread.is_alive(), "the watch went on after cancel()"


def client_side_threads() -> set[threading.Thread]:
    """Threads other than the in-process server's pools, which start threads on demand."""
    return {t for t in threading.enumerate() if not t.name.startswith(("opd-engine", "asyncio_"))}


def allocate(desk: OPDClient, doctor: str, numbers: range) -> None:
    for n in numbers:
        desk.allocate_token(patient=patient(n), doctor_id=doctor, date=DAY, source=pb.SOURCE_WALK_IN)


def test_a_watch_on_a_path_gone_silent_reconnects_within_seconds_and_misses_nothing(tmp_path: Path):
    with behind_a_proxy(tmp_path) as (live, proxy), \
            OPDClient(proxy.address) as board_client, OPDClient(live.address) as desk:
        doctor = desk.create_doctor("Dr Asha Rao", "General Medicine").doctor.doctor_id
        desk.create_slots(doctor, [pb.SlotSpec(date=DAY, start_time="09:00", end_time="12:00", max_capacity=50)])
        reconnects: list[tuple[OPDError, int]] = []
        reconnected = threading.Event()

        def on_reconnect(error: OPDError) -> None:
            reconnects.append((error, watch.reconnects))
            reconnected.set()

        watch = board_client.watch([doctor], DAY, stall_seconds=STALL_SECONDS, on_reconnect=on_reconnect)
        board = Board(watch)
        board.wait_until(lambda b: len(b.snapshots) == 1)
        allocate(desk, doctor, range(0, 5))
        board.wait_until(lambda b: len(b.events) == 5)

        proxy.black_hole()
        silent_since = time.monotonic()
        allocate(desk, doctor, range(5, 10))  # the clinic goes on; the board hears nothing of it, nor an error
        assert reconnected.wait(timeout=8), "the watch did not notice that nothing came any more"
        assert time.monotonic() - silent_since < 8
        error, count = reconnects[0]
        assert count == 1 and error.code == grpc.StatusCode.UNAVAILABLE
        assert f"no update came for {STALL_SECONDS:g} s" in error.message, error
        assert len(board.events) == 5  # nothing came through the silent path

        proxy.restore()
        table = [(e.sequence, pb.EventKind.Name(e.kind)) for e in desk.iter_queue_events(doctor, DAY)]
        board.wait_until(lambda b: b.events[-1][0] == table[-1][0])
        assert board.events == [e for e in table if e[0] > board.snapshots[0]]  # each once, in order, no gap
        assert len(board.snapshots) == 1 and len(board.events) == 10
        board.end()
    assert not [t for t in threading.enumerate() if t.name == "opd-watch-stall"]


def test_cancel_from_another_thread_ends_a_watch_waiting_on_a_silent_path_at_once_with_no_reconnect(tmp_path: Path):
    with behind_a_proxy(tmp_path) as (live, proxy), OPDClient(proxy.address) as board_client:
        doctor = make_doctor(live.stub)
        board_client.get_doctor(doctor)  # connected: the threads of the connection are there before the watch
        threads_before = client_side_threads()
        reconnects: list[OPDError] = []
        board = Board(board_client.watch([doctor], DAY, stall_seconds=STALL_SECONDS, on_reconnect=reconnects.append))
        board.wait_until(lambda b: len(b.snapshots) == 1)
        proxy.black_hole()
        silent_since = time.monotonic()
        time.sleep(STALL_SECONDS / 2)  # the watch waits for an update that will not come

        board.end(within=1.0)
        time.sleep(max(0.0, silent_since + STALL_SECONDS + 0.5 - time.monotonic()))  # past when a stall would be
        assert reconnects == [] and board.watch.reconnects == 0
        eventually(lambda: client_side_threads() - threads_before, set(), timeout=2)


def test_the_server_drops_a_board_whose_path_went_silent_and_frees_its_watcher_place(tmp_path: Path,
                                                                                   monkeypatch: pytest.MonkeyPatch):
    """The server's keepalive quickened from a ping after 20 s and 10 s for its ack to half a second each: the
    board is dropped in a second or two instead of about 30."""
    monkeypatch.setattr(server_module, "KEEPALIVE_PING_SECONDS", 0.5)
    monkeypatch.setattr(server_module, "KEEPALIVE_ACK_SECONDS", 0.5)
    with behind_a_proxy(tmp_path) as (live, proxy), OPDClient(proxy.address) as board_client:
        doctor = make_doctor(live.stub)
        board = Board(board_client.watch([doctor], DAY))  # the board's own stall detection is 30 s away
        board.wait_until(lambda b: len(b.snapshots) == 1 and live.server.pipeline.watchers.count == 1)

        proxy.black_hole()
        eventually(lambda: live.server.pipeline.watchers.count, 0, timeout=5)
        board.end()
