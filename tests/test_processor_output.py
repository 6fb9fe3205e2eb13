"""The processor's own producer (processors/output.py) against the real broker: a batch's
changelog records arrive whole and in their order per partition, as Faust's recovery reads
them, however many of them there are."""

import asyncio

import orjson
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from quotaflow.processors.output import Output
from quotaflow.schemas.topics import DEAD_LETTER_TOPIC, EVENTS_TOPIC
from tests.pipeline import read_all, unique


async def _write(settings, topic: str, records: list) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 3, 1)])
    finally:
        await admin.close()
    output = Output(settings.kafka_bootstrap, topic, DEAD_LETTER_TOPIC, EVENTS_TOPIC)
    await output.start()
    try:
        sent = await output.send_changelogs(output.encode_changelogs(records))
        assert len(sent) == len(records)
        await output.deliver(sent)
        assert all(s.future.done() and s.future.exception() is None for s in sent)
    finally:
        await output.stop()


def test_changelog_records_arrive_whole_and_in_order_per_partition(live_stack):
    topic = unique("changelog-test")
    # Partition 0 gets more than one record batch holds (the producer's batch size is 512 KiB):
    # the batch is sent when full and a new one takes the rest, in order.
    big = {"b": [[[i, 1] for i in range(400)]]}  # a few KiB of JSON
    records = [(f"key/{i}", {**big, "o": i}, 0) for i in range(300)]
    records += [(f"other/{i}", {"o": i}, 1 + i % 2) for i in range(50)]
    records += [("key/7", None, 0), ("__next_offset__/0", 12345, 0)]  # a deletion; a next offset last
    asyncio.run(_write(live_stack, topic, records))

    got = asyncio.run(read_all(live_stack, topic))
    by_partition: dict[int, list] = {}
    for r in sorted(got, key=lambda r: (r.partition, r.offset)):
        by_partition.setdefault(r.partition, []).append(
            (orjson.loads(r.key), None if r.value is None else orjson.loads(r.value)))
    for partition in (0, 1, 2):
        assert by_partition[partition] == [(k, v) for k, v, p in records if p == partition]
    assert sum(len(v) for v in by_partition.values()) == len(records)  # nothing written twice
