"""The gRPC server: the OPD service, health, reflection (always on), the test clock (only when asked for),
and a graceful stop on SIGTERM/SIGINT: health goes NOT_SERVING (and its Watch streams end), then calls in flight
get a grace period."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from opd_grpc._gen.opd.v1 import opd_pb2, opd_pb2_grpc, test_clock_pb2, test_clock_pb2_grpc
from opd_grpc.api import auth, limits, observe, tls
from opd_grpc.api.health import HealthServicer
from opd_grpc.api.interceptors import CallPipeline
from opd_grpc.api.runner import EngineRunner
from opd_grpc.api.servicer import OPDTokenServicer
from opd_grpc.api.test_clock import TestClockServicer
from opd_grpc.engine.clock import Clock, TestClock, WallClock
from opd_grpc.engine.service import OPDService
from opd_grpc.engine.watch import QueueWatch
from opd_grpc.engine.access import Actor
from opd_grpc.engine.errors import EngineError, Unauthenticated, Unavailable
from opd_grpc.settings import Settings, SettingsError
from opd_grpc.storage import schema
from opd_grpc.storage.notify import QueueNotifications
from opd_grpc.storage.store import SqlStore

log = logging.getLogger(__name__)

AUTO_NO_SHOW_INTERVAL_SECONDS = 1.0
# Health asks the database this often, and counts an answer slower than this as none.
DATABASE_CHECK_SECONDS = 1.0
# WatchQueue streams end (DATABASE_UNAVAILABLE) once this many checks in a row have failed.
WATCHES_END_AFTER_FAILED_CHECKS = 2
GC_FREEZE_SECONDS = 5.0
GC_THAW_SECONDS = 600.0
PRUNE_INTERVAL_SECONDS = 3600.0
# A stop first holds new calls (api/interceptors.py) until the calls admitted are done and none has arrived for
# DRAIN_QUIET_SECONDS, for at most DRAIN_MAX_SECONDS of the grace; then gRPC's own stop, then the held calls are
# refused UNAVAILABLE. The quiet is long enough for a busy client to send the next call of one just answered: a
# call that reaches gRPC after its stop has begun, before the client has the GOAWAY, is ended CANCELLED by gRPC
# itself (grpc/grpc#41785), which no client retries. With 20 ms, one run of the suite on a loaded machine saw 4
# calls end so.
DRAIN_QUIET_SECONDS = 0.1
DRAIN_MAX_SECONDS = 1.0
# Keepalive (gRPC core's doc/keepalive.md). A client whose path died in silence (a board unplugged, a NAT that
# forgot the flow: no RST) would keep its calls, and a WatchQueue stream its MAX_WATCHERS place, until TCP gives up,
# minutes to hours later. The server pings a connection that has sent nothing for KEEPALIVE_PING_SECONDS and closes
# it if no ack comes within KEEPALIVE_ACK_SECONDS: a dead client is dropped in about 30 s. Read when a server is
# built (`_keepalive_options`).
KEEPALIVE_PING_SECONDS = 20.0  # a ping per quiet connection every 20 s costs nothing; a live client answers at once
KEEPALIVE_ACK_SECONDS = 10.0  # an ack takes one round trip: no ack in 10 s is a dead path, not a slow one
# Clients may ping this often while a call is open (clients/library.py pings every 10 s). A client that pings more
# often is a "strike"; after two, the server sends GOAWAY "too_many_pings" and every call on the connection ends,
# so a board would reconnect for nothing. Half the library's interval leaves room for timer jitter.
CLIENT_PING_MIN_SECONDS = 5.0
# Past SHUTDOWN_GRACE_SECONDS, what is left of a stop (the engine's threads, the notifications' connection, the
# database's pool) gets this long to close. A database that stopped answering holds threads that nothing can stop,
# and Python waits for them at exit: past this, the process leaves them (`_exit_if_stop_hangs`).
STOP_MARGIN_SECONDS = 3.0
# The exit code of a stop that had to leave threads waiting on the database.
STOP_ABANDONED_EXIT_CODE = 1
OPD_SERVICE = opd_pb2.DESCRIPTOR.services_by_name["OPDTokenService"].full_name
TEST_CLOCK_SERVICE = test_clock_pb2.DESCRIPTOR.services_by_name["TestClockService"].full_name


class OPDServer:
    """One server process's parts, built from settings; `start()` binds and answers the bound port.

    The database's schema is checked first (storage/schema.py): a brand-new empty database gets the schema at
    head, so a fresh clone and every test need no extra step; an older schema is upgraded only with `migrate`
    (`--migrate`), otherwise, like a schema this server does not know, it raises `SchemaMismatch`."""

    def __init__(self, settings: Settings, migrate: bool = False):
        self.settings = settings
        if settings.TEST_CLOCK and not tls.is_loopback(settings.LISTEN):
            raise SettingsError(f"TEST_CLOCK is on and LISTEN {settings.LISTEN} is reachable from other machines: a "
                                "test clock moves every clinic's day for whoever calls SetTime, so it serves on a "
                                "loopback address only (127.0.0.1, [::1], localhost), for tests and the simulation "
                                "(SPEC §8: never in production)")
        self.credentials = tls.server_credentials(settings)  # its files are checked before the database is touched
        self.clock: Clock = TestClock() if settings.TEST_CLOCK else WallClock()
        self.store = SqlStore(settings.DATABASE_URL)
        try:
            schema.prepare(self.store.engine, migrate)
        except BaseException:
            self.store.close()
            raise
        self.service = OPDService(self.store, self.clock, settings.rules())
        self.gate = auth.Gate(self.service.key_ring())
        if not self.gate.keys.required and not tls.is_loopback(settings.LISTEN):
            self.store.close()
            raise SettingsError(f"LISTEN {settings.LISTEN} is reachable from other machines, and this database has "
                                "no API keys: make one first (`opd-grpc keys add --role admin --name <who>`), or "
                                "listen on 127.0.0.1 for development (SPEC §13)")
        self.run = EngineRunner(threads=0 if self.store.is_sqlite else 8)
        self.notifications: QueueNotifications | None = None
        if not self.store.is_sqlite:  # other replicas' changes wake this one's watchers, and the other way round
            hub = self.service.events
            self.notifications = QueueNotifications(self.store.engine, hub.remote_change, hub.catch_up_soon)
            hub.announce = self.notifications.send
        self.health = HealthServicer()
        self.audited_denials = limits.RateLimiter(settings.AUDITED_DENIALS_PER_PEER)
        self.pipeline = CallPipeline(self.gate, limits.RateLimiter(settings.RATE_LIMIT_PER_KEY),
                                     limits.calls_in_flight(settings.MAX_CONCURRENT_CALLS),
                                     limits.watchers(settings.MAX_WATCHERS), settings.MAX_MESSAGE_BYTES,
                                     self._record_denied, self._finished)
        self.metrics = observe.Metrics(self.service.waitlist_lengths, lambda: self.pipeline.watchers.count)
        self.service.events.listeners.append(self.metrics.queue_events)
        # gRPC's own caps sit above the pipeline's (which answer with a reason, SPEC §12), with room for the calls
        # being refused and for health checks: they only stop what gets past the pipeline's.
        self.server = grpc.aio.server(
            maximum_concurrent_rpcs=settings.MAX_CONCURRENT_CALLS + settings.MAX_WATCHERS
            + max(64, settings.MAX_CONCURRENT_CALLS // 10),
            interceptors=[self.pipeline],
            options=[("grpc.max_receive_message_length", 2 * settings.MAX_MESSAGE_BYTES),
                     # gRPC's default, SO_REUSEPORT, lets a second server bind the port in use and take a share of
                     # the callers: the port is this server's alone, or it does not start (tls.bind).
                     ("grpc.so_reuseport", 0), *_keepalive_options()])
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
        self.metrics_port = 0

    async def start(self) -> int:
        self.service.events.bind(asyncio.get_running_loop())
        if self.notifications is not None:
            self.notifications.start()
        self.port = tls.bind(self.server, self.settings.LISTEN, self.credentials)
        self.metrics_port = self.metrics.start(self.settings.METRICS_LISTEN)
        await self.server.start()
        for name in ("", OPD_SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.settings.AUTO_NO_SHOW:
            self._background.append(asyncio.create_task(self._auto_no_show()))
        self._background.append(asyncio.create_task(_keep_full_collections_short()))
        self._background.append(asyncio.create_task(self._prune_history()))
        self._background.append(asyncio.create_task(self._reload_keys()))
        self._background.append(asyncio.create_task(self._watch_database()))
        self._background.append(asyncio.create_task(self.service.events.catch_up_forever(
            lambda key, after, limit: self.run(self.service.events_after, key, after, limit),
            lambda keys: self.run(self.service.last_sequences, keys), self.settings.WATCH_CATCH_UP_SECONDS)))
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        grace = self.settings.SHUTDOWN_GRACE_SECONDS if grace is None else grace
        deadline = time.monotonic() + grace
        await self.health.enter_graceful_shutdown()
        self.pipeline.hold_new_calls()
        self._stop_pruning.set()
        for task in self._background:
            task.cancel()
        self.service.events.close()  # watchers are told to reconnect; calls in flight get the grace period
        await self._drain(min(deadline, time.monotonic() + DRAIN_MAX_SECONDS))
        stopping = asyncio.ensure_future(self.server.stop(max(0.0, deadline - time.monotonic())))
        await asyncio.sleep(0)  # gRPC's stop has begun: it takes no new call, and clients are told so
        self.pipeline.refuse_held_calls()
        await stopping
        self.run.shutdown()
        if self._pruning is not None:  # told to stop, it ends after the batch in hand
            await asyncio.wait([self._pruning])
        if self.notifications is not None:  # after the last change: its notification goes out too
            await asyncio.to_thread(self.notifications.stop)
        await asyncio.to_thread(self.metrics.stop)  # its HTTP server notices within half a second
        self.store.close()

    async def _drain(self, until: float) -> None:
        """gRPC's stop ends the calls it has received but not yet handed to the servicer with CANCELLED, which no
        client retries (on SQLite, where calls run on the event loop, a busy loop holds a few). So first every new
        call is taken and held, which also keeps its caller from sending more, until the calls admitted are done
        and no call has come for a moment; gRPC's stop then finds none waiting."""
        while time.monotonic() < until and (self.pipeline.calls.count
                                            or time.monotonic() - self.pipeline.last_held < DRAIN_QUIET_SECONDS):
            await asyncio.sleep(DRAIN_QUIET_SECONDS / 10)

    async def _record_denied(self, actor: Actor, method: str, request_id: str, refusal: EngineError,
                             peer: str) -> None:
        if not self.audited_denials.take(peer.rpartition(":")[0] or peer):  # ipv4:10.0.0.7:51234 -> its address
            self.metrics.denial_not_audited()
            return
        try:
            await self.run(self.service.record_denied, actor, method, request_id, refusal)
        except Exception:  # the call is refused all the same
            log.exception("could not write a denied %s call to the audit log", method)

    def _finished(self, method: str, code: grpc.StatusCode, seconds: float, actor: Actor, request_id: str,
                  peer: str, caller_gone: bool) -> None:
        observe.log_call(method, code, seconds, actor.key_id, actor.role, request_id, peer, caller_gone)
        self.metrics.call_finished(method, code, seconds)

    async def _reload_keys(self) -> None:
        """Keys added or revoked (by `opd-grpc keys`, on any replica) count within API_KEYS_REFRESH_SECONDS."""
        while True:
            await asyncio.sleep(self.settings.API_KEYS_REFRESH_SECONDS)
            try:
                self.gate.keys = await asyncio.to_thread(self.service.key_ring)
            except Exception:
                log.exception("reloading API keys failed; the keys loaded before stay in force")
                continue
            self.service.events.end_watches(Unauthenticated(
                "This stream's API key has been revoked, or it was opened without one and keys are now required; "
                "open it again with a valid key.", "API_KEY_INVALID"),
                of=lambda watcher: not self.gate.keys.accepts(watcher))

    async def _watch_database(self) -> None:
        """Health follows the database: while this server cannot read it, every call would fail, so health says
        NOT_SERVING (a load balancer sends the calls to a replica that can) until it answers again. A check that
        hangs (a lost network) is waited for, not sent again beside it."""
        answering, pending, failed = True, None, 0
        while True:
            await asyncio.sleep(DATABASE_CHECK_SECONDS)
            if pending is None:
                pending = asyncio.ensure_future(asyncio.to_thread(self.store.check))
            done, _ = await asyncio.wait([pending], timeout=DATABASE_CHECK_SECONDS)
            if done:
                error, pending = pending.exception(), None
            else:
                error = TimeoutError(f"no answer within {DATABASE_CHECK_SECONDS:g} s")
            failed = 0 if error is None else failed + 1
            if failed == WATCHES_END_AFTER_FAILED_CHECKS:  # not on one slow check: every board would reconnect
                # Their clients go to a replica that hears the other replicas' changes, or wait for this one.
                self.service.events.end_watches(Unavailable(
                    "This server cannot read its database just now, so it would miss other replicas' changes; "
                    "reconnect (to another replica, if there is one) with after_sequences set to the last sequence "
                    "you received for each doctor.", "DATABASE_UNAVAILABLE"))
            if (error is None) == answering:
                continue
            answering = error is None
            for name in ("", OPD_SERVICE):
                await self.health.set(name, health_pb2.HealthCheckResponse.SERVING if answering
                                      else health_pb2.HealthCheckResponse.NOT_SERVING)
            self.metrics.database_answers(answering)
            if answering:
                log.info("the database answers again: health is SERVING")
            else:
                log.error("the database does not answer (%s): health is NOT_SERVING until it does", error)

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


