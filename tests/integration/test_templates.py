"""Weekly patterns of slots and holidays through a real server: SetSlotTemplate / GetSlotTemplate, ApplySlotTemplate
(every pattern slot on every date of a range, holidays skipped, slots already there left and reported, an overlap
refusing all of them), CreateHoliday / ListHolidays / DeleteHoliday, request_id replays (SPEC §9) and the audit log's
reasons (SPEC §13)."""

from __future__ import annotations

import concurrent.futures
import datetime as dt
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from opd_grpc._gen.opd.v1 import opd_pb2 as pb
from tests.support import (
    DAY, LiveServer, allocate, fresh_database, live_server, make_doctor, make_slots, new_request_id, refused,
)

INVALID, NOT_FOUND, EXISTS, PRECONDITION = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                                            grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION)
MON, TUE, WED, SUN = pb.WEEKDAY_MONDAY, pb.WEEKDAY_TUESDAY, pb.WEEKDAY_WEDNESDAY, pb.WEEKDAY_SUNDAY
WEEK_END = "2030-01-13"  # DAY (2030-01-07) is a Monday: DAY..WEEK_END is one week


def tslot(weekday: int, start: str, end: str, **sizes: int) -> pb.TemplateSlot:
    return pb.TemplateSlot(weekday=weekday, start_time=start, end_time=end, **sizes)


# Mondays 09:00-12:00 (the defaults) and 14:00-16:00 (4 seats of 10 minutes); Wednesdays 09:00-12:00.
WEEKLY = [tslot(WED, "09:00", "12:00"), tslot(MON, "14:00", "16:00", max_capacity=4, consultation_minutes=10),
          tslot(MON, "09:00", "12:00")]


def set_template(live: LiveServer, doctor: str, slots: list[pb.TemplateSlot], **kw: Any) -> pb.SlotTemplate:
    return live.stub.SetSlotTemplate(pb.SetSlotTemplateRequest(doctor_id=doctor, slots=slots, **kw)).template


def get_template(live: LiveServer, doctor: str) -> pb.SlotTemplate:
    return live.stub.GetSlotTemplate(pb.GetSlotTemplateRequest(doctor_id=doctor)).template


def apply(live: LiveServer, doctor: str, start: str = DAY, end: str = WEEK_END,
          **kw: Any) -> pb.ApplySlotTemplateResponse:
    return live.stub.ApplySlotTemplate(pb.ApplySlotTemplateRequest(doctor_id=doctor, start_date=start, end_date=end,
                                                                   **kw))


def slot_list(live: LiveServer, doctor: str, date: str = "") -> list[tuple[str, str, str, int, int]]:
    """The doctor's slots as (date, start, end, capacity, minutes), by date and start."""
    slots, token = [], ""
    while True:
        page = live.stub.ListSlots(pb.ListSlotsRequest(doctor_id=doctor, date=date, page_size=500, page_token=token))
        slots += [(s.date, s.start_time, s.end_time, s.max_capacity, s.consultation_minutes) for s in page.slots]
        if not (token := page.next_page_token):
            return slots


def shown(slots: Any) -> list[tuple[str, str, str]]:
    return [(s.date, s.start_time, s.end_time) for s in slots]


def holiday(live: LiveServer, date: str, name: str, **kw: Any) -> pb.Holiday:
    return live.stub.CreateHoliday(pb.CreateHolidayRequest(date=date, name=name, **kw)).holiday


def holidays(live: LiveServer, start: str = "", end: str = "", page_size: int = 0) -> list[tuple[str, str]]:
    found, token = [], ""
    while True:
        page = live.stub.ListHolidays(pb.ListHolidaysRequest(start_date=start, end_date=end, page_size=page_size,
                                                             page_token=token))
        found += [(h.date, h.name) for h in page.holidays]
        if not (token := page.next_page_token):
            return found


def audit_reasons(live: LiveServer, method: str) -> list[str]:
    entries = live.stub.ListAuditEntries(pb.ListAuditEntriesRequest(page_size=1000)).entries
    return [e.reason for e in entries if e.method == method]


def event_count(live: LiveServer, doctor: str, date: str) -> int:
    return len(live.stub.ListQueueEvents(pb.ListQueueEventsRequest(doctor_id=doctor, date=date,
                                                                   page_size=1000)).events)


# ---- the pattern ----------------------------------------------------------------------------------------------


