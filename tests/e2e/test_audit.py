"""Issue 5's audit acceptance test (SPEC §13). A seeded random run against a real server process, with one key
per role: admin makes doctors, slots and capacity changes and moves the test clock; reception books, checks in
and cancels; triage books emergencies (bumps); the doctor calls, completes and marks no-shows. Mixed in: repeated
request_ids (replays change nothing), refusals by the engine, and calls denied for their key or role.

Afterwards the audit log holds, in order, one CHANGED row per committed change, naming its caller, request_id,
token and move, followed by one for each other token the change moved (a bump's victim, promoted tokens, the
token a CallNext completed), and one DENIED row per denied attempt; ListAuditEntries (all pages, by token, by a
time range) answers the table's rows; the table refuses UPDATE and DELETE; and no phone number of the run is
found in the server's whole output or in any audit row, while the same scan finds them in the tokens table."""

from __future__ import annotations

import collections
import datetime as dt
import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest
import sqlalchemy
from google.protobuf import duration_pb2
from google.protobuf.message import Message

from opd_grpc._gen.opd.v1 import opd_pb2 as pb
from opd_grpc._gen.opd.v1 import opd_pb2_grpc, test_clock_pb2, test_clock_pb2_grpc
from opd_grpc.api.convert import timestamp
from tests.support import DAY, RpcFailure, add_key, bearer, failure, fresh_database

STEPS = 400
SEED = 5
START = dt.datetime(2030, 1, 7, 8, 30, tzinfo=dt.timezone.utc)  # the first slot's no-show grace ends mid-run
TICK = dt.timedelta(minutes=10)  # the admin moves the clock this far every TICK_STEPS steps
TICK_STEPS = 25
SLOTS = (("09:00", "10:00", 3), ("10:00", "11:00", 3), ("11:00", "12:30", 4))
SOURCES = (pb.SOURCE_PAID_PRIORITY, pb.SOURCE_FOLLOW_UP, pb.SOURCE_ONLINE_BOOKING, pb.SOURCE_WALK_IN)
ROLES = ("admin", "reception", "triage", "doctor", "display")
DENIED_CODES = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
CLOCK_METHODS = ("SetTime", "AdvanceTime", "GetTime")
AUDIT_COLUMNS = ("entry_id", "occurred_at", "outcome", "key_id", "role", "method", "request_id", "token_id",
                 "from_status", "to_status", "reason")
_LISTENING = re.compile(r"opd-grpc listening on (\S+):(\d+) ")
_SEPARATORS = re.compile(r"[\s\-.()+]")


def phone(n: int) -> str:
    """Patient n's phone: distinct for every patient, and unlike anything else a log holds."""
    return f"+91 98450 1{n:04d}"


def phones_in(text: str, phones: set[str]) -> set[str]:
    """The phones of `phones` found in `text`, however written: as given, as digits only, with the country code
    or without, with spaces, dashes or dots between the digits."""
    squeezed = _SEPARATORS.sub("", text)
    return {p for p in phones if p in text or re.sub(r"\D", "", p)[-10:] in squeezed}


def status_name(status: int) -> str:
    return pb.Status.Name(status).removeprefix("STATUS_") if status else ""


def key_id(key: str) -> str:
    return key.split("_")[1]


@dataclass
class Expected:
    """An audit row the run must have made: a committed change or a denied attempt, in the order made."""

    outcome: str  # CHANGED or DENIED
    method: str
    key_id: str
    role: str
    request_id: str = ""
    request: Message | None = None
    answer: Message | None = None
    before: str = ""  # a call about one token: its status just before the call


@dataclass
class Decided:
    """A request with a request_id that the engine answered (OK or refused): sent again, it changes nothing."""

    method: str
    role: str
    request: Message
    answer: Message | RpcFailure


