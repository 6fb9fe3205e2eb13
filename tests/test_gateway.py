"""The gateway side on the real Redis: check() exact at every tier's limit in every window,
overrides, reservations, the emergency switch, failing open or closed, headers."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import redis
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quotaflow.gateway.headers import rate_limit_headers
from quotaflow.gateway.limiter import UNAVAILABLE, RateLimiter, SyncRateLimiter, policy_script
from quotaflow.processors.backend import RedisBackend, SubjectWrite
from quotaflow.schemas.limits import window_count
from quotaflow.schemas.limits import DEFAULT_TIER_LIMITS, Policy, Window
from quotaflow.schemas.redis_keys import ORG_TIER_FIELD, Decision, WindowUsage, org_key, overrides_key, reservations_key
from quotaflow.schemas.tiers import Tier
from tests.pipeline import unique

pytestmark = pytest.mark.stack
WINDOWS = (Window(60), Window(3600), Window(86400))


def only(window_index: int, limit: int) -> tuple[int | None, ...]:
    return tuple(limit if i == window_index else None for i in range(len(WINDOWS)))


async def redis_now_ms(client: aioredis.Redis) -> int:
    """Redis's clock: the one a check reads (gateway/check.lua), so the one to wait on."""
    seconds, micros = await client.time()
    return seconds * 1000 + micros // 1000


async def until_redis_time(client: aioredis.Redis, at_ms: int, timeout_s: float = 70) -> None:
    """Return once Redis's clock has reached at_ms."""
    deadline = time.monotonic() + timeout_s
    while (now := await redis_now_ms(client)) < at_ms:
        assert time.monotonic() < deadline, f"Redis's clock did not reach {at_ms} (at {now})"
        await asyncio.sleep(min((at_ms - now) / 1000, 0.05))


async def wait_for_room(client: aioredis.Redis, window: Window, seconds: float = 15) -> None:
    """Start a burst only when its fixed window has time left by the checks' clock, so it
    never straddles a reset."""
    now = await redis_now_ms(client)
    if window.length_ms - now % window.length_ms < seconds * 1000:
        await until_redis_time(client, now - now % window.length_ms + window.length_ms)


async def seed(client: aioredis.Redis, policy, org: str, key: str, buckets: list) -> None:
    """Counts of a key and its org, written as the processors write them."""
    backend = RedisBackend(client, policy)
    await backend.send_write(backend.prepare_write([SubjectWrite(org, key, buckets), SubjectWrite(org, None, buckets)]))


async def burst(limiter: RateLimiter, key: str, org: str, n: int, concurrency: int = 100) -> list[Decision]:
    out: list[Decision] = []
    for start in range(0, n, concurrency):
        out += await asyncio.gather(*(limiter.check(key, org) for _ in range(min(concurrency, n - start))))
    return out


@pytest.mark.parametrize("window_index", [0, 1, 2], ids=["minute", "hour", "day"])
def test_every_tier_denies_at_exactly_its_limit_in_each_window(live_stack, window_index):
    """Each tier's limit of one window, the others lifted: exactly `limit` units admitted.
    For the minute every unit is a gateway reservation; for the hour and the day all but
    the last 20 are counts a processor wrote (as after a busy hour), the rest reservations."""
    window = WINDOWS[window_index]
    tiers = {t.value: only(window_index, DEFAULT_TIER_LIMITS[t.value][window_index]) for t in Tier}
    policy = Policy(windows=WINDOWS, tiers=tiers)

    async def scenario() -> dict[str, tuple[int, set[str]]]:
        client = aioredis.Redis.from_url(live_stack.redis_url, max_connections=100)
        limiter = RateLimiter(client, policy, timeout_ms=5000)
        out = {}
        for tier, limits in tiers.items():
            org, key = unique("org"), unique("key")
            limit = limits[window_index]
            await client.hset(org_key(org), ORG_TIER_FIELD, tier)
            await wait_for_room(client, window)
            prefilled = 0 if window_index == 0 else limit - 20
            if prefilled:
                now = await redis_now_ms(client)
                buckets = [[] for _ in WINDOWS]
                buckets[window_index] = [[now - now % window.length_ms, prefilled]]
                await seed(client, policy, org, key, buckets)
            decisions = await burst(limiter, key, org, limit - prefilled + 5)
            out[tier] = (prefilled + sum(d.allowed for d in decisions),
                         {d.denied_by for d in decisions if not d.allowed})
        await limiter.aclose()
        return out

    results = asyncio.run(scenario())
    assert results == {t: (tiers[t][window_index], {f"key:{window.label}"}) for t in tiers}