def test_a_template_is_stored_by_weekday_and_start_and_answered_as_stored(live: LiveServer):
    doctor = make_doctor(live.stub)
    assert get_template(live, doctor) == pb.SlotTemplate(doctor_id=doctor)  # none yet: no slots
    stored = set_template(live, doctor, WEEKLY)
    assert [(s.weekday, s.start_time, s.end_time) for s in stored.slots] == [
        (MON, "09:00", "12:00"), (MON, "14:00", "16:00"), (WED, "09:00", "12:00")]
    assert get_template(live, doctor) == stored and stored.doctor_id == doctor
    monday_morning, monday_afternoon = stored.slots[0], stored.slots[1]
    assert not monday_morning.HasField("max_capacity") and not monday_morning.HasField("consultation_minutes")
    assert (monday_afternoon.max_capacity, monday_afternoon.consultation_minutes) == (4, 10)
    assert slot_list(live, doctor) == []  # a pattern makes no slot by itself


def test_setting_a_template_replaces_the_whole_pattern_and_an_empty_one_clears_it(live: LiveServer):
    doctor = make_doctor(live.stub)
    set_template(live, doctor, WEEKLY)
    replaced = set_template(live, doctor, [tslot(SUN, "10:00", "11:00")])
    assert [(s.weekday, s.start_time) for s in replaced.slots] == [(SUN, "10:00")]
    assert get_template(live, doctor) == replaced
    assert set_template(live, doctor, []) == pb.SlotTemplate(doctor_id=doctor)
    assert get_template(live, doctor) == pb.SlotTemplate(doctor_id=doctor)


def test_the_same_times_on_different_weekdays_and_touching_slots_do_not_overlap(live: LiveServer):
    doctor = make_doctor(live.stub)
    pattern = [tslot(day, "09:00", "10:00") for day in range(1, 8)] + [tslot(MON, "10:00", "11:00")]
    assert len(set_template(live, doctor, pattern).slots) == 8


@pytest.mark.parametrize("slots, field", [
    ([tslot(pb.WEEKDAY_UNSPECIFIED, "09:00", "10:00")], "slots[0].weekday"),
    ([tslot(MON, "09:00", "10:00"), tslot(9, "09:00", "10:00")], "slots[1].weekday"),
    ([tslot(MON, "9:00", "10:00")], "slots[0].start_time"),
    ([tslot(MON, "09:00", "24:00")], "slots[0].end_time"),
    ([tslot(MON, "10:00", "09:00")], "slots[0].end_time"),
    ([tslot(MON, "10:00", "10:00")], "slots[0].end_time"),
    ([tslot(MON, "09:00", "10:00", max_capacity=0)], "slots[0].max_capacity"),
    ([tslot(MON, "09:00", "10:00", max_capacity=1_000_001)], "slots[0].max_capacity"),
    ([tslot(MON, "09:00", "10:00", consultation_minutes=-5)], "slots[0].consultation_minutes"),
    ([tslot(MON, "09:00", "10:00", max_capacity=1_000_000)], "slots[0].max_capacity"),  # 5 minutes each: > 1000 days
    ([tslot(MON, "09:00", "11:00"), tslot(MON, "10:30", "12:00")], "slots[1]"),
    ([tslot(TUE, "09:00", "10:00"), tslot(TUE, "09:00", "09:30")], "slots[1]"),
    ([tslot(MON, f"{h:02d}:00", f"{h:02d}:01") for h in range(24)] * 5, "slots"),  # 120 slots: more than 100
])
def test_a_bad_pattern_is_refused_and_the_stored_one_stays(live: LiveServer, slots, field):
    doctor = make_doctor(live.stub)
    before = set_template(live, doctor, WEEKLY)
    answer = refused(live.stub.SetSlotTemplate, pb.SetSlotTemplateRequest(doctor_id=doctor, slots=slots))
    assert answer.code == INVALID and field in answer.fields, answer
    assert get_template(live, doctor) == before


def test_a_pattern_of_a_hundred_slots_is_taken(live: LiveServer):
    doctor = make_doctor(live.stub)
    pattern = [tslot(day, f"{h:02d}:00", f"{h:02d}:30") for day in range(1, 6) for h in range(20)]  # 5 days x 20
    assert len(set_template(live, doctor, pattern).slots) == 100
    assert len(apply(live, doctor).created) == 100


def test_an_overlap_names_both_slots_and_the_weekday(live: LiveServer):
    doctor = make_doctor(live.stub)
    answer = refused(live.stub.SetSlotTemplate, pb.SetSlotTemplateRequest(doctor_id=doctor, slots=[
        tslot(MON, "09:00", "11:00"), tslot(WED, "09:00", "11:00"), tslot(WED, "10:00", "12:00")]))
    assert answer.fields == {"slots[2]": "overlaps slots[1]: both are on Wednesdays"}


