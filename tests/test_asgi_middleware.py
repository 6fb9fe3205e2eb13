"""The ASGI middleware in a Starlette service, with the real Redis, Kafka and processor."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from quotaflow.collector.emitter import Emitter
from quotaflow.gateway.asgi import RateLimitMiddleware
from quotaflow.gateway.limiter import RateLimiter
from quotaflow.schemas.events import decode_record
from quotaflow.schemas.redis_keys import ORG_TIER_FIELD, org_key, reservations_key
from quotaflow.schemas.topics import EVENTS_TOPIC
from tests.key_records import SECRETS, new_key
from tests.pipeline import counted, minute_start, read_all, unique, wait_for

pytestmark = pytest.mark.stack


def test_middleware_enforces_adds_headers_and_publishes_each_request(live_stack, redis_client, pipeline):
    """Requests present an API key; the events and the counts are the key's verified org and
    key id, whatever identity headers the client sends beside it."""
    org = unique("org")
    redis_client.hset(org_key(org), ORG_TIER_FIELD, "FREE")
    presented, record = new_key(redis_client, org)
    key = record.key_id
    victim = unique("victim")

    async def item(request):
        return JSONResponse({"id": request.path_params["item_id"]})

    async def scenario() -> tuple[list[httpx.Response], set[str]]:
        # a 5 s Redis budget (the socket's too, which from_settings sets from it): under load the
        # default 50 ms ran out in a full run, and the check failed open
        limiter = RateLimiter.from_settings(live_stack.model_copy(update={"key_hash_secrets": SECRETS,
                                                                          "gateway_timeout_ms": 5000}))
        async with Emitter(live_stack.kafka_bootstrap) as emitter:
            app = RateLimitMiddleware(Starlette(routes=[Route("/items/{item_id}", item)]), limiter, emitter,
                                      service="shop")
            transport = httpx.ASGITransport(app=app, client=("203.0.113.5", 4242))
            async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:
                anonymous = await client.get("/items/1", headers={"X-Api-Key-Id": key, "X-Org-Id": org})
                assert anonymous.status_code == 401 and anonymous.json()["error"] == "missing_key"  # not published
                # a spoofed identity beside the key is ignored: the key's record says who this is
                responses = [await client.get(f"/items/{i}", headers={
                    "Authorization": f"Bearer {presented}", "X-Api-Key-Id": "someone-else", "X-Org-Id": victim,
                    "User-Agent": "pytest"}) for i in range(12)]
            reserved = {m.decode() for m in await limiter._client.zrange(reservations_key(org, key), 0, -1)}
        await limiter.aclose()
        return responses, reserved

    minute_start(need_s=25)
    responses, reserved = asyncio.run(scenario())
    assert [r.status_code for r in responses] == [200] * 10 + [429] * 2
    assert responses[3].json() == {"id": "3"} and responses[3].headers["X-RateLimit-Remaining"] == "6"
    assert responses[-1].json()["window"] == "key:60s" and int(responses[-1].headers["Retry-After"]) >= 1

    records = asyncio.run(read_all(live_stack, EVENTS_TOPIC))
    assert not [r for r in records if r.key == victim.encode() or presented.encode() in r.value]
    events = [ev._asdict() for r in records if r.key == org.encode() for ev in decode_record(r.value)]
    assert {(e["org_id"], e["api_key_id"]) for e in events} == {(org, key)}
    assert sorted(e["status"] for e in events) == [200] * 10 + [429] * 2
    assert {e["endpoint"] for e in events} == {"/items/{item_id}"}  # the route template, never /items/7
    assert {e["client_ip"] for e in events} == {"203.0.113.5"} and {e["service"] for e in events} == {"shop"}
    assert {e["event_id"] for e in events if e["status"] == 200} == reserved  # each admitted request its reservation

    window = min(e["ts_ms"] for e in events) // 60_000 * 60_000
    pipeline.start("processor")
    wait_for(lambda: redis_client.zcard(reservations_key(org, key)) == 0, 60, "reservations released", pipeline.logs)
    assert counted(redis_client, org, key, window) == 10  # the two refusals are not counted
    assert list(redis_client.scan_iter(f"qf:v1:{{{victim}}}:*")) == []  # the spoofed org: nothing counted
