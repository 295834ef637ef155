"""The schema's revision, kept by Alembic (the revisions in opd_grpc/storage/migrations, one history for SQLite
and PostgreSQL) in the table `alembic_version`, and what a server does with it before it serves (`prepare`):

- a brand-new database (no tables at all) gets the schema at head, so that `make run` on a fresh clone and every
  test start with no extra step;
- a database at head is served as it is;
- a database at an older revision is upgraded only when asked (`--migrate`, `make migrate`): otherwise the server
  refuses to start rather than run on tables it was not written for;
- a revision this server does not know (a newer server's), or tables without any revision, are refused.

Replicas starting together on one database agree: the check and any upgrade run in one transaction that holds
the schema lock (an advisory lock on PostgreSQL, `BEGIN IMMEDIATE` on SQLite); both run DDL transactionally, so
an upgrade that fails leaves the database at the revision it was at.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, NullPool, create_engine, inspect, text

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")
VERSION_TABLE = "alembic_version"
# pg_advisory_xact_lock(SCHEMA_LOCK, hash of the schema): one lock per schema, held until the transaction ends.
SCHEMA_LOCK = 0x0BD5C4E


class SchemaMismatch(RuntimeError):
    """The database's schema is not the one this server was written for; the message says what to do."""


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration, made here (no alembic.ini is needed); `connection` is what env.py migrates."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head() -> str:
    """The revision this server's tables are (tables.py)."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def check(engine: Engine) -> bool:
    """Whether the database is at head."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision() == head()


def upgrade(url: str) -> None:
    """Brings the database at `url` to head (what `make migrate` runs); refuses what `prepare` refuses even when
    asked to migrate."""
    engine = create_engine(url, poolclass=NullPool)
    try:
        prepare(engine, migrate=True)
    finally:
        engine.dispose()


def prepare(engine: Engine, migrate: bool = False) -> bool:
    """Makes sure the database is at head before a server serves it, or raises `SchemaMismatch`: a brand-new
    database (no tables) gets the schema at head, an older revision is upgraded when `migrate` is set. Answers
    whether the database was brand-new."""
    target = head()
    with _schema_locked(engine) as conn:
        tables = inspect(conn).get_table_names()
        if not tables:
            command.upgrade(alembic_config(conn), "head")
            log.info("created the schema at revision %s in an empty database", target)
            return True
        if VERSION_TABLE not in tables:
            raise SchemaMismatch(
                f"the database has tables ({', '.join(sorted(tables))}) but no schema revision (no {VERSION_TABLE} "
                f"table): opd-grpc's migrations did not make it, so this server cannot tell what it holds; give it "
                "an empty database (one that an opd-grpc from before migrations made is at revision 0001: "
                "`.venv/bin/alembic stamp 0001` with its OPD_DATABASE_URL, then `make migrate`)")
        current = MigrationContext.configure(conn).get_current_revision()
        if current == target:
            return False
        scripts = ScriptDirectory.from_config(alembic_config())
        known = current is None or current in {script.revision for script in scripts.walk_revisions()}
        if not known:
            raise SchemaMismatch(
                f"the database is at revision {current}, which this server does not know (it needs {target}): a "
                "newer opd-grpc has upgraded it; run that version")
        if not migrate:
            raise SchemaMismatch(
                f"the database is at revision {current or 'base'}, this server needs {target}: run `make migrate` "
                "or start with `--migrate`")
        command.upgrade(alembic_config(conn), "head")
        log.info("upgraded the schema from revision %s to %s", current or "base", target)
        return False


@contextlib.contextmanager
def _schema_locked(engine: Engine) -> Iterator[Connection]:
    """One transaction that holds the schema lock; it commits when the block ends without an error."""
    with engine.connect() as conn, conn.begin():
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql("BEGIN IMMEDIATE")  # the database's write lock, until the commit
        else:
            conn.execute(text("SELECT pg_advisory_xact_lock(:lock, hashtext(current_schema()))"),
                         {"lock": SCHEMA_LOCK})
        yield conn
