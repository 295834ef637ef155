"""A waiting-room display board: for each doctor, the token now called (large), the next few, the waitlist count.

Start it against a running server (tokens are shown by number only, never a patient's name or phone):

    python -m clients.board [--address 127.0.0.1:50051] [--api-key KEY] [--date YYYY-MM-DD] [--timezone ZONE] \\
        [--next 5] [--heartbeat-seconds 10] [--once] DOC001 [DOC002 ...]

It follows WatchQueue through the client library, which reconnects and resumes after the last sequence by itself;
without --date it shows the hospital's today (in --timezone, default $OPD_TIMEZONE or this machine's) and moves on
to the next day at midnight. Ctrl-C ends it. `python -m clients.board --demo-svg docs/board.svg` draws a made-up
day as an SVG, for the README.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import os
import queue
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

import grpc
from rich.align import Align
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from clients import arguments
from clients.library import DEFAULT_ADDRESS, QUICK_ATTEMPTS, OPDClient, OPDError, hospital_today, tls_credentials
from opd_grpc._gen.opd.v1 import opd_pb2 as pb

PANELS_PER_ROW = 3
HEARTBEAT_SECONDS = 10.0  # the server's WATCH_HEARTBEAT_SECONDS by default: a quiet stream hears this often
REDRAW_SECONDS = 1.0  # the clock and the connection line stay fresh between updates

# Block digits, five rows high: legible from the back of a waiting room on an ordinary terminal.
DIGITS = {
    "0": ("██████", "██  ██", "██  ██", "██  ██", "██████"),
    "1": ("  ██  ", "████  ", "  ██  ", "  ██  ", "██████"),
    "2": ("██████", "    ██", "██████", "██    ", "██████"),
    "3": ("██████", "    ██", "  ████", "    ██", "██████"),
    "4": ("██  ██", "██  ██", "██████", "    ██", "    ██"),
    "5": ("██████", "██    ", "██████", "    ██", "██████"),
    "6": ("██████", "██    ", "██████", "██  ██", "██████"),
    "7": ("██████", "    ██", "   ██ ", "  ██  ", "  ██  "),
    "8": ("██████", "██  ██", "██████", "██  ██", "██████"),
    "9": ("██████", "██  ██", "██████", "    ██", "██████"),
}


def big_number(number: int) -> list[str]:
    """The rows of `number` in block digits, two spaces between digits."""
    glyphs = [DIGITS[digit] for digit in str(number)]
    return ["  ".join(glyph[row] for glyph in glyphs) for row in range(5)]


def _call_order(token: pb.Token) -> tuple[str, int, int, int, int]:
    """CallNext's order (SPEC §7, §2): earliest slot, then priority, queue time, token number."""
    return (token.slot_id, token.priority, token.created_at.seconds, token.created_at.nanos, token.token_number)


@dataclass
class DoctorQueue:
    """One doctor's tokens for the day, as far as the stream has told; patient fields are never kept."""

    tokens: dict[str, pb.Token] = field(default_factory=dict)
    called_rank: dict[str, int] = field(default_factory=dict)  # token_id -> when it was seen called; latest wins
    sequence: int = 0
    has_snapshot: bool = False

    def now_calling(self) -> pb.Token | None:
        called = [t for t in self.tokens.values() if t.status == pb.STATUS_CALLED]
        return max(called, key=lambda t: self.called_rank.get(t.token_id, 0), default=None)

    def next_up(self, count: int) -> list[pb.Token]:
        waiting = [t for t in self.tokens.values() if t.status == pb.STATUS_CHECKED_IN]
        return sorted(waiting, key=_call_order)[:count]

    @property
    def waitlist_count(self) -> int:
        return sum(1 for t in self.tokens.values() if t.status == pb.STATUS_WAITLISTED)


