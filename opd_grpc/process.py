"""A server in a child process (`python -m opd_grpc`), for the simulation, the benchmarks and crash tests."""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

_LISTENING = re.compile(r"opd-grpc listening on (\S+):(\d+) ")
_METRICS = re.compile(r"opd-grpc metrics on http://(\S+)/metrics")
OUTPUT_LINES_KEPT = 40


class ServerFailed(RuntimeError):
    """The server did not start; the message carries the end of its output."""


class ServerProcess:
    """Starts a server on a free loopback port and waits until it serves; `stop()` sends SIGTERM,
    `kill()` SIGKILL. Settings come as `OPD_*` names without the prefix; the caller's own `OPD_*` variables are
    not passed on, so that the server runs with exactly the settings given.

    Without `database`, the server gets a fresh SQLite file in a temporary folder that `stop()` and `kill()`
    remove; `database_url` names the database either way, e.g. to add API keys before `start()`. Metrics are
    served on a free loopback port too (`metrics_address`; "" when the server prints none, e.g. with
    `settings={"METRICS_LISTEN": ""}`), so that servers side by side never clash. `program` is what `python` runs,
    e.g. `("-m", "bench.profile_server", OUT)` for a profiled server.
    The server's stdout and stderr go to a file (`log_path`), not a pipe: nothing in the caller's process has to
    read them as the server runs (a benchmark's client would pay for every access-log line); the last lines are
    `output`.
    """

    def __init__(self, database: Path | str | None = None, test_clock: bool = True,
                 settings: Mapping[str, Any] | None = None, program: Sequence[str] = ("-m", "opd_grpc")):
        self._folder = tempfile.TemporaryDirectory(prefix="opd-server-")
        if database is None:
            database = Path(self._folder.name) / "opd.db"
        self.log_path = Path(self._folder.name) / "server.log"
        self.database_url = database if isinstance(database, str) and "://" in database else f"sqlite:///{database}"
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("OPD_")},
                    "PYTHONUNBUFFERED": "1", "OPD_DATABASE_URL": self.database_url, "OPD_LISTEN": "127.0.0.1:0",
                    "OPD_TEST_CLOCK": "1" if test_clock else "0", "OPD_METRICS_LISTEN": "127.0.0.1:0",
                    **{f"OPD_{k}": str(v) for k, v in (settings or {}).items()}}
        self.program = list(program)
        self.proc: subprocess.Popen[bytes] | None = None
        self.address = ""
        self.metrics_address = ""  # printed before the listening line, so known once start() returns
        self._output: list[str] | None = None  # read from the log once the server has ended

    def start(self, timeout: float = 30.0) -> str:
        """Answers HOST:PORT once the server prints that it listens; raises `ServerFailed` if it does not."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, *self.program], env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT)
        give_up = time.monotonic() + timeout
        while not self._listening():
            if self.proc.poll() is not None and not self._listening():  # its output ended without the line
                raise ServerFailed(f"the server exited with code {self.kill()}:\n" + "".join(self.output))
            if time.monotonic() > give_up:
                self.kill()
                raise ServerFailed(f"the server did not listen within {timeout:.0f} s:\n" + "".join(self.output))
            time.sleep(0.01)
        return self.address

    def _listening(self) -> bool:
        """Finds the `opd-grpc listening on HOST:PORT` line, and before it the `opd-grpc metrics on
        http://HOST:PORT/metrics` line if there is one."""
        with open(self.log_path, errors="replace") as log:
            for line in log:
                if match := _METRICS.search(line):
                    self.metrics_address = match[1]
                elif match := _LISTENING.search(line):
                    self.address = f"{match[1]}:{match[2]}"
                    return True
        return False

    @property
    def output(self) -> list[str]:
        """The server's last OUTPUT_LINES_KEPT lines of output so far (kept once it has ended)."""
        if self._output is not None:
            return self._output
        try:
            with open(self.log_path, errors="replace") as log:
                return list(collections.deque(log, maxlen=OUTPUT_LINES_KEPT))
        except FileNotFoundError:
            return []

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait for the graceful stop; answers the exit code."""
        return self._end(signal.SIGTERM, timeout)

    def kill(self) -> int:
        return self._end(signal.SIGKILL, 10.0)

    def _end(self, sig: signal.Signals, timeout: float) -> int:
        try:
            if self.proc is None:
                return 0
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait()
        finally:
            self._output = self.output
            self._folder.cleanup()

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
