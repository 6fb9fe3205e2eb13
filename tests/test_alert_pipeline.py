"""The alerts stage on the real stack (alerts/app.py): rules added while it runs are
evaluated on crafted traffic, each rule type fires and resolves, `for_s` and the cooldown
are honoured, a silence holds a firing back until it ends, a value hovering at the
threshold notifies once, and notifications reach real receivers: a webhook signed as
the Standard Webhooks spec says (verified by an implementation written here from the
spec's text), a Slack payload checked for its shape by the receiving server, an email
received by aiosmtpd. One stage for the module; each test its own org and rules.

The stage runs with 10 s windows (QUOTAFLOW_WINDOWS=10,60,3600), so a window ending
resolves an alert in seconds; tests that need their events in one window wait until
enough of the current one is left (the stage measures windows by its wall clock).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import hmac
import json
import socket
import subprocess
import sys
import time

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiosmtpd.controller import Controller

from quotaflow.alerts.rules import RuleStore
from quotaflow.schemas.alert_rules import parse_rule
from tests.alert_receivers import HttpReceiver, Request, _Keep
from tests.pipeline import Pipeline, event, publish, unique, wait_for

SECRET = "whsec_" + base64.b64encode(b"alerts-pipeline-test-secret-0123").decode()
WINDOW_S = 10
STAGE_ENV = {
    "QUOTAFLOW_WINDOWS": f"{WINDOW_S},60,3600",
    "QUOTAFLOW_TIER_LIMITS": json.dumps({"FREE": [20, 100, 1000], "STARTER": [40, 500, 5000]}),
    "QUOTAFLOW_ALERTS_EVAL_INTERVAL_S": "0.25",
    "QUOTAFLOW_ALERT_RETRY_MAX_S": "1",
    # the stage's operator token: it reads baselines from the rollups through the query API
    "QUOTAFLOW_API_TOKENS": json.dumps({"tok-alerts-ops": "*"}),
}
HISTORY_ORG = unique("history")
SINK_TOKENS = {"tok-history-org": HISTORY_ORG, "tok-history-ops": "*", "tok-alerts-ops": "*"}


def ensure_sink(stage) -> None:
    """The sink (and the query API it serves), with every token of this module."""
    if stage.pipeline.pid("sink") is None:
        stage.pipeline.start("sink", QUOTAFLOW_API_TOKENS=json.dumps(SINK_TOKENS))


def api_get(stage, path: str, token: str) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{stage.settings.api_port}{path}",
                                 headers={"authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def spec_verify(secret: str, headers: dict[str, str], body: bytes, tolerance_s: int = 300) -> None:
    """Standard Webhooks v1, from the spec's text: the key is the base64 after "whsec_"; the
    signed content is "{webhook-id}.{webhook-timestamp}.{body}"; webhook-signature is a
    space-separated list of "v1,<base64 HMAC-SHA256>"; the timestamp, unix seconds, is
    within a tolerance of now."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    msg_id, ts = headers["webhook-id"], headers["webhook-timestamp"]
    assert ts.isdigit() and abs(time.time() - int(ts)) <= tolerance_s, f"timestamp {ts} out of tolerance"
    expected = hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
    sigs = [base64.b64decode(sig) for version, _, sig in (p.partition(",") for p in headers["webhook-signature"].split())
            if version == "v1"]
    assert any(hmac.compare_digest(expected, s) for s in sigs), "no v1 signature matches"


def slack_judge(request: Request):
    """What Slack's incoming webhooks accept, roughly: JSON with a non-empty text and, if
    present, a list of blocks each with a known type and text objects of a known type."""
    try:
        doc = orjson.loads(request.body)
        assert isinstance(doc.get("text"), str) and doc["text"]
        assert isinstance(doc.get("blocks"), list) and doc["blocks"]
        for block in doc["blocks"]:
            assert block["type"] in ("section", "context", "header", "divider")
            texts = [block["text"]] if "text" in block else block.get("elements", []) + block.get("fields", [])
            assert all(t["type"] in ("mrkdwn", "plain_text") and isinstance(t["text"], str) for t in texts)
    except (ValueError, KeyError, TypeError, AssertionError):
        return 400, b"invalid_payload", 0
    return 200, b"ok", 0


