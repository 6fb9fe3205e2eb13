"""The duplicate check shared by the processors and the sink (schemas/dedup.py), against
the real Redis: the first place that carried an event wins, however the events are cut
into calls, groups and script parts; the two stages' key spaces are independent; each
script call touches one org's keys."""

from __future__ import annotations

import asyncio
import uuid

import hypothesis
import pytest
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st

from quotaflow.schemas.dedup import DuplicateCheck
from quotaflow.schemas.redis_keys import seen_key, stored_key
from tests.pipeline import this_minute, unique

pytestmark = pytest.mark.stack


async def _check(url: str, key, calls: list[list[tuple]], part_events: int = DuplicateCheck.PART_EVENTS,
                 window_s: float = 60) -> list[list[bool]]:
    client = aioredis.Redis.from_url(url)
    try:
        check = DuplicateCheck(client, key, window_s)
        check.PART_EVENTS = part_events
        return [await check.duplicates(groups) for groups in calls]
    finally:
        await client.aclose()


def run(url: str, key, *calls: list[tuple], **kw) -> list[list[bool]]:
    return asyncio.run(_check(url, key, list(calls), **kw))


# An event: (id number, partition, position). Each id has its org and time (a copy of an
# event carries the same ones); ids drawn from a small pool, so copies and redeliveries
# (the same id at the same place again) are frequent.
STEPS = st.lists(st.tuples(st.integers(0, 7), st.integers(0, 1), st.integers(0, 5)), min_size=1, max_size=40)


@hypothesis.settings(max_examples=60, deadline=None)
@given(steps=STEPS, cuts=st.lists(st.integers(1, 40), max_size=4), part_events=st.integers(1, 5),
       minutes=st.lists(st.integers(0, 2), min_size=8, max_size=8), orgs=st.lists(st.integers(0, 1), min_size=8,
                                                                                 max_size=8))
def test_the_first_place_wins_however_the_events_are_cut(live_stack, steps, cuts, part_events, minutes, orgs):
    prefix, m = uuid.uuid4().hex[:8], this_minute()
    org_of = [f"o{orgs[i]}-{prefix}" for i in range(8)]
    ts_of = [m + minutes[i] * 60_000 + i for i in range(8)]
    id_of = [f"{prefix}-{i}" for i in range(8)]
    # The model: per id, the first place it was seen at; a duplicate is any other place.
    first: dict[int, tuple[int, int]] = {}
    want = []
    for i, partition, pos in steps:
        want.append(first.setdefault(i, (partition, pos)) != (partition, pos))
    # Cut into calls, each call into groups of consecutive events of one org and partition.
    bounds = sorted({0, len(steps), *(c for c in cuts if c < len(steps))})
    calls = []
    for lo, hi in zip(bounds, bounds[1:]):
        groups: list[tuple] = []
        for i, partition, pos in steps[lo:hi]:
            if groups and groups[-1][0] == org_of[i] and groups[-1][1] == partition:
                g = groups[-1]
            else:
                g = (org_of[i], partition, [], [], [])
                groups.append(g)
            g[2].append(ts_of[i])
            g[3].append(id_of[i])
            g[4].append(pos)
        calls.append(groups)
    got = run(live_stack.redis_url, stored_key, *calls, part_events=part_events)
    assert [a for answers in got for a in answers] == want


def test_the_two_stages_decide_apart(live_stack, redis_client):
    """The processor's seen ids and the sink's stored ids are separate key spaces: one
    stage's check does not make the other's first copy a duplicate."""
    org, m = unique("org"), this_minute()
    ids = [unique("ev") for _ in range(3)]
    first, copy = (org, 0, [m + 1] * 3, ids, [10, 11, 12]), (org, 0, [m + 1] * 3, ids, [20, 21, 22])
    assert run(live_stack.redis_url, seen_key, [first], [copy]) == [[False] * 3, [True] * 3]
    # The sink reads the copy first (say it was behind the processor's stream on another partition).
    assert run(live_stack.redis_url, stored_key, [copy], [first]) == [[False] * 3, [True] * 3]
    assert {redis_client.hget(seen_key(org, m), ids[0]), redis_client.hget(stored_key(org, m), ids[0])} == \
        {b"0:10", b"0:20"}
    assert 0 < redis_client.pttl(stored_key(org, m)) <= 60_000


def test_each_script_call_touches_one_org(live_stack):
    """One hash slot per call (the org is the keys' hash tag), in parts of PART_EVENTS."""
    check = DuplicateCheck(aioredis.Redis.from_url(live_stack.redis_url), stored_key, 60)
    check.PART_EVENTS = 3
    m = this_minute()
    groups = [("a", 0, [m, m + 60_000], ["x", "y"], [1, 2]), ("b", 0, [m] * 4, list("pqrs"), [3, 4, 5, 6]),
              ("a", 1, [m], ["z"], [7])]
    calls, n = check.prepare(groups)
    assert n == 7
    for call in calls:
        assert len({key.split("}")[0] for key in call.keys}) == 1
        assert call.events <= 3
    assert sorted(j for call in calls for spans in call.spans for span in spans for j in span) == list(range(7))


def test_each_hash_is_a_hash_table_and_ids_repeated_in_one_chunk_keep_their_first_place(live_stack, redis_client):
    """A hash of a few ids is a hash table (a listpack would be scanned for every id: see
    dedup.lua); an id twice in one chunk (the script's all-new path, whose HSET then adds
    fewer fields than it was given) keeps its first place, and its copy is a duplicate."""
    org, m = unique("org"), this_minute()
    a, b = unique("ev"), unique("ev")
    assert run(live_stack.redis_url, stored_key, [(org, 0, [m + 1] * 4, [a, b, a, b], [1, 2, 3, 2])]) == \
        [[False, False, True, False]]
    assert redis_client.object("encoding", stored_key(org, m)) == b"hashtable"
    assert redis_client.hget(stored_key(org, m), a) == b"0:1"
    # read again, the same places: no duplicates but the copy
    assert run(live_stack.redis_url, stored_key, [(org, 0, [m + 1] * 4, [a, b, a, b], [1, 2, 3, 2])]) == \
        [[False, False, True, False]]
    assert run(live_stack.redis_url, stored_key, [(org, 1, [m + 1], [a], [1])]) == [[True]]