def test_an_unknown_doctor_is_not_found_and_a_malformed_id_is_invalid(live: LiveServer):
    make_doctor(live.stub)
    for call, request in [
        (live.stub.SetSlotTemplate, pb.SetSlotTemplateRequest(doctor_id="DOC404", slots=WEEKLY)),
        (live.stub.GetSlotTemplate, pb.GetSlotTemplateRequest(doctor_id="DOC404")),
        (live.stub.ApplySlotTemplate, pb.ApplySlotTemplateRequest(doctor_id="DOC404", start_date=DAY,
                                                                  end_date=WEEK_END)),
    ]:
        answer = refused(call, request)
        assert (answer.code, answer.reason) == (NOT_FOUND, "DOCTOR_NOT_FOUND"), type(request).__name__
    answer = refused(live.stub.GetSlotTemplate, pb.GetSlotTemplateRequest(doctor_id="doc 1"))
    assert answer.code == INVALID and "doctor_id" in answer.fields


# ---- applying it ------------------------------------------------------------------------------------------------


def test_applying_creates_every_pattern_slot_on_every_date_with_the_defaults(live: LiveServer):
    doctor = make_doctor(live.stub)
    set_template(live, doctor, WEEKLY)
    applied = apply(live, doctor, DAY, "2030-01-16")  # Monday to the next Wednesday
    expected = [("2030-01-07", "09:00", "12:00", 10, 5), ("2030-01-07", "14:00", "16:00", 4, 10),
                ("2030-01-09", "09:00", "12:00", 10, 5),
                ("2030-01-14", "09:00", "12:00", 10, 5), ("2030-01-14", "14:00", "16:00", 4, 10),
                ("2030-01-16", "09:00", "12:00", 10, 5)]
    assert [(s.date, s.start_time, s.end_time, s.max_capacity, s.consultation_minutes)
            for s in applied.created] == expected
    assert [s.slot_id for s in applied.created][:2] == [f"{doctor}-20300107-0900", f"{doctor}-20300107-1400"]
    assert list(applied.existing) == [] and list(applied.skipped_holidays) == []
    assert slot_list(live, doctor) == expected
    assert event_count(live, doctor, "2030-01-07") == 2  # a SLOT_CHANGED for each, as CreateSlots writes
    assert allocate(live.stub, doctor, 1, date="2030-01-09").token.status == pb.STATUS_CONFIRMED
    assert audit_reasons(live, "ApplySlotTemplate") == [
        f"applied {doctor} 2030-01-07..2030-01-16: 6 created, 0 existing, 0 holidays"]


def test_applying_again_is_a_no_op_that_reports_the_slots_as_existing(live: LiveServer):
    doctor = make_doctor(live.stub)
    set_template(live, doctor, WEEKLY)
    first = apply(live, doctor)
    allocate(live.stub, doctor, 1)  # the slots are in use
    events = event_count(live, doctor, DAY)
    again = apply(live, doctor)
    assert list(again.created) == [] and list(again.existing) == list(first.created)
    assert event_count(live, doctor, DAY) == events and len(slot_list(live, doctor)) == 3
    wider = apply(live, doctor, DAY, "2030-01-14")  # the week again, and one Monday more
    assert shown(wider.created) == [("2030-01-14", "09:00", "12:00"), ("2030-01-14", "14:00", "16:00")]
    assert shown(wider.existing) == shown(first.created)


def test_a_slot_made_by_hand_with_the_same_times_is_left_as_it_is(live: LiveServer):
    doctor = make_doctor(live.stub)
    (by_hand,) = make_slots(live.stub, doctor, ("09:00", "12:00", 3), consultation_minutes=7)
    set_template(live, doctor, WEEKLY)
    applied = apply(live, doctor)
    assert list(applied.existing) == [by_hand]  # its own capacity and minutes, not the pattern's
    assert shown(applied.created) == [(DAY, "14:00", "16:00"), ("2030-01-09", "09:00", "12:00")]


def test_an_overlap_with_another_slot_refuses_the_whole_range(live: LiveServer):
    doctor = make_doctor(live.stub)
    set_template(live, doctor, WEEKLY)
    make_slots(live.stub, doctor, ("11:00", "13:00", 2), date="2030-01-14")  # overlaps the second Monday's 09-12
    events = event_count(live, doctor, "2030-01-14")
    answer = refused(live.stub.ApplySlotTemplate, pb.ApplySlotTemplateRequest(doctor_id=doctor, start_date=DAY,
                                                                              end_date="2030-01-20"))
    assert (answer.code, answer.reason) == (EXISTS, "SLOT_OVERLAP")
    assert "09:00-12:00 overlaps" in answer.message and "11:00-13:00 on 2030-01-14" in answer.message
    assert slot_list(live, doctor) == [("2030-01-14", "11:00", "13:00", 2, 5)]  # none of the first week either
    assert event_count(live, doctor, DAY) == 0 and event_count(live, doctor, "2030-01-14") == events
    assert audit_reasons(live, "ApplySlotTemplate") == []
    assert len(apply(live, doctor).created) == 3  # the first week alone has no overlap


