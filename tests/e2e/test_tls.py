"""TLS and mutual TLS on real servers, with certificates from scripts/make_test_ca.sh, called from Python and with
grpcurl exactly as the README's "TLS and mutual TLS" section shows."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from opd_grpc._gen.opd.v1 import opd_pb2, opd_pb2_grpc
from opd_grpc.api.tls import is_loopback
from opd_grpc.process import ServerFailed, ServerProcess

pytestmark = pytest.mark.backend_independent

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
README_ADDRESS = "127.0.0.1:50051"
CALL_TIMEOUT = 10.0


def _server(certs: Path, mutual: bool) -> Iterator[str]:
    settings = {"METRICS_LISTEN": "", "TLS_CERT_FILE": certs / "server.pem", "TLS_KEY_FILE": certs / "server.key"}
    if mutual:
        settings["TLS_CLIENT_CA_FILE"] = certs / "ca.pem"
    server = ServerProcess(test_clock=False, settings=settings)
    try:
        yield server.start()
    finally:
        assert server.stop() == 0, "".join(server.output)


@pytest.fixture(scope="module")
def tls_server(certs: Path) -> Iterator[str]:
    yield from _server(certs, mutual=False)


@pytest.fixture(scope="module")
def mtls_server(certs: Path) -> Iterator[str]:
    yield from _server(certs, mutual=True)


def _credentials(certs: Path, client: str | None = None, ca: bool = True) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=(certs / "ca.pem").read_bytes() if ca else None,
        private_key=(certs / f"{client}.key").read_bytes() if client else None,
        certificate_chain=(certs / f"{client}.pem").read_bytes() if client else None)


def _create_and_list(channel: grpc.Channel) -> list[str]:
    """Creates a doctor and answers the names ListDoctors then shows: a write and a read over the channel."""
    stub = opd_pb2_grpc.OPDTokenServiceStub(channel)
    stub.CreateDoctor(opd_pb2.CreateDoctorRequest(name="Dr Asha Rao", specialization="General Medicine"),
                      timeout=CALL_TIMEOUT)
    reply = stub.ListDoctors(opd_pb2.ListDoctorsRequest(page_size=50), timeout=CALL_TIMEOUT)
    return [doctor.name for doctor in reply.doctors]


def _refused(channel: grpc.Channel) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as failure:
        opd_pb2_grpc.OPDTokenServiceStub(channel).ListDoctors(opd_pb2.ListDoctorsRequest(), timeout=CALL_TIMEOUT)
    return failure.value.code()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_a_client_that_trusts_the_ca_is_served_over_tls(certs: Path, tls_server: str, host: str):
    port = tls_server.rpartition(":")[2]
    with grpc.secure_channel(f"{host}:{port}", _credentials(certs)) as channel:
        assert "Dr Asha Rao" in _create_and_list(channel)


def test_a_client_that_does_not_trust_the_ca_is_refused(certs: Path, tls_server: str):
    with grpc.secure_channel(tls_server, _credentials(certs, ca=False)) as channel:  # the system's CAs only
        assert _refused(channel) == grpc.StatusCode.UNAVAILABLE


def test_a_plaintext_client_gets_nothing_from_the_tls_port(tls_server: str):
    with grpc.insecure_channel(tls_server) as channel:
        assert _refused(channel) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_serves_a_client_certificate_that_the_ca_signed(certs: Path, mtls_server: str):
    with grpc.secure_channel(mtls_server, _credentials(certs, "client")) as channel:
        assert "Dr Asha Rao" in _create_and_list(channel)


@pytest.mark.parametrize("client", ["untrusted-client", None])
def test_mutual_tls_refuses_other_clients(certs: Path, mtls_server: str, client: str | None):
    """A certificate from a CA the server does not trust, or none at all: the handshake fails."""
    with grpc.secure_channel(mtls_server, _credentials(certs, client)) as channel:
        assert _refused(channel) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("settings, named", [
    ({"TLS_CERT_FILE": "{certs}/server.pem"}, ["TLS_CERT_FILE", "TLS_KEY_FILE"]),
    ({"TLS_CERT_FILE": "{certs}/missing.pem", "TLS_KEY_FILE": "{certs}/server.key"},
     ["TLS_CERT_FILE", "{certs}/missing.pem"]),
    ({"TLS_CERT_FILE": "{certs}/server.pem", "TLS_KEY_FILE": "{certs}/client.key"},
     ["TLS_KEY_FILE", "{certs}/client.key", "not the private key"]),
    ({"TLS_CERT_FILE": "{certs}/server.pem", "TLS_KEY_FILE": "{certs}/server.key",
      "TLS_CLIENT_CA_FILE": "{certs}/nowhere/ca.pem"}, ["TLS_CLIENT_CA_FILE", "{certs}/nowhere/ca.pem"]),
    ({"TLS_CLIENT_CA_FILE": "{certs}/ca.pem"}, ["TLS_CLIENT_CA_FILE", "TLS_CERT_FILE"]),
], ids=["cert-without-key", "missing-cert", "key-of-another-cert", "missing-client-ca", "client-ca-without-cert"])
def test_tls_settings_that_cannot_work_stop_the_server_with_a_message(certs: Path, settings: dict[str, str],
                                                                      named: list[str]):
    server = ServerProcess(test_clock=False, settings={"METRICS_LISTEN": "", **{
        name: value.format(certs=certs) for name, value in settings.items()}})
    database = Path(server.database_url.removeprefix("sqlite:///"))
    try:
        with pytest.raises(ServerFailed) as failure:
            server.start()
        # Refused before the database was touched: a fresh one is not made (nor an old one's revision reported
        # first, hiding this mistake until the next start).
        assert not database.exists()
    finally:
        server.stop()  # a server that started after all must not outlive the test
    assert "exited with code 1" in str(failure.value)
    message = [line for line in server.output if line.startswith("opd-grpc: ")]
    assert message, "".join(server.output)  # a one-line reason, not a traceback
    for text in named:
        assert text.format(certs=certs) in message[-1]


@pytest.mark.parametrize("listen, loopback", [
    ("127.0.0.1:50051", True), ("127.1.2.3:50051", True), ("[::1]:50051", True), ("::1", True),
    ("localhost:50051", True), ("LOCALHOST:50051", True),
    ("0.0.0.0:50051", False), ("[::]:50051", False), (":50051", False), ("10.0.0.7:50051", False),
    ("opd.example.org:50051", False), ("localhost.example.org:50051", False),
])
def test_is_loopback_tells_addresses_only_this_machine_reaches(listen: str, loopback: bool):
    """What decides whether a server without API keys may start (SPEC §13)."""
    assert is_loopback(listen) is loopback


def _readme_commands() -> list[str]:
    """The grpcurl blocks of the README's TLS section (test_readme.py leaves them alone: they start with a
    comment, and need this test's TLS server)."""
    text = README.read_text()
    section = re.search(r"^### TLS and mutual TLS\n(.*?)(?=^##+ |\Z)", text, re.S | re.M)
    assert section, "README.md has no '### TLS and mutual TLS' section"
    blocks = [body for body in re.findall(r"```sh\n(.*?)```", section[1], re.S) if "grpcurl " in body]
    assert blocks, "the README's TLS section shows no grpcurl command"
    return blocks


