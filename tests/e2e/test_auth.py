"""Who may do what (SPEC §13, issue 5) on real servers: every method against every kind of caller, keys revoked and
added with the real `opd-grpc keys` command while a server runs, the refusal to serve a network without keys, and
the forms of the `authorization` metadata that are and are not accepted.

The expected answers are written out here from SPEC §13, not read from opd_grpc.api.auth.METHOD_ROLES: that table
is what is being checked."""

from __future__ import annotations

import collections
import datetime as dt
import itertools
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import grpc
import pytest
import sqlalchemy
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from opd_grpc._gen.opd.v1 import opd_pb2 as pb
from opd_grpc._gen.opd.v1 import opd_pb2_grpc, test_clock_pb2, test_clock_pb2_grpc
from opd_grpc.api.convert import timestamp
from opd_grpc.engine.errors import InvalidArgument
from opd_grpc.process import ServerProcess
from tests.support import (DAY, LiveServer, RpcFailure, add_key, at, bearer, failure, fresh_database, make_doctor,
                           patient, refused, revoke_key)

ROLES = ("admin", "reception", "triage", "doctor", "display")
EVERY_ROLE = frozenset(ROLES)
OPD, CLOCK = "OPDTokenService", "TestClockService"
SERVICES = {OPD: pb.DESCRIPTOR.services_by_name[OPD], CLOCK: test_clock_pb2.DESCRIPTOR.services_by_name[CLOCK]}
DOMAIN_TABLES = ("doctors", "doctor_days", "slots", "tokens", "queue_events", "stored_requests", "slot_templates",
                 "holidays")
CALL_TIMEOUT = 10.0
UNKNOWN_KEY = "opd_00000000_" + "A" * 43  # well formed, but no such key
OK = grpc.StatusCode.OK
UNAUTHENTICATED, PERMISSION_DENIED = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED
NOW = at("09:00")  # every slot below runs 08:00-20:00: open for bookings, and a first seat holder's grace is over


class Clinic:
    """A keyed server at 09:00 with one doctor (DOC main, one big slot) and the keys of every role; makes the state
    a call needs (a fresh token in the right status) with the keys whose role may make it."""

    def __init__(self, live: LiveServer, keys: dict[str, str]):
        self.live, self.keys = live, keys
        self.stub, self.clock = live.stub, live.clock
        self._numbers = itertools.count(1)
        live.set_time(NOW)
        self.doctor_id, self.slot_id = self.new_doctor()
        self.token_id = self.confirmed()

    def next(self) -> int:
        return next(self._numbers)

    def as_(self, role: str) -> dict[str, Any]:
        return {"metadata": bearer(self.keys[role]), "timeout": CALL_TIMEOUT}

    def new_doctor(self) -> tuple[str, str]:
        """A doctor of its own with one 08:00-20:00 slot on DAY: its first seat holder is due at 08:00."""
        n = self.next()
        doctor = self.stub.CreateDoctor(pb.CreateDoctorRequest(name=f"Dr Test {n}", specialization="General"),
                                        **self.as_("admin")).doctor.doctor_id
        spec = pb.SlotSpec(date=DAY, start_time="08:00", end_time="20:00", max_capacity=100, consultation_minutes=5)
        (slot,) = self.stub.CreateSlots(pb.CreateSlotsRequest(doctor_id=doctor, slots=[spec]),
                                        **self.as_("admin")).slots
        return doctor, slot.slot_id

    def confirmed(self, doctor_id: str = "") -> str:
        request = pb.AllocateTokenRequest(patient=patient(self.next()), doctor_id=doctor_id or self.doctor_id,
                                          date=DAY, source=pb.SOURCE_WALK_IN)
        token = self.stub.AllocateToken(request, **self.as_("reception")).token
        assert token.status == pb.STATUS_CONFIRMED
        return token.token_id

    def checked_in(self, doctor_id: str = "") -> str:
        token_id = self.confirmed(doctor_id)
        self.stub.CheckInToken(pb.CheckInTokenRequest(token_id=token_id), **self.as_("reception"))
        return token_id

    def waiting_doctor(self) -> str:
        """A doctor of its own with one checked-in patient, for CallNext."""
        doctor_id, _ = self.new_doctor()
        self.checked_in(doctor_id)
        return doctor_id

    def called(self) -> str:
        doctor_id = self.waiting_doctor()
        return self.stub.CallNext(pb.CallNextRequest(doctor_id=doctor_id, date=DAY), **self.as_("doctor")).token.token_id

    def overdue(self) -> str:
        """A confirmed token due at 08:00, booked at 07:30, that has not come: past its 15-minute grace at 09:00."""
        doctor_id, _ = self.new_doctor()
        self.live.set_time(at("07:30"))
        try:
            return self.confirmed(doctor_id)
        finally:
            self.live.set_time(NOW)

    def templated_doctor(self) -> str:
        """A doctor of its own with a weekly pattern (Tuesdays 09:00-10:00) and no slot on a Tuesday yet."""
        doctor_id, _ = self.new_doctor()
        slot = pb.TemplateSlot(weekday=pb.WEEKDAY_TUESDAY, start_time="09:00", end_time="10:00")
        self.stub.SetSlotTemplate(pb.SetSlotTemplateRequest(doctor_id=doctor_id, slots=[slot]), **self.as_("admin"))
        return doctor_id

    def new_holiday_date(self) -> str:
        return (dt.date(2031, 1, 1) + dt.timedelta(days=self.next())).isoformat()

    def holiday(self) -> str:
        date = self.new_holiday_date()
        self.stub.CreateHoliday(pb.CreateHolidayRequest(date=date, name="Closed"), **self.as_("admin"))
        return date


