"""Hostile requests for the fuzz test (tests/e2e/test_fuzz.py), drawn by hypothesis.

A request is a method, the bytes sent for it and its metadata. The bytes are, in turn: a message of the method's
request type built from its descriptor (each field plausible, i.e. aimed at the seeded clinic so that many calls
get past the checks and change it, or hostile: NUL, unicode digits, text that grows when case-folded, huge text,
integer extremes, unknown enum values); that encoding truncated or corrupted; another method's message; random
bytes; or protobuf wire tricks. Metadata is mostly absent, else garbage, long, binary or duplicated
`authorization` and other headers, always of a form the gRPC client sends (lower-case keys, printable values).

`rounds` draws them from fixed seeds, so every run sends the same ones; SHARP_EDGES are inputs that once found a
fault, sent on every run; OVER_LIMITS go past the server's size limits."""

from __future__ import annotations

import base64
import datetime as dt
import functools
import itertools
import multiprocessing.queues
import uuid
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import hypothesis
import hypothesis.strategies as st
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from opd_grpc._gen.opd.v1 import opd_pb2, test_clock_pb2

# The clinic that the test seeds (tests/e2e/test_fuzz.py::seed): ids here are its ids, and some that are not.
DAY = "2030-01-07"
NEXT_DAY = "2030-01-08"
MORNING = dt.datetime(2030, 1, 7, 7, 0, tzinfo=dt.timezone.utc)
DOCTORS = ("DOC001", "DOC002")
REQUEST_IDS = tuple(str(uuid.UUID(int=n)) for n in range(1, 5))  # few, so that bodies meet again under one id

UNKNOWN_METHODS = ("/opd.v1.OPDTokenService/DeleteEverything", "/opd.v1.NoSuchService/Call", "/x")


@dataclass(frozen=True)
class Method:
    path: str
    request: Descriptor | None  # None for a method that no service has
    streaming: bool = False

    @property
    def changes_state(self) -> bool:
        """The calls whose OK answers the replay repeats: the OPD changes (they carry a request_id) and the
        test clock's moves (later answers depend on the time)."""
        if self.request is None:
            return False
        return "request_id" in self.request.fields_by_name or self.path.endswith(("/SetTime", "/AdvanceTime"))

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        """Pickled as its path (a descriptor is not picklable): requests come from a process of their own."""
        return method_at, (self.path,)


def _methods() -> list[Method]:
    found = []
    for service in (opd_pb2.DESCRIPTOR.services_by_name["OPDTokenService"],
                    test_clock_pb2.DESCRIPTOR.services_by_name["TestClockService"]):
        for m in service.methods:
            found.append(Method(f"/{service.full_name}/{m.name}", m.input_type, m.server_streaming))
    return found


METHODS = _methods()
ALL_METHODS = METHODS + [Method(path, None) for path in UNKNOWN_METHODS]


def method_at(path: str) -> Method:
    return next(m for m in ALL_METHODS if m.path == path)


