"""The end-of-day report that the simulation writes: its figures are the simulation's own counts (its tally of the
answers and its ledger of tokens, not the server's history), and the page stands alone."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

import pytest

from clients.report.figures import DayReport, Promotions
from opd_grpc._gen.opd.v1 import opd_pb2 as pb
from simulation import __main__ as cli
from simulation import report as summary
from simulation.ledger import SEAT_HOLDING
from simulation.play import Outcome
from tests.support import LiveServer
from tests.unit.test_day_report import Page

pytestmark = pytest.mark.slow


def played_day(live: LiveServer, path: Path, monkeypatch: pytest.MonkeyPatch,
               capsys: pytest.CaptureFixture[str]) -> tuple[Outcome, str]:
    """`python -m simulation --seed 7 --report PATH` against the live server: the day's outcome and its summary."""
    outcomes: list[Outcome] = []
    render = summary.render

    def keep(outcome: Outcome, console: object) -> None:
        outcomes.append(outcome)
        render(outcome, console)  # type: ignore[arg-type]

    monkeypatch.setattr(summary, "render", keep)
    code = cli.main(["--seed", "7", "--address", live.address, "--report", str(path)])
    out = capsys.readouterr().out
    assert code == 0, out
    return outcomes[0], out


def test_the_simulated_days_report_shows_what_the_simulation_counted(
        live: LiveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "day.html"

    outcome, out = played_day(live, path, monkeypatch, capsys)

    assert f"day report: {path}\n" in out
    assert out.rstrip().splitlines()[-1] == "violations: 0"
    report = outcome.report
    assert isinstance(report, DayReport)
    ledger = outcome.ledger
    assert [d.doctor_id for d in report.doctors] == outcome.doctors
    for doctor in report.doctors:
        tally = outcome.tally[doctor.doctor_id]
        tokens = ledger.of_doctor(doctor.doctor_id)
        capacity = sum(s.max_capacity for s in ledger.slots_of(doctor.doctor_id))
        holders = sum(1 for t in tokens if t.status in SEAT_HOLDING)
        assert doctor.utilisation == pytest.approx(holders / capacity)
        assert (doctor.total_tokens, doctor.total_capacity, doctor.seat_holders) == (len(tokens), capacity, holders)
        assert (doctor.bumps, doctor.no_shows, doctor.cancellations) == \
            (tally["bumps"], tally["no_shows"], tally["cancels"])
        assert doctor.promotions == Promotions(tally["promoted_on_cancel"], tally["promoted_on_no_show"],
                                               tally["promoted_on_capacity_raise"])
        waits: defaultdict[int, list[float]] = defaultdict(list)
        for t in tokens:
            if t.called_at and t.checked_in_at:
                waits[t.source].append((t.called_at - t.checked_in_at).total_seconds() / 60)
        assert {w.source: (w.called, pytest.approx(w.mean_minutes), pytest.approx(w.max_minutes))
                for w in doctor.waits} == \
            {source: (len(m), statistics.mean(m), max(m)) for source, m in waits.items()}
        assert [s.slot_id for s in doctor.slots] == [s.slot_id for s in ledger.slots_of(doctor.doctor_id)]
        for slot in doctor.slots:
            assert {t.token_id: t.status for t in slot.tokens} == \
                {t.token_id: t.status for t in ledger.of_slot(slot.slot_id)}
            assert slot.max_capacity == ledger.slots[slot.slot_id].max_capacity
    # The seed-7 day has every kind of change, so none of the comparisons above was of zeros alone.
    everything = outcome.tally.values()
    for counted in ("bumps", "no_shows", "cancels", "promoted_on_cancel", "promoted_on_no_show",
                    "promoted_on_capacity_raise"):
        assert sum(t[counted] for t in everything) > 0, counted
    assert {pb.SOURCE_EMERGENCY, pb.SOURCE_WALK_IN} <= {w.source for d in report.doctors for w in d.waits}

    page = Page(path.read_text(encoding="utf-8"))
    assert all(link.startswith("#") for link in page.links), page.links  # nothing fetched: no http(s) src/href
    assert not {"script", "link", "img", "iframe", "object"} & set(page.tags)
    slots = [s for d in outcome.doctors for s in ledger.slots_of(d)]
    assert [svg["data-slot-id"] for svg in page.svgs] == [s.slot_id for s in slots]  # one SVG per slot
    assert page.rows == [[str(t.token_number) for t in sorted(ledger.of_slot(s.slot_id), key=lambda t: t.token_number)]
                         for s in slots]
    for doctor_id in outcome.doctors:
        tally = outcome.tally[doctor_id]
        tokens = ledger.of_doctor(doctor_id)
        promoted = tally["promoted_on_cancel"] + tally["promoted_on_no_show"] + tally["promoted_on_capacity_raise"]
        capacity = sum(s.max_capacity for s in ledger.slots_of(doctor_id))
        holders = sum(1 for t in tokens if t.status in SEAT_HOLDING)
        completed = sum(1 for t in tokens if t.status == pb.STATUS_COMPLETED)
        row = next(r for r in page.table_rows if r[0].startswith(doctor_id))  # the summary's row of the doctor
        assert row[1:10] == [str(n) for n in (len(tokens), capacity, holders, f"{holders / capacity:.0%}", completed,
                                              tally["bumps"], tally["no_shows"], promoted, tally["cancels"])]
