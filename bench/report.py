"""The bench's figures: a table for people, then one JSON line for machines (the last line printed)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from bench.load import ALLOCATE, NOOP, LoadResult, percentile

# The targets: allocation keeps at least half the no-op's throughput, and its p99 at 32 in flight is
# at most twice the no-op's.
MIN_THROUGHPUT_RATIO = 0.5
MAX_P99_RATIO = 2.0
P99_TARGET_IN_FLIGHT = 32


@dataclass(frozen=True)
class Measurement:
    kind: str
    in_flight: int
    seconds: float
    calls: int
    calls_per_second: float
    p50_ms: float
    p99_ms: float
    errors: dict[str, int]
    outcomes: dict[str, int]
    server_cpu_cores: float  # CPU time of the server process over the measurement's wall time
    client_cpu_cores: float
    server_cpu_ms_per_call: float  # steadier than calls/s when other work shares the machine

    @classmethod
    def of(cls, kind: str, in_flight: int, seconds: float, result: LoadResult, wall_seconds: float,
           server_cpu_seconds: float) -> Measurement:
        calls = len(result.latencies)
        return cls(kind, in_flight, seconds, calls, calls / seconds, percentile(result.latencies, 0.5) * 1000,
                   percentile(result.latencies, 0.99) * 1000, dict(result.errors), dict(result.outcomes),
                   round(server_cpu_seconds / wall_seconds, 2), round(result.client_cpu_seconds / wall_seconds, 2),
                   round(server_cpu_seconds / result.calls_made * 1000, 3) if result.calls_made else 0.0)


@dataclass(frozen=True)
class Target:
    name: str
    value: float
    bound: str  # e.g. ">= 0.50"
    met: bool


@dataclass
class Report:
    address: str
    client_processes: int
    doctors: int
    days: int
    per_day: int
    warmup: float
    seconds: float
    rounds: int
    load_average_before: float  # of the machine, 1 minute: other work on it shows here
    load_average_after: float
    measurements: list[Measurement]
    server_rss_mib_before: float
    server_rss_mib_after: float
    server_exit_code: int
    wall_seconds: float

    @property
    def total_errors(self) -> int:
        return sum(sum(m.errors.values()) for m in self.measurements)

    def find(self, kind: str, in_flight: int) -> Measurement:
        return next(m for m in self.measurements if m.kind == kind and m.in_flight == in_flight)

    def targets(self) -> list[Target]:
        targets = []
        for in_flight in sorted({m.in_flight for m in self.measurements}):
            noop, alloc = self.find(NOOP, in_flight), self.find(ALLOCATE, in_flight)
            ratio = alloc.calls_per_second / noop.calls_per_second if noop.calls_per_second else 0.0
            targets.append(Target(f"allocate / no-op throughput at {in_flight} in flight", round(ratio, 3),
                                  f">= {MIN_THROUGHPUT_RATIO:.2f}", ratio >= MIN_THROUGHPUT_RATIO))
        noop, alloc = self.find(NOOP, P99_TARGET_IN_FLIGHT), self.find(ALLOCATE, P99_TARGET_IN_FLIGHT)
        ratio = alloc.p99_ms / noop.p99_ms if noop.p99_ms else float("inf")
        targets.append(Target(f"allocate p99 / no-op p99 at {P99_TARGET_IN_FLIGHT} in flight", round(ratio, 3),
                              f"<= {MAX_P99_RATIO:.2f}", ratio <= MAX_P99_RATIO))
        return targets

    def as_json(self) -> str:
        data = dataclasses.asdict(self)
        data["targets"] = [dataclasses.asdict(t) for t in self.targets()]
        data["total_errors"] = self.total_errors
        return json.dumps(data, sort_keys=True)


def print_report(report: Report) -> None:
    console = Console(width=max(Console().width, 140))
    calls = Table(title=f"opd-grpc bench at {report.address}: {report.seconds:g} s per row in {report.rounds} "
                        f"alternating stretches (+{report.warmup:g} s warm-up each), "
                        f"{report.client_processes} client process(es)")
    for column in ("call", "in flight", "calls", "calls/s", "p50 ms", "p99 ms", "errors", "outcomes",
                   "server CPU", "client CPU", "server ms CPU/call"):
        calls.add_column(column, justify="left" if column in ("call", "errors", "outcomes") else "right")
    for m in report.measurements:
        calls.add_row(m.kind, str(m.in_flight), str(m.calls), f"{m.calls_per_second:,.0f}", f"{m.p50_ms:.2f}",
                      f"{m.p99_ms:.2f}", _counts(m.errors) or "0",
                      _counts({k.removeprefix("STATUS_"): v for k, v in m.outcomes.items()}),
                      f"{m.server_cpu_cores:.2f}", f"{m.client_cpu_cores:.2f}", f"{m.server_cpu_ms_per_call:.2f}")
    console.print(calls)
    targets = Table(title="allocation against the no-op, same server, same run")
    for column in ("ratio", "value", "target", "verdict"):
        targets.add_column(column, justify="left" if column == "ratio" else "right")
    for t in report.targets():
        targets.add_row(t.name, f"{t.value:.2f}", t.bound, "[green]PASS[/]" if t.met else "[red]MISS[/]")
    console.print(targets)
    for in_flight in sorted({m.in_flight for m in report.measurements}):
        noop, alloc = report.find(NOOP, in_flight), report.find(ALLOCATE, in_flight)
        if noop.server_cpu_ms_per_call:
            times = alloc.server_cpu_ms_per_call / noop.server_cpu_ms_per_call
            console.print(f"at {in_flight} in flight an allocation costs the server {times:.1f}x the CPU of a no-op "
                          f"(where the server is CPU-bound, the throughput ratio is at most {1 / times:.2f})")
    console.print(f"server resident memory (VmRSS): {report.server_rss_mib_before:.1f} MiB before the load, "
                  f"{report.server_rss_mib_after:.1f} MiB after")
    console.print(f"allocations: {report.doctors} doctors x {report.days} dates, {report.per_day} seats each in slots of 20 "
                  "seats each, filled in turn; every call a distinct patient with a request_id")
    console.print(f"CPU columns: cores busy in the row's stretches (1.00 = one of {os.cpu_count()}); machine load "
                  f"average {report.load_average_before:.2f} before, {report.load_average_after:.2f} after")
    console.print(f"errors: {report.total_errors}; server exit code {report.server_exit_code}; "
                  f"run took {report.wall_seconds:.1f} s")
    print(report.as_json(), flush=True)


def _counts(counter: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counter.items()))
