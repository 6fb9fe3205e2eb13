"""A notification as a webhook signed as the Standard Webhooks spec says:

    webhook-id: msg_...            the notification's id, the same on every retry
    webhook-timestamp: 1700000000  this attempt's time, unix seconds
    webhook-signature: v1,<base64 of HMAC-SHA256(secret, "<id>.<timestamp>.<body>")>

The secret is the channel's ``whsec_<base64>``; signing is the ``standardwebhooks``
package's. Each attempt is signed anew (its own timestamp, so a retry an hour later is
not refused as too old), with the same id, so a receiver dedupes on it.
"""

from __future__ import annotations

import datetime as dt
import time

import httpx
from standardwebhooks.webhooks import Webhook

from quotaflow.alerts.channels.http import check
from quotaflow.core.channels import WebhookChannel
from quotaflow.schemas.alert_notifications import Notification

USER_AGENT = "quotaflow-alerts/1"


def signed_headers(notification_id: str, body: bytes, secret: str, now_s: int) -> dict[str, str]:
    signature = Webhook(secret).sign(notification_id, dt.datetime.fromtimestamp(now_s, tz=dt.timezone.utc),
                                     body.decode())
    return {"webhook-id": notification_id, "webhook-timestamp": str(now_s), "webhook-signature": signature}


async def send(notification: Notification, channel: WebhookChannel, client: httpx.AsyncClient,
               timeout_s: float) -> None:
    body = notification.body()
    headers = {**signed_headers(notification.id, body, channel.secret, int(time.time())),
               "content-type": "application/json", "user-agent": USER_AGENT}
    response = await client.post(channel.url, content=body, headers=headers, timeout=timeout_s)
    check(response, "the webhook")
