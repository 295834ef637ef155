"""opdctl's flags and help: one argparse subcommand per clinic task, each pointing at its function in commands."""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import re
from typing import Any, Callable

from clients.arguments import address, date, zone
from clients.library import DEFAULT_ADDRESS
from clients.opdctl import commands
from clients.opdctl.pattern import EXAMPLE, INT32_LIMIT
from clients.opdctl.render import GENDERS, SOURCES

DESCRIPTION = """\
opdctl: the OPD token service from a terminal, for clinic staff.

  opdctl doctors create --name "Dr Asha Rao" --specialization "General Medicine"
  opdctl slots add --doctor DOC001 --week 2030-01-07 --pattern "Mon-Fri 09:00-12:00/60 x10"
  opdctl tokens allocate --doctor DOC001 --date 2030-01-07 --name "Ravi Kumar" --phone +91-98450-00001 \\
      --source walk-in
  opdctl checkin DOC001-20300107-T1
  opdctl call-next --doctor DOC001 --date 2030-01-07
  opdctl status --doctor DOC001 --date 2030-01-07
  opdctl watch --doctor DOC001 --date 2030-01-07

Every command takes --address, --key, --json, --timezone and the TLS flags, before or after its name. Dates are
YYYY-MM-DD and default to the hospital's today; times are HH:MM. Times of day are shown on the hospital's clock,
the server's TIMEZONE. `opdctl COMMAND --help` says more."""

EPILOG = """\
exit codes: 0 done; 1 the server refused (its message and a hint go to stderr); 2 a bad flag, date, pattern or
file (nothing was sent); 3 the server could not be reached or did not answer in time."""

PATTERN_HELP = f"""\
the slots as a pattern, e.g. {EXAMPLE!r}: parts separated by ';', each with the days (Mon, Mon-Fri, Mon,Wed,Fri;
none: every day), a time range HH:MM-HH:MM, then /N to split it into slots of N minutes (none: one slot) and xC for
C seats per slot (none: the server's DEFAULT_SLOT_CAPACITY)"""


MAX_TIMEOUT_SECONDS = 86_400  # a day; gRPC cannot take a deadline of billions of seconds


