"""Serving SMTP: the listeners (the inbound MX port, submission with STARTTLS, implicit TLS), the TLS
context they share, and a clean stop that finishes the transactions in flight.

`serve()` is what `manage.py runsmtp` runs. Importing this module loads the SMTP side only (the protocol,
the handler, the checks and the intake writer), never the scanners, the delivery or the task module.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import threading
from concurrent.futures import ThreadPoolExecutor

from django.conf import settings

from gateway.heartbeat import Heartbeat
from gateway.policy.config import dns_checks_state
from gateway.policy.state import MX, SMTPS, SUBMISSION

from . import tls as tls_config
from .handler import GatewayHandler
from .protocol import GatewaySMTP

log = logging.getLogger(__name__)


def make_server_factory(handler: GatewayHandler, *, tls_context=None, max_size: int | None = None, mode: str = MX,
                        require_starttls: bool = False):
    def factory() -> GatewaySMTP:
        # Only the snapshot in hand: the event loop never waits on the database (handle_RCPT reloads it).
        snapshot = handler.config_cache.peek()
        size = snapshot.max_message_size if snapshot else (max_size or 25 * 1024 * 1024)
        return GatewaySMTP(handler, mode=mode, hostname=settings.SMTP_HOSTNAME, ident="Mailgate ESMTP",
                           data_size_limit=size, timeout=settings.SMTP_DATA_TIMEOUT, tls_context=tls_context,
                           require_starttls=require_starttls)

    return factory


async def serve(host: str, port: int, *, submission: tuple[str, int] | None = None,
                smtps: tuple[str, int] | None = None, ready: asyncio.Event | None = None,
                stop: asyncio.Event | None = None, grace: float = 30.0) -> None:
    """Serve until SIGTERM/SIGINT (or `stop`), then finish the transactions in flight and return.

    `host`/`port`: the inbound (MX) listener; `submission`: STARTTLS + AUTH (587); `smtps`: implicit TLS +
    AUTH (465).
    """
    loop = asyncio.get_running_loop()
    handler = GatewayHandler()
    await handler.server_config()  # fail early, with a clear error, when the database is unreachable at start
    context = None
    if settings.SMTP_STARTTLS or submission or smtps:
        try:
            context = await loop.run_in_executor(None, tls_config.server_context)
        except (OSError, ssl.SSLError, ValueError) as exc:
            if submission or smtps:
                raise RuntimeError(f"TLS is needed for submission, and the certificate is unusable: {exc}") from exc
            log.error("STARTTLS is off: the certificate is unusable: %s", exc)
    servers = [await loop.create_server(
        make_server_factory(handler, tls_context=context if settings.SMTP_STARTTLS else None, mode=MX),
        host=host, port=port, reuse_address=True)]
    if submission:
        servers.append(await loop.create_server(
            make_server_factory(handler, tls_context=context, mode=SUBMISSION, require_starttls=True),
            host=submission[0], port=submission[1], reuse_address=True))
    if smtps:
        servers.append(await loop.create_server(make_server_factory(handler, mode=SMTPS), host=smtps[0],
                                                port=smtps[1], reuse_address=True, ssl=context))
    stop = stop or asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(signum, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    if context is not None:
        try:
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(reload_certificate(loop, context)))
        except (NotImplementedError, RuntimeError):
            pass
    log.info("SMTP listening on %s:%s as %s%s", host, port, settings.SMTP_HOSTNAME,
             " (STARTTLS)" if context is not None and settings.SMTP_STARTTLS else "")
    if submission:
        log.info("submission (STARTTLS, AUTH) on %s:%s", *submission)
    if smtps:
        log.info("submission over implicit TLS (AUTH) on %s:%s", *smtps)
    state = dns_checks_state()
    if state:
        log.warning("DNS-based checks are %s", state)
    # Its own thread and database connection: the event loop never waits on a heartbeat.
    heartbeat = Heartbeat("smtp", connections=lambda: len(handler.connections)).start()
    if ready is not None:
        ready.set()
    await stop.wait()
    log.info("stopping: no new connections; finishing %d transaction(s) in flight", handler.transactions_in_flight)
    for server in servers:
        server.close()
    deadline = loop.time() + grace
    while handler.transactions_in_flight and loop.time() < deadline:
        await asyncio.sleep(0.05)
    for connection in list(handler.connections):
        if connection.transport is not None:
            connection.transport.write(b"421 4.3.2 Service shutting down\r\n")
            connection.transport.close()
    for server in servers:
        await server.wait_closed()
    await handler.writer.close()
    close_pool_connections(handler.pool)
    heartbeat.stop()  # its thread writes the last beat; a short wait at the very end of a stop
    log.info("SMTP stopped")


async def reload_certificate(loop: asyncio.AbstractEventLoop, context: ssl.SSLContext) -> bool:
    """SIGHUP: the certificate and key read again (an ACME client's deploy hook sends it after a renewal), in a
    thread (file reads, key parsing); open connections are not touched. An unusable new pair is logged and the
    one in use kept."""
    try:
        path = await loop.run_in_executor(None, tls_config.reload_certificate, context)
    except (OSError, ssl.SSLError, ValueError) as exc:
        log.error("SIGHUP: the TLS certificate was not reloaded, the one in use is kept: %s", exc)
        return False
    log.info("SIGHUP: TLS certificate reloaded from %s; new connections use it", path)
    return True


def close_pool_connections(pool: ThreadPoolExecutor) -> None:
    """Close the database connection of every pool thread, then the pool.

    Connections are per thread; a barrier makes each of the pool's threads take exactly one of the
    closing jobs, so none is left open (a database being dropped or failed over waits for them).
    """
    from django.db import connections

    size = pool._max_workers
    barrier = threading.Barrier(size, timeout=5)

    def close() -> None:
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            pass
        connections.close_all()

    for _ in range(size):
        pool.submit(close)
    pool.shutdown(wait=True)
