"""Display boards beside the day (`--boards N`): each a `clients.board.BoardState` fed by its own WatchQueue stream
through the client library, on a thread of its own.

The boards take turns at three roles: one watches every doctor and is cut off mid-day, then resumes after the last
sequences it saw (while it is away, the day goes on); one watches half the doctors and starts once the clinic is
busy; one watches every doctor all day. When the day is over each board must catch up with the server's last
sequence per doctor and show what ListTokens says: the token now called, every checked-in token in CallNext's
order (SPEC §7), and the waitlist count.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import sys
import threading
import time
from dataclasses import dataclass
from typing import Sequence

from clients.board import BoardState
from clients.library import OPDClient, OPDError, Watch
from opd_grpc._gen.opd.v1 import opd_pb2 as pb
from simulation.ledger import when
from simulation.scenario import DayPlan

CATCH_UP_SECONDS = 30.0  # how long the boards may take to show the day's last events once it is over
STOP_SECONDS = 10.0  # how long a cancelled watch's thread may take to end
POLL_SECONDS = 0.02
STARTS_LATE_BY = dt.timedelta(minutes=20)  # after the first slot starts
CUT_OFF_AFTER = dt.timedelta(minutes=60)  # after the first slot starts
CUT_OFF_FOR = dt.timedelta(minutes=10)  # of simulated time, in which the day goes on without the board


@dataclass(frozen=True)
class BoardPlan:
    name: str
    every_doctor: bool  # else the second half of the doctors
    starts_at: dt.datetime | None = None  # None: as soon as the clinic opens
    cut_off_at: dt.datetime | None = None  # its stream is cancelled then, and resumed CUT_OFF_FOR later

    def role(self) -> str:
        if self.cut_off_at is not None:
            return f"cut off {self.cut_off_at:%H:%M}–{self.cut_off_at + CUT_OFF_FOR:%H:%M}"
        if self.starts_at is not None:
            return f"from {self.starts_at:%H:%M}"
        return "all day"


def board_plans(count: int, plan: DayPlan) -> list[BoardPlan]:
    """`count` boards, taking the roles in turn (so that even one board resumes); later rounds start later."""
    first_slot = min(d.slots[0].starts_at for d in plan.doctors)
    roles = (BoardPlan("", every_doctor=True, cut_off_at=first_slot + CUT_OFF_AFTER),
             BoardPlan("", every_doctor=False, starts_at=first_slot + STARTS_LATE_BY),
             BoardPlan("", every_doctor=True))
    plans = []
    for index in range(count):
        role, later = roles[index % len(roles)], dt.timedelta(minutes=5 * (index // len(roles)))
        plans.append(dataclasses.replace(role, name=f"board {index + 1}",
                                         starts_at=role.starts_at and role.starts_at + later,
                                         cut_off_at=role.cut_off_at and role.cut_off_at + later))
    return plans


@dataclass
class BoardsOutcome:
    names: list[str]
    roles: list[str]
    events: list[int]  # events received per board
    resumes: int  # streams started again after a cut-off, from the last sequences
    reconnects: int  # reconnections the client library made by itself
    mismatches: list[str]


class Board:
    """One board: its state, the watch that feeds it and the thread that reads the watch."""

    def __init__(self, plan: BoardPlan, doctor_ids: list[str], date: str):
        self.plan = plan
        self.doctor_ids = doctor_ids
        self.state = BoardState(doctor_ids, date)
        self.events = 0
        self.resumes = 0
        self.reconnects = 0
        self.failure = ""  # why its stream ended before it was stopped
        self.gaps: list[str] = []  # events that did not follow the one before (SPEC §10: no gap, no duplicate)
        self.watch: Watch | None = None
        self.cut_off = False
        self.resume_from: dict[str, int] = {}  # the last sequences seen before the cut-off
        self._last_seen: dict[str, int] = {}  # per doctor, kept across a cut-off: the resume must continue it
        self._thread: threading.Thread | None = None

    @property
    def started(self) -> bool:
        return self.watch is not None or self.cut_off

    def start(self, client: OPDClient, after_sequences: dict[str, int] | None = None) -> None:
        self.watch = client.watch(self.doctor_ids, self.state.date, after_sequences=after_sequences)
        self._thread = threading.Thread(target=self._feed, args=(self.watch,), name=self.plan.name, daemon=True)
        self._thread.start()

    def _feed(self, watch: Watch) -> None:
        try:
            for update in watch:
                kind = update.WhichOneof("update")
                if kind == "snapshot":
                    self._last_seen[update.snapshot.doctor_id] = update.snapshot.sequence
                elif kind == "event":
                    self.events += 1
                    event = update.event
                    after = self._last_seen.get(event.doctor_id)
                    if event.sequence != (after or 0) + 1:
                        self.gaps.append(f"{event.doctor_id}: event {event.sequence} came after "
                                         f"{'no snapshot' if after is None else after}")
                    self._last_seen[event.doctor_id] = event.sequence
                self.state.apply(update)
        except OPDError as error:  # the library gave up; the comparison reports it
            self.failure = f"its stream failed: {error}"

    def stop(self) -> dict[str, int]:
        """Cancels the watch and waits for its thread; answers the last sequence seen per doctor."""
        watch, thread = self.watch, self._thread
        if watch is None or thread is None:
            return {}
        watch.cancel()
        thread.join(STOP_SECONDS)
        if thread.is_alive():
            self.failure = self.failure or f"its stream did not end within {STOP_SECONDS:.0f} s of being cancelled"
        self.reconnects += watch.reconnects
        self.watch = self._thread = None
        return dict(watch.last_sequences)

    def caught_up(self, sequences: dict[str, int]) -> bool:
        return bool(self.failure) or (
            self.state.ready() and all(self.state.last_sequence(d) == sequences.get(d) for d in self.doctor_ids))


class Boards:
    """The boards of a day: `open` when the doctors exist, `minute` after each simulated minute, `finish` at the
    end; a context manager that stops every stream it started, whatever happens."""

    def __init__(self, client: OPDClient, plan: DayPlan, count: int, date: str):
        self.client = client
        self.date = date
        self.plans = board_plans(count, plan)
        self.boards: list[Board] = []

    def __enter__(self) -> Boards:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for board in self.boards:
            board.stop()

    def open(self, doctor_ids: list[str]) -> None:
        half = doctor_ids[len(doctor_ids) // 2:]
        self.boards = [Board(p, list(doctor_ids) if p.every_doctor else half, self.date) for p in self.plans]
        for board in self.boards:
            if board.plan.starts_at is None:
                board.start(self.client)

    def minute(self, now: dt.datetime) -> None:
        for board in self.boards:
            plan = board.plan
            if not board.started and plan.starts_at is not None and plan.starts_at <= now:
                board.start(self.client)
            elif board.watch is not None and not board.resumes and plan.cut_off_at is not None \
                    and plan.cut_off_at <= now:
                board.resume_from = board.stop()
                board.cut_off = True
            elif board.cut_off and plan.cut_off_at is not None and plan.cut_off_at + CUT_OFF_FOR <= now:
                self._resume(board)

    def _resume(self, board: Board) -> None:
        board.cut_off = False
        board.resumes += 1
        board.start(self.client, after_sequences=board.resume_from)

    def finish(self) -> BoardsOutcome:
        """Once the day is over: every board catches up with the server, then shows what ListTokens says."""
        for board in self.boards:
            if board.cut_off:
                self._resume(board)
            elif not board.started:
                board.start(self.client)
        doctor_ids = sorted({d for board in self.boards for d in board.doctor_ids})
        sequences = self._last_sequences(doctor_ids)
        deadline = time.monotonic() + CATCH_UP_SECONDS
        while not all(b.caught_up(sequences) for b in self.boards) and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)
        for board in self.boards:
            board.stop()
        tokens = {d: list(self.client.iter_tokens(d, self.date)) for d in doctor_ids}
        mismatches = []
        for board in self.boards:
            if board.failure:
                mismatches.append(f"{board.plan.name}: {board.failure}")
            mismatches += [f"{board.plan.name}: {gap}" for gap in board.gaps]
            for doctor_id in board.doctor_ids:
                if doctor_id not in sequences:
                    mismatches.append(f"{board.plan.name}: the server sent no snapshot of {doctor_id}")
                    continue
                mismatches += [f"{board.plan.name}: {problem}"
                               for problem in board_mismatches(board.state, doctor_id, sequences[doctor_id],
                                                               tokens[doctor_id])]
        return BoardsOutcome([b.plan.name for b in self.boards], [b.plan.role() for b in self.boards],
                             [b.events for b in self.boards], sum(b.resumes for b in self.boards),
                             sum(b.reconnects for b in self.boards), mismatches)

    def _last_sequences(self, doctor_ids: list[str]) -> dict[str, int]:
        """Each doctor's last sequence, from the snapshots of a fresh stream."""
        sequences: dict[str, int] = {}
        watch = self.client.watch(doctor_ids, self.date, reconnect=False)
        give_up = threading.Timer(CATCH_UP_SECONDS, watch.cancel)
        give_up.start()
        try:
            for update in watch:
                if update.WhichOneof("update") == "snapshot":
                    sequences[update.snapshot.doctor_id] = update.snapshot.sequence
                    if len(sequences) == len(doctor_ids):
                        break
        finally:
            give_up.cancel()
            watch.cancel()
        return sequences


