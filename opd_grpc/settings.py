"""Settings of SPEC §14: defaults, then a TOML file, then the environment (`OPD_` + name), which wins."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import tomllib
import zoneinfo
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import sqlalchemy

from opd_grpc.engine.model import Rules
from opd_grpc.engine.service import MAX_CONSULTATION_MINUTES, MAX_SLOT_CAPACITY, MAX_SLOT_SPAN_MINUTES


MIN_REQUEST_RETENTION_HOURS = 24
# Below this, a single booking could be refused: one with every field at its longest, in 4-byte characters, is
# 1.8 KiB (a batch of slots is sent in parts).
MIN_MESSAGE_BYTES = 4096
ENVIRONMENT_PREFIX = "OPD_"
NEAR_ENOUGH = 0.8  # difflib's ratio from which a name is taken for a misspelt setting
# What Kubernetes sets in a pod for each Service of its namespace (the Service's name in capitals, - as _).
_KUBERNETES = re.compile(r"[A-Z0-9_]+_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?"
                         r"|PORT(_\d+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)?)")
# `OPD_` variables that are not the server's settings: the settings file's name, and what the clients read
# (opdctl, the display board), which an operator's shell may hold beside the server's.
OTHER_VARIABLES = frozenset({"OPD_CONFIG", "OPD_ADDRESS", "OPD_API_KEY", "OPD_CA_CERT", "OPD_CLIENT_CERT",
                             "OPD_CLIENT_KEY"})


class SettingsError(ValueError):
    """A setting that cannot be used; the message names it."""


@dataclass(frozen=True)
class Settings:
    DEFAULT_SLOT_CAPACITY: int = 10
    AVERAGE_CONSULTATION_MINUTES: int = 5
    NO_SHOW_GRACE_PERIOD_MINUTES: int = 15
    MAX_WAITLIST_SIZE: int = 50
    AUTO_NO_SHOW: bool = False
    RATE_LIMIT_PER_KEY: int = 0
    # Calls refused for their key or role that are written to the audit log, per second per client address (a
    # burst of one second's); past it a denial is refused all the same and access-logged, but not written (the
    # metric opd_denied_calls_not_audited counts it), so that a flood of bad keys cannot fill the append-only log.
    # 0: every denial is written.
    AUDITED_DENIALS_PER_PEER: int = 20
    MAX_CONCURRENT_CALLS: int = 1000
    TIMEZONE: str = "UTC"
    DATABASE_URL: str = "sqlite:///opd.db"
    LISTEN: str = "127.0.0.1:50051"
    TEST_CLOCK: bool = False
    # WatchQueue (SPEC §10): a quiet stream's heartbeat, and how many events a watcher may fall behind
    # before its stream ends with ABORTED and the client resumes from the event table.
    WATCH_HEARTBEAT_SECONDS: float = 10.0
    WATCH_BUFFER_EVENTS: int = 1000
    # How often each server compares its watchers with the stored last sequences: the latest that a change
    # whose wake-up was lost (a replica killed between commit and NOTIFY) reaches them.
    WATCH_CATCH_UP_SECONDS: float = 1.0
    # History pruned by age: a doctor-day's queue events once its date is this many days past (a watcher resuming
    # into them gets OUT_OF_RANGE), and a request_id's stored answer after this many hours (SPEC §9: >= 24).
    EVENT_RETENTION_DAYS: int = 30
    REQUEST_RETENTION_HOURS: int = 48
    # Trust and limits (SPEC §13, issue 5). Bearer keys live in the database (`opd-grpc keys`); each server
    # reloads them this often, so a key added or revoked elsewhere counts within that time.
    API_KEYS_REFRESH_SECONDS: float = 2.0
    # TLS: a certificate chain and its private key (PEM files) turn TLS on; a client CA bundle also asks every
    # client for a certificate that it signed (mutual TLS).
    TLS_CERT_FILE: str = ""
    TLS_KEY_FILE: str = ""
    TLS_CLIENT_CA_FILE: str = ""
    # The largest request message accepted, and how many WatchQueue streams may be open at once (apart from
    # MAX_CONCURRENT_CALLS, which counts the other calls in flight).
    MAX_MESSAGE_BYTES: int = 4 * 1024 * 1024
    MAX_WATCHERS: int = 1000
    # On SIGTERM: health says NOT_SERVING, new calls are refused, calls in flight get this long to finish.
    SHUTDOWN_GRACE_SECONDS: float = 10.0
    # The Prometheus endpoint (host:port; port 0 takes a free one; empty: none).
    METRICS_LISTEN: str = "127.0.0.1:9464"

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None, file: str | Path | None = None) -> Settings:
        """`file` defaults to $OPD_CONFIG; its keys are the names above, in any case."""
        env = os.environ if env is None else env
        file = file or env.get("OPD_CONFIG")
        values: dict[str, Any] = {}
        if file:
            values = _read_file(file)
        names = {f.name: f for f in dataclasses.fields(cls)}
        _refuse_unknown(set(values) - set(names), names, "", f"in {file}")
        # In the environment only a name near a setting's (in any case) is refused: other OPD_ names belong to
        # others, the clients' and Kubernetes' (for a Service named opd or opd-database: OPD_SERVICE_HOST,
        # OPD_DATABASE_PORT, OPD_PORT_50051_TCP, ...).
        _refuse_unknown({key for key in env if key.startswith(ENVIRONMENT_PREFIX) and key not in OTHER_VARIABLES
                         and key.removeprefix(ENVIRONMENT_PREFIX) not in names and not _KUBERNETES.fullmatch(key)
                         and _nearest(key.removeprefix(ENVIRONMENT_PREFIX).upper(), names)}, names,
                        ENVIRONMENT_PREFIX, "in the environment")
        for name in names:
            if ENVIRONMENT_PREFIX + name in env:
                values[name] = env[ENVIRONMENT_PREFIX + name]
        if "DATABASE_URL" in values:
            values["DATABASE_URL"] = _database_url(str(values["DATABASE_URL"]))
        settings = cls(**{name: _convert(name, names[name].type, value) for name, value in values.items()})
        settings.check()
        return settings

    def check(self) -> None:
        for name in ("DEFAULT_SLOT_CAPACITY", "AVERAGE_CONSULTATION_MINUTES", "MAX_CONCURRENT_CALLS",
                     "WATCH_HEARTBEAT_SECONDS", "WATCH_BUFFER_EVENTS", "WATCH_CATCH_UP_SECONDS",
                     "EVENT_RETENTION_DAYS", "API_KEYS_REFRESH_SECONDS", "MAX_MESSAGE_BYTES", "MAX_WATCHERS"):
            if not 0 < getattr(self, name) < math.inf:  # nan fails this too
                raise SettingsError(f"{name} must be positive, not {getattr(self, name)}")
        for name in ("NO_SHOW_GRACE_PERIOD_MINUTES", "MAX_WAITLIST_SIZE", "RATE_LIMIT_PER_KEY",
                     "AUDITED_DENIALS_PER_PEER", "SHUTDOWN_GRACE_SECONDS"):
            if not 0 <= getattr(self, name) < math.inf:
                raise SettingsError(f"{name} must not be negative, not {getattr(self, name)}")
        # A slot made without seats or minutes takes these: they must make a slot CreateSlots would accept.
        if self.DEFAULT_SLOT_CAPACITY > MAX_SLOT_CAPACITY:
            raise SettingsError(f"DEFAULT_SLOT_CAPACITY must be at most {MAX_SLOT_CAPACITY}, "
                                f"not {self.DEFAULT_SLOT_CAPACITY}")
        if self.AVERAGE_CONSULTATION_MINUTES > MAX_CONSULTATION_MINUTES:
            raise SettingsError(f"AVERAGE_CONSULTATION_MINUTES must be at most {MAX_CONSULTATION_MINUTES}, "
                                f"not {self.AVERAGE_CONSULTATION_MINUTES}")
        if self.DEFAULT_SLOT_CAPACITY * self.AVERAGE_CONSULTATION_MINUTES > MAX_SLOT_SPAN_MINUTES:
            raise SettingsError(f"DEFAULT_SLOT_CAPACITY x AVERAGE_CONSULTATION_MINUTES must be at most "
                                f"{MAX_SLOT_SPAN_MINUTES} minutes (1000 days)")
        _check_address("LISTEN", self.LISTEN)
        if self.METRICS_LISTEN:
            _check_address("METRICS_LISTEN", self.METRICS_LISTEN)
        if self.MAX_MESSAGE_BYTES < MIN_MESSAGE_BYTES:
            raise SettingsError(f"MAX_MESSAGE_BYTES must be at least {MIN_MESSAGE_BYTES}: below it a booking may be "
                                f"refused, not {self.MAX_MESSAGE_BYTES}")
        if self.REQUEST_RETENTION_HOURS < MIN_REQUEST_RETENTION_HOURS:
            raise SettingsError(f"REQUEST_RETENTION_HOURS must be at least {MIN_REQUEST_RETENTION_HOURS} (a retry "
                                f"must find its first answer for a day, SPEC §9), not {self.REQUEST_RETENTION_HOURS}")
        if bool(self.TLS_CERT_FILE) != bool(self.TLS_KEY_FILE):
            raise SettingsError("TLS_CERT_FILE and TLS_KEY_FILE go together: set both for TLS, or neither")
        if self.TLS_CLIENT_CA_FILE and not self.TLS_CERT_FILE:
            raise SettingsError("TLS_CLIENT_CA_FILE (mutual TLS) needs TLS_CERT_FILE and TLS_KEY_FILE too")
        self.zone()

    def zone(self) -> zoneinfo.ZoneInfo:
        try:
            return zoneinfo.ZoneInfo(self.TIMEZONE)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
            raise SettingsError(f"TIMEZONE {self.TIMEZONE!r} is not an IANA time zone name") from exc

    def rules(self) -> Rules:
        return Rules(default_slot_capacity=self.DEFAULT_SLOT_CAPACITY,
                     average_consultation_minutes=self.AVERAGE_CONSULTATION_MINUTES,
                     no_show_grace_period_minutes=self.NO_SHOW_GRACE_PERIOD_MINUTES,
                     max_waitlist_size=self.MAX_WAITLIST_SIZE, timezone=self.zone(),
                     event_retention_days=self.EVENT_RETENTION_DAYS,
                     request_retention_hours=self.REQUEST_RETENTION_HOURS)


def _read_file(file: str | Path) -> dict[str, Any]:
    """The file's settings by name in capitals. UTF-8, with or without the byte-order mark some editors write."""
    try:
        with open(file, "rb") as fh:
            data = fh.read()
        text = data.decode("utf-8-sig")
        if "\x00" in text:  # UTF-16 or UTF-32 without a byte-order mark: valid UTF-8, but no TOML of ours
            raise UnicodeDecodeError("utf-8", data, data.index(b"\x00"), data.index(b"\x00") + 1, "NUL")
        table = tomllib.loads(text)
    except UnicodeDecodeError as exc:
        raise SettingsError(f"cannot read settings file {file}: it is not UTF-8 text (byte {exc.start}); save it "
                            "as UTF-8") from exc
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"cannot read settings file {file}: {exc}") from exc
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key.upper() in values:  # names are read in any case: two spellings of one would leave one unsaid
            raise SettingsError(f"settings file {file} sets {key.upper()} twice (names are read in any case)")
        values[key.upper()] = value
    return values


