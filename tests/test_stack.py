"""The local stack: a real Kafka broker (checked with kcat, a client we did not write),
Redis with AOF in the state dir, and clear errors instead of tracebacks."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import uuid

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from quotaflow.core.errors import OperatorError
from quotaflow.core.settings import Settings
from quotaflow.deploy import kafka, stack
from quotaflow.deploy import redis as redis_service
from quotaflow.deploy.system_packages import ensure_command
from quotaflow.schemas.topics import DEAD_LETTER_TOPIC, EVENTS_TOPIC

pytestmark = pytest.mark.stack


def test_kcat_sees_the_broker_and_the_topics(live_stack):
    kcat = ensure_command("kcat", "kcat")
    out = subprocess.run([kcat, "-L", "-J", "-b", live_stack.kafka_bootstrap], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    meta = orjson.loads(out)
    assert [(b["id"], b["name"]) for b in meta["brokers"]] == [(1, f"127.0.0.1:{live_stack.kafka_port}")]
    topics = {t["topic"]: len(t["partitions"]) for t in meta["topics"]}
    assert topics[EVENTS_TOPIC] == live_stack.events_partitions
    assert topics[DEAD_LETTER_TOPIC] == 1


def test_up_is_idempotent_and_status_tells_what_runs_where(live_stack):
    assert stack.up(live_stack) == []
    status = {name: (running, where) for name, running, where in stack.status(live_stack)}
    assert status["kafka"][0] and f"Apache Kafka {kafka.KAFKA_VERSION} (KRaft) on 127.0.0.1:{live_stack.kafka_port}" in status["kafka"][1]
    assert status["redis"][0] and f"127.0.0.1:{live_stack.redis_port}" in status["redis"][1]
    assert str(live_stack.state_dir / "clickhouse") in status["clickhouse"][1]


def test_broker_supports_what_faust_needs(live_stack):
    """Consumer groups, compacted topics, idempotent and transactional producers."""

    async def scenario(bootstrap: str) -> None:
        topic, compacted = f"t-{uuid.uuid4().hex[:8]}", f"c-{uuid.uuid4().hex[:8]}"
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        await admin.create_topics([NewTopic(topic, 1, 1),
                                   NewTopic(compacted, 1, 1, topic_configs={"cleanup.policy": "compact"})])
        # The controller has the topic once create_topics answers; the broker may learn of it a
        # moment later (its configs are described empty until then): ask until it has.
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            configs = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, compacted)])
            entries = {e[0]: e[1] for e in configs[0].resources[0][4]}
            if entries or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.1)
        assert entries["cleanup.policy"] == "compact"

        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=f"tx-{topic}",
                                    enable_idempotence=True)
        await producer.start()
        async with producer.transaction():
            for i in range(3):
                await producer.send(topic, f"committed-{i}".encode())
        await producer.begin_transaction()
        for i in range(2):
            await producer.send(topic, f"aborted-{i}".encode())
        await producer.abort_transaction()
        await producer.stop()

        async def read(isolation: str, group: str | None) -> list[bytes]:
            consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group, isolation_level=isolation,
                                        auto_offset_reset="earliest", enable_auto_commit=False)
            await consumer.start()
            got = await consumer.getmany(timeout_ms=5000)
            if group:
                await consumer.commit()
            await consumer.stop()
            return [r.value for recs in got.values() for r in recs]

        assert await read("read_committed", "g-committed") == [b"committed-0", b"committed-1", b"committed-2"]
        uncommitted = await read("read_uncommitted", None)
        assert b"aborted-0" in uncommitted and b"committed-2" in uncommitted
        offsets = await admin.list_consumer_group_offsets("g-committed")
        # 3 records + commit marker + 2 aborted + abort marker, committed past all of them
        assert offsets[TopicPartition(topic, 0)].offset == 7
        await admin.close()

    asyncio.run(scenario(live_stack.kafka_bootstrap))


def test_redis_persists_with_aof_in_the_state_dir(live_stack, redis_client):
    assert redis_client.config_get("appendonly") == {"appendonly": "yes"}
    assert redis_client.config_get("dir")["dir"] == str(live_stack.state_dir / "redis")
    assert redis_client.config_get("bind")["bind"] == "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_taken_port_is_a_clear_error(tmp_path, live_stack):
    port = _free_port()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        s = Settings(state_dir=tmp_path, cache_dir=live_stack.cache_dir, redis_port=port)
        with pytest.raises(OperatorError, match=f"port {port} for Redis is already in use .* QUOTAFLOW_REDIS_PORT=PORT"):
            redis_service.start(s)
        s = Settings(state_dir=tmp_path, cache_dir=live_stack.cache_dir, kafka_port=port)
        with pytest.raises(OperatorError, match=f"port {port} for Kafka is already in use"):
            kafka.start(s)


def test_missing_java_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "no-jdk"))
    with pytest.raises(OperatorError, match="Java 17 or newer is needed to run Kafka and was not found"):
        kafka.java_command()


def test_a_tampered_jar_fails_the_checksum(tmp_path, live_stack):
    libs = kafka.ensure_jars(live_stack)
    copy = tmp_path / "libs"
    shutil.copytree(libs, copy)
    victim = sorted(copy.glob("kafka-clients-*.jar"))[0]
    victim.write_bytes(victim.read_bytes() + b"\0")
    with pytest.raises(OperatorError, match=f"checksum mismatch for {victim.name}: expected sha256 [0-9a-f]{{64}}, got"):
        kafka.verify(copy, kafka.read_lock())
    victim.unlink()
    with pytest.raises(OperatorError, match=f"missing \\['{victim.name}'\\]"):
        kafka.verify(copy, kafka.read_lock())


def test_a_failed_download_is_a_clear_error(monkeypatch, tmp_path, live_stack):
    monkeypatch.setattr(kafka, "KAFKA_VERSION", "0.0.0-does-not-exist")
    s = Settings(state_dir=tmp_path, cache_dir=live_stack.cache_dir)
    with pytest.raises(OperatorError, match=r"could not download Kafka 0.0.0-does-not-exist from Maven Central \(mvn exit 1\)"):
        kafka.resolve_jars(s, tmp_path / "out")