@dataclass(frozen=True)
class Request:
    method: Method
    body: bytes
    metadata: tuple[tuple[str, str | bytes], ...]

    def __repr__(self) -> str:
        body = self.body if len(self.body) <= 300 else self.body[:300] + b"...(%d bytes)" % len(self.body)
        metadata = [(k, v if len(v) <= 80 else v[:80] + f"...({len(v)})") for k, v in self.metadata]  # type: ignore
        return f"Request({self.method.name}, {body!r}, metadata={metadata})"


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of the strategies, each drawn `weight` times as often as one of weight 1 (`st.one_of` drops repeats)."""
    return st.sampled_from([s for w, s in choices for _ in range(w)]).flatmap(lambda s: s)


# ---- text ------------------------------------------------------------------------------------------------

HOSTILE_TEXT = st.sampled_from([
    "", " ", "\t\n ", "\x00", "a\x00b", "DOC001\x00", "\x00DOC001", "DOC001\n", f"{DAY}\n", "09:00\n",
    "\u202e", "\ufeff", "\U0010ffff", "𝟘𝟙𝟚", "DOC٠٠١", "٢٠٣٠-٠١-٠٧", "２０３０-０１-０７", "٠٩:٠٠",
    "DOC001-٢٠٣٠٠١٠٧-0900", "DOC001-20300107-T١", "DOC001-20300107-T" + "9" * 40, "DOC001-00000107-T1",
    "ﬃ" * 200, "ß" * 199, "İ" * 200, "é" * 201, "🩺" * 100, "' OR 1=1 --", "%s%n%x", "../../etc/passwd",
    "NaN", "-0", "null", "{}", "Bearer x",
])
ANY_TEXT = st.text(max_size=30)  # any code point but a surrogate (UTF-8 cannot carry one), NUL included
# Long text, but never a message past the server's 4 MiB limit (OVER_LIMITS has those).
HUGE_TEXT = weighted((6, st.builds(lambda ch, n: ch * n, st.sampled_from(["x", "\x00", "é", "ﬃ", "9", " "]),
                                   st.sampled_from([201, 1001, 20_000]))),
                     (1, st.sampled_from(["x" * 100_000, "DOC" + "1" * 100_000])))
WILD_TEXT = weighted((6, HOSTILE_TEXT), (6, ANY_TEXT), (1, HUGE_TEXT))


def mostly(usual: Sequence[Any], near_misses: Sequence[Any]) -> st.SearchStrategy[Any]:
    """A usual value six times in seven, else a near miss."""
    return weighted((6, st.sampled_from(usual)), (1, st.sampled_from(near_misses)))


_DOCTOR_IDS = mostly(DOCTORS, ["DOC003", "DOC0", "doc001", "DOC1", "DOC001 ", "DOC001\n"])
_DATES = mostly([DAY, DAY, DAY, NEXT_DAY], ["2030-01-06", "2031-01-07", "1900-01-01", "9998-12-31", "1899-12-31",
                                            "9999-12-31", "0001-01-01", "2030-02-30", "2030-1-7", "07-01-2030"])
_BAD_TIMES = ["00:00", "23:59", "24:00", "9:00", "09:60", "09:00:00", "-1:00"]
_HOLIDAYS = ["2030-02-05", "2030-02-06", "2030-02-12", "2030-02-26", DAY]
_ID_DATES = mostly(["20300107", "20300107", "20300108"], ["20301307", "20300230", "00000107", "99991231"])


def _page_token(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


PLAUSIBLE_TEXT: dict[str, st.SearchStrategy[str]] = {
    "doctor_id": _DOCTOR_IDS,
    "doctor_ids": _DOCTOR_IDS,
    "after_sequences": _DOCTOR_IDS,
    "date": _DATES,
    # A new slot: on the seeded days, where most times are taken, or on two days without slots.
    "slotspec.date": mostly([DAY, NEXT_DAY, "2030-01-09", "2030-01-10"], ["2030-1-9", "2030-02-30"]),
    "slotspec.start_time": mostly(["09:00", "11:00", "12:00", "13:00", "14:00"], _BAD_TIMES),
    "slotspec.end_time": mostly(["12:00", "13:00", "14:00", "15:00", "16:00"], _BAD_TIMES),
    "start_time": mostly(["09:00", "10:00", "11:00", "12:00", "09:30"], _BAD_TIMES),
    "end_time": mostly(["10:00", "11:00", "12:00", "13:00"], _BAD_TIMES),
    "preferred_slot_time": mostly(["", "", "09:00", "10:00"], ["11:00", "12:00", *_BAD_TIMES]),
    # A weekly pattern, and the weeks of February it is applied to: days without slots, but those that earlier
    # applications made; now and then from DAY, where the seeded slots are in the way. Holidays fall in them.
    "templateslot.start_time": mostly(["08:00", "09:00", "13:00", "16:00"], _BAD_TIMES),
    "templateslot.end_time": mostly(["09:00", "12:00", "14:00", "17:00"], _BAD_TIMES),
    "applyslottemplaterequest.start_date": mostly(["2030-02-04", "2030-02-04", "2030-02-11", DAY],
                                                  ["", "2030-02-30", "2031-02-04", "1899-12-31"]),
    "applyslottemplaterequest.end_date": mostly(["2030-02-10", "2030-02-17", "2030-02-17", "2030-02-28"],
                                                ["2030-02-03", "2031-03-01", "9999-12-31", "2030-1-7"]),
    "createholidayrequest.date": mostly(_HOLIDAYS, ["2030-02-30", "", "2030-2-5"]),
    "deleteholidayrequest.date": mostly(_HOLIDAYS, ["2030-02-30", "", "2030-2-5"]),
    "listholidaysrequest.start_date": mostly(["", "2030-01-01", "2030-02-06"], ["2030-02-30", "2030-2-1"]),
    "listholidaysrequest.end_date": mostly(["", "2030-12-31", "2030-02-10"], ["2030-01-01", "2030-13-01"]),
    "token_id": st.builds("{}-{}-T{}".format, _DOCTOR_IDS, _ID_DATES, st.integers(0, 16)),
    "slot_id": st.builds("{}-{}-{}".format, _DOCTOR_IDS, _ID_DATES,
                         mostly(["0900", "1000", "1100", "1200"], ["0930", "2400", "09:00"])),
    "request_id": weighted((6, st.just("")), (6, st.uuids().map(str)), (1, st.sampled_from(REQUEST_IDS)),
                           (1, st.uuids().map(lambda u: str(u).upper())),
                           (1, st.uuids().map(lambda u: f"urn:uuid:{u}")),
                           (1, st.uuids().map(lambda u: "{%s}" % u)),
                           (1, st.uuids().map(lambda u: u.hex))),
    "page_token": mostly(["", _page_token("o:1"), _page_token("o:2")],
                         [_page_token("o:-1"), _page_token("o:1e3"), _page_token("o:" + "9" * 30),
                          _page_token("o:9" + "0" * 18), "not base64!", "=", _page_token("\xff")]),
    # Near misses of names: text that the checks take (200 characters) but that grows when case-folded.
    "name": mostly(["Dr Meera Iyer", "Asha", "  Ravi  Kumar ", "R", "Mrs. D'Souza", "Anil"],
                   ["", " ", "ﬃ" * 200, "ß" * 200, "İ" * 200, "ŉ" * 200]),
    "specialization": mostly(["Cardiology", "General Medicine", "ENT"], ["", "\t"]),
    "phone": weighted((6, st.integers(10, 99).map("+91-98450-000{}".format)),
                      (1, st.sampled_from(["", "no digits", "+91-98450-00001"]))),
    "mrn": weighted((8, st.just("")), (1, st.sampled_from(["MRN-1", "mrn-1", "MRN-2"]))),
    "reason": st.sampled_from(["", "patient asked", "duplicate"]),
}

# ---- integers --------------------------------------------------------------------------------------------

_RANGES = {
    **dict.fromkeys((FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32),
                    (-2 ** 31, 2 ** 31 - 1)),
    **dict.fromkeys((FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64),
                    (-2 ** 63, 2 ** 63 - 1)),
    **dict.fromkeys((FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32), (0, 2 ** 32 - 1)),
    **dict.fromkeys((FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64), (0, 2 ** 64 - 1)),
}
_MORNING_SECONDS = int(MORNING.timestamp())
_MAX_TIMESTAMP, _MIN_TIMESTAMP = 253_402_300_799, -62_135_596_800  # 9999-12-31T23:59:59Z, 0001-01-01T00:00:00Z


def mostly_int(low: int, high: int, edges: Sequence[int]) -> st.SearchStrategy[int]:
    """An integer from low to high six times in seven, else an edge: a value that the checks may take but that
    the rules behind them may not expect."""
    return weighted((6, st.integers(low, high)), (1, st.sampled_from(edges)))


PLAUSIBLE_INT: dict[str, st.SearchStrategy[int]] = {
    "max_capacity": mostly_int(1, 6, [2 ** 31 - 1, 100_000]),
    "consultation_minutes": mostly_int(1, 20, [2 ** 31 - 1, 100_000, 24 * 60]),
    "age": mostly_int(0, 150, [151, -1]),
    "page_size": mostly_int(0, 20, [2 ** 31 - 1, 1001]),
    "after_sequence": mostly_int(0, 30, [2 ** 63 - 1, 2 ** 31]),
    "after_sequences": mostly_int(0, 30, [2 ** 63 - 1, 2 ** 31]),
    "nanos": mostly_int(0, 999_999_999, [-1, 10 ** 9, 2 ** 31 - 1]),
    # Timestamp seconds: the clinic's morning, while its slots are open (SetTime, the audit log's range), its
    # evening (every grace period over), or the ends of time (past the dates the service keeps); Duration seconds:
    # up to half an hour, a day, or the largest a Duration holds.
    "seconds": mostly_int(_MORNING_SECONDS - 2 * 3600, _MORNING_SECONDS + 3 * 3600,
                          [_MORNING_SECONDS + 12 * 3600, _MAX_TIMESTAMP, _MIN_TIMESTAMP, 0, _MAX_TIMESTAMP + 1]),
    "duration.seconds": mostly_int(0, 1800, [86_400, 315_576_000_000, 8000 * 365 * 86400]),
}


def _wild_int(field: FieldDescriptor) -> st.SearchStrategy[int]:
    low, high = _RANGES[field.type]
    edges = sorted({v for v in (low, low + 1, -1, 0, 1, 2 ** 31 - 1, 2 ** 31, 2 ** 53 + 1, high - 1, high)
                    if low <= v <= high})
    return weighted((2, st.sampled_from(edges)), (1, st.integers(max(low, -5), 200)), (2, st.integers(low, high)))


# ---- messages --------------------------------------------------------------------------------------------

_ABSENT = object()


@functools.cache
def message(descriptor: Descriptor, wild: bool, depth: int = 0) -> st.SearchStrategy[Message]:
    """A message of the descriptor's type. Plausible (wild=False): every field set, each now and then absent or
    hostile; wild: each field absent half the time, else hostile."""
    cls = message_factory.GetMessageClass(descriptor)
    fields = {f.name: _field(f, descriptor, wild, depth) for f in descriptor.fields}
    return st.fixed_dictionaries(fields).map(lambda values: _filled(cls(), values))


def _filled(msg: Message, values: dict[str, Any]) -> Message:
    for name, value in values.items():
        if value is _ABSENT:
            continue
        target = getattr(msg, name)
        if isinstance(value, Message):
            target.CopyFrom(value)
        elif isinstance(value, dict):
            target.update(value)
        elif isinstance(value, list):
            for item in value:
                target.add().CopyFrom(item) if isinstance(item, Message) else target.append(item)
        else:
            setattr(msg, name, value)
    return msg


def _field(field: FieldDescriptor, owner: Descriptor, wild: bool, depth: int) -> st.SearchStrategy[Any]:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
        one = st.dictionaries(_value(key, field.name, owner, wild, depth), _value(value, field.name, owner, wild, depth),
                              max_size=3 if not wild else 8)
    elif field.is_repeated:
        element = _value(field, field.name, owner, wild, depth)
        one = weighted((4, st.lists(element, min_size=0 if wild else 1, max_size=1)),
                       (2, st.lists(element, min_size=0 if wild else 1, max_size=3)),
                       (1, st.lists(element, min_size=45, max_size=60)))
    else:
        one = _value(field, field.name, owner, wild, depth)
    return weighted((1, st.just(_ABSENT)), (1 if wild else 25, one))


def _value(field: FieldDescriptor, name: str, owner: Descriptor, wild: bool, depth: int) -> st.SearchStrategy[Any]:
    """One value for a field (or a map's key or value, named by its map field)."""
    t = field.type
    if t == FieldDescriptor.TYPE_MESSAGE:
        if depth >= 3:
            return st.just(message_factory.GetMessageClass(field.message_type)())
        return message(field.message_type, wild, depth + 1)
    if t == FieldDescriptor.TYPE_STRING:
        plausible = PLAUSIBLE_TEXT.get(f"{owner.name.lower()}.{name}", PLAUSIBLE_TEXT.get(name, PLAUSIBLE_TEXT["name"]))
        return WILD_TEXT if wild else weighted((19, plausible), (1, WILD_TEXT))
    if t == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return weighted((1 if wild else 19, st.sampled_from(known)), (1, st.integers(-2 ** 31, 2 ** 31 - 1)))
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(width=32 if t == FieldDescriptor.TYPE_FLOAT else 64)
    plausible_int = PLAUSIBLE_INT.get(f"{owner.name.lower()}.{name}", PLAUSIBLE_INT.get(name))
    if wild or plausible_int is None:
        return _wild_int(field)
    return weighted((19, plausible_int), (1, _wild_int(field)))


# ---- bytes -----------------------------------------------------------------------------------------------

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


WIRE_TRICKS = st.sampled_from([
    b"\x0a\x02\xc3\x28",  # field 1, a string that is not UTF-8
    b"\x0a\x03\xed\xa0\x80",  # field 1, a UTF-8-encoded surrogate
    b"\x0a\xff\xff\xff\xff\x07",  # field 1, a length far past the end
    b"\x08" + b"\xff" * 11,  # a varint longer than 10 bytes
    b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # field 1 varint = 2**64 - 1
    b"\x00", b"\x07", b"\x0e\x00", b"\x0f",  # field 0, wire types 6 and 7
    b"\x0b" * 120 + b"\x0c" * 120,  # groups nested deeper than the parser allows
    b"\x0b" * 30 + b"\x0c" * 30,
    b"\x0b",  # a group that never ends
    b"\xf8\xff\xff\xff\x0f\x01",  # the largest field number (unknown)
    b"\x12\x02\x08\x01" * 50,  # field 2 again and again
    _varint((1 << 3) | 2) + _varint(10_000_000),  # a length of 10 MB with nothing behind it
])


def _corrupted(body: bytes, how: str, at: int, byte: int) -> bytes:
    at = at % (len(body) + 1)
    if how == "truncate":
        return body[:at]
    if how == "flip":
        return body[:at] + bytes([byte]) + body[at + 1:] if at < len(body) else body + bytes([byte])
    if how == "insert":
        return body[:at] + bytes([byte]) + body[at:]
    return body + bytes([byte])  # "append": a dangling tag or a stray byte


def body(method: Method) -> st.SearchStrategy[bytes]:
    """The bytes of one call: a message of its type (plausible or wild), a corrupted encoding, another
    method's message, random bytes, or a wire trick."""
    if method.request is None:
        return weighted((1, st.just(b"")), (1, st.binary(max_size=40)))
    plausible = message(method.request, wild=False).map(lambda m: m.SerializeToString(deterministic=True))
    wild = message(method.request, wild=True).map(lambda m: m.SerializeToString(deterministic=True))
    others = [m for m in METHODS if m.request is not method.request]
    other = st.sampled_from(others).flatmap(lambda m: message(m.request, wild=False)).map(  # type: ignore[arg-type]
        lambda m: m.SerializeToString(deterministic=True))
    corrupted = st.builds(_corrupted, weighted((3, plausible), (1, wild)),
                          st.sampled_from(["truncate", "flip", "insert", "append"]), st.integers(0, 400),
                          st.integers(0, 255))
    return weighted((14, plausible), (5, wild), (3, corrupted), (1, other), (1, st.binary(max_size=200)),
                    (1, WIRE_TRICKS))


# ---- metadata --------------------------------------------------------------------------------------------

PRINTABLE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)
HEX8 = st.text("0123456789abcdef", min_size=8, max_size=8)
_AUTHORIZATION = weighted(
    (3, PRINTABLE),
    (3, st.builds(lambda key, secret: f"Bearer opd_{key}_{secret}", HEX8, PRINTABLE)),
    (1, st.sampled_from(["Bearer", "Bearer ", "bearer opd_", "Basic YWRtaW46YWRtaW4=", "Bearer opd__", "",
                         "Bearer opd_00000000_" + "A" * 43, "Bearer opd_zzzzzzzz_x"])),
)
_KEY = st.text("abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=20).filter(
    lambda k: not k.startswith(("grpc-", ":")) and k not in ("te", "content-type", "user-agent")
    and not k.endswith("-bin"))
