"""The end-of-day report as one self-contained HTML page: inline CSS and one inline SVG timeline per slot, no
script and nothing fetched, so that it opens anywhere, can be mailed as one file, and prints (one doctor a page).

Every text from the server (names, ids) is escaped. Tokens are shown by number and source only: the events carry
no patient details.
"""

from __future__ import annotations

import datetime as dt
from html import escape
from typing import Iterable

from clients.report.figures import DayReport, DoctorReport, SlotTimeline, TokenLine
from opd_grpc._gen.opd.v1 import opd_pb2 as pb

MAX_ROWS = 80  # tokens drawn per slot; a busier slot draws its first MAX_ROWS by token number and says so
ROW_HEIGHT = 12.0  # per token, up to ROWS_AT_FULL_HEIGHT tokens; more share that height, down to MAX_ROWS
ROWS_AT_FULL_HEIGHT = 50
WIDTH = 1000.0  # SVG user units; the picture scales to the page's width
LABEL_WIDTH = 120.0
RIGHT_MARGIN = 12.0
AXIS_HEIGHT = 16.0
SEATS_HEIGHT = 40.0  # the seat holders' step chart above the rows

STATUS_STYLE = {  # a bar segment's fill, and what the legend calls it
    pb.STATUS_WAITLISTED: ("#f2b134", "waitlisted"),
    pb.STATUS_CONFIRMED: ("#a6cee3", "confirmed (has a seat)"),
    pb.STATUS_CHECKED_IN: ("#1f78b4", "checked in (waiting)"),
    pb.STATUS_CALLED: ("#33a02c", "called (with the doctor)"),
}
MARK_STYLE = {  # a mark's colour, its legend symbol and what the legend calls it
    pb.EVENT_KIND_BUMPED: ("#b2182b", "▼", "bumped by an emergency"),
    pb.EVENT_KIND_PROMOTED: ("#1a7f37", "▲", "promoted from the waitlist"),
    pb.EVENT_KIND_COMPLETED: ("#222222", "┃", "completed"),
    pb.EVENT_KIND_CANCELLED: ("#d62728", "✕", "cancelled"),
    pb.EVENT_KIND_NO_SHOW: ("#7b3294", "○", "no-show"),
}
CAPACITY_CHANGE = "#7b3294"
SOURCE_LABEL = {pb.SOURCE_EMERGENCY: "emergency", pb.SOURCE_PAID_PRIORITY: "paid priority",
                pb.SOURCE_FOLLOW_UP: "follow-up", pb.SOURCE_ONLINE_BOOKING: "online", pb.SOURCE_WALK_IN: "walk-in"}
STATUS_LABEL = {pb.STATUS_CONFIRMED: "confirmed", pb.STATUS_WAITLISTED: "waitlisted",
                pb.STATUS_CHECKED_IN: "checked in", pb.STATUS_CALLED: "called", pb.STATUS_COMPLETED: "completed",
                pb.STATUS_CANCELLED: "cancelled", pb.STATUS_NO_SHOW: "no-show"}

CSS = """
body { font: 13px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: #222;
       margin: 24px auto; max-width: 1100px; padding: 0 16px; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 28px 0 6px; border-bottom: 2px solid #ccc; padding-bottom: 2px; }
h3 { font-size: 14px; margin: 12px 0 4px; }
.sub { color: #555; margin: 0 0 12px; }
table { border-collapse: collapse; margin: 4px 0 10px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f0f0f0; }
tfoot td { font-weight: 600; }
.figures { display: flex; flex-wrap: wrap; gap: 12px 32px; align-items: flex-start; }
.note { background: #fff4e0; border-left: 4px solid #e08a00; padding: 4px 8px; }
.legend { display: flex; flex-wrap: wrap; gap: 4px 16px; margin: 8px 0; font-size: 12px; }
.legend span { white-space: nowrap; }
.swatch { display: inline-block; width: 18px; height: 10px; margin-right: 4px; vertical-align: -1px;
          border: 1px solid #888; }
.mark { font-weight: 700; margin-right: 4px; }
figure.slot { margin: 10px 0 18px; }
figure.slot figcaption { font-weight: 600; margin-bottom: 2px; }
figure.slot svg { width: 100%; height: auto; display: block; }
* { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
@page { size: A4 landscape; margin: 10mm; }
@media print {
  body { margin: 0; max-width: none; font-size: 11px; }
  section.doctor { break-before: page; }
  figure.slot, table, .figures { break-inside: avoid; }
}
"""


