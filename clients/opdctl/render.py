"""How opdctl shows answers: tables and lines for a person, or the responses as JSON for a script (`--json`).

JSON is google.protobuf.json_format with the proto's field names and every field present (zeros and empty
strings too), so a script can rely on the keys; timestamps are UTC. To a person, times of day (estimated,
occurred) are shown in the zone they are given: the hospital's, on whose clock dates and slot times are too.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections import Counter
from typing import Any, Iterable, TextIO

from google.protobuf import json_format, timestamp_pb2
from google.protobuf.message import Message
from rich import box
from rich.console import Console, RenderableType
from rich.table import Table

from clients.opdctl.pattern import WEEKDAYS
from clients.report.figures import DoctorReport
from opd_grpc._gen.opd.v1 import opd_pb2 as pb

# The words of `--source` and of the tables, and the Source each stands for (SPEC §2).
SOURCES = {"emergency": pb.SOURCE_EMERGENCY, "paid": pb.SOURCE_PAID_PRIORITY, "follow-up": pb.SOURCE_FOLLOW_UP,
           "online": pb.SOURCE_ONLINE_BOOKING, "walk-in": pb.SOURCE_WALK_IN}
GENDERS = {"female": pb.GENDER_FEMALE, "male": pb.GENDER_MALE, "other": pb.GENDER_OTHER}
_SOURCE_WORD = {value: word for word, value in SOURCES.items()}
_WEEKDAY = ("", *(day.title() for day in WEEKDAYS))  # by ISO number, which pb.Weekday follows


class Printer:
    """Where a command's answer goes: tables and lines on the console, or JSON documents (`--json`)."""

    def __init__(self, as_json: bool, file: TextIO | None = None):
        self.as_json = as_json
        self.file = file or sys.stdout
        # Not a terminal (a pipe, a file): wide enough that no cell wraps. Markup off: names are printed as given.
        self.console = Console(file=self.file, highlight=False, markup=False, emoji=False,
                               width=None if self.file.isatty() else 200)

    def show(self, data: Any, *text: RenderableType) -> None:
        """One answer: `data` as one JSON document, or `text` (tables and lines) for a person."""
        if self.as_json:
            print(json.dumps(as_json(data), indent=2, ensure_ascii=False), file=self.file, flush=True)
        else:
            for item in text:  # each on its own line; a line of text never wraps (a script may grep it)
                self.console.print(item, soft_wrap=True)

    def line(self, data: Any, text: str) -> None:
        """One item of a stream, at once: a JSON object on one line, or `text`."""
        if self.as_json:
            print(json.dumps(as_json(data), ensure_ascii=False), file=self.file, flush=True)
        else:
            self.console.print(text, soft_wrap=True)
            self.file.flush()


