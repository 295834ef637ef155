"""The end-of-day report's figures and page, from hand-built GetStats answers, slots and queue events."""

from __future__ import annotations

import datetime as dt
from html.parser import HTMLParser

import pytest

from clients.report import page
from clients.report.figures import DayReport, Mark, Promotions, Segment, Waits, build_report
from opd_grpc._gen.opd.v1 import opd_pb2 as pb

pytestmark = pytest.mark.backend_independent

DATE = "2030-01-07"
UTC = dt.timezone.utc
PRIORITY = {pb.SOURCE_EMERGENCY: 1, pb.SOURCE_PAID_PRIORITY: 2, pb.SOURCE_FOLLOW_UP: 3, pb.SOURCE_ONLINE_BOOKING: 4,
            pb.SOURCE_WALK_IN: 5}
NINE = pb.Slot(slot_id="DOC001-20300107-0900", doctor_id="DOC001", date=DATE, start_time="09:00", end_time="10:00",
               max_capacity=3, consultation_minutes=10)  # 2 seats, raised to 3 at 09:30
TEN = pb.Slot(slot_id="DOC001-20300107-1000", doctor_id="DOC001", date=DATE, start_time="10:00", end_time="11:00",
              max_capacity=1, consultation_minutes=10)
SOURCE_OF = {1: pb.SOURCE_ONLINE_BOOKING, 2: pb.SOURCE_WALK_IN, 3: pb.SOURCE_WALK_IN, 4: pb.SOURCE_FOLLOW_UP,
             5: pb.SOURCE_EMERGENCY, 6: pb.SOURCE_PAID_PRIORITY, 7: pb.SOURCE_WALK_IN, 8: pb.SOURCE_WALK_IN}
SLOT_OF = {**dict.fromkeys((1, 2, 3, 4, 5), NINE), **dict.fromkeys((6, 7, 8), TEN)}
K, S = pb.EventKind, pb.Status


def at(clock: str) -> dt.datetime:
    return dt.datetime.fromisoformat(f"{DATE}T{clock}:00+00:00")


def tid(number: int) -> str:
    return f"DOC001-20300107-T{number}"


# The day, as (HH:MM, kind, token number or a slot, status after, caused by token number). Slot 09:00 (2 seats):
# T1 and T2 get seats, T3 and T4 wait; T5, an emergency, bumps the checked-in walk-in T2; T4 (waitlisted) cancels;
# the capacity is raised to 3 and T2, bumped, is promoted, checks in again and is seen. Slot 10:00 (1 seat): T6
# is a no-show and T7 takes its seat, then cancels and T8 takes it, and is with the doctor when the history ends.
DAY = [
    ("07:00", K.EVENT_KIND_SLOT_CHANGED, NINE, 0, 0),
    ("07:00", K.EVENT_KIND_SLOT_CHANGED, TEN, 0, 0),
    ("08:00", K.EVENT_KIND_ALLOCATED, 1, S.STATUS_CONFIRMED, 0),
    ("08:05", K.EVENT_KIND_ALLOCATED, 2, S.STATUS_CONFIRMED, 0),
    ("08:10", K.EVENT_KIND_WAITLISTED, 3, S.STATUS_WAITLISTED, 0),
    ("08:15", K.EVENT_KIND_WAITLISTED, 4, S.STATUS_WAITLISTED, 0),
    ("08:20", K.EVENT_KIND_ALLOCATED, 6, S.STATUS_CONFIRMED, 0),
    ("08:30", K.EVENT_KIND_WAITLISTED, 7, S.STATUS_WAITLISTED, 0),
    ("08:50", K.EVENT_KIND_CHECKED_IN, 1, S.STATUS_CHECKED_IN, 0),
    ("08:55", K.EVENT_KIND_CHECKED_IN, 2, S.STATUS_CHECKED_IN, 0),
    ("09:00", K.EVENT_KIND_WAITLISTED, 8, S.STATUS_WAITLISTED, 0),
    ("09:05", K.EVENT_KIND_BUMPED, 2, S.STATUS_WAITLISTED, 5),
    ("09:05", K.EVENT_KIND_ALLOCATED, 5, S.STATUS_CONFIRMED, 0),
    ("09:05", K.EVENT_KIND_CHECKED_IN, 5, S.STATUS_CHECKED_IN, 0),
    ("09:10", K.EVENT_KIND_CALLED, 1, S.STATUS_CALLED, 0),
    ("09:12", K.EVENT_KIND_CANCELLED, 4, S.STATUS_CANCELLED, 0),
    ("09:20", K.EVENT_KIND_COMPLETED, 1, S.STATUS_COMPLETED, 0),
    ("09:20", K.EVENT_KIND_CALLED, 5, S.STATUS_CALLED, 0),
    ("09:30", K.EVENT_KIND_SLOT_CHANGED, NINE, 0, 0),
    ("09:30", K.EVENT_KIND_PROMOTED, 2, S.STATUS_CONFIRMED, 0),
    ("09:32", K.EVENT_KIND_CHECKED_IN, 2, S.STATUS_CHECKED_IN, 0),
    ("09:40", K.EVENT_KIND_COMPLETED, 5, S.STATUS_COMPLETED, 0),
    ("09:40", K.EVENT_KIND_CALLED, 2, S.STATUS_CALLED, 0),
    ("09:50", K.EVENT_KIND_COMPLETED, 2, S.STATUS_COMPLETED, 0),
    ("10:20", K.EVENT_KIND_NO_SHOW, 6, S.STATUS_NO_SHOW, 0),
    ("10:20", K.EVENT_KIND_PROMOTED, 7, S.STATUS_CONFIRMED, 6),
    ("10:30", K.EVENT_KIND_CANCELLED, 7, S.STATUS_CANCELLED, 0),
    ("10:30", K.EVENT_KIND_PROMOTED, 8, S.STATUS_CONFIRMED, 7),
    ("10:35", K.EVENT_KIND_CHECKED_IN, 8, S.STATUS_CHECKED_IN, 0),
    ("10:47", K.EVENT_KIND_CALLED, 8, S.STATUS_CALLED, 0),
]