def render(report: DayReport) -> str:
    """The whole page."""
    doctors = len(report.doctors)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        f'<head><meta charset="utf-8"><title>OPD day report {_text(report.date)}</title><style>{CSS}</style></head>',
        "<body>",
        "<header><h1>OPD end-of-day report</h1>",
        f'<p class="sub">{_text(report.date)} · {doctors} doctor{"" if doctors == 1 else "s"} · times in '
        f"{_text(report.timezone)} · from GetStats and the day's queue events</p></header>",
        _summary(report),
        *(_doctor_section(report, doctor) for doctor in report.doctors),
        "</body>",
        "</html>",
    ]
    return "\n".join(parts) + "\n"


def _summary(report: DayReport) -> str:
    head = ("doctor", "tokens", "capacity", "seat holders", "utilisation", "completed", "bumps", "no-shows",
            "promoted", "cancelled", "mean wait (min)")
    rows = []
    for d in report.doctors:
        name = f"{d.doctor_id} {d.name}".strip()
        rows.append(_row((f'<a href="#{_attr(d.doctor_id)}">{_text(name)}</a>', d.total_tokens, d.total_capacity,
                          d.seat_holders, f"{d.utilisation:.0%}", d.by_status.get("STATUS_COMPLETED", 0), d.bumps,
                          d.no_shows, d.promotions.total, d.cancellations, f"{d.mean_wait_minutes:.1f}"),
                         escaped=True))
    return (f'<section class="summary"><h2>All doctors</h2><table><thead>{_row(head, "th")}</thead>'
            f'<tbody>{"".join(rows)}</tbody><tfoot>{_totals(report)}</tfoot></table>'
            '<p class="sub">utilisation: seat holders (confirmed, checked in, called, completed) over capacity at '
            "the end of the day · mean wait: check-in to call</p></section>")


def _totals(report: DayReport) -> str:
    """The summary's last row; its mean wait is over every called token of the history."""
    ds = report.doctors
    capacity, holders = sum(d.total_capacity for d in ds), sum(d.seat_holders for d in ds)
    called = sum(w.called for d in ds for w in d.waits)
    waited = sum(w.mean_minutes * w.called for d in ds for w in d.waits)
    return _row(("all", sum(d.total_tokens for d in ds), capacity, holders,
                 f"{holders / capacity:.0%}" if capacity else "–",
                 sum(d.by_status.get("STATUS_COMPLETED", 0) for d in ds), sum(d.bumps for d in ds),
                 sum(d.no_shows for d in ds), sum(d.promotions.total for d in ds),
                 sum(d.cancellations for d in ds), f"{waited / called:.1f}" if called else "–"))


def _doctor_section(report: DayReport, d: DoctorReport) -> str:
    title = " · ".join(_text(part) for part in (d.doctor_id, d.name, d.specialization) if part)
    notes = "".join(f'<p class="note">{_text(note)}</p>' for note in d.notes)
    slots = "".join(_slot_figure(report, slot) for slot in d.slots) or "<p>No slots.</p>"
    return (f'<section class="doctor" id="{_attr(d.doctor_id)}"><h2>{title}</h2>{notes}'
            f'<div class="figures">{_day_table(d)}{_waits_table(d)}</div>'
            f"<h3>The slots through the day</h3>{_legend()}{slots}</section>")