class Failing:
    """A webhook judge that refuses (503) the requests about ``org`` while ``failing``."""

    def __init__(self) -> None:
        self.failing: set[str] = set()

    def __call__(self, request: Request):
        org = orjson.loads(request.body)["data"]["org_id"]
        return (503, b"down", 0) if org in self.failing else (200, b"ok", 0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stage:
    def __init__(self, settings, pipeline, hook, slack, smtp, failing):
        self.settings, self.pipeline, self.hook, self.slack, self.smtp, self.failing = (
            settings, pipeline, hook, slack, smtp, failing)

    def add_rule(self, org: str, **rule) -> None:
        asyncio.run(RuleStore(self.settings.kafka_bootstrap).put(parse_rule({"org_id": org, **rule})))

    def silence(self, org: str, silence_id: str, until: str) -> str:
        """`quotaflow alerts silences add`, as an operator would; its output."""
        result = subprocess.run([sys.executable, "-m", "quotaflow", "alerts", "silences", "add", "--org", org, silence_id,
                                 "--until", until, "--comment", "maintenance"], capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def send(self, org: str, key: str, n: int, **over) -> int:
        at = int(time.time() * 1000)
        asyncio.run(publish(self.settings, [event(org, key, at, **over) for _ in range(n)]))
        return at

    def hooks(self, org: str) -> list[tuple[Request, dict]]:
        out = []
        for r in list(self.hook.requests):
            doc = orjson.loads(r.body)
            if doc["data"]["org_id"] == org:
                out.append((r, doc))
        return out

    def delivered(self, org: str) -> list[dict]:
        """The notifications about ``org`` the webhook accepted, first receipt of each id."""
        seen, out = set(), []
        for r, doc in self.hooks(org):
            if r.headers["webhook-id"] not in seen and org not in self.failing.failing:
                seen.add(r.headers["webhook-id"])
                out.append(doc["data"])
        return out

    def wait_kinds(self, org: str, kinds: list[str], timeout_s: float = 30) -> list[dict]:
        wait_for(lambda: [n["kind"] for n in self.delivered(org)] == kinds or
                 len(self.delivered(org)) > len(kinds), timeout_s, f"notifications {kinds} for {org}",
                 lambda: f"got {[n['kind'] for n in self.delivered(org)]}\n" + self.pipeline.logs("alerts"))
        got = self.delivered(org)
        assert [n["kind"] for n in got] == kinds, got
        return got


def in_one_window(need_s: float = 6, window_s: int = WINDOW_S) -> None:
    """Wait until at least ``need_s`` of the current window remain (the stage measures
    windows by its wall clock: nothing to wait on but time)."""
    left = window_s - time.time() % window_s
    if left < need_s:
        time.sleep(left + 0.05)


HOUR = "3600s"  # the window of tests that need their events counted together for a while


def in_one_hour(need_s: float = 60) -> None:
    in_one_window(need_s, 3600)


@pytest.fixture(scope="module")
def stage(live_stack):
    handler = _Keep()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    failing = Failing()
    pipeline = Pipeline(live_stack)
    with HttpReceiver(judge=failing) as hook, HttpReceiver(judge=slack_judge) as slack:
        channels = {"hook": {"type": "webhook", "url": hook.url(), "secret": SECRET},
                    "slack": {"type": "slack", "url": slack.url("/services/T000/B000/XXXX")},
                    "mail": {"type": "email", "to": ["ops@example.com"]}}
        pipeline.start("alerts", QUOTAFLOW_ALERT_CHANNELS=json.dumps(channels),
                       QUOTAFLOW_SMTP_URL=f"smtp://127.0.0.1:{controller.port}", **STAGE_ENV)
        try:
            yield Stage(live_stack, pipeline, hook, slack, handler, failing)
        finally:
            pipeline.stop_all()
            controller.stop()


def test_usage_threshold_fires_once_signed_per_the_spec_then_resolves_when_the_window_ends(stage):
    org = unique("usage")
    stage.add_rule(org, rule_id="key-half", type="usage_threshold", window=f"{WINDOW_S}s", percent=50,
                   scope="key", channels=["hook"], severity="high", group_interval_s=1)  # a group of one
    in_one_window()
    stage.send(org, "web", 8)
    stage.send(org, "web", 4)  # 12 of the key's 20: 60 %
    firing, resolved = stage.wait_kinds(org, ["firing", "resolved"], timeout_s=30)
    assert firing["api_key_id"] == "web" and firing["value"] == 60.0 and firing["threshold"] == 50.0
    assert resolved["fingerprint"] == firing["fingerprint"] and resolved["value"] == 0.0
    assert firing["id"] != resolved["id"]
    for request, _ in stage.hooks(org):
        spec_verify(SECRET, request.headers, request.body)


def test_quota_exceeded_on_the_org_reaches_slack_in_the_shape_it_accepts(stage):
    org = unique("quota")
    stage.add_rule(org, rule_id="quota", type="quota_exceeded", window=f"{WINDOW_S}s", channels=["slack", "hook"])
    in_one_window()
    stage.send(org, "a", 12)
    stage.send(org, "b", 8)  # the org's 20 of 20 over two keys
    firing, _ = stage.wait_kinds(org, ["firing", "resolved"], timeout_s=30)
    assert firing["value"] == 100.0 and firing["api_key_id"] is None
    slack = [orjson.loads(r.body) for r in stage.slack.requests if org in r.body.decode()]
    assert len(slack) == 2 and "FIRING" in slack[0]["text"] and "RESOLVED" in slack[1]["text"]


def test_rate_limit_violations_arrive_by_email(stage):
    in_one_hour()
    org = unique("denied")
    stage.add_rule(org, rule_id="denials", type="rate_limit_violations", window=HOUR, min_denials=3,
                   channels=["mail", "hook"], severity="critical")
    stage.send(org, "k", 2, status=429)
    stage.send(org, "k", 5)  # admitted requests are no denials
    stage.send(org, "k", 1, status=429)
    (firing,) = stage.wait_kinds(org, ["firing"], timeout_s=30)
    assert firing["value"] == 3.0
    wait_for(lambda: any(org in str(m["Subject"]) for _, _, m in stage.smtp.messages), 30, "the email")
    (mail_from, to, message), = [m for m in stage.smtp.messages if org in str(m[2]["Subject"])]
    assert to == ["ops@example.com"] and "FIRING" in str(message["Subject"])


def test_error_rate_hovering_at_the_threshold_fires_once_and_resolves_once(stage):
    in_one_hour()
    org = unique("errors")
    stage.add_rule(org, rule_id="5xx", type="error_rate", window=HOUR, percent=50, min_requests=10,
                   hysteresis=0.2, channels=["hook"])
    stage.send(org, "k", 5, status=503)
    stage.send(org, "k", 5)  # 50 %: fires
    stage.wait_kinds(org, ["firing"])
    for status in (200, 500, 200, 500, 200):  # 45, 50, 46, 50, 47 %: above the 40 % it clears at
        stage.send(org, "k", 1, status=status)
    stage.send(org, "k", 30)  # 8 of 45: 18 %: resolves
    firing, resolved = stage.wait_kinds(org, ["firing", "resolved"])
    assert resolved["value"] < 40


def test_latency_p95_fires_and_resolves(stage):
    in_one_hour()
    org = unique("latency")
    stage.add_rule(org, rule_id="slow", type="latency_p95", window=HOUR, threshold_ms=300, min_requests=10,
                   channels=["hook"])
    stage.send(org, "k", 10, latency_ms=900.0)
    firing, = stage.wait_kinds(org, ["firing"])
    assert firing["value"] >= 900
    stage.send(org, "k", 300, latency_ms=20.0)  # 10 slow of 310: p95 fast
    firing, resolved = stage.wait_kinds(org, ["firing", "resolved"])
    assert resolved["value"] < 30


def test_unusual_activity_fires_on_a_drop_against_past_weeks_and_resolves_when_traffic_returns(stage):
    """The same hour of three past weeks had 10 requests each (events stamped then, as a
    backfill would publish them); the last hour has none: a drop. Ten requests now resolve it."""
    org = unique("unusual")
    stage.add_rule(org, rule_id="drop", type="unusual_activity", direction="down", score=4, baseline_weeks=3,
                   min_history=3, min_requests=5, channels=["hook"])
    week, now = 7 * 24 * 3_600_000, int(time.time() * 1000)
    asyncio.run(publish(stage.settings, [event(org, "k", now - k * week - 1_800_000) for k in (1, 2, 3)
                                         for _ in range(10)]))
    (firing,) = stage.wait_kinds(org, ["firing"])
    assert firing["value"] == 10.0  # (0 - median 10) / the floor of 1, signed for "down"
    stage.send(org, "k", 10)
    firing, resolved = stage.wait_kinds(org, ["firing", "resolved"])
    assert resolved["value"] == 0.0


def test_key_expiring_fires_for_a_key_of_the_registry_and_resolves_when_it_is_renewed(stage):
    import redis

    from quotaflow.schemas.api_keys import KeyRecord
    from quotaflow.schemas.redis_keys import api_key_index

    org = unique("expiring")
    now = int(time.time() * 1000)
    client = redis.Redis.from_url(stage.settings.redis_url)

    def put(expires_ms: int) -> None:  # as the registry's materializer keeps an org's index
        rec = KeyRecord(key_id="key_soon", org_id=org, name="ci", env="live", display_prefix="qf_live_abcdefgh",
                        slot_hint=org, key_hash="0" * 64, secret_id="s1", expires_ms=expires_ms, created_ms=now,
                        updated_ms=int(time.time() * 1000))
        client.hset(api_key_index(org), "key_soon", rec.encode())

    try:
        put(now + 3_600_000)  # an hour left
        stage.add_rule(org, rule_id="expiry", type="key_expiring", within_s="1d", channels=["hook"],
                       group_interval_s=1)  # each key, grouped: the resolved not held for the default 30 s
        (firing,) = stage.wait_kinds(org, ["firing"])
        assert firing["api_key_id"] == "key_soon" and 3000 < firing["value"] <= 3600
        put(now + 30 * 86_400_000)  # renewed for a month
        firing, resolved = stage.wait_kinds(org, ["firing", "resolved"])
        assert resolved["value"] > 86_400
    finally:
        client.close()


def test_for_s_holds_the_firing_back_and_the_cooldown_delays_the_next(stage):
    in_one_hour()
    org = unique("forcool")
    stage.add_rule(org, rule_id="held", type="error_rate", window=HOUR, percent=50, min_requests=4, for_s=3,
                   cooldown_s=10, channels=["hook"])
    sent_at = stage.send(org, "k", 4, status=500)
    (firing,) = stage.wait_kinds(org, ["firing"])
    assert firing["at_ms"] - sent_at >= 3000  # held for for_s first
    stage.send(org, "k", 20)  # 4 of 24: resolves
    stage.wait_kinds(org, ["firing", "resolved"])
    stage.send(org, "k", 40, status=500)  # 44 of 64 at once: pending, held by for_s and the cooldown
    firing, resolved, again = stage.wait_kinds(org, ["firing", "resolved", "firing"], timeout_s=40)
    assert again["at_ms"] - firing["at_ms"] >= 10_000 and again["episode"] == firing["episode"] + 1


def test_a_silence_holds_a_firing_back_until_it_ends(stage):
    in_one_hour()
    org = unique("silenced")
    out = stage.silence(org, "maintenance", (dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=6)).isoformat())
    ends = int(dt.datetime.fromisoformat(out.split(" until ")[1].split()[0]).timestamp() * 1000)
    assert f"added {org}/maintenance  rule=(every rule)" in out and "active" in out
    stage.add_rule(org, rule_id="denials", type="rate_limit_violations", window=HOUR, min_denials=1,
                   channels=["hook"])
    stage.send(org, "k", 1, status=429)
    (firing,) = stage.wait_kinds(org, ["firing"], timeout_s=30)
    first = min(r.at for r, _ in stage.hooks(org))
    assert first * 1000 >= ends  # nothing reached the receiver while the silence lasted

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "quotaflow", "alerts", "silences", *args], capture_output=True,
                              text=True, timeout=60)

    assert "ended  maintenance" in cli("list", "--org", org).stdout
    assert cli("rm", "--org", org, "maintenance").returncode == 0
    assert cli("list", "--org", org).stdout.strip() == "no silences"
    refused = cli("rm", "--org", org, "maintenance")
    assert refused.returncode == 2 and "no silence maintenance" in refused.stderr


