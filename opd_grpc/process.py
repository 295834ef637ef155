"""A server in a child process (`python -m opd_grpc`), for the simulation, the benchmarks and crash tests."""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
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
    The server's stdout and stderr are drained as it runs; the last lines stay in `output`.
    """

    def __init__(self, database: Path | str | None = None, test_clock: bool = True,
                 settings: Mapping[str, Any] | None = None, program: Sequence[str] = ("-m", "opd_grpc")):
        self._folder = tempfile.TemporaryDirectory(prefix="opd-server-") if database is None else None
        if self._folder is not None:
            database = Path(self._folder.name) / "opd.db"
        self.database_url = database if isinstance(database, str) and "://" in database else f"sqlite:///{database}"
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("OPD_")},
                    "PYTHONUNBUFFERED": "1", "OPD_DATABASE_URL": self.database_url, "OPD_LISTEN": "127.0.0.1:0",
                    "OPD_TEST_CLOCK": "1" if test_clock else "0", "OPD_METRICS_LISTEN": "127.0.0.1:0",
                    **{f"OPD_{k}": str(v) for k, v in (settings or {}).items()}}
        self.program = list(program)
        self.proc: subprocess.Popen[str] | None = None
        self.address = ""
        self.metrics_address = ""  # printed before the listening line, so known once start() returns
        self.output: collections.deque[str] = collections.deque(maxlen=OUTPUT_LINES_KEPT)

    def start(self, timeout: float = 30.0) -> str:
        """Answers HOST:PORT once the server prints that it listens; raises `ServerFailed` if it does not."""
        self.proc = subprocess.Popen([sys.executable, *self.program], env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        found = threading.Event()
        threading.Thread(target=self._read, args=(self.proc, found), daemon=True).start()
        if not found.wait(timeout) or not self.address:
            ended = found.is_set()  # its output ended without the line
            code = self.kill()
            why = f"exited with code {code}" if ended else f"did not listen within {timeout:.0f} s"
            raise ServerFailed(f"the server {why}:\n" + "".join(self.output))
        return self.address

    def _read(self, proc: subprocess.Popen[str], found: threading.Event) -> None:
        """Keeps the pipe from filling and finds the `opd-grpc listening on HOST:PORT` line, and before it the
        `opd-grpc metrics on http://HOST:PORT/metrics` line if there is one."""
        assert proc.stdout is not None
        with proc.stdout:
            for line in proc.stdout:
                self.output.append(line)
                if found.is_set():
                    continue
                if match := _METRICS.search(line):
                    self.metrics_address = match[1]
                elif match := _LISTENING.search(line):
                    self.address = f"{match[1]}:{match[2]}"
                    found.set()
        found.set()

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
            if self._folder is not None:
                self._folder.cleanup()

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
