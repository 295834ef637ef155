"""The summary of a simulated day: a rich table per doctor, the day's events, and the violations found.

A line names the end-of-day report's file (or why it was not written). With boards, a line before the violations
says what they received and how many mismatches they showed. The last line is always `violations: N`.
"""

from __future__ import annotations

from collections import Counter

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from opd_grpc._gen.opd.v1 import opd_pb2 as pb
from simulation.boards import BoardsOutcome
from simulation.checks import mean_wait_minutes
from simulation.ledger import SEAT_HOLDING
from simulation.play import EVENTS, Outcome
from simulation.scenario import OPENS_AT

MAX_VIOLATIONS_SHOWN = 50


def render(outcome: Outcome, console: Console) -> None:
    plan = outcome.plan
    doctors = len(outcome.doctors)
    console.print(f"[bold]OPD simulation[/bold] seed {plan.seed}, {plan.scale.name}: {doctors} "
                  f"doctor{'' if doctors == 1 else 's'}, {len(plan.patients)} patients, {plan.scale.sittings} "
                  f"one-hour slots of {plan.scale.capacity} seats each per doctor")
    console.print(_doctors_table(outcome))
    console.print(_events_table(outcome))
    sources = Counter(pb.Source.Name(t.source).removeprefix("SOURCE_").lower()
                      for t in outcome.ledger.tokens.values())
    console.print("sources: " + ", ".join(f"{name} {n}" for name, n in sources.most_common()))
    console.print(f"simulated {OPENS_AT:%H:%M}–{outcome.ended_at:%H:%M}; {outcome.steps} steps, "
                  f"{outcome.checks} checks of SPEC §3, {outcome.calls} gRPC calls, {outcome.seconds:.1f} s")
    if outcome.report_error:
        console.print(f"[red]day report not written to {escape(str(outcome.report_path))}: "
                      f"{escape(outcome.report_error)}[/red]", highlight=False)
    elif outcome.report_path is not None:
        console.print(f"day report: {escape(str(outcome.report_path.resolve()))}", highlight=False)
    if outcome.boards is not None:
        console.print(_boards_line(outcome.boards), highlight=False)
    for problem, seen in list(outcome.violations.items())[:MAX_VIOLATIONS_SHOWN]:
        console.print(f"[red]VIOLATION[/red] ({seen}) {escape(problem)}", highlight=False)
    if len(outcome.violations) > MAX_VIOLATIONS_SHOWN:
        console.print(f"... and {len(outcome.violations) - MAX_VIOLATIONS_SHOWN} more")
    console.print(f"violations: {len(outcome.violations)}", style="bold red" if outcome.violations else "bold green")


def _boards_line(boards: BoardsOutcome) -> str:
    """E.g. `boards: 3 (cut off 10:00–10:10, from 09:20, all day); events received 812 / 406 / 812; resumes 1,
    reconnects 0; mismatches 0`."""
    return (f"boards: {len(boards.names)} ({', '.join(boards.roles)}); events received "
            f"{' / '.join(map(str, boards.events))}; resumes {boards.resumes}, reconnects {boards.reconnects}; "
            f"mismatches {len(boards.mismatches)}")


def _doctors_table(outcome: Outcome) -> Table:
    table = Table(title="Per doctor (statuses at the end of the day, from GetStats)", title_justify="left")
    for name in ("doctor", "tokens", "confirmed", "waitlisted", "completed", "cancelled", "no-show",
                 "still waiting", "bumps", "promoted", "utilisation", "mean wait"):
        table.add_column(name, justify="left" if name == "doctor" else "right")
    table.columns[2].header = "confirmed*"
    table.columns[3].header = "waitlisted*"
    table.caption = ("* at booking.  promoted: on cancel / on no-show / on capacity raise.  "
                     "mean wait: check-in to call, minutes")
    table.caption_justify = "left"
    totals: Counter[str] = Counter()
    for doctor_id in outcome.doctors:
        stats = outcome.stats.get(doctor_id, pb.DoctorDayStats(doctor_id=doctor_id))
        tally = outcome.tally[doctor_id]
        row = _row(stats.by_status, stats.total_tokens, tally)
        totals.update(stats.by_status)
        totals.update(tally)
        totals["tokens"] += stats.total_tokens
        totals["capacity"] += stats.total_capacity
        table.add_row(doctor_id, *row, f"{stats.utilisation:.0%}", f"{stats.mean_wait_minutes:.1f}")
    holders = sum(totals[pb.Status.Name(s)] for s in SEAT_HOLDING)
    utilisation = holders / totals["capacity"] if totals["capacity"] else 0.0
    mean_wait = mean_wait_minutes(list(outcome.ledger.tokens.values()))
    table.add_section()
    table.add_row("all", *_row(totals, totals["tokens"], totals), f"{utilisation:.0%}", f"{mean_wait:.1f}",
                  style="bold")
    return table


def _row(by_status: object, tokens: int, tally: Counter[str]) -> list[str]:
    status = Counter(dict(by_status))  # type: ignore[call-overload]
    promoted = (f"{tally['promoted_on_cancel']} / {tally['promoted_on_no_show']} / "
                f"{tally['promoted_on_capacity_raise']}")
    return [str(n) for n in (tokens, tally["confirmed"], tally["waitlisted"], status["STATUS_COMPLETED"],
                             status["STATUS_CANCELLED"], status["STATUS_NO_SHOW"], status["STATUS_WAITLISTED"],
                             tally["bumps"])] + [promoted]


def _events_table(outcome: Outcome) -> Table:
    table = Table(title="The day's events (all doctors)", title_justify="left")
    table.add_column("event")
    table.add_column("count", justify="right")
    totals: Counter[str] = Counter()
    for tally in outcome.tally.values():
        totals.update(tally)
    for key, label in EVENTS.items():
        table.add_row(label, str(totals[key]))
    return table
