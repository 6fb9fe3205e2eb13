"""How the ClickHouse sink forms batches from its buffers: pure logic, no server."""

from __future__ import annotations

from types import SimpleNamespace

from aiokafka import TopicPartition

from quotaflow.core.settings import Settings
from quotaflow.schemas.topics import EVENTS_TOPIC
from quotaflow.sinks.clickhouse.batches import Buffers
from quotaflow.sinks.clickhouse.plans import Range


def fetched(buffers: Buffers, tp: TopicPartition, offsets: range) -> None:
    buffers.add(tp, [SimpleNamespace(offset=o, value=b"{}") for o in offsets], now=0.0)


def test_no_batch_is_taken_from_a_partition_before_its_plans_are_read():
    # aiokafka fetches a newly assigned partition before the rebalance listener has read
    # its plans: a batch taken then would ignore a plan, and the plan's replay would then
    # find its records gone (seen once as 1,000 events lost in the SIGKILL test).
    buffers = Buffers.from_settings(Settings(sink_batch_size=2))
    tp = TopicPartition(EVENTS_TOPIC, 0)
    fetched(buffers, tp, range(10, 13))
    assert buffers.ready(now=100.0) == {}
    buffers.plans_read({tp})
    assert buffers.ready(now=100.0) == {tp: (Range(EVENTS_TOPIC, 0, 10, 11), 2, False)}


def test_a_planned_batch_is_taken_whole_once_its_records_are_all_in():
    buffers = Buffers.from_settings(Settings(sink_batch_size=2))
    tp = TopicPartition(EVENTS_TOPIC, 1)
    plan = Range(EVENTS_TOPIC, 1, 10, 14)  # planned with a larger batch size than today's
    buffers.plans_read({tp})
    assert buffers.replay(tp, plan) is False  # nothing buffered from elsewhere: no seek back
    fetched(buffers, tp, range(10, 13))
    assert buffers.ready(now=100.0) == {}  # the rest of the planned range is still to come
    fetched(buffers, tp, range(13, 17))
    ready = buffers.ready(now=100.0)
    assert ready == {tp: (plan, 5, True)}
    batch = buffers.take(tp, ready[tp], now=100.0)
    assert [r.offset for r in batch.records] == [10, 11, 12, 13, 14] and buffers.plan(tp) is None
    assert [r.offset for r in buffers.records(tp)] == [15, 16]


def test_a_plan_found_after_records_from_elsewhere_were_fetched_drops_them_to_read_the_range_again():
    buffers = Buffers.from_settings(Settings(sink_batch_size=2))
    tp = TopicPartition(EVENTS_TOPIC, 2)
    fetched(buffers, tp, range(20, 23))  # fetched from the committed offset, past the plan's start
    assert buffers.replay(tp, Range(EVENTS_TOPIC, 2, 15, 19)) is True  # the caller seeks back to 15
    assert buffers.records(tp) == [] and buffers.count() == 0 and buffers.size() == 0
