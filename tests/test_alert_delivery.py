"""Alert delivery (alerts/channels/) to real receivers on 127.0.0.1: webhooks signed as the
Standard Webhooks spec says (verified here by an implementation of the spec written from
its text, not the package that signs), Slack payloads checked for their shape by the
receiving server, email received by aiosmtpd; retries with the same webhook-id, timeouts,
permanent failures not retried, dead letters on the real dead-letter topic, and secrets
in none of the errors, logs or dead letters."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import time

import orjson
import pytest
from hypothesis import given, settings as hypothesis_settings, strategies as st

from quotaflow.alerts.channels import Policy, deliver, hide, kafka_dead_letters
from quotaflow.alerts.channels.email import message_id
from quotaflow.alerts.notifications import for_transition
from quotaflow.alerts.state import Alerts, Subject
from quotaflow.core.channels import EmailChannel, SlackChannel, WebhookChannel
from quotaflow.core.settings import Settings
from quotaflow.schemas import deadletter
from quotaflow.schemas.alert_notifications import Notification
from quotaflow.schemas.alert_rules import parse_rule
from tests.alert_receivers import HttpReceiver, Request, SmtpReceiver

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
FAST = Policy(attempts=3, timeout_s=2, first_s=0.01, max_s=0.05)
RULE = parse_rule(dict(type="usage_threshold", rule_id="daily-80", org_id="acme", window="1d", percent=80,
                       channels=["hook"], severity="high", description="80 % of the daily quota <!channel> & co"))


def notifications() -> tuple[Notification, Notification]:
    """A firing and its resolved, as the state machine makes them."""
    alerts, subject = Alerts(), Subject("acme", "key_web")
    (fired,) = alerts.observe(RULE, subject, 82.5, 1_700_000_000_000)
    (resolved,) = alerts.observe(RULE, subject, 10, 1_700_000_060_000)
    return (for_transition(RULE, subject, fired),
            for_transition(RULE, subject, resolved, started_ms=fired.at_ms))


def spec_verify(secret: str, headers: dict[str, str], body: bytes, tolerance_s: int = 300) -> None:
    """Standard Webhooks v1, from the spec's text: the secret is base64 after "whsec_"; the
    signed content is "{webhook-id}.{webhook-timestamp}.{body}"; the signature header is a
    space-separated list of "v1,<base64 HMAC-SHA256>"; the timestamp is unix seconds within
    a tolerance of now. Raises AssertionError naming what failed."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    msg_id, ts = headers["webhook-id"], headers["webhook-timestamp"]
    assert ts.isdigit() and abs(time.time() - int(ts)) <= tolerance_s, f"timestamp {ts} out of tolerance"
    expected = hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
    candidates = []
    for part in headers["webhook-signature"].split(" "):
        version, _, sig = part.partition(",")
        if version == "v1":
            candidates.append(base64.b64decode(sig))
    assert any(hmac.compare_digest(expected, c) for c in candidates), "no v1 signature matches"


def run(coro):
    return asyncio.run(coro)


def webhook(url: str, **over) -> WebhookChannel:
    return WebhookChannel(type="webhook", url=url, secret=SECRET, **over)


# --- webhooks ---------------------------------------------------------------------------

def test_a_webhook_is_signed_per_the_spec_and_carries_the_notification(settings):
    fired, resolved = notifications()
    with HttpReceiver() as receiver:
        for n in (fired, resolved):
            outcome = run(deliver(n, "hook", webhook(receiver.url()), settings, dead_letters=None, policy=FAST))
            assert outcome.delivered and outcome.attempts == 1
    assert len(receiver.requests) == 2
    for request, n in zip(receiver.requests, (fired, resolved)):
        spec_verify(SECRET, request.headers, request.body)
        assert request.headers["webhook-id"] == n.id and request.headers["content-type"] == "application/json"
        body = orjson.loads(request.body)
        assert body["type"] == ("alert.firing" if n is fired else "alert.resolved")
        assert body["data"]["fingerprint"] == n.fingerprint and body["data"]["value"] == n.value
        assert body["data"]["org_id"] == "acme" and body["data"]["api_key_id"] == "key_web"
        assert body["timestamp"].endswith("Z")
    assert receiver.requests[0].headers["webhook-id"] != receiver.requests[1].headers["webhook-id"]


