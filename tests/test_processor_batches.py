"""A batch as the processor counts it, against the real Redis (its duplicate check): the
one-event records of a batch are gathered per org (processors/records.py OneEventRecords)
and everything else is read record by record, so the counts must come out exactly as if
every event had been applied alone, in its partition's order (window_counts.apply_event),
whatever the mix of record shapes, copies and refusals."""

from __future__ import annotations

import asyncio
import time
import uuid
from types import SimpleNamespace

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings as hypothesis_settings, strategies as st

from quotaflow.processors.backend import RedisBackend
from quotaflow.processors.counter import DUPLICATE, RequestCounter
from quotaflow.processors.metrics import EVENTS
from quotaflow.processors.offset_guard import OffsetGuard
from quotaflow.processors.output import Output
from quotaflow.processors.subjects import is_key_subject, key_subject, org_subject
from quotaflow.processors.window_counts import COUNTED, LATE, apply_event
from quotaflow.schemas.dedup import position
from quotaflow.schemas.event_decoding import encode_batch
from quotaflow.schemas.events import time_bounds_from_settings
from quotaflow.schemas.limits import policy_from_settings
from quotaflow.schemas.redis_keys import seen_key
from quotaflow.schemas.topics import DEAD_LETTER_TOPIC, EVENTS_TOPIC
from tests.pipeline import event

pytestmark = pytest.mark.stack

ORGS, KEYS = 2, 3
LOG_APPEND_TIME = 1

# A record: one event (its org, key, seconds before the record arrived (after, when negative:
# within the clock skew accepted), refused by a limiter, or a copy of an earlier event of its
# org), or several events of one org.
one_event = st.tuples(st.just("one"), st.integers(0, ORGS - 1), st.integers(0, KEYS - 1), st.integers(-60, 200),
                      st.booleans(), st.booleans())
several = st.tuples(st.just("many"), st.integers(0, ORGS - 1),
                    st.lists(st.tuples(st.integers(0, KEYS - 1), st.integers(-60, 200)), min_size=2, max_size=4))
shapes = st.lists(st.one_of(one_event, one_event, several), min_size=1, max_size=40)


def build(shapes: list, prefix: str, now_ms: int) -> tuple[list, list]:
    """(records as the consumer hands them over, on partition 0 from offset 0; per record,
    its events as (event, counted or not: False for a copy or a refusal))."""
    records, expected = [], []
    taken: dict[int, list] = {o: [] for o in range(ORGS)}  # org -> its events so far, to copy
    for offset, shape in enumerate(shapes):
        org = f"{prefix}-o{shape[1]}"
        if shape[0] == "one":
            _, o, k, ago_s, refused, copy = shape
            if copy and taken[o]:
                ev, counts = taken[o][k % len(taken[o])], False
            else:
                ev = event(org, f"{prefix}-k{k}", now_ms - ago_s * 1000, status=429 if refused else 200)
                counts = not refused
            events = [(ev, counts)]
            value = ev.encode()
        else:
            events = [(event(org, f"{prefix}-k{k}", now_ms - ago_s * 1000), True) for k, ago_s in shape[2]]
            value = encode_batch([ev for ev, _ in events])
        taken[shape[1]] += [ev for ev, counts in events if counts]
        records.append(SimpleNamespace(topic=EVENTS_TOPIC, partition=0, offset=offset, timestamp=now_ms,
                                       timestamp_type=LOG_APPEND_TIME, key=org.encode(), value=value))
        expected.append(events)
    return records, expected


def outcomes() -> dict[str, float]:
    return {o: EVENTS.labels(o)._value.get() for o in (COUNTED, LATE, DUPLICATE, "rejected")}