def _grpcurl(commands: str, folder: Path, address: str) -> subprocess.CompletedProcess[str]:
    """Runs README commands from `folder` (where certs/ is) against `address` instead of 127.0.0.1:50051."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", "-euo", "pipefail", "-c", commands.replace(README_ADDRESS, address)], cwd=folder,
                          env=env, capture_output=True, text=True, timeout=60)


def test_the_readme_grpcurl_commands_work_against_a_mutual_tls_server(certs: Path, mtls_server: str):
    printed = ""
    for commands in _readme_commands():
        run = _grpcurl(commands, certs.parent, mtls_server)
        assert run.returncode == 0, (commands, run.stderr)
        printed += run.stdout
    assert "opd.v1.OPDTokenService" in printed  # what `list` shows


def test_grpcurl_without_a_client_certificate_is_refused_by_mutual_tls(certs: Path, mtls_server: str):
    run = _grpcurl(f"grpcurl -cacert certs/ca.pem {README_ADDRESS} list", certs.parent, mtls_server)
    assert run.returncode != 0 and "Failed to dial" in run.stderr, run.stderr


def test_grpcurl_needs_only_the_ca_without_mutual_tls(certs: Path, tls_server: str):
    run = _grpcurl(f"grpcurl -cacert certs/ca.pem {README_ADDRESS} list", certs.parent, tls_server)
    assert run.returncode == 0, run.stderr
    assert "opd.v1.OPDTokenService" in run.stdout
