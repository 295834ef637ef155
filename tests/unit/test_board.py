"""The display board: its model of the queues, built from hand-made WatchQueue updates, and what it draws."""

from __future__ import annotations

import datetime as dt
import io
import threading
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from rich.console import Console

from clients.library import hospital_today
from clients.board import (BoardState, big_number, connection_line, demo_state, follow, main,
                           render, save_picture)
from opd_grpc._gen.opd.v1 import opd_pb2 as pb

pytestmark = pytest.mark.backend_independent

DATE = "2030-01-07"
SLOT_0900 = "DOC001-20300107-0900"
SLOT_1000 = "DOC001-20300107-1000"
NOON = dt.datetime(2030, 1, 7, 12, 0, tzinfo=dt.timezone.utc)
PHONE = "+919876543210"
NAME = "Meera Krishnan"


def token(number: int, status: int, *, slot: str = SLOT_0900, priority: int = 5, minute: int | None = None,
          called_minute: int | None = None) -> pb.Token:
    made = pb.Token(token_id=f"T{number}", token_number=number, doctor_id="DOC001", date=DATE, slot_id=slot,
                    priority=priority, status=status)
    made.created_at.FromDatetime(dt.datetime(2030, 1, 7, 8, number if minute is None else minute,
                                             tzinfo=dt.timezone.utc))
    if called_minute is not None:
        made.called_at.FromDatetime(dt.datetime(2030, 1, 7, 9, called_minute, tzinfo=dt.timezone.utc))
    return made


def snapshot(tokens: list[pb.Token], sequence: int = 10, doctor_id: str = "DOC001") -> pb.WatchQueueResponse:
    return pb.WatchQueueResponse(snapshot=pb.QueueSnapshot(doctor_id=doctor_id, date=DATE, sequence=sequence,
                                                           tokens=tokens))


def event(kind: int, changed: pb.Token, sequence: int) -> pb.WatchQueueResponse:
    return pb.WatchQueueResponse(event=pb.QueueEvent(doctor_id="DOC001", date=DATE, sequence=sequence, kind=kind,
                                                     token=changed))


def numbers(tokens: list[pb.Token]) -> list[int]:
    return [t.token_number for t in tokens]


def morning() -> BoardState:
    """Token 1 done, 2 called, 3-5 checked in, 6 confirmed, 7-8 waitlisted; 9 checked in for the 10:00 slot."""
    state = BoardState(["DOC001"], DATE)
    state.apply(snapshot([
        token(1, pb.STATUS_COMPLETED), token(2, pb.STATUS_CALLED, called_minute=5),
        token(3, pb.STATUS_CHECKED_IN), token(4, pb.STATUS_CHECKED_IN), token(5, pb.STATUS_CHECKED_IN),
        token(6, pb.STATUS_CONFIRMED), token(7, pb.STATUS_WAITLISTED), token(8, pb.STATUS_WAITLISTED),
        token(9, pb.STATUS_CHECKED_IN, slot=SLOT_1000, priority=1),
    ]), NOON)
    return state


