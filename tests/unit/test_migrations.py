"""Schema migrations (opd_grpc/storage/migrations, run by storage/schema.py) on the backend under test: a fresh
database is served at head, the revisions build exactly the tables of tables.py, and a server refuses a schema
it was not written for unless it is told to migrate."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Iterator

import pytest
import sqlalchemy
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from opd_grpc._gen.opd.v1 import opd_pb2 as pb
from opd_grpc.server import OPDServer
from opd_grpc.settings import Settings
from opd_grpc.storage import schema
from opd_grpc.storage.tables import Base
from tests.support import LiveServer, allocate, fresh_database, make_doctor, make_slots


@pytest.fixture
def database(tmp_path: Path) -> Iterator[tuple[str, sqlalchemy.Engine]]:
    """An empty database's URL, and an engine on it for the test's own look."""
    with fresh_database(tmp_path) as url:
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.NullPool)
        try:
            yield url, engine
        finally:
            engine.dispose()


def start_and_stop(url: str, migrate: bool = False) -> None:
    """Starts a server on the database (or raises what refused it) and stops it again."""
    async def run() -> None:
        server = OPDServer(Settings.load(env={"OPD_DATABASE_URL": url, "OPD_LISTEN": "127.0.0.1:0",
                                                "OPD_METRICS_LISTEN": ""}), migrate)
        await server.start()
        await server.stop(grace=0)

    asyncio.run(run())


def migrate_to(engine: sqlalchemy.Engine, revision: str) -> None:
    """Runs the revisions up to (or down to) `revision`, as an older opd-grpc would have left the database."""
    with engine.begin() as conn:
        config = schema.alembic_config(conn)
        command.upgrade(config, "head")
        command.downgrade(config, revision)


def revision_of(engine: sqlalchemy.Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def test_a_fresh_database_is_served_at_head(database: tuple[str, sqlalchemy.Engine]):
    url, engine = database
    live = LiveServer(url)
    try:
        doctor = make_doctor(live.stub)
        assert live.stub.GetDoctor(pb.GetDoctorRequest(doctor_id=doctor)).doctor.doctor_id == doctor
    finally:
        live.close()
    assert revision_of(engine) == schema.head() and schema.check(engine)


def catalog(conn: sqlalchemy.Connection) -> list[tuple[Any, ...]]:
    """Everything the database says about its tables, as rows: what compare_metadata leaves out too (SQLite's
    WITHOUT ROWID, a partial index's WHERE, constraint names)."""
    if conn.dialect.name == "sqlite":  # its CREATE statements, spacing aside (ADD COLUMN writes them on one line)
        rows = [(kind, name, table, " ".join(sql.split()) if sql else sql) for kind, name, table, sql in
                conn.exec_driver_sql("SELECT type, name, tbl_name, sql FROM sqlite_master")]
    else:
        rows = conn.exec_driver_sql("""
            SELECT 'column', table_name, column_name, data_type, character_maximum_length, is_nullable,
                   column_default
              FROM information_schema.columns WHERE table_schema = current_schema()
            UNION ALL
            SELECT 'constraint', conrelid::regclass::text, conname, pg_get_constraintdef(oid), NULL, NULL, NULL
              FROM pg_constraint WHERE connamespace = current_schema()::regnamespace
            UNION ALL
            SELECT 'index', tablename, indexname, indexdef, NULL, NULL, NULL
              FROM pg_indexes WHERE schemaname = current_schema()
            UNION ALL
            SELECT 'trigger', event_object_table, trigger_name,
                   action_timing || ' ' || event_manipulation || ' ' || action_statement, NULL, NULL, NULL
              FROM information_schema.triggers WHERE trigger_schema = current_schema()""")
    return sorted((tuple(row) for row in rows if schema.VERSION_TABLE not in str(row)), key=repr)


def test_the_revisions_build_exactly_the_tables_of_tables_py(database: tuple[str, sqlalchemy.Engine]):
    url, engine = database
    schema.upgrade(url)
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        migrated = catalog(conn)
    with engine.begin() as conn:
        Base.metadata.drop_all(conn)
        conn.exec_driver_sql(f"DROP TABLE {schema.VERSION_TABLE}")
        Base.metadata.create_all(conn)
    with engine.connect() as conn:
        assert catalog(conn) == migrated
    assert len(migrated) > 10  # the catalog did see the tables


@pytest.mark.parametrize("older", ["0001", "base"])
def test_an_older_revision_is_refused_and_migrate_brings_it_to_head(database: tuple[str, sqlalchemy.Engine],
                                                                     older: str):
    url, engine = database
    migrate_to(engine, older)
    if older == "0001":  # the data an older server kept must outlive the upgrade
        with engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO doctors (doctor_id, number, name, specialization) "
                                 "VALUES ('DOC001', 1, 'Dr Asha Rao', 'General Medicine')")
    with pytest.raises(schema.SchemaMismatch) as refusal:
        start_and_stop(url)
    assert str(refusal.value) == (f"the database is at revision {older}, this server needs {schema.head()}: run "
                                  "`make migrate` or start with `--migrate`")
    assert revision_of(engine) == (None if older == "base" else older)  # refusing changed nothing

    start_and_stop(url, migrate=True)
    assert schema.check(engine)
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        doctors = conn.exec_driver_sql("SELECT doctor_id FROM doctors").scalars().all()
    assert doctors == (["DOC001"] if older == "0001" else [])


