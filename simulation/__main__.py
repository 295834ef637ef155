"""`python -m simulation [--seed N] [--large] [--boards N] [--address HOST:PORT] [--report PATH]`: play an OPD day
against a server over gRPC, check SPEC §3 through the API as it goes, write the end-of-day report (an HTML page, see
`clients.report`), print a summary, and exit 1 if anything was violated (2 if the day could not be played or its
report not written).

With `--boards N`, N display boards watch the queues beside the day (see `simulation.boards`); at the end each
board's picture must equal the server's state, and any difference is a violation.

Without --address it starts `python -m opd_grpc` on a temporary SQLite file and stops it at the end. A server
given with --address must run with OPD_TEST_CLOCK=1 and the defaults the simulation assumes (TIMEZONE=UTC,
NO_SHOW_GRACE_PERIOD_MINUTES=15, AUTO_NO_SHOW off).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import sys
from pathlib import Path

import grpc
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from clients.library import OPDClient, OPDError
from clients.report import write_report
from opd_grpc._gen.opd.v1 import test_clock_pb2, test_clock_pb2_grpc
from opd_grpc.process import ServerFailed, ServerProcess
from simulation import report
from simulation.boards import Boards
from simulation.play import CALL_TIMEOUT_SECONDS, CannotRun, Day, Outcome
from simulation.scenario import LARGE, OPENS_AT, SMALL, DayPlan, build_day

CONNECT_SECONDS = 10.0
LARGE_CHECK_EVERY_MINUTES = 10  # in large mode SPEC §3 is checked after each batch of simulated minutes
WIDTH_WHEN_NOT_A_TERMINAL = 150
DEFAULT_REPORT = Path("opd-day-report.html")  # in the current directory (.gitignore names it)
# The settings the simulation assumes (SPEC §14 defaults, UTC, no automatic no-shows); the test clock is on.
SERVER_SETTINGS = {"TIMEZONE": "UTC", "NO_SHOW_GRACE_PERIOD_MINUTES": 15, "AUTO_NO_SHOW": "false",
                   "MAX_WAITLIST_SIZE": 50}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=7, help="the day's random seed (default 7)")
    parser.add_argument("--large", action="store_true", help="20 doctors and thousands of patients")
    parser.add_argument("--boards", type=int, default=0, metavar="N",
                        help="run N display boards beside the day and check their pictures at the end (default 0)")
    parser.add_argument("--address", help="HOST:PORT of a running server started with OPD_TEST_CLOCK=1")
    parser.add_argument("--report", type=Path, default=DEFAULT_REPORT, metavar="PATH",
                        help=f"where to write the end-of-day report (default {DEFAULT_REPORT})")
    args = parser.parse_args(argv)
    if args.boards < 0:
        parser.error("--boards must be 0 or more")
    console = Console()
    if not console.is_terminal:
        console = Console(width=WIDTH_WHEN_NOT_A_TERMINAL)
    plan = build_day(args.seed, LARGE if args.large else SMALL)
    try:
        if args.address:
            outcome = play(plan, args.address, console, args.boards, args.report)
        else:
            with ServerProcess(settings=SERVER_SETTINGS) as server:
                outcome = play(plan, server.address, console, args.boards, args.report)
    except (CannotRun, ServerFailed) as error:
        console.print(f"[red]simulation: {error}[/red]")
        return 2
    report.render(outcome, console)
    return 1 if outcome.violations else 2 if outcome.report_error else 0


def play(plan: DayPlan, address: str, console: Console, board_count: int = 0,
         report_path: Path | None = None) -> Outcome:
    """Plays the day; with `report_path`, then writes the end-of-day report there."""
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
        client = OPDClient(channel=channel, timeout=CALL_TIMEOUT_SECONDS)
        day = Day(plan, client, clock)
        boards = Boards(client, plan, board_count, day.date) if board_count else None
        if boards is not None:
            day.on_open, day.on_minute = boards.open, boards.minute
        with boards or contextlib.nullcontext():
            outcome = day.run() if plan.scale is not LARGE else _run_with_progress(day, console)
            if boards is not None:
                outcome.boards = boards.finish()
                for mismatch in outcome.boards.mismatches:
                    outcome.violations.setdefault(mismatch, "end of the day")
        if report_path is not None:
            outcome.report_path = report_path
            try:
                outcome.report = write_report(client, day.date, outcome.doctors, report_path)
            except (OPDError, OSError) as error:
                outcome.report_error = str(error)
        return outcome


def _run_with_progress(day: Day, console: Console) -> Outcome:
    """The large day, checked after each batch of minutes, with a progress bar."""
    plan, on_minute = day.plan, day.on_minute
    day.check_every_minutes = LARGE_CHECK_EVERY_MINUTES
    minutes = int((plan.stops_at - OPENS_AT).total_seconds() // 60)
    columns = (TextColumn("[bold]simulating[/bold] {task.description}"), BarColumn(),
               TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(f"{OPENS_AT:%H:%M}", total=minutes)

        def advanced(now: dt.datetime) -> None:
            on_minute(now)
            progress.update(task, completed=int((now - OPENS_AT).total_seconds() // 60),
                            description=f"{now:%H:%M}, {len(day.visits)} requests, "
                                        f"{len(day.violations)} violations")

        day.on_minute = advanced
        outcome = day.run()
        progress.update(task, completed=minutes)
    return outcome


if __name__ == "__main__":
    sys.exit(main())
