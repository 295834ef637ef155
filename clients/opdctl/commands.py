"""What each opdctl subcommand does: the calls it makes through the client library and what it shows.

Each takes the client, the parsed flags and the Printer; a refused call raises the library's OPDError, which
`__main__` turns into a message and an exit code.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path
from typing import Any

from clients.library import AlreadyExists, OPDClient, OPDError, hospital_today, server_zone
from clients.opdctl import pattern
from clients.opdctl.errors import Refused, UsageError
from clients.report import write_report
from clients.opdctl.render import (GENDERS, SOURCES, Printer, clock, doctors_table, events_table, holidays_table, place,
                                   report_table, seats_table, slot_time, slots_table, stats_table, template_table,
                                   token_line, tokens_table, update_line, waitlist_table, weekday_word)
from opd_grpc._gen.opd.v1 import opd_pb2 as pb


# Doctors

def doctors_create(client: OPDClient, args: argparse.Namespace, out: Printer) -> None:
    reply = client.create_doctor(args.name, args.specialization)
    out.show(reply, f"Created {reply.doctor.doctor_id}:", doctors_table([reply.doctor]))


def doctors_list(client: OPDClient, args: argparse.Namespace, out: Printer) -> None:
    doctors = list(client.iter_doctors())
    out.show(pb.ListDoctorsResponse(doctors=doctors),
             doctors_table(doctors) if doctors else "No doctors yet: add one with `opdctl doctors create`.")


def doctors_get(client: OPDClient, args: argparse.Namespace, out: Printer) -> None:
    reply = client.get_doctor(args.doctor_id)
    out.show(reply, doctors_table([reply.doctor]))


# Slots

def slots_add(client: OPDClient, args: argparse.Namespace, out: Printer) -> None:
    sittings = pattern.parse(args.pattern)
    dates = pattern.week_of(dt.date.fromisoformat(args.week)) if args.week else [dt.date.fromisoformat(args.date)]
    specs = pattern.slot_specs(sittings, dates, args.consultation_minutes)
    span = _span(dates)
    if not specs:
        raise UsageError(f"the pattern {args.pattern!r} makes no slot on {span}")
    reply = client.create_slots(args.doctor, specs)
    out.show(reply, f"Created {_slots(len(reply.slots))} for {args.doctor} on {span}:", slots_table(reply.slots))


def slots_list(client: OPDClient, args: argparse.Namespace, out: Printer) -> None:
    slots = list(client.iter_slots(args.doctor, args.date or ""))
    when = f" on {args.date}" if args.date else ""
    out.show(pb.ListSlotsResponse(slots=slots),
             slots_table(slots) if slots else f"{args.doctor} has no slots{when}: add them with `opdctl slots add`.")


def slots_status(client: OPDClient, args: argparse.Namespace, out: Printer) -> None:
    reply = client.get_slot_status(args.slot_id)
    slot = reply.slot
    text = [f"Slot {slot.slot_id}: {slot.doctor_id}, {weekday_word(slot.date)} {slot.date} {slot_time(slot)}, "
            f"{reply.seat_holders} of {reply.max_capacity} seats taken, {reply.free_seats} free, "
            f"{len(reply.waitlist)} waitlisted"]
    out.show(reply, *text, *([waitlist_table(reply.waitlist)] if reply.waitlist else []))


def slots_capacity(client: OPDClient, args: argparse.Namespace, out: Printer) -> None:
    reply = client.update_slot_capacity(args.slot_id, args.capacity)
    times = {reply.slot.slot_id: slot_time(reply.slot)}
    zone = _hospital_zone(client, args, reply.slot.doctor_id, reply.slot.date)
    out.show(reply, f"Slot {reply.slot.slot_id} now has {reply.slot.max_capacity} seats.",
             *_promoted(reply.promoted, times, zone))


# Weekly templates and holidays

def templates_set(client: OPDClient, args: argparse.Namespace, out: Printer) -> None:
    slots = pattern.template_slots(pattern.parse(args.pattern), args.consultation_minutes)
    reply = client.set_slot_template(args.doctor, slots)
    out.show(reply, f"Weekly pattern of {args.doctor}: {len(reply.template.slots)} slots a week.",
             template_table(reply.template.slots))


def templates_show(client: OPDClient, args: argparse.Namespace, out: Printer) -> None:
    reply = client.get_slot_template(args.doctor)
    slots = reply.template.slots
    out.show(reply, template_table(slots) if slots else
             f"{args.doctor} has no weekly pattern: set one with `opdctl templates set`.")


def templates_apply(client: OPDClient, args: argparse.Namespace, out: Printer) -> None:
    reply = client.apply_slot_template(args.doctor, args.start, args.end)
    text = [f"Created {_slots(len(reply.created))} for {args.doctor} from {args.start} to {args.end} "
            f"({len(reply.existing)} of the pattern's slots were there already)."]
    if reply.skipped_holidays:
        text.append("Holidays skipped: " + ", ".join(f"{h.date} ({h.name})" for h in reply.skipped_holidays) + ".")
    out.show(reply, *text, *([slots_table(reply.created)] if reply.created else []))


def holidays_add(client: OPDClient, args: argparse.Namespace, out: Printer) -> None:
    reply = client.create_holiday(args.date, args.name)
    text = [f"{reply.holiday.date} ({weekday_word(reply.holiday.date)}) is a holiday: {reply.holiday.name}."]
    if reply.slots_that_day:
        listed = "" if reply.slots_that_day_total == len(reply.slots_that_day) else \
            f" (the first {len(reply.slots_that_day)}: `opdctl slots list` shows each doctor's)"
        text += [f"Its {reply.slots_that_day_total} slots made before stay open, with their tokens (a holiday only "
                 f"keeps `templates apply` from making slots): cancel their tokens to close them{listed}.",
                 slots_table(reply.slots_that_day)]
    out.show(reply, *text)


def holidays_list(client: OPDClient, args: argparse.Namespace, out: Printer) -> None:
    holidays = list(client.iter_holidays(args.start or "", args.end or ""))
    out.show(pb.ListHolidaysResponse(holidays=holidays),
             holidays_table(holidays) if holidays else "No holidays: add one with `opdctl holidays add`.")


def holidays_delete(client: OPDClient, args: argparse.Namespace, out: Printer) -> None:
    reply = client.delete_holiday(args.date)
    out.show(reply, f"{reply.holiday.date} ({reply.holiday.name}) is no longer a holiday.")


# Tokens

def tokens_allocate(client: OPDClient, args: argparse.Namespace, out: Printer) -> None:
    patient = pb.Patient(name=args.name, phone=args.phone, age=args.age, gender=GENDERS.get(args.gender, 0),
                         mrn=args.mrn)
    request = dict(patient=patient, doctor_id=args.doctor, date=args.date, preferred_slot_time=args.time or "",
                   flexible=args.flexible)
    source = SOURCES[args.source]
    try:
        if source == pb.SOURCE_EMERGENCY:
            reply = client.allocate_emergency(**request)
        else:
            reply = client.allocate_token(**request, source=source)
    except AlreadyExists as error:
        if error.reason != "PATIENT_ALREADY_HAS_TOKEN":
            raise
        raise Refused(error, _held_token(client, error, args)) from None
    times, zone = _day_view(client, args, args.doctor, args.date)
    text = [token_line(reply.token, times, zone)]
    if reply.moved_to_later_slot:
        text.append("The slot asked for was full: --flexible moved the patient to a later slot with a free seat.")
    if reply.HasField("bumped_token"):
        text.append(f"Bumped back to the waitlist: {token_line(reply.bumped_token, times, zone)}")
    out.show(reply, *text)


def tokens_get(client: OPDClient, args: argparse.Namespace, out: Printer) -> None:
    """The token's row, then when it moved through the day (queue time, check-in, call, end)."""
    reply = client.get_token(args.token_id)
    times, zone = _day_view(client, args, reply.token.doctor_id, reply.token.date)
    token = reply.token
    moments = []
    for what, field in (("booked", "created_at"), ("checked in", "checked_in_at"), ("called", "called_at"),
                        ("completed", "completed_at"), ("last change", "updated_at")):
        if at := clock(getattr(token, field), zone):
            day = getattr(token, field).ToDatetime(zone).date().isoformat()
            moments.append(f"{what} {at}" if day == token.date else f"{what} {day} {at}")  # booked days before
    out.show(reply, tokens_table([token], times, zone), ", ".join(moments))