class BoardState:
    """The queues of some doctors on one date, built only from WatchQueue updates (no gRPC, no drawing)."""

    def __init__(self, doctor_ids: Sequence[str], date: str, zone: dt.tzinfo | None = None):
        self.date = date
        self.zone = zone  # the hospital's, for the footer's time (None: this machine's)
        self.doctors: dict[str, DoctorQueue] = {doctor_id: DoctorQueue() for doctor_id in doctor_ids}
        self.last_heard: dt.datetime | None = None
        self._calls_seen = 0

    def apply(self, update: pb.WatchQueueResponse, received_at: dt.datetime | None = None) -> None:
        self.last_heard = received_at or dt.datetime.now(dt.timezone.utc)
        kind = update.WhichOneof("update")
        if kind == "snapshot":
            snapshot = update.snapshot
            doctor = self.doctors.setdefault(snapshot.doctor_id, DoctorQueue())
            doctor.tokens, doctor.called_rank = {}, {}
            # Within a snapshot the most recently called token is the one with the latest called_at.
            for token in sorted(snapshot.tokens, key=lambda t: (t.called_at.seconds, t.called_at.nanos)):
                self._keep(doctor, token)
            doctor.sequence, doctor.has_snapshot = snapshot.sequence, True
        elif kind == "event":
            event = update.event
            doctor = self.doctors.setdefault(event.doctor_id, DoctorQueue())
            if event.HasField("token"):
                self._keep(doctor, event.token)
            doctor.sequence = max(doctor.sequence, event.sequence)

    def _keep(self, doctor: DoctorQueue, token: pb.Token) -> None:
        kept = pb.Token()
        kept.CopyFrom(token)
        kept.ClearField("patient")  # the board never holds a name or phone, whatever the server sends
        doctor.tokens[kept.token_id] = kept
        if kept.status == pb.STATUS_CALLED:
            self._calls_seen += 1
            doctor.called_rank[kept.token_id] = self._calls_seen

    def now_calling(self, doctor_id: str) -> pb.Token | None:
        return self.doctors[doctor_id].now_calling()

    def next_up(self, doctor_id: str, count: int = 5) -> list[pb.Token]:
        return self.doctors[doctor_id].next_up(count)

    def waitlist_count(self, doctor_id: str) -> int:
        return self.doctors[doctor_id].waitlist_count

    def last_sequence(self, doctor_id: str) -> int:
        return self.doctors[doctor_id].sequence

    def ready(self) -> bool:
        """Whether every doctor's snapshot has arrived."""
        return all(doctor.has_snapshot for doctor in self.doctors.values())


class Watch(Protocol):
    """What the client library's watch gives: the updates, resumed across reconnects, how many reconnects were
    tried, and whether the stream is up."""

    reconnects: int
    connected: bool

    def __iter__(self) -> Iterator[pb.WatchQueueResponse]: ...


def connection_line(last_heard: dt.datetime | None, now: dt.datetime, reconnects: int, connected: bool = True,
                    heartbeat_seconds: float = HEARTBEAT_SECONDS) -> str:
    """"live" while the stream is up and updates or heartbeats keep coming; "reconnecting…" while the library
    reconnects, or once two and a half heartbeats have been missed."""
    if last_heard is None:
        line = "connecting…"
    elif not connected or now - last_heard > dt.timedelta(seconds=2.5 * heartbeat_seconds):
        line = "reconnecting…"
    else:
        line = "live"
    return f"{line} ({reconnects} reconnect {'attempt' if reconnects == 1 else 'attempts'})" if reconnects else line


def _doctor_panel(state: BoardState, doctor_id: str, name: str | None, next_count: int) -> Panel:
    doctor = state.doctors[doctor_id]
    title = f"[bold]{escape(doctor_id)}[/]" + (f" · {escape(name)}" if name else "")
    if not doctor.has_snapshot and not doctor.tokens:
        return Panel(Text("waiting for the queue…", style="dim", justify="center"), title=title, padding=(1, 2))
    calling = doctor.now_calling()
    if calling is None:
        called: RenderableType = Text("\n\n—\n\n", style="dim", justify="center")
    else:
        # Centred as one block: centring each row on its own would shift rows that start or end with spaces.
        called = Align.center(Text("\n".join(big_number(calling.token_number)), style="bold yellow", no_wrap=True))
    next_numbers = "   ".join(str(t.token_number) for t in doctor.next_up(next_count)) or "—"
    body = Group(
        Text("Now calling", style="dim", justify="center"),
        called,
        Text(""),
        Text.assemble(("Next  ", "dim"), (next_numbers, "bold"), justify="center"),
        Text.assemble(("Waitlist  ", "dim"), (str(doctor.waitlist_count), "bold"), justify="center"),
    )
    return Panel(body, title=title, padding=(1, 2))


def render(state: BoardState, names: dict[str, str] | None = None, next_count: int = 5,
           connection: str = "live") -> RenderableType:
    """One panel per doctor, up to three side by side, and a footer with the date, last update and connection."""
    names = names or {}
    doctor_ids = list(state.doctors)
    grid = Table.grid(expand=True, padding=(0, 1))
    for _ in range(min(len(doctor_ids), PANELS_PER_ROW) or 1):
        grid.add_column(ratio=1)
    for start in range(0, len(doctor_ids), PANELS_PER_ROW):
        grid.add_row(*(_doctor_panel(state, d, names.get(d), next_count)
                       for d in doctor_ids[start:start + PANELS_PER_ROW]))
    heard = state.last_heard.astimezone(state.zone).strftime("%H:%M:%S") if state.last_heard else "—"
    style = "green" if connection.startswith("live") else "yellow"
    footer = Text.assemble(("OPD queues for ", "dim"), state.date, ("  ·  last update ", "dim"), heard,
                           ("  ·  ", "dim"), (connection, style))
    return Group(grid, footer)