@dataclass(frozen=True)
class Row:
    """One method (or one variant of a method's request) and the roles that SPEC §13 lets call it."""

    service: str
    method: str
    roles: frozenset[str]
    request: Callable[[Clinic], Any]  # a request that succeeds when made now by a role that may make it
    variant: str = ""

    @property
    def name(self) -> str:
        return f"{self.method}[{self.variant}]" if self.variant else self.method


def _only(*roles: str) -> frozenset[str]:
    return frozenset(roles)


def _allocate(source: int) -> Callable[[Clinic], Any]:
    return lambda c: pb.AllocateTokenRequest(patient=patient(c.next()), doctor_id=c.doctor_id, date=DAY, source=source)


# SPEC §13: admin runs doctors, slots (their weekly patterns and the holidays too) and capacity (and, here, the audit
# log and the test clock, which moves every clinic's day); reception books all but emergencies, checks in and
# cancels; triage books emergencies; the doctor calls, completes and marks no-shows; every role, display included,
# reads and watches.
ROWS = [
    Row(OPD, "CreateDoctor", _only("admin"), lambda c: pb.CreateDoctorRequest(name=f"Dr New {c.next()}",
                                                                              specialization="Cardiology")),
    Row(OPD, "GetDoctor", EVERY_ROLE, lambda c: pb.GetDoctorRequest(doctor_id=c.doctor_id)),
    Row(OPD, "ListDoctors", EVERY_ROLE, lambda c: pb.ListDoctorsRequest(page_size=10)),
    Row(OPD, "CreateSlots", _only("admin"), lambda c: pb.CreateSlotsRequest(doctor_id=c.doctor_id, slots=[pb.SlotSpec(
        date=(dt.date(2030, 3, 1) + dt.timedelta(days=c.next())).isoformat(), start_time="09:00", end_time="10:00")])),
    Row(OPD, "ListSlots", EVERY_ROLE, lambda c: pb.ListSlotsRequest(doctor_id=c.doctor_id, date=DAY)),
    Row(OPD, "UpdateSlotCapacity", _only("admin"),
        lambda c: pb.UpdateSlotCapacityRequest(slot_id=c.slot_id, max_capacity=100 + c.next())),
    Row(OPD, "GetSlotStatus", EVERY_ROLE, lambda c: pb.GetSlotStatusRequest(slot_id=c.slot_id)),
    Row(OPD, "AllocateToken", _only("reception"), _allocate(pb.SOURCE_WALK_IN), "SOURCE_WALK_IN"),
    Row(OPD, "AllocateToken", _only("triage"), _allocate(pb.SOURCE_EMERGENCY), "SOURCE_EMERGENCY"),
    Row(OPD, "AllocateEmergency", _only("triage"),
        lambda c: pb.AllocateEmergencyRequest(patient=patient(c.next()), doctor_id=c.doctor_id, date=DAY)),
    Row(OPD, "CancelToken", _only("reception"), lambda c: pb.CancelTokenRequest(token_id=c.confirmed())),
    Row(OPD, "MarkNoShow", _only("doctor"), lambda c: pb.MarkNoShowRequest(token_id=c.overdue())),
    Row(OPD, "CheckInToken", _only("reception"), lambda c: pb.CheckInTokenRequest(token_id=c.confirmed())),
    Row(OPD, "CallNext", _only("doctor"), lambda c: pb.CallNextRequest(doctor_id=c.waiting_doctor(), date=DAY)),
    Row(OPD, "CompleteToken", _only("doctor"), lambda c: pb.CompleteTokenRequest(token_id=c.called())),
    Row(OPD, "GetToken", EVERY_ROLE, lambda c: pb.GetTokenRequest(token_id=c.token_id)),
    Row(OPD, "ListTokens", EVERY_ROLE, lambda c: pb.ListTokensRequest(doctor_id=c.doctor_id, date=DAY)),
    Row(OPD, "GetStats", EVERY_ROLE, lambda c: pb.GetStatsRequest(date=DAY, doctor_id=c.doctor_id)),
    Row(OPD, "WatchQueue", EVERY_ROLE, lambda c: pb.WatchQueueRequest(doctor_ids=[c.doctor_id], date=DAY)),
    Row(OPD, "ListAuditEntries", _only("admin"), lambda c: pb.ListAuditEntriesRequest(page_size=10)),
    Row(OPD, "ListQueueEvents", EVERY_ROLE, lambda c: pb.ListQueueEventsRequest(doctor_id=c.doctor_id, date=DAY)),
    Row(OPD, "SetSlotTemplate", _only("admin"), lambda c: pb.SetSlotTemplateRequest(doctor_id=c.doctor_id, slots=[
        pb.TemplateSlot(weekday=pb.WEEKDAY_FRIDAY, start_time="09:00", end_time=f"{10 + c.next() % 10}:00")])),
    Row(OPD, "GetSlotTemplate", EVERY_ROLE, lambda c: pb.GetSlotTemplateRequest(doctor_id=c.doctor_id)),
    Row(OPD, "ApplySlotTemplate", _only("admin"), lambda c: pb.ApplySlotTemplateRequest(
        doctor_id=c.templated_doctor(), start_date=DAY, end_date="2030-01-13")),
    Row(OPD, "CreateHoliday", _only("admin"), lambda c: pb.CreateHolidayRequest(date=c.new_holiday_date(),
                                                                                name="Republic Day")),
    Row(OPD, "ListHolidays", EVERY_ROLE, lambda c: pb.ListHolidaysRequest(start_date="2031-01-01")),
    Row(OPD, "DeleteHoliday", _only("admin"), lambda c: pb.DeleteHolidayRequest(date=c.holiday())),
    Row(CLOCK, "SetTime", _only("admin"), lambda c: test_clock_pb2.SetTimeRequest(time=timestamp(NOW))),
    Row(CLOCK, "AdvanceTime", _only("admin"), lambda c: test_clock_pb2.AdvanceTimeRequest(duration=Duration())),
    Row(CLOCK, "GetTime", EVERY_ROLE, lambda c: test_clock_pb2.GetTimeRequest()),
]

