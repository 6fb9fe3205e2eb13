"""A fuzz run against the live processor and sink: 100,000 generated records, valid,
malformed and hostile, and every one accounted for.

Each record is built by a seeded generator that knows what it built: valid events
(alone, in batches, repeated, refused by a limiter, old, on the wrong partition) must
be counted and stored; everything else must be dead-lettered with a reason naming it,
by the processor, at its source (partition, offset, index). Neither stage may restart,
and the tenants that only sent valid traffic must read exactly what they sent.

QUOTAFLOW_FUZZ_RECORDS and QUOTAFLOW_FUZZ_SEED change the run.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from quotaflow.schemas import deadletter
from quotaflow.schemas.events import FIELD_NAMES, TS_MIN_MS, partition_of
from quotaflow.schemas.topics import DEAD_LETTER_TOPIC, EVENTS_TOPIC
from tests.pipeline import counted, read_all, unique, wait_for

pytestmark = pytest.mark.stack

RECORDS = int(os.environ.get("QUOTAFLOW_FUZZ_RECORDS", "100000"))
SEED = int(os.environ.get("QUOTAFLOW_FUZZ_SEED", "11"))
DAY_MS = 86_400_000


@dataclass
class Plan:
    """What the generator built, and so what the pipeline must do with it."""

    records: list[tuple[bytes | None, bytes | None, int | None]] = field(default_factory=list)  # key, value, partition
    counted: Counter = field(default_factory=Counter)  # (org, key) -> events counted in today's window
    stored: Counter = field(default_factory=Counter)  # org -> rows stored
    dead: list[tuple[int, int | None, str]] = field(default_factory=list)  # (record number, index, why), per dead letter
    kinds: Counter = field(default_factory=Counter)  # records by kind


class Generator:
    def __init__(self, seed: int, partitions: int, now_ms: int):
        self.rnd = random.Random(seed)
        self.partitions = partitions
        self.now = now_ms
        # Today's events only, and not before the last 20 minutes: all in one day bucket.
        self.earliest = max(now_ms - now_ms % DAY_MS, now_ms - 20 * 60_000)
        run = unique("fz")
        self.orgs = [f"{run}-o{i}" for i in range(40)]
        self.keys = {org: [f"k{j}" for j in range(3)] for org in self.orgs}
        self.control = set(self.orgs[:5])  # valid traffic only
        self.sent: list[dict] = []  # valid events published, to repeat some
        self.plan = Plan()

    def event(self, org: str, **over) -> dict:
        r = self.rnd
        doc = {"schema_version": 1, "event_id": str(uuid.UUID(int=r.getrandbits(128), version=4)),
               "ts_ms": r.randint(self.earliest, self.now), "org_id": org, "api_key_id": r.choice(self.keys[org]),
               "service": "fuzz", "endpoint": r.choice(["/v1/items/{id}", "/v1/search", "/"]),
               "method": r.choice(["GET", "POST", "DELETE"]), "status": r.choice([200, 201, 404, 500]),
               "latency_ms": round(r.uniform(0, 5000), 3), "request_bytes": r.randint(0, 10**6),
               "response_bytes": r.randint(0, 10**7), "client_ip": r.choice(["203.0.113.7", "2001:db8::5"]),
               "user_agent": "fuzz/" + str(r.randint(0, 50))}
        doc.update(over)
        return doc

    def valid(self, n: int, doc: dict, how: str = "counted") -> None:
        """Account a valid event: counted in today's window, stored; or only stored."""
        org = doc["org_id"]
        self.plan.stored[org] += 1
        if how == "counted":
            self.plan.counted[(org, doc["api_key_id"])] += 1
        self.sent.append(doc)

    def add(self, kind: str, key: bytes | None, value: bytes | None, partition: int | None = None) -> int:
        self.plan.records.append((key, value, partition))
        self.plan.kinds[kind] += 1
        return len(self.plan.records) - 1

    def dead(self, n: int, index: int | None, why: str) -> None:
        self.plan.dead.append((n, index, why))

    def build(self, total: int) -> Plan:
        r = self.rnd
        kinds = [("single", 30), ("batch", 12), ("mixed_batch", 6), ("repeat", 5), ("rejected", 4), ("old", 3),
                 ("wrong_partition", 5), ("not_json", 4), ("bad_utf8", 2), ("tombstone", 1), ("wrong_type", 6),
                 ("missing", 4), ("extra", 3), ("deep", 2), ("huge", 2), ("bad_id", 4), ("ahead", 3),
                 ("expired", 2), ("prehistoric", 1), ("empty_batch", 1), ("two_orgs", 2), ("scalar", 1),
                 ("bad_endpoint", 2)]
        names, weights = zip(*kinds)
        for _ in range(total):
            kind = r.choices(names, weights)[0]
            org = r.choice(self.orgs if kind in ("single", "batch", "repeat", "rejected", "old")
                           else self.orgs[5:])
            getattr(self, "_" + kind)(kind, org)
        return self.plan

    # --- valid ----------------------------------------------------------------------

    def _single(self, kind: str, org: str) -> None:
        doc = self.event(org)
        n = self.add(kind, org.encode(), orjson.dumps(doc))
        self.valid(n, doc)

    def _batch(self, kind: str, org: str) -> None:
        docs = [self.event(org) for _ in range(self.rnd.randint(2, 40))]
        n = self.add(kind, org.encode(), orjson.dumps(docs))
        for doc in docs:
            self.valid(n, doc)

    def _repeat(self, kind: str, org: str) -> None:
        """A publisher retrying: an event already sent, in a record of its own. Counted
        once and stored once (if the original was counted; a 429 repeated stays uncounted)."""
        if not self.sent:
            return self._single("single", org)
        doc = self.rnd.choice(self.sent)
        self.add(kind, doc["org_id"].encode(), orjson.dumps(doc))

    def _rejected(self, kind: str, org: str) -> None:
        doc = self.event(org, status=429)
        n = self.add(kind, org.encode(), orjson.dumps(doc))
        self.valid(n, doc, how="stored")

    def _old(self, kind: str, org: str) -> None:
        """Two days old: within the raw retention, so stored; late for every window."""
        doc = self.event(org, ts_ms=self.now - 2 * DAY_MS - self.rnd.randint(0, 3_600_000))
        n = self.add(kind, org.encode(), orjson.dumps(doc))
        self.valid(n, doc, how="stored")

    def _wrong_partition(self, kind: str, org: str) -> None:
        """Valid, published on another partition than its org's (another partitioner)."""
        docs = [self.event(org) for _ in range(self.rnd.randint(1, 5))]
        home = partition_of(org, self.partitions)
        n = self.add(kind, self.rnd.choice([org.encode(), b"x", None]),
                     orjson.dumps(docs if len(docs) > 1 else docs[0]), (home + 1) % self.partitions)
        for doc in docs:
            self.valid(n, doc)

    def _mixed_batch(self, kind: str, org: str) -> None:
        """A batch with some items refused: those alone are dead-lettered."""
        items = []
        n = len(self.plan.records)
        for i in range(self.rnd.randint(2, 12)):
            if self.rnd.random() < 0.3:
                bad = self.event(org, status=self.rnd.choice([99, 600, "200", None, 1.5]))
                items.append(bad)
                self.dead(n, i, "status")
            else:
                doc = self.event(org)
                items.append(doc)
                self.valid(n, doc)
        self.add(kind, org.encode(), orjson.dumps(items))

    # --- refused, the record as a whole ----------------------------------------------

    def _whole(self, kind: str, org: str, value: bytes | None, why: str) -> None:
        n = self.add(kind, org.encode(), value)
        self.dead(n, None, why)

    def _not_json(self, kind: str, org: str) -> None:
        value = self.rnd.choice([b"GET /v1/items 200", b'{"org_id": "' + org.encode(), b"", b"[1,", b"nul"])
        self._whole(kind, org, value, "not valid UTF-8 JSON")

    def _bad_utf8(self, kind: str, org: str) -> None:
        doc = orjson.dumps(self.event(org, user_agent="UA"))
        self._whole(kind, org, doc.replace(b'"UA"', b'"\xff\xfe"'), "not valid UTF-8 JSON")

    def _tombstone(self, kind: str, org: str) -> None:
        self._whole(kind, org, None, "tombstone")

    def _wrong_type(self, kind: str, org: str) -> None:
        name = self.rnd.choice([f for f in FIELD_NAMES if f != "schema_version"])
        value = self.rnd.choice([None, True, [], {}, -1.5])  # wrong for every field
        self._whole(kind, org, orjson.dumps(self.event(org, **{name: value})), name)

    def _missing(self, kind: str, org: str) -> None:
        doc = self.event(org)
        name = self.rnd.choice(FIELD_NAMES)
        del doc[name]
        self._whole(kind, org, orjson.dumps(doc), f"{name}: required field is missing")

    def _extra(self, kind: str, org: str) -> None:
        self._whole(kind, org, orjson.dumps(self.event(org, secret_token="s3cr3t")), "unknown field")

    def _deep(self, kind: str, org: str) -> None:
        depth = self.rnd.randint(9, 900)
        inner = "[" * depth + "]" * depth
        shape = self.rnd.choice(["batch", "object", "lists"])
        if shape == "object":  # one event whose field nests
            return self._whole(kind, org, f'{{"org_id":{inner}}}'.encode(), "org_id")
        value = f'[{{"x":{inner}}}]' if shape == "batch" else inner  # a batch of one refused item
        n = self.add(kind, org.encode(), value.encode())
        self.dead(n, 0, "required field is missing" if shape == "batch" else "must be a JSON object")

    def _huge(self, kind: str, org: str) -> None:
        name = self.rnd.choice(["user_agent", "client_ip", "endpoint", "api_key_id"])
        big = "z" * self.rnd.randint(600, 200_000)
        self._whole(kind, org, orjson.dumps(self.event(org, **{name: ("/" + big) if name == "endpoint" else big})),
                    name)

    def _bad_id(self, kind: str, org: str) -> None:
        name = self.rnd.choice(["org_id", "api_key_id", "service"])
        bad = self.rnd.choice(["}:" + org, org + "}", "{" + org + "}", "a b", "", "k/../x", "é", "a\n"])
        self._whole(kind, org, orjson.dumps(self.event(org, **{name: bad})), name)

    def _bad_endpoint(self, kind: str, org: str) -> None:
        ep = self.rnd.choice(["/v1/users/42", "v1/x", "/x?y=1", "/a b", "/" + "0" * 20])
        self._whole(kind, org, orjson.dumps(self.event(org, endpoint=ep)), "endpoint")

    def _ahead(self, kind: str, org: str) -> None:
        ahead = self.rnd.choice([600_000, DAY_MS, 3650 * DAY_MS])
        self._whole(kind, org, orjson.dumps(self.event(org, ts_ms=self.now + ahead)), "after the broker received")

    def _expired(self, kind: str, org: str) -> None:
        self._whole(kind, org, orjson.dumps(self.event(org, ts_ms=self.now - 40 * DAY_MS)), "older than the raw retention")

    def _prehistoric(self, kind: str, org: str) -> None:
        self._whole(kind, org, orjson.dumps(self.event(org, ts_ms=TS_MIN_MS - 1)), "ts_ms: must be between")

    def _empty_batch(self, kind: str, org: str) -> None:
        self._whole(kind, org, b"[]", "a batch holds 1 to")

    def _two_orgs(self, kind: str, org: str) -> None:
        other = self.rnd.choice(self.orgs[5:])
        while other == org:
            other = self.rnd.choice(self.orgs[5:])
        first = self.event(org)
        n = self.add(kind, org.encode(), orjson.dumps([first, self.event(other)]))
        self.valid(n, first)
        self.dead(n, 1, "a batch carries one org's events")

    def _scalar(self, kind: str, org: str) -> None:
        self._whole(kind, org, self.rnd.choice([b"42", b'"event"', b"null", b"true"]), "must be a JSON object")


