"""opdctl, the installed console script, against a real server: every subcommand as a person reads it (tables and
lines) and as a script reads it (--json), and the refusals: exit code, the server's message and what to do."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from opd_grpc._gen.opd.v1 import opd_pb2 as pb
from opd_grpc.process import ServerProcess
from tests.support import (DAY, MORNING, LiveServer, add_key, allocate, at, fresh_database, make_doctor, make_slots,
                           statuses)

OPDCTL = Path(sys.executable).with_name("opdctl")  # the console script of pyproject.toml's [project.scripts]
ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT = 30.0
OPDCTL_ENV = ("OPD_ADDRESS", "OPD_API_KEY", "OPD_CA_CERT", "OPD_CLIENT_CERT", "OPD_CLIENT_KEY", "OPD_TIMEZONE")


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def environment(address: str, **extra: str) -> dict[str, str]:
    """The test's environment without the caller's own opdctl settings, on a terminal in UTC (whose date is what
    --date defaults to)."""
    env = {k: v for k, v in os.environ.items() if k not in OPDCTL_ENV}
    return {**env, "OPD_ADDRESS": address, "TZ": "UTC", **extra}


def opdctl(address: str, *args: str, **env: str) -> Run:
    """Runs `opdctl ARGS` against `address`; whatever happens, it never ends in a Python traceback."""
    assert OPDCTL.exists(), f"{OPDCTL} is missing: run `.venv/bin/pip install -e '.[dev]'`"
    done = subprocess.run([str(OPDCTL), *args], capture_output=True, text=True, timeout=RUN_TIMEOUT,
                          env=environment(address, **env))
    assert "Traceback" not in done.stderr, done.stderr
    return Run(done.returncode, done.stdout, done.stderr)


def ok(address: str, *args: str, **env: str) -> Run:
    run = opdctl(address, *args, **env)
    assert run.code == 0, run.err
    return run


def cells(text: str) -> list[list[str]]:
    """The lines of a table (or any output) as cells, split where two or more spaces part them, as a person's eye
    reads them; the rule under a table's header is left out."""
    lines = [line for line in text.splitlines() if line.strip() and set(line.strip()) != {"─"}]
    return [[cell.strip() for cell in line.strip().split("  ") if cell.strip()] for line in lines]