def test_a_tampered_body_or_another_secret_does_not_verify():
    """The verifier above can fail (so the test before it means something)."""
    fired, _ = notifications()
    from quotaflow.alerts.channels.webhook import signed_headers

    body = fired.body()
    headers = signed_headers(fired.id, body, SECRET, int(time.time()))
    spec_verify(SECRET, headers, body)
    with pytest.raises(AssertionError):
        spec_verify(SECRET, headers, body.replace(b"82.5", b"12.5"))
    with pytest.raises(AssertionError):
        spec_verify("whsec_" + base64.b64encode(b"x" * 32).decode(), headers, body)
    with pytest.raises(AssertionError):
        spec_verify(SECRET, {**headers, "webhook-id": "msg_other"}, body)


@hypothesis_settings(max_examples=200, deadline=None)
@given(key=st.binary(min_size=24, max_size=64), msg_id=st.from_regex(r"msg_[A-Za-z0-9_]{1,40}", fullmatch=True),
       body=st.binary(max_size=2000).map(lambda b: b.decode("latin-1").encode()))
def test_any_body_signed_by_the_channel_verifies_by_the_spec(key, msg_id, body):
    from quotaflow.alerts.channels.webhook import signed_headers

    secret = "whsec_" + base64.b64encode(key).decode()
    spec_verify(secret, signed_headers(msg_id, body, secret, int(time.time())), body)


def test_retries_carry_the_same_webhook_id_each_signed_for_its_own_attempt(settings):
    fired, _ = notifications()
    with HttpReceiver([(503, b"busy", 0), (429, b"slow down", 0), (200, b"ok", 0)]) as receiver:
        outcome = run(deliver(fired, "hook", webhook(receiver.url()), settings, dead_letters=None, policy=FAST))
    assert outcome.delivered and outcome.attempts == 3
    assert [r.headers["webhook-id"] for r in receiver.requests] == [fired.id] * 3
    assert len({r.body for r in receiver.requests}) == 1
    for request in receiver.requests:
        spec_verify(SECRET, request.headers, request.body)


def test_a_refusal_is_not_retried_and_goes_to_the_dead_letters(settings):
    fired, _ = notifications()
    dead: list[tuple[bytes, list]] = []

    async def keep(value, headers):
        dead.append((value, headers))

    with HttpReceiver([(400, b"unknown event type", 0)]) as receiver:
        outcome = run(deliver(fired, "hook", webhook(receiver.url()), settings, dead_letters=keep, policy=FAST))
    assert not outcome.delivered and outcome.attempts == 1 and len(receiver.requests) == 1
    assert "HTTP 400: unknown event type" in outcome.error
    (value, headers), = dead
    assert Notification.from_body(value) == fired
    h = deadletter.read_headers(headers)
    assert h[deadletter.HEADER_STAGE] == "alerts" and h[deadletter.HEADER_ALERT_CHANNEL] == "hook"
    assert h[deadletter.HEADER_ALERT_NOTIFICATION_ID] == fired.id
    assert "after 1 attempt" in h[deadletter.HEADER_REASON]


def test_a_slow_receiver_times_out_per_attempt_then_the_last_attempt_is_dead_lettered(settings):
    fired, _ = notifications()
    dead = []

    async def keep(value, headers):
        dead.append(value)

    policy = Policy(attempts=2, timeout_s=0.3, first_s=0.01, max_s=0.02)
    started = time.monotonic()
    with HttpReceiver([(200, b"ok", 1.5)]) as receiver:
        outcome = run(deliver(fired, "hook", webhook(receiver.url()), settings, dead_letters=keep, policy=policy))
    assert time.monotonic() - started < 1.5  # neither attempt waited for the receiver
    assert not outcome.delivered and outcome.attempts == 2 and "no answer within 0.3 s" in outcome.error
    assert len(dead) == 1 and len(receiver.requests) == 2


