"""The server under test: `python -m opd_grpc` in its own process, as an operator would run it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

_LISTENING = re.compile(r"opd-grpc listening on (\S+):(\d+)")
START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 20.0


class BenchServer:
    """A server process on 127.0.0.1:<free port> with a fresh SQLite file and the test clock.

    With `profile_to`, the server runs under cProfile (see `bench.profile_server`) and writes its stats there
    when it stops.
    """

    def __init__(self, profile_to: Path | None = None):
        self._dir = tempfile.TemporaryDirectory(prefix="opd-bench-")
        env = {**os.environ, "OPD_DATABASE_URL": f"sqlite:///{Path(self._dir.name) / 'bench.db'}",
               "OPD_LISTEN": "127.0.0.1:0", "OPD_TEST_CLOCK": "1", "PYTHONUNBUFFERED": "1"}
        module = ["-m", "bench.profile_server", str(profile_to)] if profile_to else ["-m", "opd_grpc"]
        self.process = subprocess.Popen([sys.executable, *module], env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
        self.stderr_tail: list[str] = []
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        self.address = self._await_listening()
        threading.Thread(target=self._drain_stdout, daemon=True).start()

    def _await_listening(self) -> str:
        assert self.process.stdout is not None
        timer = threading.Timer(START_TIMEOUT_SECONDS, self.process.kill)
        timer.start()
        try:
            for line in self.process.stdout:
                if match := _LISTENING.search(line):
                    return f"{match[1]}:{match[2]}"
        finally:
            timer.cancel()
        raise RuntimeError("the server exited before it listened:\n" + "".join(self.stderr_tail))

    def _drain_stdout(self) -> None:
        assert self.process.stdout is not None
        for _ in self.process.stdout:
            pass

    def _drain_stderr(self) -> None:
        """Keeps the pipe from filling; the last lines explain a failed start."""
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.stderr_tail = (self.stderr_tail + [line])[-40:]

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_mib(self) -> float:
        """Resident memory (VmRSS) of the server process."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"no VmRSS for process {self.pid}")

    def cpu_seconds(self) -> float:
        """User + system CPU time of all the server's threads so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> int:
        """SIGTERM, as an operator stops it; answers the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._dir.cleanup()
        return self.process.returncode
