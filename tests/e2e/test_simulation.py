"""`make sim`: the simulated OPD day runs clean against a real server process through a key per role (with display
boards beside it too), a keyed server given with --address plays with the keys of --keys, its checks can fail, and a
server that stops answering mid-day (or refuses the reads' key) ends the run at once with exit code 2.

The tests whose server runs on the suite's database (`fresh_database`) run on PostgreSQL too; the others bring
their own SQLite file or need no server."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator

import grpc
import pytest
from google.protobuf import timestamp_pb2

from clients import board as board_module
from clients.board import BoardState
from opd_grpc._gen.opd.v1 import opd_pb2 as pb
from opd_grpc._gen.opd.v1 import opd_pb2_grpc, test_clock_pb2, test_clock_pb2_grpc
from opd_grpc.engine import model
from opd_grpc.engine.access import ROLES
from opd_grpc.process import ServerProcess
from simulation import __main__ as cli
from simulation.boards import Board, BoardPlan, board_mismatches
from simulation.checks import DayState, answer_violations, invariant_violations
from simulation.ledger import Ledger
from simulation.scenario import SMALL
from tests.support import LiveServer, add_key, bearer, fresh_database, revoke_key

ROOT = Path(__file__).resolve().parents[2]
DATE = "2030-01-07"
# The roles in the audit log of the seed-7 day, by call (SPEC §13): the keys of the simulation's own server are
# made by its "operator", and triage books emergencies through AllocateToken too (SOURCE_EMERGENCY).
ROLES_BY_CALL = {
    "AddApiKey": {"operator"}, "CreateDoctor": {"admin"}, "CreateSlots": {"admin"}, "UpdateSlotCapacity": {"admin"},
    "AllocateToken": {"reception", "triage"}, "AllocateEmergency": {"triage"}, "CheckInToken": {"reception"},
    "CancelToken": {"reception"}, "CallNext": {"doctor"}, "CompleteToken": {"doctor"}, "MarkNoShow": {"doctor"},
}


def event_count(summary: str, label: str) -> int:
    """A count from the summary's events table, whose rows read `│ label │ count │`."""
    match = re.search(rf"│ {re.escape(label)} +│ +(\d+) │", summary)
    assert match, f"no row {label!r} in the summary:\n{summary}"
    return int(match[1])


@pytest.mark.slow
@pytest.mark.backend_independent
def test_the_seed_7_day_has_waitlists_promotions_and_bumps_and_no_violation(tmp_path: Path) -> None:
    report = tmp_path / "day.html"
    completed = subprocess.run([sys.executable, "-m", "simulation", "--seed", "7", "--report", str(report)], cwd=ROOT,
                               capture_output=True, text=True, timeout=300)
    summary = completed.stdout

    assert completed.returncode == 0, summary + completed.stderr
    assert summary.rstrip().splitlines()[-1] == "violations: 0"
    for label in ("waitlisted", "emergency bumps", "promotions on cancel", "promotions on no-show",
                  "no-show refused: grace not elapsed", "retries answered with the first answer"):
        assert event_count(summary, label) > 0, label
    assert re.search(r"│ DOC003 +│", summary)  # at least three doctors in the per-doctor table
    assert f"day report: {report}" in summary and report.read_text().startswith("<!DOCTYPE html>")


def audit_log(address: str, admin_key: str) -> list[pb.AuditEntry]:
    """Every row of the server's audit log, read with the admin key."""
    entries: list[pb.AuditEntry] = []
    page_token = ""
    with grpc.insecure_channel(address) as channel:
        stub = opd_pb2_grpc.OPDTokenServiceStub(channel)
        while True:
            page = stub.ListAuditEntries(pb.ListAuditEntriesRequest(page_size=500, page_token=page_token),
                                         metadata=bearer(admin_key))
            entries += page.entries
            if not (page_token := page.next_page_token):
                return entries


