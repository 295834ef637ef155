"""The gRPC server: the OPD service, health, reflection (always on), the test clock (only when asked for),
and a graceful stop on SIGTERM/SIGINT: health goes NOT_SERVING, then calls in flight get a grace period."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import threading

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from opd_grpc._gen.opd.v1 import opd_pb2, opd_pb2_grpc, test_clock_pb2, test_clock_pb2_grpc
from opd_grpc.api.interceptors import MalformedRequestInterceptor
from opd_grpc.api.runner import EngineRunner
from opd_grpc.api.servicer import OPDTokenServicer
from opd_grpc.api.test_clock import TestClockServicer
from opd_grpc.engine.clock import Clock, TestClock, WallClock
from opd_grpc.engine.service import OPDService
from opd_grpc.engine.watch import QueueWatch
from opd_grpc.settings import Settings
from opd_grpc.storage import schema
from opd_grpc.storage.notify import QueueNotifications
from opd_grpc.storage.store import SqlStore

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_SECONDS = 10.0
AUTO_NO_SHOW_INTERVAL_SECONDS = 1.0
GC_FREEZE_SECONDS = 5.0
GC_THAW_SECONDS = 600.0
PRUNE_INTERVAL_SECONDS = 3600.0
OPD_SERVICE = opd_pb2.DESCRIPTOR.services_by_name["OPDTokenService"].full_name
TEST_CLOCK_SERVICE = test_clock_pb2.DESCRIPTOR.services_by_name["TestClockService"].full_name


class OPDServer:
    """One server process's parts, built from settings; `start()` binds and answers the bound port.

    The database's schema is checked first (storage/schema.py): a brand-new empty database gets the schema at
    head, so a fresh clone and every test need no extra step; an older schema is upgraded only with `migrate`
    (`--migrate`), otherwise, like a schema this server does not know, it raises `SchemaMismatch`."""

    def __init__(self, settings: Settings, migrate: bool = False):
        self.settings = settings
        self.clock: Clock = TestClock() if settings.TEST_CLOCK else WallClock()
        self.store = SqlStore(settings.DATABASE_URL)
        try:
            schema.prepare(self.store.engine, migrate)
        except BaseException:
            self.store.close()
            raise
        self.service = OPDService(self.store, self.clock, settings.rules())
        self.run = EngineRunner(threads=0 if self.store.is_sqlite else 8)
        self.notifications: QueueNotifications | None = None
        if not self.store.is_sqlite:  # other replicas' changes wake this one's watchers, and the other way round
            hub = self.service.events
            self.notifications = QueueNotifications(self.store.engine, hub.remote_change, hub.catch_up_soon)
            hub.announce = self.notifications.send
        self.health = health_aio.HealthServicer()
        self.server = grpc.aio.server(maximum_concurrent_rpcs=settings.MAX_CONCURRENT_CALLS,
                                      interceptors=[MalformedRequestInterceptor()])
        watch = QueueWatch(self.service, self.run, settings.WATCH_HEARTBEAT_SECONDS, settings.WATCH_BUFFER_EVENTS)
        opd_pb2_grpc.add_OPDTokenServiceServicer_to_server(OPDTokenServicer(self.service, self.run, watch),
                                                           self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        services = [OPD_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                    reflection.SERVICE_NAME]
        if isinstance(self.clock, TestClock):
            test_clock_pb2_grpc.add_TestClockServiceServicer_to_server(TestClockServicer(self.clock), self.server)
            services.append(TEST_CLOCK_SERVICE)
        reflection.enable_server_reflection(services, self.server)
        self._background: list[asyncio.Task[None]] = []
        self._pruning: asyncio.Future[tuple[int, int]] | None = None  # a pruning pass, on a thread of its own
        self._stop_pruning = threading.Event()
        self.port = 0

    async def start(self) -> int:
        self.service.events.bind(asyncio.get_running_loop())
        if self.notifications is not None:
            self.notifications.start()
        self.port = self.server.add_insecure_port(self.settings.LISTEN)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.settings.LISTEN}")
        await self.server.start()
        for name in ("", OPD_SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.settings.AUTO_NO_SHOW:
            self._background.append(asyncio.create_task(self._auto_no_show()))
        self._background.append(asyncio.create_task(_keep_full_collections_short()))
        self._background.append(asyncio.create_task(self._prune_history()))
        self._background.append(asyncio.create_task(self.service.events.catch_up_forever(
            lambda key, after, limit: self.run(self.service.events_after, key, after, limit),
            lambda keys: self.run(self.service.last_sequences, keys), self.settings.WATCH_CATCH_UP_SECONDS)))
        return self.port

    async def stop(self, grace: float = SHUTDOWN_GRACE_SECONDS) -> None:
        await self.health.enter_graceful_shutdown()
        self._stop_pruning.set()
        for task in self._background:
            task.cancel()
        self.service.events.close()  # watchers are told to reconnect; calls in flight get the grace period
        await self.server.stop(grace)
        self.run.shutdown()
        if self._pruning is not None:  # told to stop, it ends after the batch in hand
            await asyncio.wait([self._pruning])
        if self.notifications is not None:  # after the last change: its notification goes out too
            await asyncio.to_thread(self.notifications.stop)
        self.store.close()

    async def _auto_no_show(self) -> None:
        """SPEC §6 with AUTO_NO_SHOW: confirmed patients past their grace period are marked no-show."""
        while True:
            await asyncio.sleep(AUTO_NO_SHOW_INTERVAL_SECONDS)
            try:
                marked = await self.run(self.service.mark_overdue_no_shows)
                if marked:
                    log.info("auto no-show marked %d tokens", marked)
            except Exception:
                log.exception("auto no-show pass failed; it runs again shortly")

    async def _prune_history(self) -> None:
        """Queue events and stored requests past their retention (settings) are deleted at start and then every
        hour, on a thread of their own: a pass deletes in small transactions with pauses between them, so it
        neither holds the event loop (where SQLite's engine calls run) nor makes a change wait long."""
        while True:
            self._pruning = asyncio.ensure_future(asyncio.to_thread(self.service.prune_history,
                                                                    self._stop_pruning))
            try:
                events, requests = await asyncio.shield(self._pruning)  # stop() waits for the pass itself
                if events or requests:
                    log.info("pruned %d queue events and %d stored requests past their retention", events, requests)
            except Exception:
                log.exception("pruning history failed; it runs again in an hour")
            await asyncio.sleep(PRUNE_INTERVAL_SECONDS)


async def _keep_full_collections_short() -> None:
    """A full garbage collection walks every object the server holds (its cached days: 50-100 ms at 100 MiB),
    and every call and stream waits for it. Objects that have lived a few seconds are frozen out of those walks
    (reference counting still frees them); every ten minutes they are thawed and collected once, so that a
    reference cycle among them is freed too."""
    frozen_for = 0.0
    while True:
        await asyncio.sleep(GC_FREEZE_SECONDS)
        frozen_for += GC_FREEZE_SECONDS
        if frozen_for >= GC_THAW_SECONDS:
            gc.unfreeze()
            gc.collect()
            frozen_for = 0.0
        gc.freeze()


async def serve(settings: Settings, migrate: bool = False) -> None:
    server = OPDServer(settings, migrate)
    port = await server.start()
    host = settings.LISTEN.rsplit(":", 1)[0]
    print(f"opd-grpc listening on {host}:{port} (database {server.store.url.render_as_string()})", flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    print("opd-grpc stopping: finishing calls in flight", flush=True)
    await server.stop()
