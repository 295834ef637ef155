"""The audit log's entries (SPEC §13): who, role, call, request_id, token, from → to, reason.

One entry per committed change, written in its transaction (`OPDService._finish`), and one per denied attempt.
An entry names tokens by id and never carries a patient's details."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Sequence

from opd_grpc.engine.access import Actor
from opd_grpc.engine.model import Doctor, QueueEvent, Slot, TokenView

CHANGED, DENIED = "CHANGED", "DENIED"


@dataclass(frozen=True)
class AuditEntry:
    occurred_at: dt.datetime
    outcome: str  # CHANGED or DENIED
    key_id: str
    role: str
    method: str
    request_id: str = ""
    token_id: str = ""
    from_status: str = ""
    to_status: str = ""
    reason: str = ""
    entry_id: int = 0  # given by the store


def change_entry(actor: Actor, method: str, request_id: str, now: dt.datetime, result: Any,
                 events: Sequence[QueueEvent], reason: str = "") -> AuditEntry:
    """The entry of a committed change: its token's move (the token the call answers with), and as the reason the
    `reason` given, else the other moves it caused, else what it made."""
    view = result if isinstance(result, TokenView) else getattr(result, "token", None)
    token_id = view.token.token_id if isinstance(view, TokenView) else ""
    own = [e for e in events if token_id and e.token_id == token_id]
    others = "; ".join(_move(e) for e in events if e not in own)
    return AuditEntry(now, CHANGED, actor.key_id, actor.role, method, request_id, token_id,
                      _status(own[0].previous_status) if own else "", _status(own[-1].status) if own else "",
                      reason or others or _made(result))


def denied_entry(actor: Actor, method: str, request_id: str, now: dt.datetime, code: str,
                 message: str) -> AuditEntry:
    return AuditEntry(now, DENIED, actor.key_id, actor.role, method, request_id, reason=f"{code}: {message}")


def _status(status: Any) -> str:
    return status.value if status is not None else ""


def _move(event: QueueEvent) -> str:
    if not event.token_id:
        return f"{event.kind.value} {event.slot_id}"
    by = f" by {event.caused_by_token_id}" if event.caused_by_token_id else ""
    return f"{event.kind.value} {event.token_id} {_status(event.previous_status) or 'NEW'}→{_status(event.status)}{by}"


def _made(result: Any) -> str:
    if isinstance(result, Doctor):
        return f"doctor {result.doctor_id} created"
    if isinstance(result, list) and all(isinstance(s, Slot) for s in result):
        return "slots created: " + ", ".join(s.slot_id for s in result)
    return ""
