"""Checks of caller input (SPEC §12): every malformed field is named, with what to send instead."""

from __future__ import annotations

import datetime as dt
import re
import uuid

from opd_grpc.engine.errors import FieldViolation, InvalidArgument

_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_TIME = re.compile(r"^\d{2}:\d{2}$")
_DOCTOR_ID = re.compile(r"^[A-Z]+\d+$")
# Dates the service takes: every instant of them, in any time zone, is a valid google.protobuf.Timestamp.
FIRST_DATE, LAST_DATE = dt.date(1900, 1, 1), dt.date(9998, 12, 31)


class Violations:
    """Collects field problems so that one reply names all of them."""

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self.items.append(FieldViolation(field, description))

    def date(self, field: str, text: str) -> dt.date:
        if not text:
            self.add(field, "is required, as YYYY-MM-DD")
        elif _DATE.match(text):
            try:
                date = dt.date.fromisoformat(text)
            except ValueError:
                self.add(field, f"{text!r} is not a calendar date")
            else:
                if FIRST_DATE <= date <= LAST_DATE:
                    return date
                self.add(field, f"{text} is outside {FIRST_DATE} to {LAST_DATE}")
        else:
            self.add(field, f"{text!r} is not a date of the form YYYY-MM-DD")
        return dt.date.min

    def time(self, field: str, text: str) -> dt.time:
        if not text:
            self.add(field, "is required, as HH:MM")
        elif _TIME.match(text):
            try:
                return dt.time.fromisoformat(text)
            except ValueError:
                self.add(field, f"{text!r} is not a time of day (00:00 to 23:59)")
        else:
            self.add(field, f"{text!r} is not a time of the form HH:MM")
        return dt.time.min

    def text(self, field: str, text: str, max_len: int = 200, required: bool = True) -> str:
        value = text.strip()
        if not value and required:
            self.add(field, "is required")
        elif len(value) > max_len:
            self.add(field, f"is longer than {max_len} characters")
        return value

    def doctor_id(self, field: str, text: str) -> str:
        if not text:
            self.add(field, "is required (e.g. DOC001)")
        elif not _DOCTOR_ID.match(text):
            self.add(field, f"{text!r} is not a doctor id (e.g. DOC001)")
        return text

    def request_id(self, text: str) -> str:
        if text:
            try:
                uuid.UUID(text)
            except ValueError:
                self.add("request_id", f"{text!r} is not a UUID")
        return text

    def check(self) -> None:
        if self.items:
            raise InvalidArgument(self.items)