def token(number: int, status: int, booked: str, slot: pb.Slot, source: int) -> pb.Token:
    made = pb.Token(token_id=tid(number), token_number=number, slot_id=slot.slot_id, doctor_id="DOC001", date=DATE,
                    source=source, priority=PRIORITY[source], status=status)
    made.created_at.FromDatetime(at(booked))
    return made


def events_of(day: list[tuple[str, int, object, int, int]], slot_of: dict[int, pb.Slot] = SLOT_OF,
              source_of: dict[int, int] = SOURCE_OF) -> list[pb.QueueEvent]:
    booked: dict[int, str] = {}
    events = []
    for sequence, (clock, kind, about, status, caused_by) in enumerate(day, 1):
        event = pb.QueueEvent(doctor_id="DOC001", date=DATE, sequence=sequence, kind=kind,
                              caused_by_token_id=tid(caused_by) if caused_by else "")
        event.occurred_at.FromDatetime(at(clock))
        if isinstance(about, pb.Slot):
            event.slot_id = about.slot_id
        else:
            assert isinstance(about, int)
            made = token(about, status, booked.setdefault(about, clock), slot_of[about], source_of[about])
            event.token.CopyFrom(made)
            event.slot_id = made.slot_id
        events.append(event)
    return events


def stats() -> pb.DoctorDayStats:
    """What GetStats answers at the end of DAY."""
    return pb.DoctorDayStats(
        doctor_id="DOC001", date=DATE,
        by_status={"STATUS_COMPLETED": 3, "STATUS_CANCELLED": 2, "STATUS_NO_SHOW": 1, "STATUS_WAITLISTED": 1,
                   "STATUS_CALLED": 1},
        by_source={"SOURCE_EMERGENCY": 1, "SOURCE_PAID_PRIORITY": 1, "SOURCE_FOLLOW_UP": 1,
                   "SOURCE_ONLINE_BOOKING": 1, "SOURCE_WALK_IN": 4},
        total_tokens=8, total_capacity=4, seat_holders=4, utilisation=1.0, bumps=1, no_shows=1,
        mean_wait_minutes=(20 + 15 + 45 + 12) / 4)


def report_of(events: list[pb.QueueEvent] | None = None, doctor: pb.Doctor | None = None) -> DayReport:
    """The report of DAY (or of `events`), its slots given out of order."""
    return build_report(DATE, [stats()], {"DOC001": events_of(DAY) if events is None else events},
                        {"DOC001": [TEN, NINE]},
                        {"DOC001": doctor or pb.Doctor(doctor_id="DOC001", name="Dr Asha Rao")})


