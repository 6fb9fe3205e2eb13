"""A notification as a Slack incoming-webhook message: ``text`` (the notification's one
line, what Slack shows in a push notification) and ``blocks`` (a header, the details as
fields, the id and time as context). The channel's URL is its credential: errors say
"Slack answered HTTP 404: no_service", never the URL."""

from __future__ import annotations

import datetime as dt

import httpx
import orjson

from quotaflow.alerts.channels.http import check
from quotaflow.core.channels import SlackChannel
from quotaflow.schemas.alert_notifications import Notification

HEADER_MAX = 150  # Slack's limit for a header block's text
FIELD_MAX = 2000
EMOJI = {"firing": ":rotating_light:", "repeat": ":rotating_light:", "resolved": ":white_check_mark:",
         "test": ":test_tube:"}


def escape(text: str) -> str:
    """Text as Slack's mrkdwn shows it literally (&, <, > are its control characters)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def payload(notification: Notification) -> dict:
    n = notification
    when = dt.datetime.fromtimestamp(n.at_ms / 1000, tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    fields = [("Severity", n.severity), ("Subject", n.subject), ("Rule", f"{n.rule_id} ({n.rule_type})"),
              ("Value", "none" if n.value is None else f"{n.value:g}"), ("Threshold", f"{n.threshold:g}")]
    blocks: list[dict] = [
        {"type": "header", "text": {"type": "plain_text", "text": n.summary()[:HEADER_MAX], "emoji": True}},
        {"type": "section", "fields": [{"type": "mrkdwn", "text": f"*{name}*\n{escape(value)}"[:FIELD_MAX]}
                                       for name, value in fields]},
    ]
    if len(n.alerts) > 1:  # a group: one line per alert, as many as a section holds
        lines = [f"• {escape(a.subject)}: {'none' if a.value is None else f'{a.value:g}'}" for a in n.alerts]
        text = "\n".join(lines)
        if len(text) > FIELD_MAX:
            text = text[:FIELD_MAX - 20].rsplit("\n", 1)[0] + "\n• ..."
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": text}})
    if n.description:
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": escape(n.description)[:FIELD_MAX]}})
    blocks.append({"type": "context", "elements": [
        {"type": "mrkdwn", "text": escape(f"{n.kind} at {when} · id {n.id} · fingerprint {n.fingerprint}")}]})
    return {"text": f"{EMOJI[n.kind]} {escape(n.summary())}", "blocks": blocks}


async def send(notification: Notification, channel: SlackChannel, client: httpx.AsyncClient, timeout_s: float) -> None:
    response = await client.post(channel.url, content=orjson.dumps(payload(notification)),
                                 headers={"content-type": "application/json"}, timeout=timeout_s)
    check(response, "Slack")
