"""The client library against grpc_testing's channel: the test plays the server, call by call, with no network."""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
import grpc_testing
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from clients.library import DeadlineExceeded, InvalidArgument, NotFound, OPDClient, OPDError, Unavailable
from opd_grpc._gen.opd.v1 import opd_pb2 as pb

pytestmark = pytest.mark.backend_independent

SERVICE = pb.DESCRIPTOR.services_by_name["OPDTokenService"]
METHOD = SERVICE.methods_by_name
DAY = "2030-01-07"
OK = grpc.StatusCode.OK
WAIT = 5.0  # seconds before a step that should have happened fails the test instead of hanging it


class Background:
    """Runs a blocking call on a daemon thread; `result()` fails the test when it does not finish in time."""

    def __init__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any):
        self._box: queue.Queue[tuple[bool, Any]] = queue.Queue()

        def run() -> None:
            try:
                self._box.put((True, fn(*args, **kwargs)))
            except BaseException as error:  # handed to the test thread by result()
                self._box.put((False, error))

        threading.Thread(target=run, daemon=True).start()

    def result(self) -> Any:
        try:
            ok, value = self._box.get(timeout=WAIT)
        except queue.Empty:
            pytest.fail("the call did not finish in time")
        if not ok:
            raise value
        return value


def within(fn: Callable[..., Any], *args: Any) -> Any:
    return Background(fn, *args).result()


class TimeoutRecorder:
    """A grpc_testing channel that also notes each call's timeout, which grpc_testing itself throws away."""

    def __init__(self, channel: Any):
        self.channel = channel
        self.timeouts: list[tuple[str, float | None]] = []

    def _recording(self, method: str, call: Any) -> Callable[..., Any]:
        def invoke(request: Any, timeout: float | None = None, metadata: Any = None) -> Any:
            self.timeouts.append((method.rsplit("/", 1)[-1], timeout))
            return call(request, timeout=timeout, metadata=metadata)
        return invoke

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Callable[..., Any]:
        return self._recording(method, self.channel.unary_unary(method, *args, **kwargs))

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Callable[..., Any]:
        return self._recording(method, self.channel.unary_stream(method, *args, **kwargs))


@pytest.fixture
def server() -> Any:
    """The test's side of the channel: take_unary_unary / take_unary_stream answer each call."""
    return grpc_testing.channel([SERVICE], grpc_testing.strict_real_time())


def client_of(server: Any, **options: Any) -> tuple[OPDClient, TimeoutRecorder]:
    recorder = TimeoutRecorder(server)
    return OPDClient(channel=recorder, **{"backoff": 0.001, **options}), recorder  # type: ignore[arg-type]


def rich_trailers(code: int, message: str, reason: str, violations: dict[str, str] | None = None) -> tuple:
    """Trailing metadata carrying a google.rpc.Status the way the server sends one (SPEC §12)."""
    details = [error_details_pb2.ErrorInfo(reason=reason, domain="opd.v1")]
    if violations:
        details.append(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in violations.items()]))
    packed = []
    for detail in details:
        packed.append(any_pb2.Any())
        packed[-1].Pack(detail)
    status = status_pb2.Status(code=code, message=message, details=packed)
    return (("grpc-status-details-bin", status.SerializeToString()),)


def test_a_call_sends_the_request_fields_with_a_deadline_and_the_api_key(server: Any) -> None:
    client, recorder = client_of(server, timeout=2.5, api_key="k-reception")
    patient = pb.Patient(name="Asha", phone="+91-98450-00001", age=40)
    answer = pb.AllocateTokenResponse(token=pb.Token(token_id="T1", token_number=1))
    pending = Background(client.allocate_token, patient=patient, doctor_id="DOC001", date=DAY,
                         source=pb.SOURCE_WALK_IN, preferred_slot_time="09:00", flexible=True)
    metadata, request, rpc = within(server.take_unary_unary, METHOD["AllocateToken"])
    rpc.terminate(answer, (), OK, "")

    assert pending.result() == answer
    [(method, timeout)] = recorder.timeouts
    assert method == "AllocateToken" and 2.0 < timeout <= 2.5
    assert ("authorization", "Bearer k-reception") in metadata
    assert (request.patient, request.doctor_id, request.date) == (patient, "DOC001", DAY)
    assert (request.source, request.preferred_slot_time, request.flexible) == (pb.SOURCE_WALK_IN, "09:00", True)