# The callers of each cell, and the refusal each gets when it is not let through ("" reason: its role decides).
CALLERS = {"no key": (UNAUTHENTICATED, "API_KEY_MISSING"), "unknown key": (UNAUTHENTICATED, "API_KEY_INVALID"),
           "revoked key": (UNAUTHENTICATED, "API_KEY_INVALID"), **{role: (OK, "") for role in ROLES}}


def expected(row: Row, caller: str) -> tuple[grpc.StatusCode, str]:
    code, reason = CALLERS[caller]
    if code is OK and caller not in row.roles:
        return PERMISSION_DENIED, "ROLE_NOT_ALLOWED"
    return code, reason


def call(clinic: Clinic, row: Row, request: Any, metadata: tuple[tuple[str, str], ...]) -> tuple[grpc.StatusCode, str]:
    """Makes the call and answers its code and ErrorInfo reason; a WatchQueue call is OK once its snapshot comes."""
    stub = clinic.stub if row.service == OPD else clinic.clock
    try:
        if row.method == "WatchQueue":
            stream = stub.WatchQueue(request, metadata=metadata, timeout=CALL_TIMEOUT)
            first = next(stream)
            stream.cancel()
            assert first.HasField("snapshot"), first
        else:
            getattr(stub, row.method)(request, metadata=metadata, timeout=CALL_TIMEOUT)
    except grpc.RpcError as error:
        answer = failure(error)
        return answer.code, answer.reason
    return OK, ""