def _refuse_unknown(unknown: set[str], names: Mapping[str, Any], prefix: str, where: str) -> None:
    """A misspelt setting would otherwise leave its default in force without a word (AUTO_NO_SHOW off, say)."""
    if not unknown:
        return
    described = []
    for key in sorted(unknown):
        near = _nearest(key.removeprefix(prefix).upper(), names)
        described.append(f"{key} (did you mean {prefix}{near}?)" if near else key)
    raise SettingsError(f"unknown settings {where}: {', '.join(described)}")


def _nearest(name: str, names: Mapping[str, Any]) -> str:
    """The setting `name` is a misspelling of, or ""."""
    near = difflib.get_close_matches(name, names, n=1, cutoff=NEAR_ENOUGH)
    return near[0] if near else ""


def _check_address(name: str, address: str) -> None:
    """HOST:PORT, an IPv6 host in brackets, a port from 0 (any free one) to 65535. gRPC reads a port out of range
    modulo 65536 and a missing one as 443, so either would serve somewhere the operator did not say."""
    host, colon, port = address.rpartition(":")
    if not colon or not port.isdigit() or int(port) > 65535 or (":" in host and not
                                                                (host.startswith("[") and host.endswith("]"))):
        raise SettingsError(f"{name} must be HOST:PORT with a port from 0 to 65535 (e.g. 127.0.0.1:50051 or "
                            f"[::1]:50051), not {address!r}")