def tokens_list(client: OPDClient, args: argparse.Namespace, out: Printer) -> None:
    tokens = list(client.iter_tokens(args.doctor, args.date))
    out.show(pb.ListTokensResponse(tokens=tokens),
             tokens_table(tokens, *_day_view(client, args, args.doctor, args.date)) if tokens
             else f"{args.doctor} has no tokens on {args.date}.")


# The day in the clinic

def checkin(client: OPDClient, args: argparse.Namespace, out: Printer) -> None:
    reply = client.check_in_token(args.token_id)
    out.show(reply, _after(client, args, reply.token))


def call_next(client: OPDClient, args: argparse.Namespace, out: Printer) -> None:
    reply = client.call_next(args.doctor, args.date)
    times, zone = _day_view(client, args, args.doctor, args.date)
    text = [f"Calling token {reply.token.token_number} ({reply.token.patient.name}): "
            f"{token_line(reply.token, times, zone)}"]
    if reply.HasField("completed_token"):
        text.append(f"Completed token {reply.completed_token.token_number} ({reply.completed_token.token_id}).")
    out.show(reply, *text)


def complete(client: OPDClient, args: argparse.Namespace, out: Printer) -> None:
    reply = client.complete_token(args.token_id)
    out.show(reply, _after(client, args, reply.token))


