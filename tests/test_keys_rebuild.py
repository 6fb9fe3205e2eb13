"""The key registry's source of truth is the keys topic: Redis emptied (FLUSHALL), the
processor rebuilds every key's record from the topic by itself, and `quotaflow keys
rebuild` does the same with the processor stopped; same records, same state."""

from __future__ import annotations

import asyncio
import socket

import pytest

from quotaflow.deploy.observe import end_offsets
from quotaflow.schemas.redis_keys import API_KEYS_STATE
from quotaflow.schemas.topics import KEYS_TOPIC
from tests.keys_helpers import keys_cli, keys_json, record_fields, registry_snapshot
from tests.pipeline import unique, wait_for

pytestmark = pytest.mark.stack


def test_flushall_then_the_registry_is_rebuilt_from_the_topic(live_stack, redis_client, pipeline):
    org_a, org_b = unique("rebuild-a"), unique("rebuild-b")
    pipeline.start("processor")
    # Redis as the topic makes it: other tests write key records straight into Redis
    # (tests/key_records.py), which no rebuild from the topic can bring back.
    redis_client.flushall()
    wait_for(lambda: redis_client.hget(API_KEYS_STATE, "status") == b"ok", 30, "the processor to rebuild the registry",
             pipeline.logs)
    made = [keys_json("create", org, "--name", f"key {n}", "--scope", "orders:read") for n, org in
            enumerate([org_a, org_a, org_a, org_b, org_b])]
    assert keys_json("revoke", org_a, made[0]["key_id"])["changed"]
    assert keys_json("update", org_b, made[3]["key_id"], "--limit", "60s=3", "--expires", "7d")["changed"]
    made.append(keys_json("rotate", org_a, made[1]["key_id"], "--overlap", "2h"))
    keys = [(m["org_id"], m["key"]) for m in made]
    before = registry_snapshot(redis_client)
    assert all(record_fields(redis_client, org, key) for org, key in keys)
    states = {key: record_fields(redis_client, org, key)["state"] for org, key in keys}
    assert sorted(states.values()) == ["active"] * 5 + ["revoked"]

    def state() -> dict[bytes, bytes]:
        return redis_client.hgetall(API_KEYS_STATE)

    end = asyncio.run(end_offsets(live_stack.kafka_bootstrap, KEYS_TOPIC))[0]
    # the processor notices the loss by itself and rebuilds
    redis_client.flushall()
    assert registry_snapshot(redis_client) == {}
    wait_for(lambda: state().get(b"status") == b"ok", 30, "the processor to rebuild the registry", pipeline.logs)
    assert registry_snapshot(redis_client) == before
    assert int(state()[b"offset"]) >= end
    assert {key: record_fields(redis_client, org, key)["state"] for org, key in keys} == states

    # the processor stopped: the operator's command rebuilds it
    pipeline.stop("processor")
    redis_client.flushall()
    done = keys_cli("rebuild")
    assert done.returncode == 0, done.stderr
    assert f"up to offset {end}" in done.stdout
    assert registry_snapshot(redis_client) == before
    assert state()[b"status"] == b"ok" and int(state()[b"offset"]) == end

    # a change made while Redis is empty and nothing rebuilds it is refused, not half made
    redis_client.flushall()
    refused = keys_cli("revoke", org_b, made[4]["key_id"], "--wait", "1")
    assert refused.returncode != 0 and "behind the keys topic" in refused.stderr
    assert asyncio.run(end_offsets(live_stack.kafka_bootstrap, KEYS_TOPIC))[0] == end
    # and once the processor runs again, everything is back
    pipeline.start("processor")
    wait_for(lambda: registry_snapshot(redis_client) == before, 30, "the registry rebuilt", pipeline.logs)


def test_a_rebuild_stopped_midway_gives_its_status_up(live_stack, redis_client):
    """A processor stopped during a rebuild (its stop cancels the rebuild) must not leave
    its 'rebuilding' status behind: key changes would be refused as behind, and the next
    processor would wait a minute before rebuilding (seen in a full test run, where
    processors are stopped within seconds of starting on an emptied Redis)."""
    import redis.asyncio as aioredis

    from quotaflow.processors.key_registry import KeyMaterializer
    from quotaflow.schemas.redis_keys import API_KEYS_REBUILDING, API_KEYS_STATUS_FIELD

    async def stopped_rebuild() -> tuple[bytes | None, bytes | None]:
        client = aioredis.Redis.from_url(live_stack.redis_url)
        with socket.socket() as silent:  # a "broker" that never answers: the rebuild waits in its read
            silent.bind(("127.0.0.1", 0))
            silent.listen()
            materializer = KeyMaterializer(client, f"127.0.0.1:{silent.getsockname()[1]}")
            task = asyncio.ensure_future(materializer.rebuild("test"))
            deadline = asyncio.get_running_loop().time() + 30
            during = None
            while not (during or b"").startswith(API_KEYS_REBUILDING.encode()) and not task.done():
                assert asyncio.get_running_loop().time() < deadline, "the rebuild never started"
                during = await client.hget(API_KEYS_STATE, API_KEYS_STATUS_FIELD)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            after = await client.hget(API_KEYS_STATE, API_KEYS_STATUS_FIELD)
            await materializer.stop()
        await client.aclose()
        return during, after

    during, after = asyncio.run(stopped_rebuild())
    assert during is not None and during.startswith(API_KEYS_REBUILDING.encode())
    assert after is None  # given up: the next watch rebuilds at once


def test_a_killed_rebuild_is_taken_over_by_the_next_processor(live_stack, redis_client, pipeline):
    """A rebuild killed outright (SIGKILL: no chance to give its status up) leaves its status
    and a last beat; a processor started later takes over once the beat is STALE_REBUILD_S
    old, whatever processors came and went meanwhile."""
    import time

    from quotaflow.processors.key_registry import STALE_REBUILD_S
    from quotaflow.schemas.redis_keys import API_KEYS_BEAT_FIELD, API_KEYS_STATUS_FIELD

    dead_beat = int(time.time() * 1000) - int(STALE_REBUILD_S * 1000) - 1000
    redis_client.hset(API_KEYS_STATE, mapping={API_KEYS_STATUS_FIELD: "rebuilding:killed", API_KEYS_BEAT_FIELD: dead_beat})
    pipeline.start("processor")
    wait_for(lambda: redis_client.hget(API_KEYS_STATE, API_KEYS_STATUS_FIELD) == b"ok", 30,
             "the processor to take the killed rebuild over", pipeline.logs)
    org = unique("acme")
    created = keys_json("create", org, "--name", "after the takeover")  # changes go through again
    assert record_fields(redis_client, org, created["key"])["state"] == "active"