def test_unavailable_is_retried_with_the_same_request_id_within_the_calls_one_deadline(server: Any) -> None:
    client, recorder = client_of(server, timeout=1.5)
    pending = Background(client.cancel_token, "DOC001-20300107-T001", "patient left")
    _, first, rpc = within(server.take_unary_unary, METHOD["CancelToken"])
    rpc.terminate(pb.CancelTokenResponse(), (), grpc.StatusCode.UNAVAILABLE, "connection refused")
    _, second, rpc = within(server.take_unary_unary, METHOD["CancelToken"])
    rpc.terminate(pb.CancelTokenResponse(token=pb.Token(token_id="DOC001-20300107-T001")), (), OK, "")

    assert pending.result().token.token_id == "DOC001-20300107-T001"
    assert len(first.request_id) == 36 and second.request_id == first.request_id
    assert (second.token_id, second.reason) == ("DOC001-20300107-T001", "patient left")
    [(_, first_timeout), (_, second_timeout)] = recorder.timeouts
    assert 1.0 < second_timeout < first_timeout <= 1.5  # what is left of the call's 1.5 s, not 1.5 s afresh


def test_a_callers_request_id_is_kept_and_a_change_is_retried_after_deadline_exceeded(server: Any) -> None:
    client, _ = client_of(server)
    pending = Background(client.call_next, "DOC001", DAY, request_id="my-id")
    _, first, rpc = within(server.take_unary_unary, METHOD["CallNext"])
    rpc.terminate(pb.CallNextResponse(), (), grpc.StatusCode.DEADLINE_EXCEEDED, "deadline")
    _, second, rpc = within(server.take_unary_unary, METHOD["CallNext"])
    rpc.terminate(pb.CallNextResponse(), (), OK, "")

    pending.result()
    assert first.request_id == second.request_id == "my-id"


def test_a_read_has_no_request_id_and_is_not_retried_after_deadline_exceeded(server: Any) -> None:
    client, _ = client_of(server)
    pending = Background(client.get_token, "DOC001-20300107-T001")
    _, request, rpc = within(server.take_unary_unary, METHOD["GetToken"])
    rpc.terminate(pb.GetTokenResponse(), (), grpc.StatusCode.DEADLINE_EXCEEDED, "deadline")

    with pytest.raises(DeadlineExceeded) as raised:  # its own class, beside Unavailable
        pending.result()
    assert raised.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert "request_id" not in request.DESCRIPTOR.fields_by_name and request.token_id == "DOC001-20300107-T001"


def test_a_rich_status_becomes_a_readable_error_with_reason_and_field_violations(server: Any) -> None:
    client, _ = client_of(server)
    pending = Background(client.create_slots, "DOC001", [pb.SlotSpec(date="2030-13-01", start_time="9")])
    _, _, rpc = within(server.take_unary_unary, METHOD["CreateSlots"])
    message = "Invalid request: slots[0].date: 2030-13-01 is not a YYYY-MM-DD date"
    trailers = rich_trailers(code_pb2.INVALID_ARGUMENT, message, "INVALID_ARGUMENT", {
        "slots[0].date": "2030-13-01 is not a YYYY-MM-DD date", "slots[0].start_time": "9 is not HH:MM"})
    rpc.terminate(pb.CreateSlotsResponse(), trailers, grpc.StatusCode.INVALID_ARGUMENT, message)

    with pytest.raises(InvalidArgument) as raised:
        pending.result()
    error = raised.value
    assert (error.code, error.reason, error.message) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", message)
    assert error.field_violations == [("slots[0].date", "2030-13-01 is not a YYYY-MM-DD date"),
                                      ("slots[0].start_time", "9 is not HH:MM")]
    # The message already names the date problem; str() adds only what it leaves out.
    assert str(error) == f"INVALID_ARGUMENT (INVALID_ARGUMENT): {message} [slots[0].start_time: 9 is not HH:MM]"


