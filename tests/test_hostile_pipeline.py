"""Hostile publishers against the live processor and sink (issue 11's findings, each
reproduced as the issue tried it and shown fixed): a record no decoder can re-encode,
times from the future, key ids shared by orgs, records on the wrong partition, and a
stop asked for while Redis is down."""

from __future__ import annotations

import asyncio
import re
import subprocess
import threading
import time

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from quotaflow.deploy import redis as redis_service
from quotaflow.deploy.system_packages import ensure_command
from quotaflow.gateway.limiter import RateLimiter
from quotaflow.schemas import deadletter
from quotaflow.schemas.events import TS_MAX_MS, encode_batch, partition_of
from quotaflow.schemas.topics import DEAD_LETTER_TOPIC, EVENTS_TOPIC
from tests.pipeline import counted, event, minute_start, publish, read_all, this_minute, unique, wait_for

REDIS_RETRYING = re.compile(r"redis: [\w ]+ failed, retrying")  # the processor's log line (core/retry.py)

pytestmark = pytest.mark.stack


def kcat_publish(settings, key: str, value: bytes) -> None:
    """Publish as a user would from the shell (kcat's own partitioner, not ours)."""
    kcat = ensure_command("kcat", "kcat")
    subprocess.run([kcat, "-P", "-b", settings.kafka_bootstrap, "-t", EVENTS_TOPIC, "-k", key], input=value,
                   check=True, timeout=30)


def dead_letters(settings, org: str) -> list[tuple[dict[str, str], bytes]]:
    """(headers, value) of the dead letters whose record was keyed by ``org``."""
    return [(deadletter.read_headers(r.headers), r.value)
            for r in asyncio.run(read_all(settings, DEAD_LETTER_TOPIC)) if r.key == org.encode()]


async def publish_to(settings, partition: int, records: list[tuple[bytes, bytes]]) -> None:
    """Records put on a chosen partition, as a publisher with another partitioner does."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, enable_idempotence=True)
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(EVENTS_TOPIC, value, key=key, partition=partition)
    finally:
        await producer.stop()


def stored(pipeline, org: str) -> tuple[int, int]:
    """(rows, distinct event ids) of an org in the raw table; the sink must be stopped."""
    rows = pipeline.query_clickhouse("SELECT count(), uniqExact(event_id) FROM requests WHERE org_id = {o:String}",
                                     {"o": org})
    return rows[0]


def test_a_record_nested_300_levels_deep_is_dead_lettered_and_the_pipeline_goes_on(live_stack, redis_client,
                                                                                    pipeline):
    """Finding 1: copying the refused item for its dead letter raised 'Recursion limit
    reached'; nothing caught it, so both stages failed on that record after every restart."""
    org, key = unique("deep"), unique("key")
    pids = pipeline.start("processor"), pipeline.start("sink")
    window = this_minute()
    depth = 300
    kcat_publish(live_stack, org, ('[{"x":' + "[" * depth + "]" * depth + "}]\n").encode())
    asyncio.run(publish(live_stack, [event(org, key, window + 1)]))

    wait_for(lambda: counted(redis_client, org, key, window) == 1, 60, "the event behind it to be counted",
             pipeline.logs)
    wait_for(lambda: dead_letters(live_stack, org), 30, "the dead letter")
    ((headers, value),) = dead_letters(live_stack, org)
    assert headers[deadletter.HEADER_STAGE] == "processor" and headers[deadletter.HEADER_SOURCE_INDEX] == "0"
    assert "schema_version: required field is missing" in headers[deadletter.HEADER_REASON]
    assert value.startswith(b'[{"x":[[[') and len(value) == 2 * depth + 8  # the record as published
    pipeline.wait_sink_caught_up()
    states = pipeline.state("processor"), pipeline.state("sink")
    assert [(s.pid, s.restarts) for s in states] == [(pid, 0) for pid in pids]  # neither stage stopped or restarted
    assert pipeline.metric("sink", 'quotaflow_sink_events_total{outcome="invalid_skipped"}') >= 1
    pipeline.stop("sink")
    assert stored(pipeline, org) == (1, 1)


