"""``quotaflow alerts rules add|list|rm|test``: alert rules on their topic (alerts/rules.py),
and a test notification on a rule's channels.

    quotaflow alerts rules add --org acme '{"rule_id": "daily-80", "type": "usage_threshold",
        "window": "1d", "percent": 80, "severity": "high", "channels": ["ops-mail"]}'
    quotaflow alerts rules add --global @rules/quota.json
    quotaflow alerts rules list [--org ORG | --global] [--json]
    quotaflow alerts rules rm --org acme daily-80
    quotaflow alerts rules test --org acme daily-80
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
import time

import orjson

from quotaflow.cli.registry import Command
from quotaflow.core.settings import Settings

INVALID = 2  # a rule or an argument to fix


def _org(args: argparse.Namespace) -> str:
    from quotaflow.schemas.alert_rules import GLOBAL

    return GLOBAL if args.is_global else args.org


def _fail(message: str) -> int:
    print(f"quotaflow: {' '.join(message.split())}", file=sys.stderr)
    return INVALID


def _actor() -> str:
    try:
        return getpass.getuser()[:128]
    except (KeyError, OSError):  # no user name (a container without one)
        return ""


def _read_rule_text(source: str) -> bytes:
    if source == "-":
        return sys.stdin.buffer.read(1_000_001)
    if source.startswith("@"):
        with open(source[1:], "rb") as f:
            return f.read(1_000_001)
    return source.encode()


def _describe(record) -> str:
    rule = record.rule
    common = {"rule_id", "org_id", "type", "severity", "channels", "description", "enabled"}
    params = " ".join(f"{k}={v}" for k, v in rule.model_dump(exclude=common, exclude_none=True).items())
    where = "*" if rule.is_global else rule.org_id
    state = "" if rule.enabled else "  DISABLED"
    return (f"{where}/{rule.rule_id}  {rule.type}  {rule.severity}  channels={','.join(rule.channels)}  "
            f"v{record.version}{state}  {params}")


def run_add(args: argparse.Namespace, settings: Settings) -> int:
    from quotaflow.alerts.rules import RuleConflict, RuleStore, problems
    from quotaflow.schemas.alert_rules import InvalidRule, parse_rule

    try:
        text = _read_rule_text(args.rule)
    except OSError as exc:
        return _fail(f"cannot read the rule: {exc.strerror or exc}")
    if len(text) > 1_000_000:
        return _fail("the rule is over 1 MB")
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        return _fail(f"the rule is not JSON ({str(exc).splitlines()[0][:200]})")
    if not isinstance(data, dict):
        return _fail("the rule must be a JSON object")
    org = _org(args)
    if "org_id" in data and data["org_id"] != org:
        return _fail(f"org_id: the rule says another org than {'--global' if args.is_global else '--org'} does")
    try:
        rule = parse_rule({**data, "org_id": org})
    except InvalidRule as exc:
        return _fail(f"invalid rule: {exc}")
    found = problems(rule, settings)
    if found:
        return _fail(f"invalid rule: {'; '.join(found)}")
    try:
        record = asyncio.run(RuleStore(settings.kafka_bootstrap).put(rule, replace=args.replace, actor=_actor()))
    except RuleConflict as exc:
        return _fail(str(exc))
    print(("replaced " if record.version > 1 else "added ") + _describe(record))
    return 0


def run_list(args: argparse.Namespace, settings: Settings) -> int:
    from quotaflow.alerts.rules import RuleStore
    from quotaflow.schemas.alert_rules import GLOBAL

    rules = asyncio.run(RuleStore(settings.kafka_bootstrap).read())
    which = GLOBAL if args.is_global else args.org
    records = rules.of(which)
    for record in records:
        print(record.encode().decode() if args.json else _describe(record))
    if not records and not args.json:
        print("no rules" + (f" for {'global' if which == GLOBAL else 'org ' + which}" if which else ""))
    for skipped in rules.skipped:
        print(f"quotaflow: skipped an unreadable record of the rules topic: {skipped}", file=sys.stderr)
    return 0


def run_rm(args: argparse.Namespace, settings: Settings) -> int:
    from quotaflow.alerts.rules import RuleConflict, RuleStore
    from quotaflow.schemas.ids import id_error

    problem = id_error("rule_id", args.rule_id)
    if problem:
        return _fail(problem)
    try:
        record = asyncio.run(RuleStore(settings.kafka_bootstrap).remove(_org(args), args.rule_id))
    except RuleConflict as exc:
        return _fail(str(exc))
    print(f"removed {_describe(record)}")
    return 0


def run_test(args: argparse.Namespace, settings: Settings) -> int:
    from quotaflow.alerts.channels import Policy, deliver
    from quotaflow.alerts.notifications import trial
    from quotaflow.alerts.rules import RuleStore, problems
    from quotaflow.schemas.ids import id_error

    problem = id_error("rule_id", args.rule_id)
    if problem:
        return _fail(problem)
    org = _org(args)
    record = asyncio.run(RuleStore(settings.kafka_bootstrap).read()).records.get((org, args.rule_id))
    if record is None:
        return _fail(f"no {'global rule' if args.is_global else 'rule of org ' + org} {args.rule_id}")
    found = problems(record.rule, settings)
    if found:  # the configuration changed since the rule was added
        return _fail(f"the rule cannot be delivered: {'; '.join(found)}")
    notification = trial(record.rule, int(time.time() * 1000))

    async def send_all():
        out = []
        for name in record.rule.channels:  # one after the other: each line says what its channel did
            channel = settings.alert_channels[name]
            policy = Policy(attempts=1, timeout_s=channel.timeout_s or settings.alert_timeout_s)
            out.append(await deliver(notification, name, channel, settings, dead_letters=None, policy=policy))
        return out

    failed = 0
    for outcome in asyncio.run(send_all()):
        if outcome.delivered:
            print(f"{outcome.channel}: delivered ({notification.id})")
        else:
            failed += 1
            print(f"{outcome.channel}: FAILED: {outcome.error}")
    return 1 if failed else 0


def _until(text: str, now_ms: int) -> int:
    """A silence's end: a duration from now (2h, 30m, 1d) or an ISO time (with its offset)."""
    import datetime as dt

    from quotaflow.schemas.alert_rules import parse_duration

    try:
        return now_ms + int(parse_duration(text)) * 1000
    except (ValueError, TypeError):
        pass
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError("--until: a duration (30m, 2h, 1d) or an ISO time such as 2026-01-31T18:00:00+00:00") from None
    if when.tzinfo is None:
        raise ValueError("--until: give the time with its offset (+00:00 or Z)")
    return int(when.timestamp() * 1000)


