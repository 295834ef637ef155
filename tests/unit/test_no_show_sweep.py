"""AUTO_NO_SHOW's sweep date (SPEC §6): a restarted server goes on from where the last pass got to, instead of
loading and locking again every past day that still holds a confirmed token it leaves alone (a patient promoted
after the sitting), and still catches up on the days it was down for. The engine on a real SQLite file."""

from __future__ import annotations

import contextlib
import datetime as dt
from pathlib import Path
from typing import Iterator

import pytest
from sqlalchemy import select

from opd_grpc.engine.access import ANONYMOUS
from opd_grpc.engine.clock import TestClock
from opd_grpc.engine.model import Patient, Rules, Source, Status
from opd_grpc.engine.service import AllocateCommand, Call, OPDService, SlotRequest
from opd_grpc.storage import schema
from opd_grpc.storage.store import SqlStore
from opd_grpc.storage.tables import NoShowSweepRow

FIRST = dt.date(2030, 1, 7)
RULES = Rules(average_consultation_minutes=10, no_show_grace_period_minutes=15, max_waitlist_size=10,
              timezone=dt.timezone.utc)


class CountingStore(SqlStore):
    """The real store, counting the write transactions it opens: each doctor-day a pass looks at takes one (the day's
    lock)."""

    writes = 0

    @contextlib.contextmanager
    def unit_of_work(self, write: bool):  # type: ignore[override]
        self.writes += write
        with super().unit_of_work(write) as uow:
            yield uow


@pytest.fixture
def store(tmp_path: Path) -> Iterator[CountingStore]:
    store = CountingStore(f"sqlite:///{tmp_path / 'opd.db'}")
    schema.prepare(store.engine)
    try:
        yield store
    finally:
        store.close()


def at(date: dt.date, hour: int) -> dt.datetime:
    return dt.datetime.combine(date, dt.time(hour), dt.timezone.utc)


def book_days(service: OPDService, doctor_id: str, dates: list[dt.date], patients: int) -> list[list[str]]:
    """A slot of one seat on each date, and `patients` bookings in it (the first seated, the rest waitlisted)."""
    service.create_slots(doctor_id, [SlotRequest(d.isoformat(), "09:00", "10:00", 1, 10) for d in dates],
                         Call(ANONYMOUS, "CreateSlots"))
    booked = []
    for date in dates:
        commands = [AllocateCommand(Patient(f"Patient {date} {n}", f"98{date:%m%d}{n:04d}", 30, ""), doctor_id,
                                    date.isoformat(), "", Source.WALK_IN, False) for n in range(patients)]
        booked.append([service.allocate(c, Call(ANONYMOUS, "AllocateToken")).token.token.token_id
                       for c in commands])
    return booked


def passes(service: OPDService, count: int) -> int:
    return sum(service.mark_overdue_no_shows() for _ in range(count))


def swept_to(store: SqlStore) -> str | None:
    with store.engine.connect() as conn:
        return conn.execute(select(NoShowSweepRow.swept_to)).scalar_one()


def test_a_restarted_server_does_not_look_through_the_days_already_swept(store: CountingStore):
    clock = TestClock(at(FIRST, 8))
    service = OPDService(store, clock, RULES)
    doctor_id = service.create_doctor("Dr Sweep", "General Medicine", Call(ANONYMOUS, "CreateDoctor")).doctor_id
    dates = [FIRST + dt.timedelta(days=n) for n in range(25)]  # more than one pass takes
    booked = book_days(service, doctor_id, dates, patients=2)
    clock.set(at(FIRST + dt.timedelta(days=40), 8))
    assert passes(service, 3) == 25  # the seated patient of each day, none of those promoted after it
    assert swept_to(store) == (FIRST + dt.timedelta(days=40)).isoformat()
    assert [service.get_token(waiting).token.status for _, waiting in booked] == [Status.CONFIRMED] * 25

    restarted = OPDService(store, clock, RULES)
    store.writes = 0
    assert passes(restarted, 3) == 0
    assert store.writes == 0  # before the sweep date was kept: 25 days, each loaded and locked again

    # Down for days: the days since the sweep date are caught up on, and only those.
    later = [FIRST + dt.timedelta(days=41), FIRST + dt.timedelta(days=42)]
    clock.set(at(later[0], 8))
    seated = [tokens[0] for tokens in book_days(restarted, doctor_id, later, patients=1)]
    clock.set(at(FIRST + dt.timedelta(days=50), 8))
    after_downtime = OPDService(store, clock, RULES)
    store.writes = 0
    assert passes(after_downtime, 1) == 2
    assert [after_downtime.get_token(t).token.status for t in seated] == [Status.NO_SHOW] * 2
    assert store.writes == 2 + 1  # the two days, and the new sweep date
    assert swept_to(store) == (FIRST + dt.timedelta(days=50)).isoformat()


def test_a_clock_set_back_opens_the_days_after_it_again(store: CountingStore):
    """A test clock set back, then ahead: the sweep date follows it back, so the days booked meanwhile are looked
    at once the clock has moved on."""
    clock = TestClock(at(FIRST + dt.timedelta(days=30), 8))
    service = OPDService(store, clock, RULES)
    doctor_id = service.create_doctor("Dr Sweep", "General Medicine", Call(ANONYMOUS, "CreateDoctor")).doctor_id
    passes(service, 1)
    assert swept_to(store) == (FIRST + dt.timedelta(days=30)).isoformat()
    clock.set(at(FIRST, 8))
    passes(service, 1)
    assert swept_to(store) == FIRST.isoformat()
    [[absent]] = book_days(service, doctor_id, [FIRST], patients=1)
    clock.set(at(FIRST + dt.timedelta(days=30), 8))
    assert passes(OPDService(store, clock, RULES), 1) == 1
    assert service.get_token(absent).token.status is Status.NO_SHOW


def test_a_grace_that_ends_after_midnight_is_marked_after_a_restart_the_next_day(store: CountingStore):
    """The first pass after midnight sweeps to the new date while yesterday's last graces still run; a server
    stopped then and started the day after must still look at that day."""
    clock = TestClock(at(FIRST, 22))
    service = OPDService(store, clock, RULES)
    doctor_id = service.create_doctor("Dr Sweep", "General Medicine", Call(ANONYMOUS, "CreateDoctor")).doctor_id
    service.create_slots(doctor_id, [SlotRequest(FIRST.isoformat(), "23:00", "23:59", 11, 5)],
                         Call(ANONYMOUS, "CreateSlots"))
    tokens = [service.allocate(AllocateCommand(Patient(f"Patient {n}", f"98000{n:05d}", 30, ""), doctor_id,
                                               FIRST.isoformat(), "", Source.WALK_IN, False),
                               Call(ANONYMOUS, "AllocateToken")).token for n in range(11)]
    late = tokens[-1]
    assert late.estimated_time == at(FIRST, 23) + dt.timedelta(minutes=50)  # due 00:05 the next day
    clock.set(at(FIRST + dt.timedelta(days=1), 0) + dt.timedelta(seconds=30))
    assert passes(service, 1) == 10
    assert swept_to(store) == (FIRST + dt.timedelta(days=1)).isoformat()
    clock.set(at(FIRST + dt.timedelta(days=2), 8))  # down until the morning after
    assert passes(OPDService(store, clock, RULES), 1) == 1
    assert service.get_token(late.token.token_id).token.status is Status.NO_SHOW