def dump(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the domain tables, in a fixed order."""
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.NullPool)
    try:
        with engine.connect() as conn:
            return {table: sorted((tuple(r) for r in conn.execute(sqlalchemy.text(f"SELECT * FROM {table}"))), key=repr)
                    for table in DOMAIN_TABLES}
    finally:
        engine.dispose()


def audit_rows(url: str, after_entry_id: int = 0) -> list[tuple[int, str, str, str, str, str]]:
    """(entry_id, outcome, key_id, role, method, reason) of the audit log's entries after `after_entry_id`."""
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.NullPool)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sqlalchemy.text(
                "SELECT entry_id, outcome, key_id, role, method, reason FROM audit_log WHERE entry_id > :after "
                "ORDER BY entry_id"), {"after": after_entry_id})]
    finally:
        engine.dispose()


def key_id(key: str) -> str:
    return key.split("_")[1]


@dataclass
class Keyed:
    live: LiveServer
    url: str
    keys: dict[str, str]  # by role, and "revoked key" / "unknown key"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyed]:
    """One server whose database holds a key of every role and a revoked one, all made before it started."""
    with fresh_database(tmp_path_factory.mktemp("auth")) as url:
        keys = {role: add_key(url, role, f"{role} desk") for role in ROLES}
        keys["revoked key"] = add_key(url, "admin", "left the hospital")
        revoke_key(url, keys["revoked key"])
        keys["unknown key"] = UNKNOWN_KEY
        live = LiveServer(url, admin_key=keys["admin"], AUDITED_DENIALS_PER_PEER=0)  # every denial is counted here
        try:
            yield Keyed(live, url, keys)
        finally:
            live.close()


def test_the_matrix_has_a_row_for_every_method_of_both_services():
    """A method added to the protos without a row here fails this test, rather than going unchecked."""
    served = {(service, m.name) for service, descriptor in SERVICES.items() for m in descriptor.methods}
    assert {(row.service, row.method) for row in ROWS} == served
    assert len([m for s, m in served if s == OPD]) == 26


def test_every_method_answers_every_caller_as_its_role_allows_and_a_refusal_changes_nothing(keyed):
    """All refused cells first, between two dumps of the domain tables and with one DENIED audit entry each; then
    every allowed cell, each with a request of its own that succeeds."""
    clinic = Clinic(keyed.live, keyed.keys)
    metadata = {"no key": (), **{caller: bearer(keyed.keys[caller]) for caller in CALLERS if caller != "no key"}}
    refusals = [(row, caller) for row in ROWS for caller in CALLERS if expected(row, caller)[0] is not OK]
    requests = {row.name: row.request(clinic) for row in ROWS}  # each one would succeed if it were let through
    tables, last_entry = dump(keyed.url), audit_rows(keyed.url)[-1][0]

    wrong = []
    for row, caller in refusals:
        answer = call(clinic, row, requests[row.name], metadata[caller])
        if answer != expected(row, caller):
            wrong.append(f"{row.name} as {caller}: {answer}, expected {expected(row, caller)}")
    changed = [table for table, rows in dump(keyed.url).items() if rows != tables[table]]
    assert changed == [], f"calls that should have been refused changed {changed}: {wrong}"
    assert wrong == []
    denied = collections.Counter((outcome, key, role, method, reason.split(":")[0])
                                 for _, outcome, key, role, method, reason in audit_rows(keyed.url, last_entry))
    refused_key = {caller: ("", "") if code is UNAUTHENTICATED else (key_id(keyed.keys[caller]), caller)
                   for caller, (code, _) in CALLERS.items()}
    assert denied == collections.Counter(("DENIED", *refused_key[caller], row.method, expected(row, caller)[1])
                                         for row, caller in refusals)

    for row in ROWS:
        for role in sorted(row.roles):
            answer = call(clinic, row, row.request(clinic), metadata[role])  # a fresh request: some use up a token
            assert answer == (OK, ""), f"{row.name} as {role}"


