"""Serving the query API on 127.0.0.1:QUOTAFLOW_API_PORT, inside an asyncio loop that
may be busy with something else.

The embedded engine can be open in one process only, so with chdb:// the API is served
by the sink process (``quotaflow sink`` starts it next to the consumer); against a
ClickHouse server ``quotaflow api`` runs it on its own, as many as wanted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import uvicorn

from quotaflow.analytics.app import check_tokens, create_app
from quotaflow.analytics.dashboard.dead_letters import DeadLetters
from quotaflow.analytics.dashboard.limits import LiveLimits
from quotaflow.analytics.queries import Bounds
from quotaflow.core.settings import Settings
from quotaflow.schemas.clickhouse import retention
from quotaflow.schemas.clickhouse.client import connect
from quotaflow.schemas.limits import policy_from_settings

log = logging.getLogger(__name__)
HOST = "127.0.0.1"  # put a TLS-terminating proxy in front to serve it further


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        # The process's own handlers stay in charge (the sink stops on SIGTERM and
        # then stops the API); uvicorn must not replace or re-raise them.
        yield


class ApiServer:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._server: _Server | None = None
        self._task: asyncio.Task | None = None
        self._client = None
        self._socket: socket.socket | None = None
        self._live: LiveLimits | None = None
        self._dead_letters: DeadLetters | None = None

    @property
    def port(self) -> int:
        return self._socket.getsockname()[1]

    async def start(self) -> None:
        """Bind (raising OSError at once if the port is taken), then serve in the background."""
        check_tokens(self.settings.api_tokens)  # before anything is opened: a bad token map is fatal
        # IPPROTO_TCP named, not left 0: asyncio sets TCP_NODELAY only on accepted sockets whose
        # proto says TCP, and they inherit it from this one. Without it every answer after a
        # connection's first waited ~40 ms (headers and body are two writes: Nagle held the
        # second until the client's delayed ACK).
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((HOST, self.settings.api_port))
        url = self.settings.clickhouse_url
        self._client = await asyncio.to_thread(connect, url)
        s = self.settings
        # The dashboard's live limit state: read-only, connected on first use.
        self._live = LiveLimits(s.redis_url, policy_from_settings(s)) if s.redis_url else None
        self._dead_letters = DeadLetters(s.kafka_bootstrap)  # connected on first use
        app = create_app(s.api_tokens, retention.wanted_days(s), self._client, lambda: connect(url),
                         bounds=Bounds(max_execution_time_s=s.api_query_timeout_s,
                                       max_memory_usage=s.api_query_max_memory_bytes),
                         max_concurrent=s.api_max_concurrent_queries, queue_wait_s=s.api_queue_wait_s,
                         live=self._live, dead_letters=self._dead_letters)
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", timeout_graceful_shutdown=5)
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]))
        while not self._server.started and not self._task.done():
            await asyncio.sleep(0.01)
        if self._task.done():
            await self._task  # raises what went wrong
        if not self.settings.api_tokens:
            log.warning("query API serving, but QUOTAFLOW_API_TOKENS is empty: every request will be refused")
        log.info("query API serving", extra={"url": f"http://{HOST}:{self.port}/v1/",
                                             "dashboard": f"http://{HOST}:{self.port}/",
                                             "query_timeout_s": s.api_query_timeout_s,
                                             "query_max_memory_bytes": s.api_query_max_memory_bytes,
                                             "max_concurrent_queries": s.api_max_concurrent_queries})

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            await self._task
        if self._client is not None:
            self._client.close()
        if self._live is not None:
            await self._live.close()
        if self._dead_letters is not None:
            await self._dead_letters.close()
        if self._socket is not None:
            self._socket.close()