def follow(stream: Watch, state: BoardState, console: Console, names: dict[str, str] | None = None,
           next_count: int = 5, once: bool = False, heartbeat_seconds: float = HEARTBEAT_SECONDS,
           until: Callable[[], bool] = lambda: False) -> None:
    """Draw the board and redraw it on every update (and every second); with `once`, draw the snapshots and stop;
    stop too once `until()` is true (a new day).

    The stream is read on a thread so that the board still shows "reconnecting…" while the library waits
    to reconnect. An error the library gives up on is raised here."""
    updates: queue.Queue[pb.WatchQueueResponse | BaseException | None] = queue.Queue()

    def pump() -> None:
        try:
            for update in stream:
                updates.put(update)
            updates.put(None)
        except BaseException as error:  # handed to the drawing thread, which raises it
            updates.put(error)

    def draw() -> RenderableType:
        line = connection_line(state.last_heard, dt.datetime.now(dt.timezone.utc), stream.reconnects,
                               stream.connected, heartbeat_seconds)
        return render(state, names, next_count, line)

    threading.Thread(target=pump, name="board-watch", daemon=True).start()
    with Live(draw(), console=console, auto_refresh=False, transient=once) as live:
        while not (once and state.ready()) and not until():
            try:
                item = updates.get(timeout=REDRAW_SECONDS)
                while True:  # apply a burst at once, then draw once
                    if item is None:
                        return
                    if isinstance(item, BaseException):
                        raise item
                    state.apply(item)
                    if once and state.ready():
                        break
                    item = updates.get_nowait()
            except queue.Empty:
                pass
            live.update(draw(), refresh=True)
    if once:
        console.print(draw())


def demo_state() -> tuple[BoardState, dict[str, str]]:
    """A made-up morning for two doctors, built through `apply` like the real thing; used by tests and the README."""
    date = "2030-01-07"
    state = BoardState(["DOC001", "DOC002"], date)

    def token(doctor_id: str, number: int, status: int, minute: int, priority: int = 5) -> pb.Token:
        made = pb.Token(token_id=f"{doctor_id}-T{number}", token_number=number, doctor_id=doctor_id, date=date,
                        slot_id=f"{doctor_id}-20300107-0900", priority=priority, status=status)
        made.created_at.FromDatetime(dt.datetime(2030, 1, 7, 8, minute, tzinfo=dt.timezone.utc))
        return made

    done, checked_in, waitlisted = pb.STATUS_COMPLETED, pb.STATUS_CHECKED_IN, pb.STATUS_WAITLISTED
    first = [token("DOC001", n, done, n) for n in range(1, 12)]
    first += [token("DOC001", n, checked_in, n, 4) for n in (13, 14, 15, 16, 18)]
    first += [token("DOC001", n, waitlisted, n) for n in (19, 20, 21)]
    second = [token("DOC002", n, done, n) for n in range(1, 7)] + [token("DOC002", 8, checked_in, 8)]
    second.append(token("DOC002", 9, waitlisted, 9))
    heard = dt.datetime(2030, 1, 7, 9, 42, 5, tzinfo=dt.timezone.utc)
    state.apply(pb.WatchQueueResponse(snapshot=pb.QueueSnapshot(doctor_id="DOC001", date=date, sequence=40,
                                                                tokens=first)), heard)
    state.apply(pb.WatchQueueResponse(snapshot=pb.QueueSnapshot(doctor_id="DOC002", date=date, sequence=17,
                                                                tokens=second)), heard)
    for doctor_id, number, sequence in (("DOC001", 12, 41), ("DOC002", 7, 18)):
        state.apply(pb.WatchQueueResponse(event=pb.QueueEvent(
            doctor_id=doctor_id, date=date, sequence=sequence, kind=pb.EVENT_KIND_CALLED,
            token=token(doctor_id, number, pb.STATUS_CALLED, number))), heard)
    return state, {"DOC001": "Dr. Asha Rao", "DOC002": "Dr. Vikram Nair"}