def drawn(renderable: object) -> str:
    console = Console(record=True, width=120, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def test_a_snapshot_gives_the_called_token_the_next_in_call_order_and_the_waitlist():
    state = morning()

    assert state.now_calling("DOC001").token_number == 2
    # The 10:00 slot's emergency (priority 1) waits behind every 09:00 token: earliest slot first.
    assert numbers(state.next_up("DOC001", 5)) == [3, 4, 5, 9]
    assert numbers(state.next_up("DOC001", 2)) == [3, 4]
    assert state.waitlist_count("DOC001") == 2
    assert state.last_sequence("DOC001") == 10
    assert state.ready()


def test_events_move_tokens_through_the_day():
    state = morning()

    state.apply(event(pb.EVENT_KIND_CHECKED_IN, token(6, pb.STATUS_CHECKED_IN), 11))
    assert numbers(state.next_up("DOC001")) == [3, 4, 5, 6, 9]

    state.apply(event(pb.EVENT_KIND_BUMPED, token(5, pb.STATUS_WAITLISTED), 12))
    state.apply(event(pb.EVENT_KIND_PROMOTED, token(7, pb.STATUS_CONFIRMED), 13))
    assert numbers(state.next_up("DOC001")) == [3, 4, 6, 9]
    assert state.waitlist_count("DOC001") == 2  # 5 joined, 7 left

    state.apply(event(pb.EVENT_KIND_COMPLETED, token(2, pb.STATUS_COMPLETED), 14))
    assert state.now_calling("DOC001") is None

    state.apply(event(pb.EVENT_KIND_CALLED, token(3, pb.STATUS_CALLED), 15))
    assert state.now_calling("DOC001").token_number == 3
    assert numbers(state.next_up("DOC001")) == [4, 6, 9]
    assert state.last_sequence("DOC001") == 15


def test_a_higher_priority_token_queued_later_goes_first_then_queue_time_then_number():
    state = morning()
    state.apply(event(pb.EVENT_KIND_ALLOCATED, token(10, pb.STATUS_CONFIRMED, priority=2), 11))  # first seen here
    state.apply(event(pb.EVENT_KIND_CHECKED_IN, token(10, pb.STATUS_CHECKED_IN, priority=2), 12))
    # 11 and 12 were queued at the same minute, before 3: queue time beats number, number breaks the tie.
    state.apply(event(pb.EVENT_KIND_CHECKED_IN, token(12, pb.STATUS_CHECKED_IN, minute=1), 13))
    state.apply(event(pb.EVENT_KIND_CHECKED_IN, token(11, pb.STATUS_CHECKED_IN, minute=1), 14))

    assert numbers(state.next_up("DOC001", 10)) == [10, 11, 12, 3, 4, 5, 9]


def test_of_several_called_tokens_the_latest_called_is_shown():
    state = BoardState(["DOC001"], DATE)
    state.apply(snapshot([token(1, pb.STATUS_CALLED, called_minute=9), token(2, pb.STATUS_CALLED, called_minute=3)]))
    assert state.now_calling("DOC001").token_number == 1  # called_at orders a snapshot

    state.apply(event(pb.EVENT_KIND_CALLED, token(2, pb.STATUS_CALLED), 11))
    assert state.now_calling("DOC001").token_number == 2  # then the order of events


def test_a_heartbeat_changes_only_the_time_last_heard():
    state = morning()
    later = NOON + dt.timedelta(seconds=10)
    state.apply(pb.WatchQueueResponse(heartbeat=pb.Heartbeat(latest_sequences={"DOC001": 99})), later)

    assert state.last_heard == later
    assert state.last_sequence("DOC001") == 10
    assert numbers(state.next_up("DOC001")) == [3, 4, 5, 9]


def test_the_board_draws_the_called_number_large_the_next_ones_and_the_waitlist():
    state = morning()
    state.apply(event(pb.EVENT_KIND_CALLED, token(12, pb.STATUS_CALLED), 11))

    text = drawn(render(state, {"DOC001": "Dr. Asha Rao"}, next_count=3))

    assert big_number(12)[1] == "████        ██"  # the glyphs: "1" over "2", two columns apart
    for row in big_number(12):
        assert row in text
    assert "Next  3   4   5" in text and " 9 " not in text  # only three
    assert "Waitlist  2" in text
    assert "DOC001 · Dr. Asha Rao" in text
    assert DATE in text and "live" in text


def test_no_patient_name_or_phone_is_ever_drawn():
    with_patient = token(2, pb.STATUS_CALLED, called_minute=5)
    with_patient.patient.CopyFrom(pb.Patient(name=NAME, phone=PHONE))
    state = BoardState(["DOC001"], DATE)
    state.apply(snapshot([with_patient]))
    state.apply(event(pb.EVENT_KIND_CHECKED_IN, pb.Token(token_id="T3", token_number=3, slot_id=SLOT_0900,
                                                         status=pb.STATUS_CHECKED_IN,
                                                         patient=pb.Patient(name=NAME, phone=PHONE)), 11))

    text = drawn(render(state))

    assert "Next  3" in text
    assert PHONE not in text and "9876543210" not in text and "Meera" not in text
    assert all(not t.HasField("patient") for t in state.doctors["DOC001"].tokens.values())


def test_many_doctors_wrap_three_to_a_row_and_wait_for_their_snapshot():
    state = BoardState([f"DOC00{n}" for n in range(1, 6)], DATE)
    text = drawn(render(state, connection="connecting…"))
    lines = text.splitlines()

    assert sum("DOC001" in line and "DOC002" in line and "DOC003" in line for line in lines) == 1
    assert sum("DOC004" in line and "DOC005" in line for line in lines) == 1
    assert "waiting for the queue" in text and "connecting…" in text
    assert not state.ready()


def test_the_footer_tells_the_last_update_on_the_hospitals_clock():
    """With --timezone Asia/Kolkata on a UTC machine the footer had said 11:14:30 at 16:44:30 in the hospital."""
    state = BoardState(["DOC001"], DATE, ZoneInfo("Asia/Kolkata"))
    state.apply(snapshot([token(4, pb.STATUS_CONFIRMED)]), received_at=NOON)
    console = Console(record=True, width=120, file=io.StringIO())
    console.print(render(state))
    assert "last update 17:30:00" in console.export_text()


def test_the_connection_line_says_reconnecting_once_the_stream_goes_quiet_or_while_the_library_reconnects():
    assert connection_line(None, NOON, 0) == "connecting…"
    assert connection_line(NOON, NOON + dt.timedelta(seconds=12), 0) == "live"
    assert connection_line(NOON, NOON + dt.timedelta(seconds=40), 1) == "reconnecting… (1 reconnect attempt)"
    assert connection_line(NOON, NOON + dt.timedelta(seconds=1), 2) == "live (2 reconnect attempts)"
    # A server restarting: heard a second ago, but the stream is down.
    assert connection_line(NOON, NOON + dt.timedelta(seconds=1), 3, connected=False) == \
        "reconnecting… (3 reconnect attempts)"
    # A server whose heartbeats come every 40 s is not taken for lost after 30 s of quiet.
    assert connection_line(NOON, NOON + dt.timedelta(seconds=60), 0, heartbeat_seconds=40) == "live"


def test_without_a_date_the_board_shows_the_hospitals_today_and_moves_on_at_midnight():
    """The date is the one in the hospital's time zone, not the board machine's: 25 hours apart, these two zones
    never share a date."""
    assert hospital_today(ZoneInfo("Pacific/Kiritimati")) != hospital_today(ZoneInfo("Pacific/Pago_Pago"))
    state = BoardState(["DOC001"], DATE)
    endless = FakeWatch([snapshot([token(4, pb.STATUS_CALLED, called_minute=1)])], then_wait=True)
    console = Console(record=True, width=120, file=io.StringIO())
    midnight = threading.Event()
    threading.Timer(0.3, midnight.set).start()
    follow(endless, state, console, until=midnight.is_set)  # returns at the new day, for main to watch it
    assert state.now_calling("DOC001").token_number == 4


def test_a_board_refuses_a_next_count_that_is_not_positive(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit):
        main(["--next", "-2", "DOC001"])
    assert "-2 is not a positive number" in capsys.readouterr().err


class FakeWatch:
    """What the client library's watch gives: updates (then, if asked, nothing for ever), how often it tried to
    reconnect, and whether it is connected."""

    def __init__(self, updates: list[pb.WatchQueueResponse], then_wait: bool = False):
        self.updates = updates + ([None] if then_wait else [])
        self.reconnects = 1
        self.connected = True
        self.stopped = threading.Event()

    def __iter__(self):
        for update in self.updates:
            if update is None:
                self.stopped.wait()
                return
            yield update


def test_follow_once_draws_the_board_when_every_snapshot_is_in():
    two = BoardState(["DOC001", "DOC002"], DATE)
    stream = FakeWatch([snapshot([token(4, pb.STATUS_CALLED, called_minute=1), token(7, pb.STATUS_CHECKED_IN)]),
                        snapshot([token(8, pb.STATUS_WAITLISTED)], doctor_id="DOC002"),
                        event(pb.EVENT_KIND_CALLED, token(7, pb.STATUS_CALLED), 11)])
    console = Console(record=True, width=120, file=io.StringIO())

    follow(stream, two, console, once=True)

    text = console.export_text()
    assert all(row in text for row in big_number(4))
    assert "Next  7" in text and "Waitlist  1" in text and "1 reconnect attempt" in text
    assert two.last_sequence("DOC001") == 10  # stopped once both snapshots were in, before the event


def test_the_demo_picture_is_written_as_svg(tmp_path: Path):
    state, names = demo_state()
    assert state.now_calling("DOC001").token_number == 12 and "DOC002" in names

    text = save_picture(str(tmp_path / "board.svg"))

    assert (tmp_path / "board.svg").read_text().startswith("<svg")
    assert all(row in text for row in big_number(12))
    assert main(["--demo-svg", str(tmp_path / "again.svg")]) == 0 and (tmp_path / "again.svg").exists()
