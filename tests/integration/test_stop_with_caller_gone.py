"""A server that stops just as a watcher's connection closes, through a real server on a loop of the test's own:
the watch's refusal (SERVER_SHUTTING_DOWN) cannot be sent to anyone, and that is all there is to it. No bug is
logged for it, and gRPC is not made to refuse a second abort (`UsageError: Abort already called!`)."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import grpc
import pytest

from opd_grpc._gen.opd.v1 import opd_pb2 as pb
from opd_grpc._gen.opd.v1 import opd_pb2_grpc
from opd_grpc.server import OPDServer
from opd_grpc.settings import Settings
from tests.support import DAY, make_doctor

pytestmark = pytest.mark.backend_independent  # its own SQLite file: what is tested is gRPC's end of a call

CLOSE_SECONDS = 0.5  # ample for gRPC core, on threads of its own, to cancel the stream of a closed connection


def test_a_watch_whose_connection_closes_as_the_server_stops_is_refused_once_and_no_error_is_logged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture):
    async def scenario() -> None:
        server = OPDServer(Settings.load(env={"OPD_DATABASE_URL": f"sqlite:///{tmp_path / 'opd.db'}",
                                              "OPD_LISTEN": "127.0.0.1:0", "OPD_METRICS_LISTEN": ""}))
        await server.start()
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        stub = opd_pb2_grpc.OPDTokenServiceStub(channel)
        doctor = await asyncio.to_thread(make_doctor, stub)
        watch = stub.WatchQueue(pb.WatchQueueRequest(doctor_ids=[doctor], date=DAY))
        await asyncio.to_thread(next, watch)  # the snapshot: the stream is open
        channel.close()
        busy_while_the_connection_closes()
        server.service.events.close()  # the stop's first word to watchers: reconnect, SERVER_SHUTTING_DOWN
        await server.stop(grace=1)

    with caplog.at_level(logging.INFO):
        asyncio.run(scenario())
    (line,) = [r.fields for r in caplog.records if getattr(r, "fields", {}).get("method") == "WatchQueue"]
    assert line["code"] == "UNAVAILABLE", "the watch was not refused: the test did not reach the refusal"
    assert [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR] == []


def busy_while_the_connection_closes() -> None:
    """Holds the server's event loop (as an engine call on SQLite does), so that gRPC core has cancelled the stream
    before the servicer is told: its refusal is then sent on a call that is gone."""
    time.sleep(CLOSE_SECONDS)
