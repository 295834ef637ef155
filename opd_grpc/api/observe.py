"""What operators read: JSON log lines and Prometheus metrics.

A log line is one JSON object, so a log shipper indexes it without a parser of its own. The access log's fields
are fixed by `log_call`'s parameters: no request content can reach it, so no phone number either (SPEC §13).
Each `Metrics` has its own registry, so several servers can run in one process (the tests do).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import IO, Any
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from opd_grpc.engine.model import EventKind, QueueEvent, Source

log = logging.getLogger(__name__)
access_log = logging.getLogger("opd_grpc.access")

# `log.info("...", extra={FIELDS: {"doctor_id": ...}})` adds these keys to the line.
FIELDS = "fields"
# Codes that mean the server failed rather than the caller: logged at ERROR, so they stand out.
SERVER_FAULTS = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS})
WAITLIST_READ_SECONDS = 1.0  # a scrape's wait for the waitlist lengths (Prometheus' own timeout is 10 s)
# From a cached read (0.5 ms) to a call stuck behind a slow database (5 s).
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# A new token gets exactly one of these events (DoctorDay._new_token); BUMPED and PROMOTED move existing tokens.
ALLOCATION_OUTCOMES = {EventKind.ALLOCATED: "confirmed", EventKind.WAITLISTED: "waitlisted"}
# json.dumps(line, default=str) would build this encoder again for every line.
_ENCODE = json.JSONEncoder(default=str).encode


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (ISO-8601 UTC), level, logger, msg, then the record's `fields` (which
    cannot replace those four), and exc_info / stack_info as strings when present. Non-ASCII is escaped, so a
    line is always one line of ASCII whatever the terminal's encoding."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in (getattr(record, FIELDS, None) or {}).items():
            line.setdefault(key, value)
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        return _ENCODE(line)


def configure_logging(level: int = logging.INFO, stream: IO[str] | None = None) -> None:
    """The root logger writes JSON lines to `stream` (default stderr), replacing its handlers."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def log_call(method: str, code: grpc.StatusCode, seconds: float, key_id: str, role: str, request_id: str,
             peer: str, caller_gone: bool) -> None:
    """One access-log line per call: method, code, duration_ms, key_id, role, request_id, peer and caller_gone
    after the formatter's own keys, and nothing from the request beyond its request_id. `code` is what the call
    did; with `caller_gone` its caller had stopped waiting (deadline or cancel) and saw that instead."""
    duration_ms = round(seconds * 1000, 3)
    access_log.log(logging.ERROR if code in SERVER_FAULTS else logging.INFO,
                   "%s %s %.3f ms%s", method, code.name, duration_ms, " (caller gone)" if caller_gone else "",
                   extra={FIELDS: {"method": method, "code": code.name, "duration_ms": duration_ms,
                                   "key_id": key_id, "role": role, "request_id": request_id, "peer": peer,
                                   "caller_gone": caller_gone}})


