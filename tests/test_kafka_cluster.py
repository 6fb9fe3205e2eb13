"""Three Kafka brokers (quotaflow stack up --brokers 3): quotaflow's topics have three
replicas and min.insync.replicas=2, and a broker SIGKILLed under a stream of events and
started again later costs no acknowledged event, counts none twice, and stops neither the
processor nor the sink.

Too slow for `make test` (a cluster of its own, about two minutes): marked `cluster`,
run by `make test-cluster`.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from quotaflow.core.settings import Settings
from quotaflow.deploy import kafka, stack
from quotaflow.deploy.procs import port_open
from quotaflow.schemas.topics import ALERT_RULES_TOPIC, DEAD_LETTER_TOPIC, EVENTS_TOPIC, KEYS_TOPIC, WINDOW_COUNTS_TOPIC
from tests.broker_drill import Stream, kafka_copies, kill_busiest_broker, reckon, spread_orgs, stored_rows
from tests.pipeline import Pipeline, stack_of_its_own, this_minute, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.stack]
BROKERS = 3


@pytest.fixture(scope="module")
def cluster_env(port_base, settings, tmp_path_factory) -> dict[str, str]:
    """A stack of three brokers of its own (ports of the spare stack's base: no other
    module's stack runs beside it in this worker)."""
    return stack.isolated_env(port_base + 500, tmp_path_factory.mktemp("cluster") / "state", settings.cache_dir,
                              brokers=BROKERS)


@pytest.fixture(scope="module")
def cluster(cluster_env) -> Settings:
    with stack_of_its_own(cluster_env) as settings:
        yield settings


async def describe(settings: Settings, topics: list[str]) -> dict[str, tuple[list[dict], dict[str, str]]]:
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        out = {}
        for t in await admin.describe_topics(topics):
            (configs,) = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t["topic"])])
            out[t["topic"]] = (t["partitions"], {e[0]: e[1] for e in configs.resources[0][4]})
        return out
    finally:
        await admin.close()


async def list_topics(settings: Settings) -> set[str]:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


def test_three_brokers_replicate_every_topic(cluster):
    nodes = kafka.nodes(cluster)
    assert [n.port for n in nodes] == [cluster.kafka_port + 100 * i for i in range(BROKERS)]
    assert cluster.kafka_bootstrap == ",".join(f"127.0.0.1:{n.port}" for n in nodes)
    assert all(n.proc.pid() is not None and port_open(n.port) for n in nodes)
    assert len({n.data for n in nodes}) == BROKERS
    status = {name: (running, where) for name, running, where in stack.status(cluster)}
    assert [name for name in status if name.startswith("kafka")] == ["kafka-1", "kafka-2", "kafka-3"]
    assert all(status[f"kafka-{n.n}"][0] and f"broker {n.n} of 3 on 127.0.0.1:{n.port}" in status[f"kafka-{n.n}"][1]
               for n in nodes)

    topics = asyncio.run(describe(cluster, [EVENTS_TOPIC, DEAD_LETTER_TOPIC, KEYS_TOPIC, ALERT_RULES_TOPIC]))
    assert_replicated(topics)
    # Each topic's own settings are there too (none dropped by an alteration made from the
    # view of a broker that had not yet learnt of the topic).
    assert topics[EVENTS_TOPIC][1]["message.timestamp.type"] == "LogAppendTime"
    assert topics[KEYS_TOPIC][1]["cleanup.policy"] == topics[ALERT_RULES_TOPIC][1]["cleanup.policy"] == "compact"
    # The leaders are spread: a dead broker leaves the others partitions to lead.
    assert len({p["leader"] for p in topics[EVENTS_TOPIC][0]}) > 1


def assert_replicated(topics: dict) -> None:
    for name, (partitions, configs) in topics.items():
        assert partitions, name
        assert all(len(p["replicas"]) == 3 and len(p["isr"]) == 3 for p in partitions), (name, partitions)
        assert configs["min.insync.replicas"] == "2", name


def test_broker_sigkill_loses_no_acknowledged_event_and_counts_none_twice(cluster, cluster_env, tmp_path):
    redis_client = redis.Redis.from_url(cluster.redis_url)
    pipeline = Pipeline(cluster)
    try:
        pids = {name: pipeline.start(name, **cluster_env) for name in stack.PIPELINE}
        orgs = spread_orgs(cluster.events_partitions, 2)
        ts = this_minute()
        # Acknowledgements later than 3 s (a failover takes longer) send the record to the
        # spool, which sends it again: some events reach Kafka twice, and must count once.
        stream = Stream(cluster.kafka_bootstrap, tmp_path / "spool", orgs, ts, delivery_timeout_s=3).start()

        def processed() -> int:
            return sum(stream.counted_by_org(redis_client).values())

        wait_for(lambda: stream.delivered_count() >= 500 and processed() >= 300, 60, "the stream to flow",
                 pipeline.logs)
        killed = kill_busiest_broker(cluster)
        down_at = time.monotonic()
        # With the broker dead, the others take over its partitions: the stream goes on
        # being acknowledged, and counted, without the processor or the sink restarting.
        acked, seen = stream.delivered_count(), processed()
        wait_for(lambda: stream.delivered_count() >= acked + 500 and processed() >= seen + 500, 90,
                 f"events acknowledged and counted with broker {killed.n} dead", pipeline.logs)
        assert killed.proc.pid() is None
        time.sleep(max(0.0, 5 - (time.monotonic() - down_at)))  # a stream of some length with it down
        assert kafka.start(cluster)  # the dead broker only; waits until it is back in every ISR
        acked = stream.delivered_count()
        wait_for(lambda: stream.delivered_count() >= acked + 300, 60, "the stream after the restart", pipeline.logs)
        stream.stop()
        assert stream.lost == 0 and stream.spool_drained

        pipeline.wait_processor_applied(redis_client)
        pipeline.wait_sink_caught_up()
        for name in stack.PIPELINE:  # neither process restarted
            state = pipeline.state(name)
            assert (state.pid, state.restarts) == (pids[name], 0), (name, state, pipeline.logs(name))
        # Every topic, the consumer groups' offsets and the processor's changelog included,
        # has its three replicas, all in sync again.
        names = asyncio.run(list_topics(cluster))
        assert {"__consumer_offsets", WINDOW_COUNTS_TOPIC} <= names
        assert_replicated(asyncio.run(describe(cluster, sorted(names))))
        pipeline.stop("sink")
        result = reckon(stream, redis_client, stored_rows(pipeline.query_clickhouse, orgs))
        submitted = sum(len(ids) for ids in stream.submitted.values())
        copies = kafka_copies(cluster, orgs)
        assert set(copies) == stream.acknowledged()
        print(f"{len(stream.spooled)} events spooled, {sum(n > 1 for n in copies.values())} in Kafka twice", result)
        assert result.acknowledged == submitted > 1500, result
        assert result.exact, result
        assert result.counted == result.stored_rows == submitted, result
    finally:
        pipeline.stop_all()
        redis_client.close()
