"""Server interceptors: the place for what every call goes through (auth joins here later)."""

from __future__ import annotations

from typing import Any, Awaitable, Callable

import grpc
from google.protobuf.message import DecodeError

from opd_grpc.api.status import rich_status

_INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Bytes that do not parse as the method's request (bad wire data, a string that is not UTF-8) are
    INVALID_ARGUMENT with a reason (SPEC §12); left to gRPC they would be UNKNOWN with an internal message."""

    def __init__(self) -> None:
        self._wrapped: dict[str, Any] = {}  # method -> its wrapped handler, built on its first call

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        wrapped = self._wrapped.get(details.method)
        if wrapped is None:
            handler = await continuation(details)
            if handler is None:  # an unknown method: gRPC answers UNIMPLEMENTED; nothing is kept for it
                return None
            wrapped = self._wrapped[details.method] = _wrap(details.method, handler)
        return wrapped


def _wrap(method: str, handler: Any) -> Any:
    if handler.request_deserializer is None or handler.request_streaming:
        return handler
    parse = handler.request_deserializer

    async def parsed(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            return parse(raw)
        except (DecodeError, UnicodeDecodeError) as error:
            await context.abort_with_status(rich_status(
                _INVALID_ARGUMENT, f"The request is not a valid message for {method}: {error}. Send the "
                "method's request message, with strings in UTF-8.", "MALFORMED_REQUEST"))

    if handler.unary_unary is not None:
        inner = handler.unary_unary

        async def unary_unary(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            return await inner(await parsed(raw, context), context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, response_serializer=handler.response_serializer)
    inner_stream = handler.unary_stream

    async def unary_stream(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        async for item in inner_stream(await parsed(raw, context), context):
            yield item

    return grpc.unary_stream_rpc_method_handler(unary_stream, response_serializer=handler.response_serializer)
