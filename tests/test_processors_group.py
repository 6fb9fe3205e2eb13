"""Several processors in one consumer group on the events topic: a partition moving from one
to another (a processor killed, one joining) loses no count and counts nothing twice, and
gateways checking meanwhile admit no more than the limits.

The write fence, the stall watch and the forgetting of lost partitions are tested alone (seconds);
the groups under a stream (a SIGKILL and a join; a freeze; an expulsion) take 40 to 80 s each:
marked `cluster` (make test-cluster).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal

import pytest
import redis.asyncio as aioredis

from quotaflow.core.settings import Settings
from quotaflow.processors.backend import RedisBackend, SubjectWrite
from quotaflow.processors.offset_guard import next_offset_key
from quotaflow.processors.stall_watch import EXIT_STALLED, StallWatch
from quotaflow.processors.subjects import key_subject, org_subject
from quotaflow.processors.table import Table
from quotaflow.schemas.limits import policy_from_settings
from quotaflow.schemas.redis_keys import APPLIED_FIELD, reservations_key, usage_key
from quotaflow.schemas.topics import WINDOW_COUNTS_TOPIC
from tests.broker_drill import Stream, reckon, spread_orgs
from tests.pipeline import counted, this_minute, unique, wait_for
from tests.rebalance_drill import (
    COUNTED,
    FENCED,
    GatewayLoad,
    Processor,
    admitted_per_day,
    group_state,
    scrape,
    worst_ratio,
)

pytestmark = pytest.mark.stack


def test_counts_older_than_those_stored_are_not_written_but_their_reservations_are_released(live_stack,
                                                                                             redis_client):
    """A processor that took a partition over recounts from the changelog's state, behind the
    counts its killed predecessor wrote; an owner that stalled past its session writes a
    batch its successor already counted further. Written, either moved the counts back
    while the reservations of the events since were gone: gateways would admit those
    events' worth again."""
    org, key = unique("fence"), unique("key")
    m = this_minute()
    policy = policy_from_settings(live_stack)
    ids = [unique("ev") for _ in range(6)]
    for scope in (reservations_key(org, key), reservations_key(org)):
        redis_client.zadd(scope, {i: m for i in ids})

    def buckets(n: int) -> list:
        return [[[m, n]]] + [[[m - m % w.bucket_ms, n]] for w in policy.windows[1:]]

    async def write(n: int, applied: tuple[int, int], released: list[str]) -> int:
        client = aioredis.Redis.from_url(live_stack.redis_url)
        try:
            backend = RedisBackend(client, policy)
            return await backend.send_write(backend.prepare_write([
                SubjectWrite(org, key, buckets(n), None, released, applied),
                SubjectWrite(org, None, buckets(n), None, released, applied)]))
        finally:
            await client.aclose()

    def state() -> tuple:
        return (counted(redis_client, org, key, m), counted(redis_client, org, None, m),
                redis_client.zcard(reservations_key(org, key)), redis_client.zcard(reservations_key(org)))

    assert asyncio.run(write(4, (3, 400 << 16), ids[:4])) == 0
    assert state() == (4, 4, 2, 2)
    # The same counts again (a batch written twice): written.
    assert asyncio.run(write(4, (3, 400 << 16), ids[:4])) == 0
    # Older counts from the same partition: not written; their events' reservations released.
    assert asyncio.run(write(2, (3, 200 << 16 | 5), ids[:2])) == 2
    assert state() == (4, 4, 2, 2)
    # Newer ones are.
    assert asyncio.run(write(6, (3, 401 << 16), ids)) == 0
    assert state() == (6, 6, 0, 0)
    # Places compare exactly beyond what a Lua number holds (2**53).
    assert asyncio.run(write(7, (3, 2**60), [])) == 0
    assert asyncio.run(write(1, (3, 2**60 - 1), [])) == 2
    assert state()[:2] == (7, 7)
    # Counts from another partition (the events topic's partitions were added to: the org
    # moved, its counts start over there) are written.
    assert asyncio.run(write(1, (0, 5), [])) == 0
    assert state()[:2] == (1, 1)
    assert redis_client.hget(usage_key(org, key), APPLIED_FIELD) == b"0:" + b"5".rjust(20, b"0")