async def publish_plan(settings, plan: Plan) -> list[tuple[int, int]]:
    """Publish every record; their (partition, offset), in order."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, enable_idempotence=True,
                                linger_ms=20, max_batch_size=1 << 20, compression_type="zstd",
                                max_request_size=4 << 20)
    await producer.start()
    try:
        futures = [await producer.send(EVENTS_TOPIC, value, key=key, partition=partition)
                   for key, value, partition in plan.records]
        return [(m.partition, m.offset) for m in await asyncio.gather(*futures)]
    finally:
        await producer.stop()


def test_every_one_of_100000_generated_records_is_counted_and_stored_or_dead_lettered(live_stack, redis_client,
                                                                                      pipeline):
    now = int(time.time() * 1000)
    gen = Generator(SEED, live_stack.events_partitions, now)
    plan = gen.build(RECORDS)
    pipeline.start("processor")
    pipeline.start("sink")
    started = {name: pipeline.state(name).pid for name in ("processor", "sink")}

    places = asyncio.run(publish_plan(live_stack, plan))
    pipeline.wait_caught_up(600)
    wait_for(lambda: pipeline.metric("processor", "quotaflow_processor_backlog_records") == 0, 120,
             "the processor's backlog to read 0", pipeline.logs)

    # Dead letters: exactly the refused items, each once, at its source, with a reason naming it.
    source = {place: n for n, place in enumerate(places)}
    mine = {org.encode() for org in gen.orgs}
    letters = [r for r in asyncio.run(read_all(live_stack, DEAD_LETTER_TOPIC)) if r.key in mine]
    got: dict[tuple[int, int | None], str] = {}
    for rec in letters:
        h = deadletter.read_headers(rec.headers)
        assert h[deadletter.HEADER_STAGE] == "processor" and h[deadletter.HEADER_SOURCE_TOPIC] == EVENTS_TOPIC
        n = source[(int(h[deadletter.HEADER_SOURCE_PARTITION]), int(h[deadletter.HEADER_SOURCE_OFFSET]))]
        index = int(h[deadletter.HEADER_SOURCE_INDEX]) if deadletter.HEADER_SOURCE_INDEX in h else None
        assert (n, index) not in got, f"record {n} item {index} dead-lettered twice"
        got[(n, index)] = h[deadletter.HEADER_REASON]
    want = {(n, index): why for n, index, why in plan.dead}
    assert set(got) == set(want), (f"missing: {sorted(set(want) - set(got))[:10]} "
                                   f"unexpected: {sorted(set(got) - set(want))[:10]}")
    unnamed = {k: (got[k], why) for k, why in want.items() if why not in got[k]}
    assert not unnamed, list(unnamed.items())[:5]

    # Counts: every (org, key) exactly what it was sent, in today's window.
    keys = {(org, key) for org in gen.orgs for key in gen.keys[org]}
    counts = {k: counted(redis_client, *k, now, "86400s") or 0 for k in keys}
    off = {k: (counts[k], plan.counted[k]) for k in keys if counts[k] != plan.counted[k]}
    assert not off, f"counts differ (counted, sent) for {len(off)} keys: {list(off.items())[:5]}"

    # Neither stage restarted; then the rows, every org exactly what it was sent.
    assert {name: (pipeline.state(name).pid, pipeline.state(name).restarts) for name in started} == \
        {name: (pid, 0) for name, pid in started.items()}
    pipeline.stop("sink")
    rows = dict(((org, (n, ids)) for org, n, ids in pipeline.query_clickhouse(
        "SELECT org_id, count(), uniqExact(event_id) FROM requests WHERE org_id IN {orgs:Array(String)} "
        "GROUP BY org_id", {"orgs": gen.orgs})))
    off = {org: (rows.get(org), n) for org, n in plan.stored.items() if rows.get(org) != (n, n)}
    assert not off, f"stored differs ((rows, ids), sent) for {len(off)} orgs: {list(off.items())[:5]}"
    assert set(rows) <= set(plan.stored)

    # No tenant's input touched another's keys: every Redis key of the run names a known org.
    run_prefix = gen.orgs[0].rsplit("-", 1)[0]
    stray = [k for k in redis_client.scan_iter(match=f"qf:v1:{{{run_prefix}*", count=1000)
             if k.decode().split("{", 1)[1].split("}", 1)[0] not in set(gen.orgs)]
    assert not stray, stray[:5]

    by_reason = Counter(why.split(":")[0] if ":" in why else why for why in got.values())
    print(f"\nfuzz: records={len(plan.records)} kinds={dict(plan.kinds)} events_counted={sum(plan.counted.values())} "
          f"rows_stored={sum(plan.stored.values())} dead_letters={len(got)} by_reason={dict(by_reason.most_common())} "
          f"restarts=0 cross_tenant=0")