def run_silence(args: argparse.Namespace, settings: Settings) -> int:
    import datetime as dt

    from pydantic import ValidationError

    from quotaflow.alerts.silences import SilenceStore
    from quotaflow.core.errors import OperatorError
    from quotaflow.schemas.alert_rules import GLOBAL, Silence, describe

    store = SilenceStore(settings.kafka_bootstrap)
    now_ms = int(time.time() * 1000)

    def show(s: Silence) -> str:
        until = dt.datetime.fromtimestamp(s.ends_ms / 1000, tz=dt.timezone.utc).isoformat(timespec="seconds")
        state = "active" if s.starts_ms <= now_ms < s.ends_ms else ("ended" if s.ends_ms <= now_ms else "scheduled")
        return (f"{s.org_id}/{s.silence_id}  rule={s.rule_id or '(every rule)'}  until {until}  {state}"
                + (f"  {s.comment}" if s.comment else ""))

    if args.action == "add":
        try:
            silence = Silence(silence_id=args.silence_id, org_id=_org(args), rule_id=args.rule,
                              starts_ms=now_ms, ends_ms=_until(args.until, now_ms), comment=args.comment or "")
        except ValueError as exc:
            text = describe(exc) if isinstance(exc, ValidationError) else str(exc)
            return _fail(f"invalid silence: {text}")
        if silence.ends_ms <= now_ms:
            return _fail("--until: that time has passed")
        asyncio.run(store.put(silence))
        print(f"added {show(silence)}")
        return 0
    if args.action == "list":
        silences = asyncio.run(store.read())
        which = GLOBAL if args.is_global else args.org
        shown = [s for (org, _), s in sorted(silences.items()) if which is None or org == which]
        for s in shown:
            print(show(s))
        if not shown:
            print("no silences")
        return 0
    try:
        removed = asyncio.run(store.remove(_org(args), args.silence_id))
    except OperatorError as exc:
        return _fail(str(exc))
    print(f"removed {show(removed)}")
    return 0