def board_mismatches(state: BoardState, doctor_id: str, last_sequence: int, tokens: Sequence[pb.Token]) -> list[str]:
    """How a board's picture of one doctor differs from the server's: its last sequence, and ListTokens' tokens."""
    problems = []
    if state.last_sequence(doctor_id) != last_sequence:
        problems.append(f"{doctor_id}: the board is at sequence {state.last_sequence(doctor_id)}, "
                        f"the server at {last_sequence}")
    called = [t for t in tokens if t.status == pb.STATUS_CALLED]
    calling = max(called, key=lambda t: when(t.called_at)).token_number if called else None
    shown = state.now_calling(doctor_id)
    if (shown.token_number if shown else None) != calling:
        problems.append(f"{doctor_id}: now calling {_number(shown.token_number if shown else None)}, "
                        f"the server {_number(calling)}")
    waiting = sorted((t for t in tokens if t.status == pb.STATUS_CHECKED_IN),
                     key=lambda t: (t.slot_id, t.priority, when(t.created_at), t.token_number))
    expected_next = [t.token_number for t in waiting]
    shown_next = [t.token_number for t in state.next_up(doctor_id, sys.maxsize)]
    if shown_next != expected_next:
        problems.append(f"{doctor_id}: next {_numbers(shown_next)}, the server {_numbers(expected_next)}")
    waitlisted = sum(1 for t in tokens if t.status == pb.STATUS_WAITLISTED)
    if state.waitlist_count(doctor_id) != waitlisted:
        problems.append(f"{doctor_id}: waitlist {state.waitlist_count(doctor_id)}, the server {waitlisted}")
    return problems


def _number(number: int | None) -> str:
    return "nobody" if number is None else str(number)


def _numbers(numbers: list[int]) -> str:
    return ", ".join(map(str, numbers)) or "nobody"
