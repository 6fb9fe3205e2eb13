"""Test helpers for the API key registry: the `quotaflow keys` command as a subprocess,
what the materializer wrote to Redis, and waiting for the sink's audit."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

from quotaflow.schemas import api_keys
from quotaflow.schemas.api_keys import KeyRecord
from quotaflow.schemas.redis_keys import api_key_index, api_key_record
from quotaflow.schemas.topics import KEYS_TOPIC, SINK_KEYS_GROUP
from tests.pipeline import wait_for

SECRET_ID, SECRET = "t1", "test-secret-0123456789abcdef-0123456789"
KEY_ENV = {"QUOTAFLOW_KEY_HASH_SECRETS": json.dumps({SECRET_ID: SECRET})}


def keys_cli(*args: str, timeout_s: float = 90) -> subprocess.CompletedProcess:
    """`quotaflow keys ...` as an operator runs it (the hash secret in its environment)."""
    return subprocess.run([sys.executable, "-m", "quotaflow", "keys", *args], capture_output=True, text=True,
                          timeout=timeout_s, env={**os.environ, **KEY_ENV})


def keys_json(*args: str) -> dict | list:
    done = keys_cli(*args, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def record_fields(redis_client, org_id: str, key: str) -> dict[str, str]:
    """The fields gateways read for a presented key (api_key_record), {} when absent."""
    parsed = api_keys.parse(key)
    raw = redis_client.hgetall(api_key_record(parsed.slot_hint, api_keys.key_hash(key, SECRET.encode())))
    return {k.decode(): v.decode() for k, v in raw.items()}


def indexed(redis_client, org_id: str, key_id: str) -> KeyRecord | None:
    raw = redis_client.hget(api_key_index(org_id), key_id)
    return None if raw is None else KeyRecord.decode(raw)


def wait_audit_caught_up(settings, pipeline, timeout_s: float = 60) -> None:
    """The sink's audit has committed every record of the keys topic."""
    from quotaflow.deploy.observe import group_lag

    async def lag() -> int:
        try:
            return await group_lag(settings.kafka_bootstrap, SINK_KEYS_GROUP, KEYS_TOPIC)
        except Exception:  # the group coordinator not there yet
            return -1

    wait_for(lambda: asyncio.run(lag()) == 0, timeout_s, "the sink's audit to commit the keys topic", pipeline.logs)


REGISTRY_PATTERN = "qf:v1:*apikey*"  # every key record, every org's index (schemas/redis_keys.py)


def registry_snapshot(redis_client) -> dict[bytes, dict[bytes, bytes]]:
    """Everything the materializer wrote of the keys, as it is in Redis now."""
    return {name: redis_client.hgetall(name) for name in redis_client.scan_iter(match=REGISTRY_PATTERN, count=1000)
            if redis_client.type(name) == b"hash" and not name.endswith(b"apikeys:state")}