def _day_table(d: DoctorReport) -> str:
    statuses = ", ".join(f"{STATUS_LABEL[pb.Status.Value(name)]} {n}" for name, n in sorted(
        d.by_status.items(), key=lambda kv: pb.Status.Value(kv[0])))
    p = d.promotions
    rows = [
        ("tokens", f"{d.total_tokens}" + (f" ({statuses})" if statuses else "")),
        ("capacity (seats)", d.total_capacity),
        ("seat holders", d.seat_holders),
        ("utilisation", f"{d.utilisation:.0%}"),
        ("bumps (by emergencies)", d.bumps),
        ("no-shows", d.no_shows),
        ("promotions", f"{p.total} (on cancel {p.on_cancel}, on no-show {p.on_no_show}, "
                       f"on capacity raise {p.on_capacity_raise})"),
        ("cancellations", d.cancellations),
        ("mean wait, check-in to call", f"{d.mean_wait_minutes:.1f} min"),
    ]
    body = "".join(f"<tr><th>{_text(k)}</th><td>{_text(str(v))}</td></tr>" for k, v in rows)
    return f"<div><h3>The day</h3><table><tbody>{body}</tbody></table></div>"


def _waits_table(d: DoctorReport) -> str:
    head = ("source", "tokens", "called", "mean wait (min)", "max wait (min)")
    waits = {w.source: w for w in d.waits}
    rows = []
    for source, label in SOURCE_LABEL.items():
        tokens = d.by_source.get(pb.Source.Name(source), 0)
        if not tokens and source not in waits:
            continue
        w = waits.get(source)
        rows.append(_row((label, tokens, w.called if w else 0, f"{w.mean_minutes:.1f}" if w else "–",
                          f"{w.max_minutes:.1f}" if w else "–")))
    body = "".join(rows) or '<tr><td colspan="5">No tokens.</td></tr>'
    return (f"<div><h3>Waits by source, check-in to call</h3><table><thead>{_row(head, 'th')}</thead>"
            f"<tbody>{body}</tbody></table></div>")


def _legend() -> str:
    items = [f'<span><span class="swatch" style="background:{fill}"></span>{_text(label)}</span>'
             for fill, label in STATUS_STYLE.values()]
    items += [f'<span><span class="mark" style="color:{colour}">{symbol}</span>{_text(label)}</span>'
              for colour, symbol, label in MARK_STYLE.values()]
    items.append('<span><span class="swatch" style="background:#ececec"></span>the slot\'s sitting</span>')
    items.append('<span><span class="mark" style="color:#1f78b4">━</span>seat holders over the day '
                 '<span class="mark" style="color:#555">┅</span>capacity at the end</span>')
    return f'<div class="legend">{"".join(items)}</div>'


class _Scale:
    """Maps the day's times onto the SVG's x axis."""

    def __init__(self, starts_at: dt.datetime, ends_at: dt.datetime):
        self.start, self.end = starts_at.timestamp(), ends_at.timestamp()
        self.left, self.right = LABEL_WIDTH, WIDTH - RIGHT_MARGIN

    def x(self, when: dt.datetime) -> float:
        share = (min(max(when.timestamp(), self.start), self.end) - self.start) / (self.end - self.start)
        return round(self.left + share * (self.right - self.left), 1)


def _slot_figure(report: DayReport, slot: SlotTimeline) -> str:
    drawn = slot.tokens[:MAX_ROWS]
    row = min(ROW_HEIGHT, ROW_HEIGHT * ROWS_AT_FULL_HEIGHT / max(len(drawn), 1))
    scale = _Scale(report.starts_at, report.ends_at)
    rows_top = AXIS_HEIGHT + SEATS_HEIGHT + 6
    rows_bottom = rows_top + row * len(drawn)
    height = rows_bottom + (AXIS_HEIGHT if len(drawn) > 20 else 4)
    final_holders = slot.seat_holders[-1][1] if slot.seat_holders else 0
    caption = (f"{slot.start_time}–{slot.end_time} · {slot.slot_id} · {len(slot.tokens)} "
               f"token{'' if len(slot.tokens) == 1 else 's'} · capacity {slot.max_capacity}, "
               f"{final_holders} seat holder{'' if final_holders == 1 else 's'} at the end")
    if slot.capacity_changed_at:
        caption += " · capacity changed at " + ", ".join(_clock(t, report) for t in slot.capacity_changed_at)
    if len(drawn) < len(slot.tokens):
        caption += f" · the first {len(drawn)} tokens drawn"
    sitting_x0, sitting_x1 = scale.x(slot.starts_at), scale.x(slot.ends_at)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH:g} {height:g}" role="img" '
        f'data-slot-id="{_attr(slot.slot_id)}" data-tokens="{len(slot.tokens)}" '
        f'aria-label="{_attr(caption)}" font-family="system-ui, DejaVu Sans, sans-serif">',
        f'<rect x="{sitting_x0}" y="{AXIS_HEIGHT}" width="{round(sitting_x1 - sitting_x0, 1)}" '
        f'height="{round(rows_bottom - AXIS_HEIGHT, 1)}" fill="#ececec"/>',
        *_grid(report, scale, rows_bottom, bottom_labels=len(drawn) > 20),
        *_seats_chart(slot, scale, report),
    ]
    font = min(10.0, row - 1.5)
    for index, line in enumerate(drawn):
        parts.append(_token_row(line, scale, rows_top + index * row, row, font, report))
    parts.append("</svg>")
    return f'<figure class="slot"><figcaption>{_text(caption)}</figcaption>{"".join(parts)}</figure>'