def test_a_refused_key_leaves_its_id_and_why_in_the_audit_log(keyed):
    """A desk still sending a revoked key is found by the id its DENIED rows name; the row's key and role stay
    empty (nobody was authenticated), and the caller is told no more than for any bad key."""
    last_entry = audit_rows(keyed.url)[-1][0]
    revoked, unknown = keyed.keys["revoked key"], keyed.keys["unknown key"]
    assert _list_doctors(keyed.live, bearer(revoked)) == _list_doctors(keyed.live, bearer(unknown)) == UNAUTHENTICATED
    rows = [(key, role, reason.rpartition(" (presented: ")[2])
            for _, outcome, key, role, method, reason in audit_rows(keyed.url, last_entry)]
    assert rows == [("", "", f"key {key_id(revoked)}, revoked)"), ("", "", f"key {key_id(unknown)}, unknown)")]


def test_health_and_reflection_answer_without_a_key(keyed):
    channel = keyed.live.channel
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    (answer,) = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                timeout=CALL_TIMEOUT)
    assert {s.name for s in answer.list_services_response.service} >= {"opd.v1.OPDTokenService",
                                                                        "opd.v1.TestClockService"}


def _list_doctors(live: LiveServer, metadata: tuple[tuple[str, str], ...]) -> grpc.StatusCode:
    try:
        live.stub.ListDoctors(pb.ListDoctorsRequest(), metadata=metadata, timeout=CALL_TIMEOUT)
    except grpc.RpcError as error:
        return error.code()
    return OK


@pytest.mark.parametrize("second", ["display", "admin"], ids=["the same key twice", "two keys"])
def test_two_authorization_entries_are_refused_as_unauthenticated(keyed, second):
    """Which of two keys is meant is anybody's guess, even when they are one and the same."""
    metadata = (("authorization", f"Bearer {keyed.keys['display']}"), ("authorization", f"Bearer {keyed.keys[second]}"))
    error = refused(lambda r: keyed.live.stub.ListDoctors(r, metadata=metadata, timeout=CALL_TIMEOUT),
                    pb.ListDoctorsRequest())
    assert (error.code, error.reason) == (UNAUTHENTICATED, "API_KEY_INVALID")


@pytest.mark.parametrize("value", ["bearer {key}", "BEARER {key}", "Bearer {key} ", "Bearer  {key}"])
def test_the_scheme_in_any_case_and_spaces_around_the_key_are_accepted(keyed, value):
    metadata = (("authorization", value.format(key=keyed.keys["display"])),)
    assert _list_doctors(keyed.live, metadata) is OK


@pytest.mark.parametrize("value", ["{key}", "Basic {key}", "Bearer", "Bearer {key}x", "Bearer opd_zz_{key}",
                                   "Bearer {id_only}"])
def test_a_malformed_authorization_value_is_refused_as_an_invalid_key(keyed, value):
    key = keyed.keys["display"]
    metadata = (("authorization", value.format(key=key, id_only=key.rsplit("_", 1)[0])),)
    error = refused(lambda r: keyed.live.stub.ListDoctors(r, metadata=metadata, timeout=CALL_TIMEOUT),
                    pb.ListDoctorsRequest())
    assert (error.code, error.reason) == (UNAUTHENTICATED, "API_KEY_INVALID")
    if not value.startswith("Bearer"):  # a valid key in the wrong form is told the form
        assert error.message == "The authorization metadata must read `Bearer <key>`."


def test_a_wrong_secret_for_a_real_key_id_is_refused(keyed):
    key = keyed.keys["admin"]
    wrong = key[:-1] + ("B" if key[-1] != "B" else "C")
    assert _list_doctors(keyed.live, bearer(wrong)) is UNAUTHENTICATED


# ---- keys managed on a running server with the real command -------------------------------------------------------

KEY_TEXT = re.compile(r"opd_[0-9a-f]{8}_[A-Za-z0-9_-]{43}")
NOTICED_WITHIN = 2.0


