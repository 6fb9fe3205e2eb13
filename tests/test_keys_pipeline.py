"""The API key registry on the real stack: `quotaflow keys` publishes each change to the
keys topic, the processor materializes it into Redis where gateways read it, the sink
keeps every change as an audit row in ClickHouse; hostile records are dead-lettered."""

from __future__ import annotations

import asyncio
import getpass
import time

import pytest

from quotaflow.schemas import api_keys, deadletter
from quotaflow.schemas.api_keys import KeyRecord
from quotaflow.schemas.redis_keys import ORG_TIER_FIELD, api_key_index, api_key_record, org_key
from quotaflow.schemas.topics import DEAD_LETTER_TOPIC, KEYS_TOPIC
from tests.keys_helpers import SECRET, indexed, keys_cli, keys_json, record_fields, wait_audit_caught_up
from tests.pipeline import read_all, unique, wait_for

pytestmark = pytest.mark.stack

ACTOR = f"cli:{getpass.getuser()}"


def now_ms() -> int:
    return int(time.time() * 1000)


def test_create_update_rotate_revoke_reach_redis_and_the_audit(live_stack, redis_client, pipeline):
    org = unique("acme")
    redis_client.hset(org_key(org), ORG_TIER_FIELD, "STARTER")
    pipeline.start("processor")
    pipeline.start("sink")

    # create: the key printed once, its record in Redis (materialized by the processor)
    done = keys_cli("create", org, "--name", "billing job", "--scope", "orders:read", "--scope", "orders:write",
                    "--limit", "60s=7")
    assert done.returncode == 0, done.stderr
    key = done.stdout.splitlines()[-1].removeprefix("key: ")
    api_keys.parse(key)  # a well-formed key, checksum and all
    assert key not in done.stderr and "only time the key is shown" in done.stderr
    assert "visible to gateways" in done.stderr  # the processor applied it within --wait
    key_id = done.stdout.split()[0]
    fields = record_fields(redis_client, org, key)
    assert fields == {"key_id": key_id, "org_id": org, "state": "active", "expires_ms": "",
                      "scopes": "orders:read orders:write", "limits": "60s=7", "version": "1"}
    rec = indexed(redis_client, org, key_id)
    assert rec.key_hash == api_keys.key_hash(key, SECRET.encode()) and rec.actor == ACTOR and rec.change == "create"

    # list and show: the display prefix, never the key or its hash
    listed = keys_json("list", org)
    assert [k["key_id"] for k in listed] == [key_id] and listed[0]["display_prefix"] == api_keys.display_prefix(key)
    shown = keys_json("show", org, key_id)
    assert shown["state"] == "active" and "key_hash" not in shown and rec.key_hash not in str(shown)

    # update: name and scopes; what was not given stays
    before = now_ms()
    updated = keys_json("update", org, key_id, "--name", "billing v2", "--scope", "invoices:read", "--expires", "30d")
    assert updated["changed"] and updated["version"] == 2
    fields = record_fields(redis_client, org, key)
    assert fields["scopes"] == "invoices:read" and fields["limits"] == "60s=7" and fields["version"] == "2"
    assert before + 30 * 86_400_000 <= int(fields["expires_ms"]) <= now_ms() + 30 * 86_400_000
    unchanged = keys_cli("update", org, key_id, "--name", "billing v2")
    assert unchanged.returncode == 0 and "nothing changed" in unchanged.stdout
    too_high = keys_cli("update", org, key_id, "--limit", "60s=1000")  # STARTER allows 30 a minute
    assert too_high.returncode == 2 and "above the org's tier" in too_high.stderr

    # rotate with an overlap: both keys valid until it ends, then only the new one
    before = now_ms()
    rotated = keys_json("rotate", org, key_id, "--overlap", "1h")
    after = now_ms()
    new_key, new_id = rotated["key"], rotated["key_id"]
    assert new_key != key and new_id != key_id and rotated["replaces"] == key_id
    old_fields, new_fields = record_fields(redis_client, org, key), record_fields(redis_client, org, new_key)
    old_end = int(old_fields["expires_ms"])
    assert before + 3_600_000 <= old_end <= after + 3_600_000  # the overlap, to the millisecond
    assert old_fields["state"] == new_fields["state"] == "active"
    assert new_fields["scopes"] == "invoices:read" and new_fields["limits"] == "60s=7"
    assert new_fields["expires_ms"] == str(int(fields["expires_ms"]))  # the old key's own expiry carried over
    old_rec, new_rec = indexed(redis_client, org, key_id), indexed(redis_client, org, new_id)
    assert old_rec.rotated_to == new_id and new_rec.rotated_from == key_id
    for at in (after, old_end - 1):
        assert (old_rec.state_at(at), new_rec.state_at(at)) == ("active", "active")
    assert (old_rec.state_at(old_end), new_rec.state_at(old_end)) == ("expired", "active")
    again = keys_cli("rotate", org, key_id, "--overlap", "0")
    assert again.returncode == 2 and "already rotated" in again.stderr

    # revoke: final
    revoked = keys_json("revoke", org, new_id)
    assert revoked["state"] == "revoked" and revoked["changed"]
    assert record_fields(redis_client, org, new_key)["state"] == "revoked"
    assert keys_json("revoke", org, new_id)["changed"] is False
    refused = keys_cli("update", org, new_id, "--name", "back")
    assert refused.returncode == 2 and "revoked" in refused.stderr
    unknown = keys_cli("show", org, "key_doesnotexist0000")
    assert unknown.returncode == 2 and "has no key" in unknown.stderr

    # the audit: one row per change, who made it and what it changed
    wait_audit_caught_up(live_stack, pipeline)
    pipeline.stop("sink")
    rows = pipeline.query_clickhouse(
        "SELECT key_id, version, change, actor, changed, state, display_prefix FROM api_key_audit "
        "WHERE org_id = {org:String} ORDER BY changed_at, key_id, version", {"org": org})
    got = {(r[0], r[1]): (r[2], r[3], r[4], r[5]) for r in rows}
    everything = ["name", "scopes", "limits", "expires", "state", "rotated_from", "rotated_to"]
    assert got == {
        (key_id, 1): ("create", ACTOR, everything, "active"),
        (key_id, 2): ("update", ACTOR, ["name", "scopes", "expires"], "active"),
        (key_id, 3): ("rotate", ACTOR, ["expires", "rotated_to"], "active"),
        (new_id, 1): ("rotate", ACTOR, everything, "active"),
        (new_id, 2): ("revoke", ACTOR, ["state"], "revoked"),
    }
    assert len(rows) == 5 and {r[6] for r in rows} == {api_keys.display_prefix(key), api_keys.display_prefix(new_key)}