def _convert(name: str, kind: Any, value: Any) -> Any:
    kind = {"int": int, "bool": bool, "str": str, "float": float}.get(kind, kind) if isinstance(kind, str) else kind
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise SettingsError(f"{name} must be true or false, not {value!r}")
    if kind is int:
        if isinstance(value, (bool, float)):  # int(2.5) would silently answer 2
            raise SettingsError(f"{name} must be a whole number, not {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise SettingsError(f"{name} must be a whole number, not {value!r}") from None
    if kind is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise SettingsError(f"{name} must be a number, not {value!r}") from None
    return str(value)


def _database_url(url: str) -> str:
    """DATABASE_URL as SQLAlchemy takes it. `postgresql://` (or `postgres://`) alone names a driver (psycopg2) this
    project does not install: it means psycopg 3, which it does. Other databases are refused here, by name, rather
    than by a missing driver's traceback."""
    if not url.strip():
        raise SettingsError("DATABASE_URL is empty: leave it out for the default (sqlite:///opd.db), or give "
                            "sqlite:///FILE or postgresql://USER@HOST/DATABASE")
    try:
        parsed = sqlalchemy.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        return url  # the store says it cannot parse it, with the URL
    if parsed.drivername in ("postgresql", "postgres"):  # postgres:// is libpq's and many hosts' spelling
        return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    if parsed.drivername not in ("sqlite", "sqlite+pysqlite", "postgresql+psycopg"):
        raise SettingsError(f"DATABASE_URL: {parsed.drivername}:// is not a database this server runs on; give "
                            "sqlite:///FILE or postgresql://USER@HOST/DATABASE")
    return url