class Metrics:
    """The server's Prometheus metrics: calls and their durations, queue events and allocations as they commit
    in this process (each replica counts its own), whether it reads its database, and, read at scrape time,
    waitlist lengths and watchers."""

    def __init__(self, waitlist_lengths: Callable[[], dict[str, int]], watchers: Callable[[], int]):
        self.registry = CollectorRegistry()
        self._calls = Counter(
            "opd_calls", "gRPC calls answered, by method and status code. A refused allocation is "
            'opd_calls_total{method="AllocateToken",code!="OK"}.', ("method", "code"), registry=self.registry)
        self._durations = Histogram(
            "opd_call_duration_seconds", "Time from a call's arrival to its answer, by method.", ("method",),
            buckets=DURATION_BUCKETS, registry=self.registry)
        events = Counter("opd_queue_events", "Queue events committed by this server, by kind (SPEC §3.6).",
                         ("kind",), registry=self.registry)
        allocations = Counter(
            "opd_allocations", "Tokens created by this server, by source and outcome (confirmed: holds a seat; "
            'waitlisted). Refused allocations are opd_calls_total{method="AllocateToken",code!="OK"}.',
            ("source", "outcome"), registry=self.registry)
        self._database_up = Gauge(
            "opd_database_up", "1 while this server reads its database (health SERVING), 0 while it cannot.",
            registry=self.registry)
        self._database_up.set(1)
        self._denials_not_audited = Counter(
            "opd_denied_calls_not_audited", "Calls refused for their key or role that were not written to the "
            "audit log: past AUDITED_DENIALS_PER_PEER from one client address (each has its access-log line).",
            registry=self.registry)
        # Children made once: labels() takes a lock and builds a key, and these run on every call and commit.
        self._per_call: dict[tuple[str, grpc.StatusCode], tuple[Any, Any]] = {}
        self._per_kind = {kind: events.labels(kind.value) for kind in EventKind}
        self._per_allocation = {(kind, source): allocations.labels(source.value, outcome)
                                for kind, outcome in ALLOCATION_OUTCOMES.items() for source in Source}
        self._database_answering = True
        self._gauges = _ScrapeTimeGauges(lambda: waitlist_lengths() if self._database_answering else None, watchers)
        self.registry.register(self._gauges)
        self._http: tuple[WSGIServer, threading.Thread] | None = None

    def start(self, listen: str) -> int:
        """Serves /metrics on `listen` (HOST:PORT; port 0: any free one; "": nowhere); answers the bound port."""
        if not listen:
            return 0
        host, _, port = listen.rpartition(":")
        if not port.isdigit():
            raise ValueError(f"METRICS_LISTEN must be HOST:PORT, not {listen!r}")
        try:
            self._http = start_http_server(int(port), host.strip("[]") or "0.0.0.0", registry=self.registry)
        except OSError as error:
            raise OSError(error.errno, f"cannot serve metrics on {listen}: {error.strerror}") from error
        return self._http[0].server_port

    def stop(self) -> None:
        """Stops the HTTP endpoint (within its half-second poll)."""
        if self._http is not None:
            server, thread = self._http
            self._http = None
            server.shutdown()
            server.server_close()
            thread.join()
        self._gauges.reader.shutdown(wait=False)  # a read hung on the database is left to the process's exit

    def call_finished(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        children = self._per_call.get((method, code))
        if children is None:
            children = self._per_call[(method, code)] = (self._calls.labels(method, code.name),
                                                         self._durations.labels(method))
        children[0].inc()
        children[1].observe(seconds)

    def database_answers(self, answering: bool) -> None:
        self._database_answering = answering
        self._database_up.set(int(answering))

    def denial_not_audited(self) -> None:
        self._denials_not_audited.inc()

    def queue_events(self, events: Sequence[QueueEvent]) -> None:
        """An EventHub listener: the events of one commit."""
        for event in events:
            self._per_kind[event.kind].inc()
            allocation = self._per_allocation.get((event.kind, event.source))
            if allocation is not None:
                allocation.inc()


class _ScrapeTimeGauges(Collector):
    """Gauges read when Prometheus scrapes. A family whose reading fails (the database is away) is left out of
    that scrape, with a warning, instead of failing the whole scrape; so are the waitlists while health says the
    database does not answer (None): a database that has stopped answering would hold the scrape for as long as
    it hangs, and opd_database_up with it."""

    def __init__(self, waitlist_lengths: Callable[[], dict[str, int] | None], watchers: Callable[[], int]):
        self.waitlist_lengths = waitlist_lengths
        self.watchers = watchers
        # The read runs here and is waited for WAITLIST_READ_SECONDS at most: a database that has just stopped
        # answering, before health has said so, would otherwise hold the scrape with it.
        self.reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="opd-metrics-read")

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            lengths = self.reader.submit(self.waitlist_lengths).result(timeout=WAITLIST_READ_SECONDS)
        except FutureTimeout:
            log.warning("metrics: the waitlist lengths did not come within %g s", WAITLIST_READ_SECONDS)
            lengths = None
        except Exception as error:
            log.warning("metrics: could not read the waitlist lengths: %s", error)
            lengths = None
        if lengths is not None:
            family = GaugeMetricFamily("opd_waitlist_length", "Tokens WAITLISTED today, per doctor.",
                                       labels=("doctor_id",))
            for doctor_id, length in sorted(lengths.items()):
                family.add_metric((doctor_id,), length)
            yield family
        try:
            watchers = self.watchers()
        except Exception as error:
            log.warning("metrics: could not count the watchers: %s", error)
        else:
            yield GaugeMetricFamily("opd_watchers", "Open WatchQueue streams.", value=watchers)
