"""SPEC §3 checked through the API: fetch a doctor-day as callers see it, then say what is broken.

The checks are pure functions of the fetched `DayState` (and the ledger of answers), so that a fabricated
inconsistent state shows that they can fail. Slot times are read as UTC, the simulation's time zone.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass

from clients.library import OPDClient
from opd_grpc._gen.opd.v1 import opd_pb2 as pb
from simulation.ledger import ACTIVE, IN_QUEUE, SEAT_HOLDING, Ledger, TokenRecord, one_patient_twice, when

PAGE_SIZE = 1000


@dataclass
class DayState:
    """One doctor-day through the API: ListSlots, GetSlotStatus of each slot, ListTokens."""

    doctor_id: str
    date: str
    slots: list[pb.Slot]
    slot_status: dict[str, pb.GetSlotStatusResponse]
    tokens: list[pb.Token]  # in token_number order, as ListTokens pages them


def fetch_day(client: OPDClient, doctor_id: str, date: str) -> DayState:
    slots = list(client.list_slots(doctor_id, date, page_size=PAGE_SIZE).slots)
    status = {s.slot_id: client.get_slot_status(s.slot_id) for s in slots}
    tokens: list[pb.Token] = []
    page_token = ""
    while True:
        page = client.list_tokens(doctor_id, date, page_size=PAGE_SIZE, page_token=page_token)
        tokens += page.tokens
        if not (page_token := page.next_page_token):
            return DayState(doctor_id, date, slots, status, tokens)


def invariant_violations(day: DayState) -> list[str]:
    """SPEC §3.1–3.5, and the queue places and estimated times of §8, of one doctor-day."""
    problems = []
    numbers = [t.token_number for t in day.tokens]
    if numbers != list(range(1, len(numbers) + 1)):
        problems.append(f"{day.doctor_id}: token numbers are not 1..{len(numbers)} without gaps: "
                        f"{_runs(numbers)} (§3.4)")
    for slot in day.slots:
        problems += _slot_violations(slot, day.slot_status.get(slot.slot_id),
                                     [t for t in day.tokens if t.slot_id == slot.slot_id])
    problems += [f"{day.doctor_id}: one patient holds {len(ids)} active tokens {', '.join(ids)} (§3.5)"
                 for ids in one_patient_twice([t for t in day.tokens if t.status in ACTIVE])]
    return problems


def _slot_violations(slot: pb.Slot, status: pb.GetSlotStatusResponse | None, tokens: list[pb.Token]) -> list[str]:
    sid = slot.slot_id
    if status is None:
        return [f"{sid}: GetSlotStatus did not answer for a slot that ListSlots lists"]
    problems = []
    holders = sum(1 for t in tokens if t.status in SEAT_HOLDING)
    if holders > slot.max_capacity:
        problems.append(f"{sid}: {holders} seat holders > max_capacity {slot.max_capacity} (§3.1)")
    if (status.max_capacity, status.seat_holders, status.free_seats) != \
            (slot.max_capacity, holders, slot.max_capacity - holders):
        problems.append(f"{sid}: GetSlotStatus says capacity {status.max_capacity}, {status.seat_holders} seat "
                        f"holders, {status.free_seats} free; the tokens say {slot.max_capacity}, {holders}, "
                        f"{slot.max_capacity - holders}")
    waiting = sorted((t for t in tokens if t.status == pb.STATUS_WAITLISTED),
                     key=lambda t: (t.priority, when(t.created_at), t.token_number))
    if waiting and holders < slot.max_capacity:
        problems.append(f"{sid}: {slot.max_capacity - holders} free seat(s) and {len(waiting)} waitlisted (§3.2)")
    if [t.token_id for t in status.waitlist] != [t.token_id for t in waiting]:
        problems.append(f"{sid}: waitlist is {[t.token_number for t in status.waitlist]}, "
                        f"§2 order is {[t.token_number for t in waiting]} (§3.3)")
    if [t.waitlist_position for t in status.waitlist] != list(range(1, len(status.waitlist) + 1)) or \
            [t.waitlist_position for t in waiting] != list(range(1, len(waiting) + 1)):
        problems.append(f"{sid}: waitlist positions are not 1..{len(waiting)} in §2 order (§3.3)")
    start = dt.datetime.combine(dt.date.fromisoformat(slot.date), dt.time.fromisoformat(slot.start_time),
                                dt.timezone.utc)
    serving = sorted((t for t in tokens if t.status in IN_QUEUE),
                     key=lambda t: (t.status != pb.STATUS_CALLED, t.priority, when(t.created_at), t.token_number))
    for place, t in enumerate(serving, 1):
        eta = start + dt.timedelta(minutes=(place - 1) * slot.consultation_minutes)
        if t.queue_position != place or not t.HasField("estimated_time") or when(t.estimated_time) != eta:
            shown = f"{when(t.estimated_time):%H:%M}" if t.HasField("estimated_time") else "none"
            problems.append(f"{t.token_id}: queue place {t.queue_position} at {shown}, §8 says {place} at "
                            f"{eta:%H:%M}")
    return problems


def answer_violations(day: DayState, ledger: Ledger) -> list[str]:
    """SPEC §3.7 and §3.4 through the answers: every token an answer gave is there, unchanged, in the status
    the last answer about it said; no token exists that no answer created; slots have the capacity set."""
    problems = []
    on_server = {t.token_id: t for t in day.tokens}
    for record in ledger.of_doctor(day.doctor_id):
        token = on_server.get(record.token_id)
        if token is None:
            problems.append(f"{record.token_id}: answered OK as token {record.token_number}, now missing (§3.7)")
            continue
        seen = (token.token_number, token.slot_id, token.source, token.status)
        said = (record.token_number, record.slot_id, record.source, record.status)
        if seen != said:
            problems.append(f"{record.token_id}: the server has (number, slot, source, status) "
                            f"{_named(seen)}, its answers said {_named(said)}")
    known = {t.token_id for t in ledger.of_doctor(day.doctor_id)}
    problems += [f"{t.token_id}: exists, but no answer created it (a refused or replayed request took a number?)"
                 for t in day.tokens if t.token_id not in known]
    for slot in day.slots:
        expected = ledger.slots.get(slot.slot_id)
        if expected is None or expected.max_capacity != slot.max_capacity:
            problems.append(f"{slot.slot_id}: capacity {slot.max_capacity}, the answers said "
                            f"{expected.max_capacity if expected else 'no such slot'}")
    return problems


def stats_violations(stats: pb.DoctorDayStats, ledger: Ledger, bumps: int) -> list[str]:
    """GetStats against the ledger's own counts: statuses, sources, capacity, utilisation, bumps, mean wait."""
    tokens = ledger.of_doctor(stats.doctor_id)
    capacity = sum(s.max_capacity for s in ledger.slots_of(stats.doctor_id))
    holders = sum(1 for t in tokens if t.status in SEAT_HOLDING)
    own = {
        "total_tokens": len(tokens),
        "by_status": dict(Counter(pb.Status.Name(t.status) for t in tokens)),
        "by_source": dict(Counter(pb.Source.Name(t.source) for t in tokens)),
        "total_capacity": capacity,
        "seat_holders": holders,
        "utilisation": round(holders / capacity if capacity else 0.0, 9),
        "bumps": bumps,
        "no_shows": sum(1 for t in tokens if t.status == pb.STATUS_NO_SHOW),
        "mean_wait_minutes": round(mean_wait_minutes(tokens), 6),
    }
    served = {
        "total_tokens": stats.total_tokens,
        "by_status": {k: v for k, v in stats.by_status.items() if v},
        "by_source": {k: v for k, v in stats.by_source.items() if v},
        "total_capacity": stats.total_capacity,
        "seat_holders": stats.seat_holders,
        "utilisation": round(stats.utilisation, 9),
        "bumps": stats.bumps,
        "no_shows": stats.no_shows,
        "mean_wait_minutes": round(stats.mean_wait_minutes, 6),
    }
    return [f"{stats.doctor_id}: GetStats {name} is {served[name]}, the answers give {own[name]}"
            for name in own if own[name] != served[name]]


def mean_wait_minutes(tokens: list[TokenRecord]) -> float:
    """Mean minutes from check-in to call of the called tokens, as GetStats defines it."""
    waits = [(t.called_at - t.checked_in_at).total_seconds() / 60 for t in tokens if t.called_at and t.checked_in_at]
    return sum(waits) / len(waits) if waits else 0.0


def _named(values: tuple[int, str, int, int]) -> tuple[int, str, str, str]:
    number, slot_id, source, status = values
    return number, slot_id, pb.Source.Name(source), pb.Status.Name(status)


def _runs(numbers: list[int]) -> str:
    return str(numbers) if len(numbers) <= 20 else f"{numbers[:10]} ... {numbers[-10:]}"
