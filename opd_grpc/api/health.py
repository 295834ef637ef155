"""grpc.health.v1.Health, whose Watch streams end once the server begins its graceful stop."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio


class HealthServicer(health_aio.HealthServicer):
    """The stock asyncio servicer (Check, set, enter_graceful_shutdown) with its own Watch. The stock Watch waits
    for a next change forever, even after `enter_graceful_shutdown`, and gRPC's stop waits for that stream
    through the whole grace: every deploy behind a load balancer that watches health would take all of it. This
    Watch sends each change, and once graceful shutdown has begun sends the status then (NOT_SERVING) and ends,
    OK. It reads the stock class's private `_server_status` (tests/e2e/test_shutdown.py and
    tests/unit/test_health.py pin what it sends)."""

    def __init__(self) -> None:
        super().__init__()
        self._changed = asyncio.Event()  # set, and replaced by a fresh one, when a status changes
        self._final = False  # graceful shutdown has begun and its statuses are in place: none changes again

    async def set(self, service: str, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        await super().set(service, status)
        self._wake_watchers()

    async def enter_graceful_shutdown(self) -> None:
        await super().enter_graceful_shutdown()
        self._final = True
        self._wake_watchers()

    def _wake_watchers(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        sent = None
        while True:
            changed, final = self._changed, self._final  # taken with the status: a change during the write wakes
            status = self._server_status.get(request.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            if status != sent:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                sent = status
            if final:
                return
            await changed.wait()