def test_not_found_is_not_retried_and_reads_like_the_server_said_it(server: Any) -> None:
    client, _ = client_of(server)
    pending = Background(client.get_doctor, "DOC009")
    _, _, rpc = within(server.take_unary_unary, METHOD["GetDoctor"])
    message = "No doctor has the id 'DOC009'."
    rpc.terminate(pb.GetDoctorResponse(), rich_trailers(code_pb2.NOT_FOUND, message, "DOCTOR_NOT_FOUND"),
                  grpc.StatusCode.NOT_FOUND, message)

    with pytest.raises(NotFound, match=r"^NOT_FOUND \(DOCTOR_NOT_FOUND\): No doctor has the id 'DOC009'\.$"):
        pending.result()


def test_unavailable_on_every_attempt_raises_unavailable(server: Any) -> None:
    client, recorder = client_of(server, attempts=3)
    pending = Background(client.check_in_token, "DOC001-20300107-T001")
    ids = []
    for _ in range(3):
        _, request, rpc = within(server.take_unary_unary, METHOD["CheckInToken"])
        ids.append(request.request_id)
        rpc.terminate(pb.CheckInTokenResponse(), (), grpc.StatusCode.UNAVAILABLE, "connection refused")

    with pytest.raises(Unavailable, match="^UNAVAILABLE: connection refused$") as raised:
        pending.result()  # a fourth attempt would still be waiting for an answer here
    assert len(set(ids)) == 1 and len(recorder.timeouts) == 3
    assert raised.value.request_id == ids[0]  # the change may have been applied: send it again with this id


def test_unavailable_is_retried_as_long_as_the_deadline_allows(server: Any) -> None:
    """A server restarting refuses connections for a second or so: the call keeps trying, every pause at most
    MAX_RETRY_PAUSE, and answers once the server does."""
    client, recorder = client_of(server, timeout=5.0)
    pending = Background(client.check_in_token, "DOC001-20300107-T001")
    for _ in range(8):
        _, _, rpc = within(server.take_unary_unary, METHOD["CheckInToken"])
        rpc.terminate(pb.CheckInTokenResponse(), (), grpc.StatusCode.UNAVAILABLE, "connection refused")
    _, _, rpc = within(server.take_unary_unary, METHOD["CheckInToken"])
    rpc.terminate(pb.CheckInTokenResponse(token=pb.Token(token_number=1)), (), OK, "")

    assert pending.result().token.token_number == 1
    assert len(recorder.timeouts) == 9


def test_no_retry_starts_once_its_backoff_would_pass_the_calls_deadline(server: Any) -> None:
    client, recorder = client_of(server, timeout=1.0, backoff=0.4, attempts=4)
    pending = Background(client.check_in_token, "DOC001-20300107-T001")
    for _ in range(3):  # retries start after 0.4 s and 0.5 s more (MAX_RETRY_PAUSE); a third would pass the 1 s
        _, _, rpc = within(server.take_unary_unary, METHOD["CheckInToken"])
        rpc.terminate(pb.CheckInTokenResponse(), (), grpc.StatusCode.UNAVAILABLE, "connection refused")

    with pytest.raises(Unavailable, match="^UNAVAILABLE: connection refused$"):
        pending.result()
    assert len(recorder.timeouts) == 3


def test_iter_tokens_follows_next_page_token_to_the_end(server: Any) -> None:
    client, _ = client_of(server)
    pending = Background(lambda: [t.token_number for t in client.iter_tokens("DOC001", DAY)])
    pages = [(["", "p2"], [1, 2]), (["p2", ""], [3])]
    for (page_token, next_page_token), numbers in pages:
        _, request, rpc = within(server.take_unary_unary, METHOD["ListTokens"])
        assert (request.doctor_id, request.date, request.page_token) == ("DOC001", DAY, page_token)
        rpc.terminate(pb.ListTokensResponse(tokens=[pb.Token(token_number=n) for n in numbers],
                                            next_page_token=next_page_token), (), OK, "")
    assert pending.result() == [1, 2, 3]


