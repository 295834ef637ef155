"""What opdctl says of a call refused UNAVAILABLE: the server's own refusals (a reason in ErrorInfo) are told apart
from no answer at all, whose hint asks whether the server is running."""

from __future__ import annotations

import argparse

import grpc
import pytest

from clients.library import Unavailable
from clients.opdctl.errors import EXIT_UNREACHABLE, exit_code, explain

pytestmark = pytest.mark.backend_independent
ARGS = argparse.Namespace(address="127.0.0.1:50051", timeout=5.0, command="tokens", action="allocate",
                          doctor="DOC001", date="2026-12-01")


def unavailable(reason: str) -> Unavailable:
    return Unavailable(grpc.StatusCode.UNAVAILABLE, "the server said so", reason)


def test_no_answer_asks_whether_the_server_is_running():
    text = explain(unavailable(""), ARGS)
    assert "hint: is the server running at 127.0.0.1:50051?" in text
    assert exit_code(unavailable("")) == EXIT_UNREACHABLE


@pytest.mark.parametrize("reason,hint", [
    ("DATABASE_CONFLICT", "hint: the server is running, but its database was busy or out of reach and nothing was "
                          "changed"),
    ("COMMIT_OUTCOME_UNKNOWN", "hint: the change may have been saved: look (`opdctl tokens list --doctor DOC001 "
                               "--date 2026-12-01`)"),
    ("SERVER_SHUTTING_DOWN", "hint: the server is stopping and did nothing with this call"),
])
def test_the_servers_own_refusal_gets_a_hint_for_its_reason_not_is_the_server_running(reason, hint):
    text = explain(unavailable(reason), ARGS)
    assert text.startswith(f"opdctl: UNAVAILABLE ({reason}): the server said so")
    assert hint in text and "is the server running" not in text