def run_stage(args: argparse.Namespace, settings: Settings) -> int:
    """The alerts stage in the foreground (alerts/app.py); `quotaflow stack start` runs it supervised."""
    from quotaflow.alerts.app import Worker, create_app
    from quotaflow.cli.stages import run_faust_worker
    from quotaflow.deploy.supervise import wait_if_standby

    wait_if_standby()  # a supervisor's standby (deploy/supervise.py): imported, waits until it takes over
    return run_faust_worker(settings, create_app, Worker, "alerts_metrics_port")


def _which(p: argparse.ArgumentParser, required: bool = True) -> None:
    group = p.add_mutually_exclusive_group(required=required)
    group.add_argument("--org", help="the org the rule belongs to")
    group.add_argument("--global", dest="is_global", action="store_true",
                       help="an operators' rule, applied to every org")


def _arguments(p: argparse.ArgumentParser) -> None:
    groups = p.add_subparsers(dest="group", required=True, metavar="GROUP")
    groups.add_parser("run", help="run the alerts stage (evaluation and delivery) in the foreground",
                      description="Evaluates the alert rules on the events topic and delivers their notifications, "
                                  "logging to stderr until Ctrl-C or SIGTERM; not restarted ('quotaflow stack start' "
                                  "runs it supervised, logging to QUOTAFLOW_STATE_DIR/logs/alerts.log).")
    rules = groups.add_parser("rules", help="add, list, remove and test alert rules",
                              description="Alert rules, kept on a compacted Kafka topic. Types: usage_threshold, "
                                          "rate_limit_violations, quota_exceeded, error_rate, latency_p95, "
                                          "unusual_activity, key_expiring.")
    sub = rules.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = sub.add_parser("add", help="add a rule (JSON) to an org, or a global rule",
                       description="Add a rule given as JSON (inline, @FILE or - for stdin). Channels are names "
                                   "from QUOTAFLOW_ALERT_CHANNELS.")
    _which(q)
    q.add_argument("rule", metavar="RULE", help='JSON, e.g. \'{"rule_id": "daily-80", "type": "usage_threshold", '
                                                '"window": "1d", "percent": 80, "channels": ["ops-mail"]}\'')
    q.add_argument("--replace", action="store_true", help="replace a rule of the same id (its next version)")
    q = sub.add_parser("list", help="list the rules (every org's, one org's, or the global ones)")
    _which(q, required=False)
    q.add_argument("--json", action="store_true", help="one JSON record per line, as stored")
    q = sub.add_parser("rm", help="remove a rule")
    _which(q)
    q.add_argument("rule_id")
    q = sub.add_parser("test", help="send a test notification on each of a rule's channels (one attempt each)")
    _which(q)
    q.add_argument("rule_id")
    silences = groups.add_parser("silences", help="mute an org's (or every org's) alerts, or one rule's, until a time",
                                 description="Silences, kept on a compacted Kafka topic and followed by the alerts "
                                             "stage. A silence mutes notifications, not states: a firing still on "
                                             "when it ends is notified then.")
    sub = silences.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = sub.add_parser("add", help="add a silence")
    _which(q)
    q.add_argument("silence_id")
    q.add_argument("--until", required=True, help="a duration from now (30m, 2h, 1d) or an ISO time with its offset")
    q.add_argument("--rule", help="mute this rule only (default: every rule)")
    q.add_argument("--comment", help="why (shown by list)")
    q = sub.add_parser("list", help="list the silences")
    _which(q, required=False)
    q = sub.add_parser("rm", help="remove a silence")
    _which(q)
    q.add_argument("silence_id")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from quotaflow.core.logs import setup_logging
    from quotaflow.schemas.ids import id_error

    if args.group == "run":
        return run_stage(args, settings)
    setup_logging(settings.log_level, settings.log_format)  # the stage's Faust worker sets up its own

    if getattr(args, "org", None) is not None:
        problem = id_error("--org", args.org)
        if problem:
            return _fail(problem)
    if args.group == "silences":
        return run_silence(args, settings)
    return {"add": run_add, "list": run_list, "rm": run_rm, "test": run_test}[args.action](args, settings)


COMMANDS = (
    Command("alerts", "alert rules: add, list, remove, test their channels; run the alerts stage", run,
            arguments=_arguments, own_logging=True),
)
