"""The key registry's source of truth is the keys topic: Redis emptied (FLUSHALL), the
processor rebuilds every key's record from the topic by itself, and `quotaflow keys
rebuild` does the same with the processor stopped; same records, same state."""

from __future__ import annotations

import asyncio

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