def test_one_notification_per_transition_across_a_sigkill_with_the_outbox_pending(stage):
    """The receiver refuses while the stage is killed: the firing is recorded (the receiver
    saw attempts with its id) and not delivered; the restarted stage delivers it with the
    same id, and no second firing (a new id) follows."""
    in_one_hour()
    org = unique("killed")
    stage.failing.failing.add(org)
    stage.add_rule(org, rule_id="denials", type="rate_limit_violations", window="3600s", min_denials=2,
                   channels=["hook"])
    stage.send(org, "k", 2, status=429)
    wait_for(lambda: len(stage.hooks(org)) >= 2, 30, "attempts at the firing", lambda: stage.pipeline.logs("alerts"))
    stage.pipeline.kill("alerts")
    stage.failing.failing.discard(org)
    stage.pipeline.start("alerts")
    wait_for(lambda: any(r.headers["webhook-id"] for r, _ in stage.hooks(org)
                         if r.at > stage.pipeline.state("alerts").up_since), 60, "the firing sent again",
             lambda: stage.pipeline.logs("alerts"))
    stage.send(org, "k", 1, status=429)  # still firing: nothing new to notify
    ids = {r.headers["webhook-id"] for r, _ in stage.hooks(org)}
    assert len(ids) == 1 and {doc["data"]["kind"] for _, doc in stage.hooks(org)} == {"firing"}