def test_holidays_on_pattern_days_are_skipped_and_reported(live: LiveServer):
    doctor = make_doctor(live.stub)
    set_template(live, doctor, WEEKLY)
    holiday(live, "2030-01-09", "Founders' Day")  # a Wednesday: the pattern has a slot
    holiday(live, "2030-01-08", "Bank holiday")  # a Tuesday: the pattern has none, so nothing is skipped
    holiday(live, "2030-01-21", "Next month")  # outside the range
    applied = apply(live, doctor, DAY, "2030-01-16")
    assert [(h.date, h.name) for h in applied.skipped_holidays] == [("2030-01-09", "Founders' Day")]
    assert {s.date for s in applied.created} == {"2030-01-07", "2030-01-14", "2030-01-16"}
    assert slot_list(live, doctor, "2030-01-09") == []
    assert audit_reasons(live, "ApplySlotTemplate") == [
        f"applied {doctor} 2030-01-07..2030-01-16: 5 created, 0 existing, 1 holiday"]


def test_a_holiday_on_a_date_with_slots_answers_them_all_every_doctors(live: LiveServer):
    """The slots stay open, with their tokens (a holiday steers only ApplySlotTemplate): the answer shows the desk
    what the date still has, so that a closed day is not booked on without anyone knowing."""
    doctor, other = make_doctor(live.stub), make_doctor(live.stub, "Dr Other")
    make_slots(live.stub, other, ("09:00", "10:00", 2))
    make_slots(live.stub, doctor, ("10:00", "11:00", 2), ("09:00", "10:00", 2))
    make_slots(live.stub, doctor, ("09:00", "10:00", 2), date="2030-01-08")
    answer = live.stub.CreateHoliday(pb.CreateHolidayRequest(date=DAY, name="Flood"))
    assert [s.slot_id for s in answer.slots_that_day] == [
        f"{doctor}-20300107-0900", f"{doctor}-20300107-1000", f"{other}-20300107-0900"]
    assert answer.slots_that_day_total == 3
    empty = live.stub.CreateHoliday(pb.CreateHolidayRequest(date="2030-01-09", name="Quiet"))
    assert (list(empty.slots_that_day), empty.slots_that_day_total) == ([], 0)
    # A date of many slots: the first hundred, by doctor and time, and how many in all (the answer stays small).
    busy = "2030-01-10"
    live.stub.CreateSlots(pb.CreateSlotsRequest(doctor_id=doctor, slots=[
        pb.SlotSpec(date=busy, start_time=f"{8 + n // 12:02d}:{n % 12 * 5:02d}",
                    end_time=f"{8 + (n + 1) // 12:02d}:{(n + 1) % 12 * 5:02d}") for n in range(130)]))
    many = live.stub.CreateHoliday(pb.CreateHolidayRequest(date=busy, name="Strike"))
    assert (len(many.slots_that_day), many.slots_that_day_total) == (100, 130)
    assert [s.start_time for s in many.slots_that_day[:2]] == ["08:00", "08:05"]
    rows = live.stub.ListAuditEntries(pb.ListAuditEntriesRequest(page_size=100)).entries
    assert [r.reason for r in rows if r.method == "CreateHoliday"] == [
        "holiday 2030-01-07 ('Flood') created; 3 slots of that date stay open", "holiday 2030-01-09 ('Quiet') created",
        "holiday 2030-01-10 ('Strike') created; 130 slots of that date stay open"]


