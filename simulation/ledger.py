"""What the server's answers said: every slot and token they named, and the latest status each answer gave.

Every change to a token is reported in the answer of the call that made it (the token itself, plus the
promoted, bumped or completed ones), so with AUTO_NO_SHOW off the ledger must agree with the server at all times.
It also knows the rules of SPEC §2, §5 and §7 well enough to say what the server should answer next.
"""

from __future__ import annotations

import datetime as dt
import unicodedata
from dataclasses import dataclass

from opd_grpc._gen.opd.v1 import opd_pb2 as pb

SEAT_HOLDING = frozenset({pb.STATUS_CONFIRMED, pb.STATUS_CHECKED_IN, pb.STATUS_CALLED, pb.STATUS_COMPLETED})
ACTIVE = frozenset({pb.STATUS_CONFIRMED, pb.STATUS_WAITLISTED, pb.STATUS_CHECKED_IN, pb.STATUS_CALLED})
IN_QUEUE = frozenset({pb.STATUS_CONFIRMED, pb.STATUS_CHECKED_IN, pb.STATUS_CALLED})
BUMPABLE = frozenset({pb.STATUS_CONFIRMED, pb.STATUS_CHECKED_IN})


def patient_key(patient: pb.Patient) -> str:
    """The mrn, or without one the phone and name (case, spacing and Unicode form folded): who a patient is, where
    each patient always comes with an mrn or always without one, as in the scenarios."""
    if patient.mrn.strip():
        return "mrn:" + _folded(patient.mrn)
    return _contact(patient)


def _contact(patient: pb.Patient) -> str:
    """The phone's last 10 digits (+91 and a trunk 0 left off) and the name."""
    digits = "".join(str(unicodedata.digit(ch)) for ch in patient.phone if ch.isdigit())
    return f"phone:{digits[-10:]}:{_folded(patient.name)}"


def _folded(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold()).split())


def one_patient_twice(tokens: list[pb.Token]) -> list[list[str]]:
    """SPEC §3.5 over a day's active tokens: the ids of tokens of one patient (SPEC §1: the same mrn, or where
    either has none, the same phone and name), in groups."""
    by_mrn: dict[str, list[pb.Token]] = {}
    by_contact: dict[str, list[pb.Token]] = {}
    for t in tokens:
        if mrn := _folded(t.patient.mrn):
            by_mrn.setdefault(mrn, []).append(t)
        by_contact.setdefault(_contact(t.patient), []).append(t)
    groups = list(by_mrn.values()) + [ts for ts in by_contact.values() if any(not t.patient.mrn.strip() for t in ts)]
    return [[t.token_id for t in ts] for ts in groups if len(ts) > 1]


def when(ts: object) -> dt.datetime:
    return ts.ToDatetime(tzinfo=dt.timezone.utc)  # type: ignore[attr-defined]


@dataclass
class TokenRecord:
    token_id: str
    token_number: int
    doctor_id: str
    slot_id: str
    source: int
    priority: int
    created_at: dt.datetime
    patient: str  # patient_key
    status: int
    checked_in_at: dt.datetime | None = None
    called_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None  # its last move, as the last answer that held it said

    def order_key(self) -> tuple[int, dt.datetime, int]:
        """SPEC §2: lower priority number, then earlier queue time, then lower token number."""
        return (self.priority, self.created_at, self.token_number)