def test_a_rebalance_forgets_what_was_counted_on_partitions_now_another_processors():
    """Kept, such state went stale while another processor counted on; the idle sweep then
    deleted from the changelog subjects their owner still counted (lost on its next recovery)."""
    state = {"p": 0, "o": 7, "m": 1, "b": [[]]}
    table = Table("127.0.0.1:9", WINDOW_COUNTS_TOPIC)
    table.data.update({key_subject("a", "k"): dict(state), org_subject("a"): dict(state),
                       key_subject("b", "k"): {**state, "p": 2}, org_subject("b"): {**state, "p": 2},
                       next_offset_key(0): 8, next_offset_key(2): 3, next_offset_key(11): 5})
    assert table.keep_partitions({2, 11}) == 3
    assert table.data == {key_subject("b", "k"): {**state, "p": 2}, org_subject("b"): {**state, "p": 2},
                          next_offset_key(2): 3, next_offset_key(11): 5}


# The policy of the processors and gateways below: a 10 s window, so several fill and pass
# while partitions move; the day's window only keeps every count for the reckoning (60 s
# too, for Pipeline.wait_processor_applied's markers).
LIMIT = 8
POLICY_ENV = {"QUOTAFLOW_WINDOWS": "10,60,86400", "QUOTAFLOW_TIER_LIMITS": json.dumps({"FREE": [LIMIT, None, None]}),
              "QUOTAFLOW_GATEWAY_TIMEOUT_MS": "2000"}


@pytest.mark.cluster
def test_a_processor_killed_and_one_joining_mid_stream_lose_no_count_and_admit_no_more_than_the_limits(
        live_stack, redis_client, pipeline, port_base, tmp_path):
    with pytest.MonkeyPatch.context() as env:
        for name, value in POLICY_ENV.items():
            env.setenv(name, value)
        settings = Settings()
    policy = policy_from_settings(settings)
    partitions = settings.events_partitions
    first_pid = pipeline.start("processor", **POLICY_ENV)
    second, third = (Processor(port_base + 112 + i, tmp_path / f"processor-{i + 2}.log", POLICY_ENV)
                     for i in range(2))
    second.start()

    def logs() -> str:
        return "\n".join([pipeline.logs("processor"), second.tail(), third.tail()])

    stream = gateways = None
    try:
        wait_for(second.ready, 90, "the second processor to join the group", logs)
        # Gateways at their orgs' limits (two keys of each org share its limit), and a stream of
        # plain events beside them, both to orgs on every partition.
        gateway_orgs = spread_orgs(partitions, 2)
        gateways = GatewayLoad(settings, [(org, f"key-{k}") for org in gateway_orgs for k in range(2)],
                               rate_per_key=3.0).start()
        stream = Stream(settings.kafka_bootstrap, tmp_path / "spool", spread_orgs(partitions, 1), this_minute(),
                        records_per_s=40).start()

        def stream_counts() -> dict[str, int]:
            return stream.counted_by_org(redis_client)

        def every_partition_moves(before: dict[str, int], by: int = 30) -> bool:
            """Every partition's org counted ``by`` more events since ``before``: some processor holds it."""
            now = stream_counts()
            return all(now[org] >= before[org] + by for org in stream.orgs)

        wait_for(lambda: second.counted() > 0 and pipeline.metric("processor", COUNTED) > 0, 60,
                 "both processors counting", logs)
        second.kill()  # mid-stream: its partitions wait for its session to end (15 s), then move
        at_kill = stream_counts()
        wait_for(lambda: every_partition_moves(at_kill), 90, "the killed processor's partitions counted again", logs)
        third.start()  # mid-stream again: partitions move from a live processor to the newcomer
        wait_for(lambda: third.counted() > 0, 90, "the third processor to count its partitions", logs)
        at_join = stream_counts()
        wait_for(lambda: every_partition_moves(at_join), 60, "every partition counted after the join", logs)
        gateways.stop()
        stream.stop()
        assert stream.lost == 0 and stream.spool_drained
        pipeline.wait_processor_applied(redis_client, timeout_s=90)

        # Gateways: every check enforced, every event delivered, no window over its limit,
        # and the limits reached (1.000: not exactness by refusing everything).
        assert gateways.unenforced == 0 and gateways.failed_events == 0
        ratio = worst_ratio(gateways.decisions, policy, "FREE")
        assert ratio == 1.0, (ratio, len(gateways.decisions))
        # Every admitted request counted once, by key and by org.
        want = admitted_per_day(gateways.decisions)
        got = {(org, key, day): counted(redis_client, org, key, day, label="86400s") for org, key, day in want}
        assert got == want
        # Every acknowledged event of the stream counted once.
        result = reckon(stream, redis_client, rows={})
        submitted = sum(len(ids) for ids in stream.submitted.values())
        assert result.acknowledged == submitted > 1000, result
        assert (result.lost_counted, result.double_counted, result.counted) == (0, 0, submitted), result
        # The first processor went through both rebalances without a restart.
        state = pipeline.state("processor")
        assert (state.pid, state.restarts) == (first_pid, 0), state
        print(f"{len(gateways.decisions)} checks, {gateways.admitted()} admitted, worst window {ratio:.3f} of its "
              f"limit; {submitted} stream events counted once; "
              f"writes fenced: {[scrape(p).get(FENCED, 0) for p in (live_stack.processor_metrics_port, third.port)]}")
    finally:
        for load in (gateways, stream):
            if load is not None:
                with contextlib.suppress(Exception):  # stopped already, or failed: the test says why
                    load.stop()
        second.stop()
        third.stop()


