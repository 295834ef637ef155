"""`make bench` in a tiny mode: it runs end to end against a real server process and reports every figure.

No figure is compared with a bound here: speed is judged from the bench's ratios, never by a timed test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KINDS = {"health-check", "allocate"}
IN_FLIGHT = {1, 32}


def run_tiny_bench(*extra: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    completed = subprocess.run(
        [sys.executable, "-m", "bench", "--seconds", "0.4", "--warmup", "0.1", "--doctors", "2", "--days", "40",
         "--per-day", "100", *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed, json.loads(completed.stdout.strip().splitlines()[-1])


def test_bench_measures_both_calls_at_both_depths_with_no_errors() -> None:
    completed, report = run_tiny_bench("--rounds", "2")

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
    assert report["server_rss_mib_before"] > 0 and report["server_rss_mib_after"] > 0
    assert {t["name"] for t in report["targets"]} == {
        "allocate / no-op throughput at 1 in flight", "allocate / no-op throughput at 32 in flight",
        "allocate p99 / no-op p99 at 32 in flight"}

    table = completed.stdout
    for heading in ("calls/s", "p50 ms", "p99 ms", "errors", "server resident memory (VmRSS)"):
        assert heading in table
    assert table.count("PASS") + table.count("MISS") == 3


def test_bench_splits_the_calls_over_two_client_processes() -> None:
    _, report = run_tiny_bench("--rounds", "1", "--client-processes", "2")

    assert report["client_processes"] == 2
    assert report["total_errors"] == 0
    allocations = [m for m in report["measurements"] if m["kind"] == "allocate"]
    assert all(m["outcomes"] == {"STATUS_CONFIRMED": m["calls"]} for m in allocations)
