"""What opdctl says when a call is refused or the server cannot be reached: the server's own message, each field
problem on a line of its own, and a hint at what to do next, chosen by the status code and ErrorInfo reason."""

from __future__ import annotations

import argparse
from typing import Sequence

import grpc

from clients.library import OPDError

EXIT_REFUSED = 1  # the server answered and said no
EXIT_USAGE = 2  # a bad flag, date, pattern or file: nothing was sent (argparse's own code for usage errors)
EXIT_UNREACHABLE = 3  # no answer from the server

_NOT_ANSWERING = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


class UsageError(Exception):
    """A request opdctl will not send as given (a pattern it cannot read, a file it cannot open)."""


class Refused(Exception):
    """A refusal with more to show than the server said (the token a patient already holds)."""

    def __init__(self, error: OPDError, notes: list[str]):
        super().__init__(str(error))
        self.error = error
        self.notes = notes


def exit_code(error: OPDError) -> int:
    return EXIT_UNREACHABLE if error.code in _NOT_ANSWERING else EXIT_REFUSED


def explain(error: OPDError, args: argparse.Namespace, notes: Sequence[str] = ()) -> str:
    """The lines for stderr: what the server said (or that it did not answer), notes, then what to do."""
    said = "the request has these problems:" if error.field_violations else error.message  # each on a line below
    reason = f" ({error.reason})" if error.reason and error.reason != error.code.name else ""
    lines = [f"opdctl: {error.code.name}{reason}: {said}"]
    lines += [f"  {field}: {problem}" for field, problem in error.field_violations]
    lines += list(notes)
    hint = _hint(error, args)
    return "\n".join(lines + ([f"hint: {hint}"] if hint else []))


def command_name(args: argparse.Namespace) -> str:
    """The subcommand the flags were given to, e.g. "opdctl tokens allocate"."""
    return " ".join(["opdctl", args.command, *([args.action] if getattr(args, "action", None) else [])])


def _hint(error: OPDError, args: argparse.Namespace) -> str:
    doctor = _first(getattr(args, "doctor", None)) or "DOCTOR"
    date = getattr(args, "date", None) or "DATE"
    code = error.code
    if code is grpc.StatusCode.UNAVAILABLE and not error.reason:  # no answer: the server's own have a reason
        return (f"is the server running at {args.address}? Start it with `make run` (or pass --address / set "
                "OPD_ADDRESS); if it speaks TLS, pass --ca-cert (and --cert/--key-file for mutual TLS).")
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"the server at {args.address} did not answer within {args.timeout:g} s; try a longer --timeout."
    if code is grpc.StatusCode.UNAUTHENTICATED:
        return "pass --key or set OPD_API_KEY (an administrator makes keys with `opd-grpc keys add`)."
    if code is grpc.StatusCode.PERMISSION_DENIED:
        return "use an API key of the role named above (--key or OPD_API_KEY)."
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return f"fix the fields above; `{command_name(args)} --help` shows each flag."
    return _NEXT_STEP.get(error.reason, "").format(doctor=doctor, date=date)


_NEXT_STEP = {
    "DOCTOR_NOT_FOUND": "`opdctl doctors list` shows the doctors and their ids.",
    "SLOT_NOT_FOUND": "`opdctl slots list --doctor {doctor}` shows the slots; `opdctl slots add` makes more.",
    "TOKEN_NOT_FOUND": "`opdctl tokens list --doctor {doctor} --date {date}` shows a day's tokens and their ids.",
    "HOLIDAY_NOT_FOUND": "`opdctl holidays list` shows the holidays.",
    "HOLIDAY_EXISTS": "to rename it: `opdctl holidays delete {date}`, then add it again.",
    "NO_SLOT_TEMPLATE": "set one first: `opdctl templates set --doctor {doctor} --pattern \"Mon-Fri 09:00-12:00/60\"`.",
    "SLOT_TEMPLATE_OUT_OF_BOUNDS": "set the pattern again: `opdctl templates set --doctor {doctor} --pattern ...`.",
    "QUEUE_EMPTY": "check a patient in first: `opdctl checkin TOKEN`; `opdctl status --doctor {doctor} --date "
                   "{date}` shows who is waiting.",
    "SLOT_OVERLAP": "`opdctl slots list --doctor {doctor}` shows the slots already there.",
    "WAITLIST_FULL": "pick another slot with --time, or pass --flexible to take a later slot with a free seat.",
    "SLOT_CLOSED": "pick a later slot with --time: `opdctl slots list --doctor {doctor} --date {date}`.",
    "CAPACITY_BELOW_SEAT_HOLDERS": "`opdctl slots status SLOT_ID` shows how many seats are taken.",
    "ILLEGAL_STATE_TRANSITION": "`opdctl tokens get TOKEN` shows where the token stands.",
    "DATABASE_CONFLICT": "the server is running, but its database was busy or out of reach and nothing was changed; "
                         "run the command again in a moment.",
    "COMMIT_OUTCOME_UNKNOWN": "the change may have been saved: look (`opdctl tokens list --doctor {doctor} --date "
                              "{date}`) before you run the command again.",
    "SERVER_SHUTTING_DOWN": "the server is stopping and did nothing with this call; run the command again once it "
                            "(or another replica) serves.",
}


def _first(value: str | list[str] | None) -> str | None:
    """`--doctor` is one id, or a list of them for `watch`."""
    if isinstance(value, list):
        return value[0] if value else None
    return value
