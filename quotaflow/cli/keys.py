"""API key management: ``quotaflow keys create|list|show|update|revoke|rotate|rebuild``
(quotaflow/keys: the registry; processors/key_registry.py: its materializer).

An operator's tool: it runs with the operator's environment (QUOTAFLOW_KEY_HASH_SECRETS,
the broker, Redis) and records the operator's user name as the actor of each change. A key
is printed once, by the create or rotate that makes it, and never taken as an argument
(process arguments are visible to every user of the machine): list and show print the
display prefix only.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import re
import sys
from datetime import datetime, timezone

from quotaflow.cli.registry import Command, host_argument
from quotaflow.core.settings import Settings

# Exit statuses: 0 done; 2 refused (bad input, unknown key); 3 recorded in the keys topic
# but not yet visible to gateways within --wait (the processor applies it when it runs).
REFUSED = 2
NOT_YET_VISIBLE = 3
ONCE_WARNING = ("quotaflow: this is the only time the key is shown; store it now (quotaflow keeps only its hash "
                "and cannot show it again)")
_DURATION = re.compile(r"^\+?([0-9]{1,9})([smhd])$")
_UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def actor() -> str:
    """Who runs the command, as the audit records it."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no user name for this uid
        user = ""
    user = "".join(c for c in user if c.isprintable())[:64]
    return f"cli:{user or 'unknown'}"


def duration_ms(text: str) -> int:
    """'0', '90s', '15m', '24h', '30d' in milliseconds."""
    if text == "0":
        return 0
    m = _DURATION.fullmatch(text)
    if m is None:
        raise argparse.ArgumentTypeError(f"not a duration: {text[:40]!r}; expected e.g. 0, 90s, 15m, 24h, 30d")
    return int(m.group(1)) * _UNIT_MS[m.group(2)]


def when_ms(text: str, now_ms: int) -> int | None:
    """An expiry: 'never', a duration from now ('30d', '+12h') or an ISO 8601 time with its
    zone ('2027-01-31T00:00:00Z')."""
    if text == "never":
        return None
    if _DURATION.fullmatch(text):
        return now_ms + duration_ms(text)
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a time: {text[:40]!r}; expected 'never', a duration such as 30d, "
                                         "or an ISO 8601 time such as 2027-01-31T00:00:00Z") from None
    if at.tzinfo is None:
        raise argparse.ArgumentTypeError("an ISO 8601 time needs its zone (Z or +01:00)")
    return int(at.timestamp() * 1000)


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 600:
        raise argparse.ArgumentTypeError(f"expected seconds from 0 to 600, got {text[:20]!r}")
    return value


def limit_item(text: str) -> tuple[str, int | None]:
    """'60s=5' (a window's limit) or '60s=none' (no limit of the key's own in that window)."""
    window, sep, value = text.partition("=")
    if not sep or not window:
        raise argparse.ArgumentTypeError(f"expected WINDOW=LIMIT such as 60s=5, got {text[:40]!r}")
    if value == "none":
        return window, None
    if not value.isdigit() or len(value) > 16:
        raise argparse.ArgumentTypeError(f"limit {window[:20]}: expected a whole number or none, got {value[:20]!r}")
    return window, int(value)


def _time(ms: int | None) -> str:
    if ms is None:
        return "never"
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _describe(view: dict, last_used_ms: int | None = None, full: bool = False) -> list[str]:
    limits = ", ".join(f"{w}={n}" for w, n in view["limits"].items()) or "the org's tier"
    lines = [f"{view['key_id']}  {view['display_prefix']}...  {view['state']}  {view['name']!r}",
             f"  scopes: {' '.join(view['scopes']) or '(none)'}   limits: {limits}   expires: {_time(view['expires_ms'])}"]
    if full:
        lines += [f"  org: {view['org_id']}   env: {view['env']}   hashed with secret: {view['secret_id']}",
                  f"  created: {_time(view['created_ms'])}   last change: {view['change']} by {view['actor']} at "
                  f"{_time(view['updated_ms'])} (version {view['version']})",
                  "  last used: " + (_time(last_used_ms) + " (last request the processor counted)"
                                     if last_used_ms else "no request counted in the longest window")]
        if view["rotated_from"]:
            lines.append(f"  rotated from: {view['rotated_from']}")
        if view["rotated_to"]:
            lines.append(f"  rotated to: {view['rotated_to']}")
    return lines