@pytest.mark.slow
@pytest.mark.backend_independent
def test_make_sim_plays_through_a_key_per_role_and_its_boards_end_showing_what_the_server_says(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    audit: list[pb.AuditEntry] = []
    play = cli.play

    def play_then_read_the_audit_log(plan: Any, address: str, keys: dict[str, str], *args: Any) -> Any:
        outcome = play(plan, address, keys, *args)
        audit.extend(audit_log(address, keys["admin"]))  # before the simulation stops its server
        return outcome

    monkeypatch.setattr(cli, "play", play_then_read_the_audit_log)

    code = cli.main(["--seed", "7", "--boards", "3", "--report", str(tmp_path / "day.html")])  # as `make sim`

    summary = capsys.readouterr().out
    assert code == 0, summary
    assert summary.rstrip().splitlines()[-1] == "violations: 0"
    line = re.search(r"^boards: 3 \(.*\); events received (\d+) / (\d+) / (\d+); resumes (\d+), reconnects \d+; "
                     r"mismatches (\d+)$", summary, re.MULTILINE)
    assert line, summary
    assert all(int(line[n]) > 0 for n in (1, 2, 3)), line[0]
    assert int(line[4]) >= 1, line[0]
    assert line[5] == "0", line[0]
    roles_by_call = defaultdict(set)
    for entry in audit:
        roles_by_call[entry.method].add(entry.role)
    assert roles_by_call == ROLES_BY_CALL
    assert {entry.outcome for entry in audit} == {pb.AUDIT_OUTCOME_CHANGED}  # nothing denied


@pytest.mark.backend_independent
def test_the_simulation_exits_1_and_names_the_violations_when_freed_seats_are_not_given_away(
        live: LiveServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    monkeypatch.setattr(model.DoctorDay, "_fill_seats", lambda self, slot, now, caused_by: [])  # a broken §6
    monkeypatch.setattr(cli, "SMALL", dataclasses.replace(SMALL, doctors=1))  # a shorter day will do

    code = cli.main(["--seed", "7", "--address", live.address, "--report", str(tmp_path / "day.html")])

    out = capsys.readouterr().out
    assert code == 1
    assert "(§3.2)" in out  # a free seat with a waitlist
    assert re.search(r"freeing its seat promoted \[\], §6 says \['DOC\d+-\d+-T\d+'\]", out)
    assert "violations: 0" not in out


# ---- keys given with --keys ----------------------------------------------------------------------


@pytest.fixture
def keyed_server(tmp_path: Path) -> Iterator[tuple[ServerProcess, dict[str, str]]]:
    """`python -m opd_grpc` with the simulation's settings on a database holding a key per role, and the keys."""
    with fresh_database(tmp_path) as url:
        keys = {role: add_key(url, role) for role in ROLES}
        with ServerProcess(url, settings=cli.SERVER_SETTINGS) as server:
            yield server, keys


def keys_file(folder: Path, keys: dict[str, str]) -> Path:
    path = folder / "keys.toml"
    path.write_text("".join(f'{role} = "{key}"\n' for role, key in keys.items()))
    return path


def one_line(out: str) -> str:
    """The summary with rich's line wrapping undone."""
    return " ".join(out.split())


def test_a_keyed_server_plays_the_day_clean_with_the_keys_file_without_a_display_key(
        keyed_server: tuple[ServerProcess, dict[str, str]], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    server, keys = keyed_server
    del keys["display"]  # optional: the reads go with the admin key
    monkeypatch.setattr(cli, "SMALL", dataclasses.replace(SMALL, doctors=1))

    code = cli.main(["--seed", "7", "--address", server.address, "--keys", str(keys_file(tmp_path, keys)),
                     "--report", str(tmp_path / "day.html")])

    out = capsys.readouterr().out
    assert code == 0, out
    assert out.rstrip().splitlines()[-1] == "violations: 0"


def test_a_keyed_server_without_the_keys_file_is_refused_before_the_day_with_exit_2(
        keyed_server: tuple[ServerProcess, dict[str, str]], capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    server, _ = keyed_server

    code = cli.main(["--seed", "7", "--address", server.address, "--report", str(tmp_path / "day.html")])

    out = one_line(capsys.readouterr().out)
    assert code == 2, out
    assert f"simulation: the server at {server.address} requires API keys (SPEC §13); give one per role with " \
           "--keys FILE [UNAUTHENTICATED (API_KEY_MISSING)" in out, out


def test_a_server_in_another_time_zone_is_refused_before_the_day_with_exit_2(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Played on an Asia/Kolkata server, the day had ended with 94 'violations', all SLOT_CLOSED refusals of
    slots that closed five and a half hours off the simulated clock (a reviewer's find)."""
    with ServerProcess(settings={"TIMEZONE": "Asia/Kolkata", "METRICS_LISTEN": ""}) as server:
        code = cli.main(["--seed", "7", "--address", server.address, "--report", str(tmp_path / "day.html")])
    out = one_line(capsys.readouterr().out)
    assert code == 2, out
    assert f"the server at {server.address} runs with TIMEZONE=Asia/Kolkata; the simulation plays a day in UTC" \
        in out, out


def test_a_key_under_the_wrong_role_is_a_violation_naming_the_call_and_the_role(
        keyed_server: tuple[ServerProcess, dict[str, str]], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    server, keys = keyed_server
    keys["triage"] = keys["reception"]  # the day's one doctor has an emergency through each call
    monkeypatch.setattr(cli, "SMALL", dataclasses.replace(SMALL, doctors=1))

    code = cli.main(["--seed", "7", "--address", server.address, "--keys", str(keys_file(tmp_path, keys)),
                     "--report", str(tmp_path / "day.html")])

    out = one_line(capsys.readouterr().out)
    assert code == 1, out
    for call in ("AllocateEmergency", "AllocateToken with SOURCE_EMERGENCY"):
        assert re.search(rf"{call.split()[0]} DOC001 for [^:]+: the triage key was refused: PERMISSION_DENIED "
                         rf"\(ROLE_NOT_ALLOWED\): The role 'reception' may not call {call}; it is for triage\.",
                         out), (call, out)
    assert "violations: 2" in out


@pytest.mark.backend_independent
@pytest.mark.parametrize("roles, arguments, problem", [
    ((*ROLES, "nurse"), ["--address", "127.0.0.1:1"], "unknown role 'nurse'; the roles are admin, reception,"),
    (("admin", "reception", "doctor"), ["--address", "127.0.0.1:1"], "no key for the role triage;"),
    (ROLES, [], "--keys goes with --address"),
])
def test_an_unknown_or_missing_role_in_the_keys_file_or_keys_without_address_is_a_usage_error(
        roles: tuple[str, ...], arguments: list[str], problem: str, capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    path = keys_file(tmp_path, {role: f"opd_0000000{n}_{'x' * 43}" for n, role in enumerate(roles)})

    with pytest.raises(SystemExit) as exit_:
        cli.main([*arguments, "--keys", str(path), "--report", str(tmp_path / "day.html")])

    assert exit_.value.code == 2
    assert problem in capsys.readouterr().err


# ---- a server that stops answering mid-day -------------------------------------------------------

MID_MORNING = dt.datetime(2030, 1, 7, 8, 30, tzinfo=dt.timezone.utc)  # bookings coming in, boards watching
REACHES_MID_MORNING_WITHIN = 60.0  # seconds; the seed-7 day gets there in about 3
# Seconds from the failure to the end of the run: the client library's retries of UNAVAILABLE take under 1, and the
# boards' streams stop at once. A run that takes longer fails the test (TimeoutExpired).
ENDS_WITHIN = 15.0


def simulation_stopped_mid_morning(address: str, arguments: list[str], stop: Callable[[], object],
                                   clock_key: str = "") -> subprocess.CompletedProcess[str]:
    """`python -m simulation --seed 7 --address ADDRESS ARGUMENTS` in a child process; once the server's test clock
    reads MID_MORNING (asked with `clock_key`), `stop()`, then the process once it has ended."""
    command = [sys.executable, "-m", "simulation", "--seed", "7", "--address", address, *arguments]
    simulation = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        give_up = time.monotonic() + REACHES_MID_MORNING_WITHIN
        with grpc.insecure_channel(address) as channel:
            clock = test_clock_pb2_grpc.TestClockServiceStub(channel)

            def server_time() -> dt.datetime:
                answer = clock.GetTime(test_clock_pb2.GetTimeRequest(), metadata=bearer(clock_key), timeout=5)
                return answer.now.ToDatetime(dt.timezone.utc)

            while server_time() < MID_MORNING:
                assert simulation.poll() is None, simulation.communicate()
                assert time.monotonic() < give_up, f"the day did not reach {MID_MORNING:%H:%M}"
                time.sleep(0.01)
        stop()
        out, err = simulation.communicate(timeout=ENDS_WITHIN)
        return subprocess.CompletedProcess(command, simulation.returncode, out, err)
    finally:
        if simulation.poll() is None:
            simulation.kill()
            simulation.communicate()


@pytest.mark.backend_independent
def test_a_server_killed_mid_day_ends_the_run_at_once_with_exit_2_naming_the_time_and_the_call(
        tmp_path: Path) -> None:
    server = ServerProcess(settings=cli.SERVER_SETTINGS)
    server.start()
    try:
        ended = simulation_stopped_mid_morning(
            server.address, ["--boards", "3", "--report", str(tmp_path / "day.html")], server.kill)
    finally:
        server.kill()  # (again, if the run failed before it was killed)

    assert ended.returncode == 2, ended.stdout + ended.stderr
    assert "Traceback" not in ended.stderr, ended.stderr
    (line,) = ended.stdout.splitlines()  # no summary, no violation per remaining step
    stopped = re.fullmatch(r"simulation: the server stopped answering at (\d\d:\d\d) \(\S.*: UNAVAILABLE: .+\); "
                           r"the day was not finished", line)
    assert stopped and stopped[1] >= f"{MID_MORNING:%H:%M}", line
    assert not (tmp_path / "day.html").exists()


def test_the_display_key_revoked_mid_day_ends_the_run_with_exit_2_naming_the_display_key(tmp_path: Path) -> None:
    with fresh_database(tmp_path) as url:
        keys = {role: add_key(url, role) for role in ROLES}
        settings = {**cli.SERVER_SETTINGS, "API_KEYS_REFRESH_SECONDS": 0.2}
        with ServerProcess(url, settings=settings) as server:
            ended = simulation_stopped_mid_morning(
                server.address, ["--keys", str(keys_file(tmp_path, keys)), "--report", str(tmp_path / "day.html")],
                lambda: revoke_key(url, keys["display"]), clock_key=keys["admin"])

    assert ended.returncode == 2, ended.stdout + ended.stderr
    assert "Traceback" not in ended.stderr, ended.stderr
    (line,) = ended.stdout.splitlines()
    stopped = re.fullmatch(r"simulation: at (\d\d:\d\d), the §3 check of DOC\d+ \(ListSlots, GetSlotStatus, "
                           r"ListTokens\): the display key was refused: UNAUTHENTICATED \(\w+\): .+; the day was not "
                           r"finished", line)
    assert stopped and stopped[1] >= f"{MID_MORNING:%H:%M}", line


# ---- the checks on fabricated states -------------------------------------------------------------


def stamp(minute: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(dt.datetime(2030, 1, 7, 7, minute, tzinfo=dt.timezone.utc))
    return ts


def token(number: int, status: int, slot: pb.Slot, source: int = pb.SOURCE_WALK_IN, patient: int = 0) -> pb.Token:
    priority = {pb.SOURCE_EMERGENCY: 1, pb.SOURCE_PAID_PRIORITY: 2, pb.SOURCE_FOLLOW_UP: 3,
                pb.SOURCE_ONLINE_BOOKING: 4, pb.SOURCE_WALK_IN: 5}[source]
    return pb.Token(token_id=f"DOC001-20300107-T{number}", token_number=number, slot_id=slot.slot_id,
                    doctor_id="DOC001", date=DATE, source=source, priority=priority, status=status,
                    patient=pb.Patient(name=f"Patient {patient or number}", phone=f"+91-98{patient or number:08d}"),
                    created_at=stamp(number))


def consistent_day() -> DayState:
    """Slot 09:00 (2 seats): T1 called, T2 confirmed, T3 and T4 waitlisted; slot 10:00 (2 seats): T5 confirmed."""
    nine = pb.Slot(slot_id="DOC001-20300107-0900", doctor_id="DOC001", date=DATE, start_time="09:00",
                   end_time="10:00", max_capacity=2, consultation_minutes=10)
    ten = pb.Slot(slot_id="DOC001-20300107-1000", doctor_id="DOC001", date=DATE, start_time="10:00",
                  end_time="11:00", max_capacity=2, consultation_minutes=10)
    tokens = [token(1, pb.STATUS_CALLED, nine), token(2, pb.STATUS_CONFIRMED, nine),
              token(3, pb.STATUS_WAITLISTED, nine, pb.SOURCE_ONLINE_BOOKING),
              token(4, pb.STATUS_WAITLISTED, nine), token(5, pb.STATUS_CONFIRMED, ten)]
    places = {1: (nine, 1), 2: (nine, 2), 5: (ten, 1)}
    for t in tokens:
        if t.token_number in places:
            slot, place = places[t.token_number]
            t.queue_position = place
            start = dt.datetime.fromisoformat(f"{DATE}T{slot.start_time}+00:00")
            t.estimated_time.FromDatetime(start + dt.timedelta(minutes=10 * (place - 1)))
    tokens[2].waitlist_position, tokens[3].waitlist_position = 1, 2
    status = {
        nine.slot_id: pb.GetSlotStatusResponse(slot=nine, max_capacity=2, seat_holders=2, free_seats=0,
                                               waitlist=[tokens[2], tokens[3]]),
        ten.slot_id: pb.GetSlotStatusResponse(slot=ten, max_capacity=2, seat_holders=1, free_seats=1),
    }
    return DayState("DOC001", DATE, [nine, ten], status, tokens)


def ledger_of(day: DayState) -> Ledger:
    ledger = Ledger()
    for slot in day.slots:
        ledger.add_slot(slot)
    for t in day.tokens:
        ledger.absorb(t)
    return ledger


def overbooked(day: DayState) -> None:
    day.tokens[3].status = pb.STATUS_CONFIRMED  # a third seat holder in a 2-seat slot


def free_seat_with_a_waitlist(day: DayState) -> None:
    day.slots[1].max_capacity = 3
    day.tokens[4].status = pb.STATUS_WAITLISTED


def waitlist_out_of_order(day: DayState) -> None:
    nine = day.slot_status[day.slots[0].slot_id]
    nine.waitlist[0].CopyFrom(day.tokens[3])
    nine.waitlist[1].CopyFrom(day.tokens[2])


def gap_in_token_numbers(day: DayState) -> None:
    day.tokens[4].token_number = 6


def patient_with_two_active_tokens(day: DayState) -> None:
    day.tokens[4].patient.CopyFrom(day.tokens[1].patient)


def wrong_estimated_time(day: DayState) -> None:
    day.tokens[1].estimated_time.FromDatetime(dt.datetime(2030, 1, 7, 9, 5, tzinfo=dt.timezone.utc))


@pytest.mark.backend_independent
@pytest.mark.parametrize("break_it, marker", [
    (overbooked, "(§3.1)"), (free_seat_with_a_waitlist, "(§3.2)"), (waitlist_out_of_order, "(§3.3)"),
    (gap_in_token_numbers, "(§3.4)"), (patient_with_two_active_tokens, "(§3.5)"),
    (wrong_estimated_time, "§8 says 2 at 09:10"),
])
def test_the_invariant_checks_catch_a_broken_day(break_it: Callable[[DayState], None], marker: str) -> None:
    day = consistent_day()
    assert invariant_violations(day) == []

    break_it(day)

    assert any(marker in problem for problem in invariant_violations(day)), invariant_violations(day)


@pytest.mark.backend_independent
def test_the_answer_checks_catch_a_lost_token_a_changed_status_and_a_token_nobody_was_given() -> None:
    day = consistent_day()
    ledger = ledger_of(day)
    assert answer_violations(day, ledger) == []

    lost = day.tokens.pop(1)
    day.tokens[0].status = pb.STATUS_COMPLETED
    day.tokens.append(token(6, pb.STATUS_WAITLISTED, day.slots[0]))

    problems = answer_violations(day, ledger)
    assert any(p.startswith(lost.token_id) and "now missing (§3.7)" in p for p in problems), problems
    assert any("STATUS_COMPLETED" in p and "STATUS_CALLED" in p for p in problems), problems
    assert any(p.startswith("DOC001-20300107-T6: exists, but no answer created it") for p in problems), problems


# ---- the boards' comparison on fabricated streams ------------------------------------------------

NINE = pb.Slot(slot_id="DOC001-20300107-0900", doctor_id="DOC001", date=DATE, start_time="09:00", end_time="10:00",
               max_capacity=3, consultation_minutes=10)
# DOC001's day as events: T1, T2 and T4 (paid priority, booked last) get seats, T3 is waitlisted; T1, T2 and T4 check
# in and T1 is called. At the end T1 is called, T4 then T2 are next (priority first), one is waitlisted.
DAY_EVENTS = [(pb.EVENT_KIND_ALLOCATED, 1, pb.STATUS_CONFIRMED), (pb.EVENT_KIND_ALLOCATED, 2, pb.STATUS_CONFIRMED),
              (pb.EVENT_KIND_WAITLISTED, 3, pb.STATUS_WAITLISTED), (pb.EVENT_KIND_ALLOCATED, 4, pb.STATUS_CONFIRMED),
              (pb.EVENT_KIND_CHECKED_IN, 1, pb.STATUS_CHECKED_IN), (pb.EVENT_KIND_CHECKED_IN, 2, pb.STATUS_CHECKED_IN),
              (pb.EVENT_KIND_CHECKED_IN, 4, pb.STATUS_CHECKED_IN), (pb.EVENT_KIND_CALLED, 1, pb.STATUS_CALLED)]


def day_token(number: int, status: int) -> pb.Token:
    made = token(number, status, NINE, pb.SOURCE_PAID_PRIORITY if number == 4 else pb.SOURCE_WALK_IN)
    made.ClearField("patient")
    if status == pb.STATUS_CALLED:
        made.called_at.CopyFrom(stamp(30))
    return made


def day_updates(skipping: int = 0) -> list[pb.WatchQueueResponse]:
    """An empty snapshot, then DAY_EVENTS as sequences 1..8, without the one numbered `skipping`."""
    updates = [pb.WatchQueueResponse(snapshot=pb.QueueSnapshot(doctor_id="DOC001", date=DATE, sequence=0))]
    updates += [pb.WatchQueueResponse(event=pb.QueueEvent(doctor_id="DOC001", date=DATE, sequence=sequence, kind=kind,
                                                          token=day_token(number, status)))
                for sequence, (kind, number, status) in enumerate(DAY_EVENTS, 1) if sequence != skipping]
    return updates


def server_tokens() -> list[pb.Token]:
    return [day_token(1, pb.STATUS_CALLED), day_token(2, pb.STATUS_CHECKED_IN), day_token(3, pb.STATUS_WAITLISTED),
            day_token(4, pb.STATUS_CHECKED_IN)]


def board_fed(updates: list[pb.WatchQueueResponse]) -> BoardState:
    state = BoardState(["DOC001"], DATE)
    for update in updates:
        state.apply(update)
    return state


@pytest.mark.backend_independent
def test_a_board_fed_every_event_shows_what_the_server_says() -> None:
    assert board_mismatches(board_fed(day_updates()), "DOC001", len(DAY_EVENTS), server_tokens()) == []


@pytest.mark.backend_independent
@pytest.mark.parametrize("skipping, expected", [
    (8, ["DOC001: the board is at sequence 7, the server at 8", "DOC001: now calling nobody, the server 1",
         "DOC001: next 4, 1, 2, the server 4, 2"]),
    (7, ["DOC001: next 2, the server 4, 2"]),
    (3, ["DOC001: waitlist 0, the server 1"]),
])
def test_a_board_one_event_short_is_a_mismatch(skipping: int, expected: list[str]) -> None:
    state = board_fed(day_updates(skipping))

    assert board_mismatches(state, "DOC001", len(DAY_EVENTS), server_tokens()) == expected


@pytest.mark.backend_independent
def test_a_board_that_orders_the_next_tokens_wrongly_is_a_mismatch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(board_module, "_call_order", lambda t: t.token_number)  # forgets priority

    problems = board_mismatches(board_fed(day_updates()), "DOC001", len(DAY_EVENTS), server_tokens())

    assert problems == ["DOC001: next 2, 4, the server 4, 2"]


@pytest.mark.backend_independent
def test_a_board_notes_an_event_that_does_not_follow_the_one_before() -> None:
    board = Board(BoardPlan("board 1", every_doctor=True), ["DOC001"], DATE)

    board._feed(day_updates(skipping=5))  # type: ignore[arg-type]  # any iterable of updates stands for a watch

    assert board.gaps == ["DOC001: event 6 came after 4"]
    assert board.events == len(DAY_EVENTS) - 1
