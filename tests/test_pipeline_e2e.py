"""End to end on the real stack: events published to Kafka, counted by the Faust
processor into exact Redis decisions, stored by the sink in ClickHouse, and the
bad ones dead-lettered with their reason."""

from __future__ import annotations

import asyncio
import ipaddress

import orjson
import pytest

from quotaflow.collector.emitter import Emitter
from quotaflow.schemas import deadletter
from quotaflow.schemas.redis_keys import ORG_TIER_FIELD, org_key, usage_key
from quotaflow.schemas.topics import DEAD_LETTER_TOPIC
from tests.pipeline import counted, decision, event, minute_start, publish, read_all, unique, wait_for

pytestmark = pytest.mark.stack


def test_events_become_exact_decisions_rows_and_dead_letters(live_stack, redis_client, pipeline):
    free1, free2, starter, unset = unique("free1"), unique("free2"), unique("starter"), unique("unset")
    for org, tier in ((free1, "FREE"), (free2, "FREE"), (starter, "STARTER")):
        redis_client.hset(org_key(org), ORG_TIER_FIELD, tier)
    # key -> (org, events sent)
    plan = {unique("f1"): (free1, 14), unique("f2"): (free2, 9), unique("sa"): (starter, 20),
            unique("sb"): (starter, 15), unique("u"): (unset, 10)}
    pipeline.start("processor")
    pipeline.start("sink")
    window = minute_start()
    events = [event(org, key, window + 100 * i) for key, (org, n) in plan.items() for i in range(n)]
    f2 = next(k for k, (org, _) in plan.items() if org == free2)
    refused = event(free2, f2, window + 5_000, status=429)  # refused by a limiter: stored, never counted
    raw_bad = [
        (free1.encode(), orjson.dumps({**events[0].to_dict(), "event_id": "0e4a1d3c-0000-4000-8000-000000000001",
                                       "endpoint": "/v1/items/42"})),
        (free1.encode(), b"GET /v1/items 200 12ms"),
        (free1.encode(), orjson.dumps({k: v for k, v in events[1].to_dict().items() if k != "status"})),
    ]

    asyncio.run(publish(live_stack, events + [refused], raw_bad))

    async def emit_invalid_dict() -> bool:
        async with Emitter(live_stack.kafka_bootstrap) as emitter:
            return await emitter.emit({**events[2].to_dict(), "org_id": free1, "status": 9000})

    assert asyncio.run(emit_invalid_dict()) is False  # refused at the collector, dead-lettered there

    expected = {key: n for key, (_, n) in plan.items()}
    wait_for(lambda: {k: counted(redis_client, org, k, window) for k, (org, _) in plan.items()} == expected, 90,
             "exact per-key counts", pipeline.logs)
    assert counted(redis_client, starter, None, window) == 35  # the org counts all its keys
    assert counted(redis_client, free2, None, window) == 9  # the 429 was not counted
    # (allowed, limit, remaining, binding window, denied by, tier) as the processors last wrote them
    want = {
        "f1": (False, 10, 0, "key:60s", "key:60s", "FREE"),
        "f2": (True, 10, 1, "key:60s", "", "FREE"),
        "sa": (False, 30, 0, "org:60s", "org:60s", "STARTER"),  # its org is over, though the key is not
        "sb": (False, 30, 0, "org:60s", "org:60s", "STARTER"),
        "u": (False, 10, 0, "key:60s", "key:60s", "FREE"),  # no tier set: the default tier
    }
    for key, (org, _) in plan.items():
        d = decision(redis_client, org, key)
        assert (d.allowed, d.limit, d.remaining, d.window, d.denied_by, d.tier) == want[key.split("-")[0]], key
        if not d.allowed:
            assert d.reset_ms == window + 60_000
        assert redis_client.pttl(usage_key(org, key)) > 0  # usage expires; Redis never fills with dead keys
    events.append(refused)

    pipeline.wait_caught_up()
    pipeline.stop("sink")
    rows = pipeline.query_clickhouse(
        "SELECT toString(event_id), api_key_id, endpoint, status, latency_ms, client_ip, "
        "toUnixTimestamp64Milli(event_time) FROM requests WHERE org_id IN {orgs:Array(String)}",
        {"orgs": [free1, free2, starter, unset]})
    assert len(rows) == len(events)  # no loss, no duplicate
    by_id = {r[0]: r for r in rows}
    assert set(by_id) == {e.event_id for e in events}
    e = events[-1]
    assert by_id[e.event_id][1:] == (e.api_key_id, e.endpoint, e.status, e.latency_ms,
                                     ipaddress.ip_address("::ffff:198.51.100.7"), e.ts_ms)

    dead = [r for r in asyncio.run(read_all(live_stack, DEAD_LETTER_TOPIC))
            if r.key == free1.encode() or free1.encode() in (r.value or b"")]  # a tombstone's is None
    got = sorted((deadletter.read_headers(r.headers)[deadletter.HEADER_STAGE],
                  deadletter.read_headers(r.headers)[deadletter.HEADER_REASON]) for r in dead)
    assert got == sorted([
        ("processor", "endpoint: segment '42' looks like a raw id; publish the route template (for example /users/{id}), got '/v1/items/42'"),
        ("processor", "event: not valid UTF-8 JSON (unexpected character, expected a JSON value: line 1 column 1 (char 0))"),
        ("processor", "status: required field is missing"),
        ("collector", "status: must be between 100 and 599, got 9000"),
    ])
    processor_dead = [r for r in dead if deadletter.read_headers(r.headers)[deadletter.HEADER_STAGE] == "processor"]
    assert sorted(r.value for r in processor_dead) == sorted(v for _, v in raw_bad)  # original bytes kept for replay