def _keepalive_options() -> list[tuple[str, int]]:
    return [
        ("grpc.keepalive_time_ms", int(KEEPALIVE_PING_SECONDS * 1000)),
        ("grpc.keepalive_timeout_ms", int(KEEPALIVE_ACK_SECONDS * 1000)),
        # What gRPC 1.85 actually waits for an ack before it closes the connection (1 min by default once keepalive
        # is on): keepalive_timeout_ms alone left a black-holed connection open past 40 s.
        ("grpc.http2.ping_timeout_ms", int(KEEPALIVE_ACK_SECONDS * 1000)),
        # GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS; max_ping_strikes stays at its default, 2.
        ("grpc.http2.min_ping_interval_without_data_ms", int(CLIENT_PING_MIN_SECONDS * 1000)),
        # Without this, a connection with no call open permits one client ping in two hours, so a ping that
        # crosses the end of a client's last call is a strike. It also lets the server ping idle connections:
        # a dead one is closed too.
        ("grpc.keepalive_permit_without_calls", 1),
    ]


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
    if server.metrics_port:
        metrics_host = settings.METRICS_LISTEN.rsplit(":", 1)[0]
        print(f"opd-grpc metrics on http://{metrics_host}:{server.metrics_port}/metrics", flush=True)
    if not server.gate.keys.required:
        log.warning("no API keys in the database: every caller may make every call (development on loopback)")
    if settings.TEST_CLOCK:
        log.warning("TEST_CLOCK is on: the service clock is what SetTime and AdvanceTime make it, for tests and the "
                    "simulation, never in production")
    print(f"opd-grpc listening on {host}:{port} (database {server.store.shown_url})", flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    print("opd-grpc stopping: finishing calls in flight", flush=True)
    _exit_if_stop_hangs(settings.SHUTDOWN_GRACE_SECONDS + STOP_MARGIN_SECONDS)
    await server.stop()


def _exit_if_stop_hangs(seconds: float) -> None:
    """A call or health check waiting on a database that does not answer (packets dropped, not refused) keeps a
    thread until the network gives up, minutes later; the stop, and then Python's exit, would wait for it. A stop
    that has not ended within `seconds` ends the process: what the database did not commit, it rolls back when the
    connection goes, and a caller retries with its request_id."""
    def watchdog() -> None:
        time.sleep(seconds)
        # The exit must not wait on the log line either (stderr a full pipe, a handler's lock held).
        threading.Timer(1.0, os._exit, (STOP_ABANDONED_EXIT_CODE,)).start()
        log.error("the stop did not end within %g s (SHUTDOWN_GRACE_SECONDS and %g s more): a call or check still "
                  "waits on the database; exiting without it", seconds, STOP_MARGIN_SECONDS)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(STOP_ABANDONED_EXIT_CODE)

    threading.Thread(target=watchdog, name="opd-stop-watchdog", daemon=True).start()
