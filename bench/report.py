"""The bench's figures: tables for people, then one JSON line for machines (the last line printed)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table

from bench.fanout import FanoutResult
from bench.load import ALLOCATE, NOOP, PIPELINE, LoadResult, Totals, percentile

# The targets: allocation keeps at least half the no-op's throughput, and its p99 at 32 in flight is
# at most twice the no-op's.
MIN_THROUGHPUT_RATIO = 0.5
MAX_P99_RATIO = 2.0
P99_TARGET_IN_FLIGHT = 32
# The fan-out targets: p99 from commit to receipt, by (watchers, events per second), on a 2-core machine.
FANOUT_P99_TARGETS_MS = {(100, 10.0): 25.0, (1000, 2.0): 150.0}


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
    # The bench's client processes, every thread (the server's log goes to a file: none of this reads it).
    client_cpu_ms_per_call: float = 0.0

    @classmethod
    def of(cls, kind: str, in_flight: int, seconds: float, result: LoadResult, wall_seconds: float,
           server_cpu_seconds: float) -> Measurement:
        calls, made = len(result.latencies), result.calls_made
        return cls(kind, in_flight, seconds, calls, calls / seconds, percentile(result.latencies, 0.5) * 1000,
                   percentile(result.latencies, 0.99) * 1000, dict(result.errors), dict(result.outcomes),
                   round(server_cpu_seconds / wall_seconds, 2), round(result.client_cpu_seconds / wall_seconds, 2),
                   round(server_cpu_seconds / made * 1000, 3) if made else 0.0,
                   round(result.client_cpu_seconds / made * 1000, 3) if made else 0.0)


@dataclass(frozen=True)
class PostgresMeasurement(Measurement):
    replicas: int = 1
    workload: str = ""  # no-op, spread or hot
    database_cpu_cores: float = 0.0  # every PostgreSQL process on this machine; 0 when it is elsewhere
    database_cpu_ms_per_call: float = 0.0
    hot_day_tokens: int = 0  # the most tokens a hot stretch's doctor-day held at its end

    @classmethod
    def from_totals(cls, replicas: int, workload: str, kind: str, in_flight: int, seconds: float, totals: Totals,
                    hot_day_tokens: int) -> PostgresMeasurement:
        base = Measurement.of(kind, in_flight, seconds, totals.load, totals.wall_seconds, totals.server_cpu_seconds)
        calls = totals.load.calls_made
        return cls(**dataclasses.asdict(base), replicas=replicas, workload=workload,
                   database_cpu_cores=round(totals.database_cpu_seconds / totals.wall_seconds, 2),
                   database_cpu_ms_per_call=round(totals.database_cpu_seconds / calls * 1000, 3) if calls else 0.0,
                   hot_day_tokens=hot_day_tokens)


@dataclass(frozen=True)
class Ratio:
    name: str
    value: float


@dataclass
class PostgresReport:
    """The PostgreSQL part; `skipped` says why it did not run (no PostgreSQL answered), else it is empty."""

    url: str  # without its password
    skipped: str
    spread_doctors: int = 0
    measurements: list[PostgresMeasurement] = field(default_factory=list)
    database_cpu_measured: bool = False
    hot_faults: list[str] = field(default_factory=list)  # a hot slot whose seat holders differ from confirmations
    server_exit_codes: list[int] = field(default_factory=list)
    wall_seconds: float = 0.0
    load_average_before: float = 0.0  # of the machine, 1 minute, around this part alone
    load_average_after: float = 0.0

    @property
    def errors(self) -> int:
        return sum(sum(m.errors.values()) for m in self.measurements)

    @property
    def faults(self) -> int:
        """Calls that failed, hot slots that disagree with their confirmations, replicas that stopped badly."""
        return self.errors + len(self.hot_faults) + sum(code != 0 for code in self.server_exit_codes)

    def find(self, replicas: int, workload: str, in_flight: int) -> PostgresMeasurement:
        return next(m for m in self.measurements
                    if (m.replicas, m.workload, m.in_flight) == (replicas, workload, in_flight))

    def ratios(self) -> list[Ratio]:
        """Allocation against the no-op on the same replicas, and 2 replicas against 1 (no targets: the issue
        sets none)."""
        ratios = []
        replica_counts = sorted({m.replicas for m in self.measurements})
        depths = sorted({m.in_flight for m in self.measurements})
        for replicas in replica_counts:
            for n in depths:
                noop = self.find(replicas, "no-op", n).calls_per_second
                for workload in ("spread", "hot"):
                    ratios.append(Ratio(f"{workload} / no-op throughput, {replicas} replica(s), {n} in flight",
                                        _ratio(self.find(replicas, workload, n).calls_per_second, noop)))
        if len(replica_counts) > 1:
            first, last = replica_counts[0], replica_counts[-1]
            for workload in ("no-op", "spread", "hot"):
                for n in depths:
                    ratios.append(Ratio(f"{workload}: {last} replicas / {first} replica throughput, {n} in flight",
                                        _ratio(self.find(last, workload, n).calls_per_second,
                                               self.find(first, workload, n).calls_per_second)))
        return ratios


def _ratio(value: float, base: float) -> float:
    return round(value / base, 3) if base else 0.0


@dataclass(frozen=True)
class FanoutMeasurement:
    watchers: int
    events_per_second: float  # the rate the changes were paced to
    seconds: float
    changes: int  # allocations made, each one event
    change_errors: dict[str, int]
    events: int  # the day's events during the run, which every watcher must receive
    deliveries: int  # events received, over all watchers
    expected_deliveries: int
    deliveries_per_second: float  # over the changes' period, or until the last receipt if later
    expected_deliveries_per_second: float  # watchers x events_per_second
    p50_ms: float  # receipt - occurred_at, over every delivery
    p99_ms: float
    max_ms: float
    first_receipt_p50_ms: float  # per event, its first watcher's latency: the change and one write
    last_receipt_p50_ms: float  # per event, its last watcher's latency: that plus the whole fan-out
    lost: int
    duplicates: int
    complete_watchers: int  # watchers that received every event, once and in order
    stream_errors: dict[str, int]  # streams the server ended
    connect_seconds: float  # until every watcher had its snapshot
    server_rss_mib_idle: float
    server_rss_mib_watched: float  # every watcher connected and idle
    server_rss_mib_closed: float  # after every stream closed
    kib_per_watcher: float
    server_cpu_cores: float  # from the first change to the last receipt
    watcher_cpu_cores: float  # the watchers' client processes, alike
    server_cpu_us_per_delivery: float  # the allocations' share included
    healthy_after: bool

    @classmethod
    def of(cls, r: FanoutResult) -> FanoutMeasurement:
        got = r.received
        window = max(r.seconds, got.last_receipt - r.changes.started_at)
        return cls(
            watchers=r.watchers, events_per_second=r.events_per_second, seconds=r.seconds, changes=r.changes.made,
            change_errors=dict(r.changes.errors), events=r.changes.last_sequence - r.changes.first_sequence,
            deliveries=got.received, expected_deliveries=got.expected,
            deliveries_per_second=round(got.received / window, 1),
            expected_deliveries_per_second=r.watchers * r.events_per_second,
            p50_ms=percentile(got.latencies, 0.5) * 1000, p99_ms=percentile(got.latencies, 0.99) * 1000,
            max_ms=max(got.latencies, default=0.0) * 1000,
            first_receipt_p50_ms=percentile([first for first, _ in got.spread.values()], 0.5) * 1000,
            last_receipt_p50_ms=percentile([last for _, last in got.spread.values()], 0.5) * 1000,
            lost=got.lost, duplicates=got.duplicates, complete_watchers=got.complete, stream_errors=dict(got.errors),
            connect_seconds=round(got.connect_seconds, 2), server_rss_mib_idle=r.server_rss_mib_idle,
            server_rss_mib_watched=r.server_rss_mib_watched, server_rss_mib_closed=r.server_rss_mib_closed,
            kib_per_watcher=round((r.server_rss_mib_watched - r.server_rss_mib_idle) * 1024 / r.watchers, 1),
            server_cpu_cores=round(r.server_cpu_seconds / r.wall_seconds, 2),
            watcher_cpu_cores=round(got.cpu_seconds / r.wall_seconds, 2),
            server_cpu_us_per_delivery=round(r.server_cpu_seconds / got.received * 1e6, 1) if got.received else 0.0,
            healthy_after=r.healthy_after)

    @property
    def faults(self) -> int:
        """Anything that must never happen: lost, repeated or refused, a watcher short, a server unwell."""
        return (self.lost + self.duplicates + (self.watchers - self.complete_watchers)
                + sum(self.stream_errors.values()) + sum(self.change_errors.values()) + (not self.healthy_after))

    def target(self) -> Target | None:
        bound = FANOUT_P99_TARGETS_MS.get((self.watchers, self.events_per_second))
        if bound is None:
            return None
        return Target(f"fan-out p99, {self.watchers} watchers at {self.events_per_second:g} events/s",
                      round(self.p99_ms, 2), f"<= {bound:g} ms", self.p99_ms <= bound)


@dataclass(frozen=True)
class CpuBudget:
    """What the CPU time per call allows allocation, at one number in flight: where the server is CPU-bound, and
    where the machine is, with the client's work and the server's on every core."""

    in_flight: int
    noop_server_ms: float
    pipeline_server_ms: float  # GetDoctor from memory: the call pipeline without the engine's storage
    allocate_server_ms: float
    allocate_client_ms: float
    server_bound: float  # allocate / no-op throughput if the server's CPU time per call decides it
    machine_bound: float  # allocate / no-op throughput if every core ran client or server for allocations

    @classmethod
    def of(cls, noop: Measurement, pipeline: Measurement, allocate: Measurement, cores: int) -> CpuBudget:
        alloc_total = allocate.server_cpu_ms_per_call + allocate.client_cpu_ms_per_call
        most_allocations = cores * 1000 / alloc_total if alloc_total else 0.0  # calls/s with every core busy
        return cls(noop.in_flight, noop.server_cpu_ms_per_call, pipeline.server_cpu_ms_per_call,
                   allocate.server_cpu_ms_per_call, allocate.client_cpu_ms_per_call,
                   _ratio(noop.server_cpu_ms_per_call, allocate.server_cpu_ms_per_call),
                   _ratio(most_allocations, noop.calls_per_second))


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
    fanout: list[FanoutMeasurement]
    watcher_processes: int
    postgres: PostgresReport

    @property
    def fanout_faults(self) -> int:
        return sum(f.faults for f in self.fanout)

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

    def budget(self) -> CpuBudget:
        """At the most calls in flight, where calls queue for the CPU (at 1 in flight, they wait on each other)."""
        n = max(m.in_flight for m in self.measurements)
        return CpuBudget.of(self.find(NOOP, n), self.find(PIPELINE, n), self.find(ALLOCATE, n), os.cpu_count() or 1)

    def as_json(self) -> str:
        data = dataclasses.asdict(self)
        data["targets"] = [dataclasses.asdict(t) for t in self.targets()]
        data["cpu_budget"] = dataclasses.asdict(self.budget())
        data["total_errors"] = self.total_errors
        data["fanout_targets"] = [dataclasses.asdict(t) for f in self.fanout if (t := f.target())]
        data["fanout_faults"] = self.fanout_faults
        data["postgres"].update(ratios=[dataclasses.asdict(r) for r in self.postgres.ratios()],
                                errors=self.postgres.errors, faults=self.postgres.faults)
        return json.dumps(data, sort_keys=True)


def print_report(report: Report) -> None:
    console = Console(width=max(Console().width, 140))
    calls = Table(title=f"opd-grpc bench at {report.address}: {report.seconds:g} s per row in {report.rounds} "
                        f"alternating stretches (+{report.warmup:g} s warm-up each), "
                        f"{report.client_processes} client process(es)")
    for column in ("call", "in flight", "calls", "calls/s", "p50 ms", "p99 ms", "errors", "outcomes",
                   "server CPU", "client CPU", "server ms CPU/call", "client ms CPU/call"):
        calls.add_column(column, justify="left" if column in ("call", "errors", "outcomes") else "right")
    for m in report.measurements:
        calls.add_row(m.kind, str(m.in_flight), str(m.calls), f"{m.calls_per_second:,.0f}", f"{m.p50_ms:.2f}",
                      f"{m.p99_ms:.2f}", _counts(m.errors) or "0",
                      _counts({k.removeprefix("STATUS_"): v for k, v in m.outcomes.items()}),
                      f"{m.server_cpu_cores:.2f}", f"{m.client_cpu_cores:.2f}", f"{m.server_cpu_ms_per_call:.2f}",
                      f"{m.client_cpu_ms_per_call:.2f}")
    console.print(calls)
    targets = Table(title="allocation against the no-op, same server, same run")
    for column in ("ratio", "value", "target", "verdict"):
        targets.add_column(column, justify="left" if column == "ratio" else "right")
    for t in report.targets():
        targets.add_row(t.name, f"{t.value:.2f}", t.bound, "[green]PASS[/]" if t.met else "[red]MISS[/]")
    console.print(targets)
    b = report.budget()
    console.print(f"at {b.in_flight} in flight, server CPU per call: {b.noop_server_ms:.2f} ms a no-op, "
                  f"{b.pipeline_server_ms:.2f} ms GetDoctor (the call pipeline: "
                  f"+{b.pipeline_server_ms - b.noop_server_ms:.2f} ms), {b.allocate_server_ms:.2f} ms an allocation "
                  f"(the engine and storage: +{b.allocate_server_ms - b.pipeline_server_ms:.2f} ms); so allocate / "
                  f"no-op throughput can be at most {b.server_bound:.2f} where the server is CPU-bound, and at most "
                  f"{b.machine_bound:.2f} with client ({b.allocate_client_ms:.2f} ms a call) and server keeping all "
                  f"{os.cpu_count()} cores busy")
    console.print(f"server resident memory (VmRSS): {report.server_rss_mib_before:.1f} MiB before the load, "
                  f"{report.server_rss_mib_after:.1f} MiB after")
    console.print(f"allocations: {report.doctors} doctors x {report.days} dates, {report.per_day} seats each in slots of 20 "
                  "seats each, filled in turn; every call a distinct patient with a request_id")
    console.print(f"CPU columns: cores busy in the row's stretches (1.00 = one of {os.cpu_count()}); machine load "
                  f"average {report.load_average_before:.2f} before, {report.load_average_after:.2f} after")
    if report.fanout:
        print_fanout(console, report)
    print_postgres(console, report)
    console.print(f"errors: {report.total_errors}; fan-out faults: {report.fanout_faults}; "
                  f"server exit code {report.server_exit_code}; PostgreSQL "
                  f"{'skipped' if report.postgres.skipped else f'faults: {report.postgres.faults}'}; "
                  f"run took {report.wall_seconds:.1f} s")
    print(report.as_json(), flush=True)


def print_fanout(console: Console, report: Report) -> None:
    runs = report.fanout
    delivery = Table(title=f"fan-out on the same server after the calls above: {runs[0].seconds:g} s of changes per "
                           "row; latency from commit to receipt")
    for column in ("watchers", "events/s", "events", "delivered", "delivered/s (expected)", "p50 ms", "p99 ms",
                   "max ms", "lost", "dup.", "complete", "p99 target", "verdict"):
        delivery.add_column(column, justify="right")
    for f in runs:
        target = f.target()
        delivery.add_row(str(f.watchers), f"{f.events_per_second:g}", str(f.events), f"{f.deliveries:,}",
                         f"{f.deliveries_per_second:,.0f} ({f.expected_deliveries_per_second:,.0f})",
                         f"{f.p50_ms:.2f}", f"{f.p99_ms:.2f}", f"{f.max_ms:.2f}", str(f.lost), str(f.duplicates),
                         f"{f.complete_watchers}/{f.watchers}", target.bound if target else "-",
                         "-" if target is None else "[green]PASS[/]" if target.met else "[red]MISS[/]")
    console.print(delivery)
    cost = Table(title="what the watchers cost")
    for column in ("watchers", "connected in s", "server MiB idle", "MiB watched", "MiB closed", "KiB/watcher",
                   "server CPU", "watcher CPU", "server µs CPU/delivery"):
        cost.add_column(column, justify="right")
    for f in runs:
        cost.add_row(str(f.watchers), f"{f.connect_seconds:.2f}", f"{f.server_rss_mib_idle:.1f}",
                     f"{f.server_rss_mib_watched:.1f}", f"{f.server_rss_mib_closed:.1f}", f"{f.kib_per_watcher:.0f}",
                     f"{f.server_cpu_cores:.2f}", f"{f.watcher_cpu_cores:.2f}", f"{f.server_cpu_us_per_delivery:.0f}")
    console.print(cost)
    console.print(f"watchers: WatchQueue streams of one doctor-day in {report.watcher_processes} client process(es), "
                  "each on its own connection, while this process allocates into the day at the rate, one call at a "
                  "time; latency = receipt - the event's occurred_at, both on this machine's wall clock (the bench "
                  "server runs without the test clock). MiB: server VmRSS before the watchers connected, with them "
                  "connected and idle, after they closed. CPU: cores busy from the first change to the last receipt")
    for f in runs:
        console.print(f"{f.watchers} watchers: an event's first receipt came after {f.first_receipt_p50_ms:.2f} ms "
                      f"and its last after {f.last_receipt_p50_ms:.2f} ms (p50 over events); {f.changes} allocations; "
                      f"change errors {_counts(f.change_errors) or 0}, "
                      f"streams ended by the server {_counts(f.stream_errors) or 0}; server "
                      f"{'healthy' if f.healthy_after else '[red]NOT healthy[/]'} once every stream closed")


def print_postgres(console: Console, report: Report) -> None:
    pg = report.postgres
    if pg.skipped:
        console.print(f"[yellow]PostgreSQL part SKIPPED[/]: {pg.skipped} (--postgres-url chooses the database)")
        return
    calls = Table(title=f"PostgreSQL at {pg.url}: {report.seconds:g} s per row in {report.rounds} alternating "
                        f"stretches (+{report.warmup:g} s warm-up each); each call to one of the replicas at random")
    for column in ("replicas", "workload", "in flight", "calls", "calls/s", "p50 ms", "p99 ms", "errors", "outcomes",
                   "server CPU", "db CPU", "server ms CPU/call", "db ms CPU/call"):
        calls.add_column(column, justify="left" if column in ("workload", "errors", "outcomes") else "right",
                         no_wrap=column == "outcomes")
    for m in sorted(pg.measurements, key=lambda m: (m.replicas, m.in_flight)):
        calls.add_row(str(m.replicas), m.workload, str(m.in_flight), str(m.calls), f"{m.calls_per_second:,.0f}",
                      f"{m.p50_ms:.2f}", f"{m.p99_ms:.2f}", _counts(m.errors) or "0",
                      _counts({k.removeprefix("STATUS_"): v for k, v in m.outcomes.items()}),
                      f"{m.server_cpu_cores:.2f}", f"{m.database_cpu_cores:.2f}" if pg.database_cpu_measured else "-",
                      f"{m.server_cpu_ms_per_call:.2f}",
                      f"{m.database_cpu_ms_per_call:.2f}" if pg.database_cpu_measured else "-")
    console.print(calls)
    ratios = Table(title="PostgreSQL: allocation against the no-op on the same replicas, and 2 replicas against 1 "
                         "(the issue sets no target)")
    ratios.add_column("ratio")
    ratios.add_column("value", justify="right")
    for r in pg.ratios():
        ratios.add_row(r.name, f"{r.value:.2f}")
    console.print(ratios)
    hot_tokens = max((m.hot_day_tokens for m in pg.measurements), default=0)
    console.print(f"spread: {pg.spread_doctors} new doctors x {report.days} dates per replica count, {report.per_day} "
                  "seats each in slots of 20; hot: "
                  "every allocation into the one slot (1,000,000 seats) of one doctor-day, a new one for each "
                  f"stretch, which held at most {hot_tokens:,} tokens at its end; each hot slot's seat holders, "
                  "read back through the last replica started, "
                  + ("matched its confirmations" if not pg.hot_faults else "[red]did NOT match[/]: "
                     + "; ".join(pg.hot_faults)))
    console.print("server CPU: cores busy, summed over the replicas; db CPU: "
                  + ("every PostgreSQL process on this machine (other clients' work on it included)"
                     if pg.database_cpu_measured else "not measured (PostgreSQL is not on this machine)")
                  + f"; replicas' exit codes {pg.server_exit_codes}; this part took {pg.wall_seconds:.1f} s, machine "
                  f"load average {pg.load_average_before:.2f} before it, {pg.load_average_after:.2f} after")


def _counts(counter: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counter.items()))
