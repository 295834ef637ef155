"""`python -m simulation [--seed N] [--large] [--boards N] [--address HOST:PORT [--keys FILE]] [--report PATH]`:
play an OPD day against a server over gRPC, check SPEC §3 through the API as it goes, write the end-of-day report
(an HTML page, see `clients.report`), print a summary, and exit 1 if anything was violated (2 if the day could not
be played or its report not written).

With `--boards N`, N display boards watch the queues beside the day (see `simulation.boards`); at the end each
board's picture must equal the server's state, and any difference is a violation.

The day is played with one API key per role (SPEC §13), each call with the key of the role that may make it:
admin creates the doctors and slots, changes capacities and moves the test clock; reception books every source
but emergencies, checks in and cancels; triage books emergencies; doctor calls, completes and marks no-shows;
display makes the reads (the checks, the boards, the report). A call refused for its key or role is a violation;
a key refused before the day starts (an unknown one, or an admin key that may not set the clock or open the
clinic) ends the run with exit code 2, naming its role, and so does a read refused for its key mid-day (no check
could be made after it). A server that stops answering mid-day (UNAVAILABLE or DEADLINE_EXCEEDED, once the client
library's retries are spent) ends the run at once with exit code 2 too, naming the simulated time and the call.

Without --address it starts `python -m opd_grpc` on a temporary SQLite file, after making one key per role in its
database, and stops it at the end. A server given with --address must run with OPD_TEST_CLOCK=1 and the defaults
the simulation assumes (TIMEZONE=UTC, NO_SHOW_GRACE_PERIOD_MINUTES=15, AUTO_NO_SHOW off). If its database holds
keys, --keys FILE gives one per role, as a TOML file:

    admin = "opd_1f2e3d4c_..."
    reception = "opd_..."
    triage = "opd_..."
    doctor = "opd_..."
    display = "opd_..."   # optional: without it, the reads go with the admin key

Without --keys every call goes without a key, which only a server whose database holds no key accepts.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import sys
import tomllib
from pathlib import Path
from typing import Mapping

import grpc
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from clients.library import OPDError, server_zone
from clients.report import write_report
from opd_grpc._gen.opd.v1 import test_clock_pb2, test_clock_pb2_grpc
from opd_grpc.engine.access import ROLES, Actor
from opd_grpc.offline import offline_service
from opd_grpc.process import ServerFailed, ServerProcess
from opd_grpc.settings import Settings
from simulation import report
from simulation.boards import Boards
from simulation.play import (ACCESS_REFUSALS, CALL_TIMEOUT_SECONDS, CHANGING_ROLES, CannotRun, Day, Outcome, refusal,
                             role_clients)
from simulation.scenario import LARGE, OPENS_AT, SMALL, DayPlan, build_day

CONNECT_SECONDS = 10.0
LARGE_CHECK_EVERY_MINUTES = 10  # in large mode SPEC §3 is checked after each batch of simulated minutes
WIDTH_WHEN_NOT_A_TERMINAL = 150
DEFAULT_REPORT = Path("opd-day-report.html")  # in the current directory (.gitignore names it)
# The settings the simulation assumes (SPEC §14 defaults, UTC, no automatic no-shows); the test clock is on.
SERVER_SETTINGS = {"TIMEZONE": "UTC", "NO_SHOW_GRACE_PERIOD_MINUTES": 15, "AUTO_NO_SHOW": "false",
                   "MAX_WAITLIST_SIZE": 50}
KEY_MAKER = Actor("simulation", "operator")  # the audit log's "who" for the keys made for the simulation's own server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=7, help="the day's random seed (default 7)")
    parser.add_argument("--large", action="store_true", help="20 doctors and thousands of patients")
    parser.add_argument("--boards", type=int, default=0, metavar="N",
                        help="run N display boards beside the day and check their pictures at the end (default 0)")
    parser.add_argument("--address", help="HOST:PORT of a running server started with OPD_TEST_CLOCK=1")
    parser.add_argument("--keys", type=Path, metavar="FILE",
                        help="a TOML file of role = \"key\" lines: the API keys of the server given with --address "
                             f"(each of {', '.join(CHANGING_ROLES)}; display is optional)")
    parser.add_argument("--report", type=Path, default=DEFAULT_REPORT, metavar="PATH",
                        help=f"where to write the end-of-day report (default {DEFAULT_REPORT})")
    args = parser.parse_args(argv)
    if args.boards < 0:
        parser.error("--boards must be 0 or more")
    keys: dict[str, str] = {}
    if args.keys is not None:
        if not args.address:
            parser.error("--keys goes with --address: the simulation's own server gets keys it makes itself")
        try:
            keys = read_keys(args.keys)
        except (OSError, ValueError) as error:
            parser.error(f"--keys {args.keys}: {error}")
    console = Console()
    if not console.is_terminal:
        console = Console(width=WIDTH_WHEN_NOT_A_TERMINAL)
    plan = build_day(args.seed, LARGE if args.large else SMALL)
    try:
        if args.address:
            outcome = play(plan, args.address, keys, console, args.boards, args.report)
        else:
            server = ServerProcess(settings=SERVER_SETTINGS)
            keys = add_keys(server.database_url)  # before it starts, so that it requires them from its first call
            with server:
                outcome = play(plan, server.address, keys, console, args.boards, args.report)
    except (CannotRun, ServerFailed) as error:
        console.print(f"[red]simulation: {escape(str(error))}[/red]", highlight=False, soft_wrap=True)  # one line
        return 2
    report.render(outcome, console)
    return 1 if outcome.violations else 2 if outcome.report_error else 0


def read_keys(path: Path) -> dict[str, str]:
    """The --keys file's role → key table; a ValueError names an unknown role, a missing one, or a key that is empty
    or not a string."""
    with path.open("rb") as file:
        keys = tomllib.load(file)
    unknown = [role for role in keys if role not in ROLES]
    if unknown:
        raise ValueError(f"unknown role {', '.join(map(repr, unknown))}; the roles are {', '.join(ROLES)}")
    missing = [role for role in CHANGING_ROLES if role not in keys]
    if missing:
        raise ValueError(f"no key for the role {', '.join(missing)}; each of {', '.join(CHANGING_ROLES)} needs one")
    not_keys = [role for role, key in keys.items() if not isinstance(key, str) or not key.strip()]
    if not_keys:
        raise ValueError(f"the key of {', '.join(not_keys)} is empty or not a string")
    return keys


def add_keys(database_url: str) -> dict[str, str]:
    """One key per role in the database, made as `opd-grpc keys add` makes them: role → key."""
    with offline_service(database_url, Settings().rules()) as offline:
        return {role: offline.service.add_key(f"simulation {role}", role, KEY_MAKER)[1] for role in ROLES}


def play(plan: DayPlan, address: str, keys: Mapping[str, str], console: Console, board_count: int = 0,
         report_path: Path | None = None) -> Outcome:
    """Plays the day with a client per role presenting `keys` (role → key; none for a server without keys), each
    key first tried with GetTime (open to every role) so that a refused one stops the run naming its role; with
    `report_path`, then writes the end-of-day report there."""
    with grpc.insecure_channel(address) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=CONNECT_SECONDS)
        except grpc.FutureTimeoutError:
            raise CannotRun(f"no server answers at {address}") from None
        clock = test_clock_pb2_grpc.TestClockServiceStub(channel)
        clients = role_clients(channel, keys, CALL_TIMEOUT_SECONDS)
        for role, client in clients.items():
            try:
                clock.GetTime(test_clock_pb2.GetTimeRequest(), timeout=CONNECT_SECONDS, metadata=client.metadata)
            except grpc.RpcError as error:
                raise CannotRun(_will_not_play(address, role, keys, OPDError.from_rpc_error(error))) from None
        day = Day(plan, clients, clock)
        try:
            stats = clients["display"].get_stats(day.date)
        except OPDError as error:
            raise CannotRun(_will_not_play(address, "display", keys, error)) from None
        noon = dt.datetime.combine(dt.date.fromisoformat(day.date), dt.time(12))
        if server_zone(stats).utcoffset(noon):  # its slots would close hours off the simulated clock
            raise CannotRun(f"the server at {address} runs with TIMEZONE={stats.timezone}; the simulation plays a "
                            "day in UTC: start it with OPD_TIMEZONE=UTC")
        boards = Boards(clients["display"], plan, board_count, day.date) if board_count else None
        if boards is not None:
            day.on_open, day.on_minute = boards.open, boards.minute
        with boards or contextlib.nullcontext():
            outcome = day.run() if plan.scale is not LARGE else _run_with_progress(day, console)
            if boards is not None:
                finished = day.read("display", "the boards' last reads (WatchQueue, ListTokens)",
                                    lambda display: boards.finish())
                if not isinstance(finished, OPDError):
                    outcome.boards = finished
                    for mismatch in finished.mismatches:
                        outcome.violations.setdefault(mismatch, "end of the day")
        if report_path is not None:
            outcome.report_path = report_path
            try:
                outcome.report = write_report(clients["display"], day.date, outcome.doctors, report_path)
            except (OPDError, OSError) as error:
                outcome.report_error = str(error)
        return outcome


def _will_not_play(address: str, role: str, keys: Mapping[str, str], error: OPDError) -> str:
    """Why the server at `address` cannot play the day, from its answer to `role`'s first call (GetTime)."""
    if error.code is grpc.StatusCode.UNAUTHENTICATED and not keys:
        return (f"the server at {address} requires API keys (SPEC §13); give one per role with --keys FILE "
                f"[{error}]")
    if error.code in ACCESS_REFUSALS:
        return refusal("GetTime", role, error)
    return f"the server at {address} has no test clock ({error.code.name}); start it with OPD_TEST_CLOCK=1"


def _run_with_progress(day: Day, console: Console) -> Outcome:
    """The large day, checked after each batch of LARGE_CHECK_EVERY_MINUTES simulated minutes (after each step,
    thousands of patients' checks would take most of the run), with a progress bar."""
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