# WatchQueue

def snapshot(doctor_id: str, sequence: int) -> pb.WatchQueueResponse:
    """As a server sends it: after event `sequence`, the token that event moved is the last changed."""
    tokens = [event(doctor_id, sequence).event.token] if sequence else []
    return pb.WatchQueueResponse(snapshot=pb.QueueSnapshot(doctor_id=doctor_id, date=DAY, sequence=sequence,
                                                           tokens=tokens))


def event(doctor_id: str, sequence: int) -> pb.WatchQueueResponse:
    """Event `sequence` allocates token `sequence`, at minute `sequence`."""
    at = Timestamp(seconds=1_900_000_000 + 60 * sequence)
    token = pb.Token(token_id=f"{doctor_id}-20300107-T{sequence}", status=pb.STATUS_CONFIRMED, updated_at=at)
    return pb.WatchQueueResponse(event=pb.QueueEvent(doctor_id=doctor_id, date=DAY, sequence=sequence,
                                                     kind=pb.EVENT_KIND_ALLOCATED, token=token, occurred_at=at))


class Viewer:
    """Reads a watch on its own thread, the way the board does, handing each update to the test."""

    def __init__(self, stream: Any):
        self.updates: queue.Queue[pb.WatchQueueResponse] = queue.Queue()
        self.finished = Background(self._read, stream)

    def _read(self, stream: Any) -> None:
        for update in stream:
            self.updates.put(update)

    def next(self, count: int) -> list[tuple[str, str, int]]:
        """The next `count` updates as (kind, doctor, sequence)."""
        seen = []
        for _ in range(count):
            try:
                update = self.updates.get(timeout=WAIT)
            except queue.Empty:
                pytest.fail(f"expected {count} updates, got {seen}")
            kind = update.WhichOneof("update")
            item = getattr(update, kind)
            seen.append((kind, item.doctor_id, item.sequence))
        return seen


def test_watch_resumes_after_unavailable_from_the_last_sequences_and_shows_nothing_twice(server: Any) -> None:
    client, recorder = client_of(server)
    lost: list[Any] = []
    watch = client.watch(["DOC001", "DOC002"], DAY, on_reconnect=lost.append)
    viewer = Viewer(watch)
    _, first, rpc = within(server.take_unary_stream, METHOD["WatchQueue"])
    assert list(first.doctor_ids) == ["DOC001", "DOC002"] and first.date == DAY
    assert not first.HasField("after_sequence") and not first.after_sequences  # snapshot first
    for update in (snapshot("DOC001", 3), snapshot("DOC002", 0), event("DOC001", 4)):
        rpc.send_response(update)
    assert viewer.next(3) == [("snapshot", "DOC001", 3), ("snapshot", "DOC002", 0), ("event", "DOC001", 4)]
    assert watch.connected
    rpc.terminate((), grpc.StatusCode.UNAVAILABLE, "server shutting down")

    _, second, rpc = within(server.take_unary_stream, METHOD["WatchQueue"])
    assert not watch.connected  # a board says "reconnecting…" until the new stream brings something
    # DOC001 resumes one event early, so that the server sends its event 4 again, to be checked and dropped.
    assert dict(second.after_sequences) == {"DOC001": 3, "DOC002": 0}
    for update in (event("DOC001", 4), event("DOC001", 5), event("DOC002", 1)):  # 4 replayed: dropped
        rpc.send_response(update)
    assert viewer.next(2) == [("event", "DOC001", 5), ("event", "DOC002", 1)]
    assert watch.connected and watch.last_sequences == {"DOC001": 5, "DOC002": 1}
    assert watch.reconnects == 1 and [e.code for e in lost] == [grpc.StatusCode.UNAVAILABLE]

    watch.cancel()
    within(rpc.cancelled)
    viewer.finished.result()
    assert viewer.updates.empty()
    assert recorder.timeouts == [("WatchQueue", None)] * 2  # a long-lived stream has no deadline


