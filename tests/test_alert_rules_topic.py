"""Alert rules on their compacted topic, on the real broker: `quotaflow alerts rules
add|list|rm|test` end to end, the configuration checks before a write, versions and
tombstones, records nobody should have written skipped, and `test` sending to a real
local receiver."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys

import orjson
import pytest

from quotaflow.alerts.rules import RuleStore
from quotaflow.deploy.observe import end_offsets
from quotaflow.schemas.alert_rules import RuleRecord, parse_rule
from quotaflow.schemas.topics import ALERT_RULES_TOPIC
from tests.alert_receivers import HttpReceiver
from tests.pipeline import unique

pytestmark = pytest.mark.stack
SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()


def channels(org: str, hook_url: str = "http://127.0.0.1:9/none") -> dict:
    return {"ops-hook": {"type": "webhook", "url": hook_url, "secret": SECRET, "attempts": 1},
            f"{org.lower()}-hook": {"type": "webhook", "org": org, "url": hook_url, "secret": SECRET},
            "other-hook": {"type": "webhook", "org": "someone-else", "url": hook_url, "secret": SECRET}}


def cli(*args: str, chans: dict, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "QUOTAFLOW_ALERT_CHANNELS": json.dumps(chans)}
    return subprocess.run([sys.executable, "-m", "quotaflow", "alerts", "rules", *args], capture_output=True,
                          text=True, timeout=120, env=env, input=stdin)


def rule(rule_id: str, **over) -> str:
    fields = dict(rule_id=rule_id, type="usage_threshold", window="1d", percent=80, severity="high",
                  channels=["ops-hook"])
    fields.update(over)
    return json.dumps({k: v for k, v in fields.items() if v is not None})  # None: the field left out


def test_the_rules_topic_is_compacted(live_stack):
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    async def config():
        admin = AIOKafkaAdminClient(bootstrap_servers=live_stack.kafka_bootstrap)
        await admin.start()
        try:
            (response,) = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, ALERT_RULES_TOPIC)])
            return {e[0]: e[1] for e in response.resources[0][4]}
        finally:
            await admin.close()

    assert asyncio.run(config())["cleanup.policy"] == "compact"


def test_add_list_replace_and_remove_an_org_rule_and_a_global_one(live_stack):
    org, gid = unique("acme"), unique("quota")
    chans = channels(org)
    added = cli("add", "--org", org, rule("daily-80", channels=["ops-hook", f"{org.lower()}-hook"]), chans=chans)
    assert added.returncode == 0, added.stderr
    assert added.stdout.startswith(f"added {org}/daily-80  usage_threshold  high") and " v1" in added.stdout
    assert cli("add", "--global", rule(gid, type="quota_exceeded", percent=None), chans=chans).returncode == 0

    listed = cli("list", "--org", org, chans=chans)
    assert listed.returncode == 0 and listed.stdout.splitlines() == [added.stdout.strip().removeprefix("added ")]
    assert f"*/{gid}  quota_exceeded" in cli("list", "--global", chans=chans).stdout
    every = cli("list", "--json", chans=chans).stdout.splitlines()
    records = [RuleRecord.decode(line.encode()) for line in every]
    mine = [r for r in records if r.rule.org_id == org]
    assert len(mine) == 1 and mine[0].rule.percent == 80 and mine[0].version == 1

    again = cli("add", "--org", org, rule("daily-80", percent=90), chans=chans)
    assert again.returncode == 2 and "exists (version 1); --replace to change it" in again.stderr
    replaced = cli("add", "--org", org, rule("daily-80", percent=90), "--replace", chans=chans)
    assert replaced.returncode == 0 and " v2 " in replaced.stdout and "percent=90.0" in replaced.stdout
    (record,) = asyncio.run(RuleStore(live_stack.kafka_bootstrap).read()).of(org)
    assert record.version == 2 and record.created_ms <= record.updated_ms and record.rule.percent == 90

    removed = cli("rm", "--org", org, "daily-80", chans=chans)
    assert removed.returncode == 0 and removed.stdout.startswith(f"removed {org}/daily-80")
    assert cli("list", "--org", org, chans=chans).stdout.strip() == f"no rules for org {org}"
    gone = cli("rm", "--org", org, "daily-80", chans=chans)
    assert gone.returncode == 2 and gone.stderr.strip() == f"quotaflow: no rule of org {org} daily-80"
    assert cli("rm", "--global", gid, chans=chans).returncode == 0


def test_a_rule_from_stdin_applies_to_its_org_and_the_global_rules_too(live_stack):
    org, gid = unique("acme"), unique("glob")
    chans = channels(org)
    assert cli("add", "--org", org, "-", chans=chans, stdin=rule("errors", type="error_rate", window="1h",
                                                                  percent=5, min_requests=50)).returncode == 0
    assert cli("add", "--global", rule(gid), chans=chans).returncode == 0
    rules = asyncio.run(RuleStore(live_stack.kafka_bootstrap).read())
    applying = {(r.rule.org_id, r.rule.rule_id) for r in rules.applying_to(org)}
    assert {(org, "errors"), ("*", gid)} <= applying
    assert all(r.rule.org_id in (org, "*") for r in rules.applying_to(org))
    assert cli("rm", "--global", gid, chans=chans).returncode == 0


@pytest.mark.parametrize("args, named", [
    (["--org", "ORG", rule("r", percent=-5)], "invalid rule: percent:"),
    (["--org", "ORG", rule("r", channels=["nope"])], "channels: nope is not a configured channel"),
    (["--org", "ORG", rule("r", channels=["other-hook"])], "channels: other-hook belongs to another org"),
    (["--global", rule("r", channels=["ORGLOWER-hook"])], "a global rule may use only the operators' channels"),
    (["--org", "ORG", rule("r", window="2m")], "window: 120s is not a configured window"),
    (["--org", "ORG", rule("r", org_id="globex")], "org_id: the rule says another org"),
    (["--org", "ORG", "{not json"], "the rule is not JSON"),
    (["--org", "ORG", "[1, 2]"], "the rule must be a JSON object"),
    (["--org", "not an id", rule("r")], "--org: must be 1-64 characters"),
    (["--org", "ORG", "@/nonexistent/rule.json"], "cannot read the rule"),
])
def test_a_bad_rule_is_refused_in_one_line_naming_the_field_and_nothing_is_written(live_stack, args, named):
    org = unique("acme")
    args = [a.replace("ORGLOWER", org.lower()).replace("ORG", org) if a != "--org" else a for a in args]
    before = asyncio.run(end_offsets(live_stack.kafka_bootstrap, ALERT_RULES_TOPIC))
    done = cli("add", *args, chans=channels(org))
    assert done.returncode == 2 and done.stdout == "", done.stdout
    assert len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr
    assert named in done.stderr, done.stderr
    assert asyncio.run(end_offsets(live_stack.kafka_bootstrap, ALERT_RULES_TOPIC)) == before


def test_records_nobody_should_have_written_are_skipped_not_fatal(live_stack):
    from aiokafka import AIOKafkaProducer

    org = unique("acme")
    good = RuleRecord(rule=parse_rule(json.loads(rule("ok")) | {"org_id": org}), created_ms=1, updated_ms=1)

    async def write():
        producer = AIOKafkaProducer(bootstrap_servers=live_stack.kafka_bootstrap, acks="all")
        await producer.start()
        try:
            for key, value in [(f"{org}/bad".encode(), b"\xff not json"), (b"no-slash", good.encode()),
                               (f"{org}/ok".encode(), good.encode()), (f"{org}/liar".encode(), good.encode()),
                               (f"{org}/typed".encode(), orjson.dumps({"rule": {"type": "usage_threshold"}}))]:
                await producer.send_and_wait(ALERT_RULES_TOPIC, value, key=key)
        finally:
            await producer.stop()

    asyncio.run(write())
    listed = cli("list", "--org", org, chans=channels(org))
    assert listed.returncode == 0 and listed.stdout.splitlines() == [f"{org}/ok  usage_threshold  high  "
                                                                     f"channels=ops-hook  v1  " +
                                                                     listed.stdout.split("  v1  ", 1)[1].strip()]
    skipped = [line for line in listed.stderr.splitlines() if "skipped an unreadable record" in line]
    assert len(skipped) >= 4, listed.stderr
    assert any("the key does not name the rule" in line for line in skipped)


def test_the_test_command_sends_a_signed_notification_on_each_channel(live_stack):
    org = unique("acme")
    with HttpReceiver() as good, HttpReceiver([(500, b"down", 0)]) as bad:
        chans = channels(org, good.url())
        chans["ops-hook"]["url"] = bad.url()
        assert cli("add", "--org", org, rule("t", channels=[f"{org.lower()}-hook", "ops-hook"]),
                   chans=chans).returncode == 0
        done = cli("test", "--org", org, "t", chans=chans)
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"{org.lower()}-hook: delivered (msg_test_")
    assert lines[1] == "ops-hook: FAILED: the webhook answered HTTP 500: down"
    assert len(bad.requests) == 1  # one attempt: a test says how the channel is now
    (request,) = good.requests
    body = orjson.loads(request.body)
    assert body["type"] == "alert.test" and body["data"]["rule_id"] == "t" and body["data"]["org_id"] == org
    assert request.headers["webhook-signature"].startswith("v1,")
    assert SECRET not in done.stdout + done.stderr
    missing = cli("test", "--org", org, "nope", chans=chans)
    assert missing.returncode == 2 and "no rule of org" in missing.stderr
