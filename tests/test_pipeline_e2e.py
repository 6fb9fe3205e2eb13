"""End to end on the real stack: events published to Kafka, counted by the Faust
processor into exact Redis decisions, stored by the sink in ClickHouse, and the
bad ones dead-lettered with their reason."""

from __future__ import annotations

import asyncio
import ipaddress

import orjson
import pytest

from collector.emitter import Emitter
from schemas import deadletter
from schemas.redis_keys import ORG_TIER_FIELD, Decision, decision_key, org_key
from schemas.topics import DEAD_LETTER_TOPIC
from tests.pipeline import event, minute_start, publish, read_all, unique, wait_for

pytestmark = pytest.mark.stack


def test_events_become_exact_decisions_rows_and_dead_letters(live_stack, redis_client, pipeline):
    free_org, starter_org, unset_org = unique("free"), unique("starter"), unique("unset")
    redis_client.hset(org_key(free_org), ORG_TIER_FIELD, "FREE")
    redis_client.hset(org_key(starter_org), ORG_TIER_FIELD, "STARTER")
    # key -> (org, events sent, expected limit)
    plan = {
        unique("free-over"): (free_org, 14, 10),
        unique("free-under"): (free_org, 9, 10),
        unique("starter-at"): (starter_org, 30, 30),
        unique("starter-under"): (starter_org, 29, 30),
        unique("unset-at"): (unset_org, 10, 10),  # an org without a tier is on FREE
    }
    window = minute_start()
    events = [event(org, key, window + 100 * i) for key, (org, n, _) in plan.items() for i in range(n)]
    raw_bad = [
        (free_org.encode(), orjson.dumps({**events[0].to_dict(), "event_id": "0e4a1d3c-0000-4000-8000-000000000001",
                                          "endpoint": "/v1/items/42"})),
        (free_org.encode(), b"GET /v1/items 200 12ms"),
        (free_org.encode(), orjson.dumps({k: v for k, v in events[1].to_dict().items() if k != "status"})),
    ]

    pipeline.start("processor")
    pipeline.start("sink")
    asyncio.run(publish(live_stack, events, raw_bad))

    async def emit_invalid_dict() -> bool:
        async with Emitter(live_stack.kafka_bootstrap) as emitter:
            return await emitter.emit({**events[2].to_dict(), "org_id": free_org, "status": 9000})

    assert asyncio.run(emit_invalid_dict()) is False  # refused at the collector, dead-lettered there

    def decisions() -> dict[str, Decision]:
        out = {}
        for key in plan:
            raw = redis_client.hgetall(decision_key(key))
            if raw:
                out[key] = Decision.from_redis(raw)
        return out

    expected_counts = {key: n for key, (_, n, _) in plan.items()}
    wait_for(lambda: {k: d.count for k, d in decisions().items()} == expected_counts, 90,
             "decisions with the exact counts", pipeline.logs)
    for key, d in decisions().items():
        org, n, limit = plan[key]
        assert (d.org_id, d.count, d.limit, d.remaining, d.allowed) == (org, n, limit, max(limit - n, 0), n < limit), key
        assert d.tier == ("STARTER" if org == starter_org else "FREE")
        assert d.reset_ms == window + 60_000 and d.window_s == 60
        assert redis_client.pttl(decision_key(key)) > 0  # decisions expire; Redis never fills with dead keys

    pipeline.wait_caught_up()
    pipeline.stop("sink")
    rows = pipeline.query_clickhouse(
        "SELECT toString(event_id), api_key_id, endpoint, status, latency_ms, client_ip, "
        "toUnixTimestamp64Milli(event_time) FROM requests WHERE org_id IN {orgs:Array(String)}",
        {"orgs": [free_org, starter_org, unset_org]})
    assert len(rows) == len(events)  # no loss, no duplicate
    by_id = {r[0]: r for r in rows}
    assert set(by_id) == {e.event_id for e in events}
    e = events[-1]
    assert by_id[e.event_id][1:] == (e.api_key_id, e.endpoint, e.status, e.latency_ms,
                                     ipaddress.ip_address("::ffff:198.51.100.7"), e.ts_ms)

    dead = [r for r in asyncio.run(read_all(live_stack, DEAD_LETTER_TOPIC))
            if r.key == free_org.encode() or free_org.encode() in r.value]
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
