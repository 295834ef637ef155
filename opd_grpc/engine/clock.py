"""The service clock (SPEC §8): the wall clock, or in tests and the simulation a clock they move."""

from __future__ import annotations

import datetime as dt
import threading
from typing import Protocol


class Clock(Protocol):
    def now(self) -> dt.datetime:
        """The current time, timezone-aware (UTC)."""
        ...


class WallClock:
    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.timezone.utc)


class TestClock:
    """Starts at the wall clock's time and then moves only when told to."""

    __test__ = False  # not a pytest class

    def __init__(self, start: dt.datetime | None = None):
        self._now = start or dt.datetime.now(dt.timezone.utc)
        self._lock = threading.Lock()

    def now(self) -> dt.datetime:
        with self._lock:
            return self._now

    def set(self, when: dt.datetime) -> dt.datetime:
        with self._lock:
            self._now = when.astimezone(dt.timezone.utc)
            return self._now

    def advance(self, by: dt.timedelta) -> dt.datetime:
        with self._lock:
            self._now += by
            return self._now