def test_an_event_stamped_in_the_future_is_refused_and_turns_no_counting_off(live_stack, redis_client, pipeline):
    """Finding 2: one event stamped years ahead moved the key's and the org's clock there;
    every later real event was judged late and never counted (a key limited to 10/min was
    admitted 60 of 60). One 4 minutes ahead zeroed the current minute."""
    control, attacked = unique("ctl"), unique("atk")
    key = "web"
    pipeline.start("processor")
    window = minute_start(need_s=40)
    years_ahead = event(attacked, key, TS_MAX_MS - 1)
    minutes_ahead = event(attacked, key, window + 240_000)  # within the 300 s of skew accepted
    asyncio.run(publish(live_stack, [], [(attacked.encode(), encode_batch([years_ahead, minutes_ahead]))]))
    asyncio.run(publish(live_stack, [event(org, key, window + i) for org in (control, attacked) for i in range(15)]))

    for org in (control, attacked):
        wait_for(lambda: counted(redis_client, org, key, window) == 15 and counted(redis_client, org, None, window) == 15,
                 60, f"{org}'s 15 events of this minute to count", pipeline.logs)
    assert counted(redis_client, attacked, key, window + 240_000) == 1  # in its own (future) minute
    ((headers, value),) = dead_letters(live_stack, attacked)
    assert orjson.loads(value)["event_id"] == years_ahead.event_id
    assert "s after the broker received the record" in headers[deadletter.HEADER_REASON]
    assert pipeline.metric("processor", 'quotaflow_processor_events_total{outcome="ahead"}') >= 1

    async def admitted(org: str) -> tuple[bool, bool]:  # FREE: 10 a minute, 15 counted
        # A budget a loaded test machine always meets: the check must be enforced, not fail open.
        limiter = RateLimiter.from_settings(live_stack.model_copy(update={"gateway_timeout_ms": 5000}))
        try:
            d = await limiter.check(key, org)
            return d.allowed, d.enforced
        finally:
            await limiter.aclose()

    assert (asyncio.run(admitted(control)), asyncio.run(admitted(attacked))) == ((False, True), (False, True))


def test_orgs_sharing_a_key_id_are_counted_apart_wherever_their_records_land(live_stack, redis_client, pipeline):
    """Finding 3: key counts were keyed by the key id alone, so two orgs sending 30 and 20
    events on key 'web' both read 50. Here the second org publishes on another partition
    than its own as well (another partitioner): those records are forwarded and counted
    once, and stored once."""
    assert live_stack.events_partitions > 1
    first, second = unique("first"), unique("second")
    key = "web"
    pipeline.start("processor")
    pipeline.start("sink")
    window = this_minute()
    asyncio.run(publish(live_stack, [event(first, key, window + i) for i in range(30)]))
    home = partition_of(second, live_stack.events_partitions)
    elsewhere = (home + 1) % live_stack.events_partitions
    evs = [event(second, key, window + i) for i in range(20)]
    asyncio.run(publish_to(live_stack, elsewhere, [(second.encode(), encode_batch(evs[:10]))]
                           + [(b"not-the-org", ev.encode()) for ev in evs[10:]]))

    wait_for(lambda: (counted(redis_client, first, key, window), counted(redis_client, second, key, window)) == (30, 20),
             60, "30 and 20", pipeline.logs)
    assert (counted(redis_client, first, None, window), counted(redis_client, second, None, window)) == (30, 20)
    assert pipeline.metric("processor", 'quotaflow_processor_events_total{outcome="forwarded"}') >= 20
    pipeline.wait_sink_caught_up()
    assert pipeline.metric("sink", 'quotaflow_sink_events_total{outcome="forwarded_skipped"}') >= 11
    pipeline.stop("sink")
    assert stored(pipeline, first) == (30, 30) and stored(pipeline, second) == (20, 20)


def test_processor_killed_while_orgs_share_a_key_id_on_two_partitions_counts_each_exactly(live_stack, redis_client,
                                                                                         pipeline):
    """Finding 3, under a crash: with the processor killed while such a key got traffic on
    two partitions, counts ended at 19,935, 14,370, 32,230 and 24,895 where 10,000 each
    were sent, and once an org stopped at 2,480 with the backlog gauge at 0."""
    orgs = [unique("pa"), unique("pb")]
    homes = {partition_of(o, live_stack.events_partitions) for o in orgs}
    while len(homes) < 2:  # two orgs on two partitions
        orgs[1] = unique("pb")
        homes = {partition_of(o, live_stack.events_partitions) for o in orgs}
    key, total, chunk = "web", 4000, 200
    window = this_minute()
    events = {org: [event(org, key, window + i % 20_000) for i in range(total)] for org in orgs}
    pipeline.start("processor", QUOTAFLOW_PROCESSOR_COMMIT_INTERVAL_S="600")  # nothing committed before the kill
    failed: list[BaseException] = []

    def publish_slowly() -> None:
        try:
            for i in range(0, total, chunk):
                asyncio.run(publish(live_stack, [ev for org in orgs for ev in events[org][i:i + chunk]]))
        except BaseException as exc:  # reported by the test, not lost in the thread
            failed.append(exc)

    publisher = threading.Thread(target=publish_slowly)
    publisher.start()
    wait_for(lambda: pipeline.metric("processor", 'quotaflow_processor_events_total{outcome="counted"}') >= 1500, 60,
             "the processor to be mid-stream", pipeline.logs)
    pipeline.kill("processor")
    pipeline.start("processor")
    publisher.join()
    assert not failed, failed

    want = {org: (total, total) for org in orgs}
    wait_for(lambda: {o: (counted(redis_client, o, key, window), counted(redis_client, o, None, window))
                      for o in orgs} == want, 120, "each org's key and org counts exact",
             lambda: f"{ {o: (counted(redis_client, o, key, window), counted(redis_client, o, None, window)) for o in orgs} }"
                     f"\n{pipeline.logs()}")
    wait_for(lambda: pipeline.metric("processor", "quotaflow_processor_backlog_records") == 0, 30,
             "the backlog gauge to read 0")


