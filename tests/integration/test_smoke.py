from opd_grpc._gen.opd.v1 import opd_pb2 as pb
from tests.support import allocate, make_doctor, make_slots, spec_violations


def test_a_full_slot_waitlists_and_a_cancel_promotes(live):
    doctor = make_doctor(live.stub)
    make_slots(live.stub, doctor, ("09:00", "10:00", 1))
    first = allocate(live.stub, doctor, 1).token
    second = allocate(live.stub, doctor, 2).token
    assert (first.status, second.status) == (pb.STATUS_CONFIRMED, pb.STATUS_WAITLISTED)
    answer = live.stub.CancelToken(pb.CancelTokenRequest(token_id=first.token_id))
    assert [t.token_id for t in answer.promoted] == [second.token_id]
    assert spec_violations(live.stub, doctor) == []
