"""A program that closes its OPDClient, from another thread, under a watch of that client (a board shutting down):
the watch ends with an OPDError, as every failure of the library does (CANCELLED, what gRPC says of a call whose
channel was closed), whether its stream was open or it was reconnecting; never with an error of gRPC's own."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest

from clients.library import OPDClient, OPDError, Watch
from tests.support import DAY, Cuttable, LiveServer, make_doctor

pytestmark = pytest.mark.backend_independent  # its own SQLite file: what is tested is the client library

WAIT = 5.0  # seconds before a step that should have happened fails the test instead of hanging it


class Reader:
    """A watch iterated on a thread of its own: the kinds of update it showed, and the error that ended it."""

    def __init__(self, watch: Watch):
        self.watch = watch
        self.kinds: list[str] = []
        self.error: Exception | None = None
        self.shown = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for update in self.watch:
                self.kinds.append(update.WhichOneof("update"))
                self.shown.set()
        except Exception as error:  # handed to the test by ended_with()
            self.error = error

    def ended_with(self) -> Exception | None:
        self._thread.join(timeout=WAIT)
        assert not self._thread.is_alive(), "the watch went on after its client was closed"
        return self.error


@pytest.mark.parametrize("when", ["reading", "reconnecting"])
def test_closing_the_client_under_its_watch_ends_the_watch_with_an_opd_error(tmp_path: Path, when: str):
    live = LiveServer(f"sqlite:///{tmp_path / 'opd.db'}")
    proxy = Cuttable(("127.0.0.1", live.server.port))
    try:
        doctor = make_doctor(live.stub)
        client = OPDClient(proxy.address)
        reconnecting, closed = threading.Event(), threading.Event()

        def on_reconnect(error: OPDError) -> None:
            reconnecting.set()
            closed.wait(WAIT)  # the program closes the client meanwhile

        reader = Reader(client.watch([doctor], DAY, on_reconnect=on_reconnect))
        assert reader.shown.wait(WAIT), "the watch showed no snapshot"
        if when == "reconnecting":
            proxy.cut()
            assert reconnecting.wait(WAIT), "the watch did not reconnect once its server was gone"
        client.close()
        closed.set()
        error = reader.ended_with()
    finally:
        live.close()  # first: its streams end while their connections are still open
        proxy.cut()
    assert isinstance(error, OPDError), f"the watch ended with {error!r}"
    assert error.code == grpc.StatusCode.CANCELLED
    assert reader.kinds == ["snapshot"]
    # Closed while reading, it ends at once: not taken for the server's CANCELLED, which a watch reconnects after
    assert reader.watch.reconnects == (1 if when == "reconnecting" else 0)
