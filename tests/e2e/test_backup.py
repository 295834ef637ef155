"""`opd-grpc backup --to PATH` (opd_grpc/storage/backup.py) with real processes and files: copies taken while a
server keeps allocating are databases a server starts on, hold every token acknowledged before the copy began, and
keep SPEC §3; a path that exists, a folder or a database file that does not, and PostgreSQL are refused, and
nothing is written."""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from opd_grpc._gen.opd.v1 import opd_pb2_grpc, test_clock_pb2, test_clock_pb2_grpc
from opd_grpc.api.convert import timestamp
from opd_grpc.process import ServerProcess
from opd_grpc.storage import schema
from tests.support import MORNING, all_tokens, allocate, make_doctor, make_slots, spec_violations

pytestmark = pytest.mark.backend_independent  # its own SQLite files, whatever the backend under test

BACKUP_LINE = re.compile(r"opd-grpc: backed up (\S+) to (\S+) \(([\d,]+) bytes, schema revision (\w+), "
                         r"([\d,]+) tokens\)\n")
SEATS = 720  # 08:00-20:00 in 1-minute consultations: more than the test allocates, even on a slow machine
ALLOCATION_PAUSE_SECONDS = 0.01
TOKENS_BEFORE_EACH_BACKUP = 50
WAIT_SECONDS = 30.0


def backup_command(database_url: str, path: Path) -> subprocess.CompletedProcess[str]:
    """`python -m opd_grpc backup --to PATH` with the database at `database_url` (and no other OPD_ setting)."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("OPD_")}, "OPD_DATABASE_URL": database_url}
    return subprocess.run([sys.executable, "-m", "opd_grpc", "backup", "--to", str(path)], env=env,
                          capture_output=True, text=True, timeout=60)


class Allocations:
    """Walk-in allocations for one doctor, one after another from a thread of their own until `stop()`;
    `acknowledged` holds the answered ones' (token_id, token_number) in the order they were answered."""

    def __init__(self, address: str, doctor_id: str):
        self.acknowledged: list[tuple[str, int]] = []
        self._stopping = threading.Event()
        self._error: grpc.RpcError | None = None
        self._thread = threading.Thread(target=self._run, args=(address, doctor_id))
        self._thread.start()

    def _run(self, address: str, doctor_id: str) -> None:
        with grpc.insecure_channel(address) as channel:
            stub = opd_pb2_grpc.OPDTokenServiceStub(channel)
            for n in itertools.count():
                if self._stopping.wait(ALLOCATION_PAUSE_SECONDS):
                    return
                try:
                    token = allocate(stub, doctor_id, n).token
                except grpc.RpcError as error:
                    self._error = error
                    return
                self.acknowledged.append((token.token_id, token.token_number))

    def wait_for(self, count: int) -> None:
        deadline = time.monotonic() + WAIT_SECONDS
        while len(self.acknowledged) < count:
            assert self._thread.is_alive(), f"the allocations stopped: {self._error}"
            assert time.monotonic() < deadline, f"{len(self.acknowledged)} allocations in {WAIT_SECONDS} s"
            time.sleep(0.01)

    def stop(self) -> dict[str, int]:
        """Ends the stream after the call in flight; answers every acknowledged token's number by its id."""
        self._stopping.set()
        self._thread.join()
        assert self._error is None, self._error
        return dict(self.acknowledged)


def set_morning(channel: grpc.Channel) -> opd_pb2_grpc.OPDTokenServiceStub:
    test_clock_pb2_grpc.TestClockServiceStub(channel).SetTime(test_clock_pb2.SetTimeRequest(time=timestamp(MORNING)))
    return opd_pb2_grpc.OPDTokenServiceStub(channel)


