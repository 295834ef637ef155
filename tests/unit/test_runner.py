"""The engine's thread pool (PostgreSQL): a call whose caller left while it waited for a thread is never run; one
that a thread had begun runs to its end, and the call waits for it (its transaction may commit)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from opd_grpc.api.runner import EngineRunner

pytestmark = pytest.mark.backend_independent
WAIT = 10.0


def test_a_call_cancelled_while_it_waits_for_a_thread_never_runs_and_one_begun_runs_to_its_end():
    """200 bookings whose 2 s deadlines passed while the pool's threads were held (a lock another replica kept)
    had all been made 40 s later, each caller told DEADLINE_EXCEEDED (a reviewer's find)."""
    runner = EngineRunner(threads=1)
    release, began = threading.Event(), threading.Event()
    ran: list[str] = []

    def held() -> str:
        began.set()
        release.wait(WAIT)
        ran.append("held")
        return "held"

    def queued() -> str:
        ran.append("queued")
        return "queued"

    async def scenario() -> None:
        first = asyncio.create_task(runner(held))
        await asyncio.to_thread(began.wait, WAIT)
        second = asyncio.create_task(runner(queued))
        await asyncio.sleep(0.05)
        first.cancel()
        second.cancel()  # both callers leave: the first call is running, the second waits for the thread
        with pytest.raises(asyncio.CancelledError):
            await second  # at once, while the thread is still held
        assert not first.done()  # it waits for what its thread does
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await first

    try:
        asyncio.run(scenario())
    finally:
        runner.shutdown()
    assert ran == ["held"]