def test_a_holiday_still_takes_slots_by_hand_and_keeps_them_when_deleted(live: LiveServer):
    doctor = make_doctor(live.stub)
    holiday(live, DAY, "Pongal")
    make_slots(live.stub, doctor, ("09:00", "10:00", 2))  # an OPD may open on a holiday by hand
    assert allocate(live.stub, doctor, 1).token.status == pb.STATUS_CONFIRMED
    set_template(live, doctor, WEEKLY)
    applied = apply(live, doctor)
    assert [h.date for h in applied.skipped_holidays] == [DAY] and list(applied.existing) == []
    assert slot_list(live, doctor, DAY) == [(DAY, "09:00", "10:00", 2, 5)]
    live.stub.DeleteHoliday(pb.DeleteHolidayRequest(date=DAY))
    assert slot_list(live, doctor, DAY) == [(DAY, "09:00", "10:00", 2, 5)]
    answer = refused(live.stub.ApplySlotTemplate, pb.ApplySlotTemplateRequest(doctor_id=doctor, start_date=DAY,
                                                                              end_date=DAY))
    assert (answer.code, answer.reason) == (EXISTS, "SLOT_OVERLAP")  # the day's hand-made slot is in the way


def test_without_a_pattern_applying_is_a_failed_precondition(live: LiveServer):
    doctor = make_doctor(live.stub)
    for _ in range(2):  # never set, then set and cleared
        answer = refused(live.stub.ApplySlotTemplate, pb.ApplySlotTemplateRequest(doctor_id=doctor, start_date=DAY,
                                                                                  end_date=WEEK_END))
        assert (answer.code, answer.reason) == (PRECONDITION, "NO_SLOT_TEMPLATE")
        assert "SetSlotTemplate first" in answer.message
        set_template(live, doctor, WEEKLY)
        set_template(live, doctor, [])
    assert slot_list(live, doctor) == []


def test_a_range_without_pattern_days_creates_nothing(live: LiveServer):
    doctor = make_doctor(live.stub)
    set_template(live, doctor, [tslot(SUN, "10:00", "11:00")])
    applied = apply(live, doctor, DAY, "2030-01-12")  # Monday to Saturday
    assert applied == pb.ApplySlotTemplateResponse()
    assert slot_list(live, doctor) == [] and live.stub.GetStats(pb.GetStatsRequest(date=DAY)).stats == []


@pytest.mark.parametrize("start, end, field", [
    ("2030-01-13", "2030-01-07", "end_date"),
    ("2030-01-01", "2031-01-02", "end_date"),  # 367 days
    ("", WEEK_END, "start_date"),
    (DAY, "2030-02-30", "end_date"),
    ("07-01-2030", WEEK_END, "start_date"),
])
def test_a_bad_range_is_invalid(live: LiveServer, start, end, field):
    doctor = make_doctor(live.stub)
    set_template(live, doctor, WEEKLY)
    answer = refused(live.stub.ApplySlotTemplate, pb.ApplySlotTemplateRequest(doctor_id=doctor, start_date=start,
                                                                              end_date=end))
    assert answer.code == INVALID and list(answer.fields) == [field], answer
    assert slot_list(live, doctor) == []


def test_a_range_of_366_days_is_applied_in_one_go(live: LiveServer):
    doctor = make_doctor(live.stub)
    set_template(live, doctor, [tslot(SUN, "10:00", "11:00"), tslot(MON, "09:00", "10:00")])
    applied = apply(live, doctor, "2030-01-01", "2031-01-01")  # 366 days: 52 Sundays, 52 Mondays
    assert len(applied.created) == 104 and len(slot_list(live, doctor)) == 104
    assert [s.date for s in applied.created] == sorted(s.date for s in applied.created)


def test_the_defaults_are_those_of_the_server_that_applies_the_pattern(tmp_path: Path):
    with fresh_database(tmp_path) as url:
        first = LiveServer(url, DEFAULT_SLOT_CAPACITY=10, AVERAGE_CONSULTATION_MINUTES=5)
        try:
            doctor = make_doctor(first.stub)
            set_template(first, doctor, WEEKLY)
        finally:
            first.close()
        second = LiveServer(url, DEFAULT_SLOT_CAPACITY=6, AVERAGE_CONSULTATION_MINUTES=12)
        try:
            applied = apply(second, doctor, DAY, DAY)
            assert [(s.start_time, s.max_capacity, s.consultation_minutes) for s in applied.created] == [
                ("09:00", 6, 12), ("14:00", 4, 10)]
        finally:
            second.close()
        third = LiveServer(url, AVERAGE_CONSULTATION_MINUTES=1)  # 300,000 seats of 1 minute: under 1000 days
        try:
            set_template(third, doctor, [tslot(WED, "09:00", "12:00", max_capacity=300_000)])
        finally:
            third.close()
        fourth = LiveServer(url)  # 300,000 seats of this server's 5 minutes: more than 1000 days
        try:
            answer = refused(fourth.stub.ApplySlotTemplate, pb.ApplySlotTemplateRequest(
                doctor_id=doctor, start_date="2030-01-09", end_date="2030-01-09"))
            assert (answer.code, answer.reason) == (PRECONDITION, "SLOT_TEMPLATE_OUT_OF_BOUNDS")
            assert "set it again with SetSlotTemplate" in answer.message
        finally:
            fourth.close()