def test_watch_that_fell_behind_resumes_keeping_the_callers_start_for_doctors_not_seen(server: Any) -> None:
    client, _ = client_of(server)
    watch = client.watch(["DOC001", "DOC002"], DAY, after_sequence=7, after_sequences={"DOC002": 2})
    viewer = Viewer(watch)
    _, first, rpc = within(server.take_unary_stream, METHOD["WatchQueue"])
    assert first.after_sequence == 7 and dict(first.after_sequences) == {"DOC001": 7, "DOC002": 2}
    rpc.send_response(event("DOC001", 8))
    assert viewer.next(1) == [("event", "DOC001", 8)]
    rpc.terminate(rich_trailers(code_pb2.ABORTED, "read faster", "WATCHER_FELL_BEHIND"), grpc.StatusCode.ABORTED,
                  "read faster")

    _, second, rpc = within(server.take_unary_stream, METHOD["WatchQueue"])
    assert second.after_sequence == 7 and dict(second.after_sequences) == {"DOC001": 7, "DOC002": 2}  # 8 again
    watch.cancel()
    viewer.finished.result()


CANCEL_OF_T2 = pb.WatchQueueResponse(event=pb.QueueEvent(
    doctor_id="DOC001", date=DAY, sequence=4, kind=pb.EVENT_KIND_CANCELLED,
    occurred_at=Timestamp(seconds=1_900_000_500),
    token=pb.Token(token_id="DOC001-20300107-T2", status=pb.STATUS_CANCELLED)))


@pytest.mark.parametrize("replayed, changed", [
    (event("DOC001", 4), False),  # the event the snapshot ended with: dropped, and the watch goes on
    (CANCEL_OF_T2, True),  # the restored server's own event 4
], ids=["same history", "restored history"])
def test_a_watch_resumed_after_a_snapshot_checks_the_event_the_snapshot_ended_with(
        server: Any, replayed: Any, changed: bool) -> None:
    """A board whose last update was a snapshot (a quiet doctor) resumed after its sequence unchecked: after a
    restore it followed the new history and never heard of T2's cancel (a reviewer's find)."""
    client, _ = client_of(server)
    viewer = Viewer(client.watch(["DOC001"], DAY))
    _, _, rpc = within(server.take_unary_stream, METHOD["WatchQueue"])
    rpc.send_response(snapshot("DOC001", 4))
    assert viewer.next(1) == [("snapshot", "DOC001", 4)]
    rpc.terminate((), grpc.StatusCode.UNAVAILABLE, "restarting")
    _, again, rpc = within(server.take_unary_stream, METHOD["WatchQueue"])
    assert dict(again.after_sequences) == {"DOC001": 3}
    rpc.send_response(replayed)
    if changed:
        with pytest.raises(OPDError) as raised:
            viewer.finished.result()
        assert raised.value.reason == "HISTORY_CHANGED"
    else:
        rpc.send_response(event("DOC001", 5))
        assert viewer.next(1) == [("event", "DOC001", 5)]
        rpc.terminate((), grpc.StatusCode.INVALID_ARGUMENT, "done")
        with pytest.raises(OPDError):
            viewer.finished.result()


def test_a_resumed_watch_whose_last_event_the_server_now_tells_otherwise_raises_out_of_range(server: Any) -> None:
    """The server's database was restored from a backup and has since written past this watch's sequence: the
    same sequence numbers now name other events. Resumed after them, a board would show the old history for good
    (a reviewer's find); the watch raises OUT_OF_RANGE (HISTORY_CHANGED), on which the board starts afresh."""
    client, _ = client_of(server)
    viewer = Viewer(client.watch(["DOC001"], DAY))
    _, _, rpc = within(server.take_unary_stream, METHOD["WatchQueue"])
    seen = event("DOC001", 10)
    seen.event.token.token_id, seen.event.kind = "DOC001-20310303-T2", pb.EVENT_KIND_CANCELLED
    rpc.send_response(snapshot("DOC001", 9))
    rpc.send_response(seen)
    assert viewer.next(2) == [("snapshot", "DOC001", 9), ("event", "DOC001", 10)]
    rpc.terminate((), grpc.StatusCode.UNAVAILABLE, "restarting")

    _, again, rpc = within(server.take_unary_stream, METHOD["WatchQueue"])
    assert dict(again.after_sequences) == {"DOC001": 9}
    other = event("DOC001", 10)
    other.event.token.token_id = "DOC001-20310303-T5"  # ALLOCATED T5: the restored server's own event 10
    rpc.send_response(other)
    with pytest.raises(OPDError) as raised:
        viewer.finished.result()
    assert (raised.value.code, raised.value.reason) == (grpc.StatusCode.OUT_OF_RANGE, "HISTORY_CHANGED")
    assert viewer.updates.empty()