def cancel(client: OPDClient, args: argparse.Namespace, out: Printer) -> None:
    _show_release(client, args, out, client.cancel_token(args.token_id, args.reason))


def no_show(client: OPDClient, args: argparse.Namespace, out: Printer) -> None:
    _show_release(client, args, out, client.mark_no_show(args.token_id))


def _show_release(client: OPDClient, args: argparse.Namespace, out: Printer,
                  reply: pb.CancelTokenResponse | pb.MarkNoShowResponse) -> None:
    """A token that gave up its seat, and whom its seat went to."""
    times, zone = _day_view(client, args, reply.token.doctor_id, reply.token.date)
    out.show(reply, token_line(reply.token, times, zone), *_promoted(reply.promoted, times, zone))


# A doctor's day

def status(client: OPDClient, args: argparse.Namespace, out: Printer) -> None:
    doctor = client.get_doctor(args.doctor).doctor
    slots = list(client.iter_slots(args.doctor, args.date))
    statuses = [client.get_slot_status(slot.slot_id) for slot in slots]
    tokens = list(client.iter_tokens(args.doctor, args.date)) if slots else []
    data = {"doctor": doctor, "date": args.date, "slots": statuses, "tokens": tokens}
    header = f"{doctor.name} ({doctor.doctor_id}, {doctor.specialization}) on {weekday_word(args.date)} {args.date}"
    if not slots:
        out.show(data, header, f"No slots that day: add them with `opdctl slots add --doctor {args.doctor}`.")
        return
    times = {slot.slot_id: slot_time(slot) for slot in slots}
    by_status = {code: [t for t in tokens if t.status == code] for code in pb.Status.values()}
    out.show(data, header, seats_table(statuses),
             "Now calling: " + _names(by_status[pb.STATUS_CALLED]),
             "Checked in, waiting: " + _names(by_status[pb.STATUS_CHECKED_IN]),
             "Confirmed, not yet here: " + _names(by_status[pb.STATUS_CONFIRMED]),
             "Waitlisted: " + _names(by_status[pb.STATUS_WAITLISTED]),
             *([tokens_table(tokens, times, _hospital_zone(client, args, args.doctor, args.date))] if tokens else []))


def stats(client: OPDClient, args: argparse.Namespace, out: Printer) -> None:
    reply = client.get_stats(args.date, args.doctor or "")
    out.show(reply, stats_table(reply.stats) if reply.stats else f"No doctor has slots on {args.date}.")


def events(client: OPDClient, args: argparse.Namespace, out: Printer) -> None:
    history = list(client.iter_queue_events(args.doctor, args.date))
    out.show(pb.ListQueueEventsResponse(events=history),
             events_table(history, _hospital_zone(client, args, args.doctor, args.date)) if history
             else f"Nothing has happened for {args.doctor} on {args.date}.")


def report(client: OPDClient, args: argparse.Namespace, out: Printer) -> None:
    """Writes the end-of-day report (clients.report) and says, per doctor, the figures it holds."""
    path = Path(args.out or f"opd-day-report-{args.date}.html")
    try:
        day = write_report(client, args.date, args.doctor or (), path)
    except OSError as error:
        raise UsageError(f"cannot write the report to {path}: {error.strerror}") from None
    figures = [{"doctor_id": d.doctor_id, "tokens": d.total_tokens, "utilisation": d.utilisation, "bumps": d.bumps,
                "no_shows": d.no_shows, "cancellations": d.cancellations, "promotions": d.promotions.total}
               for d in day.doctors]
    out.show({"path": str(path.resolve()), "date": args.date, "doctors": figures},
             f"Wrote the report of {args.date} to {path.resolve()}" if day.doctors
             else f"Wrote an empty report: no doctor has slots on {args.date} ({path.resolve()}).",
             *([report_table(day.doctors)] if day.doctors else []))