def test_applies_at_once_create_each_slot_once(live: LiveServer):
    doctor = make_doctor(live.stub)
    set_template(live, doctor, WEEKLY)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: apply(live, doctor, DAY, "2030-01-20"), range(4)))
    created = [shown(a.created) for a in answers]
    assert sorted(len(c) for c in created) == [0, 0, 0, 6]  # two weeks of three
    assert all(shown(a.existing) == max(created) for a in answers if not a.created)
    assert len(slot_list(live, doctor)) == 6


# ---- holidays ---------------------------------------------------------------------------------------------------


def test_holidays_are_created_listed_by_date_in_ranges_and_pages_and_deleted(live: LiveServer):
    made = {"2030-01-26": "Republic Day", "2030-01-14": "Pongal", "2030-08-15": "Independence Day",
            "2031-01-26": "Republic Day"}
    for date, name in made.items():
        assert holiday(live, date, name) == pb.Holiday(date=date, name=name)
    everything = sorted(made.items())
    assert holidays(live) == everything
    assert holidays(live, page_size=1) == everything
    assert holidays(live, "2030-01-14", "2030-01-26") == everything[:2]  # both ends included
    assert holidays(live, "2030-01-15") == everything[1:]
    assert holidays(live, end="2030-08-15") == everything[:3]
    assert holidays(live, "2030-02-01", "2030-02-28") == []
    first = live.stub.ListHolidays(pb.ListHolidaysRequest(page_size=2))
    assert len(first.holidays) == 2 and first.next_page_token
    removed = live.stub.DeleteHoliday(pb.DeleteHolidayRequest(date="2030-08-15")).holiday
    assert removed == pb.Holiday(date="2030-08-15", name="Independence Day")
    assert holidays(live) == [h for h in everything if h[0] != "2030-08-15"]
    # A page goes on after the last date shown: deleting one shown before it skips nothing (an offset had lost
    # 2030-01-26 here).
    first = live.stub.ListHolidays(pb.ListHolidaysRequest(page_size=1))
    live.stub.DeleteHoliday(pb.DeleteHolidayRequest(date=first.holidays[0].date))
    rest = live.stub.ListHolidays(pb.ListHolidaysRequest(page_size=1, page_token=first.next_page_token))
    assert [h.date for h in rest.holidays] == ["2030-01-26"]


def test_a_date_is_a_holiday_once_and_an_unknown_one_cannot_be_deleted(live: LiveServer):
    holiday(live, "2030-01-26", "Republic Day")
    answer = refused(live.stub.CreateHoliday, pb.CreateHolidayRequest(date="2030-01-26", name="Something else"))
    assert (answer.code, answer.reason) == (EXISTS, "HOLIDAY_EXISTS") and "Republic Day" in answer.message
    assert holidays(live) == [("2030-01-26", "Republic Day")]
    live.stub.DeleteHoliday(pb.DeleteHolidayRequest(date="2030-01-26"))
    answer = refused(live.stub.DeleteHoliday, pb.DeleteHolidayRequest(date="2030-01-26"))
    assert (answer.code, answer.reason) == (NOT_FOUND, "HOLIDAY_NOT_FOUND")


@pytest.mark.parametrize("call, request_fields, field", [
    ("CreateHoliday", {"date": "2030-01-26", "name": ""}, "name"),
    ("CreateHoliday", {"date": "2030-01-26", "name": "   "}, "name"),
    ("CreateHoliday", {"date": "2030-01-26", "name": "Diwali\x00"}, "name"),
    ("CreateHoliday", {"date": "2030-01-26", "name": "x" * 201}, "name"),
    ("CreateHoliday", {"date": "2030-13-01", "name": "Diwali"}, "date"),
    ("CreateHoliday", {"date": "", "name": "Diwali"}, "date"),
    ("DeleteHoliday", {"date": "26-01-2030"}, "date"),
    ("ListHolidays", {"start_date": "2030-02-01", "end_date": "2030-01-01"}, "end_date"),
    ("ListHolidays", {"start_date": "2030-1-1"}, "start_date"),
    ("ListHolidays", {"page_token": "garbage"}, "page_token"),
])
def test_malformed_holiday_requests_name_the_field_and_change_nothing(live: LiveServer, call, request_fields, field):
    holiday(live, "2030-01-14", "Pongal")
    request = getattr(pb, f"{call}Request")(**request_fields)
    answer = refused(getattr(live.stub, call), request)
    assert answer.code == INVALID and field in answer.fields, answer
    assert holidays(live) == [("2030-01-14", "Pongal")]


