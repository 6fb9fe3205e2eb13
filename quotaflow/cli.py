"""The ``quotaflow`` command. Every setting comes from QUOTAFLOW_* environment variables
(see quotaflow/settings.py); flags only choose what to do."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

from deploy.procs import StackError
from quotaflow.logs import logging_dict, setup_logging
from quotaflow.settings import Settings, get_settings


def cmd_stack(args: argparse.Namespace, settings: Settings) -> int:
    from deploy import stack

    if args.action == "up":
        started = stack.up(settings)
        print(f"stack up ({', '.join(started) or 'already running'}; state in {settings.state_dir})")
    elif args.action == "down":
        stopped = stack.down(settings)
        print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
    if args.action in ("up", "status"):
        for name, running, where in stack.status(settings):
            print(f"  {name:<11} {'running' if running else 'stopped':<8} {where}")
    return 0


def cmd_processor(args: argparse.Namespace, settings: Settings) -> int:
    import faust

    from processors.app import create_app
    from quotaflow import metrics

    app = create_app(settings)
    metrics.serve(settings.processor_metrics_port)
    worker = faust.Worker(app, loglevel=settings.log_level, quiet=True, redirect_stdouts=False,
                          logging_config=logging_dict(settings.log_level, settings.log_format))
    worker.execute_from_commandline()
    return 0


def cmd_sink(args: argparse.Namespace, settings: Settings) -> int:
    from quotaflow import metrics
    from sinks.clickhouse.sink import ClickHouseSink

    metrics.serve(settings.sink_metrics_port)
    sink = ClickHouseSink(settings)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, sink.stop)
        await sink.run()

    asyncio.run(main())
    return 0


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from deploy.demo import run_demo

    return run_demo(settings, seconds=args.seconds)


def cmd_schema(args: argparse.Namespace, settings: Settings) -> int:
    from schemas.events import render_json_schema

    data = render_json_schema()
    if args.output == "-":
        sys.stdout.write(data.decode())
    else:
        Path(args.output).write_bytes(data)
        print(f"wrote {args.output}")
    return 0


def cmd_org(args: argparse.Namespace, settings: Settings) -> int:
    import redis

    from schemas.redis_keys import ORG_TIER_FIELD, org_key
    from schemas.tiers import DEFAULT_TIER, Tier

    client = redis.Redis.from_url(settings.redis_url)
    if args.action == "set-tier":
        tier = Tier(args.tier.upper())
        client.hset(org_key(args.org_id), ORG_TIER_FIELD, tier.value)
        print(f"{args.org_id}: {tier.value}")
    else:
        raw = client.hget(org_key(args.org_id), ORG_TIER_FIELD)
        print(f"{args.org_id}: {raw.decode() if raw else DEFAULT_TIER.value + ' (default)'}")
    return 0


def cmd_db(args: argparse.Namespace, settings: Settings) -> int:
    from sinks.clickhouse.client import connect
    from sinks.clickhouse.migrate import migrate

    applied = migrate(connect(settings.clickhouse_url))
    print(f"applied migrations: {applied or 'none (up to date)'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from schemas.tiers import Tier

    parser = argparse.ArgumentParser(
        prog="quotaflow",
        description="API usage monitoring and rate limiting. Configuration: QUOTAFLOW_* environment variables.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("stack", help="start, stop or inspect the local Kafka, Redis and ClickHouse",
                       description="The local stack on 127.0.0.1, state under QUOTAFLOW_STATE_DIR (default .quotaflow). "
                                   "'up' installs what is missing (Kafka jars, redis-server) and starts what is not running.")
    p.add_argument("action", choices=["up", "down", "status"])
    p.set_defaults(func=cmd_stack)

    p = sub.add_parser("processor", help="run the stream processor (Faust worker) in the foreground",
                       description="Counts requests per API key and window, writes limit decisions to Redis, "
                                   "dead-letters invalid events. Metrics on QUOTAFLOW_PROCESSOR_METRICS_PORT.")
    p.set_defaults(func=cmd_processor)

    p = sub.add_parser("sink", help="run the ClickHouse sink in the foreground",
                       description="Stores raw events in ClickHouse in batches (QUOTAFLOW_CLICKHOUSE_URL). "
                                   "Metrics on QUOTAFLOW_SINK_METRICS_PORT.")
    p.set_defaults(func=cmd_sink)

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
    q = org_sub.add_parser("set-tier", help="put an org on a tier")
    q.add_argument("org_id")
    q.add_argument("tier", type=str.upper, choices=[t.value for t in Tier])
    q = org_sub.add_parser("get", help="show an org's tier")
    q.add_argument("org_id")
    p.set_defaults(func=cmd_org)

    p = sub.add_parser("db", help="ClickHouse schema migrations")
    p.add_argument("action", choices=["migrate"])
    p.set_defaults(func=cmd_db)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = get_settings()
    except Exception as exc:  # pydantic's message names the variable and the problem
        print(f"quotaflow: invalid configuration: {exc}", file=sys.stderr)
        return 2
    if args.command not in ("processor",):  # the Faust worker sets up logging itself
        setup_logging(settings.log_level, settings.log_format)
    try:
        return args.func(args, settings)
    except StackError as exc:
        print(f"quotaflow: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