def test_the_stall_watch_ends_a_process_frozen_for_half_a_session():
    """Gaps between ticks are time the whole process stood still (the thread is not held up
    by a busy event loop); the batch looks too, as it may resume before the thread ticks."""
    now, stalls = [100.0], []
    watch = StallWatch(7.5, stalls.append, clock=lambda: now[0])
    now[0] += 7.0
    watch.check()
    watch.tick()
    assert stalls == []
    now[0] += 8.0
    watch.check()  # the batch, before the thread ticked
    assert stalls == [8.0]
    watch.tick()
    now[0] += 1.0
    watch.tick()
    assert stalls == [8.0, 8.0]


@pytest.mark.cluster
def test_a_processor_frozen_mid_batch_past_its_session_exits_without_writing_its_batch(
        live_stack, redis_client, pipeline, port_base, tmp_path):
    """Frozen (SIGSTOP) in the middle of a batch until the group gave its partitions to the
    other processor, which counted on from them: resumed, it would write counts and changelog
    records behind its successor's. It exits instead, and every event is counted once."""
    with pytest.MonkeyPatch.context() as env:
        for name, value in POLICY_ENV.items():
            env.setenv(name, value)
        settings = Settings()
    first_pid = pipeline.start("processor", **POLICY_ENV)
    second = Processor(port_base + 112, tmp_path / "processor-2.log", POLICY_ENV).start()

    def logs() -> str:
        return "\n".join([pipeline.logs("processor"), second.tail()])

    stream = None
    try:
        wait_for(second.ready, 90, "the second processor to join the group", logs)
        stream = Stream(settings.kafka_bootstrap, tmp_path / "spool", spread_orgs(settings.events_partitions, 1),
                        this_minute(), records_per_s=40).start()

        def stream_counts() -> dict[str, int]:
            return stream.counted_by_org(redis_client)

        wait_for(lambda: second.counted() > 0 and pipeline.metric("processor", COUNTED) > 0, 60,
                 "both processors counting", logs)
        # Writes held (scripts included): each processor stops in its next batch, at the duplicate
        # check, its first write. Frozen there, the second resumes mid-batch.
        redis_client.client_pause(120_000, all=False)
        try:
            sent = stream.delivered_count()
            wait_for(lambda: stream.delivered_count() >= sent + 200, 30, "events on every partition meanwhile", logs)
            os.kill(second.proc.pid, signal.SIGSTOP)
        finally:
            redis_client.client_unpause()
        try:
            at = stream_counts()
            wait_for(lambda: all(n >= at[org] + 30 for org, n in stream_counts().items()), 90,
                     "the first processor to count the frozen one's partitions", logs)
        finally:
            os.kill(second.proc.pid, signal.SIGCONT)
        wait_for(lambda: second.proc.poll() is not None, 30, "the frozen processor to exit", logs)
        assert second.proc.returncode == EXIT_STALLED, logs()
        assert "the processor was frozen for" in second.log.read_text()
        stream.stop()
        assert stream.lost == 0 and stream.spool_drained
        pipeline.wait_processor_applied(redis_client, timeout_s=90)
        result = reckon(stream, redis_client, rows={})
        submitted = sum(len(ids) for ids in stream.submitted.values())
        assert result.acknowledged == submitted > 500, result
        assert (result.lost_counted, result.double_counted, result.counted) == (0, 0, submitted), result
        state = pipeline.state("processor")
        assert (state.pid, state.restarts) == (first_pid, 0), state
    finally:
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.stop()
        if second.proc is not None and second.proc.poll() is None:
            os.kill(second.proc.pid, signal.SIGCONT)
        second.stop()


