"""Reads a day's figures from a server through the client library, and writes the report's page."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from clients.library import OPDClient, server_zone
from clients.report import page
from clients.report.figures import DayReport, build_report


def fetch_report(client: OPDClient, date: str, doctor_ids: Sequence[str] = ()) -> DayReport:
    """The report of `date` for `doctor_ids` (none: every doctor with slots that day, as GetStats answers).

    Times are drawn on the hospital's wall clock, the server's TIMEZONE as GetStats names it: slot times are given
    there. Refusals raise OPDError."""
    replies = [client.get_stats(date, doctor_id) for doctor_id in doctor_ids] or [client.get_stats(date)]
    stats = [s for reply in replies for s in reply.stats]
    zone = server_zone(replies[0])
    doctors = {s.doctor_id: client.get_doctor(s.doctor_id).doctor for s in stats}
    slots = {s.doctor_id: list(client.iter_slots(s.doctor_id, date)) for s in stats}
    events = {s.doctor_id: list(client.iter_queue_events(s.doctor_id, date)) for s in stats}
    return build_report(date, stats, events, slots, doctors, zone)


def write_report(client: OPDClient, date: str, doctor_ids: Sequence[str], path: str | Path) -> DayReport:
    """Fetches the report (see `fetch_report`) and writes it to `path` as one HTML page; answers its figures."""
    report = fetch_report(client, date, doctor_ids)
    Path(path).write_text(page.render(report), encoding="utf-8")
    return report
