"""JSON log lines, the access log, the Prometheus endpoint, the hub's event listeners and ServerProcess's
metrics address (opd_grpc/api/observe.py)."""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Iterator

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from opd_grpc.api.observe import WAITLIST_READ_SECONDS, Metrics, configure_logging, log_call
from opd_grpc.engine.model import EventKind, QueueEvent, Source, Status
from opd_grpc.engine.watch import EventHub
from opd_grpc.process import ServerProcess

pytestmark = pytest.mark.backend_independent

DAY = dt.date(2030, 1, 7)
NOON = dt.datetime(2030, 1, 7, 12, 0, tzinfo=dt.timezone.utc)


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """The root logger writing JSON lines into a buffer; pytest's own handlers come back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    buffer = io.StringIO()
    configure_logging(logging.INFO, buffer)
    try:
        yield buffer
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


# ---- JSON lines ---------------------------------------------------------------------------------------


def test_a_log_line_is_one_json_object_with_time_level_logger_message_and_fields(log_lines):
    before = dt.datetime.now(dt.timezone.utc)
    logging.getLogger("opd_grpc.test").warning("slot %s closed\nearly", "S1",
                                               extra={"fields": {"doctor_id": "DOC001", "seats": 3}})
    logging.getLogger("opd_grpc.test").debug("below the level: not written")

    assert len(log_lines.getvalue().splitlines()) == 1  # the newline in the message stays inside the string
    (line,) = lines(log_lines)
    assert line == {"ts": line["ts"], "level": "WARNING", "logger": "opd_grpc.test", "msg": "slot S1 closed\nearly",
                    "doctor_id": "DOC001", "seats": 3}
    assert line["ts"].endswith("Z")
    stamped = dt.datetime.fromisoformat(line["ts"].replace("Z", "+00:00"))
    assert before - dt.timedelta(seconds=1) <= stamped <= dt.datetime.now(dt.timezone.utc)


def test_fields_cannot_replace_the_line_s_own_keys_and_odd_values_are_written_as_text(log_lines):
    logging.getLogger("x").info("hello", extra={"fields": {"level": "DEBUG", "msg": "forged", "day": DAY}})
    (line,) = lines(log_lines)
    assert (line["level"], line["msg"], line["day"]) == ("INFO", "hello", "2030-01-07")


def test_an_exception_is_a_string_field_of_the_same_line(log_lines):
    try:
        raise ValueError("the database is away")
    except ValueError:
        logging.getLogger("opd_grpc.test").exception("catch-up failed")
    (line,) = lines(log_lines)
    assert line["msg"] == "catch-up failed"
    assert line["exc_info"].startswith("Traceback") and "ValueError: the database is away" in line["exc_info"]


def test_configure_logging_replaces_the_root_handlers_so_nothing_is_written_twice(log_lines):
    configure_logging(logging.INFO, log_lines)
    logging.getLogger("opd_grpc.test").info("once")
    assert [line["msg"] for line in lines(log_lines)] == ["once"]


# ---- the access log -----------------------------------------------------------------------------------


def test_the_access_log_line_has_exactly_the_documented_keys(log_lines):
    log_call("AllocateToken", grpc.StatusCode.NOT_FOUND, 0.0123456, "1a2b3c4d", "reception", "req-7",
             "ipv4:127.0.0.1:50312", False)
    log_call("AllocateToken", grpc.StatusCode.OK, 2.5, "1a2b3c4d", "reception", "req-8", "ipv4:127.0.0.1:50312", True)
    refused, unheard = lines(log_lines)
    assert set(refused) == set(unheard) == {"ts", "level", "logger", "msg", "method", "code", "duration_ms",
                                            "key_id", "role", "request_id", "peer", "caller_gone"}
    assert {k: v for k, v in refused.items() if k != "ts"} == {
        "level": "INFO", "logger": "opd_grpc.access", "msg": "AllocateToken NOT_FOUND 12.346 ms",
        "method": "AllocateToken", "code": "NOT_FOUND", "duration_ms": 12.346, "key_id": "1a2b3c4d",
        "role": "reception", "request_id": "req-7", "peer": "ipv4:127.0.0.1:50312", "caller_gone": False}
    assert (unheard["msg"], unheard["code"], unheard["caller_gone"]) == (
        "AllocateToken OK 2500.000 ms (caller gone)", "OK", True)


def test_server_faults_are_logged_as_errors_and_refusals_as_info(log_lines):
    log_call("CallNext", grpc.StatusCode.INTERNAL, 0.5, "", "", "", "ipv6:[::1]:4000", False)
    log_call("CallNext", grpc.StatusCode.FAILED_PRECONDITION, 0.001, "", "", "", "ipv6:[::1]:4000", False)
    assert [(line["level"], line["code"]) for line in lines(log_lines)] == [("ERROR", "INTERNAL"),
                                                                            ("INFO", "FAILED_PRECONDITION")]


# ---- metrics --------------------------------------------------------------------------------------------


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def event(kind: EventKind, sequence: int, source: Source | None = Source.WALK_IN,
          status: Status | None = None) -> QueueEvent:
    return QueueEvent("DOC001", DAY, sequence, kind, NOON, f"DOC001-20300107-T{sequence}", sequence,
                      "DOC001-20300107-0900", status, source=source)


@pytest.fixture
def metrics() -> Iterator[Metrics]:
    metrics = Metrics(lambda: {"DOC002": 0, "DOC001": 3}, lambda: 2)
    yield metrics
    metrics.stop()


def test_calls_are_counted_by_method_and_code_and_timed_by_method(metrics):
    port = metrics.start("127.0.0.1:0")
    assert port > 0
    metrics.call_finished("AllocateToken", grpc.StatusCode.OK, 0.0003)
    metrics.call_finished("AllocateToken", grpc.StatusCode.OK, 0.2)
    metrics.call_finished("AllocateToken", grpc.StatusCode.RESOURCE_EXHAUSTED, 0.004)
    metrics.call_finished("GetToken", grpc.StatusCode.NOT_FOUND, 7.0)

    samples = scrape(port)
    assert value(samples, "opd_calls_total", method="AllocateToken", code="OK") == 2
    assert value(samples, "opd_calls_total", method="AllocateToken", code="RESOURCE_EXHAUSTED") == 1
    assert value(samples, "opd_calls_total", method="GetToken", code="NOT_FOUND") == 1
    assert value(samples, "opd_call_duration_seconds_count", method="AllocateToken") == 3
    assert value(samples, "opd_call_duration_seconds_sum", method="AllocateToken") == pytest.approx(0.2043)
    cumulative = {le: value(samples, "opd_call_duration_seconds_bucket", method="AllocateToken", le=le)
                  for le in ("0.0005", "0.005", "0.25", "5.0")}
    assert cumulative == {"0.0005": 1, "0.005": 2, "0.25": 3, "5.0": 3}
    assert value(samples, "opd_call_duration_seconds_bucket", method="GetToken", le="5.0") == 0
    assert value(samples, "opd_call_duration_seconds_bucket", method="GetToken", le="+Inf") == 1


def test_new_tokens_are_counted_as_allocations_and_moves_of_existing_tokens_are_not(metrics):
    port = metrics.start("127.0.0.1:0")
    metrics.queue_events([event(EventKind.ALLOCATED, 1, status=Status.CONFIRMED)])
    metrics.queue_events([event(EventKind.BUMPED, 2, status=Status.WAITLISTED),  # an emergency takes T2's seat
                          event(EventKind.ALLOCATED, 3, Source.EMERGENCY, Status.CONFIRMED)])
    metrics.queue_events([event(EventKind.WAITLISTED, 4, Source.ONLINE_BOOKING, Status.WAITLISTED)])
    metrics.queue_events([event(EventKind.CANCELLED, 1, status=Status.CANCELLED),
                          event(EventKind.PROMOTED, 2, status=Status.CONFIRMED)])
    metrics.queue_events([event(EventKind.SLOT_CHANGED, 6, source=None)])

    samples = scrape(port)
    allocations = {(dict(labels)["source"], dict(labels)["outcome"]): n for (name, labels), n in samples.items()
                   if name == "opd_allocations_total" and n}
    assert allocations == {("WALK_IN", "confirmed"): 1, ("EMERGENCY", "confirmed"): 1,
                           ("ONLINE_BOOKING", "waitlisted"): 1}
    assert value(samples, "opd_allocations_total", source="PAID_PRIORITY", outcome="waitlisted") == 0  # from zero
    kinds = {dict(labels)["kind"]: n for (name, labels), n in samples.items() if name == "opd_queue_events_total"}
    assert kinds == {"ALLOCATED": 2, "WAITLISTED": 1, "PROMOTED": 1, "BUMPED": 1, "CHECKED_IN": 0, "CALLED": 0,
                     "COMPLETED": 0, "CANCELLED": 1, "NO_SHOW": 0, "SLOT_CHANGED": 1}


def test_the_help_text_says_where_refused_allocations_are(metrics):
    port = metrics.start("127.0.0.1:0")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        families = {f.name: f.documentation for f in text_string_to_metric_families(answer.read().decode())}
    assert 'opd_calls_total{method="AllocateToken",code!="OK"}' in families["opd_allocations"]


def test_waitlist_lengths_and_watchers_are_read_at_scrape_time():
    waiting = {"DOC001": 3}
    metrics = Metrics(lambda: dict(waiting), lambda: len(waiting))
    try:
        port = metrics.start("127.0.0.1:0")
        samples = scrape(port)
        assert value(samples, "opd_waitlist_length", doctor_id="DOC001") == 3
        assert value(samples, "opd_watchers") == 1
        waiting.update(DOC001=1, DOC002=4)
        samples = scrape(port)
        assert (value(samples, "opd_waitlist_length", doctor_id="DOC001"),
                value(samples, "opd_waitlist_length", doctor_id="DOC002")) == (1, 4)
        assert value(samples, "opd_watchers") == 2
    finally:
        metrics.stop()


def test_a_failing_waitlist_read_leaves_that_family_out_and_the_scrape_still_answers(caplog):
    def database_away() -> dict[str, int]:
        raise ConnectionError("connection refused")

    metrics = Metrics(database_away, lambda: 5)
    try:
        port = metrics.start("127.0.0.1:0")
        metrics.call_finished("ListDoctors", grpc.StatusCode.OK, 0.001)
        with caplog.at_level(logging.WARNING, "opd_grpc.api.observe"):
            samples = scrape(port)
    finally:
        metrics.stop()
    assert not any(name == "opd_waitlist_length" for name, _ in samples)
    assert value(samples, "opd_watchers") == 5
    assert value(samples, "opd_calls_total", method="ListDoctors", code="OK") == 1
    assert "could not read the waitlist lengths: connection refused" in caplog.text


def test_a_waitlist_read_that_hangs_before_health_has_noticed_leaves_that_family_out_within_a_second(caplog):
    """A database that had just stopped answering held a scrape until the scraper gave up (a reviewer's find):
    the read is waited for WAITLIST_READ_SECONDS, and the rest of the scrape answers."""
    release = threading.Event()

    def hanging() -> dict[str, int]:
        release.wait(30)
        return {}

    metrics = Metrics(hanging, lambda: 2)
    try:
        port = metrics.start("127.0.0.1:0")
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, "opd_grpc.api.observe"):
            samples = scrape(port)
        took = time.monotonic() - started
    finally:
        release.set()
        metrics.stop()
    assert WAITLIST_READ_SECONDS <= took < WAITLIST_READ_SECONDS + 2, took
    assert not any(name == "opd_waitlist_length" for name, _ in samples)
    assert value(samples, "opd_watchers") == 2
    assert "the waitlist lengths did not come within 1 s" in caplog.text


def test_while_health_says_the_database_does_not_answer_a_scrape_does_not_ask_it():
    """A database that hangs (packets dropped) would hold every scrape, opd_database_up with it, until it gave up."""
    asked = threading.Event()

    def hanging() -> dict[str, int]:
        asked.set()
        time.sleep(60)
        return {}

    metrics = Metrics(hanging, lambda: 0)
    try:
        port = metrics.start("127.0.0.1:0")
        metrics.database_answers(False)
        samples = scrape(port)
    finally:
        metrics.stop()
    assert not asked.is_set()
    assert value(samples, "opd_database_up") == 0
    assert not any(name == "opd_waitlist_length" for name, _ in samples)


def test_two_servers_in_one_process_keep_their_own_metrics():
    first, second = Metrics(lambda: {}, lambda: 0), Metrics(lambda: {"DOC009": 1}, lambda: 0)
    try:
        ports = first.start("127.0.0.1:0"), second.start("127.0.0.1:0")
        assert ports[0] != ports[1]
        first.call_finished("GetStats", grpc.StatusCode.OK, 0.01)
        second.call_finished("GetStats", grpc.StatusCode.OK, 0.01)
        second.call_finished("GetStats", grpc.StatusCode.OK, 0.01)
        samples = [scrape(port) for port in ports]
    finally:
        first.stop()
        second.stop()
    assert [value(s, "opd_calls_total", method="GetStats", code="OK") for s in samples] == [1, 2]
    assert [value(s, "opd_waitlist_length", doctor_id="DOC009") for s in samples] == [None, 1]


def test_no_listen_address_means_no_endpoint_and_stop_closes_the_port():
    metrics = Metrics(lambda: {}, lambda: 0)
    assert metrics.start("") == 0
    metrics.stop()  # nothing to stop
    port = metrics.start("127.0.0.1:0")
    assert scrape(port) != {}
    metrics.stop()
    with pytest.raises(urllib.error.URLError):
        scrape(port)


def test_a_port_in_use_is_refused_with_the_address_in_the_message():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(OSError, match=f"cannot serve metrics on {listen}"):
            Metrics(lambda: {}, lambda: 0).start(listen)
    with pytest.raises(ValueError, match="HOST:PORT"):
        Metrics(lambda: {}, lambda: 0).start("localhost")


# ---- the hub's listeners --------------------------------------------------------------------------------


def test_the_hub_hands_each_committed_batch_to_its_listeners_even_if_one_fails(caplog):
    hub, seen = EventHub(), []

    def broken(events: list[QueueEvent]) -> None:
        raise RuntimeError("boom")

    hub.listeners += [broken, lambda events: seen.append([e.sequence for e in events])]
    with caplog.at_level(logging.ERROR, "opd_grpc.engine.watch"):
        hub.publish([event(EventKind.ALLOCATED, 1), event(EventKind.ALLOCATED, 2)])  # no error reaches the caller
        hub.publish([])
        hub.publish([event(EventKind.CANCELLED, 3)])
    assert seen == [[1, 2], [3]]
    assert caplog.text.count("an event listener failed") == 2


def test_metrics_count_what_the_hub_publishes():
    hub, metrics = EventHub(), Metrics(lambda: {}, lambda: 0)
    hub.listeners.append(metrics.queue_events)
    try:
        port = metrics.start("127.0.0.1:0")
        hub.publish([event(EventKind.WAITLISTED, 1, status=Status.WAITLISTED)])
        samples = scrape(port)
    finally:
        metrics.stop()
    assert value(samples, "opd_allocations_total", source="WALK_IN", outcome="waitlisted") == 1


# ---- ServerProcess ----------------------------------------------------------------------------------------

# Stands in for the server: prints the lines `serve()` prints, the metrics line only when METRICS_LISTEN is set.
FAKE_SERVER = """
import os, time
if os.environ["OPD_METRICS_LISTEN"]:
    print(f"opd-grpc metrics on http://{os.environ['OPD_METRICS_LISTEN']}/metrics", flush=True)
print("opd-grpc listening on 127.0.0.1:4321 (database sqlite://)", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize(("settings", "expected"), [({}, "127.0.0.1:0"), ({"METRICS_LISTEN": ""}, ""),
                                                    ({"METRICS_LISTEN": "127.0.0.1:9999"}, "127.0.0.1:9999")])
def test_server_process_asks_for_a_free_metrics_port_and_reads_where_metrics_are(settings, expected):
    server = ServerProcess(settings=settings, program=("-c", FAKE_SERVER))
    try:
        assert server.start(timeout=20) == "127.0.0.1:4321"
        assert server.metrics_address == expected
    finally:
        server.kill()


# Writes 4 MiB of log lines after it listens, far more than a pipe holds, then says it is done.
CHATTY_SERVER = """
import time
print("opd-grpc listening on 127.0.0.1:4321 (database sqlite://)", flush=True)
for n in range(40000):
    print(f"access line {n} " + "x" * 90)
print("done", flush=True)
time.sleep(60)
"""


def test_server_process_output_goes_to_a_file_that_nothing_in_the_caller_reads_as_the_server_runs():
    """A benchmark's client must not pay for the server's access log: no thread of ours reads it, and a server
    that logs more than a pipe holds does not stall for want of a reader."""
    threads = threading.active_count()
    server = ServerProcess(settings={"METRICS_LISTEN": ""}, program=("-c", CHATTY_SERVER))
    try:
        server.start(timeout=20)
        assert threading.active_count() == threads
        deadline = time.monotonic() + 20
        while server.output[-1:] != ["done\n"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.output[-2:] == [f"access line 39999 {'x' * 90}\n", "done\n"]
        assert server.log_path.stat().st_size > 4_000_000
    finally:
        server.kill()
    assert server.output[-1] == "done\n"  # kept once the server has ended and its folder is gone