def test_watch_ended_cancelled_by_the_server_reconnects(server: Any) -> None:
    """A stream that reaches a server as its stop begins is ended CANCELLED by gRPC itself: two of three boards
    reconnecting through a restart had exited on it (a reviewer's find)."""
    client, _ = client_of(server)
    watch = client.watch(["DOC001"], DAY)
    viewer = Viewer(watch)
    _, _, rpc = within(server.take_unary_stream, METHOD["WatchQueue"])
    rpc.send_response(snapshot("DOC001", 3))
    assert viewer.next(1) == [("snapshot", "DOC001", 3)]
    rpc.terminate((), grpc.StatusCode.CANCELLED, "CANCELLED")
    _, again, rpc = within(server.take_unary_stream, METHOD["WatchQueue"])
    assert dict(again.after_sequences) == {"DOC001": 2}  # one early: event 3 again, checked against the snapshot
    rpc.send_response(event("DOC001", 3))
    rpc.send_response(event("DOC001", 4))
    assert viewer.next(1) == [("event", "DOC001", 4)]
    watch.cancel()
    within(rpc.cancelled)
    viewer.finished.result()


def test_watch_refused_for_too_many_watchers_tries_again(server: Any) -> None:
    """After a network failure the server may still count the watch's old stream for a while: no room is a
    reason to try again, not to give up."""
    client, _ = client_of(server)
    watch = client.watch(["DOC001"], DAY)
    viewer = Viewer(watch)
    _, _, rpc = within(server.take_unary_stream, METHOD["WatchQueue"])
    message = "The server already serves MAX_WATCHERS streams; try again later."
    rpc.terminate(rich_trailers(code_pb2.RESOURCE_EXHAUSTED, message, "TOO_MANY_WATCHERS"),
                  grpc.StatusCode.RESOURCE_EXHAUSTED, message)

    _, again, rpc = within(server.take_unary_stream, METHOD["WatchQueue"])
    assert list(again.doctor_ids) == ["DOC001"] and watch.reconnects == 1
    rpc.send_response(snapshot("DOC001", 2))
    assert viewer.next(1) == [("snapshot", "DOC001", 2)]
    watch.cancel()
    viewer.finished.result()


def test_watch_raises_an_error_that_reconnecting_would_not_fix(server: Any) -> None:
    client, _ = client_of(server)
    viewer = Viewer(client.watch(["DOC009"], DAY))
    _, _, rpc = within(server.take_unary_stream, METHOD["WatchQueue"])
    message = "No doctor has the id 'DOC009'."
    rpc.terminate(rich_trailers(code_pb2.NOT_FOUND, message, "DOCTOR_NOT_FOUND"), grpc.StatusCode.NOT_FOUND, message)

    with pytest.raises(NotFound) as raised:
        viewer.finished.result()
    assert raised.value.reason == "DOCTOR_NOT_FOUND"


def test_watch_without_reconnect_raises_unavailable(server: Any) -> None:
    client, _ = client_of(server)
    viewer = Viewer(client.watch(["DOC001"], DAY, reconnect=False))
    _, _, rpc = within(server.take_unary_stream, METHOD["WatchQueue"])
    rpc.terminate((), grpc.StatusCode.UNAVAILABLE, "server shutting down")

    with pytest.raises(Unavailable):
        viewer.finished.result()


