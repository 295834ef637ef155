"""Checks of caller input (SPEC §12): every malformed field is named, with what to send instead."""

from __future__ import annotations

import datetime as dt
import re
import unicodedata
import uuid

from opd_grpc.engine.errors import FieldViolation, InvalidArgument

_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_TIME = re.compile(r"^\d{2}:\d{2}$")
_DOCTOR_ID = re.compile(r"^[A-Z]+\d+$")
# Dates the service takes: every instant of them, in any time zone, is a valid google.protobuf.Timestamp, and so
# is every estimated time of their slots (at most MAX_SLOT_CAPACITY x MAX_CONSULTATION_MINUTES, under 3 years, on).
FIRST_DATE, LAST_DATE = dt.date(1900, 1, 1), dt.date(9989, 12, 31)
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
DOCTOR_ID_MAX = 16  # the doctors table's key
REQUEST_ID_MAX = 36  # a UUID with its hyphens: the width of the stored requests' and the audit log's column
# A refusal must reach the caller: gRPC drops a reply whose status (message and details, in its trailers) is over
# 8-16 KiB and hands the client a bare RESOURCE_EXHAUSTED instead. So a refusal quotes at most SHOWN_CHARS of a
# value, and names at most MAX_VIOLATIONS problems (a batch of 60 bad slots is still told what to fix first).
SHOWN_CHARS = 40
_LINE_BREAKS = frozenset("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")
# Embeddings, overrides and isolates (U+202A-U+202E, U+2066-U+2069): a name holding one shows other text reversed.
_WITHOUT_BIDI_CONTROLS = dict.fromkeys(map(ord, "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"))
MAX_VIOLATIONS = 10


def shown(text: str) -> str:
    """`text` quoted for a refusal, cut to SHOWN_CHARS."""
    if len(text) <= SHOWN_CHARS:
        return repr(text)
    return f"{text[:SHOWN_CHARS]!r}... ({len(text)} characters)"


class Violations:
    """Collects field problems so that one reply names all of them."""

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        if len(field) > 2 * SHOWN_CHARS:  # a path that names a caller's map key, e.g. after_sequences[...]
            field = field[:2 * SHOWN_CHARS] + "..."
        self.items.append(FieldViolation(field, description))

    def date(self, field: str, text: str) -> dt.date:
        if not text:
            self.add(field, "is required, as YYYY-MM-DD")
        elif _DATE.match(text):
            try:
                date = dt.date.fromisoformat(text)
            except ValueError:
                self.add(field, f"{shown(text)} is not a calendar date")
            else:
                if FIRST_DATE <= date <= LAST_DATE:
                    return date
                self.add(field, f"{text} is outside {FIRST_DATE} to {LAST_DATE}")
        else:
            self.add(field, f"{shown(text)} is not a date of the form YYYY-MM-DD")
        return dt.date.min

    def time(self, field: str, text: str) -> dt.time:
        if not text:
            self.add(field, "is required, as HH:MM")
        elif _TIME.match(text):
            try:
                return dt.time.fromisoformat(text)
            except ValueError:
                self.add(field, f"{shown(text)} is not a time of day (00:00 to 23:59)")
        else:
            self.add(field, f"{shown(text)} is not a time of the form HH:MM")
        return dt.time.min

    def instant(self, field: str, seconds_nanos: tuple[int, int] | None) -> dt.datetime | None:
        """A google.protobuf.Timestamp's (seconds, nanos), or None when it was not sent."""
        if seconds_nanos is None:
            return None
        seconds, nanos = seconds_nanos
        if 0 <= nanos < 1_000_000_000:
            try:
                return _EPOCH + dt.timedelta(seconds=seconds, microseconds=nanos // 1000)
            except OverflowError:
                pass
        self.add(field, "is not a valid timestamp (years 1 to 9999, nanos 0 to 999,999,999)")
        return None

    def text(self, field: str, text: str, max_len: int = 200, required: bool = True) -> str:
        """Text to store or to look up: one line (a name on a board, a row of a table, a line of the audit log),
        with no control characters (PostgreSQL takes no NUL in text; a tab is taken as a space). The bidirectional
        controls that make text show in another order than it reads are taken out (a phone's keyboard wraps a
        right-to-left name in some: its letters are kept)."""
        value = text.translate(_WITHOUT_BIDI_CONTROLS).replace("\t", " ").strip()  # a tab would break a table
        if not value and required:
            self.add(field, "is required")
        elif required and not any(unicodedata.category(ch)[0] not in "CZ" for ch in value):
            self.add(field, "has no character a person can see (only spaces or invisible marks); it is required")
        elif len(value) > max_len:
            self.add(field, f"is longer than {max_len} characters")
        elif any(ch in _LINE_BREAKS for ch in value):
            self.add(field, "contains a line break; send it on one line")
        elif control := next((ch for ch in value if unicodedata.category(ch) == "Cc"), None):
            self.add(field, f"contains the control character U+{ord(control):04X}; send printable text")
        return value

    def doctor_id(self, field: str, text: str) -> str:
        if not text:
            self.add(field, "is required (e.g. DOC001)")
        elif len(text) > DOCTOR_ID_MAX or not _DOCTOR_ID.match(text):
            self.add(field, f"{shown(text)} is not a doctor id (e.g. DOC001)")
        return text

    def request_id(self, text: str) -> str:
        if text and not is_uuid(text):
            self.add("request_id", f"{shown(text)} is not a UUID (e.g. 123e4567-e89b-12d3-a456-426614174000)")
        return text

    def check(self) -> None:
        if len(self.items) > MAX_VIOLATIONS:
            more = len(self.items) - MAX_VIOLATIONS + 1
            raise InvalidArgument([*self.items[:MAX_VIOLATIONS - 1],
                                   FieldViolation("request", f"{more} more problems; fix the ones above first")])
        if self.items:
            raise InvalidArgument(self.items)


def canonical_uuid(text: str) -> str:
    """A request_id in one spelling of its UUID (lower case, with hyphens), so that one UUID written in capitals
    or without hyphens is still the same request_id (SPEC §9); text that is no UUID is kept, for its refusal."""
    return str(uuid.UUID(text)) if is_uuid(text) else text


def is_uuid(text: str) -> bool:
    """A UUID in a form that fits the request_id columns: hex digits, with or without hyphens."""
    if len(text) > REQUEST_ID_MAX:
        return False
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True
