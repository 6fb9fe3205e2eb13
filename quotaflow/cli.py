"""The ``quotaflow`` command. Every setting comes from QUOTAFLOW_* environment variables
(see quotaflow/core/settings.py); flags only choose what to do."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

from quotaflow.core.errors import OperatorError
from quotaflow.core.logs import logging_dict, setup_logging
from quotaflow.core.redact import redact
from quotaflow.core.settings import ConfigError, Settings, describe_error, get_settings


def cmd_stack(args: argparse.Namespace, settings: Settings) -> int:
    from quotaflow.deploy import stack

    if args.stages and args.action != "start":
        print(f"quotaflow: stack {args.action} takes no stage names", file=sys.stderr)
        return 2
    if unknown := [name for name in args.stages if name not in stack.PIPELINE]:
        print(f"quotaflow: unknown stage {unknown[0]!r}; stages: {', '.join(stack.PIPELINE)}", file=sys.stderr)
        return 2
    if args.action == "up":
        started = stack.up(settings)
        print(f"stack up ({', '.join(started) or 'already running'}; state in {settings.state_dir})")
    elif args.action == "start":
        stack.up(settings)  # what the stages need, if it is not running yet
        for name in args.stages or stack.PIPELINE:
            if stack.pipeline_proc(settings, name).pid() is None:
                pid = stack.start_pipeline_process(settings, name)
                print(f"{name} started (pid {pid}, supervised); log in {stack.pipeline_log(settings, name)}")
            else:
                print(f"{name} already running")
    elif args.action == "down":
        stopped = stack.down(settings)
        print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
    if args.action in ("up", "start", "status"):
        for name, running, where in stack.status(settings):
            print(f"  {name:<11} {'running' if running else 'stopped':<8} {where}")
    return 0


def cmd_supervise(args: argparse.Namespace, settings: Settings) -> int:
    from quotaflow.deploy import stack, supervise
    from quotaflow.deploy.procs import running_as

    state_file = stack.pipeline_proc(settings, args.stage).state_file
    other = supervise.State.read(state_file)
    if other and other.supervisor_pid != os.getpid() and running_as(other.supervisor_pid, f"supervise {args.stage}"):
        print(f"quotaflow: a supervisor of the {args.stage} already runs (pid {other.supervisor_pid})", file=sys.stderr)
        return 1
    backoff = supervise.Backoff(settings.supervise_backoff_initial_s, settings.supervise_backoff_max_s,
                                settings.supervise_healthy_s)
    return supervise.run(args.stage, [sys.executable, "-m", "quotaflow", args.stage], state_file, backoff)


def cmd_processor(args: argparse.Namespace, settings: Settings) -> int:
    from quotaflow.core import gc_tuning, metrics
    from quotaflow.processors.app import Worker, create_app

    app = create_app(settings)
    metrics.serve(settings.processor_metrics_port)
    gc_tuning.for_streaming()
    worker = Worker(app, loglevel=settings.log_level, quiet=True, redirect_stdouts=False,
                    logging_config=logging_dict(settings.log_level, settings.log_format))
    worker.execute_from_commandline()
    return 0


def cmd_sink(args: argparse.Namespace, settings: Settings) -> int:
    from quotaflow.core import gc_tuning, metrics
    from quotaflow.sinks.clickhouse.sink import ClickHouseSink

    metrics.serve(settings.sink_metrics_port)
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


def cmd_api(args: argparse.Namespace, settings: Settings) -> int:
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


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from quotaflow.deploy.demo import run_demo

    return run_demo(settings, seconds=args.seconds)


def cmd_schema(args: argparse.Namespace, settings: Settings) -> int:
    from quotaflow.schemas.events import render_json_schema

    data = render_json_schema()
    if args.output == "-":
        sys.stdout.write(data.decode())
    else:
        Path(args.output).write_bytes(data)
        print(f"wrote {args.output}")
    return 0


def cmd_org(args: argparse.Namespace, settings: Settings) -> int:
    import redis

    from quotaflow.schemas.ids import id_error
    from quotaflow.schemas.limits import policy_from_settings
    from quotaflow.schemas.redis_keys import ORG_TIER_FIELD, org_key

    problem = id_error("org_id", args.org_id)  # before it names a Redis key
    if problem:
        print(f"quotaflow: {problem}", file=sys.stderr)
        return 2
    policy = policy_from_settings(settings)
    client = redis.Redis.from_url(settings.redis_url)
    if args.action == "set-tier":
        if args.tier not in policy.tiers:
            print(f"quotaflow: unknown tier {args.tier}; configured: {', '.join(policy.tiers)}", file=sys.stderr)
            return 2
        client.hset(org_key(args.org_id), ORG_TIER_FIELD, args.tier)
        print(f"{args.org_id}: {args.tier}")
    else:
        raw = client.hget(org_key(args.org_id), ORG_TIER_FIELD)
        print(f"{args.org_id}: {raw.decode() if raw else policy.default_tier + ' (default)'}")
    return 0


def cmd_key(args: argparse.Namespace, settings: Settings) -> int:
    import redis

    from quotaflow.schemas.ids import id_error
    from quotaflow.schemas.limits import parse_overrides, policy_from_settings
    from quotaflow.schemas.redis_keys import Decision, overrides_key, usage_key

    problem = id_error("org_id", args.org_id) or id_error("api_key_id", args.api_key_id)  # before they name a key
    if problem:
        print(f"quotaflow: {problem}", file=sys.stderr)
        return 2
    policy = policy_from_settings(settings)
    client = redis.Redis.from_url(settings.redis_url)
    key = overrides_key(args.org_id, args.api_key_id)
    if args.action == "set-limit":
        if args.window not in policy.labels:
            print(f"quotaflow: unknown window {args.window}; configured: {', '.join(policy.labels)}", file=sys.stderr)
            return 2
        client.hset(key, args.window, args.limit)
    elif args.action == "clear-limits":
        client.delete(key)
    overrides = parse_overrides(client.hgetall(key))
    print(f"{args.org_id}/{args.api_key_id} overrides: {overrides or 'none (tier limits apply)'}")
    if args.action == "show":
        raw = client.hgetall(usage_key(args.org_id, args.api_key_id))
        print(f"  decision: {Decision.from_redis(raw) if raw else 'none yet (no events counted)'}")
    return 0


def cmd_enforcement(args: argparse.Namespace, settings: Settings) -> int:
    import redis

    from quotaflow.schemas.redis_keys import ENFORCEMENT_KEY, ENFORCEMENT_OFF

    client = redis.Redis.from_url(settings.redis_url)
    if args.action == "off":
        client.set(ENFORCEMENT_KEY, ENFORCEMENT_OFF)
    elif args.action == "on":
        client.delete(ENFORCEMENT_KEY)
    off = client.get(ENFORCEMENT_KEY) == ENFORCEMENT_OFF.encode()
    print("enforcement: " + ("OFF (every gateway admits every request)" if off else "on"))
    return 0


def cmd_gateway(args: argparse.Namespace, settings: Settings) -> int:
    from quotaflow.gateway.limiter import RateLimiter
    from quotaflow.gateway.server import serve

    serve(RateLimiter.from_settings(settings), host=args.host, port=settings.gateway_port,
          log_config=logging_dict(settings.log_level, settings.log_format))
    return 0


def cmd_db(args: argparse.Namespace, settings: Settings) -> int:
    from quotaflow.schemas.clickhouse import retention
    from quotaflow.schemas.clickhouse.client import ClickHouseUnavailable, connect
    from quotaflow.schemas.clickhouse.migrate import migrate

    try:
        client = connect(settings.clickhouse_url)
    except ClickHouseUnavailable as exc:
        print(f"quotaflow: {redact(exc)}", file=sys.stderr)
        return 1
    try:
        applied = migrate(client)
        changed = retention.apply(client, settings)
    finally:
        client.close()
    print(f"applied migrations: {applied or 'none (up to date)'}")
    print("retention: " + (", ".join(f"{table} {days} days" for table, days in changed.items())
                           if changed else "unchanged (as configured)"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quotaflow",
        description="API usage monitoring and rate limiting. Configuration: QUOTAFLOW_* environment variables.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("stack", help="start, stop or inspect the local Kafka, Redis and ClickHouse",
                       description="The local stack on 127.0.0.1, state under QUOTAFLOW_STATE_DIR (default .quotaflow). "
                                   "'up' installs what is missing (Kafka jars, redis-server) and starts what is not running. "
                                   "'start' also runs the processor and the sink (or the stages named) in the background, "
                                   "each under a supervisor that restarts it with backoff if it exits; logs in "
                                   "QUOTAFLOW_STATE_DIR/logs. 'status' shows each stage's pid, uptime, restarts and "
                                   "last exit. 'down' stops everything.")
    p.add_argument("action", choices=["up", "start", "down", "status"])
    p.add_argument("stages", nargs="*", metavar="STAGE", help="with 'start': processor, sink (default: both)")
    p.set_defaults(func=cmd_stack)

    p = sub.add_parser("supervise", help="run a stage and restart it with backoff whenever it exits unasked",
                       description="Runs 'quotaflow STAGE' as a child process and restarts it with exponential backoff "
                                   "and jitter (QUOTAFLOW_SUPERVISE_*) when it exits, logging each exit; SIGTERM "
                                   "stops the stage (SIGKILL after 20 s) and the supervisor. 'stack start' and the "
                                   "demo run stages this way.")
    p.add_argument("stage", choices=["processor", "sink"])
    p.set_defaults(func=cmd_supervise)

    p = sub.add_parser("processor", help="run the stream processor (Faust worker) in the foreground",
                       description="Counts requests per API key and window, writes limit decisions to Redis, "
                                   "dead-letters invalid events. Metrics on QUOTAFLOW_PROCESSOR_METRICS_PORT.")
    p.set_defaults(func=cmd_processor)

    p = sub.add_parser("sink", help="run the ClickHouse sink in the foreground",
                       description="Stores raw events in ClickHouse in batches (QUOTAFLOW_CLICKHOUSE_URL), each "
                                   "exactly once, rolled up per minute, hour and day. Metrics on "
                                   "QUOTAFLOW_SINK_METRICS_PORT; also serves the query API on QUOTAFLOW_API_PORT "
                                   "(0: don't), since the embedded engine can be open in one process only.")
    p.set_defaults(func=cmd_sink)

    p = sub.add_parser("api", help="serve the analytics query API in the foreground",
                       description="HTTP JSON and CSV answers from ClickHouse on 127.0.0.1:QUOTAFLOW_API_PORT, "
                                   "for callers with a token from QUOTAFLOW_API_TOKENS. Meant for a ClickHouse "
                                   "server; with the embedded engine the sink serves the API itself.")
    p.set_defaults(func=cmd_api)

    p = sub.add_parser("demo", help="start everything, drive demo traffic, print a live summary",
                       description="Starts the stack, the processor and the sink, sends traffic from several orgs "
                                   "of different tiers (some over their limits, some invalid), prints a summary "
                                   "every 2 s and a final line, then stops what it started.")
    p.add_argument("--seconds", type=float, default=float(os.environ.get("DEMO_SECONDS", 60)),
                   help="how long to send traffic (default: $DEMO_SECONDS or 60)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("schema", help="export the event JSON Schema for publishers in other languages")
    p.add_argument("action", choices=["export"])
    p.add_argument("--output", default="-", help="file to write (default: stdout)")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser("org", help="read or set the subscription tier of an org")
    org_sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = org_sub.add_parser("set-tier", help="put an org on a tier (FREE, STARTER, PROFESSIONAL, SCALE, ENTERPRISE "
                                            "by default; see QUOTAFLOW_TIER_LIMITS)")
    q.add_argument("org_id")
    q.add_argument("tier", type=str.upper)
    q = org_sub.add_parser("get", help="show an org's tier")
    q.add_argument("org_id")
    p.set_defaults(func=cmd_org)

    p = sub.add_parser("key", help="per-key limit overrides, and a key's current decision")
    key_sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = key_sub.add_parser("set-limit", help="override one window's limit for one API key")
    q.add_argument("org_id")
    q.add_argument("api_key_id")
    q.add_argument("window", help="window label, e.g. 60s (see QUOTAFLOW_WINDOWS)")
    q.add_argument("limit", type=int)
    q = key_sub.add_parser("clear-limits", help="drop a key's overrides: its tier's limits apply again")
    q.add_argument("org_id")
    q.add_argument("api_key_id")
    q = key_sub.add_parser("show", help="a key's overrides and its decision as the processors last wrote it")
    q.add_argument("org_id")
    q.add_argument("api_key_id")
    p.set_defaults(func=cmd_key)

    p = sub.add_parser("enforcement", help="emergency switch: stop (off) or resume (on) enforcing limits everywhere",
                       description="'off' makes every gateway admit every request from its next check on; "
                                   "counting goes on. 'on' resumes enforcement.")
    p.add_argument("action", choices=["on", "off", "status"])
    p.set_defaults(func=cmd_enforcement)

    p = sub.add_parser("gateway", help="serve the HTTP check endpoint for nginx auth_request / Envoy ext_authz",
                       description="GET /check with X-Api-Key-Id and X-Org-Id answers 200 or 429 (or ?deny_status=403 "
                                   "for nginx) with rate-limit headers. Port: QUOTAFLOW_GATEWAY_PORT.")
    p.add_argument("--host", default="127.0.0.1")
    p.set_defaults(func=cmd_gateway)

    p = sub.add_parser("db", help="ClickHouse schema migrations and retention",
                       description="'migrate' applies the missing migrations and sets each table's TTL from the "
                                   "QUOTAFLOW_RETENTION_*_DAYS settings. Run it with the sink stopped.")
    p.add_argument("action", choices=["migrate"])
    p.set_defaults(func=cmd_db)
    return parser


def _failure(exc: Exception, settings: Settings) -> str | None:
    """One line for an error that stopped a command: what could not be reached and why,
    with every secret redacted. None for an error nobody foresaw (a bug)."""
    import redis

    from quotaflow.schemas.clickhouse.client import ClickHouseUnavailable

    if isinstance(exc, (OperatorError, ClickHouseUnavailable)):
        return redact(exc)
    if isinstance(exc, redis.exceptions.AuthenticationError):
        return f"Redis at {redact(settings.redis_url)} refused the credentials: {redact(exc)}"
    if isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
        return f"cannot reach Redis at {redact(settings.redis_url)}: {redact(exc)}"
    if isinstance(exc, redis.exceptions.RedisError):
        return f"Redis at {redact(settings.redis_url)}: {redact(exc)}"
    if isinstance(exc, OSError):
        return redact(exc)
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = get_settings()
    except Exception as exc:  # names the variable and the problem, never the value
        print(f"quotaflow: invalid configuration: {describe_error(exc)}", file=sys.stderr)
        return 2
    if args.command not in ("processor",):  # the Faust worker sets up logging itself
        setup_logging(settings.log_level, settings.log_format)
    try:
        return args.func(args, settings)
    except ConfigError as exc:
        print(f"quotaflow: invalid configuration: {redact(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        message = _failure(exc, settings)
        if message is not None:
            print(f"quotaflow: {' '.join(message.split())}", file=sys.stderr)  # one line
        else:  # a bug: the traceback helps, with its secrets hidden
            import traceback

            print("quotaflow: unexpected error (please report it):\n" + redact(traceback.format_exc()).rstrip(),
                  file=sys.stderr)
        return 1
