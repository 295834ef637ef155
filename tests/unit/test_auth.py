"""The gate and the key ring without a server: every real method has a row in METHOD_ROLES (a method without one is
denied to everybody, keys or not), and which `authorization` values a KeyRing accepts."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from pathlib import Path

import pytest

from opd_grpc._gen.opd.v1 import opd_pb2 as pb
from opd_grpc._gen.opd.v1 import test_clock_pb2
from opd_grpc.api.auth import METHOD_ROLES, Gate
from opd_grpc.engine.access import ANONYMOUS, ROLES, KeyRing, new_key
from opd_grpc.engine.errors import PermissionDenied, Unauthenticated

pytestmark = pytest.mark.backend_independent

NOW = dt.datetime(2030, 1, 7, 7, 0, tzinfo=dt.timezone.utc)
SERVICES = [pb.DESCRIPTOR.services_by_name["OPDTokenService"],
            test_clock_pb2.DESCRIPTOR.services_by_name["TestClockService"]]
README = Path(__file__).parents[2] / "README.md"


def test_every_method_of_both_services_has_roles_and_nothing_else_does():
    served = {f"/{service.full_name}/{method.name}" for service in SERVICES for method in service.methods}
    assert set(METHOD_ROLES) == served
    assert all(roles and roles <= set(ROLES) for roles in METHOD_ROLES.values())


def test_the_readme_role_table_names_every_method_under_exactly_its_roles():
    """The table under "API keys and roles" is what an administrator hands out keys by: a method missing from it,
    or under a role that is refused it, sends a desk to the wrong key."""
    table = README.read_text().split("| role | may call |", 1)[1].split("\n\n", 1)[0]
    documented: dict[str, set[str]] = {}
    for row in table.splitlines()[2:]:
        who, methods = row.strip("|").split("|")
        roles = set(ROLES) if who.strip().startswith("every role") else set(re.findall(r"`([a-z]+)`", who))
        for method in re.findall(r"`([A-Z][A-Za-z]+)`", methods):
            documented.setdefault(method, set()).update(roles)
    served = {path.rsplit("/", 1)[1]: set(roles) for path, roles in METHOD_ROLES.items()}
    served["AllocateToken"].add("triage")  # with SOURCE_EMERGENCY: Gate.authorize gives it AllocateEmergency's row
    assert documented == served


@pytest.mark.parametrize("ring", [KeyRing(), KeyRing([new_key("ops", "admin", NOW)[0]])], ids=["no keys", "keys"])
def test_a_method_missing_from_the_table_is_denied_even_to_an_admin_and_without_keys(ring):
    admin = new_key("ops", "admin", NOW)[0].actor
    for method in ("/opd.v1.OPDTokenService/DropAllTables", "/opd.v1.Other/CreateDoctor"):
        with pytest.raises(PermissionDenied) as denied:
            Gate(ring).authorize(admin if ring.required else ANONYMOUS, method, pb.CreateDoctorRequest())
        assert denied.value.reason == "METHOD_NOT_ALLOWED"


def test_the_role_decides_and_an_emergency_booking_is_triage_s():
    keys = {role: new_key(role, role, NOW)[0] for role in ROLES}
    gate = Gate(KeyRing(list(keys.values())))
    emergency = pb.AllocateTokenRequest(source=pb.SOURCE_EMERGENCY)
    gate.authorize(keys["triage"].actor, "/opd.v1.OPDTokenService/AllocateToken", emergency)
    with pytest.raises(PermissionDenied) as denied:
        gate.authorize(keys["reception"].actor, "/opd.v1.OPDTokenService/AllocateToken", emergency)
    assert denied.value.reason == "ROLE_NOT_ALLOWED"
    assert "SOURCE_EMERGENCY" in denied.value.message


@pytest.mark.parametrize("source", [pb.SOURCE_WALK_IN, pb.SOURCE_PAID_PRIORITY, pb.SOURCE_FOLLOW_UP,
                                    pb.SOURCE_ONLINE_BOOKING], ids=pb.Source.Name)
def test_other_bookings_are_reception_s_not_triage_s(source):
    """SPEC §13: reception allocates non-emergency, triage does emergencies."""
    keys = {role: new_key(role, role, NOW)[0] for role in ("reception", "triage")}
    gate = Gate(KeyRing(list(keys.values())))
    booking = pb.AllocateTokenRequest(source=source)
    gate.authorize(keys["reception"].actor, "/opd.v1.OPDTokenService/AllocateToken", booking)
    with pytest.raises(PermissionDenied) as denied:
        gate.authorize(keys["triage"].actor, "/opd.v1.OPDTokenService/AllocateToken", booking)
    assert denied.value.reason == "ROLE_NOT_ALLOWED"


def _refusal(ring: KeyRing, authorization: str | None) -> str:
    return _refused(ring, authorization).reason


def _refused(ring: KeyRing, authorization: str | None) -> Unauthenticated:
    with pytest.raises(Unauthenticated) as refused:
        ring.authenticate(authorization)
    return refused.value


def test_a_key_of_the_ring_authenticates_as_its_role():
    key, text = new_key("desk-1", "reception", NOW)
    actor = KeyRing([key]).authenticate(f"Bearer {text}")
    assert (actor.key_id, actor.role) == (key.key_id, "reception")


def test_a_revoked_key_is_refused():
    key, text = new_key("desk-1", "reception", NOW)
    other, _ = new_key("desk-2", "reception", NOW)
    ring = KeyRing([dataclasses.replace(key, revoked_at=NOW), other])
    assert _refusal(ring, f"Bearer {text}") == "API_KEY_INVALID"


def test_revoking_every_key_keeps_keys_required():
    key, text = new_key("ops", "admin", NOW)
    ring = KeyRing([dataclasses.replace(key, revoked_at=NOW)])
    assert ring.required
    assert _refusal(ring, None) == "API_KEY_MISSING"
    assert _refusal(ring, f"Bearer {text}") == "API_KEY_INVALID"


def test_an_unknown_key_id_is_refused():
    key, _ = new_key("ops", "admin", NOW)
    _, stranger = new_key("ops", "admin", NOW)
    assert _refusal(KeyRing([key]), f"Bearer {stranger}") == "API_KEY_INVALID"


def test_the_right_key_id_with_another_secret_is_refused():
    key, text = new_key("ops", "admin", NOW)
    _, other = new_key("ops", "admin", NOW)
    forged = f"opd_{key.key_id}_{other.split('_', 2)[2]}"
    assert forged != text
    assert _refusal(KeyRing([key]), f"Bearer {forged}") == "API_KEY_INVALID"


def test_a_refused_key_names_its_id_and_why_for_the_audit_log_but_not_for_the_caller():
    """A desk still sending a revoked key is found by the id in its DENIED rows; the caller learns no more."""
    revoked, revoked_text = new_key("desk-1", "reception", NOW)
    key, text = new_key("ops", "admin", NOW)
    _, stranger = new_key("ops", "admin", NOW)
    ring = KeyRing([dataclasses.replace(revoked, revoked_at=NOW), key])
    forged = f"opd_{key.key_id}_{stranger.split('_', 2)[2]}"
    presented = {text: _refused(ring, f"Bearer {text}").presented for text in (revoked_text, stranger, forged)}
    assert presented == {revoked_text: f"key {revoked.key_id}, revoked",
                         stranger: f"key {stranger.split('_')[1]}, unknown",
                         forged: f"key {key.key_id}, wrong secret"}
    assert _refused(ring, "Bearer opd_xyz_abc").presented == "" and _refused(ring, None).presented == ""
    messages = {_refused(ring, f"Bearer {t}").message for t in (revoked_text, stranger, forged)}
    assert len(messages) == 1 and key.key_id not in messages.pop()


def test_no_authorization_with_keys_is_missing_and_junk_is_invalid():
    key, text = new_key("ops", "admin", NOW)
    ring = KeyRing([key])
    assert _refusal(ring, None) == "API_KEY_MISSING"
    for junk in ("", "Bearer", text, f"Basic {text}", f"Bearer {text}{text}", "Bearer opd_xyz_abc"):
        assert _refusal(ring, junk) == "API_KEY_INVALID", junk


@pytest.mark.parametrize("authorization", [None, "", "Bearer opd_00000000_" + "A" * 43, "anything at all"])
def test_without_keys_every_caller_is_anonymous(authorization):
    ring = KeyRing()
    assert not ring.required
    assert ring.authenticate(authorization) == ANONYMOUS