def test_a_holidays_name_is_stored_without_its_surrounding_spaces(live: LiveServer):
    assert holiday(live, "2030-10-02", "  Gandhi Jayanti ").name == "Gandhi Jayanti"
    assert holidays(live) == [("2030-10-02", "Gandhi Jayanti")]


# ---- request_id (SPEC §9) and the audit log (SPEC §13) ------------------------------------------------------------


def test_a_repeated_apply_answers_the_first_answer_and_creates_nothing_more(live: LiveServer):
    doctor = make_doctor(live.stub)
    set_template(live, doctor, WEEKLY)
    request_id = new_request_id()
    first = apply(live, doctor, request_id=request_id)
    assert apply(live, doctor, request_id=request_id) == first  # "created", as the first time; not "existing"
    assert len(slot_list(live, doctor)) == 3 and len(audit_reasons(live, "ApplySlotTemplate")) == 1
    answer = refused(live.stub.ApplySlotTemplate, pb.ApplySlotTemplateRequest(
        doctor_id=doctor, start_date=DAY, end_date="2030-01-20", request_id=request_id))
    assert (answer.code, answer.reason) == (PRECONDITION, "REQUEST_ID_REUSED")
    assert len(slot_list(live, doctor)) == 3


def test_a_refused_apply_is_refused_again_under_its_request_id(live: LiveServer):
    doctor = make_doctor(live.stub)
    request = pb.ApplySlotTemplateRequest(doctor_id=doctor, start_date=DAY, end_date=WEEK_END,
                                          request_id=new_request_id())
    assert refused(live.stub.ApplySlotTemplate, request).reason == "NO_SLOT_TEMPLATE"
    set_template(live, doctor, WEEKLY)
    assert refused(live.stub.ApplySlotTemplate, request).reason == "NO_SLOT_TEMPLATE"  # the first answer
    assert slot_list(live, doctor) == []


def test_repeated_template_and_holiday_changes_answer_the_first_answer(live: LiveServer):
    doctor = make_doctor(live.stub)
    set_id, create_id, delete_id = new_request_id(), new_request_id(), new_request_id()
    stored = set_template(live, doctor, WEEKLY, request_id=set_id)
    set_template(live, doctor, [tslot(SUN, "10:00", "11:00")])
    assert set_template(live, doctor, WEEKLY, request_id=set_id) == stored  # changes nothing more
    assert [s.weekday for s in get_template(live, doctor).slots] == [SUN]

    created = holiday(live, "2030-01-26", "Republic Day", request_id=create_id)
    assert holiday(live, "2030-01-26", "Republic Day", request_id=create_id) == created  # not HOLIDAY_EXISTS
    deleted = live.stub.DeleteHoliday(pb.DeleteHolidayRequest(date="2030-01-26", request_id=delete_id)).holiday
    assert live.stub.DeleteHoliday(pb.DeleteHolidayRequest(date="2030-01-26", request_id=delete_id)).holiday == deleted
    assert holidays(live) == []
    for call, request in [
        (live.stub.SetSlotTemplate, pb.SetSlotTemplateRequest(doctor_id=doctor, request_id=set_id)),
        (live.stub.CreateHoliday, pb.CreateHolidayRequest(date="2030-01-27", name="Other", request_id=create_id)),
        (live.stub.DeleteHoliday, pb.DeleteHolidayRequest(date="2030-01-27", request_id=delete_id)),
    ]:
        answer = refused(call, request)
        assert (answer.code, answer.reason) == (PRECONDITION, "REQUEST_ID_REUSED"), type(request).__name__
    assert holidays(live) == [] and [s.weekday for s in get_template(live, doctor).slots] == [SUN]
    assert audit_reasons(live, "SetSlotTemplate") == [f"{doctor}'s slot template: 3 slots",
                                                      f"{doctor}'s slot template: 1 slots"]
    assert audit_reasons(live, "CreateHoliday") == ["holiday 2030-01-26 ('Republic Day') created"]
    assert audit_reasons(live, "DeleteHoliday") == ["holiday 2030-01-26 ('Republic Day') deleted"]