def test_decisions_count_down_and_name_the_denying_window(live_stack, redis_client):
    org, key = unique("org"), unique("key")
    redis_client.hset(org_key(org), ORG_TIER_FIELD, "FREE")

    async def scenario() -> list[Decision]:
        client = aioredis.Redis.from_url(live_stack.redis_url)
        limiter = RateLimiter(client, Policy(WINDOWS, DEFAULT_TIER_LIMITS), timeout_ms=5000)
        await wait_for_room(client, WINDOWS[0])
        out = [await limiter.check(key, org) for _ in range(12)]
        await limiter.aclose()
        return out

    ds = asyncio.run(scenario())
    assert [d.remaining for d in ds] == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 0, 0]
    assert [d.allowed for d in ds] == [True] * 10 + [False] * 2
    last = ds[-1]
    assert (last.limit, last.denied_by, last.tier) == (10, "key:60s", "FREE")
    assert last.reset_ms == last.now_ms - last.now_ms % 60_000 + 60_000
    assert 1 <= last.retry_after_s <= 60
    # rejected requests are not reserved: a retrying client is not locked out beyond the window
    assert redis_client.zcard(reservations_key(org, key)) == 10
    assert len({d.event_id for d in ds[:10]}) == 10


def test_a_key_override_takes_precedence_over_its_tier(live_stack, redis_client):
    org, limited, other = unique("org"), unique("limited"), unique("other")
    redis_client.hset(org_key(org), ORG_TIER_FIELD, "ENTERPRISE")
    redis_client.hset(overrides_key(org, limited), "60s", 5)

    async def scenario() -> tuple[int, int]:
        client = aioredis.Redis.from_url(live_stack.redis_url)
        limiter = RateLimiter(client, Policy(WINDOWS, DEFAULT_TIER_LIMITS), timeout_ms=5000)
        await wait_for_room(client, WINDOWS[0])
        a = sum(d.allowed for d in await burst(limiter, limited, org, 20))
        b = sum(d.allowed for d in await burst(limiter, other, org, 20))
        await limiter.aclose()
        return a, b

    assert asyncio.run(scenario()) == (5, 20)


def test_counts_written_by_processors_are_read_the_same_way_by_gateways(live_stack):
    """The contract between processor (buckets in Redis) and gateway (check.lua), for
    fixed and sliding windows: the gateway's 'used' equals window_count of the buckets."""
    policy = Policy(windows=(Window(60), Window(60 * 60, sliding=True)), tiers={"FREE": (1000, 1000)})
    org, key = unique("org"), unique("key")

    async def scenario() -> tuple[Decision, list]:
        client = aioredis.Redis.from_url(live_stack.redis_url)
        now = int(time.time() * 1000)
        minute = now - now % 60_000
        hour_bucket = policy.windows[1].bucket_ms
        buckets = [
            [[minute - 60_000, 7], [minute, 3]],  # the previous minute does not count
            [[now - 3_700_000 - (now % hour_bucket), 50], [now - now % hour_bucket - 10 * hour_bucket, 4],
             [now - now % hour_bucket, 2]],  # an hour and more ago: out of the sliding hour
        ]
        await seed(client, policy, org, key, buckets)
        d = await RateLimiter(client, policy, timeout_ms=5000).check(key, org)
        await client.aclose()
        return d, buckets

    d, buckets = asyncio.run(scenario())
    used = {w.name: w.used for w in d.windows}
    for i, window in enumerate(policy.windows):
        expected = window_count(buckets[i], window, d.now_ms) + 1  # + this request
        assert used[f"key:{window.label}"] == expected and used[f"org:{window.label}"] == expected
    assert used["key:60s"] == 4 and used["key:3600s"] == 7