def _grid(report: DayReport, scale: _Scale, bottom: float, bottom_labels: bool) -> Iterable[str]:
    """A line every quarter hour (darker on the hour), the hours labelled above (and below a tall picture)."""
    quarter = dt.timedelta(minutes=15)
    tick = report.starts_at
    while tick <= report.ends_at:
        x = scale.x(tick)
        on_hour = tick.minute == 0
        yield (f'<line x1="{x}" y1="{AXIS_HEIGHT}" x2="{x}" y2="{round(bottom, 1)}" '
               f'stroke="{"#b0b0b0" if on_hour else "#e2e2e2"}" stroke-width="{0.8 if on_hour else 0.5}"/>')
        if on_hour:
            label = f"{tick:%H:%M}"
            yield f'<text x="{x}" y="{AXIS_HEIGHT - 4}" font-size="10" text-anchor="middle">{label}</text>'
            if bottom_labels:
                yield (f'<text x="{x}" y="{round(bottom + AXIS_HEIGHT - 4, 1)}" font-size="10" '
                       f'text-anchor="middle">{label}</text>')
        tick += quarter


def _seats_chart(slot: SlotTimeline, scale: _Scale, report: DayReport) -> Iterable[str]:
    """The slot's seat holders as a step line, against a dashed line at its (final) capacity."""
    top, bottom = AXIS_HEIGHT + 4, AXIS_HEIGHT + SEATS_HEIGHT
    most = max([slot.max_capacity, 1] + [n for _, n in slot.seat_holders])

    def y(n: int) -> float:
        return round(bottom - n / most * (bottom - top), 1)

    path = [f"M{scale.x(report.starts_at)},{y(0)}"]
    for at, n in slot.seat_holders:
        path.append(f"H{scale.x(at)}V{y(n)}")
    path.append(f"H{scale.x(report.ends_at)}")
    line = "".join(path)
    yield f'<path d="{line}V{y(0)}Z" fill="#1f78b4" fill-opacity="0.12"/>'
    yield f'<path d="{line}" fill="none" stroke="#1f78b4" stroke-width="1.4"/>'
    yield (f'<line x1="{scale.left}" y1="{y(slot.max_capacity)}" x2="{scale.right}" y2="{y(slot.max_capacity)}" '
           'stroke="#555" stroke-dasharray="4 3" stroke-width="0.8"/>')
    yield (f'<text x="{scale.left - 6}" y="{y(slot.max_capacity) + 3}" font-size="10" text-anchor="end">'
           f"capacity {slot.max_capacity}</text>")
    yield (f'<text x="{scale.left - 6}" y="{bottom}" font-size="9" text-anchor="end" fill="#555">'
           "seat holders</text>")
    for at in slot.capacity_changed_at:
        x = scale.x(at)
        yield (f'<line x1="{x}" y1="{top}" x2="{x}" y2="{bottom}" stroke="{CAPACITY_CHANGE}" stroke-width="1.2" '
               'stroke-dasharray="2 2"/>')
        yield (f'<text x="{x + 3}" y="{top + 7}" font-size="8" fill="{CAPACITY_CHANGE}">capacity changed '
               f"{_clock(at, report)}</text>")