def _visible_note(published) -> int:
    """Say when gateways see the change; the exit status."""
    if published is None:
        return 0
    if published.visible_ms is None:
        print("quotaflow: recorded in the keys topic, but gateways do not see it yet: the processor has not "
              "applied it to Redis (is it running?); it will when it runs", file=sys.stderr)
        return NOT_YET_VISIBLE
    print(f"visible to gateways {published.visible_ms:.1f} ms after the broker acknowledged it", file=sys.stderr)
    return 0


def _issued(issued, args: argparse.Namespace, extra: dict | None = None) -> None:
    from quotaflow.keys.registry import public

    view = public(issued.record, issued.record.created_ms)
    if args.json:
        print(json.dumps({"key": issued.key, **view, **(extra or {})}))
    else:
        for line in _describe(view):
            print(line)
        print(f"key: {issued.key}")
    print(ONCE_WARNING, file=sys.stderr)


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    from quotaflow.keys.changes import KEEP
    from quotaflow.keys.registry import KeyStore, Registry, hash_secret, now_ms, public

    action = args.action
    if action in ("list", "show"):
        from quotaflow.core.redis_clients import async_client

        client = async_client(settings)
        try:
            store = KeyStore(client)
            at = now_ms()
            if action == "list":
                records = await store.list(args.org_id)
                if args.json:
                    print(json.dumps([public(r, at) for r in records]))
                elif not records:
                    print(f"org {args.org_id} has no keys")
                for rec in records if not args.json else ():
                    print("\n".join(_describe(public(rec, at))))
            else:
                rec = await store.show(args.org_id, args.key_id)
                last_used = await store.last_used_ms(args.org_id, args.key_id)
                if args.json:
                    print(json.dumps({**public(rec, at), "last_used_ms": last_used}))
                else:
                    print("\n".join(_describe(public(rec, at), last_used, full=True)))
            return 0
        finally:
            await client.aclose()

    if action == "rebuild":
        return await _rebuild(settings)

    if action in ("create", "rotate"):
        hash_secret(settings)  # new keys need it: say so before touching anything
    now = now_ms()
    # checked before connecting: a typo is answered at once, whatever the stack's state
    expires = KEEP if getattr(args, "expires", None) is None else when_ms(args.expires, now)
    attrs = _update_attrs(args, settings, expires) if action == "update" else {}
    async with Registry(settings, wait_s=args.wait) as registry:
        if action == "create":
            issued = await registry.create(args.org_id, args.name, env=args.env, scopes=args.scope,
                                           limits=dict(args.limit), expires_ms=None if expires is KEEP else expires,
                                           actor=actor())
            _issued(issued, args)
            return _visible_note(issued.published)
        if action == "rotate":
            rotated = await registry.rotate(args.org_id, args.key_id, overlap_ms=args.overlap, actor=actor())
            _issued(rotated.new, args, {"replaces": args.key_id, "old_key_expires_ms": rotated.old.expires_ms})
            if not args.json:
                print(f"{args.key_id} stays valid until {_time(rotated.old.expires_ms)}")
            return _visible_note(rotated.new.published)
        if action == "revoke":
            changed = await registry.revoke(args.org_id, args.key_id, actor=actor())
        else:
            changed = await registry.update(args.org_id, args.key_id, actor=actor(), **attrs)
        view = public(changed.record, now_ms())
        if args.json:
            print(json.dumps({**view, "changed": changed.published is not None}))
        else:
            if changed.published is None:
                print(f"{args.key_id}: nothing changed (it already was so)")
            print("\n".join(_describe(view)))
        return _visible_note(changed.published)