def test_sigterm_stops_the_processor_within_seconds_even_while_redis_is_down(live_stack, redis_client, pipeline):
    """Finding 9's last part: SIGTERM did not stop the processor within 10 s while a batch
    waited (wait_empty: Waiting for tasks ...). Nothing is lost: the batch it gave up is
    read again by the next processor."""
    org, key = unique("term"), unique("key")
    pipeline.start("processor")
    window = this_minute()
    redis_service.stop(live_stack)
    try:
        asyncio.run(publish(live_stack, [event(org, key, window + i) for i in range(50)]))
        wait_for(lambda: REDIS_RETRYING.search(pipeline.logs("processor")), 30, "a batch waiting for Redis")
        started = time.monotonic()
        pipeline.stop("processor")  # SIGTERM, through its supervisor, as `stack down` does
        elapsed = time.monotonic() - started
    finally:
        redis_service.start(live_stack)
    assert elapsed < 10, f"stopped after {elapsed:.1f} s"
    pipeline.start("processor")
    wait_for(lambda: counted(redis_client, org, key, window) == 50, 60, "the 50 counted after the restart",
             pipeline.logs)


def test_on_a_fresh_stack_an_invalid_first_record_is_dead_lettered_and_the_next_event_counted(live_stack,
                                                                                               spare_stack_env):
    """Finding 9: on a fresh stack (12 of 14 attempts) the dead letter of an invalid first
    record never reached its topic, the agent crashed 40 s later with
    NotLeaderForPartitionError, and the valid event behind it was never counted."""
    from quotaflow.core.settings import Settings
    from quotaflow.deploy import stack
    from tests.pipeline import Pipeline

    for attempt in range(2):
        env = spare_stack_env(f"fresh-{attempt}")
        fresh = Settings(**{name.removeprefix("QUOTAFLOW_").lower(): value for name, value in env.items()})
        stack.up(fresh)
        pipeline = Pipeline(fresh)
        try:
            pipeline.start("processor", **env)
            bad_org, org, key = unique("orgZ"), unique("org"), unique("key")
            kcat_publish(fresh, bad_org, b"not json\n")
            now = int(time.time() * 1000)
            asyncio.run(publish(fresh, [event(org, key, now)]))
            import redis

            client = redis.Redis.from_url(fresh.redis_url)
            wait_for(lambda: counted(client, org, key, now) == 1, 60, "the valid event counted", pipeline.logs)
            ((headers, value),) = dead_letters(fresh, bad_org)
            assert value == b"not json" and "not valid UTF-8 JSON" in headers[deadletter.HEADER_REASON]
            wait_for(lambda: pipeline.metric("processor", "quotaflow_processor_backlog_records") == 0, 30,
                     "the backlog gauge to read 0", pipeline.logs)
            started = time.monotonic()
            pipeline.stop("processor")
            assert time.monotonic() - started < 10
            assert "processor stopped (code 0)" in pipeline.logs("processor")  # by SIGTERM, not SIGKILL after the timeout
            client.close()
        finally:
            pipeline.stop_all()
            stack.down(fresh)


def test_the_emitter_refuses_any_python_value_without_raising(live_stack):
    """A service hands the emitter whatever it built; nothing it hands over may raise
    into its request path. Each refusal is dead-lettered, with its reason."""
    org = unique("emit")
    deep: dict = {"org_id": org}
    inner = deep
    for _ in range(5000):  # deeper than any encoder or repr goes
        inner["x"] = {}
        inner = inner["x"]
    cyclic: dict = {"org_id": org}
    cyclic["self"] = cyclic
    hostile = [deep, cyclic, {"org_id": org, object(): 1}, {"org_id": org, "ts_ms": {1, 2}},
               {"org_id": "x" * 1_000_000}, {1: 2}, {}]

    async def emit_all() -> list[bool]:
        from quotaflow.collector.emitter import Emitter

        async with Emitter(live_stack.kafka_bootstrap) as emitter:
            answers = [await emitter.emit(doc) for doc in hostile]
            await emitter.flush()
            return answers + [emitter.dead_lettered]

    *answers, dead = asyncio.run(emit_all())
    assert answers == [False] * len(hostile) and dead == len(hostile)
