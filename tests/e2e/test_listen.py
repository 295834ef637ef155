"""The listening port is the server's own: a second server on it stops instead of sharing it."""

from __future__ import annotations

import grpc
import pytest

from opd_grpc._gen.opd.v1 import opd_pb2 as pb
from opd_grpc._gen.opd.v1 import opd_pb2_grpc
from opd_grpc.process import ServerFailed, ServerProcess
from tests.support import make_doctor


def test_a_second_server_on_a_port_in_use_stops_with_a_message_and_the_first_serves_on():
    """gRPC binds with SO_REUSEPORT unless told not to: a second server (another database, a `make run` left
    running) would start without a word, and the kernel would split the callers between the two."""
    with ServerProcess(settings={"METRICS_LISTEN": ""}) as first:
        second = ServerProcess(settings={"LISTEN": first.address, "METRICS_LISTEN": ""})
        try:
            with pytest.raises(ServerFailed):
                second.start()
        finally:
            second.stop()  # a server that started after all must not outlive the test
        message = [line for line in second.output if line.startswith("opd-grpc: ")]
        assert message and f"cannot listen on {first.address}" in message[-1], "".join(second.output)
        with grpc.insecure_channel(first.address) as channel:
            stub = opd_pb2_grpc.OPDTokenServiceStub(channel)
            doctor = make_doctor(stub)
            assert stub.GetDoctor(pb.GetDoctorRequest(doctor_id=doctor)).doctor.doctor_id == doctor


@pytest.mark.backend_independent
@pytest.mark.parametrize("database, said", [
    ("bogus://x", "DATABASE_URL: bogus:// is not a database this server runs on"),
    ("mysql://root:secret@127.0.0.1/opd", "DATABASE_URL: mysql:// is not a database this server runs on"),
    ("sqlite:////nonexistent/folder/opd.db", "cannot use the database at DATABASE_URL sqlite:////nonexistent"),
    ("postgresql+psycopg://postgres:secret@127.0.0.1:1/test", "postgres:***@127.0.0.1:1/test"),
    # without a driver named: psycopg 3, not SQLAlchemy's psycopg2, which is not installed (no traceback)
    ("postgresql://postgres:secret@127.0.0.1:1/test", "postgresql+psycopg://postgres:***@127.0.0.1:1/test"),
])
def test_a_database_that_cannot_be_used_stops_the_server_with_one_line_and_no_password(database: str, said: str):
    server = ServerProcess(database, settings={"METRICS_LISTEN": ""})
    try:
        with pytest.raises(ServerFailed):
            server.start()
    finally:
        server.stop()
    output = "".join(server.output)
    assert "Traceback" not in output and "secret" not in output, output
    message = [line for line in server.output if line.startswith("opd-grpc: ")]
    assert message and said in message[-1], output
