"""The schema. The invariants a database can hold are held here too (SPEC §3): a unique token number per
doctor-day, one active token per patient per doctor-day, a unique event sequence per doctor-day, a positive
capacity. Dates are `YYYY-MM-DD` and times `HH:MM` text, as the API speaks them; instants are ISO-8601 UTC
text with microseconds (`2030-01-07T09:00:00.000000+00:00`), which sorts in time order on every backend and
needs no conversion layer on the hot path.

A change here needs a revision in opd_grpc/storage/migrations (`alembic revision --autogenerate -m "…"`, then
read it): tests/unit/test_migrations.py fails while the two differ."""

from __future__ import annotations

from sqlalchemy import (
    DDL, BigInteger, CheckConstraint, ForeignKey, Index, Integer, LargeBinary, String, Text, UniqueConstraint, event,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

Instant = String(32)
# Tables keyed by text keep their rows in the key's B-tree on SQLite (one tree less to write per change).
WITHOUT_ROWID = {"sqlite_with_rowid": False}


class Base(DeclarativeBase):
    pass


ACTIVE_STATUSES = "('CONFIRMED', 'WAITLISTED', 'CHECKED_IN', 'CALLED')"


class DoctorRow(Base):
    __tablename__ = "doctors"
    doctor_id: Mapped[str] = mapped_column(String(16), primary_key=True)
    number: Mapped[int] = mapped_column(Integer, unique=True)
    name: Mapped[str] = mapped_column(String(200))
    specialization: Mapped[str] = mapped_column(String(200))


class DoctorDayRow(Base):
    """One doctor's date: the row that is locked for its changes, and the counters of §3.4 and §3.6."""

    __tablename__ = "doctor_days"
    doctor_id: Mapped[str] = mapped_column(ForeignKey("doctors.doctor_id"), primary_key=True)
    date: Mapped[str] = mapped_column(String(10), primary_key=True)
    last_token_number: Mapped[int] = mapped_column(Integer, default=0)
    last_sequence: Mapped[int] = mapped_column(BigInteger, default=0)
    __table_args__ = (WITHOUT_ROWID,)


class SlotRow(Base):
    __tablename__ = "slots"
    slot_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    doctor_id: Mapped[str] = mapped_column(String(16))
    date: Mapped[str] = mapped_column(String(10))
    start_time: Mapped[str] = mapped_column(String(5))
    end_time: Mapped[str] = mapped_column(String(5))
    max_capacity: Mapped[int] = mapped_column(Integer)
    consultation_minutes: Mapped[int] = mapped_column(Integer)
    __table_args__ = (
        CheckConstraint("max_capacity > 0", name="slot_capacity_positive"),
        CheckConstraint("consultation_minutes > 0", name="slot_consultation_positive"),
        CheckConstraint("end_time > start_time", name="slot_ends_after_start"),
        UniqueConstraint("doctor_id", "date", "start_time", name="slot_start_unique"),
        WITHOUT_ROWID,
    )


class TokenRow(Base):
    __tablename__ = "tokens"
    token_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    token_number: Mapped[int] = mapped_column(Integer)
    doctor_id: Mapped[str] = mapped_column(String(16))
    date: Mapped[str] = mapped_column(String(10))
    slot_id: Mapped[str] = mapped_column(ForeignKey("slots.slot_id"))
    source: Mapped[str] = mapped_column(String(20))
    status: Mapped[str] = mapped_column(String(20))
    patient_identity: Mapped[str] = mapped_column(String(300))
    patient_name: Mapped[str] = mapped_column(String(200))
    patient_phone: Mapped[str] = mapped_column(String(40))
    patient_age: Mapped[int] = mapped_column(Integer)
    patient_gender: Mapped[str] = mapped_column(String(10))
    patient_mrn: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[str] = mapped_column(Instant)
    updated_at: Mapped[str] = mapped_column(Instant)
    checked_in_at: Mapped[str | None] = mapped_column(Instant)
    called_at: Mapped[str | None] = mapped_column(Instant)
    completed_at: Mapped[str | None] = mapped_column(Instant)
    bump_count: Mapped[int] = mapped_column(Integer, default=0)
    __table_args__ = (
        UniqueConstraint("doctor_id", "date", "token_number", name="token_number_unique"),
        Index("one_active_token_per_patient", "doctor_id", "date", "patient_identity", unique=True,
              sqlite_where=text(f"status IN {ACTIVE_STATUSES}"),
              postgresql_where=text(f"status IN {ACTIVE_STATUSES}")),
        WITHOUT_ROWID,
    )


class QueueEventRow(Base):
    """SPEC §3.6: one row per change, keyed by its gapless sequence within the doctor's date."""

    __tablename__ = "queue_events"
    doctor_id: Mapped[str] = mapped_column(String(16), primary_key=True)
    date: Mapped[str] = mapped_column(String(10), primary_key=True)
    sequence: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(20))
    token_id: Mapped[str] = mapped_column(String(40))
    token_number: Mapped[int] = mapped_column(Integer)
    slot_id: Mapped[str] = mapped_column(String(40))
    status: Mapped[str] = mapped_column(String(20))
    caused_by_token_id: Mapped[str] = mapped_column(String(40))
    occurred_at: Mapped[str] = mapped_column(Instant)
    __table_args__ = (WITHOUT_ROWID,)


