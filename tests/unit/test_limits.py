"""The limits of the call pipeline (opd_grpc/api/limits.py): a token bucket per API key, on a clock the test
moves, and the counters of calls and streams in flight."""

from __future__ import annotations

import grpc
import pytest

from opd_grpc.api.limits import InFlight, RateLimiter, calls_in_flight, watchers
from opd_grpc.api.status import from_engine_error
from opd_grpc.engine.errors import ResourceExhausted

pytestmark = pytest.mark.backend_independent


class FakeClock:
    """Seconds that pass only when the test moves them; its steps (eighths of a second) keep the sums exact."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def admitted(limiter: RateLimiter, key_id: str, calls: int) -> int:
    """How many of `calls` made at once the limiter lets through."""
    passed = 0
    for _ in range(calls):
        try:
            limiter.admit(key_id)
            passed += 1
        except ResourceExhausted:
            pass
    return passed


def refusal(limiter: RateLimiter, key_id: str) -> ResourceExhausted:
    with pytest.raises(ResourceExhausted) as refused:
        limiter.admit(key_id)
    return refused.value


# ---- the rate limit ------------------------------------------------------------------------------------


def test_a_burst_of_one_seconds_calls_is_admitted_and_the_next_is_refused_as_rate_limited():
    limiter = RateLimiter(4, clock=FakeClock())
    for _ in range(4):
        limiter.admit("k1")
    refused = refusal(limiter, "k1")
    assert refused.reason == "RATE_LIMITED"
    assert from_engine_error(refused).code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "4 calls a second" in refused.message
    assert "wait 0.25 s" in refused.message  # one call's worth of refill, at 4 a second


def test_refused_calls_do_not_use_up_the_refill():
    """A client that keeps hammering is served again as soon as one call's worth has refilled."""
    clock = FakeClock()
    limiter = RateLimiter(4, clock=clock)
    assert admitted(limiter, "k1", 20) == 4
    clock.now += 0.125
    assert admitted(limiter, "k1", 20) == 0
    clock.now += 0.125
    assert admitted(limiter, "k1", 20) == 1


def test_one_call_refills_every_1_over_n_seconds_and_the_burst_never_exceeds_n():
    clock = FakeClock()
    limiter = RateLimiter(4, clock=clock)
    assert admitted(limiter, "k1", 4) == 4
    clock.now += 0.25
    assert admitted(limiter, "k1", 4) == 1
    clock.now += 0.5
    assert admitted(limiter, "k1", 4) == 2
    clock.now += 3600  # an idle hour earns one second's calls, not 3600 seconds' worth
    assert admitted(limiter, "k1", 10) == 4


def test_each_key_has_a_bucket_of_its_own():
    limiter = RateLimiter(2, clock=FakeClock())
    assert admitted(limiter, "k1", 5) == 2
    assert admitted(limiter, "k2", 5) == 2
    assert admitted(limiter, "", 5) == 2  # the keyless development server's one bucket
    assert admitted(limiter, "k1", 1) == 0


def test_a_rate_of_zero_is_no_limit():
    limiter = RateLimiter(0, clock=FakeClock())
    assert admitted(limiter, "k1", 10_000) == 10_000


# ---- calls and streams in flight ---------------------------------------------------------------------------


def test_take_answers_whether_one_more_fits_and_counts_it():
    """AUDITED_DENIALS_PER_PEER asks, rather than refuses: a denial past the rate is still refused, not written."""
    clock = FakeClock()
    limiter = RateLimiter(2, clock=clock)
    assert [limiter.take("ipv4:10.0.0.7") for _ in range(3)] == [True, True, False]
    assert limiter.take("ipv4:10.0.0.8")  # another address, a bucket of its own
    clock.now += 0.5
    assert [limiter.take("ipv4:10.0.0.7") for _ in range(2)] == [True, False]


def test_past_max_buckets_the_quiet_keys_are_forgotten_and_the_busy_ones_kept(monkeypatch: pytest.MonkeyPatch):
    """Many addresses (a flood from a whole network) cannot grow the table without bound: once it holds
    MAX_BUCKETS keys, a new key first drops those whose bucket has refilled; a key still short keeps its count."""
    monkeypatch.setattr(RateLimiter, "MAX_BUCKETS", 4)
    clock = FakeClock()
    limiter = RateLimiter(2, clock=clock)
    assert limiter.take("busy") and limiter.take("busy")
    clock.now += 0.125
    for quiet in ("a", "b", "c"):
        limiter.take(quiet)
    clock.now += 1  # "a", "b" and "c" have refilled; "busy" too, but it is used again now
    assert limiter.take("busy") and limiter.take("busy") and not limiter.take("busy")
    assert limiter.take("new")  # the table is full: the refilled ones go
    assert set(limiter._buckets) == {"busy", "new"}
    assert not limiter.take("busy")  # its count was kept


def test_calls_in_flight_are_refused_past_the_limit_and_admitted_again_once_one_ends():
    calls = calls_in_flight(2)
    with calls, calls:
        with pytest.raises(ResourceExhausted) as refused:
            with calls:
                pytest.fail("a third call ran")
        assert refused.value.reason == "TOO_MANY_CALLS"
        assert "MAX_CONCURRENT_CALLS" in refused.value.message
        assert calls.count == 2  # the refused call took no place
    assert calls.count == 0
    with calls:
        assert calls.count == 1


def test_a_call_that_fails_gives_its_place_back():
    calls = InFlight(1, "busy", "TOO_MANY_CALLS")
    with pytest.raises(ValueError):
        with calls:
            raise ValueError("the servicer failed")
    with calls:
        assert calls.count == 1


def test_watch_streams_have_a_limit_and_reason_of_their_own():
    streams = watchers(1)
    with streams:
        with pytest.raises(ResourceExhausted) as refused:
            with streams:
                pytest.fail("a second stream opened")
    assert refused.value.reason == "TOO_MANY_WATCHERS"
    assert "MAX_WATCHERS" in refused.value.message
    assert from_engine_error(refused.value).code == grpc.StatusCode.RESOURCE_EXHAUSTED

