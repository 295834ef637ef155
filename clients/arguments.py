"""Command-line values that opdctl and the display board both read, checked as the server would check them, so
that a mistake is a usage error (exit 2) on the desk's machine and not a refusal, or a call to another server."""

from __future__ import annotations

import argparse
import datetime as dt
import re
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError


def date(text: str) -> str:
    """A YYYY-MM-DD calendar date, as the server takes it."""
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text, re.ASCII):
        raise argparse.ArgumentTypeError(f"{text!r} is not a date of the form YYYY-MM-DD")
    try:
        return dt.date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a calendar date (no such day)") from None


def address(text: str) -> str:
    """The server's HOST:PORT. gRPC would take a port past 65535 modulo 65536, and call another server."""
    port = text.rpartition(":")[2]
    if port.isascii() and port.lstrip("+-").isdigit() and not (port.isdigit() and 0 < int(port) <= 65535):
        raise argparse.ArgumentTypeError(f"{text!r}: the port must be from 1 to 65535")
    return text


def zone(text: str) -> ZoneInfo:
    """An IANA time zone, e.g. Asia/Kolkata."""
    try:
        return ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a region's directory, e.g. "Asia"
        raise argparse.ArgumentTypeError(f"{text!r} is not an IANA time zone, e.g. Asia/Kolkata") from None