def test_the_day_counts_bumps_no_shows_cancellations_and_promotions_by_cause() -> None:
    doctor = report_of().doctors[0]

    assert (doctor.bumps, doctor.no_shows, doctor.cancellations) == (1, 1, 2)
    assert doctor.promotions == Promotions(on_cancel=1, on_no_show=1, on_capacity_raise=1)
    assert (doctor.utilisation, doctor.total_tokens, doctor.total_capacity) == (1.0, 8, 4)
    assert doctor.notes == ()


def test_waits_by_source_run_from_the_first_check_in_to_the_call() -> None:
    doctor = report_of().doctors[0]

    # T2 checked in at 08:55, was bumped, promoted, checked in again at 09:32 and called at 09:40: it has waited 45
    # minutes, as GetStats's mean wait counts it.
    assert doctor.waits == (Waits(pb.SOURCE_EMERGENCY, 1, 15.0, 15.0), Waits(pb.SOURCE_ONLINE_BOOKING, 1, 20.0, 20.0),
                            Waits(pb.SOURCE_WALK_IN, 2, 28.5, 45.0))
    minutes = sum(w.called * w.mean_minutes for w in doctor.waits)
    assert minutes / sum(w.called for w in doctor.waits) == doctor.mean_wait_minutes


def test_a_bumped_then_promoted_token_is_drawn_through_every_status_it_had() -> None:
    nine = report_of().doctors[0].slots[0]
    line = next(t for t in nine.tokens if t.token_number == 2)

    assert line.booked_at == at("08:05")
    assert line.status == pb.STATUS_COMPLETED
    assert line.segments == (Segment(S.STATUS_CONFIRMED, at("08:05"), at("08:55")),
                             Segment(S.STATUS_CHECKED_IN, at("08:55"), at("09:05")),
                             Segment(S.STATUS_WAITLISTED, at("09:05"), at("09:30")),
                             Segment(S.STATUS_CONFIRMED, at("09:30"), at("09:32")),
                             Segment(S.STATUS_CHECKED_IN, at("09:32"), at("09:40")),
                             Segment(S.STATUS_CALLED, at("09:40"), at("09:50")))
    assert line.marks == (Mark(K.EVENT_KIND_BUMPED, at("09:05")), Mark(K.EVENT_KIND_PROMOTED, at("09:30")),
                          Mark(K.EVENT_KIND_COMPLETED, at("09:50")))


def test_a_waitlisted_then_cancelled_token_is_one_waitlisted_stretch_ending_in_a_cancel() -> None:
    nine = report_of().doctors[0].slots[0]
    line = next(t for t in nine.tokens if t.token_number == 4)

    assert line.status == pb.STATUS_CANCELLED
    assert line.segments == (Segment(S.STATUS_WAITLISTED, at("08:15"), at("09:12")),)
    assert line.marks == (Mark(K.EVENT_KIND_CANCELLED, at("09:12")),)


def test_each_slot_has_its_tokens_in_number_order_its_seat_holders_over_time_and_its_capacity_changes() -> None:
    report = report_of()
    nine, ten = report.doctors[0].slots

    assert [t.token_number for t in nine.tokens] == [1, 2, 3, 4, 5]
    assert [t.token_number for t in ten.tokens] == [6, 7, 8]
    assert nine.seat_holders == ((at("08:00"), 1), (at("08:05"), 2), (at("09:05"), 1), (at("09:05"), 2),
                                 (at("09:30"), 3))
    assert nine.capacity_changed_at == (at("09:30"),)  # its creation at 07:00 is not a change
    assert ten.capacity_changed_at == ()
    t3 = nine.tokens[2]
    assert t3.segments == (Segment(S.STATUS_WAITLISTED, at("08:10"), None),)  # still waiting when the day ends
    assert (report.starts_at, report.ends_at) == (at("07:00"), at("11:00"))


def test_times_are_shown_in_the_servers_time_zone() -> None:
    kolkata = dt.timezone(dt.timedelta(hours=5, minutes=30))
    report = build_report(DATE, [stats()], {"DOC001": events_of(DAY)}, {"DOC001": [NINE, TEN]}, timezone=kolkata)

    nine = report.doctors[0].slots[0]
    assert nine.starts_at == dt.datetime(2030, 1, 7, 9, 0, tzinfo=kolkata)
    assert nine.tokens[0].booked_at.astimezone(kolkata).hour == 13  # 08:00 UTC
    assert report.starts_at == dt.datetime(2030, 1, 7, 9, 0, tzinfo=kolkata)  # the 09:00 slot, before any event