def _module_server(tmp_path_factory: pytest.TempPathFactory, folder: str, **settings: str) -> Iterator[LiveServer]:
    with fresh_database(tmp_path_factory.mktemp(folder)) as url:
        server = LiveServer(url, **settings)
        try:
            yield server
        finally:
            server.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One server for the module (test clock at 2030-01-07 07:00 UTC); each test makes its own doctors."""
    yield from _module_server(tmp_path_factory, "opdctl")


@pytest.fixture
def doctor(live: LiveServer) -> str:
    """A doctor of its own with slots 09:00-10:00 (2 seats) and 10:00-11:00 (3 seats) on DAY."""
    doctor_id = make_doctor(live.stub)
    make_slots(live.stub, doctor_id, ("09:00", "10:00", 2), ("10:00", "11:00", 3))
    return doctor_id


def allocate_cli(live: LiveServer, doctor: str, n: int, *extra: str, source: str = "walk-in") -> Run:
    return opdctl(live.address, "tokens", "allocate", "--doctor", doctor, "--date", DAY, "--name", f"Patient {n}",
                  "--phone", f"+91-98450-{n:05d}", "--source", source, *extra)


# Doctors

def test_doctors_create_list_and_get_show_the_doctor_and_its_id(live: LiveServer):
    created = ok(live.address, "doctors", "create", "--name", "Dr Meera Iyer", "--specialization", "Cardiology")
    doctor_id = created.out.split()[1].rstrip(":")
    assert created.out.startswith(f"Created {doctor_id}:")
    assert [doctor_id, "Dr Meera Iyer", "Cardiology"] in cells(created.out)

    listed = ok(live.address, "doctors", "list")
    assert [doctor_id, "Dr Meera Iyer", "Cardiology"] in cells(listed.out)
    assert cells(listed.out)[0] == ["Doctor", "Name", "Specialization"]
    assert [doctor_id, "Dr Meera Iyer", "Cardiology"] in cells(ok(live.address, "doctors", "get", doctor_id).out)

    as_json = ok(live.address, "doctors", "get", doctor_id, "--json").json()
    assert as_json == {"doctor": {"doctor_id": doctor_id, "name": "Dr Meera Iyer", "specialization": "Cardiology"}}
    every = ok(live.address, "--json", "doctors", "list").json()  # the common flags go before the command too
    assert {"doctor_id": doctor_id, "name": "Dr Meera Iyer", "specialization": "Cardiology"} in every["doctors"]
    made = ok(live.address, "doctors", "create", "--name", "Dr Kabir Shah", "--specialization", "ENT",
              "--json").json()["doctor"]
    assert made["doctor_id"].startswith("DOC") and made["doctor_id"] != doctor_id


# Slots

def test_slots_add_makes_a_week_from_the_pattern_in_one_call(live: LiveServer):
    doctor_id = make_doctor(live.stub)
    added = ok(live.address, "slots", "add", "--doctor", doctor_id, "--week", "2030-01-09",
               "--pattern", "Mon-Fri 09:00-12:00/60 x10; Sat 09:00-11:00 x5", "--consultation-minutes", "6")
    assert added.out.startswith(f"Created 16 slots for {doctor_id} on Mon 2030-01-07 to Sun 2030-01-13:")
    table = cells(added.out)
    assert [f"{doctor_id}-20300107-0900", "2030-01-07", "Mon", "09:00-10:00", "10", "6"] in table
    assert [f"{doctor_id}-20300111-1100", "2030-01-11", "Fri", "11:00-12:00", "10", "6"] in table
    assert [f"{doctor_id}-20300112-0900", "2030-01-12", "Sat", "09:00-11:00", "5", "6"] in table

    monday = ok(live.address, "slots", "list", "--doctor", doctor_id, "--date", "2030-01-07")
    assert [row[3] for row in cells(monday.out)[1:]] == ["09:00-10:00", "10:00-11:00", "11:00-12:00"]
    every = ok(live.address, "slots", "list", "--doctor", doctor_id, "--json").json()
    assert len(every["slots"]) == 16
    assert every["slots"][-1] == {"slot_id": f"{doctor_id}-20300112-0900", "doctor_id": doctor_id,
                                  "date": "2030-01-12", "start_time": "09:00", "end_time": "11:00",
                                  "max_capacity": 5, "consultation_minutes": 6}


def test_slots_add_for_one_date_and_as_json(live: LiveServer):
    doctor_id = make_doctor(live.stub)
    added = ok(live.address, "slots", "add", "--doctor", doctor_id, "--date", "2030-01-09",
               "--pattern", "Mon 08:00-09:00; Wed 14:00-15:00/30 x2", "--json").json()
    assert [(s["date"], s["start_time"], s["end_time"], s["max_capacity"]) for s in added["slots"]] == [
        ("2030-01-09", "14:00", "14:30", 2), ("2030-01-09", "14:30", "15:00", 2)]


def test_slots_add_is_all_or_none_when_one_slot_overlaps(live: LiveServer, doctor: str):
    refused = opdctl(live.address, "slots", "add", "--doctor", doctor, "--date", DAY,
                     "--pattern", "08:00-12:00/60")
    assert refused.code == 1
    assert "ALREADY_EXISTS (SLOT_OVERLAP)" in refused.err and "overlaps" in refused.err
    assert f"opdctl slots list --doctor {doctor}" in refused.err
    listed = ok(live.address, "slots", "list", "--doctor", doctor, "--json").json()
    assert [s["start_time"] for s in listed["slots"]] == ["09:00", "10:00"]  # the 08:00 and 11:00 slots were not made


def test_slots_status_shows_seats_and_the_waitlist_in_order(live: LiveServer, doctor: str):
    for n in range(1, 5):
        allocate(live.stub, doctor, n, slot_time="09:00")
    allocate(live.stub, doctor, 5, source=pb.SOURCE_PAID_PRIORITY, slot_time="09:00")
    slot_id = f"{doctor}-20300107-0900"
    shown = ok(live.address, "slots", "status", slot_id)
    assert (f"Slot {slot_id}: {doctor}, Mon 2030-01-07 09:00-10:00, 2 of 2 seats taken, 0 free, 3 waitlisted"
            in shown.out)
    waitlist = [row for row in cells(shown.out) if row and row[0].isdigit()]
    assert [(row[0], row[1], row[3], row[4]) for row in waitlist] == [
        ("1", "5", "Patient 5", "paid"), ("2", "3", "Patient 3", "walk-in"), ("3", "4", "Patient 4", "walk-in")]
    as_json = ok(live.address, "slots", "status", slot_id, "--json").json()
    assert (as_json["seat_holders"], as_json["free_seats"]) == (2, 0)
    assert [t["token_number"] for t in as_json["waitlist"]] == [5, 3, 4]


def test_slots_capacity_raises_the_seats_and_shows_who_was_promoted(live: LiveServer, doctor: str):
    for n in range(1, 4):
        allocate(live.stub, doctor, n, slot_time="09:00")
    slot_id = f"{doctor}-20300107-0900"
    raised = ok(live.address, "slots", "capacity", slot_id, "3")
    assert f"Slot {slot_id} now has 3 seats." in raised.out
    assert (f"Promoted from the waitlist: Token 3 ({doctor}-20300107-T3): CONFIRMED, slot 09:00-10:00, "
            "queue position 3, estimated 09:10") in raised.out
    as_json = ok(live.address, "slots", "capacity", slot_id, "4", "--json").json()
    assert as_json["slot"]["max_capacity"] == 4 and as_json["promoted"] == []

    below = opdctl(live.address, "slots", "capacity", slot_id, "1")
    assert below.code == 1 and "CAPACITY_BELOW_SEAT_HOLDERS" in below.err
    assert "`opdctl slots status SLOT_ID`" in below.err


# Tokens

def test_tokens_allocate_confirms_then_waitlists_a_full_slot(live: LiveServer, doctor: str):
    first = allocate_cli(live, doctor, 1, "--time", "09:00", "--age", "41", "--gender", "female")
    assert first.code == 0
    assert first.out.strip() == (f"Token 1 ({doctor}-20300107-T1): CONFIRMED, slot 09:00-10:00, queue position 1, "
                                 "estimated 09:00")
    allocate_cli(live, doctor, 2, "--time", "09:00")
    third = allocate_cli(live, doctor, 3, "--time", "09:00")
    assert third.code == 0
    assert third.out.strip() == f"Token 3 ({doctor}-20300107-T3): WAITLISTED, slot 09:00-10:00, waitlist position 1"
    fourth = allocate_cli(live, doctor, 4, "--time", "09:00", "--json").json()["token"]
    assert (fourth["token_number"], fourth["status"], fourth["waitlist_position"]) == (4, "STATUS_WAITLISTED", 2)
    assert fourth["patient"] == {"name": "Patient 4", "phone": "+91-98450-00004", "age": 0,
                                 "gender": "GENDER_UNSPECIFIED", "mrn": ""}
    assert statuses(live.stub, doctor) == {1: "CONFIRMED", 2: "CONFIRMED", 3: "WAITLISTED", 4: "WAITLISTED"}


def test_tokens_allocate_flexible_and_follow_up_and_online_sources(live: LiveServer, doctor: str):
    allocate(live.stub, doctor, 1, slot_time="09:00")
    allocate(live.stub, doctor, 2, slot_time="09:00")
    moved = allocate_cli(live, doctor, 3, "--time", "09:00", "--flexible", source="follow-up")
    assert f"Token 3 ({doctor}-20300107-T3): CONFIRMED, slot 10:00-11:00" in moved.out
    assert "--flexible moved the patient to a later slot with a free seat" in moved.out
    online = allocate_cli(live, doctor, 4, "--json", source="online").json()
    assert (online["token"]["source"], online["token"]["priority"]) == ("SOURCE_ONLINE_BOOKING", 4)
    assert online["moved_to_later_slot"] is False


def test_an_emergency_bumps_the_last_walk_in_and_says_so(live: LiveServer, doctor: str):
    allocate(live.stub, doctor, 1, source=pb.SOURCE_FOLLOW_UP, slot_time="09:00")
    allocate(live.stub, doctor, 2, slot_time="09:00")
    emergency = allocate_cli(live, doctor, 3, "--time", "09:00", source="emergency")
    assert emergency.code == 0
    lines = emergency.out.splitlines()
    assert lines[0] == f"Token 3 ({doctor}-20300107-T3): CONFIRMED, slot 09:00-10:00, queue position 1, estimated 09:00"
    assert lines[1] == (f"Bumped back to the waitlist: Token 2 ({doctor}-20300107-T2): WAITLISTED, slot 09:00-10:00, "
                        "waitlist position 1")
    second = allocate_cli(live, doctor, 4, "--time", "09:00", "--json", source="emergency").json()
    assert second["token"]["source"] == "SOURCE_EMERGENCY"
    assert second["bumped_token"]["token_number"] == 1


def test_a_patient_with_a_token_already_is_refused_and_shown_that_token(live: LiveServer, doctor: str):
    allocate(live.stub, doctor, 1, slot_time="10:00")
    again = allocate_cli(live, doctor, 1, "--time", "09:00")
    assert again.code == 1 and again.out == ""
    assert "ALREADY_EXISTS (PATIENT_ALREADY_HAS_TOKEN)" in again.err
    assert (f"Patient 1 holds Token 1 ({doctor}-20300107-T1): CONFIRMED, slot 10:00-11:00, queue position 1, "
            "estimated 10:00") in again.err


def test_the_token_shown_with_the_refusal_is_the_one_the_server_named(live: LiveServer, doctor: str):
    """Token 1's id is the start of token 11's: the held token is the one ErrorInfo names, not a likeness."""
    for n in range(1, 12):
        allocate(live.stub, doctor, n, slot_time="10:00")
    again = allocate_cli(live, doctor, 11, "--time", "09:00")
    assert again.code == 1
    assert f"Patient 11 holds Token 11 ({doctor}-20300107-T11)" in again.err
    assert "Patient 1 holds" not in again.err


def test_tokens_get_and_list_show_numbers_patients_statuses_and_places(live: LiveServer, doctor: str):
    for n in range(1, 4):
        allocate(live.stub, doctor, n, slot_time="09:00")
    allocate(live.stub, doctor, 4, source=pb.SOURCE_ONLINE_BOOKING)
    listed = ok(live.address, "tokens", "list", "--doctor", doctor, "--date", DAY)
    table = cells(listed.out)
    assert table[0] == ["No.", "Token", "Patient", "Source", "Status", "Slot", "Place", "Estimated"]
    assert table[1:] == [
        ["1", f"{doctor}-20300107-T1", "Patient 1", "walk-in", "CONFIRMED", "09:00-10:00", "1", "09:00"],
        ["2", f"{doctor}-20300107-T2", "Patient 2", "walk-in", "CONFIRMED", "09:00-10:00", "2", "09:05"],
        ["3", f"{doctor}-20300107-T3", "Patient 3", "walk-in", "WAITLISTED", "09:00-10:00", "waitlist 1"],
        ["4", f"{doctor}-20300107-T4", "Patient 4", "online", "CONFIRMED", "10:00-11:00", "1", "10:00"]]
    as_json = ok(live.address, "tokens", "list", "--doctor", doctor, "--date", DAY, "--json").json()
    assert [t["status"] for t in as_json["tokens"]] == ["STATUS_CONFIRMED"] * 2 + ["STATUS_WAITLISTED",
                                                                                   "STATUS_CONFIRMED"]
    got = ok(live.address, "tokens", "get", f"{doctor}-20300107-T3")
    assert ["3", f"{doctor}-20300107-T3", "Patient 3", "walk-in", "WAITLISTED", "09:00-10:00", "waitlist 1"] in cells(
        got.out)
    token = ok(live.address, "tokens", "get", f"{doctor}-20300107-T4", "--json").json()["token"]
    assert (token["token_number"], token["estimated_time"]) == (4, "2030-01-07T10:00:00Z")


# The day in the clinic

def test_checkin_call_next_complete_and_cancel_move_tokens_through_the_day(live: LiveServer, doctor: str):
    for n in range(1, 4):
        allocate(live.stub, doctor, n, slot_time="09:00")
    t1, t2, t3 = (f"{doctor}-20300107-T{n}" for n in (1, 2, 3))
    checked = ok(live.address, "checkin", t1)
    assert checked.out.strip() == f"Token 1 ({t1}): CHECKED_IN, slot 09:00-10:00, queue position 1, estimated 09:00"
    assert ok(live.address, "checkin", t2, "--json").json()["token"]["status"] == "STATUS_CHECKED_IN"

    called = ok(live.address, "call-next", "--doctor", doctor, "--date", DAY)
    assert called.out.startswith(f"Calling token 1 (Patient 1): Token 1 ({t1}): CALLED")
    again = ok(live.address, "call-next", "--doctor", doctor, "--date", DAY)
    assert again.out.splitlines() == [
        f"Calling token 2 (Patient 2): Token 2 ({t2}): CALLED, slot 09:00-10:00, queue position 1, estimated 09:00",
        f"Completed token 1 ({t1})."]
    completed = ok(live.address, "complete", t2, "--json").json()
    assert completed["token"]["status"] == "STATUS_COMPLETED"
    got = ok(live.address, "tokens", "get", t2).out
    assert got.count("COMPLETED") == 1
    # when it moved through the day, which the table has no room for (it had needed --json)
    assert re.search(r"^booked \d\d:\d\d, checked in \d\d:\d\d, called \d\d:\d\d, completed \d\d:\d\d, "
                     r"last change \d\d:\d\d$", got, re.M), got

    for n in range(4, 8):  # the 10:00 slot's three seats, and token 7 on its waitlist
        allocate(live.stub, doctor, n, slot_time="10:00")
    cancelled = ok(live.address, "cancel", f"{doctor}-20300107-T4", "--reason", "went home")
    assert cancelled.out.splitlines() == [
        f"Token 4 ({doctor}-20300107-T4): CANCELLED, slot 10:00-11:00",
        f"Promoted from the waitlist: Token 7 ({doctor}-20300107-T7): CONFIRMED, slot 10:00-11:00, queue position 3, "
        "estimated 10:10"]
    as_json = ok(live.address, "cancel", t3, "--json").json()  # a waitlisted token: no seat freed, nobody promoted
    assert as_json["token"]["status"] == "STATUS_CANCELLED" and as_json["promoted"] == []
    assert statuses(live.stub, doctor) == {1: "COMPLETED", 2: "COMPLETED", 3: "CANCELLED", 4: "CANCELLED",
                                           5: "CONFIRMED", 6: "CONFIRMED", 7: "CONFIRMED"}


def test_a_move_the_day_does_not_allow_is_refused_with_where_the_token_stands(live: LiveServer, doctor: str):
    allocate(live.stub, doctor, 1, slot_time="09:00")
    refused = opdctl(live.address, "complete", f"{doctor}-20300107-T1")
    assert refused.code == 1 and "FAILED_PRECONDITION" in refused.err
    assert "`opdctl tokens get TOKEN` shows where the token stands" in refused.err


def test_call_next_with_nobody_checked_in_says_to_check_someone_in(live: LiveServer, doctor: str):
    allocate(live.stub, doctor, 1, slot_time="09:00")
    refused = opdctl(live.address, "call-next", "--doctor", doctor, "--date", DAY)
    assert refused.code == 1
    assert "NOT_FOUND (QUEUE_EMPTY): Nobody is checked in" in refused.err
    assert "`opdctl checkin TOKEN`" in refused.err and f"opdctl status --doctor {doctor} --date {DAY}" in refused.err


@pytest.fixture
def later(live: LiveServer) -> Iterator[None]:
    """The test moves the clock on; the next test starts at MORNING again."""
    yield
    live.set_time(MORNING)


def test_no_show_is_refused_before_the_grace_period_and_then_promotes_the_waitlist(live: LiveServer, doctor: str,
                                                                                   later: None):
    for n in range(1, 4):
        allocate(live.stub, doctor, n, slot_time="09:00")
    t1 = f"{doctor}-20300107-T1"
    early = opdctl(live.address, "no-show", t1)
    assert early.code == 1 and "GRACE_PERIOD_NOT_ELAPSED" in early.err and "09:15" in early.err
    live.set_time(at("09:16"))
    marked = ok(live.address, "no-show", t1)
    assert marked.out.splitlines() == [
        f"Token 1 ({t1}): NO_SHOW, slot 09:00-10:00",
        f"Promoted from the waitlist: Token 3 ({doctor}-20300107-T3): CONFIRMED, slot 09:00-10:00, queue position 2, "
        "estimated 09:05"]
    live.set_time(at("09:30"))
    as_json = ok(live.address, "no-show", f"{doctor}-20300107-T2", "--json").json()
    assert as_json["token"]["status"] == "STATUS_NO_SHOW"


# A doctor's day

def test_status_shows_seats_who_is_called_who_waits_and_every_token(live: LiveServer, doctor: str):
    for n in range(1, 5):
        allocate(live.stub, doctor, n, slot_time="09:00")
    for n in (1, 2):
        ok(live.address, "checkin", f"{doctor}-20300107-T{n}")
    ok(live.address, "call-next", "--doctor", doctor, "--date", DAY)
    shown = ok(live.address, "status", "--doctor", doctor, "--date", DAY)
    lines = shown.out.splitlines()
    assert lines[0] == f"Dr Asha Rao ({doctor}, General Medicine) on Mon 2030-01-07"
    table = cells(shown.out)
    assert ["09:00-10:00", f"{doctor}-20300107-0900", "2/2", "0", "2 (3, 4)"] in table
    assert ["10:00-11:00", f"{doctor}-20300107-1000", "0/3", "3", "0"] in table
    assert "Now calling: 1 (Patient 1)" in lines
    assert "Checked in, waiting: 2 (Patient 2)" in lines
    assert "Confirmed, not yet here: nobody" in lines
    assert "Waitlisted: 3 (Patient 3, waitlist 1), 4 (Patient 4, waitlist 2)" in lines
    assert ["1", f"{doctor}-20300107-T1", "Patient 1", "walk-in", "CALLED", "09:00-10:00", "1", "09:00"] in table

    as_json = ok(live.address, "status", "--doctor", doctor, "--date", DAY, "--json").json()
    assert as_json["doctor"]["doctor_id"] == doctor and as_json["date"] == DAY
    assert [(s["slot"]["start_time"], s["seat_holders"], s["free_seats"]) for s in as_json["slots"]] == [
        ("09:00", 2, 0), ("10:00", 0, 3)]
    assert [t["status"] for t in as_json["tokens"]] == ["STATUS_CALLED", "STATUS_CHECKED_IN", "STATUS_WAITLISTED",
                                                        "STATUS_WAITLISTED"]


def test_status_defaults_to_today_and_says_when_there_are_no_slots(live: LiveServer, doctor: str):
    today = dt.datetime.now(dt.timezone.utc).date()  # TZ=UTC for opdctl
    shown = ok(live.address, "status", "--doctor", doctor)
    assert f"on {today:%a} {today.isoformat()}" in shown.out
    assert f"No slots that day: add them with `opdctl slots add --doctor {doctor}`." in shown.out


def test_stats_sum_up_the_day_per_doctor(live: LiveServer, doctor: str):
    allocate(live.stub, doctor, 1, slot_time="09:00")
    allocate(live.stub, doctor, 2, slot_time="09:00")
    allocate(live.stub, doctor, 3, slot_time="09:00")
    allocate_cli(live, doctor, 4, "--time", "09:00", source="emergency")
    shown = ok(live.address, "stats", "--doctor", doctor, "--date", DAY)
    assert cells(shown.out)[0][:8] == ["Doctor", "Date", "Tokens", "Seats taken", "Utilisation", "Bumps", "No-shows",
                                       "Mean wait"]
    assert cells(shown.out)[1] == [doctor, DAY, "4", "2/5", "40%", "1", "0", "0.0 min", "CONFIRMED 2, WAITLISTED 2",
                                   "emergency 1, walk-in 3"]
    other = make_doctor(live.stub, "Dr Kabir Shah")
    make_slots(live.stub, other, ("12:00", "13:00", 4))
    every = {s["doctor_id"]: s for s in ok(live.address, "stats", "--date", DAY, "--json").json()["stats"]}
    assert (every[doctor]["total_tokens"], every[doctor]["bumps"], every[doctor]["by_status"]) == (
        4, 1, {"STATUS_CONFIRMED": 2, "STATUS_WAITLISTED": 2})
    assert (every[other]["total_tokens"], every[other]["total_capacity"], every[other]["utilisation"]) == (0, 4, 0)
    assert "No doctor has slots on 2031-05-05." in ok(live.address, "stats", "--date", "2031-05-05").out


def test_events_list_the_days_history_in_order(live: LiveServer, doctor: str):
    allocate(live.stub, doctor, 1, slot_time="09:00")
    allocate(live.stub, doctor, 2, slot_time="09:00")
    allocate_cli(live, doctor, 3, "--time", "09:00", source="emergency")
    shown = ok(live.address, "events", "--doctor", doctor, "--date", DAY)
    kinds = [(row[0], row[2]) for row in cells(shown.out)[1:]]
    assert kinds == [("1", "SLOT_CHANGED"), ("2", "SLOT_CHANGED"), ("3", "ALLOCATED"), ("4", "ALLOCATED"),
                     ("5", "BUMPED"), ("6", "ALLOCATED")]
    bumped = cells(shown.out)[5]
    assert bumped[3:] == ["2", f"{doctor}-20300107-T2", "WAITLISTED", f"{doctor}-20300107-0900",
                          f"{doctor}-20300107-T3"]
    as_json = ok(live.address, "events", "--doctor", doctor, "--date", DAY, "--json").json()
    assert [e["sequence"] for e in as_json["events"]] == ["1", "2", "3", "4", "5", "6"]  # int64: strings in JSON
    assert as_json["events"][4]["caused_by_token_id"] == f"{doctor}-20300107-T3"


# Watching

class Watching:
    """`opdctl watch ARGS` running in the background; its lines are read on a thread as they come."""

    def __init__(self, live: LiveServer, *args: str):
        self.proc = subprocess.Popen([str(OPDCTL), "watch", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=environment(live.address))
        self._lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))

    def next_lines(self, count: int) -> list[str]:
        """The next `count` lines, waiting for each (so that the test changes things after the snapshots)."""
        try:
            return [self._lines.get(timeout=RUN_TIMEOUT) for _ in range(count)]
        except queue.Empty:
            pytest.fail("opdctl watch printed nothing more")

    def rest(self) -> list[str]:
        """Every line after those read, once the watch has ended by itself; it ends with exit code 0."""
        code = self.proc.wait(timeout=RUN_TIMEOUT)
        self._reader.join(timeout=RUN_TIMEOUT)
        assert self.proc.stderr is not None
        assert code == 0, self.proc.stderr.read()
        return [self._lines.get_nowait() for _ in range(self._lines.qsize())]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=RUN_TIMEOUT)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@contextlib.contextmanager
def watching(live: LiveServer, *args: str) -> Iterator[Watching]:
    watch = Watching(live, *args)
    try:
        yield watch
    finally:
        watch.close()


def test_watch_prints_a_line_per_change_as_it_comes_and_stops_after_count(live: LiveServer, doctor: str):
    allocate(live.stub, doctor, 1, slot_time="09:00")
    with watching(live, "--doctor", doctor, "--date", DAY, "--count", "3") as watch:
        assert watch.next_lines(1) == [f"{doctor} 2030-01-07: 1 token as of event 3 (CONFIRMED 1)"]
        allocate(live.stub, doctor, 2, slot_time="09:00")
        allocate(live.stub, doctor, 3, slot_time="09:00")
        allocate(live.stub, doctor, 4, slot_time="09:00", source=pb.SOURCE_EMERGENCY)
        events = [line.split(" ", 1)[1] for line in watch.rest()]  # without the time of day
    assert events == [
        f"{doctor} #4 ALLOCATED token 2 ({doctor}-20300107-T2) → CONFIRMED, walk-in, slot {doctor}-20300107-0900",
        f"{doctor} #5 WAITLISTED token 3 ({doctor}-20300107-T3), walk-in, slot {doctor}-20300107-0900",
        f"{doctor} #6 BUMPED token 2 ({doctor}-20300107-T2) → WAITLISTED, walk-in, slot {doctor}-20300107-0900, "
        f"caused by {doctor}-20300107-T4"]


def test_watch_json_follows_two_doctors_with_one_object_per_line(live: LiveServer, doctor: str):
    other = make_doctor(live.stub, "Dr Kabir Shah")
    make_slots(live.stub, other, ("09:00", "10:00", 5))
    with watching(live, "--doctor", doctor, "--doctor", other, "--date", DAY, "--count", "2", "--json") as watch:
        snapshots = [json.loads(line)["snapshot"] for line in watch.next_lines(2)]
        allocate(live.stub, other, 1)
        allocate(live.stub, doctor, 2)
        events = [json.loads(line)["event"] for line in watch.rest()]
    assert sorted(s["doctor_id"] for s in snapshots) == sorted([doctor, other])
    assert all(s["tokens"] == [] for s in snapshots)
    assert sorted((e["doctor_id"], e["kind"], e["token"]["token_number"]) for e in events) == sorted([
        (other, "EVENT_KIND_ALLOCATED", 1), (doctor, "EVENT_KIND_ALLOCATED", 1)])


def test_watch_of_an_unknown_doctor_says_so_at_once(live: LiveServer):
    refused = opdctl(live.address, "watch", "--doctor", "DOC999", "--date", DAY)
    assert refused.code == 1 and "DOCTOR_NOT_FOUND" in refused.err
    assert "`opdctl doctors list`" in refused.err


# Weekly templates and holidays (holidays are the whole OPD's: each test uses dates of its own)

def test_templates_set_show_and_apply_skip_holidays_and_slots_already_there(live: LiveServer):
    doctor_id = make_doctor(live.stub)
    assert f"{doctor_id} has no weekly pattern: set one with `opdctl templates set`." in ok(
        live.address, "templates", "show", "--doctor", doctor_id).out
    stored = ok(live.address, "templates", "set", "--doctor", doctor_id, "--consultation-minutes", "6",
                "--pattern", "Mon-Fri 09:00-11:00/60 x4; Sat 09:00-10:00 x2")
    assert stored.out.startswith(f"Weekly pattern of {doctor_id}: 11 slots a week.")
    assert ["Mon", "09:00-10:00", "4", "6"] in cells(stored.out)
    assert ["Sat", "09:00-10:00", "2", "6"] in cells(stored.out)
    shown = ok(live.address, "templates", "show", "--doctor", doctor_id)
    assert cells(shown.out)[0] == ["Day", "Time", "Seats", "Min/patient"]
    assert [row[0] for row in cells(shown.out)[1:]] == ["Mon"] * 2 + ["Tue"] * 2 + ["Wed"] * 2 + ["Thu"] * 2 + [
        "Fri"] * 2 + ["Sat"]
    template = ok(live.address, "templates", "show", "--doctor", doctor_id, "--json").json()["template"]
    assert template["slots"][0] == {"weekday": "WEEKDAY_MONDAY", "start_time": "09:00", "end_time": "10:00",
                                    "max_capacity": 4, "consultation_minutes": 6}

    ok(live.address, "holidays", "add", "2030-01-26", "--name", "Republic Day")
    make_slots(live.stub, doctor_id, ("09:00", "10:00", 4), date="2030-01-21", consultation_minutes=6)
    week = ["--from", "2030-01-21", "--to", "2030-01-27"]
    applied = ok(live.address, "templates", "apply", "--doctor", doctor_id, *week)
    lines = applied.out.splitlines()
    assert lines[0] == (f"Created 9 slots for {doctor_id} from 2030-01-21 to 2030-01-27 (1 of the pattern's slots "
                        "were there already).")
    assert lines[1] == "Holidays skipped: 2030-01-26 (Republic Day)."
    assert [f"{doctor_id}-20300121-1000", "2030-01-21", "Mon", "10:00-11:00", "4", "6"] in cells(applied.out)
    assert not any("2030-01-26" in row for row in cells(applied.out))
    again = ok(live.address, "templates", "apply", "--doctor", doctor_id, *week, "--json").json()
    assert (again["created"], len(again["existing"])) == ([], 10)
    assert again["skipped_holidays"] == [{"date": "2030-01-26", "name": "Republic Day"}]


def test_templates_apply_without_a_pattern_says_to_set_one(live: LiveServer):
    doctor_id = make_doctor(live.stub)
    refused = opdctl(live.address, "templates", "apply", "--doctor", doctor_id, "--from", "2030-02-04",
                     "--to", "2030-02-08")
    assert refused.code == 1 and "NO_SLOT_TEMPLATE" in refused.err
    assert f"`opdctl templates set --doctor {doctor_id} --pattern" in refused.err
    bad = opdctl(live.address, "templates", "set", "--doctor", doctor_id, "--pattern", "Mon 09:00-10:00/25")
    assert bad.code == 2 and "does not split into slots of 25 minutes" in bad.err
    backwards = opdctl(live.address, "templates", "apply", "--doctor", doctor_id, "--from", "2030-02-08",
                       "--to", "2030-02-04")
    assert backwards.code == 1
    assert "  end_date: 2030-02-04 is before start_date 2030-02-08" in backwards.err.splitlines()


def test_holidays_add_list_and_delete(live: LiveServer):
    added = ok(live.address, "holidays", "add", "2031-01-26", "--name", "Republic Day")
    assert added.out.strip() == "2031-01-26 (Sun) is a holiday: Republic Day."
    ok(live.address, "holidays", "add", "2031-08-15", "--name", "Independence Day", "--json")
    listed = ok(live.address, "holidays", "list", "--from", "2031-01-01", "--to", "2031-12-31")
    assert cells(listed.out) == [["Date", "Day", "Holiday"], ["2031-01-26", "Sun", "Republic Day"],
                                 ["2031-08-15", "Fri", "Independence Day"]]
    twice = opdctl(live.address, "holidays", "add", "2031-08-15", "--name", "Swatantrata Diwas")
    assert twice.code == 1 and "HOLIDAY_EXISTS" in twice.err
    assert "`opdctl holidays delete 2031-08-15`, then add it again" in twice.err

    make_slots(live.stub, make_doctor(live.stub), ("09:00", "10:00", 2), date="2032-10-02")
    closed = ok(live.address, "holidays", "add", "2032-10-02", "--name", "Gandhi Jayanti")
    assert closed.out.splitlines()[:2] == ["2032-10-02 (Sat) is a holiday: Gandhi Jayanti.",
                                           "Its 1 slots made before stay open, with their tokens (a holiday only keeps "
                                           "`templates apply` from making slots): cancel their tokens to close them."]
    assert "-20321002-0900" in closed.out
    deleted = ok(live.address, "holidays", "delete", "2031-08-15")
    assert deleted.out.strip() == "2031-08-15 (Independence Day) is no longer a holiday."
    as_json = ok(live.address, "holidays", "list", "--from", "2031-01-01", "--to", "2031-12-31", "--json").json()
    assert as_json["holidays"] == [{"date": "2031-01-26", "name": "Republic Day"}]
    gone = opdctl(live.address, "holidays", "delete", "2031-08-15")
    assert gone.code == 1 and "HOLIDAY_NOT_FOUND" in gone.err and "`opdctl holidays list`" in gone.err
    assert "No holidays" in ok(live.address, "holidays", "list", "--from", "2031-09-01", "--to", "2031-09-30").out


# Refusals and mistakes

def test_an_unknown_doctor_slot_or_token_points_at_the_list_that_has_the_ids(live: LiveServer, doctor: str):
    no_doctor = opdctl(live.address, "slots", "list", "--doctor", "DOC999")
    assert no_doctor.code == 1
    assert no_doctor.err.splitlines() == ["opdctl: NOT_FOUND (DOCTOR_NOT_FOUND): No doctor has the id 'DOC999'.",
                                          "hint: `opdctl doctors list` shows the doctors and their ids."]
    no_slot = opdctl(live.address, "slots", "status", f"{doctor}-20300107-1500")
    assert no_slot.code == 1 and "`opdctl slots list --doctor DOCTOR`" in no_slot.err
    no_token = opdctl(live.address, "checkin", f"{doctor}-20300107-T99")
    assert no_token.code == 1 and "TOKEN_NOT_FOUND" in no_token.err
    assert "`opdctl tokens list --doctor DOCTOR --date DATE`" in no_token.err
    no_time = allocate_cli(live, doctor, 1, "--time", "13:00")
    assert no_time.code == 1 and "has no slot starting at 13:00" in no_time.err
    assert f"`opdctl slots list --doctor {doctor}`" in no_time.err


def test_fields_the_server_refuses_are_listed_one_a_line(live: LiveServer, doctor: str):
    refused = opdctl(live.address, "tokens", "allocate", "--doctor", doctor, "--date", DAY, "--name", " ",
                     "--age", "200", "--source", "walk-in")
    assert refused.code == 1
    assert refused.err.splitlines()[0] == "opdctl: INVALID_ARGUMENT: the request has these problems:"
    assert "  patient.phone: is required when patient.mrn is not given" in refused.err.splitlines()
    assert any(line.startswith("  patient.age: ") for line in refused.err.splitlines())
    assert "`opdctl tokens allocate --help` shows each flag" in refused.err
    zero = opdctl(live.address, "slots", "capacity", f"{doctor}-20300107-0900", "0")
    assert zero.code == 1 and any(line.startswith("  max_capacity: ") for line in zero.err.splitlines())


@pytest.mark.backend_independent
@pytest.mark.parametrize("args, says", [
    (["tokens", "list", "--doctor", "DOC001", "--date", "2030-02-30"], "'2030-02-30' is not a calendar date"),
    (["tokens", "list", "--doctor", "DOC001", "--date", "07/01/2030"], "'07/01/2030' is not a date of the form"),
    (["tokens", "list", "--doctor", "DOC001", "--date", "２０３０-01-07"], "'２０３０-01-07' is not a date of the form"),
    (["tokens", "allocate", "--doctor", "DOC001", "--name", "A", "--source", "walk-in", "--time", "25:00"],
     "'25:00' is not a time of day (00:00 to 23:59)"),
    # gRPC would have called port 34463 (99999 modulo 65536) and said the server was not running there
    (["doctors", "list", "--address", "127.0.0.1:99999"], "'127.0.0.1:99999': the port must be from 1 to 65535"),
    (["doctors", "list", "--address", "127.0.0.1:-1"], "'127.0.0.1:-1': the port must be from 1 to 65535"),
    (["tokens", "allocate", "--doctor", "DOC001", "--name", "A", "--source", "vip"], "invalid choice: 'vip'"),
    (["tokens", "allocate", "--doctor", "DOC001", "--name", "A", "--source", "walk-in", "--time", "9am"],
     "'9am' is not a time of the form HH:MM"),
    (["slots", "add", "--doctor", "DOC001", "--pattern", "Mon 09:00-10:00"], "one of the arguments --week --date"),
    (["slots", "capacity", "SLOT", "many"], "'many' is not a whole number"),
    (["slots", "capacity", "SLOT", "99999999999"], "99999999999 is out of range (-2,147,483,648 to 2,147,483,647)"),
    (["tokens", "allocate", "--doctor", "DOC001", "--name", "A", "--source", "walk-in", "--age", "4294967296"],
     "4294967296 is out of range"),
    (["doctors", "list", "--timeout", "1e10"], "'1e10' is not a number of seconds more than 0, up to 86,400"),
    (["watch", "--doctor", "DOC001", "--count", "-1"], "-1 is negative"),
    (["doctors", "list", "--timeout", "nan"], "'nan' is not a number of seconds more than 0"),
    (["doctors", "list", "--timeout", "0"], "'0' is not a number of seconds more than 0"),
    (["doctors"], "the following arguments are required: ACTION"),
    (["appointments", "list"], "invalid choice: 'appointments'"),
])
def test_a_bad_flag_or_date_is_a_usage_error_and_nothing_is_sent(args: list[str], says: str):
    refused = opdctl("127.0.0.1:1", *args)  # no server there: a usage error never gets that far
    assert refused.code == 2
    assert says in refused.err and "usage: opdctl" in refused.err


@pytest.mark.parametrize("pattern, says", [
    ("Mon-Fri 09:00-12:00/50", "09:00-12:00 is 180 minutes, which does not split into slots of 50 minutes"),
    ("Mox 09:00-12:00", "'mox' is not a day"),
    ("Mon-Fri nine to five", "cannot read 'Mon-Fri nine to five'"),
    ("Sat 09:00-10:00", "the pattern 'Sat 09:00-10:00' makes no slot on Mon 2030-01-07"),
    ("Mon 09:00-10:00 x99999999999", "99999999999 seats are too many (at most 2,147,483,647)"),
])
def test_a_bad_pattern_says_what_is_wrong_and_creates_nothing(live: LiveServer, pattern: str, says: str):
    doctor_id = make_doctor(live.stub)
    refused = opdctl(live.address, "slots", "add", "--doctor", doctor_id, "--date", DAY, "--pattern", pattern)
    assert refused.code == 2
    assert refused.err.startswith("opdctl slots add: ") and says in refused.err
    assert "no slots" in ok(live.address, "slots", "list", "--doctor", doctor_id).out


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.backend_independent
def test_a_server_that_is_not_there_is_exit_3_with_how_to_start_it():
    address = f"127.0.0.1:{free_port()}"
    down = opdctl(address, "doctors", "list")
    assert down.code == 3 and down.out == ""
    assert down.err.startswith("opdctl: UNAVAILABLE")
    assert f"is the server running at {address}? Start it with `make run`" in down.err
    flag = opdctl("127.0.0.1:50051", "status", "--doctor", "DOC001", "--address", address)
    assert flag.code == 3 and f"running at {address}?" in flag.err  # --address wins over OPD_ADDRESS


@pytest.mark.backend_independent
def test_a_server_that_never_answers_costs_the_timeout_once_not_once_per_retry():
    """A change is retried (its request_id makes that safe), but within the one --timeout: a hung server (here a
    socket that accepts connections and never says a word) is reported after about that long."""
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)
        address = f"127.0.0.1:{hung.getsockname()[1]}"
        started = time.monotonic()
        run = opdctl(address, "cancel", "DOC001-20300107-T001", "--timeout", "1")
        took = time.monotonic() - started
    assert run.code == 3 and run.out == ""
    assert run.err.startswith("opdctl: DEADLINE_EXCEEDED")
    assert f"the server at {address} did not answer within 1 s" in run.err
    # Four attempts of 1 s each and their backoff took 4.7 s and more; opdctl's own start takes under a second.
    assert took < 3.0, f"opdctl took {took:.1f} s"


def test_report_writes_the_days_page_and_sums_up_each_doctor(live: LiveServer, doctor: str, tmp_path: Path):
    allocate(live.stub, doctor, 1, slot_time="09:00")
    allocate(live.stub, doctor, 2, slot_time="09:00")
    allocate_cli(live, doctor, 3, "--time", "09:00", source="emergency")  # bumps token 2
    page = tmp_path / "day.html"
    shown = ok(live.address, "report", "--doctor", doctor, "--date", DAY, "--out", str(page))
    assert f"Wrote the report of {DAY} to {page}" in shown.out
    assert cells(shown.out)[1:] == [["Doctor", "Tokens", "Utilisation", "Bumps", "No-shows", "Cancelled", "Promoted",
                                     "Slots"], [doctor, "3", "40%", "1", "0", "0", "0", "2"]]
    html = page.read_text()
    assert html.startswith("<!DOCTYPE html>") and html.count("<svg") == 2  # a timeline per slot
    assert ">3 emergency</text>" in html and "Token 2 (walk-in), booked 07:00, now waitlisted: bumped by an " \
        "emergency" in html
    as_json = ok(live.address, "report", "--doctor", doctor, "--date", DAY, "--out", str(page), "--json").json()
    assert as_json["doctors"] == [{"doctor_id": doctor, "tokens": 3, "utilisation": 0.4, "bumps": 1, "no_shows": 0,
                                   "cancellations": 0, "promotions": 0}]


def test_report_draws_the_day_on_the_servers_clock(india: LiveServer, india_doctor: str, tmp_path: Path):
    """A hospital in India, whose 14:00 slot is 08:30 UTC, seen from a terminal on UTC: the report asks the server
    for its TIMEZONE and draws the day on the hospital's clock."""
    allocate(india.stub, india_doctor, 1, slot_time="14:00")
    page = tmp_path / "day.html"
    ok(india.address, "report", "--doctor", india_doctor, "--date", DAY, "--out", str(page))
    html = page.read_text()
    assert "times in Asia/Kolkata" in html
    assert sorted(set(re.findall(r">(\d\d:00)</text>", html))) == ["12:00", "13:00", "14:00", "15:00"]  # the axis