def test_history_is_queryable_per_org_as_json_and_csv(stage):
    """Every transition and delivery attempt is a row in ClickHouse (stored by the sink from
    the history topic), served by the query API at /v1/alerts, scoped to the caller's org."""
    import csv
    import io

    org, other = HISTORY_ORG, unique("history-other")
    for o in (org, other):
        stage.add_rule(o, rule_id="denials", type="rate_limit_violations", window=f"{WINDOW_S}s", min_denials=1,
                       channels=["hook"])
    in_one_window()
    for o in (org, other):
        stage.send(o, "k", 1, status=429)
    firing, resolved = stage.wait_kinds(org, ["firing", "resolved"])
    stage.wait_kinds(other, ["firing", "resolved"])
    replayed = publish_a_replayed_pending_step(stage, org)
    ensure_sink(stage)

    def get(path: str, token: str) -> tuple[int, bytes]:
        return api_get(stage, path, token)

    def rows() -> list[dict]:
        status, body = get("/v1/alerts?timeframe=1h&limit=1000", "tok-history-org")
        return orjson.loads(body)["rows"] if status == 200 else []

    def kinds(rs: list[dict]) -> list[tuple]:
        return [(r["record"], r["kind"], r["outcome"]) for r in rs]

    wait_for(lambda: ("delivery", "resolved", "ok") in kinds(rows()) and
             any(r["rule_id"] == "held" for r in rows()), 90, "the history in ClickHouse",
             lambda: stage.pipeline.logs("sink"))
    got = rows()
    assert {r["org_id"] for r in got} == {org}  # the org's token sees its own alerts only
    # a pending step replayed after a crash, seconds later, wrote its row again: one row
    assert [(r["kind"], r["at_ms"]) for r in got if r["rule_id"] == "held"] == [("pending", replayed)]
    transitions = [r for r in got if r["record"] == "transition" and r["rule_id"] == "denials"]
    assert [r["kind"] for r in transitions] == ["firing", "resolved"]
    assert [r["notification_id"] for r in transitions] == [firing["id"], resolved["id"]]
    deliveries = [r for r in got if r["record"] == "delivery"]
    assert {(r["notification_id"], r["channel"], r["outcome"]) for r in deliveries} == {
        (firing["id"], "hook", "ok"), (resolved["id"], "hook", "ok")}
    # another org's history is refused to this token; an operator reads it, as CSV too
    status, _ = get(f"/v1/alerts?timeframe=1h&org={other}", "tok-history-org")
    assert status == 403
    status, body = get(f"/v1/alerts.csv?timeframe=1h&org={other}", "tok-history-ops")
    assert status == 200
    table = list(csv.DictReader(io.StringIO(body.decode())))
    assert {r["org_id"] for r in table} == {other} and {"firing", "resolved"} <= {r["kind"] for r in table}