def test_leaving_the_loop_cancels_the_stream(server: Any) -> None:
    client, _ = client_of(server)

    def first_update() -> pb.WatchQueueResponse:
        for update in client.watch(["DOC001"], DAY):
            return update
        raise AssertionError("the watch ended without an update")

    pending = Background(first_update)
    _, _, rpc = within(server.take_unary_stream, METHOD["WatchQueue"])
    rpc.send_response(snapshot("DOC001", 1))
    assert pending.result() == snapshot("DOC001", 1)
    within(rpc.cancelled)  # returns once the client has cancelled the call


def test_a_watch_that_hears_nothing_for_stall_seconds_reconnects_and_resumes(server: Any) -> None:
    client, _ = client_of(server)
    lost: list[OPDError] = []
    watch = client.watch(["DOC001"], DAY, on_reconnect=lost.append, stall_seconds=0.5)
    viewer = Viewer(watch)
    _, _, rpc = within(server.take_unary_stream, METHOD["WatchQueue"])
    rpc.send_response(snapshot("DOC001", 3))
    assert viewer.next(1) == [("snapshot", "DOC001", 3)]
    within(rpc.cancelled)  # nothing more came, not even a heartbeat: the watch gave the call up

    _, second, rpc = within(server.take_unary_stream, METHOD["WatchQueue"])
    assert dict(second.after_sequences) == {"DOC001": 2}
    assert watch.reconnects == 1 and [type(e) for e in lost] == [Unavailable]
    assert "no update came for 0.5 s" in lost[0].message
    rpc.send_response(event("DOC001", 3))
    rpc.send_response(event("DOC001", 4))
    assert viewer.next(1) == [("event", "DOC001", 4)]
    watch.cancel()
    viewer.finished.result()


def test_the_time_a_caller_spends_on_an_update_is_not_a_stall(server: Any) -> None:
    client, _ = client_of(server)
    # A second of silence is a stall here; the gap below is 2.5 s. (0.2 and 0.5 s had failed on a loaded machine,
    # the next update's 0.2 s window missed.)
    watch = client.watch(["DOC001"], DAY, stall_seconds=1.0)
    updates = iter(watch)
    pending = Background(next, updates)
    _, _, rpc = within(server.take_unary_stream, METHOD["WatchQueue"])
    rpc.send_response(snapshot("DOC001", 3))
    assert pending.result() == snapshot("DOC001", 3)
    time.sleep(2.5)  # busy drawing it, say; the watch is not reading meanwhile
    rpc.send_response(event("DOC001", 4))

    assert within(next, updates) == event("DOC001", 4)
    assert watch.reconnects == 0
    updates.close()
    within(rpc.cancelled)
    assert not [t for t in threading.enumerate() if t.name == "opd-watch-stall"]  # its watchdog ended with it


def test_a_stalled_watch_without_reconnect_raises_unavailable(server: Any) -> None:
    client, _ = client_of(server)
    viewer = Viewer(client.watch(["DOC001"], DAY, reconnect=False, stall_seconds=0.2))
    within(server.take_unary_stream, METHOD["WatchQueue"])

    with pytest.raises(Unavailable, match="no update came for 0.2 s"):
        viewer.finished.result()


@pytest.mark.parametrize("options", [{"backoff": 0}, {"backoff": -1}, {"timeout": 0}, {"timeout": float("nan")}])
def test_a_retry_pause_or_deadline_that_is_not_positive_is_refused_at_once(options: dict[str, float]) -> None:
    """backoff=0 had sent the retries of a call refused UNAVAILABLE as fast as they failed, until its deadline."""
    with pytest.raises(ValueError, match="must be positive"):
        OPDClient("127.0.0.1:1", **options)


def test_a_call_after_close_raises_an_opd_error_not_grpcs_value_error() -> None:
    client = OPDClient("127.0.0.1:1")  # closed before it ever connects: no server is needed
    client.close()
    with pytest.raises(OPDError) as raised:
        client.get_doctor("DOC001")
    assert raised.value.code == grpc.StatusCode.CANCELLED