# The hospital's clock

@pytest.fixture(scope="module")
def india(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A hospital in India (TIMEZONE Asia/Kolkata) for the module; the test clock's 07:00 UTC is 12:30 there."""
    yield from _module_server(tmp_path_factory, "opdctl-india", TIMEZONE="Asia/Kolkata")


@pytest.fixture
def india_doctor(india: LiveServer) -> str:
    """A doctor of its own with a 14:00-15:00 slot (08:30 UTC) of 2 seats on DAY, Indian time."""
    doctor_id = make_doctor(india.stub)
    make_slots(india.stub, doctor_id, ("14:00", "15:00", 2))
    return doctor_id


def test_times_of_day_are_the_hospitals_not_the_terminals(india: LiveServer, india_doctor: str):
    """The terminal is on UTC (TZ=UTC), the hospital in India: an estimated time and an event's time are read on
    the hospital's clock, as the server's TIMEZONE (GetStats) names it."""
    token = f"{india_doctor}-20300107-T1"
    booked = allocate_cli(india, india_doctor, 1, "--time", "14:00")
    assert booked.out.strip() == (f"Token 1 ({token}): CONFIRMED, slot 14:00-15:00, queue position 1, "
                                  "estimated 14:00")
    listed = ok(india.address, "tokens", "list", "--doctor", india_doctor, "--date", DAY)
    assert cells(listed.out)[1] == ["1", token, "Patient 1", "walk-in", "CONFIRMED", "14:00-15:00", "1", "14:00"]
    history = ok(india.address, "events", "--doctor", india_doctor, "--date", DAY)
    assert [row[1] for row in cells(history.out)[1:]] == ["12:30:00", "12:30:00"]  # the slot made, the booking
    with watching(india, "--doctor", india_doctor, "--date", DAY, "--count", "1") as watch:
        watch.next_lines(1)  # the snapshot
        allocate(india.stub, india_doctor, 2, slot_time="14:00")
        assert watch.rest()[0].startswith(f"12:30:00 {india_doctor} #3 ALLOCATED token 2")


def test_timezone_flag_or_env_overrides_the_servers_zone(india: LiveServer, india_doctor: str):
    token = f"{india_doctor}-20300107-T1"
    allocate(india.stub, india_doctor, 1, slot_time="14:00")
    on_utc = ok(india.address, "tokens", "get", token, "--timezone", "UTC")
    assert cells(on_utc.out)[1][-1] == "08:30"
    on_dubai = ok(india.address, "tokens", "get", token, OPD_TIMEZONE="Asia/Dubai")
    assert cells(on_dubai.out)[1][-1] == "12:30"
    flag_wins = ok(india.address, "--timezone", "UTC", "events", "--doctor", india_doctor, "--date", DAY,
                   OPD_TIMEZONE="Asia/Dubai")
    assert [row[1] for row in cells(flag_wins.out)[1:]] == ["07:00:00", "07:00:00"]


@pytest.mark.backend_independent
def test_a_timezone_that_does_not_exist_is_a_usage_error_and_nothing_is_sent():
    for bad in (["--timezone", "Mars/Olympus_Mons"], ["--timezone", "Asia"]):
        refused = opdctl("127.0.0.1:1", "tokens", "list", "--doctor", "DOC001", *bad)
        assert refused.code == 2 and f"{bad[1]!r} is not an IANA time zone" in refused.err, refused.err
    from_env = opdctl("127.0.0.1:1", "tokens", "list", "--doctor", "DOC001", OPD_TIMEZONE="India")
    assert from_env.code == 2 and "'India' is not an IANA time zone" in from_env.err


def test_json_keeps_utc_timestamps_whatever_the_hospitals_clock(india: LiveServer, india_doctor: str):
    token = f"{india_doctor}-20300107-T1"
    booked = allocate_cli(india, india_doctor, 1, "--time", "14:00", "--json").json()
    assert booked["token"]["estimated_time"] == "2030-01-07T08:30:00Z"
    got = ok(india.address, "tokens", "get", token, "--json", "--timezone", "Asia/Dubai").json()
    assert got["token"]["estimated_time"] == "2030-01-07T08:30:00Z"
    history = ok(india.address, "events", "--doctor", india_doctor, "--date", DAY, "--json").json()
    assert {e["occurred_at"] for e in history["events"]} == {"2030-01-07T07:00:00Z"}


def test_report_refuses_an_unknown_doctor_and_an_unwritable_file(live: LiveServer, doctor: str,
                                                                         tmp_path: Path):
    unknown = opdctl(live.address, "report", "--doctor", "DOC999", "--date", DAY, "--out", str(tmp_path / "b.html"))
    assert unknown.code == 1 and "DOC999" in unknown.err and "opdctl doctors list" in unknown.err
    nowhere = opdctl(live.address, "report", "--doctor", doctor, "--date", DAY, "--out",
                     str(tmp_path / "missing" / "c.html"))
    assert nowhere.code == 2 and "cannot write the report" in nowhere.err
    assert not list(tmp_path.iterdir())


@pytest.mark.backend_independent
def test_help_names_every_command_and_explains_the_pattern():
    top = opdctl("127.0.0.1:1", "--help")
    assert top.code == 0
    for command in ("doctors", "slots", "templates", "holidays", "tokens", "checkin", "call-next", "complete",
                    "cancel", "no-show", "status", "stats", "watch", "events", "report", "exit codes"):
        assert command in top.out
    add = opdctl("127.0.0.1:1", "slots", "add", "--help")
    assert add.code == 0 and "--consultation-minutes" in add.out
    assert "'Mon-Fri 09:00-12:00/60 x10; Sat 09:00-11:00 x5'" in " ".join(add.out.split())  # as argparse wraps it


# API keys and TLS

@dataclass
class Keyed:
    live: LiveServer
    keys: dict[str, str]


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyed]:
    """A server whose database holds keys, so that every call needs one."""
    with fresh_database(tmp_path_factory.mktemp("opdctl-keys")) as url:
        keys = {role: add_key(url, role, f"{role} desk") for role in ("admin", "reception", "display")}
        server = LiveServer(url, admin_key=keys["admin"])
        try:
            yield Keyed(server, keys)
        finally:
            server.close()


