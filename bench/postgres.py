"""The PostgreSQL part of `make bench` (issue 4): AllocateToken with 1 and with 2 server replicas on one
PostgreSQL database, beside a no-op on the same replicas, each at 1 and at 32 calls in flight.

Two workloads: **spread**, allocations cycling through many doctor-days (as the SQLite part's, but over
more doctors, so that calls in flight rarely wait for one another's doctor-day), and **hot**,
every allocation into one doctor-day with one slot of `HOT_CAPACITY` seats, so that every call takes the
same doctor-day row lock, whichever replica it reaches. Each hot stretch has a fresh doctor-day, so that the
days compared hold alike few tokens. The bench works in a schema of its own, created and dropped here.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import grpc
import sqlalchemy
from sqlalchemy.engine import make_url

from bench.load import ALLOCATE, NOOP, LoadGenerator, Pool, Totals, create_pool
from bench.procfs import cpu_seconds, parent_pid, process_tree_cpu_seconds
from bench.report import PostgresMeasurement, PostgresReport
from opd_grpc._gen.opd.v1 import opd_pb2 as pb
from opd_grpc._gen.opd.v1 import opd_pb2_grpc
from opd_grpc.process import ServerProcess

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
REPLICAS = (1, 2)
NOOP_WORKLOAD, SPREAD, HOT = "no-op", "spread", "hot"
HOT_CAPACITY = 1_000_000  # more than any stretch allocates: every hot allocation is confirmed


@dataclass(frozen=True)
class Load:
    """How long and how hard each workload runs, and the spread pool's size."""

    in_flight: tuple[int, ...]
    rounds: int
    warmup: float
    seconds: float
    client_processes: int
    doctors: int
    days: int
    per_day: int


def unreachable(url: str) -> str:
    """Why no PostgreSQL answers at `url`; empty when one does."""
    try:
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.NullPool, connect_args={"connect_timeout": 3})
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
        finally:
            engine.dispose()
    except (sqlalchemy.exc.SQLAlchemyError, ImportError) as error:
        cause = getattr(error, "orig", None) or error
        return str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return ""


@contextlib.contextmanager
def bench_schema(url: str) -> Iterator[str]:
    """The URL of a fresh schema of the database at `url`, dropped afterwards with everything in it."""
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.NullPool)
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    try:
        yield make_url(url).update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
            hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()


def local_postmaster(url: str) -> int | None:
    """The PostgreSQL server's main process when it runs on this machine (its CPU time can then be read), else
    None: a backend's parent is the postmaster, and both are called postgres."""
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.NullPool)
    try:
        with engine.connect() as conn:
            backend = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
            postmaster = parent_pid(backend)
            if postmaster is None or not all(_command(pid) == "postgres" for pid in (backend, postmaster)):
                return None
            return postmaster
    finally:
        engine.dispose()


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def run(url: str, load: Load) -> PostgresReport:
    """Runs every workload on 1 replica, then starts a second on the same database and runs them again."""
    shown = make_url(url).render_as_string(hide_password=True)
    if why := unreachable(url):
        return PostgresReport(url=shown, skipped=f"no PostgreSQL answers at {shown}: {why}")
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    measurements: list[PostgresMeasurement] = []
    replicas: list[ServerProcess] = []
    hot_faults: list[str] = []
    postmaster = local_postmaster(url)
    with bench_schema(url) as schema_url:
        generator = LoadGenerator(load.client_processes)
        try:
            for count in REPLICAS:
                while len(replicas) < count:  # the first creates the schema's tables; the others find them
                    replicas.append(ServerProcess(schema_url, test_clock=False))
                    replicas[-1].start()
                measurements += _measure_replicas(generator, replicas, postmaster, load, hot_faults)
        finally:
            generator.close()
            exit_codes = [replica.stop() for replica in replicas]
    return PostgresReport(url=shown, skipped="", spread_doctors=load.doctors, measurements=measurements,
                          database_cpu_measured=bool(postmaster), hot_faults=hot_faults, server_exit_codes=exit_codes,
                          wall_seconds=round(time.perf_counter() - started, 1), load_average_before=load_before,
                          load_average_after=os.getloadavg()[0])


def _measure_replicas(generator: LoadGenerator, replicas: list[ServerProcess], postmaster: int | None, load: Load,
                      hot_faults: list[str]) -> list[PostgresMeasurement]:
    """Every workload at each number in flight, alternating in rounds so that other load on the machine falls
    on them alike. The spread pool is new for each replica count, as is every hot stretch's doctor-day."""
    addresses = tuple(replica.address for replica in replicas)
    spread = create_pool(addresses[0], load.doctors, load.days, load.per_day)
    totals = {(workload, n): Totals() for n in load.in_flight for workload in (NOOP_WORKLOAD, SPREAD, HOT)}
    hot_tokens = {n: 0 for n in load.in_flight}
    for in_flight in load.in_flight:
        for _ in range(load.rounds):
            for workload in (NOOP_WORKLOAD, SPREAD, HOT):
                pool = create_pool(addresses[0], 1, 1, HOT_CAPACITY, HOT_CAPACITY) if workload == HOT else spread
                kind = NOOP if workload == NOOP_WORKLOAD else ALLOCATE
                t = totals[(workload, in_flight)]
                server_before, database_before = _server_cpu(replicas), _database_cpu(postmaster)
                wall_before = time.perf_counter()
                result = generator.measure(addresses, pool, kind, in_flight, load.warmup, load.seconds / load.rounds)
                t.wall_seconds += time.perf_counter() - wall_before
                t.server_cpu_seconds += _server_cpu(replicas) - server_before
                t.database_cpu_seconds += _database_cpu(postmaster) - database_before
                t.load.merge(result)
                if workload == HOT:
                    confirmed = result.calls_made - sum(result.errors.values())
                    holders = _seat_holders(addresses[-1], pool)
                    hot_tokens[in_flight] = max(hot_tokens[in_flight], holders)
                    if holders != confirmed:
                        hot_faults.append(f"{len(replicas)} replica(s), {in_flight} in flight: {confirmed} "
                                          f"allocations confirmed, the hot slot holds {holders}")
    return [PostgresMeasurement.from_totals(len(replicas), workload, NOOP if workload == NOOP_WORKLOAD else ALLOCATE,
                                            n, load.seconds, t, hot_tokens[n] if workload == HOT else 0)
            for (workload, n), t in totals.items()]


def _server_cpu(replicas: list[ServerProcess]) -> float:
    return sum(cpu_seconds(replica.pid) for replica in replicas)


def _database_cpu(postmaster: int | None) -> float:
    return 0.0 if postmaster is None else process_tree_cpu_seconds(postmaster)


def _seat_holders(address: str, pool: Pool) -> int:
    """The hot slot's seat holders, read back through `address` (with 2 replicas, not the one that created it)."""
    doctor_id, date = pool.target(0)
    with grpc.insecure_channel(address) as channel:
        stub = opd_pb2_grpc.OPDTokenServiceStub(channel)
        (slot,) = stub.ListSlots(pb.ListSlotsRequest(doctor_id=doctor_id, date=date)).slots
        return stub.GetSlotStatus(pb.GetSlotStatusRequest(slot_id=slot.slot_id)).seat_holders