def _update_attrs(args: argparse.Namespace, settings: Settings, expires: object) -> dict:
    """What `keys update` changes (Registry.update's keywords); refused when nothing or a contradiction."""
    from quotaflow.keys.changes import KEEP
    from quotaflow.schemas.limits import policy_from_settings

    if args.no_scopes and args.scope:
        raise argparse.ArgumentTypeError("--scope and --no-scopes contradict each other: give one")
    attrs: dict = {}
    if args.name is not None:
        attrs["name"] = args.name
    if args.no_scopes:
        attrs["scopes"] = ()
    elif args.scope:
        attrs["scopes"] = args.scope
    limits = dict.fromkeys(policy_from_settings(settings).labels) if args.clear_limits else {}
    limits.update(dict(args.limit))
    if limits:
        attrs["limits"] = limits
    if expires is not KEEP:
        attrs["expires_ms"] = expires
    if not attrs:
        raise argparse.ArgumentTypeError("nothing to update: give --name, --scope, --no-scopes, --limit, "
                                         "--clear-limits or --expires")
    return attrs


async def _rebuild(settings: Settings) -> int:
    from quotaflow.core.redis_clients import async_client
    from quotaflow.processors.key_registry import KeyMaterializer

    client = async_client(settings)
    materializer = KeyMaterializer(client, settings.kafka_bootstrap)
    try:
        done = await materializer.rebuild("cli")
    finally:
        await materializer.stop()
        await client.aclose()
    print(f"rebuilt the key registry in Redis from {done.records} records of the keys topic (up to offset "
          f"{done.end}) in {done.seconds:.2f} s: {done.applied} written, {done.records - done.applied - done.invalid} "
          f"there already, {done.invalid} refused (not key records; the processor dead-letters them)")
    if done.superseded:
        print("another rebuild started meanwhile and finishes the job", file=sys.stderr)
    return 0


def run_keys(args: argparse.Namespace, settings: Settings) -> int:
    from aiokafka.errors import KafkaError

    from quotaflow.keys.changes import InvalidChange
    from quotaflow.schemas.api_keys import InvalidKey

    try:
        return asyncio.run(_run(args, settings))
    except (InvalidChange, InvalidKey, argparse.ArgumentTypeError) as exc:
        print(f"quotaflow: {exc}", file=sys.stderr)
        return REFUSED
    except KafkaError as exc:
        from quotaflow.core.errors import OperatorError

        raise OperatorError(f"Kafka at {settings.kafka_bootstrap}: {exc}") from None


