"""Who may call what (SPEC §13): the table of method → roles, and the gate that every call of the OPD service
passes (in the call pipeline, api/interceptors.py). Health and reflection stay open and never reach it."""

from __future__ import annotations

import contextvars
from typing import Any

from opd_grpc._gen.opd.v1 import opd_pb2 as pb
from opd_grpc.engine.access import ANONYMOUS, ROLES, Actor, KeyRing
from opd_grpc.engine.errors import PermissionDenied

OPD = "/opd.v1.OPDTokenService/"
TEST_CLOCK = "/opd.v1.TestClockService/"
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

_EVERYONE = frozenset(ROLES)
_ADMIN, _RECEPTION, _TRIAGE, _DOCTOR = (frozenset({role}) for role in ("admin", "reception", "triage", "doctor"))
_ALLOCATE_TOKEN = OPD + "AllocateToken"

# Every method and the roles that may call it. A method missing here is denied to every caller.
METHOD_ROLES: dict[str, frozenset[str]] = {
    **{OPD + m: _ADMIN for m in ("CreateDoctor", "CreateSlots", "UpdateSlotCapacity", "ListAuditEntries",
                                 "SetSlotTemplate", "ApplySlotTemplate", "CreateHoliday", "DeleteHoliday")},
    # reception books every source but SOURCE_EMERGENCY, which is triage's (AllocateToken with it behaves as
    # AllocateEmergency, SPEC §4): `Gate.authorize` gives such a request triage's row.
    _ALLOCATE_TOKEN: _RECEPTION,
    OPD + "AllocateEmergency": _TRIAGE,
    **{OPD + m: _RECEPTION for m in ("CheckInToken", "CancelToken")},
    **{OPD + m: _DOCTOR for m in ("CallNext", "CompleteToken", "MarkNoShow")},
    **{OPD + m: _EVERYONE for m in ("GetDoctor", "ListDoctors", "ListSlots", "GetSlotStatus", "GetToken",
                                    "ListTokens", "GetStats", "WatchQueue", "ListQueueEvents", "GetSlotTemplate",
                                    "ListHolidays")},
    # The test clock exists only on servers started with TEST_CLOCK; moving it changes every clinic's day.
    **{TEST_CLOCK + m: _ADMIN for m in ("SetTime", "AdvanceTime")},
    TEST_CLOCK + "GetTime": _EVERYONE,
}

# The caller of the call in hand, set by the call pipeline for the servicer (the audit log's "who").
CALLER: contextvars.ContextVar[Actor] = contextvars.ContextVar("opd_caller", default=ANONYMOUS)


def is_open(method: str) -> bool:
    return method.startswith(OPEN_SERVICES)


class Gate:
    """Authenticates a call's key against the `KeyRing` in hand (replaced when keys are reloaded) and checks its
    role against METHOD_ROLES."""

    def __init__(self, keys: KeyRing):
        self.keys = keys

    def authenticate(self, metadata: Any) -> Actor:
        authorization = None
        for name, value in metadata or ():
            if name == "authorization":
                if authorization is not None:  # two keys: which one is meant is anybody's guess
                    authorization = ""
                    break
                authorization = value if isinstance(value, str) else ""
        return self.keys.authenticate(authorization)

    def authorize(self, actor: Actor, method: str, request: Any) -> None:
        roles = METHOD_ROLES.get(method)
        if method == _ALLOCATE_TOKEN and request.source == pb.SOURCE_EMERGENCY:
            roles = _TRIAGE
        name = method.rsplit("/", 1)[-1]
        if roles is None:
            raise PermissionDenied(f"{name} is not open to any caller.", "METHOD_NOT_ALLOWED")
        if self.keys.required and actor.role not in roles:
            what = f"{name} with SOURCE_EMERGENCY" if roles is _TRIAGE and name == "AllocateToken" else name
            raise PermissionDenied(f"The role {actor.role!r} may not call {what}; it is for "
                                   f"{', '.join(sorted(roles))}.", "ROLE_NOT_ALLOWED")
