"""The API key registry's materializer: every record of the keys topic (a key's whole
state, schemas/api_keys.py KeyRecord) written to Redis, where gateways verify keys.

- Each record goes to its key's hash (schemas.redis_keys.api_key_record: the fields the
  gateway's check reads, KeyRecord.to_redis) and to its org's index (api_key_index: the
  whole record, for lists and the registry), in one script call in the org's slot. The
  highest version of a key is kept: a record replayed, or read again by a rebuild, changes
  nothing. A record for a hash another key already holds is refused, and so is one giving
  a key of the org another hash: a key's record is replaced only by a record of the same
  key_id and hash.
- Progress is kept in API_KEYS_STATE: the next offset applied, and a status that is "ok"
  once Redis holds every record below it. Redis emptied or lost (FLUSHALL, a restart
  without its files) takes the status with it: the watch notices within half a second and
  rebuilds the registry from the topic alone (``rebuild``, also `quotaflow keys rebuild`).
  A status still missing at the end of a rebuild means Redis was emptied meanwhile: it
  starts over. The watch rebuilds as well when the materializer falls behind the topic
  and stops moving (records the stream skipped around a rebalance, Redis restored from an
  old snapshot).
- Records that are not a key's record (anyone who can write to the topic could send
  anything) are dead-lettered with the reason, stage processor, and change nothing.

Runs in the processor's Faust app (``wire``, from processors/app.py): an agent reading the
keys topic (one partition: one processor of the group applies it) and the watch, a timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass

import faust
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from prometheus_client import Counter, Histogram
from redis.exceptions import RedisError

from quotaflow.core.redis_clients import AsyncClient, async_client
from quotaflow.core.retry import retry
from quotaflow.core.settings import Settings
from quotaflow.processors import stopping
from quotaflow.schemas import deadletter, key_records
from quotaflow.schemas.api_keys import KeyRecord
from quotaflow.schemas.redis_keys import (
    API_KEYS_BEAT_FIELD,
    API_KEYS_OFFSET_FIELD,
    API_KEYS_REBUILDING,
    API_KEYS_STATE,
    API_KEYS_STATUS_FIELD,
    API_KEYS_STATUS_OK,
    api_key_index,
    api_key_record,
)
from quotaflow.schemas.topics import DEAD_LETTER_TOPIC, KEYS_PARTITIONS, KEYS_TOPIC

log = logging.getLogger(__name__)

RECORDS = Counter("quotaflow_processor_key_records_total",
                  "Records of the keys topic taken by the key registry's materializer, by outcome "
                  "(applied, stale: an older or equal version, conflict: another key's hash or a key's hash changed, "
                  "invalid)", ["outcome"])
LAG = Histogram("quotaflow_processor_key_record_lag_seconds",
                "From a key record's publication (its timestamp) to its write in Redis",
                buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
REBUILDS = Counter("quotaflow_processor_key_registry_rebuilds_total",
                   "Rebuilds of the key registry in Redis from the keys topic, by reason", ["reason"])

TP = TopicPartition(KEYS_TOPIC, 0)  # KEYS_PARTITIONS is 1
WATCH_S = 0.5
STUCK_S = 2.0  # behind the topic's end without moving this long: rebuild
# A rebuild marks its progress (API_KEYS_BEAT_FIELD) at least every second; one silent this
# long was killed outright: another takes over. (A stopped or failed rebuild gives its status
# up itself: ABANDON.) Kept in Redis, so that processors living shorter than this see it too.
STALE_REBUILD_S = 10.0
READ_TIMEOUT_S = 60.0  # a rebuild that cannot read the topic this long gives up (and is tried again)

# KEYS[1] the key's record, KEYS[2] its org's index (one hash slot: the key's slot hint is
# its org's). ARGV: key_id, version, the whole record (JSON), its key_hash, then the record's
# fields and values (KeyRecord.to_redis). 1: written; 0: that version or a later one is
# there; -1: another key holds this hash; -2: the org's index holds this key_id with another
# hash (a key's hash never changes: such a record would leave the old hash's record behind,
# still valid).
APPLY = """
local held = redis.call('HGET', KEYS[1], 'key_id')
if held and held ~= ARGV[1] then return -1 end
local indexed = redis.call('HGET', KEYS[2], ARGV[1])
if indexed then
  local ok, prev = pcall(cjson.decode, indexed)
  if not ok or type(prev) ~= 'table' or prev['key_hash'] ~= ARGV[4] then return -2 end