def _arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    def changing(q: argparse.ArgumentParser) -> None:
        q.add_argument("--wait", type=seconds, default=5.0, metavar="SECONDS",
                       help="how long to wait for the processor to apply the change to Redis, where gateways see "
                            "it (default 5); exit status 3 when it has not yet")
        q.add_argument("--json", action="store_true", help="print the result as one JSON object")

    def limits(q: argparse.ArgumentParser, what: str) -> None:
        q.add_argument("--scope", action="append", default=[], metavar="SCOPE",
                       help=f"a scope the key carries, e.g. orders:read (repeat for more){what}")
        q.add_argument("--limit", action="append", default=[], type=limit_item, metavar="WINDOW=LIMIT",
                       help="the key's own limit in a window of QUOTAFLOW_WINDOWS, e.g. 60s=5: at most its "
                            "org's tier (repeat for more windows)")

    once = "Prints the key once (stdout; with a warning on stderr): only its hash is kept."
    q = sub.add_parser("create", help="create a key for an org and print it, once",
                       description="Create an API key for an org. " + once)
    q.add_argument("org_id")
    q.add_argument("--name", required=True, help="what the key is for (shown in lists)")
    limits(q, "")
    q.add_argument("--expires", metavar="WHEN", help="expiry: a duration from now (30d, 12h) or an ISO 8601 time "
                                                     "with its zone (2027-01-31T00:00:00Z); default: never")
    q.add_argument("--env", choices=["live", "test"], default="live", help="the key's prefix: qf_live_ or qf_test_")
    changing(q)

    q = sub.add_parser("list", help="an org's keys (never their secrets: a display prefix only)")
    q.add_argument("org_id")
    q.add_argument("--json", action="store_true", help="print a JSON array")

    q = sub.add_parser("show", help="one key: scopes, limits, expiry, state, rotation, last used (never its secret)")
    q.add_argument("org_id")
    q.add_argument("key_id")
    q.add_argument("--json", action="store_true", help="print a JSON object")

    q = sub.add_parser("update", help="change a key's name, scopes, limits or expiry",
                       description="Change a key's name, scopes, limits or expiry; what is not given stays.")
    q.add_argument("org_id")
    q.add_argument("key_id")
    q.add_argument("--name")
    limits(q, "; replaces the key's scopes")
    q.add_argument("--no-scopes", action="store_true", help="the key carries no scope any more")
    q.add_argument("--clear-limits", action="store_true", help="drop the key's own limits (its org's tier applies); "
                                                               "--limit then sets new ones")
    q.add_argument("--expires", metavar="WHEN", help="a duration from now (30d), an ISO 8601 time with its zone, "
                                                     "or never")
    changing(q)

    q = sub.add_parser("revoke", help="revoke a key: every gateway refuses it from then on (final)")
    q.add_argument("org_id")
    q.add_argument("key_id")
    changing(q)

    q = sub.add_parser("rotate", help="issue a new key replacing one, the old one valid for an overlap",
                       description="Issue a new key with the old one's name, scopes, limits and expiry; the old key "
                                   "stays valid for --overlap (0: expires now). " + once)
    q.add_argument("org_id")
    q.add_argument("key_id")
    q.add_argument("--overlap", type=duration_ms, required=True, metavar="DURATION",
                   help="how long the old key stays valid: 0, 90s, 15m, 24h, 7d")
    changing(q)

    sub.add_parser("rebuild", help="rebuild the registry in Redis from the keys topic (after Redis lost it)",
                   description="Rebuild every key's record in Redis from the keys topic, the registry's source of "
                               "truth. The processor does it by itself when Redis is emptied; this does it now.")


def run_admin(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from quotaflow.core.logs import logging_dict
    from quotaflow.core.tokens import ALL_ORGS
    from quotaflow.keys.admin_api import create_app

    if not settings.admin_port:
        print("quotaflow: QUOTAFLOW_ADMIN_PORT is 0 (disabled)", file=sys.stderr)
        return REFUSED
    if ALL_ORGS not in settings.api_tokens.values():
        print("quotaflow: no operator token in QUOTAFLOW_API_TOKENS (a token mapped to \"*\"): every request "
              "would be refused", file=sys.stderr)
        return REFUSED
    # No access log: paths name orgs and keys, and the answers to creates carry keys.
    uvicorn.run(create_app(settings), host=args.host, port=settings.admin_port, access_log=False,
                log_config=logging_dict(settings.log_level, settings.log_format),
                h11_max_incomplete_event_size=64 * 1024, timeout_graceful_shutdown=5)
    return 0


COMMANDS = (
    Command("keys", "API keys: create, list, show, update, revoke, rotate; rebuild the registry in Redis", run_keys,
            description="API key management. Changes go to the keys topic (quotaflow.keys.v1), from which the "
                        "processor writes Redis for gateways and the sink the audit table api_key_changes. Exit "
                        "status 2: refused (bad input, unknown key); 3: recorded, not yet visible to gateways.",
            arguments=_arguments),
    Command("admin", "serve the admin HTTP API (API keys) in the foreground", run_admin,
            description="JSON over HTTP for what 'quotaflow keys' does, on 127.0.0.1:QUOTAFLOW_ADMIN_PORT, for "
                        "operator tokens of QUOTAFLOW_API_TOKENS; its OpenAPI schema at /openapi.json. Stop it "
                        "with Ctrl-C or SIGTERM.",
            arguments=host_argument),
)