def test_without_a_key_opdctl_says_to_pass_one(keyed: Keyed):
    refused = opdctl(keyed.live.address, "doctors", "list")
    assert refused.code == 1
    assert "UNAUTHENTICATED (API_KEY_MISSING)" in refused.err
    assert "hint: pass --key or set OPD_API_KEY" in refused.err
    wrong = opdctl(keyed.live.address, "doctors", "list", "--key", "opd_00000000_nothing")
    assert wrong.code == 1 and "API_KEY_INVALID" in wrong.err and "pass --key or set OPD_API_KEY" in wrong.err


def test_a_key_of_the_wrong_role_is_told_which_role_may(keyed: Keyed):
    refused = opdctl(keyed.live.address, "doctors", "create", "--name", "Dr X", "--specialization", "ENT",
                     "--key", keyed.keys["display"])
    assert refused.code == 1
    assert "PERMISSION_DENIED (ROLE_NOT_ALLOWED): The role 'display' may not call CreateDoctor; it is for admin." in (
        refused.err)
    assert "use an API key of the role named above" in refused.err


def test_keys_from_the_flag_or_the_environment_are_sent(keyed: Keyed):
    created = ok(keyed.live.address, "doctors", "create", "--name", "Dr Asha Rao", "--specialization", "ENT", "--json",
                 OPD_API_KEY=keyed.keys["admin"]).json()
    doctor_id = created["doctor"]["doctor_id"]
    ok(keyed.live.address, "slots", "add", "--doctor", doctor_id, "--date", DAY, "--pattern", "09:00-10:00 x1",
       OPD_API_KEY=keyed.keys["admin"])
    booked = ok(keyed.live.address, "tokens", "allocate", "--doctor", doctor_id, "--date", DAY, "--name", "Ravi",
                "--phone", "+91-98450-00001", "--source", "walk-in", "--key", keyed.keys["reception"],
                OPD_API_KEY=keyed.keys["display"])  # the flag wins over the environment
    assert "Token 1" in booked.out and "CONFIRMED" in booked.out


