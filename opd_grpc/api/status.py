"""Refusals as rich gRPC statuses (SPEC §12): a code, a message for a person, `google.rpc.ErrorInfo`
(reason, domain `opd.v1`) and, for field problems, `google.rpc.BadRequest`."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from opd_grpc.engine import errors

DOMAIN = "opd.v1"

_CODES: dict[type[errors.EngineError], int] = {
    errors.InvalidArgument: code_pb2.INVALID_ARGUMENT,
    errors.NotFound: code_pb2.NOT_FOUND,
    errors.AlreadyExists: code_pb2.ALREADY_EXISTS,
    errors.FailedPrecondition: code_pb2.FAILED_PRECONDITION,
    errors.ResourceExhausted: code_pb2.RESOURCE_EXHAUSTED,
    errors.OutOfRange: code_pb2.OUT_OF_RANGE,
    errors.Aborted: code_pb2.ABORTED,
    errors.Unavailable: code_pb2.UNAVAILABLE,
    errors.Unauthenticated: code_pb2.UNAUTHENTICATED,
    errors.PermissionDenied: code_pb2.PERMISSION_DENIED,
}


def rich_status(code: int, message: str, reason: str, violations: list[errors.FieldViolation] | None = None,
                metadata: dict[str, str] | None = None) -> grpc.Status:
    details = [error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata)]
    if violations:
        details.append(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in violations]))
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    return rpc_status.to_status(status_pb2.Status(code=code, message=message, details=packed))


def from_engine_error(error: errors.EngineError) -> grpc.Status:
    return rich_status(_CODES[type(error)], error.message, error.reason, error.violations, error.metadata)