def test_sliding_window_frees_units_as_they_age(live_stack):
    policy = Policy(windows=(Window(2, sliding=True),), tiers={"FREE": (3,)})
    org, key = unique("org"), unique("key")

    async def scenario() -> tuple[list[bool], list[bool], Decision]:
        client = aioredis.Redis.from_url(live_stack.redis_url)
        limiter = RateLimiter(client, policy, timeout_ms=5000)
        first = [(await limiter.check(key, org)).allowed for _ in range(4)]
        denied = await limiter.check(key, org)
        await until_redis_time(client, denied.reset_ms)  # the time it says a unit is free again
        second = [(await limiter.check(key, org)).allowed for _ in range(4)]
        await limiter.aclose()
        return first, second, denied

    first, second, denied = asyncio.run(scenario())
    assert first == [True, True, True, False]
    assert not denied.allowed and denied.reset_ms - denied.now_ms <= 2001
    assert second[0] is True and second.count(True) <= 3


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ages_ms=st.lists(st.integers(0, 400_000), max_size=12))
def test_reservations_count_in_each_window_whatever_their_age(live_stack, redis_client, ages_ms):
    """Outstanding reservations of any age, against windows shorter and longer than their
    TTL, sliding and fixed: each window's used and reset are what its definition gives
    from the same scores (check.lua counts a window reaching past the TTL as the whole set)."""
    policy = Policy(windows=(Window(10, sliding=True), Window(200, sliding=True), Window(3600)),
                    tiers={"FREE": (10_000, 10_000, 10_000)}, reservation_ttl_ms=120_000)
    org, key = unique("org"), unique("key")
    seconds, micros = redis_client.time()
    t0 = seconds * 1000 + micros // 1000
    scores = {f"r{i}": t0 - age for i, age in enumerate(ages_ms)}
    if scores:
        redis_client.zadd(reservations_key(org, key), scores)
    with redis.Redis.from_url(live_stack.redis_url) as client:
        d = SyncRateLimiter(client, policy, fail_open=False).check(key, org)
    now = d.now_ms
    live = [s for s in scores.values() if s > now - policy.reservation_ttl_ms]  # the rest are pruned first
    expected = {}
    for w in policy.windows:
        if w.sliding:
            inside = [s for s in live if s > now - w.length_ms]
            reset = min(inside) + w.length_ms + 1 if inside else now + w.bucket_ms
        else:
            start = now - now % w.length_ms
            inside = [s for s in live if s >= start]
            reset = start + w.length_ms
        expected[f"key:{w.label}"] = (len(inside) + 1, reset)  # + this request
    assert d.allowed and {u.name: (u.used, u.reset_ms) for u in d.windows if u.subject == "key"} == expected
    assert redis_client.zcard(reservations_key(org, key)) == len(live) + 1


def test_the_policy_is_compiled_into_the_script_and_strings_cannot_break_out(redis_client):
    """A tier name or window label is configuration: whatever its bytes, Redis's Lua reads it
    back from the script's prelude as the same string, and the script's SHA follows the policy."""
    hostile = 'X"] = 1 } redis.call("FLUSHALL") --\n\\]]\x00é'
    p1 = Policy(windows=WINDOWS, tiers={"FREE": (1, 2, 3), hostile: (4, 5, None)})
    p2 = Policy(windows=WINDOWS, tiers={"FREE": (1, 2, 4), hostile: (4, 5, None)})
    prelude = policy_script(p1).split("\n", 2)[1]
    redis_client.set("canary", "1")
    read = redis_client.eval(prelude + "\nlocal out = {} for name, l in pairs(POLICY.tiers) do "
                             "table.insert(out, {name, l[1], l[2], l[3]}) end return out", 0)
    assert sorted((n.decode(), *ls) for n, *ls in read) == sorted([("FREE", 1, 2, 3), (hostile, 4, 5, -1)])
    assert redis_client.get("canary") == b"1"
    assert policy_script(p1) != policy_script(p2)


def test_reservations_of_a_crashed_gateway_expire(live_stack, redis_client):
    """Admitted requests whose events never arrive (a gateway died) stop counting after the TTL."""
    policy = Policy(windows=WINDOWS, tiers={"FREE": (3, None, None)}, reservation_ttl_ms=1500)
    org, key = unique("org"), unique("key")

    async def scenario() -> tuple[list[bool], bool]:
        client = aioredis.Redis.from_url(live_stack.redis_url)
        limiter = RateLimiter(client, policy, timeout_ms=5000)
        await wait_for_room(client, WINDOWS[0])
        checks = [await limiter.check(key, org) for _ in range(4)]
        first = [d.allowed for d in checks]
        # Past the TTL of the last reservation made, by the clock the check reads.
        await until_redis_time(client, max(d.now_ms for d in checks if d.allowed) + policy.reservation_ttl_ms + 1)
        again = (await limiter.check(key, org)).allowed
        await limiter.aclose()
        return first, again

    first, again = asyncio.run(scenario())
    assert first == [True, True, True, False]
    assert again is True
    assert redis_client.pttl(reservations_key(org, key)) > 0  # the set itself expires too


