"""The audit log's entries (SPEC §13): who, role, call, request_id, token, from → to, reason.

The entries of a committed change are written in its transaction (`OPDService._finish`): the call's own, and one
for each move of another token (a bump's victim, promoted tokens), so that every move of a token is found by its
id. One entry per denied attempt. An entry names tokens by id and never carries a patient's details."""

from __future__ import annotations

import datetime as dt
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Sequence

from opd_grpc.engine.access import Actor
from opd_grpc.engine.model import Doctor, Patient, QueueEvent, Slot, TokenView, folded

CHANGED, DENIED = "CHANGED", "DENIED"
# Five digits or more, however spaced or punctuated: a phone number or a record number, which no log may hold.
_LONG_NUMBER = re.compile(r"\+?\d(?:[\s().\-/]*\d){4,}")
_SEPARATORS = r"[\s().\-/]*"


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


def change_entries(actor: Actor, method: str, request_id: str, now: dt.datetime, result: Any,
                   events: Sequence[QueueEvent], reason: str = "", note: str = "") -> list[AuditEntry]:
    """The entries of a committed change. The call's own: its token's move (the token the call answers with),
    and as the reason the `reason` given, else the caller's `note` (why, as a desk gave it; numbers that could be
    a phone or a record number, and the patient's own name, mrn and phone, blanked) and the other moves it caused,
    else what it made. Then one for each other move of a token, its reason the kind of move and the token that
    caused it (a token promoted and marked no-show in one change has two)."""
    view = result if isinstance(result, TokenView) else getattr(result, "token", None)
    token_id = view.token.token_id if isinstance(view, TokenView) else ""
    own = [e for e in events if token_id and e.token_id == token_id]
    others = [e for e in events if e not in own]

    def entry(token: str, moves: Sequence[QueueEvent], why: str) -> AuditEntry:
        return AuditEntry(now, CHANGED, actor.key_id, actor.role, method, request_id, token,
                          _status(moves[0].previous_status) if moves else "",
                          _status(moves[-1].status) if moves else "", why)

    told = f"reason given: {_blanked(note, view.token.patient if isinstance(view, TokenView) else None)}" \
        if note else ""
    return [entry(token_id, own, reason or "; ".join(filter(None, [told, *map(_move, others)])) or _made(result))] + [
        entry(e.token_id, [e], _cause(e)) for e in others if e.token_id]


def named(text: str) -> str:
    """A name a person typed (a holiday's, a key's), for an audit reason: quoted, with any number long enough to be
    a phone or a record number blanked, as in a note (SPEC §13: no phone number in any log)."""
    return repr(_LONG_NUMBER.sub("…", unicodedata.normalize("NFKC", text)))


def _blanked(note: str, patient: Patient | None) -> str:
    """A caller's words (in Unicode's NFKC form) without the patient's details: their mrn wherever it appears,
    their phone (its digits, however spaced), and each word of their name, compared as the duplicate-patient
    guard compares names (Zoë typed as e and a combining mark, STRAUSS for Strauß); then any number long enough
    to be a phone or a record number, whoever's it is."""
    note = unicodedata.normalize("NFKC", note)
    if patient is None:
        return _LONG_NUMBER.sub("…", note)
    if mrn := unicodedata.normalize("NFKC", patient.mrn.strip()):
        note = re.sub(re.escape(mrn), "…", note, flags=re.IGNORECASE)
    if len(digits := [ch for ch in patient.phone if ch.isdigit()]) >= 3:
        note = re.sub(r"\+?" + _SEPARATORS.join(digits), "…", note)
    names = {folded(word) for _, word in _words(patient.name)}
    parts, kept = [], 0
    for start, word in _words(note):
        if folded(word) in names:
            parts += [note[kept:start], "…"]
            kept = start + len(word)
    return _LONG_NUMBER.sub("…", "".join(parts) + note[kept:])


def _words(text: str) -> list[tuple[int, str]]:
    """The words of a text with where each starts: runs of letters, digits and combining marks (a Devanagari
    vowel sign, a combining diaeresis), which a regular expression's \\w would split."""
    words, start = [], None
    for i, ch in enumerate(text + " "):
        if ch.isalnum() or unicodedata.category(ch)[0] == "M":
            start = i if start is None else start
        elif start is not None:
            words.append((start, text[start:i]))
            start = None
    return words


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


def _cause(event: QueueEvent) -> str:
    return f"{event.kind.value} by {event.caused_by_token_id}" if event.caused_by_token_id else event.kind.value


def _made(result: Any) -> str:
    if isinstance(result, Doctor):
        return f"doctor {result.doctor_id} created"
    if isinstance(result, list) and all(isinstance(s, Slot) for s in result):
        return "slots created: " + ", ".join(s.slot_id for s in result)
    return ""