def test_a_phone_number_in_a_holidays_name_stays_out_of_the_audit_log(live: LiveServer):
    """Staff type what they like into a holiday's name; the name keeps it, no log does (SPEC §13)."""
    name = "Closed, call Ravi at 98450 12345"
    assert holiday(live, "2031-03-05", name).name == name
    live.stub.DeleteHoliday(pb.DeleteHolidayRequest(date="2031-03-05"))
    assert audit_reasons(live, "CreateHoliday") + audit_reasons(live, "DeleteHoliday") == [
        "holiday 2031-03-05 ('Closed, call Ravi at …') created", "holiday 2031-03-05 ('Closed, call Ravi at …') deleted"]


def test_audit_entries_of_these_changes_carry_no_token(live: LiveServer):
    doctor = make_doctor(live.stub)
    set_template(live, doctor, WEEKLY)
    apply(live, doctor)
    holiday(live, "2030-01-26", "Republic Day")
    live.stub.DeleteHoliday(pb.DeleteHolidayRequest(date="2030-01-26"))
    entries = [e for e in live.stub.ListAuditEntries(pb.ListAuditEntriesRequest()).entries
               if e.method in ("SetSlotTemplate", "ApplySlotTemplate", "CreateHoliday", "DeleteHoliday")]
    assert [e.method for e in entries] == ["SetSlotTemplate", "ApplySlotTemplate", "CreateHoliday", "DeleteHoliday"]
    assert all((e.token_id, e.from_status, e.to_status) == ("", 0, 0) for e in entries)
    assert all(e.outcome == pb.AUDIT_OUTCOME_CHANGED for e in entries)


def test_each_weekday_of_the_pattern_lands_on_that_day_of_the_week(live: LiveServer):
    doctor = make_doctor(live.stub)
    set_template(live, doctor, [tslot(SUN, "10:00", "11:00"), tslot(pb.WEEKDAY_THURSDAY, "09:00", "10:00")])
    applied = apply(live, doctor, "2030-01-01", "2030-01-31")
    assert [s.date for s in applied.created] == [
        "2030-01-03", "2030-01-06", "2030-01-10", "2030-01-13", "2030-01-17", "2030-01-20", "2030-01-24",
        "2030-01-27", "2030-01-31"]  # January 2030's Thursdays and Sundays
    assert {dt.date.fromisoformat(s.date).strftime("%A") for s in applied.created} == {"Thursday", "Sunday"}


def test_times_the_clocks_skip_are_refused_by_create_slots_and_by_applying_a_pattern(tmp_path: Path):
    """New York's clocks go from 02:00 to 03:00 on 2030-03-10 (a Sunday): a slot starting or ending in that hour
    would start an hour off, after it ends. CreateSlots names the field; a pattern applied over that date refuses
    the range and says how to go round it; nothing is made either way."""
    with contextmanager(live_server)(tmp_path, TIMEZONE="America/New_York") as live:
        doctor = make_doctor(live.stub)
        spring = "2030-03-10"
        answer = refused(live.stub.CreateSlots, pb.CreateSlotsRequest(doctor_id=doctor, slots=[
            pb.SlotSpec(date=spring, start_time="02:00", end_time="02:30"),
            pb.SlotSpec(date=spring, start_time="03:00", end_time="04:00"),
            pb.SlotSpec(date=spring, start_time="01:00", end_time="02:30")]))
        assert answer.code == INVALID
        assert answer.fields == {
            "slots[0].start_time": "02:00 does not happen on 2030-03-10 in America/New_York (the clocks skip it)",
            "slots[0].end_time": "02:30 does not happen on 2030-03-10 in America/New_York (the clocks skip it)",
            "slots[2].end_time": "02:30 does not happen on 2030-03-10 in America/New_York (the clocks skip it)"}
        across = live.stub.CreateSlots(pb.CreateSlotsRequest(doctor_id=doctor, slots=[
            pb.SlotSpec(date=spring, start_time="00:00", end_time="02:00"),  # ends as the clocks jump
            pb.SlotSpec(date=spring, start_time="03:00", end_time="04:00")])).slots
        assert [(s.start_time, s.end_time) for s in across] == [("00:00", "02:00"), ("03:00", "04:00")]

        other = make_doctor(live.stub)
        set_template(live, other, [tslot(SUN, "02:00", "02:45")])
        answer = refused(live.stub.ApplySlotTemplate, pb.ApplySlotTemplateRequest(
            doctor_id=other, start_date="2030-03-03", end_date="2030-03-17"))
        assert (answer.code, answer.reason) == (PRECONDITION, "SLOT_TIME_SKIPPED")
        assert "02:00-02:45 on 2030-03-10" in answer.message
        assert list(live.stub.ListSlots(pb.ListSlotsRequest(doctor_id=other)).slots) == []
        assert [s.date for s in apply(live, other, "2030-03-11", "2030-03-17").created] == ["2030-03-17"]
