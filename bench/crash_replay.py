"""Crash soak of the embedded engine: is a batch retried after a SIGKILL mid-insert stored
exactly once in every table?

A child process inserts batches of BENCH_CRASH_BATCH events (default 10: more inserts a
second, so more kills land inside one) through the sink's writer (ingest table, views,
rollups), each with its token, and is killed with SIGKILL at a random moment after its
first insert started, BENCH_CRASH_KILLS times (default 400). After each kill a new process
does what the restarted sink does with the batch that was being inserted: inserts it
again with the same token, then checks every table (sinks/clickhouse/repair.py) and adds
what is missing. Every table must then hold each batch started so far once.

Prints ``kills``; ``replays_dropped_by_mistake``: kills after which some table had
dropped the replay although it lacked the batch, i.e. what would have been lost without
the check (the baseline of this run); ``tables_completed``; and
``batches_wrong_after_check``, which must be 0 (the soak stops at the first, its data kept
in .quotaflow-bench-BASE/crash-replay). Progress and each table completed go to stderr.

Run: .venv/bin/python bench/crash_replay.py   (about 3 s a kill)
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from types import SimpleNamespace

import harness

from quotaflow.schemas.clickhouse.client import connect
from quotaflow.schemas.clickhouse.migrate import migrate
from quotaflow.schemas.clickhouse.tables import ALL_ROLLUPS, RAW
from quotaflow.schemas.events import FIELD_NAMES
from quotaflow.sinks.clickhouse import repair
from quotaflow.sinks.clickhouse.plans import Range
from quotaflow.sinks.clickhouse.rows import Rows
from quotaflow.sinks.clickhouse.writer import Writer

KILLS = int(os.environ.get("BENCH_CRASH_KILLS", 400))
BATCH = int(os.environ.get("BENCH_CRASH_BATCH", 10))
TOPIC = "quotaflow.requests.v1"


def batch_rows(b: int, t0_ms: int):
    """Batch b, the same in every process: (rows, range). Offsets b*BATCH.. of partition 0,
    one event a millisecond from t0_ms on, as a stream in time order fills a batch. Built
    as columns directly: the child should spend its time inserting, where a kill matters."""
    rnd = random.Random(b)
    org = f"org{b % 3}"
    values = {
        "schema_version": [1] * BATCH,
        "event_id": [str(uuid.UUID(int=rnd.getrandbits(128), version=4)) for _ in range(BATCH)],
        "ts_ms": [t0_ms + b * BATCH + i for i in range(BATCH)],
        "org_id": [org] * BATCH,
        "api_key_id": [f"{org}-k{i % 3}" for i in range(BATCH)],
        "service": ["shop"] * BATCH,
        "endpoint": [("/a", "/b/{id}")[i % 2] for i in range(BATCH)],
        "method": ["GET"] * BATCH,
        "status": [(200, 404, 500)[i % 3] for i in range(BATCH)],
        "latency_ms": [rnd.uniform(1, 500) for _ in range(BATCH)],
        "request_bytes": [rnd.randrange(5000) for _ in range(BATCH)],
        "response_bytes": [rnd.randrange(50_000) for _ in range(BATCH)],
        "client_ip": ["203.0.113.7"] * BATCH,
        "user_agent": ["soak"] * BATCH,
    }
    records = [SimpleNamespace(topic=TOPIC, partition=0, offset=b * BATCH + i) for i in range(BATCH)]
    rows = Rows([values[name] for name in FIELD_NAMES], records, [0] * BATCH, ["FREE"] * BATCH)
    return rows, Range(TOPIC, 0, b * BATCH, (b + 1) * BATCH - 1)


def insert_forever(path: str, t0_ms: int, first: int) -> None:
    client = connect(f"chdb://{path}")
    writer = Writer(client)
    b = first
    while True:
        rows, batch = batch_rows(b, t0_ms)
        print(f"start {b}", flush=True)
        writer.insert(rows, batch.token())
        b += 1


def replay(path: str, t0_ms: int, b: int) -> None:
    """As the restarted sink: the planned batch again, then the check. Prints what it found
    and whether every table holds batches 0..b once each."""
    client = connect(f"chdb://{path}")
    rows, batch = batch_rows(b, t0_ms)
    Writer(client).insert(rows, batch.token())
    outcome = repair.complete(client, rows, batch)
    expected = (b + 1) * BATCH
    raw, ids, offsets = client.query(f"SELECT count(), uniqExact(event_id), uniqExact(kafka_offset) FROM {RAW}").result_rows[0]
    whole = raw == ids == offsets == expected  # offsets are 0..expected-1: each once
    for table in ALL_ROLLUPS:
        whole &= client.query(f"SELECT sum(requests) FROM {table.name}").result_rows[0][0] == expected
    completed = [table for table, found in outcome.findings() if found == "added"]
    print(f"result {int(bool(outcome))} {int(whole)} {','.join(completed)}", flush=True)


def soak() -> None:
    path = str(harness.ROOT / f".quotaflow-bench-{harness.BASE}" / "crash-replay")
    shutil.rmtree(path, ignore_errors=True)
    client = connect(f"chdb://{path}")
    migrate(client)
    client.close()
    del client
    me = [sys.executable, __file__]
    t0_ms = str(int(time.time() * 1000) - 3_600_000)
    nxt, kills, mistaken, completed, wrong = 0, 0, 0, 0, 0
    while kills < KILLS and not wrong:  # a table left wrong stays so: stop there, its data kept
        kills += 1
        child = subprocess.Popen([*me, "insert", path, t0_ms, str(nxt)], stdout=subprocess.PIPE)
        first = child.stdout.readline()  # its first insert starts: the kill is aimed at inserting
        time.sleep(random.uniform(0.05, 1.0))
        child.send_signal(signal.SIGKILL)
        child.wait()
        started = [int(line.split()[1]) for line in (first + child.stdout.read()).decode().splitlines()
                   if line.startswith("start ")]
        if not started:  # it died before inserting anything
            continue
        last = started[-1]
        out = subprocess.run([*me, "replay", path, t0_ms, str(last)], capture_output=True, text=True,
                             check=True).stdout
        found, whole, *tables = out.split("result ")[1].split()
        mistaken += int(found)
        completed += len(tables[0].split(",")) if tables else 0
        whole = int(whole)
        wrong += 1 - whole
        if kills % 20 == 0 or tables:
            print(f"# {kills}/{KILLS} kills, {mistaken} replays dropped by mistake, {wrong} wrong"
                  + (f"; completed now: {tables[0]}" if tables else ""), file=sys.stderr, flush=True)
        nxt = last + 1
    harness.report("kills", kills, "count")
    harness.report("replays_dropped_by_mistake", mistaken, "count")
    harness.report("tables_completed", completed, "count")
    harness.report("batches_wrong_after_check", wrong, "count")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "insert":
        insert_forever(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif len(sys.argv) == 5 and sys.argv[1] == "replay":
        replay(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        soak()
