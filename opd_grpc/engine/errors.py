"""Refusals of the engine: each says what went wrong, for whom to fix, and why (a reason code).

The servicer maps each kind to a gRPC status code (SPEC §12); the engine knows nothing of gRPC.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


@dataclass
class EngineError(Exception):
    """A refused request: nothing was changed."""

    message: str
    reason: str
    violations: list[FieldViolation] = field(default_factory=list)
    # what a program needs to act on the refusal (ErrorInfo's metadata): the token a duplicate patient holds
    metadata: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message


class InvalidArgument(EngineError):
    """Malformed or missing input."""

    def __init__(self, violations: list[FieldViolation], reason: str = "INVALID_ARGUMENT"):
        text = "; ".join(f"{v.field}: {v.description}" for v in violations)
        super().__init__(f"Invalid request: {text}", reason, violations)


class NotFound(EngineError):
    """An unknown doctor, slot or token."""


class AlreadyExists(EngineError):
    """A duplicate patient token or an overlapping slot."""


class FailedPrecondition(EngineError):
    """The request is well formed but the state does not allow it now."""


class ResourceExhausted(EngineError):
    """A bounded resource is full."""


class OutOfRange(EngineError):
    """A watch would start outside the kept event history."""


class Aborted(EngineError):
    """A watch that fell too far behind: the client resumes from its last sequence."""


class Unavailable(EngineError):
    """The server is going away: the client retries, elsewhere if it can."""


@dataclass
class Unauthenticated(EngineError):
    """No API key, or one that is unknown or revoked (SPEC §13). `presented` says, for the audit log only (the caller
    is told no more than the message), which key id a well-formed key named and why it failed."""

    presented: str = ""


class PermissionDenied(EngineError):
    """The key's role may not make this call (SPEC §13)."""


def invalid(field_name: str, description: str, reason: str = "INVALID_ARGUMENT") -> InvalidArgument:
    return InvalidArgument([FieldViolation(field_name, description)], reason)


class Conflict(Exception):
    """Not a refusal: the unit of work lost a race with another process's (both inserted one key, a deadlock, a
    dropped connection before the commit) and changed nothing. The service runs it again."""


def encode_refusal(error: EngineError) -> str:
    """A refusal as text, to be stored with its request_id and replayed (SPEC §9)."""
    return json.dumps({"kind": type(error).__name__, "message": error.message, "reason": error.reason,
                       "violations": [[v.field, v.description] for v in error.violations],
                       "metadata": error.metadata})


def decode_refusal(text: str) -> EngineError:
    data = json.loads(text)
    error = EngineError.__new__(_REFUSALS[data["kind"]])
    EngineError.__init__(error, data["message"], data["reason"], [FieldViolation(*v) for v in data["violations"]],
                         data.get("metadata", {}))  # refusals stored before it had none
    return error


_REFUSALS = {kind.__name__: kind for kind in (InvalidArgument, NotFound, AlreadyExists, FailedPrecondition,
                                              ResourceExhausted, OutOfRange, Aborted)}