class ServerOutput:
    """`python -m opd_grpc` as a child process, with all its stdout and stderr kept in a file."""

    def __init__(self, database_url: str, log_path: Path):
        self.log_path = log_path
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("OPD_")}, "PYTHONUNBUFFERED": "1",
               "OPD_DATABASE_URL": database_url, "OPD_LISTEN": "127.0.0.1:0", "OPD_TEST_CLOCK": "1",
               "OPD_METRICS_LISTEN": "", "OPD_AUDITED_DENIALS_PER_PEER": "0"}  # one row per denial, however fast
        with log_path.open("w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "opd_grpc"], env=env, stdout=out,
                                         stderr=subprocess.STDOUT)
        self.address = self._wait_listening(30.0)

    def _wait_listening(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if match := _LISTENING.search(self.log_path.read_text()):
                return f"{match[1]}:{match[2]}"
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.proc.kill()
        self.proc.wait()
        raise AssertionError(f"the server did not start:\n{self.log_path.read_text()}")

    def stop(self) -> int:
        """SIGTERM; answers the exit code once the server has flushed its output and exited."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def text(self) -> str:
        return self.log_path.read_text()


class Clinic:
    """The random run: every call it makes is counted, and every audit row it must cause is in `expected`."""

    def __init__(self, channel: grpc.Channel, keys: dict[str, str], rng: random.Random):
        self.stub = opd_pb2_grpc.OPDTokenServiceStub(channel)
        self.clock = test_clock_pb2_grpc.TestClockServiceStub(channel)
        self.keys = keys
        self.rng = rng
        self.calls = 0
        self.expected: list[Expected] = []
        self.decided: dict[str, Decided] = {}
        self.refusals: collections.Counter[str] = collections.Counter()
        self.denials: collections.Counter[str] = collections.Counter()
        self.replays = 0
        self.doctors: list[str] = []
        self.booked: list[tuple[str, pb.Patient]] = []  # (doctor_id, patient) of every committed allocation
        self.phones: set[str] = set()  # every phone the run sent, in any call
        self.patients = 0
        self.clock_marks: list[dt.datetime] = []  # the test clock's time after each move

    # ---- calls ----

    def invoke(self, method: str, request: Message, metadata: tuple = ()) -> Message | RpcFailure:
        """One call; a server fault fails the run."""
        self.calls += 1
        stub = self.clock if method in CLOCK_METHODS else self.stub
        try:
            return getattr(stub, method)(request, metadata=metadata, timeout=30)
        except grpc.RpcError as error:
            refusal = failure(error)
            assert refusal.code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (method, refusal)
            return refusal

    def read(self, method: str, request: Message) -> Any:
        """A read with the display key (reads are never audited)."""
        answer = self.invoke(method, request, bearer(self.keys["display"]))
        assert not isinstance(answer, RpcFailure), (method, answer)
        return answer

    def change(self, method: str, request: Message, role: str, before: str = "") -> Message | RpcFailure:
        """A state-changing call by a role that may make it: committed (one CHANGED row) or refused (none)."""
        answer = self.invoke(method, request, bearer(self.keys[role]))
        assert not (isinstance(answer, RpcFailure) and answer.code in DENIED_CODES), (method, role, answer)
        request_id = getattr(request, "request_id", "")
        assert request_id not in self.decided, "a new request needs a new request_id"
        if request_id:
            self.decided[request_id] = Decided(method, role, request, answer)
        if isinstance(answer, RpcFailure):
            self.refusals[answer.reason] += 1
        else:
            self.expected.append(Expected("CHANGED", method, key_id(self.keys[role]), role, request_id, request,
                                          answer, before))
        return answer

    def deny(self, method: str, request: Message, metadata: tuple, code: grpc.StatusCode, role: str = "") -> None:
        """A call refused for its key (no role known: UNAUTHENTICATED) or its role (PERMISSION_DENIED)."""
        answer = self.invoke(method, request, metadata)
        assert isinstance(answer, RpcFailure) and answer.code == code, (method, role, answer)
        self.denials[answer.code.name] += 1
        self.expected.append(Expected("DENIED", method, key_id(self.keys[role]) if role else "", role))

    def new_request_id(self) -> str:
        """A UUID drawn from the run's seed, so that a seed replays the same run."""
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def request_id(self) -> str:
        return self.new_request_id() if self.rng.random() < 0.4 else ""

    def new_patient(self) -> pb.Patient:
        self.patients += 1
        n = self.patients
        mrn = f"MRN{n:06d}" if self.rng.random() < 0.3 else ""
        patient = pb.Patient(name=f"Patient {n}", phone=phone(n), age=20 + n % 60, mrn=mrn,
                             gender=pb.GENDER_FEMALE if n % 2 else pb.GENDER_MALE)
        self.phones.add(patient.phone)
        return patient

    def tokens(self, doctor_id: str) -> list[pb.Token]:
        return list(self.read("ListTokens", pb.ListTokensRequest(doctor_id=doctor_id, date=DAY,
                                                                 page_size=500)).tokens)

    # ---- the clinic's moves ----

    def open_clinic(self) -> None:
        self.set_time(START)
        for name in ("Dr Asha Rao", "Dr Vikram Shah", "Dr Meera Iyer"):
            self.create_doctor(name)

    def create_doctor(self, name: str) -> None:
        answer = self.change("CreateDoctor", pb.CreateDoctorRequest(name=name, specialization="General Medicine",
                                                                    request_id=self.request_id()), "admin")
        doctor_id = answer.doctor.doctor_id
        specs = [pb.SlotSpec(date=DAY, start_time=s, end_time=e, max_capacity=c, consultation_minutes=5)
                 for s, e, c in SLOTS]
        self.change("CreateSlots", pb.CreateSlotsRequest(doctor_id=doctor_id, slots=specs,
                                                         request_id=self.request_id()), "admin")
        self.doctors.append(doctor_id)

    def set_time(self, when: dt.datetime) -> None:
        answer = self.invoke("SetTime", test_clock_pb2.SetTimeRequest(time=timestamp(when)),
                             bearer(self.keys["admin"]))
        self.clock_marks.append(answer.now.ToDatetime(tzinfo=dt.timezone.utc))

    def advance_clock(self) -> None:
        answer = self.invoke("AdvanceTime", test_clock_pb2.AdvanceTimeRequest(
            duration=duration_pb2.Duration(seconds=int(TICK.total_seconds()))), bearer(self.keys["admin"]))
        self.clock_marks.append(answer.now.ToDatetime(tzinfo=dt.timezone.utc))

    def allocate(self, patient: pb.Patient | None = None, doctor_id: str = "") -> None:
        doctor_id = doctor_id or self.rng.choice(self.doctors)
        patient = patient or self.new_patient()
        request = pb.AllocateTokenRequest(patient=patient, doctor_id=doctor_id, date=DAY,
                                          preferred_slot_time=self.rng.choice(["09:00", "10:00", "11:00", ""]),
                                          source=self.rng.choice(SOURCES), flexible=self.rng.random() < 0.3,
                                          request_id=self.request_id())
        if not isinstance(self.change("AllocateToken", request, "reception"), RpcFailure):
            self.booked.append((doctor_id, patient))

    def allocate_again(self) -> None:
        """An earlier patient once more with the same doctor: refused while their token is active."""
        if self.booked:
            self.allocate(*reversed(self.rng.choice(self.booked)))

    def emergency(self) -> None:
        doctor_id, patient = self.rng.choice(self.doctors), self.new_patient()
        if self.rng.random() < 0.5:
            method, request = "AllocateEmergency", pb.AllocateEmergencyRequest(
                patient=patient, doctor_id=doctor_id, date=DAY, request_id=self.request_id())
        else:
            method, request = "AllocateToken", pb.AllocateTokenRequest(
                patient=patient, doctor_id=doctor_id, date=DAY, source=pb.SOURCE_EMERGENCY,
                request_id=self.request_id())
        if not isinstance(self.change(method, request, "triage"), RpcFailure):
            self.booked.append((doctor_id, patient))

    def token_move(self, method: str, role: str, likely: int) -> None:
        """A move on one of a doctor's tokens: mostly one whose status allows it, sometimes any (illegal moves)."""
        tokens = self.tokens(self.rng.choice(self.doctors))
        if not tokens:
            return
        fitting = [t for t in tokens if t.status == likely]
        token = self.rng.choice(fitting if fitting and self.rng.random() < 0.75 else tokens)
        fields: dict[str, Any] = {"token_id": token.token_id, "request_id": self.request_id()}
        if method == "CancelToken":  # free text from the desk: the audit row keeps it, but not the patient
            fields["reason"] = f"{token.patient.name} rang from {token.patient.phone}"
        request = getattr(pb, f"{method}Request")(**fields)
        self.change(method, request, role, before=status_name(token.status))

    def call_next(self) -> None:
        self.change("CallNext", pb.CallNextRequest(doctor_id=self.rng.choice(self.doctors), date=DAY,
                                                   request_id=self.request_id()), "doctor")

    def capacity(self) -> None:
        slots = self.read("ListSlots", pb.ListSlotsRequest(doctor_id=self.rng.choice(self.doctors), date=DAY)).slots
        slot = self.rng.choice(slots)
        self.change("UpdateSlotCapacity", pb.UpdateSlotCapacityRequest(
            slot_id=slot.slot_id, max_capacity=self.rng.randint(1, 5), request_id=self.request_id()), "admin")

    def unknown_token(self) -> None:
        method, role = self.rng.choice([("CheckInToken", "reception"), ("CancelToken", "reception"),
                                        ("CompleteToken", "doctor"), ("MarkNoShow", "doctor")])
        request = getattr(pb, f"{method}Request")(token_id=f"{self.doctors[0]}-{DAY.replace('-', '')}-T9999")
        self.change(method, request, role)

    def denied(self) -> None:
        """A call refused for its key or role; now and then the caller who may make it follows with the same
        request_id, which the denied attempt must not have used up."""
        doctor_id, patient = self.rng.choice(self.doctors), self.new_patient()
        booking = pb.AllocateTokenRequest(patient=patient, doctor_id=doctor_id, date=DAY, source=pb.SOURCE_WALK_IN,
                                          request_id=self.new_request_id())
        case = self.rng.randrange(8)
        if case == 0:
            self.deny("AllocateToken", booking, (), grpc.StatusCode.UNAUTHENTICATED)
        elif case == 1:
            forged = f"opd_{key_id(self.keys['reception'])}_{'A' * 43}"
            self.deny("AllocateToken", booking, bearer(forged), grpc.StatusCode.UNAUTHENTICATED)
        elif case == 2:
            self.deny("GetToken", pb.GetTokenRequest(token_id="x"), (("authorization", f"Basic {patient.phone}"),),
                      grpc.StatusCode.UNAUTHENTICATED)
        elif case == 3:
            self.deny("AllocateToken", booking, bearer(self.keys["doctor"]), grpc.StatusCode.PERMISSION_DENIED,
                      "doctor")
        elif case == 4:
            emergency = pb.AllocateTokenRequest()
            emergency.CopyFrom(booking)
            emergency.source = pb.SOURCE_EMERGENCY
            self.deny("AllocateToken", emergency, bearer(self.keys["reception"]), grpc.StatusCode.PERMISSION_DENIED,
                      "reception")
            booking = emergency
        elif case == 5:
            self.deny("AllocateEmergency", pb.AllocateEmergencyRequest(patient=patient, doctor_id=doctor_id, date=DAY),
                      bearer(self.keys["display"]), grpc.StatusCode.PERMISSION_DENIED, "display")
        elif case == 6:
            self.deny("ListAuditEntries", pb.ListAuditEntriesRequest(), bearer(self.keys["reception"]),
                      grpc.StatusCode.PERMISSION_DENIED, "reception")
        else:
            self.deny("AdvanceTime", test_clock_pb2.AdvanceTimeRequest(duration=duration_pb2.Duration(seconds=60)),
                      bearer(self.keys["doctor"]), grpc.StatusCode.PERMISSION_DENIED, "doctor")
        if case in (0, 1, 3, 4) and self.rng.random() < 0.5:
            role = "triage" if booking.source == pb.SOURCE_EMERGENCY else "reception"
            if not isinstance(self.change("AllocateToken", booking, role), RpcFailure):
                self.booked.append((doctor_id, patient))

    def replay(self) -> None:
        """A request sent again: the same body gets the first answer and changes nothing; another body under the
        same request_id is refused."""
        if not self.decided:
            return
        request_id = self.rng.choice(sorted(self.decided))
        first = self.decided[request_id]
        if self.rng.random() < 0.2:
            other = pb.CallNextRequest(doctor_id=self.rng.choice(self.doctors), date=DAY, request_id=request_id)
            answer = self.invoke("CallNext", other, bearer(self.keys["doctor"]))
            if first.method != "CallNext" or first.request != other:
                assert isinstance(answer, RpcFailure) and answer.reason == "REQUEST_ID_REUSED", answer
                self.refusals[answer.reason] += 1
                return
        else:
            answer = self.invoke(first.method, first.request, bearer(self.keys[first.role]))
        if isinstance(first.answer, RpcFailure):
            assert isinstance(answer, RpcFailure) and (answer.code, answer.reason) == (first.answer.code,
                                                                                        first.answer.reason)
        else:
            assert answer == first.answer, f"a replay of {first.method} did not get the first answer"
            self.replays += 1

    def step(self, number: int) -> None:
        if number and number % TICK_STEPS == 0:
            self.advance_clock()
        move = self.rng.random()
        if move < 0.28:
            self.allocate()
        elif move < 0.33:
            self.allocate_again()
        elif move < 0.38:
            self.emergency()
        elif move < 0.48:
            self.token_move("CheckInToken", "reception", pb.STATUS_CONFIRMED)
        elif move < 0.53:
            self.token_move("CancelToken", "reception", pb.STATUS_WAITLISTED)
        elif move < 0.61:
            self.call_next()
        elif move < 0.66:
            self.token_move("CompleteToken", "doctor", pb.STATUS_CALLED)
        elif move < 0.71:
            self.token_move("MarkNoShow", "doctor", pb.STATUS_CONFIRMED)
        elif move < 0.74:
            self.capacity()
        elif move < 0.75:
            self.create_doctor(f"Dr Locum {number}")
        elif move < 0.77:
            self.unknown_token()
        elif move < 0.87:
            self.denied()
        else:
            self.replay()

    # ---- the audit log through the API ----

    def audit_pages(self, page_size: int, **filters: Any) -> list[pb.AuditEntry]:
        entries, page_token = [], ""
        while True:
            page = self.invoke("ListAuditEntries", pb.ListAuditEntriesRequest(page_size=page_size,
                                                                              page_token=page_token, **filters),
                               bearer(self.keys["admin"]))
            assert not isinstance(page, RpcFailure), page
            assert len(page.entries) <= page_size
            entries += page.entries
            if not (page_token := page.next_page_token):
                return entries


def row_of(entry: pb.AuditEntry) -> tuple:
    """An entry read through the API, as the table holds it."""
    return (entry.entry_id, entry.occurred_at.ToDatetime(tzinfo=dt.timezone.utc),
            pb.AuditOutcome.Name(entry.outcome).removeprefix("AUDIT_OUTCOME_"), entry.key_id, entry.role,
            entry.method, entry.request_id, entry.token_id, status_name(entry.from_status),
            status_name(entry.to_status), entry.reason)


def table_rows(database_url: str, table: str, order: str) -> list[Any]:
    engine = sqlalchemy.create_engine(database_url, poolclass=sqlalchemy.NullPool)
    try:
        with engine.connect() as conn:
            return conn.execute(sqlalchemy.text(f"SELECT * FROM {table} ORDER BY {order}")).all()
    finally:
        engine.dispose()


def audit_rows(database_url: str) -> list[tuple]:
    rows = table_rows(database_url, "audit_log", "entry_id")
    return [tuple(dt.datetime.fromisoformat(r.occurred_at) if c == "occurred_at" else getattr(r, c)
                  for c in AUDIT_COLUMNS) for r in rows]


def check_change_row(row: dict[str, Any], made: Expected) -> None:
    """A CHANGED row against the call's request and answer: the token it names, its move, and the other moves
    (bumps, promotions, a completion) or what the call made, in the reason."""
    answer, method = made.answer, made.method
    where = f"{method} {made.request} → {answer}: {row}"
    if method == "CreateDoctor":
        assert (row["token_id"], row["to_status"]) == ("", "") and answer.doctor.doctor_id in row["reason"], where
        return
    if method == "CreateSlots":
        assert row["token_id"] == "" and all(s.slot_id in row["reason"] for s in answer.slots), where
        return
    if method == "UpdateSlotCapacity":
        assert row["token_id"] == "" and all(t.token_id in row["reason"] for t in answer.promoted), where
        return
    assert row["token_id"] == answer.token.token_id, where
    assert row["to_status"] == status_name(answer.token.status), where
    named = [t.token_id for t in getattr(answer, "promoted", ())]
    if method in ("AllocateToken", "AllocateEmergency"):
        assert row["from_status"] == "" and row["to_status"] in ("CONFIRMED", "WAITLISTED"), where
        if answer.HasField("bumped_token"):
            named.append(answer.bumped_token.token_id)
    elif method == "CallNext":
        assert (row["from_status"], row["to_status"]) == ("CHECKED_IN", "CALLED"), where
        if answer.HasField("completed_token"):
            named.append(answer.completed_token.token_id)
    else:
        expected_to = {"CheckInToken": "CHECKED_IN", "CancelToken": "CANCELLED", "CompleteToken": "COMPLETED",
                       "MarkNoShow": "NO_SHOW"}[method]
        assert (row["from_status"], row["to_status"]) == (made.before, expected_to), where
        if method == "CancelToken":  # the desk's words, the patient's name and phone in them blanked
            assert row["reason"].startswith("reason given: … … rang from …"), where
    assert all(token_id in row["reason"] for token_id in named), where


def side_moves(made: Expected) -> list[tuple[str, tuple[str, ...], str, str]]:
    """The other tokens a committed change moved, as its answer names them, each with the statuses it may have
    moved from, the status it moved to and its row's reason."""
    answer, moves = made.answer, []
    if made.method in ("AllocateToken", "AllocateEmergency") and answer.HasField("bumped_token"):
        moves.append((answer.bumped_token.token_id, ("CONFIRMED", "CHECKED_IN"), "WAITLISTED",
                      f"BUMPED by {answer.token.token_id}"))
    if made.method == "CallNext" and answer.HasField("completed_token"):
        moves.append((answer.completed_token.token_id, ("CALLED",), "COMPLETED", "COMPLETED"))
    freed_by = f" by {answer.token.token_id}" if made.method in ("CancelToken", "MarkNoShow") else ""
    moves += [(t.token_id, ("WAITLISTED",), "CONFIRMED", f"PROMOTED{freed_by}") for t in getattr(answer, "promoted", ())]
    return moves


@pytest.fixture
def database(tmp_path: Path) -> Iterator[str]:
    with fresh_database(tmp_path) as url:
        yield url


def test_audit_log_has_one_row_per_change_and_denial_and_no_phone_anywhere(database: str, tmp_path: Path):
    keys = {role: add_key(database, role, f"{role} desk") for role in ROLES}
    server = ServerOutput(database, tmp_path / "server.log")
    try:
        with grpc.insecure_channel(server.address) as channel:
            clinic = Clinic(channel, keys, random.Random(SEED))
            clinic.open_clinic()
            for number in range(STEPS):
                clinic.step(number)
            stored = audit_rows(database)
            check_audit_rows(clinic, stored)
            check_audit_api(clinic, stored)
    finally:
        exit_code = server.stop()
    assert exit_code == 0, server.text()
    output = server.text()
    assert audit_rows(database) == stored, "the audit log changed after the run"
    check_no_phone(clinic, output, stored, database)
    check_append_only(database, stored)
    access_lines = [line for line in output.splitlines() if '"logger": "opd_grpc.access"' in line]
    assert len(access_lines) == clinic.calls, "every call writes one access-log line, all flushed by the stop"
    changes = sum(1 for e in clinic.expected if e.outcome == "CHANGED")
    print(f"calls={clinic.calls} changes={changes} denied={sum(clinic.denials.values())} rows={len(stored)} "
          f"replays={clinic.replays} refusals={dict(clinic.refusals)}")


def check_audit_rows(clinic: Clinic, stored: list[tuple]) -> None:
    """The run's rows (not the keys' own, key_id "tests") are the changes and denials made, in order: a change's
    own row, then one for each other token it moved; a denial's row."""
    rows = [dict(zip(AUDIT_COLUMNS, r)) for r in stored if r[3] != "tests"]
    made = clinic.expected
    changes = [e for e in made if e.outcome == "CHANGED"]
    assert sum(1 for r in rows if r["outcome"] == "DENIED") == sum(clinic.denials.values())
    assert len(rows) == len(made) + sum(len(side_moves(e)) for e in changes)
    remaining = iter(rows)
    for expected in made:
        row = next(remaining)
        who = (row["outcome"], row["method"], row["key_id"], row["role"])
        assert who == (expected.outcome, expected.method, expected.key_id, expected.role), (row, expected)
        if expected.outcome == "CHANGED":
            assert row["request_id"] == expected.request_id, row
            check_change_row(row, expected)
            for token_id, before, after, reason in side_moves(expected):
                side = next(remaining)
                assert side["outcome"] == "CHANGED" and side["method"] == expected.method, (side, expected)
                assert (side["key_id"], side["request_id"]) == (row["key_id"], row["request_id"]), side
                assert (side["token_id"], side["to_status"], side["reason"]) == (token_id, after, reason), side
                assert side["from_status"] in before, side
        else:
            assert row["token_id"] == row["from_status"] == row["to_status"] == "", row
    # the run reached every kind of row it is meant to check, so the checks above ran
    methods = {e.method for e in changes}
    assert methods >= {"CreateDoctor", "CreateSlots", "UpdateSlotCapacity", "AllocateToken", "AllocateEmergency",
                       "CheckInToken", "CancelToken", "CallNext", "CompleteToken", "MarkNoShow"}, methods
    assert any(e.answer.HasField("bumped_token") for e in changes if e.method.startswith("Allocate"))
    assert any(getattr(e.answer, "promoted", ()) for e in changes)
    assert clinic.replays and clinic.refusals["REQUEST_ID_REUSED"] and clinic.refusals["PATIENT_ALREADY_HAS_TOKEN"]
    assert set(clinic.denials) == {"UNAUTHENTICATED", "PERMISSION_DENIED"}


def check_audit_api(clinic: Clinic, stored: list[tuple]) -> None:
    """ListAuditEntries answers the table's rows: all of them page by page, one token's, a time range's."""
    assert [row_of(e) for e in clinic.audit_pages(page_size=37)] == stored
    by_token = collections.Counter(r[7] for r in stored if r[7])
    sample = [t for t, _ in by_token.most_common(5)] + clinic.rng.sample(sorted(by_token), 5)
    for token_id in sample:
        assert [row_of(e) for e in clinic.audit_pages(page_size=3, token_id=token_id)] == [
            r for r in stored if r[7] == token_id]
    marks = clinic.clock_marks
    start, end = marks[len(marks) // 3], marks[2 * len(marks) // 3]
    in_range = [r for r in stored if start <= r[1] < end]
    assert 0 < len(in_range) < len(stored)
    answered = clinic.audit_pages(page_size=50, start_time=timestamp(start), end_time=timestamp(end))
    assert [row_of(e) for e in answered] == in_range


def check_no_phone(clinic: Clinic, output: str, stored: list[tuple], database: str) -> None:
    """No phone the run sent is in the server's output or in any text of the audit log; the same scan finds the
    booked patients' phones in the tokens table, so it is able to see one."""
    assert phones_in(output, clinic.phones) == set(), "phone numbers in the server's output"
    audit_text = "\n".join(str(value) for row in stored for value in row)
    assert phones_in(audit_text, clinic.phones) == set(), "phone numbers in the audit log"
    tokens_text = "\n".join(str(value) for row in table_rows(database, "tokens", "token_id") for value in row)
    assert phones_in(tokens_text, clinic.phones) == {p.phone for _, p in clinic.booked}


def check_append_only(database: str, stored: list[tuple]) -> None:
    """Raw SQL cannot rewrite or remove an audit row, nor replace one with an insert naming its entry_id."""
    engine = sqlalchemy.create_engine(database, poolclass=sqlalchemy.NullPool)
    columns = ", ".join(AUDIT_COLUMNS)
    forged = f"({stored[1][0]}, '2030-01-07T09:00:00+00:00', 'CHANGED', '', '', 'GetToken', '', '', '', '', 'nothing')"
    replace = (f"INSERT OR REPLACE INTO audit_log ({columns}) VALUES {forged}" if engine.dialect.name == "sqlite" else
               f"INSERT INTO audit_log ({columns}) VALUES {forged} ON CONFLICT (entry_id) DO UPDATE SET reason = 'x'")
    try:
        for statement in ("UPDATE audit_log SET reason = 'rewritten'", "DELETE FROM audit_log",
                          f"DELETE FROM audit_log WHERE entry_id = {stored[-1][0]}", replace):
            with pytest.raises(sqlalchemy.exc.DBAPIError, match="append-only"):
                with engine.begin() as conn:
                    conn.execute(sqlalchemy.text(statement))
    finally:
        engine.dispose()
    assert audit_rows(database) == stored
