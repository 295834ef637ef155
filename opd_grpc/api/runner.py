"""Where the synchronous engine runs for the asyncio server."""

from __future__ import annotations

import asyncio
import contextvars
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

T = TypeVar("T")

# Where an engine call goes that the call's task was cancelled in (its caller left, or the server stopped) and that
# then ran to its end on its thread: the call pipeline sets it around a unary call's servicer and logs what was done
# (api/interceptors.py).
UNHEARD: contextvars.ContextVar[list[asyncio.Future[Any]] | None] = contextvars.ContextVar("opd_unheard",
                                                                                           default=None)


class EngineRunner:
    """On SQLite, engine calls run on the event loop itself: SQLite has one writer and a WAL commit does not
    wait for the disk, so a thread pool would only add a hand-off and serve the writer lock in no fixed order
    (measured: most of an allocation's cost at 32 calls in flight). A database over the network makes calls
    wait on I/O, so there they go to a pool of threads and wait there."""

    def __init__(self, threads: int):
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="opd-engine") if threads else None

    async def __call__(self, fn: Callable[..., T], *args: Any) -> T:
        if self.pool is None:
            return fn(*args)
        queued = self.pool.submit(fn, *args)
        running = asyncio.wrap_future(queued)
        try:
            return await asyncio.shield(running)
        except asyncio.CancelledError:
            if queued.cancel():  # still waiting for a thread (its caller gone, its deadline past): it never runs
                raise
            # A thread cannot be stopped half-way, and its transaction may commit: wait for it, so that the call's
            # access-log line says what was done, not that nothing was.
            while not running.done():
                try:
                    await asyncio.wait([running])
                except asyncio.CancelledError:
                    continue
            running.exception()  # seen: an error nobody hears of is not then reported as lost by asyncio
            if (unheard := UNHEARD.get()) is not None:
                unheard.append(running)
            raise

    def shutdown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