end
local version = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
local wanted = tonumber(ARGV[2])
if version >= wanted then
  if version == wanted then redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[3]) end
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
return 1
"""
# KEYS[1] the state; ARGV[1] the next offset to apply: kept if higher than the one there.
ADVANCE = """
local offset = tonumber(redis.call('HGET', KEYS[1], 'offset') or '-1')
if tonumber(ARGV[1]) > offset then redis.call('HSET', KEYS[1], 'offset', ARGV[1]) end
return offset
"""
# KEYS[1] the state; ARGV[1] this rebuild's status, ARGV[2] the offset it read up to.
# 1: done (status ok); 0: Redis was emptied meanwhile; 2: another rebuild took over; 3: it is ok.
FINISH = """
local status = redis.call('HGET', KEYS[1], 'status')
if status == ARGV[1] then
  local offset = tonumber(redis.call('HGET', KEYS[1], 'offset') or '-1')
  if tonumber(ARGV[2]) > offset then redis.call('HSET', KEYS[1], 'offset', ARGV[2]) end
  redis.call('HSET', KEYS[1], 'status', 'ok')
  return 1
end
if not status then return 0 end
if status == 'ok' then return 3 end
return 2
"""
FINISHED, EMPTIED, TAKEN_OVER, ALREADY_OK = 1, 0, 2, 3
# KEYS[1] the state; ARGV[1] an abandoned rebuild's status: dropped if still that one, so
# the next watch rebuilds at once instead of waiting STALE_REBUILD_S for a rebuild that died.
ABANDON = """
if redis.call('HGET', KEYS[1], 'status') == ARGV[1] then return redis.call('HDEL', KEYS[1], 'status') end
return 0
"""
CONFLICTS = {-1: "another key's record holds this key's hash (a key_id differs)",
             -2: "the org already holds this key_id with another hash (a key's hash never changes)"}


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class Rebuilt:
    records: int  # read from the topic
    applied: int  # written to Redis (the rest were there already, or refused)
    invalid: int
    end: int  # the topic's end offset read up to
    seconds: float
    superseded: bool = False  # another rebuild took over; it finishes the job


class KeyMaterializer:
    def __init__(self, redis: AsyncClient, bootstrap: str):
        self.redis = redis
        self.bootstrap = bootstrap
        self._apply = redis.register_script(APPLY)
        self._advance = redis.register_script(ADVANCE)
        self._finish = redis.register_script(FINISH)
        self._abandon = redis.register_script(ABANDON)
        self._producer: AIOKafkaProducer | None = None  # dead letters, started on the first one
        self._probe: AIOKafkaConsumer | None = None  # the topic's end offset, for the watch
        self._rebuilding: asyncio.Future | None = None
        self._seen: tuple[int, float] | None = None  # (offset applied, since when), for the watch

    async def stop(self) -> None:
        if self._rebuilding is not None and not self._rebuilding.done():
            self._rebuilding.cancel()
            await asyncio.gather(self._rebuilding, return_exceptions=True)
        for client in (self._producer, self._probe):
            if client is not None:
                await client.stop()

    # --- one record ------------------------------------------------------------------

    async def write(self, rec: KeyRecord) -> int:
        """Write a checked record (APPLY's answer)."""
        fields = [item for pair in rec.to_redis().items() for item in pair]
        return await self._apply(keys=[api_key_record(rec.slot_hint, rec.key_hash), api_key_index(rec.org_id)],
                                 args=[rec.key_id, rec.version, rec.encode(), rec.key_hash, *fields])

    async def apply(self, key: bytes | None, value: bytes | None, offset: int) -> tuple[str, str]:
        """Apply one record of the topic: (its outcome, see RECORDS; why it was refused, or
        ""). Raises RedisError."""
        try:
            rec = key_records.decode(key, value)
        except key_records.InvalidRecord as exc:
            outcome, reason = "invalid", str(exc)
        else:
            written = await self.write(rec)
            outcome = {1: "applied", 0: "stale", -1: "conflict", -2: "conflict"}[written]
            reason = CONFLICTS.get(written, "")
        await self._advance(keys=[API_KEYS_STATE], args=[offset + 1])
        RECORDS.labels(outcome).inc()
        if reason:
            log.warning("refused a record of the keys topic", extra={"offset": offset, "reason": reason})
        return outcome, reason

    async def dead_letter(self, key: bytes | None, value: bytes | None, offset: int, reason: str) -> None:
        if self._producer is None:
            self._producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, enable_idempotence=True)
            await self._producer.start()
        await self._producer.send_and_wait(
            DEAD_LETTER_TOPIC, value, key=key,
            headers=deadletter.headers(reason, deadletter.STAGE_PROCESSOR, topic=KEYS_TOPIC, partition=TP.partition,
                                       offset=offset, ts_ms=int(time.time() * 1000)))

    # --- the whole topic ---------------------------------------------------------------

    async def rebuild(self, reason: str = "asked") -> Rebuilt:
        """Apply every record of the topic, from its start to its end as of now, and mark
        the registry complete: repeated if Redis is emptied meanwhile."""
        REBUILDS.labels(reason).inc()
        started = time.monotonic()
        while True:
            status = API_KEYS_REBUILDING + secrets.token_hex(8)
            try:
                # in the try: a stop landing while this write is under way (applied, its answer
                # not yet read) must give the status up too
                await self.redis.hset(API_KEYS_STATE, mapping={API_KEYS_STATUS_FIELD: status,
                                                               API_KEYS_BEAT_FIELD: now_ms()})
                records, applied, invalid, end = await self._read_all()
                done = await self._finish(keys=[API_KEYS_STATE], args=[status, end])
            except BaseException:  # stopped (the processor's stop cancels it) or failed: not done
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._abandon(keys=[API_KEYS_STATE], args=[status]))
                raise
            if done != EMPTIED:
                out = Rebuilt(records, applied, invalid, end, time.monotonic() - started, done == TAKEN_OVER)
                log.info("key registry rebuilt from the keys topic",
                         extra={"reason": reason, "records": records, "applied": applied, "invalid": invalid,
                                "end_offset": end, "seconds": round(out.seconds, 3), "superseded": out.superseded})
                return out
            log.warning("Redis was emptied during the key registry's rebuild; starting over")

    async def _read_all(self) -> tuple[int, int, int, int]:
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                    isolation_level="read_committed")
        try:
            await consumer.start()  # inside: a rebuild stopped while it connects closes it too
            if KEYS_TOPIC not in await consumer.topics():
                raise KafkaError(f"the keys topic {KEYS_TOPIC} does not exist")
            consumer.assign([TP])
            await consumer.seek_to_beginning(TP)
            end = (await consumer.end_offsets([TP]))[TP]
            records = applied = invalid = 0
            idle_since = time.monotonic()
            while await consumer.position(TP) < end:
                got = (await consumer.getmany(TP, timeout_ms=1000, max_records=5000)).get(TP, [])
                await self.redis.hset(API_KEYS_STATE, API_KEYS_BEAT_FIELD, now_ms())
                if not got and time.monotonic() - idle_since > READ_TIMEOUT_S:
                    raise KafkaError(f"could not read the keys topic up to offset {end} "
                                     f"(at {await consumer.position(TP)})")
                for rec in got:
                    idle_since = time.monotonic()
                    records += 1
                    try:
                        parsed = key_records.decode(rec.key, rec.value)
                    except key_records.InvalidRecord:
                        invalid += 1  # the agent dead-letters it when it reads it
                        continue
                    applied += await self.write(parsed) == 1
            return records, applied, invalid, end
        finally:
            await consumer.stop()

    # --- the watch ---------------------------------------------------------------------

    def rebuilding(self) -> bool:
        return self._rebuilding is not None and not self._rebuilding.done()

    async def watch(self) -> None:
        """Start a rebuild if Redis lost the registry, or the registry falls behind the
        topic and stays there, or another rebuild died. Raises RedisError, KafkaError."""
        if self.rebuilding():
            return
        status, offset, beat = await self.redis.hmget(API_KEYS_STATE, [API_KEYS_STATUS_FIELD, API_KEYS_OFFSET_FIELD,
                                                                      API_KEYS_BEAT_FIELD])
        now = time.monotonic()
        reason = None
        if status is None:
            reason = "redis_emptied"
        elif status.decode() != API_KEYS_STATUS_OK:  # another process's rebuild, or one that was killed
            if beat is None or now_ms() - int(beat) > STALE_REBUILD_S * 1000:
                reason = "stale_rebuild"
        else:
            if self._probe is None:
                self._probe = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
                await self._probe.start()
            end = (await self._probe.end_offsets([TP]))[TP]
            applied = int(offset or -1)
            if applied >= end:
                self._seen = None
            elif self._seen is None or self._seen[0] != applied:
                self._seen = (applied, now)
            elif now - self._seen[1] > STUCK_S:
                reason = "behind"
        if reason is not None:
            self._seen = None
            if reason != "redis_emptied":
                log.warning("rebuilding the key registry in Redis from the keys topic", extra={"reason": reason})
            self._rebuilding = asyncio.ensure_future(self._rebuild_in_background(reason))

    async def _rebuild_in_background(self, reason: str) -> None:
        try:
            await self.rebuild(reason)
        except (RedisError, OSError, KafkaError) as exc:  # the watch tries again
            log.warning("rebuilding the key registry failed; it will be tried again", extra={"error": str(exc)})