@pytest.fixture(scope="module")
def mutual_tls(certs: Path) -> Iterator[str]:
    """A server that speaks mutual TLS (the `certs` of tests/conftest.py); its address."""
    server = ServerProcess(test_clock=False, settings={
        "METRICS_LISTEN": "", "TLS_CERT_FILE": certs / "server.pem", "TLS_KEY_FILE": certs / "server.key",
        "TLS_CLIENT_CA_FILE": certs / "ca.pem"})
    try:
        yield server.start()
    finally:
        assert server.stop() == 0, "".join(server.output)


def tls_flags(certs: Path) -> list[str]:
    return ["--ca-cert", str(certs / "ca.pem"), "--cert", str(certs / "client.pem"),
            "--key-file", str(certs / "client.key")]


@pytest.mark.backend_independent
def test_opdctl_speaks_mutual_tls_with_the_ca_and_client_certificate(certs: Path, mutual_tls: str):
    created = ok(mutual_tls, "doctors", "create", "--name", "Dr Asha Rao", "--specialization", "ENT", *tls_flags(certs))
    doctor_id = cells(created.out)[0][0].removeprefix("Created ").removesuffix(":")
    from_env = ok(mutual_tls, "doctors", "list", OPD_CA_CERT=str(certs / "ca.pem"),
                  OPD_CLIENT_CERT=str(certs / "client.pem"), OPD_CLIENT_KEY=str(certs / "client.key"))
    assert [doctor_id, "Dr Asha Rao", "ENT"] in cells(from_env.out)
    no_client_cert = opdctl(mutual_tls, "doctors", "list", "--ca-cert", str(certs / "ca.pem"))
    assert no_client_cert.code == 3 and "--cert/--key-file for mutual TLS" in no_client_cert.err
    plaintext = opdctl(mutual_tls, "doctors", "list")
    assert plaintext.code == 3


