"""Delivery of a notification to a channel (quotaflow/core/channels.py), one module per
kind: ``email.py`` (SMTP), ``webhook.py`` (signed as the Standard Webhooks spec says),
``slack.py`` (an incoming webhook).

``deliver`` tries a channel up to its attempts, each within its timeout, with the one
retry policy (quotaflow/core/retry.py: exponential backoff, full jitter). Every attempt
carries the same notification id (the webhook-id). A failure a retry cannot fix (the
receiver refused the request: 4xx, a 5xx SMTP reply) is not retried. After the last
attempt the notification goes to the dead-letter topic with the reason
(schemas/deadletter.py, stage "alerts"). Errors, logs and metrics name the channel, never
its URL or secret: a channel module's errors are built from status codes and exception
types, and every message also passes through ``hide`` (the channel's own secrets) and
quotaflow/core/redact.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Protocol

import httpx
from prometheus_client import Counter

from quotaflow.core.channels import Channel, EmailChannel, SlackChannel, WebhookChannel
from quotaflow.core import redact as redaction
from quotaflow.core.redact import MASK, redact
from quotaflow.core.retry import retry
from quotaflow.core.settings import Settings
from quotaflow.schemas import deadletter
from quotaflow.schemas.alert_notifications import Notification

log = logging.getLogger(__name__)
# httpx logs every request's URL at info ("HTTP Request: POST https://hooks.slack.com/..."),
# and a Slack URL is a credential: its warnings are enough here.
logging.getLogger("httpx").setLevel(logging.WARNING)

ATTEMPTS = Counter("quotaflow_alert_delivery_attempts_total", "Attempts to deliver an alert notification",
                   ["channel", "outcome"])  # outcome: ok, retry, failed
NOTIFICATIONS = Counter("quotaflow_alert_notifications_total", "Alert notifications, by channel and outcome",
                        ["channel", "outcome"])  # outcome: delivered, dead_lettered


class DeliveryError(Exception):
    """An attempt failed; the message is safe to show (no URL, no secret). ``permanent``:
    trying again would fail the same way."""

    def __init__(self, message: str, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


class DeadLetters(Protocol):
    async def __call__(self, value: bytes, headers: list[tuple[str, bytes]]) -> None: ...


@dataclass(frozen=True)
class Policy:
    attempts: int
    timeout_s: float
    first_s: float = 0.5  # the first wait at most; each next at most twice the one before
    max_s: float = 60.0

    @classmethod
    def of(cls, channel: Channel, settings: Settings) -> "Policy":
        return cls(attempts=channel.attempts or settings.alert_attempts,
                   timeout_s=channel.timeout_s or settings.alert_timeout_s, max_s=settings.alert_retry_max_s)


@dataclass(frozen=True)
class Outcome:
    channel: str
    delivered: bool
    attempts: int
    error: str | None = None  # the last attempt's, safe to show


Send = Callable[[Notification, float], Awaitable[None]]
OnAttempt = Callable[[int, str, str | None], Awaitable[None]]


def hide(text: object, channel: Channel) -> str:
    """``text`` with the channel's secrets (and every registered one) replaced by ***."""
    s = str(text)
    for secret in sorted(channel.secrets(), key=len, reverse=True):
        if len(secret) >= 4:
            s = s.replace(secret, MASK)
    return redact(s)


def sender(channel: Channel, settings: Settings, client: httpx.AsyncClient) -> Send:
    from quotaflow.alerts.channels import email, slack, webhook

    if isinstance(channel, EmailChannel):
        return lambda n, timeout_s: email.send(n, channel, settings, timeout_s)
    if isinstance(channel, WebhookChannel):
        return lambda n, timeout_s: webhook.send(n, channel, client, timeout_s)
    if isinstance(channel, SlackChannel):
        return lambda n, timeout_s: slack.send(n, channel, client, timeout_s)
    raise TypeError(f"no delivery for {type(channel).__name__}")


