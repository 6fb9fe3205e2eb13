"""A notification as an email through the SMTP server of QUOTAFLOW_SMTP_URL (aiosmtplib):

    smtp://[user:password@]host[:port]      port 25 by default; STARTTLS when offered
    smtp://...?starttls=require             STARTTLS or fail (587, say)
    smtps://[user:password@]host[:port]     TLS from the start, port 465 by default

The Message-ID derives from the notification id, and a resolved (or repeated) alert's
mail refers to its firing's, so mail clients thread an alert's messages together.
"""

from __future__ import annotations

import datetime as dt
from email.message import EmailMessage
from email.utils import format_datetime
from typing import NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

import aiosmtplib

from quotaflow.alerts.channels import DeliveryError, hide
from quotaflow.core.channels import EmailChannel
from quotaflow.core.settings import Settings
from quotaflow.schemas.alert_notifications import Notification

MESSAGE_ID_DOMAIN = "quotaflow.alerts"


class Server(NamedTuple):
    host: str
    port: int
    username: str | None
    password: str | None
    use_tls: bool
    start_tls: bool | None  # None: when the server offers it


def server(url: str) -> Server:
    parts = urlsplit(url)
    implicit = parts.scheme == "smtps"
    starttls = parse_qs(parts.query).get("starttls", ["auto"])[-1]
    return Server(parts.hostname or "localhost", parts.port or (465 if implicit else 25),
                  unquote(parts.username) if parts.username else None,
                  unquote(parts.password) if parts.password else None, implicit,
                  None if implicit or starttls == "auto" else starttls in ("require", "true", "yes"))


def message_id(notification_id: str) -> str:
    return f"<{notification_id}@{MESSAGE_ID_DOMAIN}>"


def message(notification: Notification, channel: EmailChannel, sender: str) -> EmailMessage:
    n = notification
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = ", ".join(channel.to)
    msg["Subject"] = f"quotaflow: {n.summary()}"
    msg["Message-ID"] = message_id(n.id)
    msg["Date"] = format_datetime(dt.datetime.fromtimestamp(n.at_ms / 1000, tz=dt.timezone.utc))
    msg["X-Quotaflow-Notification-Id"] = n.id
    msg["X-Quotaflow-Fingerprint"] = n.fingerprint
    if n.kind in ("resolved", "repeat") and len(n.alerts) <= 1:  # a group's threads are its alerts' own
        firing = message_id(f"msg_{n.fingerprint}_{n.episode}_firing")
        msg["In-Reply-To"] = firing
        msg["References"] = firing
    when = dt.datetime.fromtimestamp(n.at_ms / 1000, tz=dt.timezone.utc).isoformat(timespec="seconds")
    lines = [n.summary(), "", f"Org:        {n.org_id}"]
    if n.api_key_id:
        lines.append(f"API key:    {n.api_key_id}")
    if len(n.alerts) > 1:
        lines.append(f"Alerts:     {len(n.alerts)}")
        lines += [f"  - {a.subject}: {'none' if a.value is None else f'{a.value:g}'} (alert {a.fingerprint}, "
                  f"notification {a.id})" for a in n.alerts]
    lines += [f"Rule:       {n.rule_id} ({n.rule_type}, {'global' if n.rule_org_id == '*' else n.rule_org_id})",
              f"Severity:   {n.severity}", f"Value:      {'none' if n.value is None else f'{n.value:g}'}",
              f"Threshold:  {n.threshold:g}", f"When:       {when}", f"State:      {n.kind}"]
    if n.description:
        lines += ["", n.description]
    lines += ["", f"Notification {n.id}, alert {n.fingerprint}."]
    msg.set_content("\n".join(lines) + "\n")
    return msg


async def send(notification: Notification, channel: EmailChannel, settings: Settings, timeout_s: float) -> None:
    if settings.smtp_url is None:
        raise DeliveryError("no SMTP server configured (QUOTAFLOW_SMTP_URL)", permanent=True)
    s = server(settings.smtp_url)
    try:
        await aiosmtplib.send(message(notification, channel, settings.alert_email_from), hostname=s.host,
                              port=s.port, username=s.username, password=s.password, use_tls=s.use_tls,
                              start_tls=s.start_tls, timeout=timeout_s)
    except aiosmtplib.SMTPResponseException as exc:  # the server's reply: 5xx will not change on a retry
        text = hide(f"the SMTP server answered {exc.code}: {' '.join(str(exc.message).split())[:200]}", channel)
        raise DeliveryError(text.replace(s.password or "\0", "***"), permanent=500 <= exc.code < 600) from None
    except aiosmtplib.SMTPRecipientsRefused as exc:
        codes = sorted({r.code for r in exc.recipients})
        raise DeliveryError(f"the SMTP server refused every recipient ({', '.join(map(str, codes))})",
                            permanent=all(500 <= c < 600 for c in codes)) from None
    except (aiosmtplib.SMTPException, OSError) as exc:
        text = hide(f"SMTP: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}", channel)
        raise DeliveryError(text.replace(s.password or "\0", "***")) from None
