"""`python -m opd_grpc` on an older schema: it refuses to start and says what to run; `--migrate-only` (what
`make migrate` runs) upgrades and exits; `--migrate` upgrades and serves; replicas starting together on an empty
database create its schema once."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import sqlalchemy
from alembic import command
from grpc_health.v1 import health_pb2, health_pb2_grpc

from opd_grpc.process import ServerFailed, ServerProcess
from opd_grpc.storage import schema
from tests.support import fresh_database


def test_an_older_schema_is_refused_until_it_is_migrated(tmp_path: Path):
    with fresh_database(tmp_path) as url:
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.NullPool)
        with engine.begin() as conn:  # what the first opd-grpc with migrations left
            command.upgrade(schema.alembic_config(conn), "0001")
        engine.dispose()

        with pytest.raises(ServerFailed) as refusal:
            ServerProcess(url).start()
        assert "exited with code 1" in str(refusal.value)
        assert (f"opd-grpc: the database is at revision 0001, this server needs {schema.head()}: run `make migrate` "
                "or start with `--migrate`") in str(refusal.value)

        env = {**{k: v for k, v in os.environ.items() if not k.startswith("OPD_")}, "OPD_DATABASE_URL": url}
        migrated = subprocess.run([sys.executable, "-m", "opd_grpc", "--migrate-only"], env=env, capture_output=True,
                                  text=True, timeout=60)
        assert migrated.returncode == 0, migrated.stderr
        assert f"the database is at schema revision {schema.head()}" in migrated.stdout
        with ServerProcess(url) as server, grpc.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_migrate_upgrades_and_then_serves(tmp_path: Path):
    with fresh_database(tmp_path) as url:
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.NullPool)
        with engine.begin() as conn:
            command.upgrade(schema.alembic_config(conn), "0001")
        with ServerProcess(url, program=("-m", "opd_grpc", "--migrate")) as server:
            assert server.address
            assert schema.check(engine)
        engine.dispose()


def test_replicas_starting_together_on_an_empty_database_create_the_schema_once(tmp_path: Path):
    with fresh_database(tmp_path) as url:
        replicas = [ServerProcess(url) for _ in range(3)]
        with ThreadPoolExecutor(len(replicas)) as pool:
            addresses = list(pool.map(lambda replica: replica.start(), replicas))
        try:
            assert all(addresses)
            created = [line for replica in replicas for line in replica.output if "created the schema" in line]
            assert len(created) == 1, created
        finally:
            for replica in replicas:
                replica.stop()
