"""The health servicer (opd_grpc/api/health.py) alone on a grpc.aio server on a loopback port: a Watch follows each
change, and once graceful shutdown has begun it is sent the status then and ends OK, however it was opened; Check
and set are the stock ones. Its Watch reads the stock servicer's private `_server_status`: these tests notice if
grpcio-health-checking changes it."""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from opd_grpc.api.health import HealthServicer

pytestmark = pytest.mark.backend_independent

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
OPD = "opd.v1.OPDTokenService"
UNKNOWN = "no.such.Service"
READ_TIMEOUT = 5.0  # a stream that sends nothing more, nor ends, fails the test rather than hanging it


@contextlib.asynccontextmanager
async def serving() -> AsyncIterator[tuple[HealthServicer, health_pb2_grpc.HealthStub]]:
    servicer = HealthServicer()
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield servicer, health_pb2_grpc.HealthStub(channel)
    finally:
        await server.stop(None)


async def next_status(call: grpc.aio.UnaryStreamCall) -> int:
    answer = await asyncio.wait_for(call.read(), READ_TIMEOUT)
    assert answer is not grpc.aio.EOF, f"the stream ended with {await call.code()}"
    return answer.status


async def to_the_end(call: grpc.aio.UnaryStreamCall) -> tuple[list[str], grpc.StatusCode]:
    """The statuses still to come, by name, and the stream's status code; fails if it does not end."""
    statuses = []
    while (answer := await asyncio.wait_for(call.read(), READ_TIMEOUT)) is not grpc.aio.EOF:
        statuses.append(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))
    return statuses, await call.code()


def test_a_watch_follows_each_change_then_gets_the_final_status_and_ends_ok_at_graceful_shutdown():
    async def run() -> dict[str, tuple[list[str], grpc.StatusCode]]:
        async with serving() as (servicer, stub):
            await servicer.set(OPD, SERVING)
            calls = {name: stub.Watch(health_pb2.HealthCheckRequest(service=name)) for name in ("", OPD, UNKNOWN)}
            assert [await next_status(calls[name]) for name in ("", OPD, UNKNOWN)] == \
                [SERVING, SERVING, SERVICE_UNKNOWN]
            await servicer.set(OPD, NOT_SERVING)
            assert await next_status(calls[OPD]) == NOT_SERVING
            await servicer.set(OPD, SERVING)
            assert await next_status(calls[OPD]) == SERVING
            await servicer.set(OPD, NOT_SERVING)  # already NOT_SERVING when the stop begins: nothing more to send
            assert await next_status(calls[OPD]) == NOT_SERVING
            await servicer.enter_graceful_shutdown()
            return {name: await to_the_end(call) for name, call in calls.items()}

    assert asyncio.run(run()) == {"": (["NOT_SERVING"], grpc.StatusCode.OK), OPD: ([], grpc.StatusCode.OK),
                                  UNKNOWN: ([], grpc.StatusCode.OK)}


def test_after_graceful_shutdown_a_new_watch_gets_not_serving_and_ends_ok_and_check_and_set_are_the_stock_ones():
    async def run() -> tuple[tuple[list[str], grpc.StatusCode], int, grpc.StatusCode]:
        async with serving() as (servicer, stub):
            await servicer.set(OPD, SERVING)
            await servicer.enter_graceful_shutdown()
            await servicer.set(OPD, SERVING)  # ignored from now on
            watch = await to_the_end(stub.Watch(health_pb2.HealthCheckRequest(service=OPD)))
            checked = (await stub.Check(health_pb2.HealthCheckRequest(service=OPD))).status
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await stub.Check(health_pb2.HealthCheckRequest(service=UNKNOWN))
            return watch, checked, unknown.value.code()

    assert asyncio.run(run()) == ((["NOT_SERVING"], grpc.StatusCode.OK), NOT_SERVING, grpc.StatusCode.NOT_FOUND)