@pytest.mark.stack
def test_the_dead_letter_lands_on_the_dead_letter_topic(live_stack):
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    from quotaflow.schemas.topics import DEAD_LETTER_TOPIC

    fired, _ = notifications()

    async def scenario():
        producer = AIOKafkaProducer(bootstrap_servers=live_stack.kafka_bootstrap, acks="all")
        await producer.start()
        try:
            with HttpReceiver([(410, b"gone", 0)]) as receiver:
                outcome = await deliver(fired, "hook", webhook(receiver.url()), live_stack,
                                        dead_letters=kafka_dead_letters(producer), policy=FAST)
        finally:
            await producer.stop()
        assert not outcome.delivered
        consumer = AIOKafkaConsumer(bootstrap_servers=live_stack.kafka_bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            tp = TopicPartition(DEAD_LETTER_TOPIC, 0)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            end = (await consumer.end_offsets([tp]))[tp]
            found = []
            while await consumer.position(tp) < end:
                for records in (await consumer.getmany(timeout_ms=1000)).values():
                    found += [r for r in records
                              if deadletter.read_headers(r.headers).get(deadletter.HEADER_ALERT_NOTIFICATION_ID)
                              == fired.id]
            return found
        finally:
            await consumer.stop()

    (record,) = run(scenario())
    assert Notification.from_body(record.value) == fired
    assert "HTTP 410" in deadletter.read_headers(record.headers)[deadletter.HEADER_REASON]


# --- Slack ------------------------------------------------------------------------------

def slack_shape(request: Request):
    """What Slack's incoming webhooks accept, checked as a receiver would: JSON with a
    non-empty ``text`` and ``blocks`` of known types within Slack's limits."""
    problems = []
    if request.headers.get("content-type") != "application/json":
        problems.append("content-type")
    try:
        payload = orjson.loads(request.body)
    except orjson.JSONDecodeError:
        return 400, b"invalid_payload", 0
    if not isinstance(payload.get("text"), str) or not payload["text"].strip():
        problems.append("no_text")
    blocks = payload.get("blocks")
    if not isinstance(blocks, list) or not 1 <= len(blocks) <= 50:
        problems.append("blocks")
    for block in blocks or []:
        kind = block.get("type")
        if kind == "header":
            ok = block["text"]["type"] == "plain_text" and 0 < len(block["text"]["text"]) <= 150
        elif kind == "section":
            fields = block.get("fields", [])
            ok = ("text" in block or fields) and len(fields) <= 10 and all(
                f["type"] in ("mrkdwn", "plain_text") and len(f["text"]) <= 2000 for f in fields)
        elif kind == "context":
            ok = 1 <= len(block["elements"]) <= 10
        else:
            ok = False
        if not ok:
            problems.append(f"block {kind}")
    return (400, ("invalid_blocks: " + ", ".join(problems)).encode(), 0) if problems else (200, b"ok", 0)


def test_slack_gets_text_and_blocks_in_the_shape_it_accepts(settings):
    fired, resolved = notifications()
    with HttpReceiver(judge=slack_shape) as receiver:
        channel = SlackChannel(type="slack", url=receiver.url("/services/T000/B000/XXXXXXXXXXXX"))
        for n in (fired, resolved):
            outcome = run(deliver(n, "slack", channel, settings, dead_letters=None, policy=FAST))
            assert outcome.delivered, outcome.error
    first, second = (orjson.loads(r.body) for r in receiver.requests)
    assert "FIRING" in first["text"] and "daily-80" in first["text"] and "RESOLVED" in second["text"]
    text = orjson.dumps(first).decode()
    assert "<!channel>" not in text and "&lt;!channel&gt; &amp; co" in text  # the description cannot ping


def test_slack_refusing_the_payload_is_reported_without_the_url(settings, caplog):
    secret_path = "/services/T000/B000/s3cr3tT0k3nXYZ"
    with HttpReceiver([(404, b"no_service", 0)]) as receiver:
        channel = SlackChannel(type="slack", url=receiver.url(secret_path))
        with caplog.at_level(logging.DEBUG):
            outcome = run(deliver(notifications()[0], "slack", channel, settings, dead_letters=None, policy=FAST))
    assert not outcome.delivered and outcome.error == "Slack answered HTTP 404: no_service"
    assert "s3cr3tT0k3nXYZ" not in caplog.text
    assert all("s3cr3tT0k3nXYZ" not in str(vars(r)) for r in caplog.records)
    from prometheus_client import generate_latest

    metrics = generate_latest().decode()
    assert 'quotaflow_alert_notifications_total{channel="slack",outcome="dead_lettered"}' in metrics
    assert "s3cr3tT0k3nXYZ" not in metrics


# --- email ------------------------------------------------------------------------------

def email_settings(port: int, credentials: str = "") -> Settings:
    return Settings(smtp_url=f"smtp://{credentials}127.0.0.1:{port}", alert_email_from="alerts@quotaflow.test")


def test_email_arrives_at_the_smtp_server_and_the_resolved_threads_under_the_firing():
    fired, resolved = notifications()
    channel = EmailChannel(type="email", to=("ops@acme.test", "oncall@acme.test"))

    async def scenario():
        async with SmtpReceiver(("alerts", "smtp-pass-5f0e")) as smtp:
            settings = email_settings(smtp.port, "alerts:smtp-pass-5f0e@")
            for n in (fired, resolved):
                outcome = await deliver(n, "ops-mail", channel, settings, dead_letters=None, policy=FAST)
                assert outcome.delivered, outcome.error
            return smtp.messages

    (sender, rcpts, first), (_, _, second) = run(scenario())
    assert sender == "alerts@quotaflow.test" and rcpts == ["ops@acme.test", "oncall@acme.test"]
    assert first["Subject"].startswith("quotaflow: [HIGH] FIRING: usage_threshold rule daily-80 for acme/key_web")
    assert first["Message-ID"] == message_id(fired.id) and first["X-Quotaflow-Fingerprint"] == fired.fingerprint
    body = first.get_content()
    assert "Value:      82.5" in body and "Threshold:  80" in body and "<!channel>" in body
    assert "RESOLVED" in second["Subject"] and second["In-Reply-To"] == first["Message-ID"]


def test_refused_smtp_credentials_are_not_retried_and_the_password_is_shown_nowhere(caplog):
    fired, _ = notifications()
    channel = EmailChannel(type="email", to=("ops@acme.test",))
    dead = []

    async def keep(value, headers):
        dead.append((value, headers))

    async def scenario():
        async with SmtpReceiver(("alerts", "right-pass-1234")) as smtp:
            settings = email_settings(smtp.port, "alerts:wrong-pass-9876@")
            with caplog.at_level(logging.DEBUG):
                outcome = await deliver(fired, "ops-mail", channel, settings, dead_letters=keep, policy=FAST)
            return outcome, smtp.messages

    outcome, received = run(scenario())
    assert not outcome.delivered and outcome.attempts == 1 and received == []
    assert "the SMTP server answered 535" in outcome.error
    shown = outcome.error + caplog.text + str([vars(r) for r in caplog.records]) + str(dead)
    assert "wrong-pass-9876" not in shown


def test_an_unreachable_smtp_server_is_retried_then_dead_lettered():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = []

    async def keep(value, headers):
        dead.append(value)

    outcome = run(deliver(notifications()[0], "ops-mail", EmailChannel(type="email", to=("ops@acme.test",)),
                          email_settings(port), dead_letters=keep, policy=FAST))
    assert not outcome.delivered and outcome.attempts == 3 and len(dead) == 1


# --- secrets ----------------------------------------------------------------------------

def test_channel_secrets_are_hidden_from_any_message():
    slack = SlackChannel(type="slack", url="https://hooks.slack.com/services/T0AAA/B0BBB/zzSecretzz")
    hook = WebhookChannel(type="webhook", url="https://example.test/h", secret=SECRET)
    text = f"failed POST {slack.url} with {SECRET} and {SECRET.removeprefix('whsec_')}"
    assert "zzSecretzz" not in hide(text, slack)
    assert SECRET.removeprefix("whsec_") not in hide(text, hook)


def test_configured_channel_secrets_are_redacted_in_config_check(tmp_path):
    import json
    import os
    import subprocess
    import sys

    channels = {"ops-slack": {"type": "slack", "url": "https://hooks.slack.com/services/T0/B0/slackTok3n99"},
                "acme-hook": {"type": "webhook", "org": "acme", "url": "https://acme.test/h", "secret": SECRET}}
    env = {**os.environ, "QUOTAFLOW_STATE_DIR": str(tmp_path), "QUOTAFLOW_ALERT_CHANNELS": json.dumps(channels),
           "QUOTAFLOW_SMTP_URL": "smtp://alerts:smtpPassw0rd@mail.test:587?starttls=require"}
    done = subprocess.run([sys.executable, "-m", "quotaflow", "config", "check"], capture_output=True, text=True,
                          env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    out = done.stdout + done.stderr
    assert "slackTok3n99" not in out and SECRET.removeprefix("whsec_") not in out and "smtpPassw0rd" not in out
    assert "QUOTAFLOW_ALERT_CHANNELS=" in out and '"acme-hook"' in out


@pytest.mark.parametrize("channels, named", [
    ({"Ops": {"type": "slack", "url": "https://x.test/a"}}, "channel #1"),
    ({"h": {"type": "webhook", "url": "https://x.test/a", "secret": "plain"}}, "h/webhook/secret"),
    ({"h": {"type": "slack", "url": "file:///etc/passwd"}}, "h/slack/url"),
    ({"m": {"type": "email", "to": ["not an address"]}}, "m/email/to"),
])
def test_bad_channels_stop_the_settings_naming_the_channel(channels, named, tmp_path):
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "QUOTAFLOW_STATE_DIR": str(tmp_path), "QUOTAFLOW_ALERT_CHANNELS": json.dumps(channels),
           "QUOTAFLOW_SMTP_URL": "smtp://127.0.0.1:25"}
    done = subprocess.run([sys.executable, "-m", "quotaflow", "config", "check"], capture_output=True, text=True,
                          env=env, timeout=60)
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, done.stderr
    assert "QUOTAFLOW_ALERT_CHANNELS" in done.stderr and named in done.stderr