class SlotTemplateRow(Base):
    """A doctor's weekly pattern of slots (ApplySlotTemplate expands it): a row per slot, by ISO weekday (1 Monday
    … 7 Sunday) and start. Capacity and minutes left NULL take the settings' defaults when the pattern is applied."""

    __tablename__ = "slot_templates"
    doctor_id: Mapped[str] = mapped_column(ForeignKey("doctors.doctor_id"), primary_key=True)
    weekday: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    start_time: Mapped[str] = mapped_column(String(5), primary_key=True)
    end_time: Mapped[str] = mapped_column(String(5))
    max_capacity: Mapped[int | None] = mapped_column(Integer)
    consultation_minutes: Mapped[int | None] = mapped_column(Integer)
    __table_args__ = (
        CheckConstraint("weekday BETWEEN 1 AND 7", name="template_weekday_iso"),
        CheckConstraint("end_time > start_time", name="template_ends_after_start"),
        CheckConstraint("max_capacity > 0", name="template_capacity_positive"),
        CheckConstraint("consultation_minutes > 0", name="template_consultation_positive"),
        WITHOUT_ROWID,
    )


class HolidayRow(Base):
    """A date on which the OPD is closed: ApplySlotTemplate makes no slot on it."""

    __tablename__ = "holidays"
    date: Mapped[str] = mapped_column(String(10), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    __table_args__ = (WITHOUT_ROWID,)


class NoShowSweepRow(Base):
    """How far AUTO_NO_SHOW has got, so that a restarted server does not load and lock every past day that still
    holds a confirmed token it leaves alone: the service clock's date of the last pass that had no earlier days left
    to look at. One row, made by the migration."""

    __tablename__ = "no_show_sweep"
    sweep_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    swept_to: Mapped[str | None] = mapped_column(String(10))
    __table_args__ = (CheckConstraint("sweep_id = 1", name="no_show_sweep_one_row"),)


class StoredRequestRow(Base):
    """SPEC §9: the first answer to each request_id, kept REQUEST_RETENTION_HOURS. A rowid table: its rows (a
    whole reply) are too large for SQLite's WITHOUT ROWID layout, which is meant for small rows."""

    __tablename__ = "stored_requests"
    request_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    method: Mapped[str] = mapped_column(String(40))
    fingerprint: Mapped[bytes] = mapped_column(LargeBinary)
    response: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[str] = mapped_column(Instant)
    refusal: Mapped[str | None] = mapped_column(Text)  # a refusal that was the first answer, as JSON
    __table_args__ = (Index("stored_requests_by_age", "created_at"),)  # pruning reads only the old ones


class ApiKeyRow(Base):
    """SPEC §13: a bearer key with one role. Only the SHA-256 of its secret is kept (the secret is 256 random
    bits, so a plain hash is as strong as a slow one and costs a microsecond per call)."""

    __tablename__ = "api_keys"
    key_id: Mapped[str] = mapped_column(String(16), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(20))
    secret_sha256: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[str] = mapped_column(Instant)
    revoked_at: Mapped[str | None] = mapped_column(Instant)


class AuditRow(Base):
    """SPEC §13: the append-only audit log: one row per committed change (written in its transaction) and one
    per denied attempt. No patient details: the token id says which patient, to those who may look it up."""

    __tablename__ = "audit_log"
    entry_id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                          autoincrement=True)
    occurred_at: Mapped[str] = mapped_column(Instant)
    outcome: Mapped[str] = mapped_column(String(10))  # CHANGED or DENIED
    key_id: Mapped[str] = mapped_column(String(16))
    role: Mapped[str] = mapped_column(String(20))
    method: Mapped[str] = mapped_column(String(40))
    request_id: Mapped[str] = mapped_column(String(36))
    token_id: Mapped[str] = mapped_column(String(40))
    from_status: Mapped[str] = mapped_column(String(20))
    to_status: Mapped[str] = mapped_column(String(20))
    reason: Mapped[str] = mapped_column(Text)
    __table_args__ = (Index("audit_by_time", "occurred_at"), Index("audit_by_token", "token_id"))


# Append-only in the database itself, not only by the code's good manners: an UPDATE or DELETE of a row fails.
# (Revisions 0004 and 0006 make the same triggers; tests/unit/test_migrations.py checks that they agree.)
for _action in ("UPDATE", "DELETE"):
    event.listen(AuditRow.__table__, "after_create", DDL(
        f"CREATE TRIGGER audit_log_no_{_action.lower()} BEFORE {_action} ON audit_log "
        "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END").execute_if(dialect="sqlite"))
# SQLite's INSERT OR REPLACE deletes the row it replaces without firing DELETE triggers: refuse an insert that
# names a row already there. (On PostgreSQL, ON CONFLICT DO UPDATE fires the UPDATE trigger.)
AUDIT_NO_REPLACE = ("CREATE TRIGGER audit_log_no_replace BEFORE INSERT ON audit_log "
                    "WHEN EXISTS (SELECT 1 FROM audit_log WHERE entry_id = NEW.entry_id) "
                    "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END")
event.listen(AuditRow.__table__, "after_create", DDL(AUDIT_NO_REPLACE).execute_if(dialect="sqlite"))
event.listen(AuditRow.__table__, "after_create", DDL(
    "CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS "
    "$$ BEGIN RAISE EXCEPTION 'audit_log is append-only'; END $$").execute_if(dialect="postgresql"))
event.listen(AuditRow.__table__, "after_create", DDL(
    "CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log "
    "FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()").execute_if(dialect="postgresql"))
event.listen(AuditRow.__table__, "after_create", DDL(
    "CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log "
    "FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only()").execute_if(dialect="postgresql"))
event.listen(AuditRow.__table__, "after_drop", DDL(
    "DROP FUNCTION IF EXISTS audit_log_append_only()").execute_if(dialect="postgresql"))
