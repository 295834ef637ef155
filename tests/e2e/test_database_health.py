"""Health follows the database (server.py `_watch_database`): a replica whose PostgreSQL cannot be reached says
NOT_SERVING, on Check and on a Watch stream, and `opd_database_up` drops to 0, so that a load balancer sends
calls elsewhere; calls made meanwhile are refused UNAVAILABLE, never INTERNAL; once the database answers again,
health is SERVING and calls are served. The database is cut off by a TCP proxy in front of the real one."""

from __future__ import annotations

import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from opd_grpc._gen.opd.v1 import opd_pb2 as pb
from opd_grpc._gen.opd.v1 import opd_pb2_grpc
from opd_grpc.process import ServerProcess
from opd_grpc.server import STOP_ABANDONED_EXIT_CODE, STOP_MARGIN_SECONDS
from tests.support import (
    DAY, POSTGRES, TEST_DATABASE, Cuttable, LiveServer, eventually, failure, fresh_database, make_doctor, through,
)

pytestmark = pytest.mark.skipif(TEST_DATABASE != "postgresql", reason="a database reached over the network")

OPD = "opd.v1.OPDTokenService"
HUNG_GRACE_SECONDS = 2.0
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def database_up(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return next(s.value for family in text_string_to_metric_families(text) for s in family.samples
                if s.name == "opd_database_up")


def test_health_is_not_serving_while_the_database_is_out_of_reach_and_serving_once_it_is_back(tmp_path: Path):
    proxy = Cuttable(POSTGRES)
    with fresh_database(tmp_path) as url:
        live = LiveServer(through(proxy, url),
                          METRICS_LISTEN="127.0.0.1:0")
        try:
            health = health_pb2_grpc.HealthStub(live.channel)

            def status(service: str = OPD) -> int:
                return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

            watched: list[int] = []  # what a load balancer holding a Watch stream is sent
            stream = health.Watch(health_pb2.HealthCheckRequest(service=OPD))

            def read() -> None:
                try:
                    for answer in stream:
                        watched.append(answer.status)
                except grpc.RpcError:  # cancelled at the end
                    pass

            threading.Thread(target=read, daemon=True).start()
            doctor = make_doctor(live.stub)
            assert (status(), status(""), database_up(live.server.metrics_port)) == (SERVING, SERVING, 1)
            queue = live.stub.WatchQueue(pb.WatchQueueRequest(doctor_ids=[doctor], date=DAY), timeout=30)
            next(queue)  # its snapshot: the watch is open

            proxy.cut()
            eventually(status, NOT_SERVING)
            assert (status(""), database_up(live.server.metrics_port)) == (NOT_SERVING, 0)
            # A watch here would hear no other replica's changes while its heartbeats said it had them all: it
            # ends, and its client reconnects (to a replica that can read the database).
            with pytest.raises(grpc.RpcError) as ended:
                for _ in queue:
                    pass
            assert (failure(ended.value).code, failure(ended.value).reason) == (grpc.StatusCode.UNAVAILABLE,
                                                                                "DATABASE_UNAVAILABLE")
            with pytest.raises(grpc.RpcError) as refused:
                live.stub.CreateDoctor(pb.CreateDoctorRequest(name="Dr Meera Iyer", specialization="ENT"), timeout=30)
            assert failure(refused.value).code == grpc.StatusCode.UNAVAILABLE, failure(refused.value)

            proxy.restore()
            eventually(status, SERVING)
            assert (status(""), database_up(live.server.metrics_port)) == (SERVING, 1)
            make_doctor(live.stub, name="Dr Meera Iyer")
            assert len(live.stub.ListDoctors(pb.ListDoctorsRequest()).doctors) == 2
            eventually(lambda: watched, [SERVING, NOT_SERVING, SERVING])
            stream.cancel()
        finally:
            live.close()
            proxy.cut()


def test_a_database_that_stops_answering_turns_health_not_serving_and_a_hung_check_does_not_keep_it_so(
        tmp_path: Path):
    """Packets dropped, not refused: a new connection hangs. Health must not wait for it to say NOT_SERVING, and
    once the network is back, the connection attempt that hung gives up (CONNECT_TIMEOUT_SECONDS) so that the
    next check finds the database and health is SERVING again."""
    proxy = Cuttable(POSTGRES)
    with fresh_database(tmp_path) as url:
        live = LiveServer(through(proxy, url))
        try:
            health = health_pb2_grpc.HealthStub(live.channel)

            def status() -> int:
                return health.Check(health_pb2.HealthCheckRequest(service=OPD), timeout=5).status

            assert status() == SERVING
            proxy.stall()
            eventually(status, NOT_SERVING, timeout=5)
            time.sleep(1)  # a check is hanging now
            proxy.restore()
            eventually(status, SERVING, timeout=15)
            make_doctor(live.stub)
        finally:
            live.close()
            proxy.cut()


def test_a_stop_while_the_database_does_not_answer_ends_the_process_soon_after_its_grace(tmp_path: Path):
    """A call hangs on a black-holed database, and the health check beside it: neither thread can be stopped, and
    Python waits for both at exit. SIGTERM must still end the process, soon after SHUTDOWN_GRACE_SECONDS, saying
    so; the caller is told UNAVAILABLE, which it retries with its request_id."""
    proxy = Cuttable(POSTGRES)
    with fresh_database(tmp_path) as url:
        server = ServerProcess(through(proxy, url), test_clock=False,
                               settings={"SHUTDOWN_GRACE_SECONDS": HUNG_GRACE_SECONDS, "METRICS_LISTEN": ""})
        server.start()
        channel = grpc.insecure_channel(server.address)
        try:
            stub = opd_pb2_grpc.OPDTokenServiceStub(channel)
            make_doctor(stub)
            proxy.black_hole()
            hanging = stub.CreateDoctor.future(pb.CreateDoctorRequest(name="Dr Meera Iyer", specialization="ENT"),
                                               timeout=60)
            time.sleep(1.5)  # the call and a health check are waiting on the database
            began = time.monotonic()
            code = server.stop(timeout=60)
            took = time.monotonic() - began
            with pytest.raises(grpc.RpcError) as answer:
                hanging.result()
            assert answer.value.code() == grpc.StatusCode.UNAVAILABLE
            assert code == STOP_ABANDONED_EXIT_CODE, server.output
            assert took < HUNG_GRACE_SECONDS + STOP_MARGIN_SECONDS + 2, took
            assert any("the stop did not end within" in line for line in server.output), server.output
        finally:
            channel.close()
            server.kill()
            proxy.cut()
