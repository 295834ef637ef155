"""opdctl shows times of day on the hospital's clock (clients/opdctl/commands.py): the zone GetStats names, or
--timezone's without asking; UTC when the server names none or GetStats fails, never the terminal's zone."""

from __future__ import annotations

import datetime as dt
import io
import json
import time
from typing import Iterator
from zoneinfo import ZoneInfo

import grpc
import pytest

from clients.library import Unavailable
from clients.opdctl import commands, parser
from clients.opdctl.render import Printer
from opd_grpc._gen.opd.v1 import opd_pb2 as pb

pytestmark = pytest.mark.backend_independent

SLOT = pb.Slot(slot_id="DOC001-20300107-1400", doctor_id="DOC001", date="2030-01-07", start_time="14:00",
               end_time="15:00", max_capacity=2)
TOKEN = pb.Token(token_id="DOC001-20300107-T1", token_number=1, doctor_id="DOC001", date="2030-01-07",
                 slot_id=SLOT.slot_id, status=pb.STATUS_CHECKED_IN, queue_position=1)
TOKEN.estimated_time.FromDatetime(dt.datetime(2030, 1, 7, 8, 30, tzinfo=dt.timezone.utc))  # 14:00 in India


class Desk:
    """A client with one doctor's day, whose GetStats answers `stats` (or raises it); it keeps what GetStats (and
    ListSlots) was asked."""

    def __init__(self, stats: pb.GetStatsResponse | Exception):
        self.stats = stats
        self.asked: list[tuple[str, str]] = []

    def check_in_token(self, token_id: str) -> pb.CheckInTokenResponse:
        return pb.CheckInTokenResponse(token=TOKEN)

    def iter_slots(self, doctor_id: str, date: str = "") -> Iterator[pb.Slot]:
        self.asked.append(("ListSlots", doctor_id))
        return iter([SLOT])

    def get_stats(self, date: str, doctor_id: str = "") -> pb.GetStatsResponse:
        self.asked.append((date, doctor_id))
        if isinstance(self.stats, Exception):
            raise self.stats
        return self.stats


@pytest.fixture(autouse=True)
def terminal_in_new_york(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The terminal's zone is neither the hospital's nor UTC, so that a time shown in it would be caught."""
    monkeypatch.setenv("TZ", "America/New_York")
    monkeypatch.delenv("OPD_TIMEZONE", raising=False)
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def run(desk: Desk, *argv: str) -> str:
    args = parser.build().parse_args(list(argv))
    out = io.StringIO()
    args.run(desk, args, Printer(args.json, file=out))
    return out.getvalue()


@pytest.mark.parametrize("stats, estimated", [
    (pb.GetStatsResponse(timezone="Asia/Kolkata"), "14:00"),
    (pb.GetStatsResponse(), "08:30"),  # an older server names no zone: UTC
    (Unavailable(grpc.StatusCode.UNAVAILABLE, "gone"), "08:30"),  # GetStats failed: UTC, and the command is done
], ids=["named", "unnamed", "failed"])
def test_times_are_on_the_servers_clock_asked_once_of_the_doctors_day(stats: pb.GetStatsResponse | Exception,
                                                                      estimated: str):
    desk = Desk(stats)
    assert run(desk, "checkin", TOKEN.token_id).strip().endswith(f"estimated {estimated}")
    assert desk.asked == [("ListSlots", "DOC001"), ("2030-01-07", "DOC001")]


def test_timezone_flag_is_used_without_asking_the_server():
    desk = Desk(pb.GetStatsResponse(timezone="Asia/Kolkata"))
    assert run(desk, "checkin", TOKEN.token_id, "--timezone", "Asia/Dubai").strip().endswith("estimated 12:30")
    assert desk.asked == [("ListSlots", "DOC001")]


def test_a_command_that_shows_no_time_of_day_does_not_ask():
    desk = Desk(pb.GetStatsResponse(timezone="Asia/Kolkata"))
    assert "14:00-15:00" in run(desk, "slots", "list", "--doctor", "DOC001")
    assert desk.asked == [("ListSlots", "DOC001")]


def test_json_prints_the_reply_alone_and_asks_nothing_more_for_it():
    """A script reads ids and UTC times from the reply; the slot times and the clock are for the text only."""
    desk = Desk(pb.GetStatsResponse(timezone="Asia/Kolkata"))
    printed = json.loads(run(desk, "--json", "checkin", TOKEN.token_id))
    assert printed["token"]["token_id"] == TOKEN.token_id
    assert printed["token"]["estimated_time"] == "2030-01-07T08:30:00Z"
    assert desk.asked == []



def test_a_date_left_out_is_the_hospitals_today_on_the_servers_clock_or_the_timezone_given():
    """Kiritimati (UTC+14) and Pago Pago (UTC-11) are always on different dates: a desk whose machine is in one
    zone asks for the hospital's today, on the server's TIMEZONE, or on --timezone's clock when given."""
    for name, flags in (("Pacific/Kiritimati", []), ("Pacific/Pago_Pago", ["--timezone", "Pacific/Pago_Pago"])):
        desk = Desk(pb.GetStatsResponse(timezone="Pacific/Kiritimati"))
        before = dt.datetime.now(ZoneInfo(name)).date().isoformat()
        args = parser.build().parse_args(["tokens", "list", "--doctor", "DOC001", *flags])
        commands.fill_in_today(desk, args)  # type: ignore[arg-type]
        assert args.date in (before, dt.datetime.now(ZoneInfo(name)).date().isoformat())
        assert len(desk.asked) == (0 if flags else 1)  # --timezone: nothing to ask
    given = parser.build().parse_args(["tokens", "list", "--doctor", "DOC001", "--date", "2030-01-07"])
    commands.fill_in_today(Desk(ValueError("not asked")), given)  # type: ignore[arg-type]
    assert given.date == "2030-01-07"
    every_date = parser.build().parse_args(["slots", "list", "--doctor", "DOC001"])
    commands.fill_in_today(Desk(ValueError("not asked")), every_date)  # type: ignore[arg-type]
    assert every_date.date is None