def publish_a_replayed_pending_step(stage, org: str) -> int:
    """The history records of a pending step, as the alerts stage writes them, then again as
    a stage restarted from the state before that step writes them 5 s later (the crash came
    after the history was on the broker, before the state was); the replay's time."""
    from quotaflow.alerts.app import _transition_record
    from quotaflow.alerts.state import Subject, step
    from quotaflow.schemas.topics import ALERT_HISTORY_TOPIC

    rule = parse_rule({"org_id": org, "rule_id": "held", "type": "error_rate", "window": HOUR, "percent": 50,
                       "for_s": 600, "channels": ["hook"]})
    now = int(time.time() * 1000)
    records = [_transition_record(rule, Subject(org), t) for at in (now - 5000, now)
               for t in step(rule, Subject(org), 90.0, at).transitions]
    assert [r.kind for r in records] == ["pending", "pending"] and records[0].row_id == records[1].row_id

    async def send() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=stage.settings.kafka_bootstrap, acks="all")
        await producer.start()
        try:
            for r in records:
                await producer.send_and_wait(ALERT_HISTORY_TOPIC, r.encode(), key=r.row_id.encode())
        finally:
            await producer.stop()

    asyncio.run(send())
    return now


def test_unusual_activity_reads_its_baseline_from_the_clickhouse_rollups(stage):
    """Past weeks' traffic the stage never measured (stored by the sink before any rule
    watched the org): the baseline comes from the rollups, through the query API."""
    ensure_sink(stage)
    org = unique("rollup")
    week, now = 7 * 24 * 3_600_000, int(time.time() * 1000)
    asyncio.run(publish(stage.settings, [event(org, "k", now - k * week - 1_800_000) for k in (1, 2, 3)
                                         for _ in range(10)]))

    def stored(k: int) -> bool:
        at = now - k * week - 1_800_000
        start = at - at % 3_600_000
        status, body = api_get(stage, f"/v1/summary?org={org}&from={start}&to={start + 3_600_000}", "tok-alerts-ops")
        return status == 200 and orjson.loads(body)["rows"][0]["requests"] == 10

    wait_for(lambda: all(stored(k) for k in (1, 2, 3)), 90, "the past weeks in the rollups",
             lambda: stage.pipeline.logs("sink"))
    stage.add_rule(org, rule_id="drop", type="unusual_activity", direction="down", score=4, baseline_weeks=3,
                   min_history=3, min_requests=5, channels=["hook"])
    (firing,) = stage.wait_kinds(org, ["firing"])
    assert firing["value"] == 10.0
    stage.send(org, "k", 10)
    stage.wait_kinds(org, ["firing", "resolved"])


