"""`python -m simulation [--seed N] [--large] [--address HOST:PORT]`: play an OPD day against a server over gRPC,
check SPEC §3 through the API as it goes, print a summary, and exit 1 if anything was violated.

Without --address it starts `python -m opd_grpc` on a temporary SQLite file and stops it at the end. A server
given with --address must run with OPD_TEST_CLOCK=1 and the defaults the simulation assumes (TIMEZONE=UTC,
NO_SHOW_GRACE_PERIOD_MINUTES=15, AUTO_NO_SHOW off).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys

import grpc
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from opd_grpc._gen.opd.v1 import opd_pb2_grpc, test_clock_pb2, test_clock_pb2_grpc
from opd_grpc.process import ServerFailed, ServerProcess
from simulation import report
from simulation.play import CannotRun, Day, Outcome
from simulation.scenario import LARGE, OPENS_AT, SMALL, DayPlan, build_day

CONNECT_SECONDS = 10.0
LARGE_CHECK_EVERY_MINUTES = 10  # in large mode SPEC §3 is checked after each batch of simulated minutes
WIDTH_WHEN_NOT_A_TERMINAL = 150
# The settings the simulation assumes (SPEC §14 defaults, UTC, no automatic no-shows); the test clock is on.
SERVER_SETTINGS = {"TIMEZONE": "UTC", "NO_SHOW_GRACE_PERIOD_MINUTES": 15, "AUTO_NO_SHOW": "false",
                   "MAX_WAITLIST_SIZE": 50}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=7, help="the day's random seed (default 7)")
    parser.add_argument("--large", action="store_true", help="20 doctors and thousands of patients")
    parser.add_argument("--address", help="HOST:PORT of a running server started with OPD_TEST_CLOCK=1")
    args = parser.parse_args(argv)
    console = Console()
    if not console.is_terminal:
        console = Console(width=WIDTH_WHEN_NOT_A_TERMINAL)
    plan = build_day(args.seed, LARGE if args.large else SMALL)
    try:
        if args.address:
            outcome = play(plan, args.address, console)
        else:
            with ServerProcess(settings=SERVER_SETTINGS) as server:
                outcome = play(plan, server.address, console)
    except (CannotRun, ServerFailed) as error:
        console.print(f"[red]simulation: {error}[/red]")
        return 2
    report.render(outcome, console)
    return 1 if outcome.violations else 0


def play(plan: DayPlan, address: str, console: Console) -> Outcome:
    with grpc.insecure_channel(address) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=CONNECT_SECONDS)
        except grpc.FutureTimeoutError:
            raise CannotRun(f"no server answers at {address}") from None
        clock = test_clock_pb2_grpc.TestClockServiceStub(channel)
        try:
            clock.GetTime(test_clock_pb2.GetTimeRequest(), timeout=CONNECT_SECONDS)
        except grpc.RpcError as error:
            raise CannotRun(f"the server at {address} has no test clock ({error.code().name}); "
                            "start it with OPD_TEST_CLOCK=1") from None
        day = Day(plan, opd_pb2_grpc.OPDTokenServiceStub(channel), clock)
        if plan.scale is not LARGE:
            return day.run()
        day.check_every_minutes = LARGE_CHECK_EVERY_MINUTES
        minutes = int((plan.stops_at - OPENS_AT).total_seconds() // 60)
        columns = (TextColumn("[bold]simulating[/bold] {task.description}"), BarColumn(),
                   TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn())
        with Progress(*columns, console=console) as progress:
            task = progress.add_task(f"{OPENS_AT:%H:%M}", total=minutes)

            def advanced(now: dt.datetime) -> None:
                progress.update(task, completed=int((now - OPENS_AT).total_seconds() // 60),
                                description=f"{now:%H:%M}, {len(day.visits)} requests, "
                                            f"{len(day.violations)} violations")

            day.on_minute = advanced
            outcome = day.run()
            progress.update(task, completed=minutes)
        return outcome


if __name__ == "__main__":
    sys.exit(main())