def test_hostile_records_are_dead_lettered_and_change_no_other_key(live_stack, redis_client, pipeline):
    org, other = unique("victim"), unique("other")
    pipeline.start("processor")
    pipeline.start("sink")
    key = keys_json("create", org, "--name", "victim key")
    key_id = key["key_id"]
    victim = indexed(redis_client, org, key_id)
    before = redis_client.hgetall(api_key_index(org))
    victim_fields = record_fields(redis_client, org, key["key"])
    assert victim_fields["version"] == "1"

    def bad(**over) -> bytes:
        return KeyRecord(**{**{f: getattr(victim, f) for f in victim.__struct_fields__}, **over}).encode()

    hint = api_keys.slot_hint(other)
    hostile = [
        ("not json", key_id.encode(), b"GET / 200", "not a key record"),
        ("tombstone", key_id.encode(), None, "tombstone"),
        ("unknown field", key_id.encode(), victim.encode()[:-1] + b',"key":"qf_live_x"}', "not a key record"),
        ("wrong kafka key", b"key_somethingelse", bad(version=99), "its Kafka key is not its key_id"),
        ("bad org id", key_id.encode(), bad(org_id="../etc", version=99), "org_id"),
        ("slot of another org", key_id.encode(), bad(org_id=other, version=99), "slot_hint"),
        ("not a hash", key_id.encode(), bad(key_hash="ZZ", version=99), "key_hash"),
        ("bad state", key_id.encode(), bad(state="deleted", version=99), "state"),
        ("bad scope", key_id.encode(), bad(scopes=("Orders READ",), version=99), "scopes"),
        ("negative limit", key_id.encode(), bad(limits={"60s": -1}, version=99), "limits"),
        ("version 0", key_id.encode(), bad(version=0), "version"),
        # a time past what the audit table holds (DateTime64 ends in 2299): it once stopped the sink
        ("far future", key_id.encode(), bad(updated_ms=2**53 - 1, version=99), "updated_ms"),
        ("huge", key_id.encode(), b"{" + b" " * 70_000 + b"}", "more than"),
        # a record of another key_id claiming the victim's hash: refused by the materializer
        ("hash taken", b"key_thief00000000000", bad(key_id="key_thief00000000000", org_id=org, version=5),
         "another key's record holds this key's hash"),
        # the victim's key_id with a hash of the writer's choosing: the old hash would stay valid beside it
        ("hash changed", key_id.encode(), bad(key_hash="a" * 64, version=99), "with another hash"),
    ]

    async def publish_raw() -> int:
        from aiokafka import AIOKafkaProducer

        producer = AIOKafkaProducer(bootstrap_servers=live_stack.kafka_bootstrap, enable_idempotence=True)
        await producer.start()
        try:
            first = None
            for _, k, v, _ in hostile:
                meta = await producer.send_and_wait(KEYS_TOPIC, v, key=k)
                first = meta.offset if first is None else first
            return first
        finally:
            await producer.stop()

    first = asyncio.run(publish_raw())
    # a key created after the hostile records is applied: nothing stuck behind them
    other_key = keys_json("create", other, "--name", "after the hostile ones")
    assert indexed(redis_client, other, other_key["key_id"]) is not None

    def dead() -> dict[int, dict]:
        out = {}
        for r in asyncio.run(read_all(live_stack, DEAD_LETTER_TOPIC)):
            h = deadletter.read_headers(r.headers)
            if h.get(deadletter.HEADER_SOURCE_TOPIC) == KEYS_TOPIC and int(h[deadletter.HEADER_SOURCE_OFFSET]) >= first:
                out[int(h[deadletter.HEADER_SOURCE_OFFSET])] = {**h, "value": r.value}
        return out

    wait_for(lambda: len(dead()) >= len(hostile), 30, "a dead letter per hostile record", pipeline.logs)
    letters = dead()
    assert sorted(letters) == list(range(first, first + len(hostile)))
    for offset, (what, _, value, reason) in zip(sorted(letters), hostile):
        letter = letters[offset]
        assert reason in letter[deadletter.HEADER_REASON], (what, letter[deadletter.HEADER_REASON])
        assert letter[deadletter.HEADER_STAGE] == "processor" and letter["value"] == value, what
    # the victim's key and org are as they were; no record of the thief, nothing for the other org but its key
    assert redis_client.hgetall(api_key_index(org)) == before
    assert record_fields(redis_client, org, key["key"]) == victim_fields
    assert indexed(redis_client, org, "key_thief00000000000") is None
    assert not redis_client.exists(api_key_record(victim.slot_hint, "a" * 64))
    assert list(redis_client.hgetall(api_key_index(other))) == [other_key["key_id"].encode()]
    assert keys_json("show", org, key_id)["version"] == victim.version
    # counted where an operator looks (at least: records read again after a restart count again)
    records = "quotaflow_processor_key_records_total"
    assert pipeline.metric("processor", f'{records}{{outcome="invalid"}}') >= len(hostile) - 2
    assert pipeline.metric("processor", f'{records}{{outcome="conflict"}}') >= 2
    # the audit skipped the hostile records and went on: the key created after them is there
    wait_audit_caught_up(live_stack, pipeline)
    assert pipeline.state("sink").restarts == 0, pipeline.logs("sink")
    pipeline.stop("sink")
    rows = pipeline.query_clickhouse("SELECT org_id, key_id, version FROM api_key_changes FINAL "
                                     "WHERE org_id IN ({a:String}, {b:String})", {"a": org, "b": other})
    # the two the materializer refused as conflicts are records of the topic all the same: the
    # audit keeps them (their dead letters say they took no effect); none of the invalid ones
    assert sorted(rows) == sorted([(org, key_id, 1), (org, key_id, 99), (org, "key_thief00000000000", 5),
                                   (other, other_key["key_id"], 1)])