def test_hostile_records_are_skipped_and_an_unconfigured_channel_is_recorded_not_fatal(stage):
    """Records nobody should write on the rules, silences and events topics are skipped (and
    logged); a rule naming a channel this stage has no configuration for is evaluated, its
    notification recorded as failed on that channel and delivered on the others."""
    from quotaflow.schemas.topics import ALERT_RULES_TOPIC, ALERT_SILENCES_TOPIC, ALERT_HISTORY_TOPIC
    from tests.pipeline import read_all

    org = unique("hostile")

    async def junk() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=stage.settings.kafka_bootstrap, acks="all")
        await producer.start()
        try:
            await producer.send_and_wait(ALERT_RULES_TOPIC, b"{not json", key=f"{org}/broken".encode())
            await producer.send_and_wait(ALERT_RULES_TOPIC, b'{"rule": 1}', key=b"no-slash")
            await producer.send_and_wait(ALERT_SILENCES_TOPIC, b'{"silence_id": "x"}', key=f"{org}/x".encode())
        finally:
            await producer.stop()

    asyncio.run(junk())
    stage.add_rule(org, rule_id="denials", type="rate_limit_violations", window=HOUR, min_denials=1,
                   channels=["gone", "hook"])
    in_one_hour()
    asyncio.run(publish(stage.settings, [], raw=[(org.encode(), b"\xff\xfe not an event"),
                                                 (org.encode(), b'[{"org_id": 5}]')]))
    stage.send(org, "k", 1, status=429)
    (firing,) = stage.wait_kinds(org, ["firing"])

    def failed_on_gone() -> bool:
        records = asyncio.run(read_all(stage.settings, ALERT_HISTORY_TOPIC))
        return any(orjson.loads(r.value).get("org_id") == org and orjson.loads(r.value).get("channel") == "gone"
                   and orjson.loads(r.value).get("error") == "channel not configured" for r in records)

    wait_for(failed_on_gone, 30, "the failed attempt on the unconfigured channel in the history")
    log = stage.pipeline.logs("alerts", lines=400)
    assert "alert rule record skipped" in log and "silence record skipped" in log, log[-3000:]


