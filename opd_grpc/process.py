"""A server in a child process (`python -m opd_grpc`), for the simulation, the benchmarks and crash tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Mapping

_LISTENING = re.compile(r"opd-grpc listening on (\S+):(\d+) ")


class ServerProcess:
    """Starts a server on a free loopback port and waits until it serves; `stop()` sends SIGTERM,
    `kill()` SIGKILL. Settings come as `OPD_*` names without the prefix."""

    def __init__(self, database: Path | str, test_clock: bool = True, settings: Mapping[str, Any] | None = None):
        url = database if isinstance(database, str) and "://" in database else f"sqlite:///{database}"
        self.env = {**os.environ, "OPD_DATABASE_URL": url, "OPD_LISTEN": "127.0.0.1:0",
                    "OPD_TEST_CLOCK": "1" if test_clock else "0",
                    **{f"OPD_{k}": str(v) for k, v in (settings or {}).items()}}
        self.proc: subprocess.Popen[str] | None = None
        self.address = ""
        self.output: list[str] = []

    def start(self, timeout: float = 30.0) -> str:
        self.proc = subprocess.Popen([sys.executable, "-m", "opd_grpc"], env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        found = threading.Event()
        threading.Thread(target=self._read, args=(self.proc, found), daemon=True).start()
        if not found.wait(timeout) or not self.address:
            self.kill()
            raise RuntimeError("the server did not start:\n" + "".join(self.output[-40:]))
        return self.address

    def _read(self, proc: subprocess.Popen[str], found: threading.Event) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.output.append(line)
            if not found.is_set() and (match := _LISTENING.search(line)):
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
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
