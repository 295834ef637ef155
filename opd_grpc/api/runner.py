"""Where the synchronous engine runs for the asyncio server."""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

T = TypeVar("T")


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
        return await asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(fn, *args))

    def shutdown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