def keys_command(url: str, *args: str) -> str:
    """`python -m opd_grpc keys ARGS` against the database at `url`; answers what it printed."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("OPD_")}, "OPD_DATABASE_URL": url}
    done = subprocess.run([sys.executable, "-m", "opd_grpc", "keys", *args], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def answer_within(seconds: float, live: LiveServer, key: str, code: grpc.StatusCode) -> float:
    """How long until a call with `key` answers `code`; fails after `seconds`."""
    started = time.monotonic()
    while (got := _list_doctors(live, bearer(key))) is not code:
        assert time.monotonic() - started < seconds, f"still {got} after {seconds} s"
        time.sleep(0.05)
    return time.monotonic() - started


def test_keys_revoked_and_added_with_the_command_count_on_a_running_server(tmp_path: Path):
    with fresh_database(tmp_path) as url:
        admin, desk = add_key(url, "admin", "ops"), add_key(url, "reception", "desk-1")
        live = LiveServer(url, admin_key=admin, API_KEYS_REFRESH_SECONDS=0.2)
        try:
            assert _list_doctors(live, bearer(desk)) is OK
            printed = keys_command(url, "revoke", key_id(desk))
            assert key_id(desk) in printed
            answer_within(NOTICED_WITHIN, live, desk, UNAUTHENTICATED)

            printed = keys_command(url, "add", "--role", "display", "--name", "x")
            (board,) = KEY_TEXT.findall(printed)
            answer_within(NOTICED_WITHIN, live, board, OK)
            error = refused(lambda r: live.stub.CreateDoctor(r, metadata=bearer(board), timeout=CALL_TIMEOUT),
                            pb.CreateDoctorRequest(name="Dr X", specialization="General"))
            assert (error.code, error.reason) == (PERMISSION_DENIED, "ROLE_NOT_ALLOWED")
            assert _list_doctors(live, bearer(admin)) is OK
        finally:
            live.close()
        listed = {line.split()[0]: line for line in keys_command(url, "list").splitlines() if line.strip()}
        assert set(listed) == {key_id(admin), key_id(desk), key_id(board)}
        assert "revoked" in listed[key_id(desk)] and "reception" in listed[key_id(desk)]
        assert "active" in listed[key_id(board)] and "display" in listed[key_id(board)]
        assert "active" in listed[key_id(admin)]


@pytest.mark.backend_independent
def test_keys_made_where_there_was_no_database_say_which_new_file_holds_them(tmp_path: Path):
    """Run in another folder than the server's, `keys add` made a new opd.db there without a word: the operator
    handed out a key that the server never heard of."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("OPD_")}, "OPD_DATABASE_URL": "sqlite:///opd.db"}

    def keys(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "opd_grpc", "keys", *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)

    first, again = keys("add", "--role", "admin", "--name", "ops"), keys("list")
    assert (first.returncode, again.returncode) == (0, 0), (first.stderr, again.stderr)
    assert (f"opd-grpc: there was no database at sqlite:///{tmp_path / 'opd.db'}: a new, empty one was made. A "
            "server uses it only if its DATABASE_URL names it") in first.stderr
    assert KEY_TEXT.search(first.stdout) and again.stderr == ""  # no notes on the schema, from Alembic or ours
    assert len(first.stderr.splitlines()) == 1, first.stderr
    assert "admin" in again.stdout


def test_revoking_the_last_key_does_not_open_the_server(tmp_path: Path):
    """A database that holds only revoked keys still needs a key: revoking is not a way back to development mode."""
    with fresh_database(tmp_path) as url:
        only = add_key(url, "admin", "the only one")
        live = LiveServer(url, admin_key=only, API_KEYS_REFRESH_SECONDS=0.2)
        try:
            keys_command(url, "revoke", key_id(only))
            answer_within(NOTICED_WITHIN, live, only, UNAUTHENTICATED)
            assert _list_doctors(live, ()) is UNAUTHENTICATED
        finally:
            live.close()


def ended_within(stream: Any) -> tuple[float, RpcFailure]:
    """Reads a WatchQueue stream to its end: how long that took, and how it ended."""
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as ended:
        for _ in stream:
            pass
    return time.monotonic() - started, failure(ended.value)