def test_a_history_shorter_than_getstats_says_so() -> None:
    kept = [e for e in events_of(DAY) if e.kind != K.EVENT_KIND_BUMPED]

    doctor = report_of(kept).doctors[0]

    assert doctor.bumps == 0
    assert len(doctor.notes) == 1
    assert doctor.notes[0].startswith("The event history counts 0 bumps, GetStats 1: part of this day's history")


# ---- the page -------------------------------------------------------------------------------------------------


class Page(HTMLParser):
    """What a test wants from the page: its SVGs, the token rows of each, every src/href, the text, and the
    tables' rows as lists of cell texts."""

    def __init__(self, html: str):
        super().__init__()
        self.svgs: list[dict[str, str | None]] = []
        self.rows: list[list[str]] = []
        self.links: list[str] = []
        self.tags: list[str] = []
        self.text: list[str] = []
        self.table_rows: list[list[str]] = []
        self._cell: list[str] | None = None
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        self.tags.append(tag)
        self.links += [value or "" for name, value in attrs if name in ("src", "href")]
        if tag == "svg":
            self.svgs.append(found)
            self.rows.append([])
        elif tag == "g" and found.get("class") == "token":
            self.rows[-1].append(found["data-token"] or "")
        elif tag == "tr":
            self.table_rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.table_rows[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def test_the_page_is_self_contained_with_one_timeline_per_slot_and_a_row_per_token() -> None:
    html = page.render(report_of())

    parsed = Page(html)
    assert [svg["data-slot-id"] for svg in parsed.svgs] == [NINE.slot_id, TEN.slot_id]
    assert parsed.rows == [["1", "2", "3", "4", "5"], ["6", "7", "8"]]
    assert all(link.startswith("#") for link in parsed.links), parsed.links
    assert "script" not in parsed.tags and "link" not in parsed.tags and "img" not in parsed.tags
    text = " ".join(parsed.text)
    assert "capacity 3, 3 seat holders at the end · capacity changed at 09:30" in text
    assert "3 (on cancel 1, on no-show 1, on capacity raise 1)" in text
    assert ["DOC001 Dr Asha Rao", "8", "4", "4", "100%", "3", "1", "1", "3", "2", "23.0"] in parsed.table_rows
    assert ["walk-in", "4", "2", "28.5", "45.0"] in parsed.table_rows  # waits by source
    assert ("Token 2 (walk-in), booked 08:05, now completed: confirmed 08:05–08:55; checked in 08:55–09:05; "
            "bumped by an emergency 09:05; waitlisted 09:05–09:30; promoted from the waitlist 09:30; confirmed "
            "09:30–09:32; checked in 09:32–09:40; called 09:40–09:50; completed 09:50") in text


def test_the_page_escapes_what_the_server_sent() -> None:
    html = page.render(report_of(doctor=pb.Doctor(doctor_id="DOC001", name="Dr <script>alert(1)</script> & Co",
                                                  specialization='"Skin" <b>')))

    assert "<script>" not in html and "<b>" not in html
    assert "Dr &lt;script&gt;alert(1)&lt;/script&gt; &amp; Co" in html
    assert "script" not in Page(html).tags


def test_a_slot_with_more_tokens_than_fit_draws_the_first_ones_and_says_how_many() -> None:
    many = [("07:00", K.EVENT_KIND_SLOT_CHANGED, NINE, 0, 0)]
    numbers = range(1, page.MAX_ROWS + 21)
    many += [(f"08:{n % 60:02d}", K.EVENT_KIND_WAITLISTED, n, S.STATUS_WAITLISTED, 0) for n in numbers]
    answer = pb.DoctorDayStats(doctor_id="DOC001", date=DATE, total_tokens=len(numbers),
                               by_status={"STATUS_WAITLISTED": len(numbers)}, total_capacity=3)
    events = events_of(many, dict.fromkeys(numbers, NINE), dict.fromkeys(numbers, pb.SOURCE_WALK_IN))

    report = build_report(DATE, [answer], {"DOC001": events}, {"DOC001": [NINE]})
    parsed = Page(page.render(report))

    assert len(report.doctors[0].slots[0].tokens) == page.MAX_ROWS + 20
    assert parsed.svgs[0]["data-tokens"] == str(page.MAX_ROWS + 20)
    assert parsed.rows == [[str(n) for n in range(1, page.MAX_ROWS + 1)]]
    assert f"{page.MAX_ROWS + 20} tokens" in " ".join(parsed.text)
    assert f"the first {page.MAX_ROWS} tokens drawn" in " ".join(parsed.text)