def watch(client: OPDClient, args: argparse.Namespace, out: Printer) -> None:
    """Prints each snapshot and event as it comes; stops after --count events, or at Ctrl-C."""
    for doctor_id in args.doctor:  # an unknown doctor, or no server within --timeout, is said before watching
        client.get_doctor(doctor_id)
    zone = _hospital_zone(client, args, args.doctor[0], args.date)

    def reconnecting(error: OPDError) -> None:
        print(f"opdctl: lost the stream ({error.code.name}: {error.message}); reconnecting…", file=sys.stderr)

    seen = 0
    try:
        with client.watch(args.doctor, args.date, on_reconnect=reconnecting) as stream:
            for update in stream:
                if update.HasField("heartbeat"):
                    continue
                out.line(update, update_line(update, zone))
                seen += update.HasField("event")
                if args.count and seen >= args.count:
                    return
    except KeyboardInterrupt:
        return


# Helpers

def _slot_times(client: OPDClient, doctor_id: str, date: str) -> dict[str, str]:
    """Each slot's time range (e.g. "09:00-10:00") by slot_id: what a person reads instead of an id."""
    return {slot.slot_id: slot_time(slot) for slot in client.iter_slots(doctor_id, date)}


def _day_view(client: OPDClient, args: argparse.Namespace, doctor_id: str,
              date: str) -> tuple[dict[str, str], dt.tzinfo]:
    """What a token line or table of the doctor's day needs: its slots' times, and the clock to show times on."""
    if args.json:  # only the replies are printed: asking for what the text would show is two calls for nothing
        return {}, dt.timezone.utc
    return _slot_times(client, doctor_id, date), _hospital_zone(client, args, doctor_id, date)


# A --date left out where it means today (parser._date); not a string, which argparse would parse as a date.
TODAY: Any = object()


def fill_in_today(client: OPDClient, args: argparse.Namespace) -> None:
    """A --date left out is the hospital's today: on the clock of --timezone, else of the server's TIMEZONE (one
    GetStats call), not of this terminal, which may be a day off."""
    if getattr(args, "date", None) is TODAY:
        zone = args.timezone or server_zone(client.get_stats(dt.date.today().isoformat()))
        args.date = hospital_today(zone)


def _hospital_zone(client: OPDClient, args: argparse.Namespace, doctor_id: str, date: str) -> dt.tzinfo:
    """The zone times of day are shown in: --timezone, else the hospital's, the server's TIMEZONE as GetStats of the
    doctor's day names it. UTC if the server cannot say, never this terminal's zone, which may be hours off.
    With --json, UTC without asking: only the replies are printed, and their times are UTC."""
    if args.json:
        return dt.timezone.utc
    if args.timezone:
        return args.timezone
    try:
        return server_zone(client.get_stats(date, doctor_id))
    except OPDError:
        return dt.timezone.utc


def _after(client: OPDClient, args: argparse.Namespace, token: pb.Token) -> str:
    return token_line(token, *_day_view(client, args, token.doctor_id, token.date))


def _slots(count: int) -> str:
    return f"{count} slot" if count == 1 else f"{count} slots"


def _promoted(tokens: list[pb.Token], times: dict[str, str], zone: dt.tzinfo) -> list[str]:
    return [f"Promoted from the waitlist: {token_line(token, times, zone)}" for token in tokens]


def _names(tokens: list[pb.Token]) -> str:
    return ", ".join(f"{t.token_number} ({t.patient.name}, {place(t)})" if t.status == pb.STATUS_WAITLISTED
                     else f"{t.token_number} ({t.patient.name})" for t in tokens) or "nobody"


def _held_token(client: OPDClient, error: OPDError, args: argparse.Namespace) -> list[str]:
    """The active token the server says the patient already holds, as a line to show with the refusal."""
    held_id = error.metadata.get("token_id")
    held = next((t for t in client.iter_tokens(args.doctor, args.date) if t.token_id == held_id), None)
    if held is None:
        return []
    times, zone = _day_view(client, args, args.doctor, args.date)
    return [f"{held.patient.name} holds {token_line(held, times, zone)}"]


def _span(dates: list[dt.date]) -> str:
    first, last = (f"{weekday_word(d.isoformat())} {d}" for d in (dates[0], dates[-1]))
    return first if first == last else f"{first} to {last}"
