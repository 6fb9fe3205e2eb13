"""What an HTTP answer means for a delivery (webhooks and Slack alike)."""

from __future__ import annotations

import httpx

from quotaflow.alerts.channels import DeliveryError

# Worth another attempt: the receiver is busy, throttling or failing for now.
RETRIED = frozenset({408, 409, 425, 429})


def check(response: httpx.Response, what: str) -> None:
    """Nothing for a 2xx; DeliveryError otherwise, permanent unless a retry may help. The
    message has the status and a bounded, single-line excerpt of the answer (a receiver's
    reason, e.g. Slack's invalid_payload), never the URL."""
    status = response.status_code
    if 200 <= status < 300:
        return
    excerpt = " ".join(response.text[:200].split()) if response.content else ""
    reason = f"{what} answered HTTP {status}" + (f": {excerpt}" if excerpt else "")
    if 300 <= status < 400:
        raise DeliveryError(reason + " (a redirect: configure the URL it points to)", permanent=True)
    raise DeliveryError(reason, permanent=not (status >= 500 or status in RETRIED))
