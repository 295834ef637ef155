"""Reads a day's figures from a server through the client library, and writes the report's page."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Sequence

from clients.library import OPDClient
from clients.report import page
from clients.report.figures import DayReport, build_report
from opd_grpc._gen.opd.v1 import opd_pb2 as pb


def fetch_report(client: OPDClient, date: str, doctor_ids: Sequence[str] = (), *,
                 timezone: dt.tzinfo = dt.timezone.utc) -> DayReport:
    """The report of `date` for `doctor_ids` (none: every doctor with slots that day, as GetStats answers).

    `timezone` is the server's TIMEZONE (its slot times are wall-clock times there). Refusals raise OPDError."""
    stats: list[pb.DoctorDayStats] = []
    if doctor_ids:
        for doctor_id in doctor_ids:
            stats += client.get_stats(date, doctor_id).stats
    else:
        stats = list(client.get_stats(date).stats)
    doctors = {s.doctor_id: client.get_doctor(s.doctor_id).doctor for s in stats}
    slots = {s.doctor_id: list(client.iter_slots(s.doctor_id, date)) for s in stats}
    events = {s.doctor_id: list(client.iter_queue_events(s.doctor_id, date)) for s in stats}
    return build_report(date, stats, events, slots, doctors, timezone)


def write_report(client: OPDClient, date: str, doctor_ids: Sequence[str], path: str | Path, *,
                 timezone: dt.tzinfo = dt.timezone.utc) -> DayReport:
    """Fetches the report (see `fetch_report`) and writes it to `path` as one HTML page; answers its figures."""
    report = fetch_report(client, date, doctor_ids, timezone=timezone)
    Path(path).write_text(page.render(report), encoding="utf-8")
    return report