def test_a_stream_ends_once_its_key_is_revoked_or_keys_become_required(tmp_path: Path):
    """A board's WatchQueue stream passed the key check when it opened; revoked, its key had gone on receiving
    every change of the day for as long as the stream stayed open (a reviewer's find). Now it ends UNAUTHENTICATED
    at the next key reload, as one opened with no key does once the first key is made; other streams go on."""
    with fresh_database(tmp_path) as url:
        live = LiveServer(url, API_KEYS_REFRESH_SECONDS=0.2)
        try:
            doctor = make_doctor(live.stub)

            def watch(key: str = "") -> Any:
                stream = live.stub.WatchQueue(pb.WatchQueueRequest(doctor_ids=[doctor], date=DAY),
                                              metadata=bearer(key), timeout=CALL_TIMEOUT)
                next(stream)  # its snapshot's first message: the stream is open
                return stream

            anonymous = watch()
            admin, desk = add_key(url, "admin"), add_key(url, "reception")
            board, other = add_key(url, "display", "board"), add_key(url, "display")
            took, why = ended_within(anonymous)
            assert (why.code, why.reason) == (UNAUTHENTICATED, "API_KEY_INVALID") and took < NOTICED_WITHIN, took

            answer_within(NOTICED_WITHIN, live, other, OK)  # the reload that ended it may have come before these keys
            revoked, kept = watch(board), watch(other)
            revoke_key(url, board)
            took, why = ended_within(revoked)
            assert (why.code, why.reason) == (UNAUTHENTICATED, "API_KEY_INVALID") and took < NOTICED_WITHIN, took
            live.stub.CreateSlots(pb.CreateSlotsRequest(doctor_id=doctor, slots=[pb.SlotSpec(
                date=DAY, start_time="09:00", end_time="10:00", max_capacity=2)]), metadata=bearer(admin))
            live.stub.AllocateToken(pb.AllocateTokenRequest(patient=patient(1), doctor_id=doctor, date=DAY,
                                                         source=pb.SOURCE_WALK_IN),
                                    metadata=bearer(desk))
            assert any(update.event.kind == pb.EVENT_KIND_ALLOCATED for update in kept)  # the valid key watches on
            kept.cancel()
        finally:
            live.close()


# ---- where a server without keys may listen -----------------------------------------------------------------------