def build() -> argparse.ArgumentParser:
    # No abbreviations here: this parser sees the command's flags too, and would take `tokens allocate --time` for
    # an abbreviation of --timeout or --timezone.
    parser = argparse.ArgumentParser(prog="opdctl", description=DESCRIPTION, epilog=EPILOG, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _common_flags(parser, defaults=True)
    tasks = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    doctors = _group(tasks, "doctors", "register and look up doctors")
    leaf = _leaf(doctors, "create", "register a doctor; the server gives the id (DOC001, DOC002, ...)",
                 commands.doctors_create)
    leaf.add_argument("--name", required=True, help='the name, e.g. "Dr Asha Rao"')
    leaf.add_argument("--specialization", required=True, help='e.g. "General Medicine"')
    _leaf(doctors, "list", "every doctor, by id", commands.doctors_list)
    _leaf(doctors, "get", "one doctor", commands.doctors_get).add_argument("doctor_id", metavar="DOCTOR")

    slots = _group(tasks, "slots", "add and inspect a doctor's slots")
    leaf = _leaf(slots, "add", "add a week's (or a day's) slots from a pattern, all or none (CreateSlots)",
                 commands.slots_add)
    _doctor(leaf)
    when = leaf.add_mutually_exclusive_group(required=True)
    when.add_argument("--week", type=date, metavar="DATE", help="the Monday-to-Sunday week that holds DATE")
    when.add_argument("--date", type=date, help="that one day")
    leaf.add_argument("--pattern", required=True, help=PATTERN_HELP)
    _consultation_minutes(leaf)
    leaf = _leaf(slots, "list", "a doctor's slots, of one date or of every date", commands.slots_list)
    _doctor(leaf)
    leaf.add_argument("--date", type=date, help="only this date (default: every date)")
    _leaf(slots, "status", "a slot's seats and its waitlist in order", commands.slots_status).add_argument(
        "slot_id", metavar="SLOT")
    leaf = _leaf(slots, "capacity", "change a slot's seats; a raise promotes from the waitlist at once",
                 commands.slots_capacity)
    leaf.add_argument("slot_id", metavar="SLOT")
    leaf.add_argument("capacity", type=whole_number, metavar="SEATS")

    templates = _group(tasks, "templates", "a doctor's weekly pattern of slots, and making slots from it")
    leaf = _leaf(templates, "set", "replace a doctor's weekly pattern (SetSlotTemplate)", commands.templates_set)
    _doctor(leaf)
    leaf.add_argument("--pattern", required=True, help=PATTERN_HELP)
    _consultation_minutes(leaf)
    _doctor(_leaf(templates, "show", "a doctor's weekly pattern", commands.templates_show))
    leaf = _leaf(templates, "apply", "make the pattern's slots for every date from --from to --to, skipping "
                 "holidays and slots already there", commands.templates_apply)
    _doctor(leaf)
    leaf.add_argument("--from", dest="start", type=date, required=True, metavar="DATE", help="the first date")
    leaf.add_argument("--to", dest="end", type=date, required=True, metavar="DATE", help="the last date (included)")

    holidays = _group(tasks, "holidays", "dates on which the OPD is closed (templates make no slots on them)")
    leaf = _leaf(holidays, "add", "mark a date as a holiday", commands.holidays_add)
    leaf.add_argument("date", type=date, metavar="DATE")
    leaf.add_argument("--name", required=True, help='what the day is, e.g. "Republic Day"')
    leaf = _leaf(holidays, "list", "the holidays, of a range of dates or all", commands.holidays_list)
    leaf.add_argument("--from", dest="start", type=date, metavar="DATE", help="from this date (default: the first)")
    leaf.add_argument("--to", dest="end", type=date, metavar="DATE", help="to this date (default: the last)")
    _leaf(holidays, "delete", "a date is no longer a holiday (its slots stay as they are)",
          commands.holidays_delete).add_argument("date", type=date, metavar="DATE")

    tokens = _group(tasks, "tokens", "give patients tokens and look them up")
    leaf = _leaf(tokens, "allocate", "give a patient a token: a free seat, else the waitlist (emergency: "
                 "AllocateEmergency, which may bump the lowest-priority patient)", commands.tokens_allocate)
    _doctor(leaf)
    _date(leaf)
    leaf.add_argument("--time", type=time, metavar="HH:MM",
                      help="the start of the slot wanted (default: the earliest with a free seat)")
    leaf.add_argument("--name", required=True, help="the patient's name")
    leaf.add_argument("--phone", default="", help="the patient's phone (needed unless --mrn is given)")
    leaf.add_argument("--age", type=whole_number, default=0, help="in years")
    leaf.add_argument("--gender", choices=GENDERS)
    leaf.add_argument("--mrn", default="", help="the hospital record number, if the patient has one")
    leaf.add_argument("--source", required=True, choices=SOURCES,
                      help="where the request comes from; it fixes the priority (emergency first, walk-in last)")
    leaf.add_argument("--flexible", action="store_true",
                      help="if the slot is full, take the earliest later slot that day with a free seat")
    _leaf(tokens, "get", "one token", commands.tokens_get).add_argument("token_id", metavar="TOKEN")
    leaf = _leaf(tokens, "list", "a doctor's tokens of a date, by token number", commands.tokens_list)
    _doctor(leaf)
    _date(leaf)

    _leaf(tasks, "checkin", "the patient has arrived (CONFIRMED → CHECKED_IN)", commands.checkin).add_argument(
        "token_id", metavar="TOKEN")
    leaf = _leaf(tasks, "call-next", "the doctor calls the next checked-in patient (and completes the one before)",
                 commands.call_next)
    _doctor(leaf)
    _date(leaf)
    _leaf(tasks, "complete", "the called patient's consultation is over", commands.complete).add_argument(
        "token_id", metavar="TOKEN")
    leaf = _leaf(tasks, "cancel", "cancel a token; its seat goes to the waitlist's head", commands.cancel)
    leaf.add_argument("token_id", metavar="TOKEN")
    leaf.add_argument("--reason", default="", help="why, for the record")
    _leaf(tasks, "no-show", "the patient did not come (allowed once the grace period after the estimated time "
          "is over); the seat goes to the waitlist's head", commands.no_show).add_argument("token_id", metavar="TOKEN")

    leaf = _leaf(tasks, "status", "a doctor's day: seats, waitlists, who is called and who is waiting",
                 commands.status)
    _doctor(leaf)
    _date(leaf)
    leaf = _leaf(tasks, "stats", "a date's figures per doctor: tokens, utilisation, bumps, no-shows, waits",
                 commands.stats)
    leaf.add_argument("--doctor", help="only this doctor (default: every doctor with slots that date)")
    _date(leaf)
    leaf = _leaf(tasks, "watch", "follow doctors' queues live, one line per change, until Ctrl-C (reconnects by "
                 "itself); --json: one JSON object per line", commands.watch)
    leaf.add_argument("--doctor", required=True, action="append", help="a doctor to watch; repeat for more")
    _date(leaf)
    leaf.add_argument("--count", type=count, default=0, metavar="N",
                      help="stop after N events (snapshots are not counted), for scripts")
    leaf = _leaf(tasks, "events", "a doctor's queue events of a date, in order (ListQueueEvents)", commands.events)
    _doctor(leaf)
    _date(leaf)
    leaf = _leaf(tasks, "report", "write the end-of-day report of a date: per doctor utilisation, waits by source, "
                 "bumps, no-shows, and each slot's timeline, as one HTML page", commands.report)
    leaf.add_argument("--doctor", action="append", help="only this doctor; repeat for more (default: every doctor "
                      "with slots that date)")
    _date(leaf)
    leaf.add_argument("--out", metavar="FILE", help="the page to write (default: opd-day-report-DATE.html here)")
    return parser


def time(text: str) -> str:
    """An HH:MM time of the day."""
    if not re.fullmatch(r"\d{2}:\d{2}", text, re.ASCII):
        raise argparse.ArgumentTypeError(f"{text!r} is not a time of the form HH:MM")
    try:
        return dt.time.fromisoformat(text).strftime("%H:%M")
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a time of day (00:00 to 23:59)") from None


def whole_number(text: str) -> int:
    """A number as the proto's int32 fields carry it; the server says whether it is a sensible one."""
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not -INT32_LIMIT <= number < INT32_LIMIT:
        raise argparse.ArgumentTypeError(f"{text} is out of range ({-INT32_LIMIT:,} to {INT32_LIMIT - 1:,})")
    return number


def count(text: str) -> int:
    number = whole_number(text)
    if number < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return number


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= MAX_TIMEOUT_SECONDS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds more than 0, up to "
                                         f"{MAX_TIMEOUT_SECONDS:,}")
    return value


