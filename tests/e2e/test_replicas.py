"""Issue 4's replica stress acceptance, smaller: 3 server processes on one PostgreSQL, 32 clients, a few thousand
mixed operations on hot slots, without faults, with replicas killed, with backends terminated; SPEC §9 for copies
sent to two replicas at once; and proof that the checker (`simulation.replica_checks`) does catch a lost answer, a
half-done transaction, a wrong answer and an unjustified refusal. The full runs (10,000 operations each) are
`make stress`."""

from __future__ import annotations

import asyncio
import re
import uuid
from typing import Iterator

import grpc
import pytest
import sqlalchemy

from opd_grpc._gen.opd.v1 import opd_pb2 as pb
from opd_grpc._gen.opd.v1 import opd_pb2_grpc
from simulation import replicas
from simulation.replica_checks import Operation
from tests.support import POSTGRES_URL, TEST_DATABASE

pytestmark = [
    pytest.mark.skipif(TEST_DATABASE != "postgresql",
                       reason="replicas share one PostgreSQL: runs with TEST_DATABASE=postgresql (make test's "
                              "second half)"),
    pytest.mark.slow,
]

LINE = re.compile(r"^replicas: clients 32, operations (\d+) \(ok (\d+), failed (\d+), unknown (\d+)\), replicas 3, "
                  r"faults (\d+) \((none|kill|backend)\), violations (\d+)$")


@pytest.mark.parametrize("faults", ["none", "kill", "backend"])
def test_three_replicas_keep_every_promise_under_32_clients(faults: str) -> None:
    config = replicas.Config(clients=32, operations=2500, replicas=3, faults=faults, database=POSTGRES_URL)

    result = replicas.run(config)

    line = LINE.match(result.line())
    assert line, result.line()
    assert result.violations == [], "\n".join([result.line(), *result.violations[:20]])
    operations, ok, failed, unknown, injected = (int(line[n]) for n in range(1, 6))
    assert operations == ok + failed + unknown == 2500
    assert ok > operations // 2 and failed > 0  # a real mix: most calls land, the rules refuse some
    assert result.verdict.lost == 0
    assert result.verdict.transactions >= ok
    assert result.verdict.refusals_justified == failed
    assert injected >= (10 if faults != "none" else 0)
    if faults == "kill":
        assert result.run.attempt_codes["UNAVAILABLE"] > 0  # the kills did cut calls in flight


def test_copies_sent_to_two_replicas_at_once_get_the_first_answer() -> None:
    """SPEC §9, "even when the copies arrive at once": of two copies of one AllocateToken on two replicas, one
    books the patient; the other must answer that booking, not refuse the patient as already holding a token."""
    config = replicas.Config(replicas=2, database=POSTGRES_URL)
    with replicas.cluster(config) as cluster:
        doctors, _ = replicas._setup(cluster.replicas[0])

        async def send_pairs() -> list[tuple[str, str]]:
            channels = [grpc.aio.insecure_channel(r.address) for r in cluster.replicas]
            stubs = [opd_pb2_grpc.OPDTokenServiceStub(c) for c in channels]
            answers = []
            for n in range(40):
                request = pb.AllocateTokenRequest(
                    patient=pb.Patient(name=f"Copy Patient {n}", phone=f"+91-91000-{n:05d}", age=40),
                    doctor_id=doctors[n % 2], date=replicas.DATE, source=pb.SOURCE_WALK_IN,
                    preferred_slot_time="09:00", flexible=True, request_id=str(uuid.uuid4()))
                answers.append(tuple(await asyncio.gather(*(_answer(stub, request) for stub in stubs))))
            for channel in channels:
                await channel.close()
            return answers

        answers = asyncio.run(send_pairs())
    assert [pair for pair in answers if pair[0] != pair[1]] == []


async def _answer(stub: opd_pb2_grpc.OPDTokenServiceStub, request: pb.AllocateTokenRequest) -> str:
    try:
        answer = await stub.AllocateToken(request, timeout=30)
    except grpc.aio.AioRpcError as error:
        return error.code().name
    return f"{answer.token.token_id} {pb.Status.Name(answer.token.status)}"