@pytest.mark.cluster
def test_processors_the_group_expelled_while_their_batches_were_held_up_exit_without_writing_them(
        live_stack, redis_client, pipeline, port_base, tmp_path):
    """Two processors held mid-batch (Redis writes paused, as a Redis only they cannot reach
    would) while a third joins: they cannot hand their partitions over, and once the
    rebalance timeout has passed the group goes on without them (the third takes everything).
    When their batches can go on, those partitions are the third's: they exit instead of
    writing, and every event counts once."""
    env = {**POLICY_ENV, "QUOTAFLOW_PROCESSOR_REBALANCE_TIMEOUT_S": "20"}  # 60 s by default: the test waits it out
    with pytest.MonkeyPatch.context() as patch:
        for name, value in POLICY_ENV.items():
            patch.setenv(name, value)
        settings = Settings()
    pipeline.start("processor", **env)
    second, third = (Processor(port_base + 112 + i, tmp_path / f"processor-{i + 2}.log", env) for i in range(2))
    second.start()

    def logs() -> str:
        return "\n".join([pipeline.logs("processor"), second.tail(), third.tail()])

    stream = None
    try:
        wait_for(second.ready, 90, "the second processor to join the group", logs)
        stream = Stream(settings.kafka_bootstrap, tmp_path / "spool", spread_orgs(settings.events_partitions, 1),
                        this_minute(), records_per_s=40).start()
        wait_for(lambda: second.counted() > 0 and pipeline.metric("processor", COUNTED) > 0, 60,
                 "both processors counting", logs)
        redis_client.client_pause(180_000, all=False)
        try:
            sent = stream.delivered_count()
            wait_for(lambda: stream.delivered_count() >= sent + 200, 30, "events on every partition meanwhile", logs)
            third.start()
            wait_for(lambda: third.ready() and asyncio.run(group_state(settings.kafka_bootstrap)) == ("Stable", 1),
                     90, "the group to go on with the third processor alone", logs)
        finally:
            redis_client.client_unpause()
        wait_for(lambda: second.proc.poll() is not None, 30, "the expelled second processor to exit", logs)
        assert second.proc.returncode == EXIT_STALLED, logs()
        assert "group moved on without it" in second.log.read_text()
        wait_for(lambda: "group moved on without it" in pipeline.logs("processor", lines=10_000), 30,
                 "the expelled first processor to exit", logs)
        stream.stop()
        assert stream.lost == 0 and stream.spool_drained
        pipeline.wait_processor_applied(redis_client, timeout_s=120)
        result = reckon(stream, redis_client, rows={})
        submitted = sum(len(ids) for ids in stream.submitted.values())
        assert result.acknowledged == submitted > 500, result
        assert (result.lost_counted, result.double_counted, result.counted) == (0, 0, submitted), result
        assert pipeline.state("processor").restarts == 1  # its supervisor started it again
    finally:
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.stop()
        second.stop()
        third.stop()