@pytest.mark.backend_independent
def test_the_display_board_speaks_mutual_tls_too(certs: Path, mutual_tls: str):
    """The board is the other client a waiting room runs; with the same flags it draws the queues over mutual TLS."""
    flags = tls_flags(certs)
    doctor_id = ok(mutual_tls, "doctors", "create", "--name", "Dr Kabir Shah", "--specialization", "ENT", "--json",
                   *flags).json()["doctor"]["doctor_id"]

    def board(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "clients.board", "--address", mutual_tls, "--once", "--date", DAY,
                               doctor_id, *extra], capture_output=True, text=True, timeout=RUN_TIMEOUT, cwd=ROOT,
                              env=environment(mutual_tls))

    drawn = board(*flags)
    assert drawn.returncode == 0 and "Dr Kabir Shah" in drawn.stdout, drawn.stderr
    untrusted = board(*flags[:2])
    assert untrusted.returncode == 1 and "UNAVAILABLE" in untrusted.stderr
    half = board(*flags[:4])
    assert half.returncode == 2 and "needs its private key" in half.stderr


@pytest.mark.backend_independent
def test_tls_files_that_cannot_be_read_are_a_usage_error(tmp_path: Path):
    missing = opdctl("127.0.0.1:1", "doctors", "list", "--ca-cert", str(tmp_path / "nowhere.pem"))
    assert missing.code == 2 and "cannot use the TLS files" in missing.err and "nowhere.pem" in missing.err
    half = opdctl("127.0.0.1:1", "doctors", "list", "--cert", str(tmp_path / "client.pem"))
    assert half.code == 2 and "a client certificate needs its private key" in half.err
    not_a_certificate = tmp_path / "ca.key"
    not_a_certificate.write_text("-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n")
    wrong = opdctl("127.0.0.1:1", "doctors", "list", "--ca-cert", str(not_a_certificate))
    assert wrong.code == 2 and f"{not_a_certificate} is not a PEM certificate" in wrong.err