def test_a_server_without_keys_refuses_to_listen_beyond_loopback(tmp_path: Path):
    with fresh_database(tmp_path) as url:
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("OPD_")}, "OPD_DATABASE_URL": url,
               "OPD_LISTEN": "0.0.0.0:0", "OPD_METRICS_LISTEN": ""}
        done = subprocess.run([sys.executable, "-m", "opd_grpc"], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode != 0
        assert "keys add" in done.stderr and "0.0.0.0" in done.stderr, done.stderr
        assert "listening" not in done.stdout


def test_a_test_clock_server_refuses_to_listen_beyond_loopback_and_warns_on_it(tmp_path: Path):
    """Its SetTime moves every clinic's day (slots closing, no-show graces, AUTO_NO_SHOW, audit times): it had
    served on 0.0.0.0 without a word."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("OPD_")},
           "OPD_DATABASE_URL": f"sqlite:///{tmp_path / 'opd.db'}", "OPD_LISTEN": "0.0.0.0:0", "OPD_TEST_CLOCK": "1",
           "OPD_METRICS_LISTEN": ""}
    done = subprocess.run([sys.executable, "-m", "opd_grpc"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "listening" not in done.stdout
    assert done.stderr.startswith("opd-grpc: TEST_CLOCK is on and LISTEN 0.0.0.0:0 is reachable from other "
                                  "machines"), done.stderr
    server = ServerProcess(tmp_path / "opd.db", test_clock=True, settings={"METRICS_LISTEN": ""})
    server.start()
    try:
        assert any('"TEST_CLOCK is on: the service clock is what SetTime' in line for line in server.output)
    finally:
        assert server.stop() == 0


def test_a_server_with_a_key_listens_beyond_loopback_and_asks_for_it(tmp_path: Path):
    with fresh_database(tmp_path) as url:
        key = add_key(url, "display", "board")
        server = ServerProcess(url, test_clock=False, settings={"LISTEN": "0.0.0.0:0", "METRICS_LISTEN": ""})
        host, port = server.start().rsplit(":", 1)
        try:
            assert host == "0.0.0.0"
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = opd_pb2_grpc.OPDTokenServiceStub(channel)
                stub.ListDoctors(pb.ListDoctorsRequest(), metadata=bearer(key), timeout=CALL_TIMEOUT)
                error = refused(lambda r: stub.ListDoctors(r, timeout=CALL_TIMEOUT), pb.ListDoctorsRequest())
                assert (error.code, error.reason) == (UNAUTHENTICATED, "API_KEY_MISSING")
        finally:
            assert server.stop() == 0, "".join(server.output)


def test_a_loopback_server_without_keys_serves_every_call(tmp_path: Path):
    """Development: no keys in the database, so no key is asked for, not even for an admin's or a doctor's call."""
    with fresh_database(tmp_path) as url:
        live = LiveServer(url)
        try:
            doctor = live.stub.CreateDoctor(pb.CreateDoctorRequest(name="Dr Dev", specialization="General"),
                                            timeout=CALL_TIMEOUT).doctor.doctor_id
            live.stub.CreateSlots(pb.CreateSlotsRequest(doctor_id=doctor, slots=[pb.SlotSpec(
                date=DAY, start_time="09:00", end_time="10:00")]), timeout=CALL_TIMEOUT)
            request = pb.AllocateTokenRequest(patient=patient(1), doctor_id=doctor, date=DAY, source=pb.SOURCE_WALK_IN)
            token = live.stub.AllocateToken(request, timeout=CALL_TIMEOUT).token
            assert token.status == pb.STATUS_CONFIRMED
            clock = test_clock_pb2_grpc.TestClockServiceStub(live.channel)
            clock.AdvanceTime(test_clock_pb2.AdvanceTimeRequest(duration=Duration(seconds=60)), timeout=CALL_TIMEOUT)
        finally:
            live.close()


def test_a_flood_of_bad_keys_is_refused_but_fills_the_audit_log_only_at_its_rate(tmp_path: Path):
    """AUDITED_DENIALS_PER_PEER (default 20 a second, a burst of 20): each denied call is refused and access-logged,
    but only that many a second from one client address are written to the append-only audit log."""
    with fresh_database(tmp_path) as url:
        admin = add_key(url, "admin")
        live = LiveServer(url, admin_key=admin)
        try:
            before = audit_rows(url)[-1][0]
            started = time.monotonic()
            codes = collections.Counter(_list_doctors(live, bearer(UNKNOWN_KEY)) for _ in range(150))
            elapsed = time.monotonic() - started
            flood = audit_rows(url, before)
            assert codes == {UNAUTHENTICATED: 150}
            assert all(row[1] == "DENIED" for row in flood)
            assert 20 <= len(flood) <= 20 + 20 * elapsed + 1, (len(flood), elapsed)
            unwritten = live.server.metrics.registry.get_sample_value("opd_denied_calls_not_audited_total")
            assert unwritten == 150 - len(flood)
            time.sleep(1.0)  # the bucket refills: the next denial is written again
            assert _list_doctors(live, bearer(UNKNOWN_KEY)) == UNAUTHENTICATED
            assert len(audit_rows(url, before)) == len(flood) + 1
        finally:
            live.close()


def test_a_keys_name_is_one_line_and_its_audit_row_holds_no_phone_number(tmp_path: Path):
    """`keys list` shows a key a row: a name with a line break would forge a row of its own, so it is refused (runs
    of spaces and tabs are one space). A name with a phone number in it keeps it for `keys list`, but no log holds
    it (SPEC §13)."""
    with fresh_database(tmp_path) as url:
        with pytest.raises(InvalidArgument, match="name: contains a line break"):
            add_key(url, "display", "Ravi Kumar desk\n+91 98450 12345")
        add_key(url, "display", "Ravi Kumar desk\t +91 98450 12345")
        (row,) = [r for r in audit_rows(url) if r[4] == "AddApiKey"]
        assert row[5].endswith("(display, 'Ravi Kumar desk …') added"), row
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.NullPool)
        try:
            with engine.connect() as conn:
                names = list(conn.execute(sqlalchemy.text("SELECT name FROM api_keys")).scalars())
        finally:
            engine.dispose()
        assert names == ["Ravi Kumar desk +91 98450 12345"]