_HEADER = weighted(
    (4, st.tuples(st.just("authorization"), _AUTHORIZATION)),
    (1, st.tuples(st.sampled_from(["authorization-bin", "x-api-key-bin", "x-fuzz-bin"]), st.binary(max_size=64))),
    (1, st.tuples(_KEY, PRINTABLE)),
    (1, st.tuples(st.just("x-api-key"), PRINTABLE)),
)
# Metadata stays under gRPC's 8 KiB soft limit: between it and the 16 KiB hard limit a server refuses a call at
# random, and the run would not be the same twice. OVER_LIMITS goes past the hard one.
_LONG_AUTHORIZATION = st.builds(lambda n: (("authorization", "Bearer opd_" + "a" * n),), st.sampled_from([1000, 6000]))
METADATA = weighted((12, st.just(())), (6, st.lists(_HEADER, min_size=1, max_size=4).map(tuple)),
                    (1, _LONG_AUTHORIZATION))


def request(method: Method) -> st.SearchStrategy[Request]:
    return st.builds(Request, st.just(method), body(method), METADATA)


def drawn(method: Method, count: int, seed: int) -> list[Request]:
    """`count` requests for one method, drawn by hypothesis from a fixed seed: the same ones on every run.
    (Each is an example of its own: drawn as parts of one larger example, most of them repeat earlier ones.)"""
    found: list[Request] = []

    @hypothesis.seed(seed)
    @hypothesis.settings(max_examples=count, database=None, deadline=None, phases=[hypothesis.Phase.generate],
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(request(method))
    def draw(one: Request) -> None:
        found.append(one)

    draw()
    return found


def rounds(count: int, per_method: int) -> Iterator[list[Request]]:
    """`count` rounds, each of `per_method` requests for every method of the services (and a quarter as many for
    methods that no service has), interleaved."""
    for n in range(count):
        drawn_for = [drawn(m, per_method if m.request else per_method // 4, seed=n * 1000 + i)
                     for i, m in enumerate(ALL_METHODS)]
        yield [r for group in itertools.zip_longest(*drawn_for) for r in group if r is not None]


def put_rounds(out: multiprocessing.queues.Queue, count: int, per_method: int) -> None:
    """`rounds`, into a queue, then None: drawing them takes as long as sending them, so another process does it."""
    for batch in rounds(count, per_method):
        out.put(batch)
    out.put(None)


def _call(method_name: str, message: Message, metadata: tuple[tuple[str, str | bytes], ...] = ()) -> Request:
    return Request(next(m for m in METHODS if m.name == method_name), message.SerializeToString(deterministic=True),
                   metadata)


def _patient(n: int, name: str = "Sharp Edge") -> opd_pb2.Patient:
    return opd_pb2.Patient(name=name, phone=f"+91-90000-{n:05d}", age=40)


def _sharp_edges() -> list[Request]:
    """Requests that the random rounds once found a fault with, sent on every run (hypothesis's @example): values
    that the checks took but the rules behind them did not expect. On a day of their own (2030-01-11), so that they
    meet nothing of the rounds."""
    doctor, edge_day = DOCTORS[1], "2030-01-11"
    long_consultations = opd_pb2.SlotSpec(date=edge_day, start_time="09:00", end_time="10:00", max_capacity=5,
                                          consultation_minutes=2 ** 31 - 1)
    huge_slot = opd_pb2.SlotSpec(date=edge_day, start_time="10:00", end_time="11:00", max_capacity=2 ** 31 - 1)
    return [
        _call("CreateSlots", opd_pb2.CreateSlotsRequest(doctor_id=doctor, slots=[long_consultations])),
        *(_call("AllocateToken", opd_pb2.AllocateTokenRequest(patient=_patient(n), doctor_id=doctor, date=edge_day,
                                                              source=opd_pb2.SOURCE_WALK_IN, preferred_slot_time="09:00"))
          for n in range(4)),  # estimated times 2**31 minutes apart: past the year 9999 from the third on
        _call("ListTokens", opd_pb2.ListTokensRequest(doctor_id=doctor, date=edge_day)),
        _call("CreateSlots", opd_pb2.CreateSlotsRequest(doctor_id=doctor, slots=[huge_slot])),
        _call("GetStats", opd_pb2.GetStatsRequest(date=edge_day)),  # total capacity past int32
        _call("AllocateToken", opd_pb2.AllocateTokenRequest(patient=_patient(9, "ﬃ" * 200), doctor_id=doctor, date=DAY,
                                                            source=opd_pb2.SOURCE_WALK_IN)),  # 600 once case-folded
        _call("ListDoctors", opd_pb2.ListDoctorsRequest(page_token=_page_token("o:" + "9" * 30))),
    ]


SHARP_EDGES = _sharp_edges()


def _over_limits() -> list[Request]:
    """Past the server's limits: a message over 4 MiB, metadata over 16 KiB. gRPC refuses them (RESOURCE_EXHAUSTED)
    and drops the connection, which takes the client up to a second to open again: so they are few and fixed."""
    huge_patient = opd_pb2.AllocateTokenRequest(patient=opd_pb2.Patient(name="x" * 4_300_000), doctor_id=DOCTORS[0],
                                                date=DAY, source=opd_pb2.SOURCE_WALK_IN)
    return [_call("AllocateToken", huge_patient),
            _call("GetDoctor", opd_pb2.GetDoctorRequest(doctor_id=DOCTORS[0]),
                  (("authorization", "Bearer opd_" + "a" * 20_000),)),
            _call("GetDoctor", opd_pb2.GetDoctorRequest(), tuple((f"x-header-{n}", "v" * 100) for n in range(200)))]


OVER_LIMITS = _over_limits()