def as_json(data: Any) -> Any:
    """Messages (also inside lists and dicts) as JSON values."""
    if isinstance(data, Message):
        return json_format.MessageToDict(data, preserving_proto_field_name=True,
                                         always_print_fields_with_no_presence=True)
    if isinstance(data, dict):
        return {key: as_json(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [as_json(item) for item in data]
    return data


# Words

def status_word(status: int) -> str:
    return pb.Status.Name(status).removeprefix("STATUS_")


def source_word(source: int) -> str:
    return _SOURCE_WORD.get(source, "?")


def weekday_word(date: str) -> str:
    return _WEEKDAY[dt.date.fromisoformat(date).isoweekday()]


def clock(timestamp: timestamp_pb2.Timestamp, zone: dt.tzinfo, seconds: bool = False) -> str:
    """A timestamp as the wall-clock time in `zone`; "" when unset."""
    if not timestamp.seconds and not timestamp.nanos:
        return ""
    return timestamp.ToDatetime(zone).strftime("%H:%M:%S" if seconds else "%H:%M")


def slot_time(slot: pb.Slot) -> str:
    return f"{slot.start_time}-{slot.end_time}"


def place(token: pb.Token) -> str:
    """Where the token stands in its slot: its queue position, or its waitlist position."""
    if token.status == pb.STATUS_WAITLISTED:
        return f"waitlist {token.waitlist_position}"
    return str(token.queue_position) if token.queue_position else ""


def token_line(token: pb.Token, slot_times: dict[str, str], zone: dt.tzinfo) -> str:
    """The token in one line, e.g. "Token 3 (DOC001-20300107-T3): CONFIRMED, slot 09:00-10:00, queue position 3,
    estimated 09:10"."""
    text = f"Token {token.token_number} ({token.token_id}): {status_word(token.status)}"
    text += f", slot {slot_times.get(token.slot_id, token.slot_id)}"
    if token.status == pb.STATUS_WAITLISTED:
        return f"{text}, waitlist position {token.waitlist_position}"
    if token.queue_position:
        text += f", queue position {token.queue_position}"
    if estimated := clock(token.estimated_time, zone):
        text += f", estimated {estimated}"
    return text


def counts(counter: Iterable[tuple[str, int]]) -> str:
    return ", ".join(f"{name} {count}" for name, count in counter if count)


# Tables

def _table(*columns: str, title: str | None = None) -> Table:
    return Table(*columns, title=title, box=box.SIMPLE_HEAD, title_justify="left", show_edge=False)


def doctors_table(doctors: Iterable[pb.Doctor]) -> Table:
    table = _table("Doctor", "Name", "Specialization")
    for doctor in doctors:
        table.add_row(doctor.doctor_id, doctor.name, doctor.specialization)
    return table


def slots_table(slots: Iterable[pb.Slot]) -> Table:
    table = _table("Slot", "Date", "Day", "Time", "Seats", "Min/patient")
    for slot in slots:
        table.add_row(slot.slot_id, slot.date, weekday_word(slot.date), slot_time(slot), str(slot.max_capacity),
                      str(slot.consultation_minutes))
    return table


def tokens_table(tokens: Iterable[pb.Token], slot_times: dict[str, str], zone: dt.tzinfo,
                 title: str | None = None) -> Table:
    table = _table("No.", "Token", "Patient", "Source", "Status", "Slot", "Place", "Estimated", title=title)
    for token in tokens:
        table.add_row(str(token.token_number), token.token_id, token.patient.name, source_word(token.source),
                      status_word(token.status), slot_times.get(token.slot_id, token.slot_id), place(token),
                      clock(token.estimated_time, zone))
    return table


def waitlist_table(tokens: Iterable[pb.Token]) -> Table:
    table = _table("Waitlist", "No.", "Token", "Patient", "Source", title="Waitlist, next to be promoted first")
    for token in tokens:
        table.add_row(str(token.waitlist_position), str(token.token_number), token.token_id, token.patient.name,
                      source_word(token.source))
    return table


def seats_table(statuses: Iterable[pb.GetSlotStatusResponse]) -> Table:
    table = _table("Time", "Slot", "Seats taken", "Free", "Waitlist")
    for status in statuses:
        waiting = ", ".join(str(t.token_number) for t in status.waitlist)
        table.add_row(slot_time(status.slot), status.slot.slot_id, f"{status.seat_holders}/{status.max_capacity}",
                      str(status.free_seats), f"{len(status.waitlist)}" + (f" ({waiting})" if waiting else ""))
    return table


def stats_table(stats: Iterable[pb.DoctorDayStats]) -> Table:
    table = _table("Doctor", "Date", "Tokens", "Seats taken", "Utilisation", "Bumps", "No-shows", "Mean wait",
                   "By status", "By source")
    for day in stats:
        by_status = counts((name.removeprefix("STATUS_"), n) for name, n in sorted(day.by_status.items()))
        by_source = counts((source_word(pb.Source.Value(name)), n) for name, n in sorted(day.by_source.items()))
        table.add_row(day.doctor_id, day.date, str(day.total_tokens), f"{day.seat_holders}/{day.total_capacity}",
                      f"{day.utilisation:.0%}", str(day.bumps), str(day.no_shows), f"{day.mean_wait_minutes:.1f} min",
                      by_status, by_source)
    return table


def report_table(doctors: Iterable[DoctorReport]) -> Table:
    table = _table("Doctor", "Tokens", "Utilisation", "Bumps", "No-shows", "Cancelled", "Promoted", "Slots")
    for d in doctors:
        table.add_row(d.doctor_id, str(d.total_tokens), f"{d.utilisation:.0%}", str(d.bumps), str(d.no_shows),
                      str(d.cancellations), str(d.promotions.total), str(len(d.slots)))
    return table


def events_table(events: Iterable[pb.QueueEvent], zone: dt.tzinfo) -> Table:
    table = _table("Seq", "Time", "Event", "No.", "Token", "Status", "Slot", "Caused by")
    for event in events:
        token = event.token if event.HasField("token") else None
        table.add_row(str(event.sequence), clock(event.occurred_at, zone, seconds=True), _kind(event),
                      str(token.token_number) if token else "", token.token_id if token else "",
                      status_word(token.status) if token else "", event.slot_id, event.caused_by_token_id)
    return table


def template_table(slots: Iterable[pb.TemplateSlot]) -> Table:
    table = _table("Day", "Time", "Seats", "Min/patient")
    for slot in slots:
        table.add_row(_WEEKDAY[slot.weekday], f"{slot.start_time}-{slot.end_time}",
                      str(slot.max_capacity) if slot.HasField("max_capacity") else "default",
                      str(slot.consultation_minutes) if slot.HasField("consultation_minutes") else "default")
    return table


def holidays_table(holidays: Iterable[pb.Holiday]) -> Table:
    table = _table("Date", "Day", "Holiday")
    for holiday in holidays:
        table.add_row(holiday.date, weekday_word(holiday.date), holiday.name)
    return table


# Lines of a watch

def update_line(update: pb.WatchQueueResponse, zone: dt.tzinfo) -> str:
    """A snapshot or an event as one line for a person, the event's time in `zone`."""
    if update.HasField("snapshot"):
        snap = update.snapshot
        by_status = counts(Counter(status_word(t.status) for t in snap.tokens).most_common())
        tokens = f"{len(snap.tokens)} token" + ("" if len(snap.tokens) == 1 else "s")
        return (f"{snap.doctor_id} {snap.date}: {tokens} as of event {snap.sequence}"
                + (f" ({by_status})" if by_status else ""))
    event = update.event
    text = f"{clock(event.occurred_at, zone, seconds=True)} {event.doctor_id} #{event.sequence} {_kind(event)}"
    if event.HasField("token"):
        token, now = event.token, status_word(event.token.status)
        text += f" token {token.token_number} ({token.token_id})" + (f" → {now}" if now != _kind(event) else "")
        text += f", {source_word(token.source)}"
    text += f", slot {event.slot_id}"
    return text + (f", caused by {event.caused_by_token_id}" if event.caused_by_token_id else "")


def _kind(event: pb.QueueEvent) -> str:
    return pb.EventKind.Name(event.kind).removeprefix("EVENT_KIND_")
