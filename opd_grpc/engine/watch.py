"""Live queues (SPEC §10): committed events fanned out to watchers, and the watch itself.

A watch subscribes first, then reads a snapshot (or the stored events after a sequence), then hands on live
events, skipping any the snapshot already holds and reading from the store any it did not see: so nothing is
missed and nothing repeated. The event table is the truth; the hub only wakes watchers. Each watcher has a
bounded buffer, and the hub never waits for one: a watcher that falls too far behind is told to resume.

Another process's changes (another replica's, on PostgreSQL) come as wake-ups, "doctor-day K has reached
sequence S", without their events: the hub reads them from the store, once for all its watchers of the day,
and hands them on in sequence with its own. Wake-ups can be lost, so the hub also compares the days watched with
the store's last sequences now and then (`catch_up_forever`).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime as dt
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from opd_grpc.engine.access import ANONYMOUS, Actor
from opd_grpc.engine.errors import Aborted, EngineError, Unavailable
from opd_grpc.engine.model import QueueEvent, TokenView

if TYPE_CHECKING:
    from opd_grpc.engine.service import DayKey, OPDService

log = logging.getLogger(__name__)

T = TypeVar("T")
Runner = Callable[..., Awaitable[Any]]  # runs a synchronous engine call where the server runs them
EventsAfter = Callable[["DayKey", int, int], Awaitable[list[QueueEvent]]]  # (day, after, limit), from the store
LastSequences = Callable[[list["DayKey"]], Awaitable[dict["DayKey", int]]]  # each day's last stored sequence
CATCH_UP_PAGE = 500
_SHUTTING_DOWN = Unavailable("The server is shutting down; reconnect (to another replica, if there is one) with "
                             "after_sequences set to the last sequence you received for each doctor.",
                             "SERVER_SHUTTING_DOWN")


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

    def __init__(self, keys: frozenset[DayKey], limit: int, watcher: Actor = ANONYMOUS):
        self.keys = keys
        self.limit = limit
        self.watcher = watcher  # who opened the watch: it ends if their key stops counting
        self.events: collections.deque[QueueEvent] = collections.deque()
        self.overflowed = False
        self.ended: EngineError | None = None  # why the watch must end
        self._ready = asyncio.Event()

    def end(self, why: EngineError) -> None:
        self.ended = why
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
        if not self.events and not self.overflowed and self.ended is None:
            try:
                async with asyncio.timeout(timeout):  # not wait_for, which makes a task for every wait
                    await self._ready.wait()
            except TimeoutError:
                return []
        self._ready.clear()
        if self.ended is not None:
            raise dataclasses.replace(self.ended)  # a copy of its own: a raise keeps its traceback
        if self.overflowed:
            raise Aborted(f"This watcher fell more than {self.limit} events behind; reconnect with "
                          "after_sequences set to the last sequence you received for each doctor.",
                          "WATCHER_FELL_BEHIND")
        batch = list(self.events)
        self.events.clear()
        return batch


class EventHub:
    """Hands each committed event to the subscriptions of its doctor-day, on the server's event loop, in
    sequence: this process's events as they commit, other processes' as read from the store."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subscriptions: dict[DayKey, set[Subscription]] = collections.defaultdict(set)
        self._closed = False
        self._handed_on: dict[DayKey, int] = {}  # per watched day, the last sequence handed to its subscriptions
        self._wanted: dict[DayKey, int] = {}  # per watched day, the last sequence known to be stored
        self._reading: dict[DayKey, asyncio.Task[None]] = {}  # per day, the read of what this process did not see
        self._events_after: EventsAfter | None = None
        self._catch_up_now = asyncio.Event()
        # Tells other processes that a day reached a sequence (on PostgreSQL: storage.notify's NOTIFY).
        self.announce: Callable[[DayKey, int], None] | None = None
        # Called with each batch that this process commits, in the committing thread (e.g. Metrics.queue_events).
        self.listeners: list[Callable[[list[QueueEvent]], None]] = []

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    @property
    def watchers(self) -> int:
        return len({id(s) for subs in self._subscriptions.values() for s in subs})

    def subscribe(self, keys: Iterable[DayKey], limit: int, watcher: Actor = ANONYMOUS) -> Subscription:
        subscription = Subscription(frozenset(keys), limit, watcher)
        for key in subscription.keys:
            self._subscriptions[key].add(subscription)
        if self._closed:
            subscription.end(_SHUTTING_DOWN)
        return subscription

    def close(self) -> None:
        """At shutdown: every watch ends, telling its client to reconnect, and so does every later one."""
        self._closed = True
        self.end_watches(_SHUTTING_DOWN)

    def end_watches(self, why: EngineError, of: Callable[[Actor], bool] = lambda watcher: True) -> None:
        """Every watch open now (of the watchers `of` picks) ends with `why`: UNAVAILABLE tells its client to
        reconnect, as while this server cannot read its database (health NOT_SERVING), when a watch would hear no
        other replica's changes and its heartbeats would tell the client it had them all; UNAUTHENTICATED ends
        the watches of a key since revoked."""
        for subs in self._subscriptions.values():
            for subscription in subs:
                if subscription.ended is None and of(subscription.watcher):
                    subscription.end(why)

    def unsubscribe(self, subscription: Subscription) -> None:
        for key in subscription.keys:
            subs = self._subscriptions.get(key)
            if subs is not None:
                subs.discard(subscription)
                if not subs:
                    del self._subscriptions[key]
                    self._handed_on.pop(key, None)
                    self._wanted.pop(key, None)

    def publish(self, events: list[QueueEvent]) -> None:
        """Called after each commit while the doctor-day is still locked, so a day's events arrive in order."""
        if not events:
            return
        if self.announce is not None:
            self.announce((events[0].doctor_id, events[0].date), events[-1].sequence)
        for listener in self.listeners:
            try:
                listener(events)
            except Exception:  # the change is committed: a listener's failure must not fail the call
                log.exception("an event listener failed")
        if self._loop is None or self._loop.is_closed():
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
        key = (events[0].doctor_id, events[0].date)
        last = self._handed_on.get(key)
        if last is not None and (key in self._reading or events[0].sequence > last + 1):
            self._want(key, events[-1].sequence)  # another process's events come first: the read brings all
        else:
            self._hand_on(key, events)

    def _hand_on(self, key: DayKey, events: list[QueueEvent]) -> None:
        """Offers the day's events that its subscriptions were not handed yet (some may have been read from the
        store already)."""
        subs = self._subscriptions.get(key)
        if not subs:
            return
        last = self._handed_on.get(key)
        if last is not None and events[0].sequence <= last:
            events = [e for e in events if e.sequence > last]
            if not events:
                return
        self._handed_on[key] = events[-1].sequence
        for subscription in list(subs):
            subscription.offer(events)

    def started(self, key: DayKey, sequence: int) -> None:
        """A watch has read `key` from the store up to `sequence`: the hub reads what it misses from there."""
        if key in self._subscriptions and key not in self._handed_on:
            self._handed_on[key] = sequence
            self._want(key, self._wanted.get(key, 0))

    def remote_change(self, key: DayKey, sequence: int) -> None:
        """From any thread: another process committed `key`'s events up to `sequence`."""
        self._call_on_loop(self._want, key, sequence)

    def catch_up_soon(self) -> None:
        """From any thread: wake-ups may have been lost (a listener reconnected), so compare with the store now."""
        self._call_on_loop(self._catch_up_now.set)

    def _call_on_loop(self, callback: Callable[..., None], *args: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(callback, *args)

    def _want(self, key: DayKey, sequence: int) -> None:
        """`key` has reached `sequence` in the store: read what the watchers were not handed, unless under way."""
        if key not in self._subscriptions:
            return
        if sequence > self._wanted.get(key, 0):
            self._wanted[key] = sequence
        last = self._handed_on.get(key)  # None: no watch has started; the first to start sets it
        if last is not None and sequence > last and key not in self._reading and self._events_after is not None:
            self._reading[key] = asyncio.create_task(self._read_missed(key, self._events_after))

    async def _read_missed(self, key: DayKey, events_after: EventsAfter) -> None:
        try:
            while key in self._handed_on and self._handed_on[key] < self._wanted.get(key, 0):
                page = await events_after(key, self._handed_on[key], CATCH_UP_PAGE)
                if not page:
                    break  # nothing stored after it: the wake-up was stale
                self._hand_on(key, page)
        except Exception as error:  # e.g. the database is away: the next catch-up pass tries again
            log.warning("could not read %s %s's events from the store: %s", key[0], key[1], error)
        finally:
            del self._reading[key]

    async def catch_up_forever(self, events_after: EventsAfter, last_sequences: LastSequences,
                               interval: float) -> None:
        """Reads what wake-ups announce, and is the net under them: every `interval` seconds, and at once after
        `catch_up_soon`, the store's last sequence of every watched day (one query for the whole process) makes
        the hub read what it has not handed on. This also covers a change whose commit was reported unknown,
        and other processes writing the same SQLite file."""
        self._events_after = events_after
        while True:
            try:
                async with asyncio.timeout(interval):
                    await self._catch_up_now.wait()
            except TimeoutError:
                pass
            self._catch_up_now.clear()
            if not self._handed_on:
                continue
            try:
                stored = await last_sequences(list(self._handed_on))
            except Exception as error:  # e.g. the database is away: the next pass tries again
                log.warning("watch catch-up could not read the last sequences: %s", error)
                continue
            for key, sequence in stored.items():
                self._want(key, sequence)


class QueueWatch:
    """SPEC §10's stream for one watcher, as engine values: Snapshot, QueueEvent and Heartbeat."""

    def __init__(self, service: OPDService, run: Runner, heartbeat_seconds: float, buffer_events: int):
        self.service = service
        self.run = run
        self.heartbeat_seconds = heartbeat_seconds
        self.buffer_events = buffer_events

    async def stream(self, plan: list[tuple[DayKey, int | None]],
                     watcher: Actor = ANONYMOUS) -> AsyncIterator[Snapshot | QueueEvent | Heartbeat]:
        """`plan` (from OPDService.watch_plan): each doctor-day with None for a snapshot or the sequence to
        resume after; `watcher`, who asked."""
        hub = self.service.events
        subscription = hub.subscribe((key for key, _ in plan), self.buffer_events, watcher)  # before reading: no gap
        last: dict[DayKey, int] = {}
        try:
            for key, after in plan:
                if after is None:
                    snapshot = await self.run(self.service.queue_snapshot, key)
                    last[key] = snapshot.sequence
                    yield snapshot
                else:
                    last[key] = after
                    async for event in self._stored(key, after):
                        last[key] = event.sequence
                        yield event
                hub.started(key, last[key])
            while True:
                batch = await subscription.take(self.heartbeat_seconds)
                if not batch:
                    yield Heartbeat(self.service.clock.now(), {key[0]: seq for key, seq in last.items()})
                for event in batch:
                    key = (event.doctor_id, event.date)
                    if event.sequence <= last[key]:
                        continue  # already in the snapshot or read from the store
                    if event.sequence > last[key] + 1:  # the hub started past this watch: the store has the rest
                        async for missed in self._stored(key, last[key]):
                            last[key] = missed.sequence
                            yield missed
                        continue
                    last[key] = event.sequence
                    yield event
        finally:
            hub.unsubscribe(subscription)

    async def _stored(self, key: DayKey, after: int) -> AsyncIterator[QueueEvent]:
        """The stored events of a day after `after`, a page at a time."""
        while True:
            page = await self.run(self.service.events_after, key, after, CATCH_UP_PAGE)
            for event in page:
                yield event
                after = event.sequence
            if len(page) < CATCH_UP_PAGE:
                return
