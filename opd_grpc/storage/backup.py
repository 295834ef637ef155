"""A consistent copy of the SQLite database while a server runs on it (`opd-grpc backup --to PATH`).

`cp opd.db` beside a server can copy a torn file: recent commits live in `opd.db-wal`, and a checkpoint may move
them into `opd.db` halfway through the copy. SQLite offers two ways to copy a live database; both read one
snapshot in one read transaction, which in WAL mode holds off no writer (the server keeps allocating), only the
checkpoints: the log is not started again until the copy ends, so it grows for the copy's few seconds.

- `VACUUM INTO` rebuilds the database into the new file, table by table and index by index; SQLite does not
  fsync that file, so a crash soon after can leave a backup that was reported made but is not on the disk.
- The online backup API (`sqlite3.Connection.backup`) copies the pages as they are into a connection opened on
  the file, and commits them like any transaction, synced to the disk.

This uses the backup API, in one step (`pages=-1`). In smaller steps the source's read lock is let go between
them, and a commit by another connection in between (the server, every few milliseconds) starts the copy again
from its first page: under a steady stream of allocations a stepped copy of a large database never ends. One step
costs writers nothing in WAL mode, so there is nothing to gain from splitting it.

The copy is one file and a database a server starts on as it is: the same pages, so the same schema revision,
and WAL mode as its source (the log its connection used is folded back in and removed when it closes).
"""

from __future__ import annotations

import contextlib
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import make_url

from opd_grpc.storage.schema import VERSION_TABLE
from opd_grpc.storage.tables import TokenRow


class BackupError(RuntimeError):
    """No backup was made (and nothing was left at its path); the message says why."""


@dataclass(frozen=True)
class Backup:
    """A copy made, and what lets an operator see that it is the database meant."""

    source: Path
    path: Path
    size_bytes: int
    revision: str
    tokens: int


def backup(database_url: str, path: Path) -> Backup:
    """Copies the SQLite database at `database_url` to `path`, a new file in a folder that exists: an earlier
    backup there is never overwritten. The source is opened read-only."""
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite":
        raise BackupError("the database is PostgreSQL: back it up with pg_dump (`pg_dump --format=custom "
                          "--file=PATH DBNAME`), which copies one consistent snapshot beside running servers")
    if not url.database or not Path(url.database).is_file():
        raise BackupError(f"there is no SQLite database file at {url} to back up")
    source_file = Path(url.database).resolve()
    try:
        path.open("xb").close()  # made here and only here: a file that appeared meanwhile is not overwritten
    except FileExistsError:
        raise BackupError(f"{path} exists already: give a new path (a backup is never overwritten)") from None
    except FileNotFoundError:
        if path.parent.is_dir():  # /proc, say: a folder that makes no files
            raise BackupError(f"cannot make a file in {path.parent}: give a path in a folder for files") from None
        raise BackupError(f"the folder {path.parent} does not exist: make it first") from None
    except OSError as error:  # no permission, a read-only file system, a full disk
        raise BackupError(f"cannot make {path}: {error.strerror or error}") from None
    try:
        with contextlib.closing(sqlite3.connect(f"{source_file.as_uri()}?mode=ro", uri=True)) as source, \
                contextlib.closing(sqlite3.connect(path)) as copy:
            source.backup(copy, pages=-1)
            (revision,) = copy.execute(f"SELECT version_num FROM {VERSION_TABLE}").fetchone()
            (tokens,) = copy.execute(f"SELECT count(*) FROM {TokenRow.__tablename__}").fetchone()
    except sqlite3.Error as error:
        path.unlink()
        raise BackupError(f"{source_file} could not be backed up: {error}") from error
    except BaseException:
        path.unlink()
        raise
    return Backup(source_file, path, path.stat().st_size, revision, tokens)
