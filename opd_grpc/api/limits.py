"""Limits that keep one caller or a burst from toppling the server: calls a second per API key, and calls and
watch streams in flight (SPEC §12: RESOURCE_EXHAUSTED)."""

from __future__ import annotations

import time
from typing import Callable

from opd_grpc.engine.errors import ResourceExhausted


class RateLimiter:
    """RATE_LIMIT_PER_KEY calls a second per key (0: off), with a burst of one second's calls: a token bucket per
    key id (one for all calls on a keyless development server). Counted per server process."""

    def __init__(self, per_second: int, clock: Callable[[], float] = time.monotonic):
        self.per_second = per_second
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key id -> (calls left, when counted)

    def admit(self, key_id: str) -> None:
        if not self.per_second:
            return
        now = self.clock()
        left, then = self._buckets.get(key_id, (self.per_second, now))
        left = min(self.per_second, left + (now - then) * self.per_second)
        if left < 1:
            self._buckets[key_id] = (left, now)
            wait = (1 - left) / self.per_second
            raise ResourceExhausted(f"This API key has made more than {self.per_second} calls a second; wait "
                                    f"{wait:.2f} s and send the call again.", "RATE_LIMITED")
        self._buckets[key_id] = (left - 1, now)


class InFlight:
    """A count of calls (or streams) in flight, refused past `limit`."""

    def __init__(self, limit: int, refusal: str, reason: str):
        self.limit = limit
        self.count = 0
        self._refusal = refusal
        self._reason = reason

    def __enter__(self) -> None:
        if self.count >= self.limit:
            raise ResourceExhausted(self._refusal, self._reason)
        self.count += 1

    def __exit__(self, *exc: object) -> None:
        self.count -= 1


def calls_in_flight(limit: int) -> InFlight:
    return InFlight(limit, f"The server is handling {limit} calls (MAX_CONCURRENT_CALLS); send this one again in "
                           "a moment.", "TOO_MANY_CALLS")


def watchers(limit: int) -> InFlight:
    return InFlight(limit, f"The server has {limit} open WatchQueue streams (MAX_WATCHERS); watch from another "
                           "replica or try again later.", "TOO_MANY_WATCHERS")
