"""How the ClickHouse sink forms batches from its buffers: pure logic, no server."""

from __future__ import annotations

from types import SimpleNamespace

from aiokafka import TopicPartition

from quotaflow.core.settings import Settings
from quotaflow.schemas.topics import EVENTS_TOPIC
from quotaflow.sinks.clickhouse.plans import Range
from quotaflow.sinks.clickhouse.sink import ClickHouseSink


def buffered(sink: ClickHouseSink, tp: TopicPartition, offsets: range) -> None:
    sink._buffers[tp] = [SimpleNamespace(offset=o, value=b"{}") for o in offsets]
    sink._bytes[tp] = 2 * len(offsets)
    sink._first_at[tp] = 0.0


def test_no_batch_is_taken_from_a_partition_before_its_plans_are_read():
    # aiokafka fetches a newly assigned partition before the rebalance listener has read
    # its plans: a batch taken then would ignore a plan, and the plan's replay would then
    # find its records gone (seen once as 1,000 events lost in the SIGKILL test).
    sink = ClickHouseSink(Settings(sink_batch_size=2))
    tp = TopicPartition(EVENTS_TOPIC, 0)
    buffered(sink, tp, range(10, 13))
    assert sink._ready(now=100.0) == {}
    sink._planned.add(tp)
    assert sink._ready(now=100.0) == {tp: (Range(EVENTS_TOPIC, 0, 10, 11), 2, False)}


def test_a_planned_batch_is_taken_whole_once_its_records_are_all_in():
    sink = ClickHouseSink(Settings(sink_batch_size=2))
    tp = TopicPartition(EVENTS_TOPIC, 1)
    plan = Range(EVENTS_TOPIC, 1, 10, 14)  # planned with a larger batch size than today's
    sink._planned.add(tp)
    sink._replays[tp] = plan
    buffered(sink, tp, range(10, 13))
    assert sink._ready(now=100.0) == {}  # the rest of the planned range is still to come
    buffered(sink, tp, range(10, 17))
    assert sink._ready(now=100.0) == {tp: (plan, 5, True)}
    batch = sink._take(tp, plan, 5, True, now=100.0)
    assert [r.offset for r in batch.records] == [10, 11, 12, 13, 14] and tp not in sink._replays
    assert [r.offset for r in sink._buffers[tp]] == [15, 16]
