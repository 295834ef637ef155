"""The metrics endpoint of a real server process: what an operator's Prometheus sees after a few calls."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from opd_grpc._gen.opd.v1 import opd_pb2 as pb
from opd_grpc._gen.opd.v1 import opd_pb2_grpc, test_clock_pb2, test_clock_pb2_grpc
from opd_grpc.api.convert import timestamp
from opd_grpc.process import ServerProcess
from tests.support import DAY, MORNING, allocate, fresh_database, make_doctor, make_slots, patient, refused

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(address: str) -> Samples:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def scrape_when_counted(address: str, calls: int) -> Samples:
    """A call is counted as its answer leaves, so the last one may lag its answer by a moment."""
    deadline = time.monotonic() + 5
    while True:
        samples = scrape(address)
        counted = sum(n for (name, labels), n in samples.items()
                      if name == "opd_calls_total" and ("method", "AllocateToken") in labels)
        if counted >= calls or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def test_calls_allocations_and_waitlists_show_on_the_metrics_endpoint(tmp_path: Path):
    with fresh_database(tmp_path) as database, ServerProcess(database) as server:
        assert server.metrics_address.startswith("127.0.0.1:")
        with grpc.insecure_channel(server.address) as channel:
            clock = test_clock_pb2_grpc.TestClockServiceStub(channel)
            clock.SetTime(test_clock_pb2.SetTimeRequest(time=timestamp(MORNING)))
            stub = opd_pb2_grpc.OPDTokenServiceStub(channel)
            doctor = make_doctor(stub)
            make_slots(stub, doctor, ("09:00", "10:00", 2))
            for n in (1, 2, 3):  # two seats, then the waitlist
                allocate(stub, doctor, n)
            allocate(stub, doctor, 4, source=pb.SOURCE_PAID_PRIORITY)  # waitlisted ahead of 3
            again = refused(stub.AllocateToken, pb.AllocateTokenRequest(  # patient 1 already holds a token
                patient=patient(1), doctor_id=doctor, date=DAY, source=pb.SOURCE_WALK_IN))
            assert again.code == grpc.StatusCode.ALREADY_EXISTS

        samples = scrape_when_counted(server.metrics_address, 5)
        assert value(samples, "opd_calls_total", method="AllocateToken", code="OK") == 4
        assert value(samples, "opd_calls_total", method="AllocateToken", code="ALREADY_EXISTS") == 1
        assert value(samples, "opd_calls_total", method="CreateDoctor", code="OK") == 1
        assert value(samples, "opd_call_duration_seconds_count", method="AllocateToken") == 5
        assert value(samples, "opd_allocations_total", source="WALK_IN", outcome="confirmed") == 2
        assert value(samples, "opd_allocations_total", source="WALK_IN", outcome="waitlisted") == 1
        assert value(samples, "opd_allocations_total", source="PAID_PRIORITY", outcome="waitlisted") == 1
        assert value(samples, "opd_queue_events_total", kind="SLOT_CHANGED") == 1
        assert value(samples, "opd_waitlist_length", doctor_id=doctor) == 2
        assert value(samples, "opd_watchers") == 0


@pytest.mark.backend_independent
def test_a_server_without_a_metrics_address_serves_no_metrics():
    with ServerProcess(settings={"METRICS_LISTEN": ""}) as server:
        assert server.address and server.metrics_address == ""
