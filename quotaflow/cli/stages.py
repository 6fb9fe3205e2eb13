"""The long-running stages in the foreground: ``quotaflow processor``, ``sink``, ``api`` and
``gateway``. Each logs to stderr (the terminal); ``quotaflow stack start`` runs the
processor and the sink with their output in QUOTAFLOW_STATE_DIR/logs/ instead."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Callable

from quotaflow.cli.registry import Command, host_argument
from quotaflow.core.errors import OperatorError
from quotaflow.core.logs import logging_dict
from quotaflow.core.redact import redact
from quotaflow.core.settings import Settings, env_var

FOREGROUND = ("Runs in the foreground, logging to stderr, until Ctrl-C or SIGTERM; not restarted "
              "('quotaflow stack start' runs it supervised, logging to QUOTAFLOW_STATE_DIR/logs/).")


def serve_metrics(settings: Settings, field: str) -> None:
    """The worker's metrics port, or one line saying why not (before anything else starts)."""
    from quotaflow.core import metrics

    port = getattr(settings, field)
    try:
        metrics.serve(port)
    except OSError as exc:
        raise OperatorError(f"cannot serve metrics on 127.0.0.1:{port}: {exc.strerror or exc} "
                            f"({env_var(field)} sets the port, 0 turns them off)") from None


def run_faust_worker(settings: Settings, create_app: Callable, worker: Callable, metrics_field: str) -> int:
    """A Faust stage in the foreground: its app, its metrics served on the port of
    ``metrics_field``, the collector tuned for streaming, its worker until stopped."""
    from quotaflow.core import gc_tuning

    app = create_app(settings)
    serve_metrics(settings, metrics_field)
    gc_tuning.for_streaming()
    worker(app, loglevel=settings.log_level, quiet=True, redirect_stdouts=False,
           logging_config=logging_dict(settings.log_level, settings.log_format)).execute_from_commandline()
    return 0


def run_processor(args: argparse.Namespace, settings: Settings) -> int:
    from quotaflow.processors.app import Worker, create_app

    return run_faust_worker(settings, create_app, Worker, "processor_metrics_port")


def run_sink(args: argparse.Namespace, settings: Settings) -> int:
    from quotaflow.core import gc_tuning
    from quotaflow.sinks.clickhouse.sink import ClickHouseSink

    serve_metrics(settings, "sink_metrics_port")
    sink = ClickHouseSink(settings)
    gc_tuning.for_streaming()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, sink.stop)
        await sink.open()
        api = None
        if settings.api_port:
            # The embedded engine can be open in one process only: this one serves the API.
            from quotaflow.analytics.server import ApiServer

            api = ApiServer(settings)
            try:
                await api.start()
            except OSError as exc:
                raise OperatorError(f"cannot serve the query API on port {settings.api_port}: {exc} "
                                    "(QUOTAFLOW_API_PORT=0 disables it)") from None
        try:
            await sink.run()
        finally:
            if api is not None:
                await api.stop()

    asyncio.run(main())
    return 0


def run_api(args: argparse.Namespace, settings: Settings) -> int:
    from quotaflow.analytics.server import ApiServer
    from quotaflow.schemas.clickhouse.client import ClickHouseUnavailable

    if not settings.api_port:
        print("quotaflow: QUOTAFLOW_API_PORT is 0 (disabled)", file=sys.stderr)
        return 2
    server = ApiServer(settings)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await server.start()
        try:
            await stop.wait()
        finally:
            await server.stop()

    try:
        asyncio.run(main())
    except (OSError, ClickHouseUnavailable) as exc:
        print(f"quotaflow: {redact(exc)}", file=sys.stderr)
        return 1
    return 0


def run_gateway(args: argparse.Namespace, settings: Settings) -> int:
    from quotaflow.gateway.limiter import RateLimiter
    from quotaflow.gateway.server import CheckConfig, serve

    serve(RateLimiter.from_settings(settings), host=args.host, port=settings.gateway_port,
          log_config=logging_dict(settings.log_level, settings.log_format), config=CheckConfig.from_settings(settings))
    return 0


COMMANDS = (
    Command("processor", "run the stream processor (Faust worker) in the foreground", run_processor,
            description="Counts requests per API key and window, writes limit decisions to Redis, "
                        "dead-letters invalid events. Metrics on 127.0.0.1:QUOTAFLOW_PROCESSOR_METRICS_PORT. "
                        + FOREGROUND,
            own_logging=True),  # the Faust worker sets up logging itself, from logging_dict
    Command("sink", "run the ClickHouse sink in the foreground", run_sink,
            description="Stores raw events in ClickHouse in batches (QUOTAFLOW_CLICKHOUSE_URL), each "
                        "exactly once, rolled up per minute, hour and day. Metrics on "
                        "127.0.0.1:QUOTAFLOW_SINK_METRICS_PORT; also serves the query API on QUOTAFLOW_API_PORT "
                        "(0: don't), since the embedded engine can be open in one process only. " + FOREGROUND),
    Command("api", "serve the analytics query API in the foreground", run_api,
            description="HTTP JSON and CSV answers from ClickHouse on 127.0.0.1:QUOTAFLOW_API_PORT, "
                        "for callers with a token from QUOTAFLOW_API_TOKENS, and /metrics. Meant for a ClickHouse "
                        "server; with the embedded engine the sink serves the API itself."),
    Command("gateway", "serve the HTTP check endpoint for nginx auth_request / Envoy ext_authz", run_gateway,
            description="GET /check verifies the API key (Authorization: Bearer, or QUOTAFLOW_GATEWAY_KEY_HEADER) "
                        "and its scope, and checks its limits: 200 with the verified org and key id, 401, 403 or "
                        "429 (or ?deny_status=403&invalid_status=401 for nginx) with the reason and rate-limit "
                        "headers; GET /metrics. Port: QUOTAFLOW_GATEWAY_PORT.",
            arguments=host_argument),
)
