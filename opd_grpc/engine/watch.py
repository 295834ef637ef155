"""Live queues (SPEC §10): committed events fanned out to watchers, and the watch itself.

A watch subscribes first, then reads a snapshot (or the stored events after a sequence), then hands on live
events, skipping any the snapshot already holds and reading from the store any it did not see: so nothing is
missed and nothing repeated. The event table is the truth; the hub only wakes watchers. Each watcher has a
bounded buffer, and the hub never waits for one: a watcher that falls too far behind is told to resume.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from opd_grpc.engine.errors import Aborted, Unavailable
from opd_grpc.engine.model import QueueEvent, TokenView

if TYPE_CHECKING:
    from opd_grpc.engine.service import DayKey, OPDService

T = TypeVar("T")
Runner = Callable[..., Awaitable[Any]]  # runs a synchronous engine call where the server runs them
CATCH_UP_PAGE = 500


@dataclass(frozen=True)
class Snapshot:
    """One doctor's tokens on the date as of event `sequence`."""

    doctor_id: str
    date: dt.date
    sequence: int
    tokens: list[TokenView]


@dataclass(frozen=True)
class Heartbeat:
    """A quiet stream's sign of life: the latest sequence of each doctor watched."""

    time: dt.datetime
    latest_sequences: dict[str, int]


class Subscription:
    """One watcher's buffer of live events, filled by the hub and emptied by the watch."""

    def __init__(self, keys: frozenset[DayKey], limit: int):
        self.keys = keys
        self.limit = limit
        self.events: collections.deque[QueueEvent] = collections.deque()
        self.overflowed = False
        self.closed = False
        self._ready = asyncio.Event()

    def close(self) -> None:
        self.closed = True
        self._ready.set()

    def offer(self, events: list[QueueEvent]) -> None:
        if self.overflowed:
            return
        if len(self.events) + len(events) > self.limit:
            self.overflowed = True  # the buffer is dropped: the watch ends and the client resumes from the store
            self.events.clear()
        else:
            self.events.extend(events)
        self._ready.set()

    async def take(self, timeout: float) -> list[QueueEvent]:
        """The events buffered so far, waiting up to `timeout` seconds for one ([] if none came)."""
        if not self.events and not self.overflowed and not self.closed:
            try:
                async with asyncio.timeout(timeout):  # not wait_for, which makes a task for every wait
                    await self._ready.wait()
            except TimeoutError:
                return []
        self._ready.clear()
        if self.closed:
            raise Unavailable("The server is shutting down; reconnect (to another replica, if there is one) with "
                              "after_sequences set to the last sequence you received for each doctor.",
                              "SERVER_SHUTTING_DOWN")
        if self.overflowed:
            raise Aborted(f"This watcher fell more than {self.limit} events behind; reconnect with "
                          "after_sequences set to the last sequence you received for each doctor.",
                          "WATCHER_FELL_BEHIND")
        batch = list(self.events)
        self.events.clear()
        return batch


class EventHub:
    """Hands each committed event to the subscriptions of its doctor-day, on the server's event loop."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subscriptions: dict[DayKey, set[Subscription]] = collections.defaultdict(set)
        self._closed = False

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    @property
    def watchers(self) -> int:
        return len({id(s) for subs in self._subscriptions.values() for s in subs})

    def subscribe(self, keys: Iterable[DayKey], limit: int) -> Subscription:
        subscription = Subscription(frozenset(keys), limit)
        for key in subscription.keys:
            self._subscriptions[key].add(subscription)
        if self._closed:
            subscription.close()
        return subscription

    def close(self) -> None:
        """At shutdown: every watch ends, telling its client to reconnect."""
        self._closed = True
        for subs in self._subscriptions.values():
            for subscription in subs:
                subscription.close()

    def unsubscribe(self, subscription: Subscription) -> None:
        for key in subscription.keys:
            subs = self._subscriptions.get(key)
            if subs is not None:
                subs.discard(subscription)
                if not subs:
                    del self._subscriptions[key]

    def publish(self, events: list[QueueEvent]) -> None:
        """Called after each commit while the doctor-day is still locked, so a day's events arrive in order."""
        if not events or self._loop is None or self._loop.is_closed():
            return
        batch = list(events)  # the day clears its pending list once this returns
        try:
            on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._deliver(batch)
        else:
            self._loop.call_soon_threadsafe(self._deliver, batch)

    def _deliver(self, events: list[QueueEvent]) -> None:
        subs = self._subscriptions.get((events[0].doctor_id, events[0].date))
        for subscription in list(subs or ()):
            subscription.offer(events)


class QueueWatch:
    """SPEC §10's stream for one watcher, as engine values: Snapshot, QueueEvent and Heartbeat."""

    def __init__(self, service: OPDService, run: Runner, heartbeat_seconds: float, buffer_events: int):
        self.service = service
        self.run = run
        self.heartbeat_seconds = heartbeat_seconds
        self.buffer_events = buffer_events

    async def stream(self, plan: list[tuple[DayKey, int | None]]) -> AsyncIterator[Snapshot | QueueEvent | Heartbeat]:
        """`plan` (from OPDService.watch_plan): each doctor-day with None for a snapshot or the sequence to
        resume after."""
        hub = self.service.events
        subscription = hub.subscribe((key for key, _ in plan), self.buffer_events)  # before reading: no gap
        last: dict[DayKey, int] = {}
        try:
            for key, after in plan:
                if after is None:
                    snapshot = await self.run(self.service.queue_snapshot, key)
                    last[key] = snapshot.sequence
                    yield snapshot
                else:
                    last[key] = after
                    async for event in self._stored(key, after, None):
                        last[key] = event.sequence
                        yield event
            while True:
                batch = await subscription.take(self.heartbeat_seconds)
                if not batch:
                    yield Heartbeat(self.service.clock.now(), {key[0]: seq for key, seq in last.items()})
                for event in batch:
                    key = (event.doctor_id, event.date)
                    if event.sequence <= last[key]:
                        continue  # already in the snapshot or read from the store
                    if event.sequence > last[key] + 1:  # not handed to this process (another replica wrote it)
                        async for missed in self._stored(key, last[key], event.sequence - 1):
                            last[key] = missed.sequence
                            yield missed
                    last[key] = event.sequence
                    yield event
        finally:
            hub.unsubscribe(subscription)

    async def _stored(self, key: DayKey, after: int, until: int | None) -> AsyncIterator[QueueEvent]:
        """The stored events of a day after `after` (up to `until`), a page at a time."""
        while True:
            page = await self.run(self.service.events_after, key, after, CATCH_UP_PAGE)
            for event in page:
                if until is not None and event.sequence > until:
                    return
                yield event
                after = event.sequence
            if len(page) < CATCH_UP_PAGE:
                return
