"""Limits that keep one caller or a burst from toppling the server: calls a second per API key, and calls and
watch streams in flight (SPEC §12: RESOURCE_EXHAUSTED)."""

from __future__ import annotations

import time
from typing import Callable

from opd_grpc.engine.errors import ResourceExhausted


class RateLimiter:
    """`per_second` a second per key (0: no limit), with a burst of one second's: a token bucket per key (a key id
    for RATE_LIMIT_PER_KEY, one for all calls on a keyless development server; a client address for
    AUDITED_DENIALS_PER_PEER). Counted per server process."""

    MAX_BUCKETS = 10_000  # past this many keys, the full buckets (keys quiet for a second) are forgotten

    def __init__(self, per_second: int, clock: Callable[[], float] = time.monotonic):
        self.per_second = per_second
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (calls left, when counted)

    def take(self, key: str) -> bool:
        """Whether `key` may have one more now (and it is counted)."""
        if not self.per_second:
            return True
        now = self.clock()
        left, then = self._buckets.get(key, (self.per_second, now))
        left = min(self.per_second, left + (now - then) * self.per_second)
        if len(self._buckets) >= self.MAX_BUCKETS and key not in self._buckets:
            self._buckets = {k: (n, t) for k, (n, t) in self._buckets.items()
                             if n + (now - t) * self.per_second < self.per_second}
        if left < 1:
            self._buckets[key] = (left, now)
            return False
        self._buckets[key] = (left - 1, now)
        return True

    def admit(self, key_id: str) -> None:
        """RATE_LIMIT_PER_KEY: the call goes on, or is refused RATE_LIMITED."""
        if not self.take(key_id):
            left, _ = self._buckets[key_id]
            wait = (1 - left) / self.per_second
            raise ResourceExhausted(f"This API key has made more than {self.per_second} calls a second; wait "
                                    f"{wait:.2f} s and send the call again.", "RATE_LIMITED")


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