def _token_row(line: TokenLine, scale: _Scale, top: float, row: float, font: float, report: DayReport) -> str:
    bar_top, bar_height = round(top + row * 0.15, 1), round(row * 0.7, 1)
    middle = round(top + row / 2, 1)
    label = f"{line.token_number} {SOURCE_LABEL.get(line.source, '?')}"
    weight = ' font-weight="700"' if line.source == pb.SOURCE_EMERGENCY else ""
    parts = [f'<g class="token" data-token="{line.token_number}"><title>{_text(_story(line, report))}</title>',
             f'<text x="{scale.left - 6}" y="{round(middle + font * 0.35, 1)}" font-size="{font:g}" '
             f'text-anchor="end"{weight}>{_text(label)}</text>']
    for segment in line.segments:
        if segment.start == segment.end:  # e.g. a walk-in confirmed and checked in in the same minute
            continue
        x0 = scale.x(segment.start)
        x1 = scale.x(segment.end or report.ends_at)
        fill = STATUS_STYLE.get(segment.status, ("#999999", ""))[0]
        parts.append(f'<rect x="{x0}" y="{bar_top}" width="{max(round(x1 - x0, 1), 0.8)}" height="{bar_height}" '
                     f'fill="{fill}"/>')
    for mark in line.marks:
        parts.append(_mark(mark.kind, scale.x(mark.at), middle, row))
    parts.append("</g>")
    return "".join(parts)


def _mark(kind: int, x: float, middle: float, row: float) -> str:
    colour = MARK_STYLE[kind][0]
    r = round(row * 0.38, 1)
    if kind == pb.EVENT_KIND_BUMPED:
        return (f'<path d="M{x - r},{round(middle - r, 1)}H{x + r}L{x},{round(middle + r, 1)}Z" '
                f'fill="{colour}"/>')
    if kind == pb.EVENT_KIND_PROMOTED:
        return (f'<path d="M{x - r},{round(middle + r, 1)}H{x + r}L{x},{round(middle - r, 1)}Z" '
                f'fill="{colour}"/>')
    if kind == pb.EVENT_KIND_COMPLETED:
        return (f'<rect x="{round(x - 1, 1)}" y="{round(middle - r * 1.2, 1)}" width="2" height="{round(r * 2.4, 1)}" '
                f'fill="{colour}"/>')
    if kind == pb.EVENT_KIND_CANCELLED:
        return (f'<path d="M{x - r},{round(middle - r, 1)}L{x + r},{round(middle + r, 1)}M{x - r},'
                f'{round(middle + r, 1)}L{x + r},{round(middle - r, 1)}" stroke="{colour}" stroke-width="1.6"/>')
    return f'<circle cx="{x}" cy="{middle}" r="{r}" fill="#ffffff" stroke="{colour}" stroke-width="1.6"/>'


def _story(line: TokenLine, report: DayReport) -> str:
    """The token's day in words, shown on hovering its row."""
    steps = [(s.start, 1, f"{STATUS_LABEL[s.status]} {_clock(s.start, report)}–"
                          f"{_clock(s.end, report) if s.end else 'end'}") for s in line.segments if s.start != s.end]
    steps += [(m.at, 0, f"{MARK_STYLE[m.kind][2]} {_clock(m.at, report)}") for m in line.marks]
    told = "; ".join(text for _, _, text in sorted(steps, key=lambda step: step[:2]))
    return (f"Token {line.token_number} ({SOURCE_LABEL.get(line.source, '?')}), booked "
            f"{_clock(line.booked_at, report)}, now {STATUS_LABEL.get(line.status, '?')}: {told}")


def _clock(when: dt.datetime, report: DayReport) -> str:
    """HH:MM, with the date too when it is not the report's day."""
    return f"{when:%H:%M}" if when.date().isoformat() == report.date else f"{when:%d %b %H:%M}"


def _row(cells: Iterable[object], tag: str = "td", escaped: bool = False) -> str:
    """A table row; `escaped` cells are already HTML (the first of them may be a link)."""
    return "<tr>" + "".join(f"<{tag}>{c if escaped else _text(str(c))}</{tag}>" for c in cells) + "</tr>"


def _text(text: str) -> str:
    return escape(text, quote=False)


def _attr(text: str) -> str:
    return escape(text, quote=True)
