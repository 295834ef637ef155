"""A throwaway server for the simulation: `python -m opd_grpc` on a temporary SQLite file, a free loopback port
and the test clock, stopped with SIGTERM at the end."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

STARTUP_SECONDS = 30.0
STOP_SECONDS = 20.0
_LISTENING = re.compile(r"^opd-grpc listening on (\S+:\d+)")

# The settings the simulation assumes (SPEC §14 defaults, UTC, the test clock, no automatic no-shows).
SIMULATION_SETTINGS = {
    "OPD_LISTEN": "127.0.0.1:0",
    "OPD_TEST_CLOCK": "1",
    "OPD_TIMEZONE": "UTC",
    "OPD_NO_SHOW_GRACE_PERIOD_MINUTES": "15",
    "OPD_AUTO_NO_SHOW": "false",
    "OPD_MAX_WAITLIST_SIZE": "50",
}


class ServerFailed(RuntimeError):
    """The server did not start; the message carries the end of its log."""


class ServerProcess:
    """`with ServerProcess() as address:` — the server's HOST:PORT while the block runs."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="opd-sim-")
        self.log_path = Path(self._dir.name) / "server.log"
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> str:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPD_")}
        env.update(SIMULATION_SETTINGS, OPD_DATABASE_URL=f"sqlite:///{Path(self._dir.name) / 'opd.db'}")
        with open(self.log_path, "w") as log:
            self._process = subprocess.Popen([sys.executable, "-m", "opd_grpc"], env=env, stdout=subprocess.PIPE,
                                             stderr=log)
        try:
            return self._wait_for_address()
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def _wait_for_address(self) -> str:
        """Reads stdout until the `opd-grpc listening on HOST:PORT` line."""
        assert self._process is not None and self._process.stdout is not None
        fd = self._process.stdout.fileno()
        seen = b""
        deadline = time.monotonic() + STARTUP_SECONDS
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                break
            chunk = os.read(fd, 4096)
            if not chunk:
                raise ServerFailed(f"the server exited with code {self._process.wait()}:\n{self.log_tail()}")
            seen += chunk
            for line in seen.decode(errors="replace").splitlines()[: seen.count(b"\n")]:
                if match := _LISTENING.match(line):
                    return match[1]
        raise ServerFailed(f"the server did not report its address within {STARTUP_SECONDS:.0f} s:\n"
                           f"{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._process is not None and self._process.stdout is not None:
            self._process.stdout.close()
        self._dir.cleanup()