def test_backups_taken_while_a_server_allocates_hold_every_acknowledged_token(tmp_path: Path):
    database, folder = tmp_path / "opd.db", tmp_path / "backups"
    folder.mkdir()
    taken: dict[Path, tuple[dict[str, int], str, int]] = {}  # each copy: tokens acknowledged before, output, size
    with ServerProcess(database) as server:
        with grpc.insecure_channel(server.address) as channel:
            stub = set_morning(channel)
            doctor = make_doctor(stub)
            make_slots(stub, doctor, ("08:00", "20:00", SEATS), consultation_minutes=1)
        writes = Allocations(server.address, doctor)
        try:
            # The first copy while a reader (a long report, say) keeps the checkpoints from moving the allocations
            # into opd.db: they are in opd.db-wal only, and `cp opd.db` would copy none of them.
            with contextlib.closing(sqlite3.connect(database, isolation_level=None)) as reader:
                reader.execute("BEGIN")
                reader.execute("SELECT count(*) FROM tokens").fetchone()
                taken[folder / "opd-1.db"] = backup_beside(writes, server, folder / "opd-1.db")
                assert _tokens_in_file_alone(database, tmp_path / "cp.db") == 0
            # The second as the server's checkpoints move them, once a second.
            taken[folder / "opd-2.db"] = backup_beside(writes, server, folder / "opd-2.db")
        finally:
            acknowledged = writes.stop()
    # One file each: no log or journal left beside it.
    assert sorted(p.name for p in folder.iterdir()) == ["opd-1.db", "opd-2.db"]

    for path, (before, printed, size) in taken.items():
        with ServerProcess(path) as restored, grpc.insecure_channel(restored.address) as channel:
            stub = set_morning(channel)
            stored = {t.token_id: t.token_number for t in all_tokens(stub, doctor)}
            assert before.items() <= stored.items()
            assert stored.items() <= acknowledged.items()
            assert spec_violations(stub, doctor) == []
            line = BACKUP_LINE.fullmatch(printed)
            assert line, printed
            assert line.groups() == (str(database.resolve()), str(path), f"{size:,}", schema.head(),
                                     f"{len(stored):,}")
            after = allocate(stub, doctor, 10_000)
            assert after.token.token_number == len(stored) + 1


def backup_beside(writes: Allocations, server: ServerProcess, path: Path) -> tuple[dict[str, int], str, int]:
    """Runs the command once more allocations are answered; answers the tokens acknowledged before it began, what
    it printed, and the copy's size (before any server opens it)."""
    writes.wait_for(len(writes.acknowledged) + TOKENS_BEFORE_EACH_BACKUP)
    answered = len(writes.acknowledged)
    done = backup_command(server.database_url, path)
    assert done.returncode == 0, done.stderr
    assert len(writes.acknowledged) > answered, "no allocation was answered while the backup ran"
    return dict(writes.acknowledged[:answered]), done.stdout, path.stat().st_size


def _tokens_in_file_alone(database: Path, copy: Path) -> int:
    """The tokens in a copy of the database file without its log, as `cp opd.db` makes it (none when even the
    tables are in the log only)."""
    shutil.copyfile(database, copy)
    with contextlib.closing(sqlite3.connect(copy)) as copied:
        if not copied.execute("SELECT count(*) FROM sqlite_master WHERE name = 'tokens'").fetchone()[0]:
            return 0
        return copied.execute("SELECT count(*) FROM tokens").fetchone()[0]


# Each: the settings' database URL, the backup's path, what the refusal says; {folder} holds a database (opd.db)
# and an earlier backup (earlier.db).
REFUSALS = {
    "a path that exists": ("sqlite:///{folder}/opd.db", "{folder}/earlier.db",
                           "opd-grpc: {folder}/earlier.db exists already: give a new path"),
    "a folder that does not exist": ("sqlite:///{folder}/opd.db", "{folder}/missing/opd.db",
                                     "opd-grpc: the folder {folder}/missing does not exist"),
    # /proc is a folder, but of the kernel's: it had been called a folder that does not exist
    "a folder that makes no files": ("sqlite:///{folder}/opd.db", "/proc/opd-backup.db",
                                     "opd-grpc: cannot make a file in /proc: give a path in a folder for files"),
    "a database file that does not exist": (
        "sqlite:///{folder}/missing.db", "{folder}/new.db",
        "opd-grpc: there is no SQLite database file at sqlite:///{folder}/missing.db"),
    # Nothing answers on port 1: the refusal comes before any connection.
    "PostgreSQL": ("postgresql+psycopg://postgres@127.0.0.1:1/opd", "{folder}/new.db",
                   "opd-grpc: the database is PostgreSQL: back it up with pg_dump"),
}


@pytest.mark.parametrize(("url", "path", "says"), REFUSALS.values(), ids=REFUSALS)
def test_a_refused_backup_says_why_and_writes_nothing(tmp_path: Path, url: str, path: str, says: str):
    schema.upgrade(f"sqlite:///{tmp_path / 'opd.db'}")
    (tmp_path / "earlier.db").write_bytes(b"an earlier backup")
    files = _contents(tmp_path)
    done = backup_command(url.format(folder=tmp_path), Path(path.format(folder=tmp_path)))
    assert done.returncode == 1
    assert done.stderr.startswith(says.format(folder=tmp_path)), done.stderr
    assert done.stdout == ""
    assert _contents(tmp_path) == files


def _contents(folder: Path) -> dict[Path, bytes | None]:
    """Every file's bytes and every folder (None) under `folder`."""
    return {p: p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}
