"""`make bench` in a tiny mode: it runs end to end against a real server process and reports every figure.

No figure is compared with a bound here: speed is judged from the bench's ratios and fan-out targets, never by a
timed test. What is checked is that the figures are there, and that fan-out lost and repeated nothing. The
PostgreSQL part runs against the suite's PostgreSQL (TEST_POSTGRES_URL) when one answers, even in the SQLite half.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.postgres import unreachable
from bench.report import FanoutMeasurement
from tests import support

pytestmark = pytest.mark.backend_independent

ROOT = Path(__file__).resolve().parents[2]
KINDS = {"health-check", "get-doctor", "allocate"}
IN_FLIGHT = {1, 32}
TINY_FANOUT = ("--fanout", "10x20", "--fanout", "40x10", "--fanout-seconds", "0.5")
NOWHERE = "postgresql+psycopg://postgres@127.0.0.1:1/test"  # nothing listens on port 1


def run_tiny_bench(*extra: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    completed = subprocess.run(
        [sys.executable, "-m", "bench", "--seconds", "0.4", "--warmup", "0.1", "--doctors", "2", "--days", "40",
         "--per-day", "100", *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed, json.loads(completed.stdout.strip().splitlines()[-1])


def test_bench_measures_both_calls_at_both_depths_with_no_errors() -> None:
    completed, report = run_tiny_bench("--rounds", "2", *TINY_FANOUT, "--no-postgres")

    assert report["total_errors"] == 0
    assert report["server_exit_code"] == 0  # stopped cleanly by SIGTERM
    rows = {(m["kind"], m["in_flight"]): m for m in report["measurements"]}
    assert set(rows) == {(kind, n) for kind in KINDS for n in IN_FLIGHT}
    for m in rows.values():
        assert m["errors"] == {}
        assert m["calls"] > 0 and m["calls_per_second"] > 0
        assert 0 < m["p50_ms"] <= m["p99_ms"]
        assert m["server_cpu_ms_per_call"] > 0
    for n in IN_FLIGHT:  # every allocation a real confirmation, never a waitlisting
        assert rows[("allocate", n)]["outcomes"] == {"STATUS_CONFIRMED": rows[("allocate", n)]["calls"]}
        assert rows[("health-check", n)]["outcomes"] == {"SERVING": rows[("health-check", n)]["calls"]}
        assert rows[("get-doctor", n)]["outcomes"] == {"FOUND": rows[("get-doctor", n)]["calls"]}
    assert report["server_rss_mib_before"] > 0 and report["server_rss_mib_after"] > 0
    budget = report["cpu_budget"]  # from the 32-in-flight rows' CPU per call
    assert budget["in_flight"] == 32
    assert budget["allocate_server_ms"] == rows[("allocate", 32)]["server_cpu_ms_per_call"] > 0
    assert budget["pipeline_server_ms"] == rows[("get-doctor", 32)]["server_cpu_ms_per_call"] > 0
    assert budget["server_bound"] == round(rows[("health-check", 32)]["server_cpu_ms_per_call"]
                                           / rows[("allocate", 32)]["server_cpu_ms_per_call"], 3)
    assert 0 < budget["machine_bound"] and budget["allocate_client_ms"] > 0
    assert {t["name"] for t in report["targets"]} == {
        "allocate / no-op throughput at 1 in flight", "allocate / no-op throughput at 32 in flight",
        "allocate p99 / no-op p99 at 32 in flight"}

    assert_fanout_complete(report, {(10, 20.0), (40, 10.0)})
    assert report["fanout_targets"] == []  # the issue's targets are for 100 and 1000 watchers only

    table = completed.stdout
    for heading in ("calls/s", "p50 ms", "p99 ms", "errors", "server resident memory (VmRSS)", "delivered/s",
                    "KiB/watcher", "server µs CPU/delivery", "fan-out faults: 0", "the call pipeline",
                    "cores busy"):
        assert heading in table
    assert table.count("PASS") + table.count("MISS") == 3


def assert_fanout_complete(report: dict, runs: set[tuple[int, float]]) -> None:
    """Every watcher received every event once and in order, and every figure was measured."""
    assert report["fanout_faults"] == 0
    rows = {(f["watchers"], f["events_per_second"]): f for f in report["fanout"]}
    assert set(rows) == runs
    for f in rows.values():
        assert f["lost"] == 0 and f["duplicates"] == 0
        assert f["complete_watchers"] == f["watchers"]
        assert f["stream_errors"] == {} and f["change_errors"] == {} and f["healthy_after"]
        assert f["events"] == f["changes"] > 0  # each allocation one event
        assert f["deliveries"] == f["expected_deliveries"] == f["watchers"] * f["events"]
        assert f["deliveries_per_second"] > 0 and f["expected_deliveries_per_second"] > 0
        assert 0 < f["p50_ms"] <= f["p99_ms"] <= f["max_ms"]
        assert 0 < f["first_receipt_p50_ms"] <= f["last_receipt_p50_ms"]
        assert f["server_cpu_cores"] > 0 and f["watcher_cpu_cores"] > 0 and f["server_cpu_us_per_delivery"] > 0
        assert f["connect_seconds"] > 0 and f["server_rss_mib_idle"] > 0 and f["server_rss_mib_closed"] > 0
    # a few watchers may fit in memory the server already holds; the most watchers never do
    assert max(rows.values(), key=lambda f: f["watchers"])["kib_per_watcher"] > 0


def test_bench_splits_the_calls_and_the_watchers_over_two_client_processes_and_says_so_without_postgres() -> None:
    completed, report = run_tiny_bench("--rounds", "1", "--client-processes", "2", "--watcher-processes", "2",
                                       "--fanout", "11x10", "--fanout-seconds", "0.5", "--postgres-url", NOWHERE)

    assert report["client_processes"] == 2 and report["watcher_processes"] == 2
    assert report["total_errors"] == 0
    allocations = [m for m in report["measurements"] if m["kind"] == "allocate"]
    assert all(m["outcomes"] == {"STATUS_CONFIRMED": m["calls"]} for m in allocations)
    assert_fanout_complete(report, {(11, 10.0)})
    assert report["postgres"]["skipped"].startswith(f"no PostgreSQL answers at {NOWHERE}: ")
    assert report["postgres"]["measurements"] == [] and report["postgres"]["faults"] == 0
    assert "PostgreSQL part SKIPPED: no PostgreSQL answers at" in completed.stdout


def test_bench_measures_allocation_on_postgres_with_one_and_two_replicas() -> None:
    why = unreachable(support.POSTGRES_URL)
    if why and support.TEST_DATABASE != "postgresql":
        pytest.skip(f"the bench's PostgreSQL part was not exercised: no PostgreSQL answers at "
                    f"{support.POSTGRES_URL} ({why})")
    completed, report = run_tiny_bench("--rounds", "1", "--fanout", "0x0", "--postgres-url", support.POSTGRES_URL,
                                       "--postgres-doctors", "4")

    pg = report["postgres"]
    assert pg["skipped"] == "" and pg["spread_doctors"] == 4
    assert pg["errors"] == 0 and pg["faults"] == 0 and pg["hot_faults"] == []
    assert pg["server_exit_codes"] == [0, 0]  # both replicas stopped cleanly by SIGTERM
    rows = {(m["replicas"], m["workload"], m["in_flight"]): m for m in pg["measurements"]}
    assert set(rows) == {(r, w, n) for r in (1, 2) for w in ("no-op", "spread", "hot") for n in IN_FLIGHT}
    for (_, workload, _), m in rows.items():
        assert m["errors"] == {}
        assert m["calls"] > 0 and m["calls_per_second"] > 0
        assert 0 < m["p50_ms"] <= m["p99_ms"]
        assert m["server_cpu_ms_per_call"] > 0
        if workload == "no-op":
            assert m["kind"] == "health-check" and m["outcomes"] == {"SERVING": m["calls"]}
        else:  # every allocation a real confirmation, and the hot slot holds each one
            assert m["kind"] == "allocate" and m["outcomes"] == {"STATUS_CONFIRMED": m["calls"]}
            assert m["database_cpu_ms_per_call"] > 0 or not pg["database_cpu_measured"]
        assert (m["hot_day_tokens"] >= m["calls"]) == (workload == "hot")  # one round: one hot day per row
    assert len(pg["ratios"]) == 8 + 6 and all(r["value"] > 0 for r in pg["ratios"])

    table = completed.stdout
    for heading in ("PostgreSQL at", "replicas", "db CPU", "2 replicas / 1 replica throughput",
                    "matched its confirmations", "PostgreSQL faults: 0"):
        assert heading in table
    assert table.count("PASS") + table.count("MISS") == 3  # the issue sets no target for PostgreSQL


def test_the_issue_fanout_targets_are_judged_on_p99_for_their_own_runs_only() -> None:
    def run(watchers: int, rate: float, p99_ms: float) -> FanoutMeasurement:
        figures = {f.name: 0 for f in dataclasses.fields(FanoutMeasurement)}
        return FanoutMeasurement(**{**figures, "watchers": watchers, "events_per_second": rate, "p99_ms": p99_ms})

    verdicts = {(w, r, p99): (t.bound, t.met) if (t := run(w, r, p99).target()) else None
                for w, r, p99 in ((100, 10, 25.0), (100, 10, 25.1), (1000, 2, 150.0), (1000, 2, 150.1), (40, 10, 1))}
    assert verdicts == {(100, 10, 25.0): ("<= 25 ms", True), (100, 10, 25.1): ("<= 25 ms", False),
                        (1000, 2, 150.0): ("<= 150 ms", True), (1000, 2, 150.1): ("<= 150 ms", False),
                        (40, 10, 1): None}


def test_churn_reports_the_servers_memory_after_the_day_is_filled_and_after_each_round() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "bench.churn", "--watchers", "3", "--rounds", "2", "--events", "2", "--every", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert (report["tokens"], report["server_exit_code"]) == (14, 0)
    assert [point["rounds"] for point in report["server_mib"]] == [0, 1, 2]
    assert all(point["mib"] > 0 for point in report["server_mib"])
