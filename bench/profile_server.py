"""`python -m bench.profile_server OUT`: `python -m opd_grpc` under cProfile, in every thread that runs Python
(the event loop and, off SQLite, the engine's worker pool), written to OUT (pstats) and OUT.txt (the top functions) when it
stops. `python -m bench --profile OUT` runs the bench against it; expect the profiler to slow the server.

Times are each thread's CPU time (`time.thread_time`), not wall time: the server is bound by one core (the
GIL), and wall time would charge every worker thread for the time it waits on locks."""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from opd_grpc import __main__ as opd_main
from opd_grpc.api import runner as opd_runner

TOP = 40
_thread_profiles: list[cProfile.Profile] = []
_guard = threading.Lock()


def _profile_this_thread() -> None:
    profile = cProfile.Profile(time.thread_time)
    with _guard:
        _thread_profiles.append(profile)
    profile.enable()


class _ProfiledExecutor(ThreadPoolExecutor):
    """The server's worker pool, each of whose threads profiles itself from its start."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, initializer=_profile_this_thread, **kwargs)


class _Finished:
    """A thread's profile after the thread ended: its stats, without `disable()` (which acts on the calling
    thread, not the profiled one)."""

    def __init__(self, profile: cProfile.Profile):
        profile.snapshot_stats()
        self.stats = profile.stats

    def create_stats(self) -> None:
        pass


def main(out: Path) -> None:
    opd_runner.ThreadPoolExecutor = _ProfiledExecutor  # type: ignore[misc]
    loop_profile = cProfile.Profile(time.thread_time)
    loop_profile.enable()
    try:
        opd_main.main([])
    finally:
        loop_profile.disable()
        stats = pstats.Stats(loop_profile)
        for profile in _thread_profiles:  # the pool's threads have ended: server.stop() waits for them
            stats.add(_Finished(profile))
        stats.dump_stats(out)
        text = io.StringIO()
        for order in ("tottime", "cumulative"):
            pstats.Stats(str(out), stream=text).sort_stats(order).print_stats(TOP)
        Path(f"{out}.txt").write_text(text.getvalue())


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m bench.profile_server OUT")
    main(Path(sys.argv[1]))