def _common_flags(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """Connection and output flags. On the top parser they hold the defaults; on each subcommand they default to
    nothing (SUPPRESS), so that a flag given after the subcommand wins and one given before it is kept."""
    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    env = os.environ.get
    group = parser.add_argument_group("connection and output")
    group.add_argument("--address", type=address, default=default(env("OPD_ADDRESS", DEFAULT_ADDRESS)),
                       metavar="HOST:PORT",
                       help=f"the server (env OPD_ADDRESS; default {DEFAULT_ADDRESS})")
    group.add_argument("--key", default=default(env("OPD_API_KEY", "")),
                       help="the API key, opd_<id>_<secret> (env OPD_API_KEY)")
    group.add_argument("--ca-cert", default=default(env("OPD_CA_CERT")), metavar="FILE",
                       help="speak TLS, trusting the server's certificate if this CA (PEM) signed it (env OPD_CA_CERT)")
    group.add_argument("--cert", default=default(env("OPD_CLIENT_CERT")), metavar="FILE",
                       help="for mutual TLS: this client certificate (PEM) (env OPD_CLIENT_CERT)")
    group.add_argument("--key-file", default=default(env("OPD_CLIENT_KEY")), metavar="FILE",
                       help="for mutual TLS: the client certificate's private key (PEM) (env OPD_CLIENT_KEY)")
    group.add_argument("--json", action="store_true", default=default(False),
                       help="print the response as JSON (field names as in the proto), for scripts")
    group.add_argument("--timeout", type=seconds, default=default(5.0), metavar="SECONDS",
                       help="how long each call may take, its retries included (default 5)")
    group.add_argument("--timezone", type=zone, default=default(env("OPD_TIMEZONE") or None), metavar="ZONE",
                       help="show estimated and event times in this IANA time zone, e.g. Asia/Kolkata (env "
                            "OPD_TIMEZONE; default: the hospital's, the server's TIMEZONE); slot times, the "
                            "server's messages and the report stay on the hospital's clock")


def _group(tasks: Any, name: str, help_text: str) -> Any:
    parser = tasks.add_parser(name, help=help_text, description=help_text)
    return parser.add_subparsers(dest="action", metavar="ACTION", required=True)


def _leaf(tasks: Any, name: str, help_text: str, run: Callable[..., None]) -> argparse.ArgumentParser:
    parser = tasks.add_parser(name, help=help_text, description=help_text)
    _common_flags(parser, defaults=False)
    parser.set_defaults(run=run)
    return parser


def _doctor(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--doctor", required=True, metavar="DOCTOR", help="the doctor's id, e.g. DOC001")


def _date(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--date", type=date, default=commands.TODAY,
                        help="YYYY-MM-DD (default: today, the hospital's: on the clock of --timezone, else the "
                             "server's TIMEZONE)")


def _consultation_minutes(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--consultation-minutes", type=whole_number, metavar="MINUTES",
                        help="minutes per patient (default: the server's AVERAGE_CONSULTATION_MINUTES)")