def wire(app: faust.App, settings: Settings) -> None:
    """The materializer's agent and watch in the processor's app."""
    topic = app.topic(KEYS_TOPIC, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
                      partitions=KEYS_PARTITIONS)
    running: dict[str, KeyMaterializer] = {}

    @app.agent(topic)
    async def materialize_keys(stream: faust.StreamT) -> None:
        redis = async_client(settings)
        materializer = running["materializer"] = KeyMaterializer(redis, settings.kafka_bootstrap)
        try:
            async for event in stream.events():
                message = event.message

                async def attempt() -> tuple[str, str]:
                    return await materializer.apply(message.key, message.value, message.offset)

                outcome, reason = await retry(attempt, "redis: apply a key record", on=(RedisError, OSError),
                                              pause=stopping.pause, logger=log)
                if reason:  # refused: to the dead letters, with why
                    await retry(lambda: materializer.dead_letter(message.key, message.value, message.offset, reason),
                                "dead-lettering a key record", on=KafkaError, pause=stopping.pause, logger=log)
                elif outcome == "applied" and message.timestamp:
                    LAG.observe(max(time.time() - message.timestamp, 0.0))
        except stopping.Stopped:
            log.info("stopping: the key record in progress is left unacknowledged, to be read again")
        finally:
            running.clear()
            await materializer.stop()
            await redis.aclose()

    @app.timer(WATCH_S)
    async def watch_keys() -> None:
        materializer = running.get("materializer")
        if materializer is None or not any(tp.topic == KEYS_TOPIC for tp in app.consumer.assignment()):
            return  # another processor of the group applies the keys topic
        try:
            await materializer.watch()
        except (RedisError, OSError, KafkaError) as exc:
            log.debug("key registry watch failed", extra={"error": str(exc)})

