"""`python -m bench` (`make bench`): one server, a no-op RPC, GetDoctor (the call pipeline without the database)
and AllocateToken measured in turn at 1 and 32 calls in flight, and allocation's speed as ratios against the
no-op's, with what the machine's CPU allows (SPEC-free figures; never a timed test);
then, on the same server, WatchQueue's fan-out to many watchers of one doctor-day; then, when a PostgreSQL
answers, allocation with 1 and with 2 replicas on it, on spread doctor-days and on one hot slot.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from bench import postgres
from bench.fanout import FanoutBench
from bench.load import ALLOCATE, NOOP, PIPELINE, LoadGenerator, Totals, create_pool
from bench.procfs import cpu_seconds, rss_mib
from bench.report import FanoutMeasurement, Measurement, PostgresReport, Report, print_report
from opd_grpc.process import ServerProcess
from opd_grpc.settings import Settings

IN_FLIGHT = (1, 32)
KINDS = (NOOP, PIPELINE, ALLOCATE)  # measured in turn, in each round
FANOUT = ("100x10", "1000x2")  # the issue's: watchers x events per second


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--seconds", type=float, default=6.0,
                        help="measured time per call kind and calls in flight, over all rounds (default 6)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="times the no-op and allocation alternate at each number in flight, so that other "
                             "load on the machine falls on both alike (default 3)")
    parser.add_argument("--warmup", type=float, default=0.5,
                        help="unmeasured calls before each measured stretch, in seconds (default 0.5)")
    parser.add_argument("--client-processes", type=int, default=1,
                        help="client processes that share the calls in flight (default 1)")
    parser.add_argument("--doctors", type=int, default=8, help="doctors that allocations cycle through (default 8)")
    parser.add_argument("--days", type=int, default=60,
                        help="dates per doctor, each with --per-day seats in slots of 20 (default 60)")
    parser.add_argument("--per-day", type=int, default=200,
                        help="allocations per doctor-day, and seats of its one slot (default 200)")
    parser.add_argument("--fanout", action="append", metavar="WATCHERSxRATE",
                        help="a fan-out run: that many watchers of one doctor-day, changed RATE times a second; "
                             f"repeatable (default {' and '.join(FANOUT)}; 0x0 for none)")
    parser.add_argument("--fanout-seconds", type=float, default=10.0,
                        help="time the changes last in each fan-out run (default 10)")
    parser.add_argument("--watcher-processes", type=int, default=1,
                        help="client processes that share the watchers (default 1)")
    parser.add_argument("--postgres-url", default=postgres.DEFAULT_URL,
                        help="the PostgreSQL database of the replicas' part, which works in a schema of its own and "
                             f"is skipped if none answers (default {postgres.DEFAULT_URL})")
    parser.add_argument("--postgres-doctors", type=int, default=64,
                        help="doctors that the PostgreSQL part's spread allocations cycle through, each with --days "
                             "dates of --per-day seats: at least twice the calls in flight, so that calls in flight "
                             "rarely share a doctor-day (default 64)")
    parser.add_argument("--no-postgres", action="store_true", help="skip the PostgreSQL part")
    parser.add_argument("--profile", type=Path, metavar="FILE",
                        help="run the server under cProfile and write its stats to FILE (slows the server)")
    args = parser.parse_args(argv)
    fanout = [_fanout_run(parser, text) for text in args.fanout or FANOUT]
    fanout = [(watchers, rate) for watchers, rate in fanout if watchers]

    started, load_before = time.perf_counter(), os.getloadavg()[0]
    # The wall clock, not the test clock: an event's occurred_at is then the moment of the change. The fan-out
    # watchers, and the few streams it opens beside them, need room among MAX_WATCHERS.
    settings = {"MAX_WATCHERS": Settings.MAX_WATCHERS + max((w for w, _ in fanout), default=0)}
    program = ("-m", "bench.profile_server", str(args.profile)) if args.profile else ("-m", "opd_grpc")
    server = ServerProcess(test_clock=False, settings=settings, program=program)
    server.start()
    try:
        pool = create_pool(server.address, args.doctors, args.days, args.per_day)
        rss_before = rss_mib(server.pid)
        load = LoadGenerator(args.client_processes)
        results = {(kind, n): Totals() for n in IN_FLIGHT for kind in KINDS}
        try:
            for in_flight in IN_FLIGHT:
                for _ in range(args.rounds):
                    for kind in KINDS:
                        totals = results[(kind, in_flight)]
                        cpu_before, wall_before = cpu_seconds(server.pid), time.perf_counter()
                        totals.load.merge(load.measure((server.address,), pool, kind, in_flight, args.warmup,
                                                       args.seconds / args.rounds))
                        totals.wall_seconds += time.perf_counter() - wall_before
                        totals.server_cpu_seconds += cpu_seconds(server.pid) - cpu_before
        finally:
            load.close()
        measurements = [Measurement.of(kind, n, args.seconds, t.load, t.wall_seconds, t.server_cpu_seconds)
                        for (kind, n), t in results.items()]
        rss_after = rss_mib(server.pid)
        fanout_results = []
        if fanout:
            watch = FanoutBench(server.address, server.pid, args.watcher_processes)
            try:
                fanout_results = [FanoutMeasurement.of(watch.measure(watchers, rate, args.fanout_seconds))
                                  for watchers, rate in fanout]
            finally:
                watch.close()
    finally:
        exit_code = server.stop()
    if args.no_postgres:
        postgres_report = PostgresReport(url="", skipped="--no-postgres")
    else:
        postgres_report = postgres.run(args.postgres_url, postgres.Load(
            IN_FLIGHT, args.rounds, args.warmup, args.seconds, args.client_processes, args.postgres_doctors,
            args.days, args.per_day))
    report = Report(address=server.address, client_processes=args.client_processes, doctors=args.doctors,
                    days=args.days, per_day=args.per_day, warmup=args.warmup, seconds=args.seconds,
                    rounds=args.rounds, load_average_before=load_before, load_average_after=os.getloadavg()[0],
                    measurements=measurements, server_rss_mib_before=rss_before, server_rss_mib_after=rss_after,
                    server_exit_code=exit_code, wall_seconds=time.perf_counter() - started, fanout=fanout_results,
                    watcher_processes=args.watcher_processes, postgres=postgres_report)
    print_report(report)
    healthy = report.total_errors == 0 and report.fanout_faults == 0 and exit_code == 0
    return 0 if healthy and report.postgres.faults == 0 else 1


def _fanout_run(parser: argparse.ArgumentParser, text: str) -> tuple[int, float]:
    watchers, _, rate = text.partition("x")
    try:
        run = int(watchers), float(rate)
    except ValueError:
        parser.error(f"--fanout {text!r}: expected WATCHERSxRATE, e.g. 100x10")
    if run[0] < 0 or run[1] < 0 or (run[0] > 0) != (run[1] > 0):
        parser.error(f"--fanout {text!r}: watchers and rate are both positive (or 0x0 for no fan-out)")
    return run


if __name__ == "__main__":
    sys.exit(main())
