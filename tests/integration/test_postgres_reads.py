"""PostgreSQL: a read takes no row lock. A change locks its doctor-day's row until it commits (that is how
replicas take turns on one day); a read runs in a snapshot of its own, so a display board's or a status screen's
read answers at once while another replica is in the middle of a change of that day."""

from __future__ import annotations

import grpc
import pytest
import sqlalchemy

from opd_grpc._gen.opd.v1 import opd_pb2 as pb
from tests.support import DAY, TEST_DATABASE, LiveServer, allocate, make_doctor, make_slots

pytestmark = pytest.mark.skipif(TEST_DATABASE != "postgresql",
                                reason="row locks are PostgreSQL's: runs with TEST_DATABASE=postgresql")
READ_TIMEOUT = 5.0  # far longer than a read takes; a read that waited for the lock would wait for all of it


def test_reads_answer_while_another_transaction_holds_the_days_row(live: LiveServer):
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("09:00", "10:00", 2))
    token = allocate(live.stub, doctor, 1).token
    other_replica = sqlalchemy.create_engine(live.settings.DATABASE_URL, poolclass=sqlalchemy.NullPool)
    try:
        with other_replica.connect() as conn:
            held = conn.execute(sqlalchemy.text("SELECT last_sequence FROM doctor_days WHERE doctor_id = :d AND "
                                                "date = :day FOR UPDATE"), {"d": doctor, "day": DAY}).scalar()
            assert held == 2  # the slot's creation and the allocation

            assert live.stub.GetToken(pb.GetTokenRequest(token_id=token.token_id),
                                      timeout=READ_TIMEOUT).token.status == pb.STATUS_CONFIRMED
            assert len(live.stub.ListTokens(pb.ListTokensRequest(doctor_id=doctor, date=DAY),
                                            timeout=READ_TIMEOUT).tokens) == 1
            assert live.stub.GetSlotStatus(pb.GetSlotStatusRequest(slot_id=token.slot_id),
                                           timeout=READ_TIMEOUT).seat_holders == 1
            (stats,) = live.stub.GetStats(pb.GetStatsRequest(date=DAY, doctor_id=doctor), timeout=READ_TIMEOUT).stats
            assert stats.total_tokens == 1

            with pytest.raises(grpc.RpcError) as waited:  # a change of the day still waits for the lock
                live.stub.CheckInToken(pb.CheckInTokenRequest(token_id=token.token_id), timeout=1.0)
            assert waited.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            conn.rollback()
    finally:
        other_replica.dispose()