@pytest.fixture(scope="module")
def played() -> Iterator[tuple[replicas.Cluster, replicas.Run]]:
    """A short clean run (no copies), kept with its schema so that the tests below can spoil it."""
    config = replicas.Config(clients=8, operations=400, replicas=2, database=POSTGRES_URL, copies=0)
    with replicas.cluster(config) as cluster:
        yield cluster, cluster.play()


def _kinds(cluster: replicas.Cluster, run: replicas.Run) -> set[str]:
    return {v.split(":", 1)[0] for v in cluster.check(run, 0.0).violations}


def _first(run: replicas.Run, method: str, outcome: str) -> Operation:
    return next(op for op in run.operations if op.method == method and op.outcome == outcome)


def test_the_checker_passes_the_clean_run(played: tuple[replicas.Cluster, replicas.Run]) -> None:
    cluster, run = played
    assert cluster.check(run, 0.0).violations == []


def test_the_checker_catches_an_answer_the_table_does_not_back(played: tuple[replicas.Cluster, replicas.Run],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    cluster, run = played
    op = _first(run, "AllocateToken", "ok")
    wrong = type(op.answer)()
    wrong.CopyFrom(op.answer)
    wrong.token.token_number += 1
    monkeypatch.setattr(op, "answer", wrong)
    assert {"model", "answer"} <= _kinds(cluster, run)


def test_the_checker_catches_a_refusal_the_rules_do_not_give(played: tuple[replicas.Cluster, replicas.Run],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    cluster, run = played
    op = next(op for op in run.operations if op.outcome == "failed" and op.reason == "ILLEGAL_STATE_TRANSITION"
              and op.method == "CheckInToken")
    monkeypatch.setattr(op, "reason", "GRACE_PERIOD_NOT_ELAPSED")
    assert "refusal" in _kinds(cluster, run)


def test_the_checker_catches_a_refused_call_that_changed_the_day(played: tuple[replicas.Cluster, replicas.Run],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    cluster, run = played
    op = _first(run, "CancelToken", "ok")
    for name, value in (("outcome", "failed"), ("code", "FAILED_PRECONDITION"),
                        ("reason", "ILLEGAL_STATE_TRANSITION")):
        monkeypatch.setattr(op, name, value)
    assert "refused but landed" in _kinds(cluster, run)


def test_the_checker_takes_an_unknown_outcome_either_way(played: tuple[replicas.Cluster, replicas.Run],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A call that got no answer may or may not have landed: neither is a violation."""
    cluster, run = played
    for op in (_first(run, "CancelToken", "ok"), _first(run, "CallNext", "failed")):
        monkeypatch.setattr(op, "outcome", "unknown")
    assert cluster.check(run, 0.0).violations == []


def test_the_checker_catches_lost_answers_and_half_done_transactions(
        played: tuple[replicas.Cluster, replicas.Run]) -> None:
    """Last: it spoils the tables themselves."""
    cluster, run = played
    lost = _first(run, "CheckInToken", "ok")
    other_day = next(d for d in run.doctors if d != lost.doctor_id)
    changed = f"{other_day}-{lost.date.replace('-', '')}-T1"
    engine = sqlalchemy.create_engine(cluster.url, poolclass=sqlalchemy.NullPool)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM stored_requests WHERE request_id = %(id)s", {"id": lost.request_id})
            conn.exec_driver_sql("UPDATE tokens SET status = CASE status WHEN 'CANCELLED' THEN 'CONFIRMED' "
                                 "ELSE 'CANCELLED' END WHERE token_id = %(id)s", {"id": changed})
            conn.exec_driver_sql("UPDATE slots SET max_capacity = max_capacity + 1 WHERE slot_id = %(id)s",
                                 {"id": f"{other_day}-{lost.date.replace('-', '')}-1100"})
    finally:
        engine.dispose()
    violations = cluster.check(run, 0.0).violations
    assert any(v.startswith(f"lost: op {lost.number} ") for v in violations), violations
    assert any(v.startswith(f"storage: {changed}: row says") for v in violations), violations
    assert any(v.startswith(f"final: {changed}: ") for v in violations), violations
    assert any(v.startswith(f"storage: {other_day}-") and "-1100: the slot row" in v for v in violations), violations
    assert any(v.startswith(f"final: {other_day}-") and "-1100: capacity" in v for v in violations), violations