def test_a_revision_this_server_does_not_know_is_refused_even_with_migrate(database: tuple[str, sqlalchemy.Engine]):
    url, engine = database
    schema.upgrade(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"UPDATE {schema.VERSION_TABLE} SET version_num = '0099'")
    for migrate in (False, True):
        with pytest.raises(schema.SchemaMismatch, match=r"^the database is at revision 0099, which this server does "
                                                        rf"not know \(it needs {schema.head()}\)"):
            start_and_stop(url, migrate)
    assert revision_of(engine) == "0099"


def test_tables_without_a_revision_are_refused(database: tuple[str, sqlalchemy.Engine]):
    url, engine = database
    Base.metadata.create_all(engine)
    with pytest.raises(schema.SchemaMismatch, match="has tables .* but no schema revision"):
        start_and_stop(url, migrate=True)
    with engine.connect() as conn:
        assert not sqlalchemy.inspect(conn).has_table(schema.VERSION_TABLE)


def test_0008_writes_active_tokens_identities_with_the_phones_last_ten_digits(database: tuple[str, sqlalchemy.Engine]):
    """As 0007 left them, identities held every digit (+91 too); the engine now compares the last 10, and the
    schema's one-active-token index must hold the same. A token whose new identity another active token of its
    day already holds (one patient booked under two forms of a phone) keeps its own: the upgrade does not fail."""
    url, engine = database
    live = LiveServer(url)
    try:
        doctor = make_doctor(live.stub)
        make_slots(live.stub, doctor, ("09:00", "10:00", 5))
        for n in (1, 2, 3):
            allocate(live.stub, doctor, n)
    finally:
        live.close()
    with engine.begin() as conn:
        now = dict(conn.exec_driver_sql("SELECT token_number, patient_identity FROM tokens").all())
        assert now[1] == "phone:9845000001:patient 1"  # +91-98450-00001 as the engine writes it now
        before = {1: "phone:919845000001:patient 1", 2: "phone:919845000002:patient 2",
                  3: "phone:9845000001:patient 1"}  # token 3: patient 1 again, typed without +91 (an old server let it)
        for number, identity in before.items():
            conn.execute(sqlalchemy.text("UPDATE tokens SET patient_identity = :identity WHERE token_number = :n"),
                         {"identity": identity, "n": number})
    migrate_to(engine, "0007")
    start_and_stop(url, migrate=True)
    with engine.connect() as conn:
        after = dict(conn.exec_driver_sql("SELECT token_number, patient_identity FROM tokens").all())
    assert after == {1: "phone:919845000001:patient 1", 2: "phone:9845000002:patient 2",
                     3: "phone:9845000001:patient 1"}
