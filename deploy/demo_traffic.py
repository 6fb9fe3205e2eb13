"""Demo traffic: several orgs on different tiers, some keys over their per-minute
limit, and a trickle of malformed events from a "publisher in another language"."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

import orjson

from quotaflow.collector.emitter import Emitter
from quotaflow.schemas.events import RequestEvent
from quotaflow.schemas.tiers import Tier

SERVICE = "demo-shop"


@dataclass(frozen=True)
class DemoKey:
    org_id: str
    tier: Tier
    api_key_id: str
    per_minute: float  # request rate this key sends at


# Rates against per-minute limits, which hold for each key and for each org as a whole:
# FREE 10, STARTER 30, PROFESSIONAL 100, SCALE 200, ENTERPRISE 500.
DEMO_KEYS = (
    DemoKey("acme", Tier.ENTERPRISE, "acme-web", 240),  # 420/min together: under acme's 500
    DemoKey("acme", Tier.ENTERPRISE, "acme-mobile", 180),
    DemoKey("globex", Tier.PROFESSIONAL, "globex-api", 60),  # under 100/min, but refused once its org is over
    DemoKey("globex", Tier.PROFESSIONAL, "globex-crawler", 360),  # over 100/min
    DemoKey("initech", Tier.STARTER, "initech-batch", 120),  # over 30/min
    DemoKey("hooli", Tier.FREE, "hooli-dev", 60),  # over 10/min
    DemoKey("umbrella", Tier.FREE, "umbrella-test", 6),
)
DEMO_ORGS = {k.org_id: k.tier for k in DEMO_KEYS}

ENDPOINTS = (("GET", "/v1/orders"), ("GET", "/v1/orders/{id}"), ("POST", "/v1/orders"),
             ("GET", "/v1/users/{id}"), ("GET", "/v1/search"), ("POST", "/v1/payments"))
STATUSES = (200,) * 90 + (201,) * 4 + (404,) * 3 + (429,) + (500,) * 2
USER_AGENTS = ("demo-sdk-python/1.4", "okhttp/4.12.0", "Mozilla/5.0 (X11; Linux x86_64)", "curl/8.5.0")
INVALID_EVERY = 40  # one malformed record per this many valid ones


def valid_event(key: DemoKey, rng: random.Random) -> RequestEvent:
    method, endpoint = rng.choice(ENDPOINTS)
    return RequestEvent.new(
        org_id=key.org_id, api_key_id=key.api_key_id, service=SERVICE, endpoint=endpoint, method=method,
        status=rng.choice(STATUSES), latency_ms=round(rng.lognormvariate(3.3, 0.6), 2),
        request_bytes=rng.randint(0, 2048) if method == "POST" else 0, response_bytes=rng.randint(200, 20000),
        client_ip=f"203.0.113.{rng.randint(1, 254)}", user_agent=rng.choice(USER_AGENTS),
    )


def invalid_record(n: int, rng: random.Random) -> tuple[bytes, bytes]:
    """Mistakes a foreign publisher makes: raw paths, seconds for ms, missing fields, not JSON."""
    doc = valid_event(rng.choice(DEMO_KEYS), rng).to_dict()
    kind = n % 4
    if kind == 0:
        doc["endpoint"] = f"/v1/orders/{rng.randint(1000, 99999)}"
    elif kind == 1:
        doc["ts_ms"] = int(time.time())
    elif kind == 2:
        del doc["status"]
    else:
        return doc["org_id"].encode(), b"GET /v1/orders 200 12ms"
    return doc["org_id"].encode(), orjson.dumps(doc)


@dataclass
class TrafficStats:
    valid_sent: int = 0
    invalid_sent: int = 0
    first_ts_ms: int = 0
    last_ts_ms: int = 0


async def drive(emitter: Emitter, seconds: float, stats: TrafficStats, rate_scale: float = 1.0,
                seed: int | None = None) -> None:
    """Send at each key's rate for ``seconds``, spreading events evenly."""
    rng = random.Random(seed)
    credit = {k.api_key_id: rng.random() for k in DEMO_KEYS}
    stats.first_ts_ms = int(time.time() * 1000)
    start = last = time.monotonic()
    while (now := time.monotonic()) - start < seconds:
        dt, last = now - last, now
        for key in DEMO_KEYS:
            credit[key.api_key_id] += key.per_minute * rate_scale / 60.0 * dt
            while credit[key.api_key_id] >= 1:
                credit[key.api_key_id] -= 1
                ev = valid_event(key, rng)
                await emitter.emit(ev)
                stats.valid_sent += 1
                stats.last_ts_ms = ev.ts_ms
                if stats.valid_sent % INVALID_EVERY == 0:
                    await emitter.emit_bytes(*invalid_record(stats.invalid_sent, rng))
                    stats.invalid_sent += 1
        await asyncio.sleep(0.05)
    await emitter.flush()

