"""Who may call (SPEC §13): bearer API keys, each with one role, and the actor that a change is audited under.

A key reads `opd_<key id>_<secret>`: the key id (public, 8 hex digits) finds the stored key, and the secret
(256 random bits) is checked against its SHA-256 in constant time. The secret is shown once, when the key is
made, and never stored."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from opd_grpc.engine.errors import Unauthenticated

ROLES = ("admin", "reception", "triage", "doctor", "display")
_KEY_TEXT = re.compile(r"opd_([0-9a-f]{8})_([A-Za-z0-9_-]{43})")
_NO_SECRET = hashlib.sha256(b"").digest()


@dataclass(frozen=True)
class Actor:
    """Who made a change: a key and its role; `ANONYMOUS` on a keyless development server, `SYSTEM` for the
    server's own changes (AUTO_NO_SHOW)."""

    key_id: str
    role: str


ANONYMOUS = Actor("", "")
SYSTEM = Actor("system", "system")


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    name: str
    role: str
    secret_sha256: bytes
    created_at: dt.datetime
    revoked_at: dt.datetime | None = None

    @property
    def actor(self) -> Actor:
        return Actor(self.key_id, self.role)


def new_key(name: str, role: str, now: dt.datetime) -> tuple[ApiKey, str]:
    """A fresh key and its text, which the caller shows once."""
    key_id, secret = secrets.token_hex(4), secrets.token_urlsafe(32)
    return ApiKey(key_id, name, role, _digest(secret), now), f"opd_{key_id}_{secret}"


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class KeyRing:
    """The keys a server accepts, reloaded from storage every API_KEYS_REFRESH_SECONDS. `required` once the
    database holds any key, revoked or not: revoking the last key must not open the server."""

    def __init__(self, keys: list[ApiKey] = ()):
        self.required = bool(keys)
        self._active = {k.key_id: k for k in keys if k.revoked_at is None}
        self._revoked = {k.key_id for k in keys if k.revoked_at is not None}

    def authenticate(self, authorization: str | None) -> Actor:
        """The actor of an `authorization` metadata value, or `Unauthenticated` saying why not."""
        if not self.required:
            return ANONYMOUS
        if authorization is None:
            raise Unauthenticated("This call needs an API key: send the metadata `authorization: Bearer <key>`.",
                                  "API_KEY_MISSING")
        scheme, _, text = authorization.strip().partition(" ")
        match = _KEY_TEXT.fullmatch(text.strip()) if scheme.lower() == "bearer" else None
        key = self._active.get(match[1]) if match else None
        # Compared even for an unknown key, so that the answer takes as long whether the key id exists or not.
        matches = hmac.compare_digest(_digest(match[2]) if match else _NO_SECRET,
                                      key.secret_sha256 if key else _NO_SECRET)
        if key is None or not matches:
            if scheme.lower() != "bearer":  # says nothing of any key: `Basic <key>`, or the key alone
                raise Unauthenticated("The authorization metadata must read `Bearer <key>`.", "API_KEY_INVALID")
            raise Unauthenticated("The API key is unknown, revoked or malformed; ask an administrator for a key "
                                  "(`opd-grpc keys add`).", "API_KEY_INVALID", presented=self._why(match, key))
        return key.actor

    def accepts(self, actor: Actor) -> bool:
        """Whether a call authenticated as `actor` under earlier keys would still be let in: its key not revoked,
        or no key needed at all."""
        if not self.required:
            return True
        key = self._active.get(actor.key_id)
        return key is not None and key.role == actor.role

    def _why(self, match: re.Match[str] | None, key: ApiKey | None) -> str:
        """What a refused key was, for the audit log: a desk still sending a revoked key is then found by its id."""
        if match is None:
            return ""
        why = "revoked" if match[1] in self._revoked else "unknown" if key is None else "wrong secret"
        return f"key {match[1]}, {why}"