def test_stack_up_makes_a_keys_topic_made_by_hand_compacted_again(live_stack):
    """The registry's topic must be compacted (each key's last record kept for ever, so
    Redis can be rebuilt from it): a topic altered by hand is put right, its other
    settings kept, and the events topic keeps its arrival stamps."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    from quotaflow.deploy.topics import ensure_topics
    from quotaflow.schemas.topics import EVENTS_TOPIC, KEYS_MIN_COMPACTION_LAG_MS

    async def configs(topic: str) -> dict[str, str]:
        admin = AIOKafkaAdminClient(bootstrap_servers=live_stack.kafka_bootstrap)
        await admin.start()
        try:
            (response,) = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
            return {e[0]: e[1] for e in response.resources[0][4]}
        finally:
            await admin.close()

    async def set_by_hand() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=live_stack.kafka_bootstrap)
        await admin.start()
        try:
            await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, KEYS_TOPIC,
                                                      {"cleanup.policy": "delete", "retention.ms": "86400000"})])
        finally:
            await admin.close()

    asyncio.run(set_by_hand())
    assert asyncio.run(configs(KEYS_TOPIC))["cleanup.policy"] == "delete"
    assert asyncio.run(ensure_topics(live_stack)) == []  # nothing created: the topic is there
    after = asyncio.run(configs(KEYS_TOPIC))
    assert after["cleanup.policy"] == "compact" and after["min.compaction.lag.ms"] == str(KEYS_MIN_COMPACTION_LAG_MS)
    assert after["retention.ms"] == "86400000"  # what was set by hand and is not ours to decide stays
    assert asyncio.run(configs(EVENTS_TOPIC))["message.timestamp.type"] == "LogAppendTime"