@hypothesis_settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shapes=shapes)
def test_a_batch_counts_as_its_events_applied_one_by_one(live_stack, shapes):
    policy = policy_from_settings(live_stack)
    now_ms = int(time.time() * 1000)
    records, expected = build(shapes, uuid.uuid4().hex[:10], now_ms)

    # What the batch must come to: each event that counts applied alone, in offset order.
    model: dict[str, dict] = {}
    want = dict.fromkeys((COUNTED, LATE, DUPLICATE, "rejected"), 0)
    for record, events in zip(records, expected, strict=True):
        for index, (ev, counts) in enumerate(events):
            if ev.status == 429:
                want["rejected"] += 1
                continue
            if not counts:
                want[DUPLICATE] += 1
                continue
            for subject in (org_subject(ev.org_id), key_subject(ev.org_id, ev.api_key_id)):
                outcome, state = apply_event(model.get(subject), ev.ts_ms, 0, position(record.offset, index), policy,
                                             min(ev.ts_ms, record.timestamp))
                model[subject] = state if state is not None else model[subject]
                if is_key_subject(subject):  # the counter counts outcomes by keys
                    want[outcome] += 1

    before = outcomes()
    data = asyncio.run(count_alone(live_stack, policy, records))
    after = outcomes()
    assert {k: v for k, v in data.items() if not k.startswith("__")} == model
    assert data["__next_offset__/0"] == len(records)
    assert {o: after[o] - before[o] for o in want} == want


def test_records_of_one_org_are_counted_in_offset_order_whatever_their_shape(live_stack, redis_client):
    """One-event records gathered, then a batch record of the same org, then more one-event
    records: each subject's last applied position is its last event's, and of an event and
    its copy in a later batch record, the copy is the duplicate (the event keeps its place,
    which a redelivery of its record is recognised by)."""
    policy = policy_from_settings(live_stack)
    prefix, now_ms = uuid.uuid4().hex[:10], int(time.time() * 1000)
    org, other = f"{prefix}-o0", f"{prefix}-o1"
    k0, k1, k2 = (f"{prefix}-k{i}" for i in range(3))
    first = event(org, k0, now_ms - 3000)
    values = [first.encode(), event(org, k1, now_ms - 2000).encode(),
              encode_batch([first, event(org, k2, now_ms - 1000)]),  # a copy of the first, and a new event
              event(org, k0, now_ms - 500).encode(), event(other, k0, now_ms).encode()]
    records = [SimpleNamespace(topic=EVENTS_TOPIC, partition=0, offset=offset, timestamp=now_ms,
                               timestamp_type=LOG_APPEND_TIME, key=b"", value=value)
               for offset, value in enumerate(values)]

    before = EVENTS.labels(DUPLICATE)._value.get()
    data = asyncio.run(count_alone(live_stack, policy, records))
    assert EVENTS.labels(DUPLICATE)._value.get() - before == 1  # the copy inside the batch record
    assert redis_client.hget(seen_key(org, first.ts_ms), first.event_id) == f"0:{position(0, 0)}".encode()
    assert data[org_subject(org)]["o"] == position(3, 0)  # the one-event record after the batch record
    assert data[key_subject(org, k0)]["o"] == position(3, 0)
    assert data[key_subject(org, k1)]["o"] == position(1, 0)
    assert data[key_subject(org, k2)]["o"] == position(2, 1)
    assert data[org_subject(other)]["o"] == position(4, 0)
    day = data[org_subject(org)]["b"][-1]
    assert sum(count for _, count in day) == 4  # k0, k1, the batch record's new event, k0 again


async def count_alone(live_stack, policy, records) -> dict:
    """The table after counting records as one batch (not finished: nothing is written)."""
    client = aioredis.Redis.from_url(live_stack.redis_url)
    # Never started: these records need no dead letter nor forwarding.
    output = Output(live_stack.kafka_bootstrap, "unused", DEAD_LETTER_TOPIC, EVENTS_TOPIC)
    try:
        table = SimpleNamespace(data={})

        async def unused(*args):
            raise AssertionError("no record is skipped")

        counter = RequestCounter(table, output, RedisBackend(client, policy), OffsetGuard(table.data, unused, unused),
                                 time_bounds_from_settings(live_stack), partitions=1)
        events, _ = await counter.count(await counter.read(records))
        assert events == sum(1 if r.value[:1] == b"{" else r.value.count(b'"event_id"') for r in records)
        return table.data
    finally:
        await output.stop()
        await client.aclose()