class Ledger:
    def __init__(self) -> None:
        self.slots: dict[str, pb.Slot] = {}
        self.tokens: dict[str, TokenRecord] = {}
        self._by_slot: dict[str, list[TokenRecord]] = {}

    def add_slot(self, slot: pb.Slot) -> None:
        self.slots[slot.slot_id] = slot
        self._by_slot.setdefault(slot.slot_id, [])

    def absorb(self, token: pb.Token) -> list[str]:
        """Takes in a token from an answer; answers what it contradicts (a token's identity never changes)."""
        record = self.tokens.get(token.token_id)
        checked_in = when(token.checked_in_at) if token.HasField("checked_in_at") else None
        called = when(token.called_at) if token.HasField("called_at") else None
        if record is None:
            record = TokenRecord(token.token_id, token.token_number, token.doctor_id, token.slot_id, token.source,
                                 token.priority, when(token.created_at), patient_key(token.patient), token.status,
                                 checked_in, called, when(token.updated_at))
            self.tokens[token.token_id] = record
            self._by_slot.setdefault(token.slot_id, []).append(record)
            return []
        seen = (token.token_number, token.slot_id, token.source, token.priority, when(token.created_at))
        known = (record.token_number, record.slot_id, record.source, record.priority, record.created_at)
        record.status, record.checked_in_at, record.called_at = token.status, checked_in, called
        record.updated_at = when(token.updated_at)
        if seen != known:
            return [f"{token.token_id}: an answer gave (number, slot, source, priority, queue time) {seen}, "
                    f"an earlier one {known}"]
        return []

    def of_slot(self, slot_id: str) -> list[TokenRecord]:
        return self._by_slot.get(slot_id, [])

    def of_doctor(self, doctor_id: str) -> list[TokenRecord]:
        return [t for t in self.tokens.values() if t.doctor_id == doctor_id]

    def slots_of(self, doctor_id: str) -> list[pb.Slot]:
        """In start-time order (slot ids end in HHMM)."""
        return sorted((s for s in self.slots.values() if s.doctor_id == doctor_id), key=lambda s: s.start_time)

    def seat_holders(self, slot_id: str) -> int:
        return sum(1 for t in self.of_slot(slot_id) if t.status in SEAT_HOLDING)

    def waitlist(self, slot_id: str) -> list[TokenRecord]:
        """SPEC §3.3: the slot's waitlist, head first."""
        return sorted((t for t in self.of_slot(slot_id) if t.status == pb.STATUS_WAITLISTED),
                      key=TokenRecord.order_key)

    def estimated_time(self, token_id: str) -> dt.datetime:
        """SPEC §8: slot start + (p - 1) × consultation_minutes, p the place among the slot's not-yet-completed
        seat holders in serving order (CALLED first, then §2). Slot times are UTC."""
        token = self.tokens[token_id]
        slot = self.slots[token.slot_id]
        serving = sorted((t for t in self.of_slot(slot.slot_id) if t.status in IN_QUEUE),
                         key=lambda t: (t.status != pb.STATUS_CALLED, t.order_key()))
        start = dt.datetime.combine(dt.date.fromisoformat(slot.date), dt.time.fromisoformat(slot.start_time),
                                    dt.timezone.utc)
        return start + dt.timedelta(minutes=serving.index(token) * slot.consultation_minutes)

    def no_show_due(self, token_id: str, grace: dt.timedelta) -> dt.datetime:
        """SPEC §6: the first moment a no-show is taken: the grace period after the estimated time with the slot's
        patients already seen or marked no-show still counted ahead, or, for a patient who has not come, after the
        time they got their seat if later (but not after the slot's end)."""
        token = self.tokens[token_id]
        slot = self.slots[token.slot_id]
        gone = sum(1 for t in self.of_slot(token.slot_id) if t.status in (pb.STATUS_COMPLETED, pb.STATUS_NO_SHOW))
        since = self.estimated_time(token_id) + dt.timedelta(minutes=gone * slot.consultation_minutes)
        if token.status == pb.STATUS_CONFIRMED and token.updated_at is not None:
            ends = dt.datetime.combine(dt.date.fromisoformat(slot.date), dt.time.fromisoformat(slot.end_time),
                                       dt.timezone.utc)
            since = max(since, min(token.updated_at, ends))
        return since + grace

    def bump_victim(self, slot_id: str) -> TokenRecord | None:
        """SPEC §5: the CONFIRMED or CHECKED_IN non-emergency seat holder with the worst §2 order."""
        candidates = [t for t in self.of_slot(slot_id)
                      if t.status in BUMPABLE and t.source != pb.SOURCE_EMERGENCY]
        return max(candidates, key=TokenRecord.order_key, default=None)

    def next_to_call(self, doctor_id: str) -> TokenRecord | None:
        """SPEC §7: the best CHECKED_IN token of the doctor's earliest slot that has one."""
        for slot in self.slots_of(doctor_id):
            waiting = [t for t in self.of_slot(slot.slot_id) if t.status == pb.STATUS_CHECKED_IN]
            if waiting:
                return min(waiting, key=TokenRecord.order_key)
        return None