def test_keys_crossing_together_are_one_signed_notification_and_a_later_one_waits_the_group_interval(stage):
    """A rule about each key with a group wait: three keys of one org crossing at once are
    one webhook listing the three alerts (each its own fingerprint and id); a fourth key
    crossing right after is notified in a second one, group_interval_s after the first."""
    in_one_hour()
    org = unique("grouped")
    stage.add_rule(org, rule_id="keys-denied", type="rate_limit_violations", window=HOUR, min_denials=1, scope="key",
                   group_wait_s=2, group_interval_s=5, channels=["hook"])
    now = int(time.time() * 1000)
    asyncio.run(publish(stage.settings, [event(org, key, now, status=429) for key in ("k-a", "k-b", "k-c")]))
    (first,) = stage.wait_kinds(org, ["firing"])
    assert [a["api_key_id"] for a in first["alerts"]] == ["k-a", "k-b", "k-c"]
    assert first["id"].startswith("msg_grp_") and first["api_key_id"] is None
    assert len({a["fingerprint"] for a in first["alerts"]}) == 3 and len({a["id"] for a in first["alerts"]}) == 3
    stage.send(org, "k-d", 1, status=429)
    first, second = stage.wait_kinds(org, ["firing", "firing"])
    assert [a["api_key_id"] for a in second["alerts"]] == ["k-d"] and second["id"] == second["alerts"][0]["id"]
    (r1, _), (r2, _) = stage.hooks(org)
    assert r2.at - r1.at >= 4.5  # group_interval_s after the first flush (r1 came a moment after it)
    for request, _ in stage.hooks(org):
        spec_verify(SECRET, request.headers, request.body)


def test_a_group_in_the_outbox_is_sent_once_with_its_id_across_a_sigkill(stage):
    """The receiver refuses while the stage is killed with a group notification in its
    outbox; the restarted stage sends the same notification (same id, the same alerts),
    and nothing else."""
    in_one_hour()
    org = unique("grpkill")
    stage.failing.failing.add(org)
    stage.add_rule(org, rule_id="keys-denied", type="rate_limit_violations", window=HOUR, min_denials=1, scope="key",
                   group_wait_s=1, channels=["hook"])
    now = int(time.time() * 1000)
    asyncio.run(publish(stage.settings, [event(org, key, now, status=429) for key in ("k-a", "k-b")]))
    wait_for(lambda: len(stage.hooks(org)) >= 2, 30, "attempts at the group's firing",
             lambda: stage.pipeline.logs("alerts"))
    stage.pipeline.kill("alerts")
    stage.failing.failing.discard(org)
    stage.pipeline.start("alerts")
    wait_for(lambda: any(r.at > stage.pipeline.state("alerts").up_since for r, _ in stage.hooks(org)), 60,
             "the group's firing sent again", lambda: stage.pipeline.logs("alerts"))
    stage.send(org, "k-a", 1, status=429)  # still firing: nothing new
    ids = {r.headers["webhook-id"] for r, _ in stage.hooks(org)}
    assert len(ids) == 1, ids
    assert all([a["api_key_id"] for a in doc["data"]["alerts"]] == ["k-a", "k-b"] for _, doc in stage.hooks(org))
