"""Rate-limit administration in Redis: ``quotaflow org`` (an org's tier), ``quotaflow key``
(a key's overrides and decision) and ``quotaflow enforcement`` (the emergency switch)."""

from __future__ import annotations

import argparse
import sys

from quotaflow.cli.registry import Command
from quotaflow.core.settings import Settings


def run_org(args: argparse.Namespace, settings: Settings) -> int:
    from quotaflow.core.redis_clients import sync_client
    from quotaflow.schemas.ids import id_error
    from quotaflow.schemas.limits import policy_from_settings
    from quotaflow.schemas.redis_keys import ORG_TIER_FIELD, org_key

    problem = id_error("org_id", args.org_id)  # before it names a Redis key
    if problem:
        print(f"quotaflow: {problem}", file=sys.stderr)
        return 2
    policy = policy_from_settings(settings)
    client = sync_client(settings)
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


def run_key(args: argparse.Namespace, settings: Settings) -> int:
    from quotaflow.core.redis_clients import sync_client
    from quotaflow.schemas.ids import id_error
    from quotaflow.schemas.limits import parse_overrides, policy_from_settings
    from quotaflow.schemas.redis_keys import Decision, overrides_key, usage_key

    problem = id_error("org_id", args.org_id) or id_error("api_key_id", args.api_key_id)  # before they name a key
    if problem:
        print(f"quotaflow: {problem}", file=sys.stderr)
        return 2
    policy = policy_from_settings(settings)
    client = sync_client(settings)
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
        decision = Decision.from_redis(client.hgetall(usage_key(args.org_id, args.api_key_id)))
        print(f"  decision: {decision or 'none yet (no events counted)'}")
    return 0


def run_enforcement(args: argparse.Namespace, settings: Settings) -> int:
    from quotaflow.core.redis_clients import sync_client
    from quotaflow.schemas.redis_keys import ENFORCEMENT_KEY, ENFORCEMENT_OFF

    client = sync_client(settings)
    if args.action == "off":
        client.set(ENFORCEMENT_KEY, ENFORCEMENT_OFF)
    elif args.action == "on":
        client.delete(ENFORCEMENT_KEY)
    off = client.get(ENFORCEMENT_KEY) == ENFORCEMENT_OFF.encode()
    print("enforcement: " + ("OFF (every gateway admits every request)" if off else "on"))
    return 0


def _org_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = sub.add_parser("set-tier", help="put an org on a tier (FREE, STARTER, PROFESSIONAL, SCALE, ENTERPRISE "
                                        "by default; see QUOTAFLOW_TIER_LIMITS)")
    q.add_argument("org_id")
    q.add_argument("tier", type=str.upper)
    q = sub.add_parser("get", help="show an org's tier")
    q.add_argument("org_id")


def _key_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = sub.add_parser("set-limit", help="override one window's limit for one API key")
    q.add_argument("org_id")
    q.add_argument("api_key_id")
    q.add_argument("window", help="window label, e.g. 60s (see QUOTAFLOW_WINDOWS)")
    q.add_argument("limit", type=int)
    q = sub.add_parser("clear-limits", help="drop a key's overrides: its tier's limits apply again")
    q.add_argument("org_id")
    q.add_argument("api_key_id")
    q = sub.add_parser("show", help="a key's overrides and its decision as the processors last wrote it")
    q.add_argument("org_id")
    q.add_argument("api_key_id")


def _enforcement_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["on", "off", "status"])


COMMANDS = (
    Command("org", "read or set the subscription tier of an org", run_org, arguments=_org_arguments),
    Command("key", "per-key limit overrides, and a key's current decision", run_key, arguments=_key_arguments),
    Command("enforcement", "emergency switch: stop (off) or resume (on) enforcing limits everywhere", run_enforcement,
            description="'off' makes every gateway admit every request from its next check on; "
                        "counting goes on. 'on' resumes enforcement.",
            arguments=_enforcement_arguments),
)
