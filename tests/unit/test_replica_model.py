"""The replica checker's sequential model (`simulation.replica_checks.SequentialDay`) against hand-worked cases of
SPEC §4–8: it is written from the contract, so it must not merely agree with the engine."""

from __future__ import annotations

import datetime as dt

import pytest

from opd_grpc._gen.opd.v1 import opd_pb2 as pb
from simulation.replica_checks import Refused, SequentialDay

DAY = "DOC001-20300107"


def at(hhmm: str) -> dt.datetime:
    return dt.datetime.fromisoformat(f"2030-01-07T{hhmm}").replace(tzinfo=dt.timezone.utc)


def clinic(capacity: int = 2, max_waitlist: int = 5) -> SequentialDay:
    day = SequentialDay(grace_minutes=15, max_waitlist=max_waitlist)
    day.create_slots([pb.Slot(slot_id=f"{DAY}-0900", date="2030-01-07", start_time="09:00", end_time="10:00",
                              max_capacity=capacity, consultation_minutes=1)])
    day.events = []
    return day


def book(day: SequentialDay, patient: str, source: str, now: str = "08:00") -> dict:
    return day.allocate(DAY, patient, source, "", False, at(now))


def test_an_emergency_bumps_the_latest_of_the_lowest_priority_and_the_victim_heads_its_class() -> None:
    day = clinic()
    book(day, "a", "WALK_IN")
    book(day, "b", "WALK_IN", "08:01")
    book(day, "c", "ONLINE_BOOKING", "08:02")  # waitlisted
    day.events = []

    answer = book(day, "e", "EMERGENCY", "08:03")

    assert answer["token"][:4] == (f"{DAY}-T4", 4, f"{DAY}-0900", "CONFIRMED")
    assert answer["bumped"][0] == f"{DAY}-T2"  # the later walk-in
    assert sorted(day.events) == sorted([("BUMPED", f"{DAY}-T2", 2, f"{DAY}-0900", "WAITLISTED", f"{DAY}-T4"),
                                         ("ALLOCATED", f"{DAY}-T4", 4, f"{DAY}-0900", "CONFIRMED", "")])
    assert [t.number for t in day.waitlist(f"{DAY}-0900")] == [3, 2]  # online (4) before walk-in (5)


def test_a_cancel_promotes_the_waitlist_head_in_the_same_change() -> None:
    day = clinic()
    for n, source in enumerate(["FOLLOW_UP", "WALK_IN", "WALK_IN", "PAID_PRIORITY"]):
        book(day, f"p{n}", source)
    day.events = []

    answer = day.cancel(f"{DAY}-T1", at("08:10"))

    assert [v[0] for v in answer["promoted"]] == [f"{DAY}-T4"]  # paid priority first
    assert day.events == [("CANCELLED", f"{DAY}-T1", 1, f"{DAY}-0900", "CANCELLED", ""),
                          ("PROMOTED", f"{DAY}-T4", 4, f"{DAY}-0900", "CONFIRMED", f"{DAY}-T1")]
    assert day.view(day.tokens[f"{DAY}-T3"])[5] == 1  # now first on the waitlist


def test_no_show_waits_for_the_grace_period_after_the_estimated_time() -> None:
    day = clinic()
    book(day, "a", "WALK_IN")
    book(day, "b", "WALK_IN")  # place 2: estimated 09:01
    with pytest.raises(Refused) as refused:
        day.mark_no_show(f"{DAY}-T2", at("09:15"))
    assert (refused.value.code, refused.value.reason) == ("FAILED_PRECONDITION", "GRACE_PERIOD_NOT_ELAPSED")
    assert day.mark_no_show(f"{DAY}-T2", at("09:16"))["token"][3] == "NO_SHOW"


def test_call_next_takes_the_best_checked_in_and_completes_the_one_called_before() -> None:
    day = clinic(capacity=3)
    for n, source in enumerate(["WALK_IN", "FOLLOW_UP", "ONLINE_BOOKING"]):
        book(day, f"p{n}", source)
    for n in (1, 3):
        day.check_in(f"{DAY}-T{n}", at("08:30"))

    first = day.call_next(at("09:00"))
    second = day.call_next(at("09:05"))

    assert (first["token"][0], first["completed"]) == (f"{DAY}-T3", None)  # online (4) before walk-in (5)
    assert (second["token"][0], second["completed"][:4]) == (f"{DAY}-T1", (f"{DAY}-T3", 3, f"{DAY}-0900",
                                                                           "COMPLETED"))
    with pytest.raises(Refused, match="QUEUE_EMPTY"):
        day.call_next(at("09:10"))
    assert day.holders(f"{DAY}-0900") == 3  # a completed patient keeps the seat (SPEC §1)


def test_refusals_change_nothing() -> None:
    day = clinic(capacity=1, max_waitlist=1)
    book(day, "a", "WALK_IN")
    book(day, "b", "WALK_IN")
    day.events = []
    for call, reason in ((lambda: book(day, "a", "FOLLOW_UP"), "PATIENT_ALREADY_HAS_TOKEN"),
                         (lambda: book(day, "c", "WALK_IN"), "WAITLIST_FULL"),
                         (lambda: day.check_in(f"{DAY}-T2", at("08:00")), "ILLEGAL_STATE_TRANSITION"),
                         (lambda: day.set_capacity(f"{DAY}-0900", 0, at("08:00"), 1440), "CAPACITY_BELOW_SEAT_HOLDERS"),
                         (lambda: day.cancel(f"{DAY}-T9", at("08:00")), "TOKEN_NOT_FOUND")):
        with pytest.raises(Refused, match=reason):
            call()
    assert day.cancel(f"{DAY}-T1", at("08:00"), dry=True) == {}
    assert (day.events, day.last_number, [t.status for t in day.tokens.values()]) == ([], 2, ["CONFIRMED",
                                                                                              "WAITLISTED"])