def test_the_emergency_switch_reaches_every_gateway_at_the_next_check(live_stack):
    org, key = unique("org"), unique("key")
    env = os.environ.copy()

    def switch(state: str) -> str:
        out = subprocess.run([sys.executable, "-m", "quotaflow", "enforcement", state], env=env, capture_output=True,
                             text=True, timeout=60, check=True)
        return out.stdout.strip()

    async def checks(n: int) -> list[Decision]:
        limiter = RateLimiter(aioredis.Redis.from_url(live_stack.redis_url),
                              Policy(WINDOWS, {"FREE": (2, None, None)}), timeout_ms=5000)
        out = [await limiter.check(key, org) for _ in range(n)]
        await limiter.aclose()
        return out

    async def room() -> None:
        client = aioredis.Redis.from_url(live_stack.redis_url)
        try:
            await wait_for_room(client, WINDOWS[0])
        finally:
            await client.aclose()

    try:
        asyncio.run(room())
        assert [d.allowed for d in asyncio.run(checks(3))] == [True, True, False]
        assert switch("off").startswith("enforcement: OFF")
        off = asyncio.run(checks(3))
        assert [(d.allowed, d.enforced) for d in off] == [(True, False)] * 3
        assert rate_limit_headers(off[0]) == []
    finally:
        assert switch("on") == "enforcement: on"
    assert [d.allowed for d in asyncio.run(checks(2))] == [False, False]


def _silent_server() -> tuple[socket.socket, int]:
    """A TCP server that accepts and never answers: a Redis that hangs."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    accepted = []
    threading.Thread(target=lambda: accepted.append(srv.accept()), daemon=True).start()
    return srv, srv.getsockname()[1]


@pytest.mark.parametrize("fail_open", [True, False])
def test_a_hanging_redis_fails_open_or_closed_within_the_budget(fail_open):
    srv, port = _silent_server()

    async def check() -> Decision:
        client = aioredis.Redis(host="127.0.0.1", port=port, socket_timeout=0.05, socket_connect_timeout=0.05)
        limiter = RateLimiter(client, Policy(WINDOWS, DEFAULT_TIER_LIMITS), timeout_ms=50, fail_open=fail_open)
        d = await asyncio.wait_for(limiter.check("k", "o"), 5)
        await limiter.aclose()
        return d

    try:
        d = asyncio.run(check())
    finally:
        srv.close()
    assert d.enforced is False
    assert d.allowed is fail_open
    if not fail_open:
        assert d.denied_by == UNAVAILABLE
        assert dict(rate_limit_headers(d)) == {"Retry-After": "1"}


def test_a_check_past_its_budget_leaves_no_late_answer_for_the_next(live_stack, redis_client):
    """A gateway's limiter (from_settings) is bounded by the check's budget alone, with no
    socket timeout on a single Redis: a Redis that stops answering fails the check (closed,
    as configured) within the budget, and the next check on the same limiter reads its own
    answer, not the late one left on the connection (its count is every reservation made)."""
    org, key = unique("org"), unique("key")
    limited = live_stack.model_copy(update={"gateway_timeout_ms": 200, "gateway_fail_open": False})

    async def scenario() -> tuple[Decision, float, Decision]:
        limiter = RateLimiter.from_settings(limited)
        try:
            await limiter.check(key, org)  # connected, the script loaded
            redis_client.execute_command("CLIENT", "PAUSE", 2000, "ALL")  # no client is answered for 2 s
            t0 = time.monotonic()
            late = await limiter.check(key, org)
            elapsed = time.monotonic() - t0
            await asyncio.to_thread(redis_client.ping)  # answered once the pause is over
            return late, elapsed, await limiter.check(key, org)
        finally:
            await limiter.aclose()

    late, elapsed, after = asyncio.run(scenario())
    assert late.denied_by == UNAVAILABLE and not late.enforced and elapsed < 1.5
    assert after.enforced and after.allowed
    # its own answer: every reservation of the window (no processor here: nothing else counts), its own too
    w = next(w for w in after.windows if w.subject == "key")
    start = after.now_ms - after.now_ms % (w.length_s * 1000)
    assert w.used == redis_client.zcount(reservations_key(org, key), start, "+inf") >= 2


def test_headers_follow_the_ietf_draft_and_the_common_convention():
    now = 1_795_000_030_000
    windows = (WindowUsage("key", "60s", 60, 10, 10, now + 30_000), WindowUsage("org", "3600s", 3600, 100, 40, now + 90_000))
    denied = Decision.from_windows(windows, allowed=False, tier="FREE", now_ms=now)
    assert rate_limit_headers(denied) == [
        ("RateLimit-Policy", '"key-60s";q=10;w=60, "org-3600s";q=100;w=3600'),
        ("RateLimit", '"key-60s";r=0;t=30'),
        ("X-RateLimit-Limit", "10"),
        ("X-RateLimit-Remaining", "0"),
        ("X-RateLimit-Reset", str((now + 30_000) // 1000)),
        ("Retry-After", "30"),
    ]
    allowed = Decision.from_windows((WindowUsage("key", "60s", 60, 10, 4, now + 30_000),), allowed=True, tier="FREE",
                                    now_ms=now)
    assert dict(rate_limit_headers(allowed))["RateLimit"] == '"key-60s";r=6;t=30'
    assert "Retry-After" not in dict(rate_limit_headers(allowed))