def save_picture(path: str) -> str:
    """Draw the demo board into an SVG at `path`; returns the same picture as plain text."""
    state, names = demo_state()
    console = Console(record=True, width=120, file=io.StringIO())
    console.print(render(state, names, connection="live"))
    text = console.export_text(clear=False)
    console.save_svg(path, title="python -m clients.board DOC001 DOC002")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clients.board", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("doctor_ids", nargs="*", metavar="DOCTOR_ID", help="the doctors to show, e.g. DOC001")
    parser.add_argument("--address", type=arguments.address, default=os.environ.get("OPD_ADDRESS", DEFAULT_ADDRESS),
                        help=f"HOST:PORT of the server (default: $OPD_ADDRESS, else {DEFAULT_ADDRESS})")
    parser.add_argument("--api-key", default=os.environ.get("OPD_API_KEY"),
                        help="a key of the display role (default: $OPD_API_KEY; none for a loopback dev server)")
    parser.add_argument("--ca-cert", default=os.environ.get("OPD_CA_CERT"), type=Path, metavar="FILE",
                        help="speak TLS, trusting the server's certificate if this CA (PEM) signed it "
                             "(default: $OPD_CA_CERT)")
    parser.add_argument("--cert", default=os.environ.get("OPD_CLIENT_CERT"), type=Path, metavar="FILE",
                        help="for mutual TLS: this client certificate (PEM) (default: $OPD_CLIENT_CERT)")
    parser.add_argument("--key-file", default=os.environ.get("OPD_CLIENT_KEY"), type=Path, metavar="FILE",
                        help="for mutual TLS: its private key (PEM) (default: $OPD_CLIENT_KEY)")
    parser.add_argument("--date", type=arguments.date, help="YYYY-MM-DD (default: the hospital's today, moving on at "
                                                  "midnight)")
    parser.add_argument("--timezone", type=arguments.zone, default=os.environ.get("OPD_TIMEZONE") or None,
                        help="the hospital's TIMEZONE, which says when its day begins (default: $OPD_TIMEZONE, "
                             "else this machine's)")
    parser.add_argument("--next", type=_positive(int), default=5, dest="next_count",
                        help="how many next tokens to show")
    parser.add_argument("--heartbeat-seconds", type=_positive(float), default=HEARTBEAT_SECONDS,
                        help="the server's WATCH_HEARTBEAT_SECONDS: a stream silent for three of them is reconnected "
                             f"(default {HEARTBEAT_SECONDS:g})")
    parser.add_argument("--once", action="store_true", help="draw the current queues once and exit")
    parser.add_argument("--demo-svg", metavar="PATH", help="draw a made-up board into an SVG file and exit")
    args = parser.parse_args(argv)
    if args.demo_svg:
        print(save_picture(args.demo_svg))
        return 0
    if not args.doctor_ids:
        parser.error("name at least one doctor, e.g. DOC001")
    try:
        credentials = (tls_credentials(args.ca_cert, args.cert, args.key_file)
                       if args.ca_cert or args.cert or args.key_file else None)
    except (OSError, ValueError) as error:
        parser.error(f"cannot use the TLS files: {error}")
    zone: dt.tzinfo | None = args.timezone
    console = Console()
    try:
        # The names are not asked for the call's whole 5 s while the server cannot be reached: the board then shows
        # "connecting…" at once, and its watch waits for the server.
        with OPDClient(args.address, api_key=args.api_key, credentials=credentials,
                       attempts=QUICK_ATTEMPTS) as client:
            names = _names(client, args.doctor_ids, wait=not args.once)
            while True:
                date = args.date or hospital_today(zone)
                def new_day(shown: str = date) -> bool:
                    return not args.date and hospital_today(zone) != shown

                with client.watch(args.doctor_ids, date, reconnect=not args.once,
                                  stall_seconds=3 * args.heartbeat_seconds) as watch:
                    try:
                        follow(watch, BoardState(args.doctor_ids, date, zone), console, names, args.next_count,
                               args.once, args.heartbeat_seconds, until=new_day)
                    except OPDError as error:
                        if error.code is not grpc.StatusCode.OUT_OF_RANGE:
                            raise
                        continue  # the server no longer has the events after ours (a restore): start afresh
                if args.once or args.date:
                    break
    except OPDError as error:
        Console(stderr=True).print(f"[red]The board cannot show these queues:[/] {error}")
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def _names(client: OPDClient, doctor_ids: list[str], wait: bool) -> dict[str, str]:
    """The doctors' names for the panels' titles. A board left running (`wait`) goes on without them while the
    server cannot be reached, for its watch waits for the server; `--once` reports it, as any refusal."""
    try:
        return {d: client.get_doctor(d).doctor.name for d in doctor_ids}
    except OPDError as error:
        if wait and error.code is grpc.StatusCode.UNAVAILABLE:
            return {}
        raise


def _positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text} is not a positive number")
        return value
    return parse


if __name__ == "__main__":
    sys.exit(main())