async def deliver(notification: Notification, name: str, channel: Channel, settings: Settings, *,
                  dead_letters: DeadLetters | None, client: httpx.AsyncClient | None = None,
                  policy: Policy | None = None, on_attempt: OnAttempt | None = None) -> Outcome:
    """Deliver ``notification`` on channel ``name``: retried, then dead-lettered.
    ``on_attempt(attempt, outcome, error)`` hears of each attempt (outcome ok or failed)."""
    policy = policy or Policy.of(channel, settings)
    redaction.register(*channel.secrets())  # settings do for theirs; a channel made otherwise too
    own_client = client is None
    client = client or httpx.AsyncClient(follow_redirects=False)
    send = sender(channel, settings, client)
    attempt = 0

    async def once() -> None:
        nonlocal attempt
        attempt += 1
        try:
            await attempt_once()
        except DeliveryError as exc:
            if on_attempt is not None:
                await on_attempt(attempt, "failed", str(exc))
            raise
        if on_attempt is not None:
            await on_attempt(attempt, "ok", None)

    async def attempt_once() -> None:
        try:
            await asyncio.wait_for(send(notification, policy.timeout_s), policy.timeout_s)
        except DeliveryError:
            ATTEMPTS.labels(name, "failed").inc()
            raise
        except (asyncio.TimeoutError, TimeoutError):
            ATTEMPTS.labels(name, "failed").inc()
            raise DeliveryError(f"no answer within {policy.timeout_s:g} s") from None
        except Exception as exc:  # a library's error: its type and message, secrets hidden
            ATTEMPTS.labels(name, "failed").inc()
            raise DeliveryError(hide(f"{type(exc).__name__}: {exc}", channel)[:500]) from None
        ATTEMPTS.labels(name, "ok").inc()

    def last(exc: BaseException) -> bool:
        return attempt >= policy.attempts or (isinstance(exc, DeliveryError) and exc.permanent)

    try:
        await retry(once, f"alert delivery on {name}", on=DeliveryError, unless=last, first_s=policy.first_s,
                    max_s=policy.max_s, logger=log,
                    extra={"channel": name, "notification_id": notification.id})
    except DeliveryError as exc:
        reason = f"alert delivery on channel {name} failed after {attempt} attempt{'s' * (attempt != 1)}: {exc}"
        log.error("alert notification given up", extra={"channel": name, "notification_id": notification.id,
                                                        "attempts": attempt, "error": str(exc)})
        if dead_letters is not None:
            headers = deadletter.headers(reason, deadletter.STAGE_ALERTS, ts_ms=int(time.time() * 1000))
            headers += [(deadletter.HEADER_ALERT_CHANNEL, name.encode()),
                        (deadletter.HEADER_ALERT_NOTIFICATION_ID, notification.id.encode())]
            await dead_letters(notification.body(), headers)
        NOTIFICATIONS.labels(name, "dead_lettered").inc()
        return Outcome(name, False, attempt, str(exc))
    finally:
        if own_client:
            await client.aclose()
    NOTIFICATIONS.labels(name, "delivered").inc()
    log.info("alert notification delivered", extra={"channel": name, "notification_id": notification.id,
                                                    "kind": notification.kind, "attempts": attempt})
    return Outcome(name, True, attempt)


def kafka_dead_letters(producer) -> DeadLetters:
    """Dead letters through a started aiokafka producer, each acknowledged by the broker
    (tried again for up to a minute; then the error is raised to the caller)."""
    from aiokafka.errors import KafkaError

    from quotaflow.schemas.topics import DEAD_LETTER_TOPIC

    async def send(value: bytes, headers: list[tuple[str, bytes]]) -> None:
        await retry(lambda: producer.send_and_wait(DEAD_LETTER_TOPIC, value, headers=headers),
                    "alert dead letter", on=(KafkaError, OSError), give_up_after_s=60, logger=log)

    return send
