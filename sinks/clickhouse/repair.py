"""Making a retried batch whole when ClickHouse dropped the retry by mistake.

A retried insert (a plan replayed after a crash, or an insert that failed and was sent
again) relies on ClickHouse dropping the blocks it already has, by the batch's token.
On a non-replicated MergeTree the engine writes a block's token to the table's
deduplication log before it publishes the block's part. A crash between the two leaves a
token without rows, and the retry is dropped from that table as a duplicate. (Seen with
the embedded engine, chDB 26.9: 2 of ~1,000 kills mid-insert landed there;
bench/crash_replay.py counts them.)
Any one of the tables may be hit: the raw table or a rollup.

So after a retried batch is stored, the sink checks what each table holds of it and
adds what is missing:

- Raw table: the batch's rows are counted by (partition, offset, event id): exact. Rows
  missing go into a staging table and are moved in by ATTACH PARTITION, which the rollup
  views do not see (they may hold those rows already).
- Each rollup, per (org, bucket) the batch touches: the rollup's requests and byte sums
  against the raw table's. A group short by exactly the batch's share (all three) lacks
  it; that share is rolled up from the batch's raw rows by the rollup's own view query
  and inserted into that rollup alone. A group off by anything else has other writers
  busy on it (several sinks on one server): read again, and if still so, reported and
  left, never guessed.

Runs in the sink's storer, one batch at a time: with one sink, nothing else writes
meanwhile. With several sinks on one server, a rebalance in the middle of a check could
make two sinks check the same batch at once: the rollup shares they add carry one token
(added once), the raw rows they attach do not (the raw check would then report them as
extra on the next retry of that batch, if any).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import Counter
from dataclasses import dataclass, field

from clickhouse_connect.driver.client import Client

from quotaflow.schemas.clickhouse.tables import ALL_ROLLUPS, RAW, REPAIR_STAGE, Table, view_of
from quotaflow.sinks.clickhouse.plans import Range
from quotaflow.sinks.clickhouse.rows import Rows
from quotaflow.sinks.clickhouse.writer import Writer

_NONE = (0, 0, 0)
_PARTITION_ID = re.compile(r"^\w+$")

# The batch's rows in the raw table: by org and time first (the table's order), then by origin.
_BATCH_FILTER = (
    "org_id IN {orgs:Array(String)} "
    "AND event_time BETWEEN fromUnixTimestamp64Milli({t0:Int64}, 'UTC') AND fromUnixTimestamp64Milli({t1:Int64}, 'UTC') "
    "AND kafka_partition = {partition:UInt32} AND kafka_offset BETWEEN {start:UInt64} AND {end:UInt64}"
)


@dataclass
class Outcome:
    raw_added: int = 0  # rows the raw table lacked, added
    raw_extra: int = 0  # rows stored more than once (the deduplication failed the other way)
    groups_added: dict[str, int] = field(default_factory=dict)  # per rollup: (org, bucket) groups added
    undecided: dict[str, int] = field(default_factory=dict)  # per rollup: groups left, other writers busy

    def findings(self) -> list[tuple[str, str]]:
        """(table, "added" | "extra" | "undecided") for each table the check found wanting."""
        out = [(RAW, "added")] if self.raw_added else []
        out += [(RAW, "extra")] if self.raw_extra else []
        out += [(table, "added") for table in self.groups_added]
        return out + [(table, "undecided") for table in self.undecided]

    def __bool__(self) -> bool:
        return bool(self.findings())


def complete(client: Client, rows: Rows, batch: Range, reads: int = 5, pause_s: float = 0.2) -> Outcome:
    """Check the stored rows of a retried batch in every table; add what is missing."""
    outcome = Outcome()
    if not rows:
        return outcome
    params = {"orgs": sorted(rows.org_ids), "t0": min(rows.column("ts_ms")), "t1": max(rows.column("ts_ms")),
              "partition": batch.partition, "start": batch.start, "end": batch.end}
    missing, outcome.raw_extra = _raw_missing(client, rows, params)
    if missing:
        _add_raw(client, rows.take(missing))
        outcome.raw_added = len(missing)
    for table in ALL_ROLLUPS:
        added, undecided = _complete_rollup(client, table, rows, params, batch, reads, pause_s)
        if added:
            outcome.groups_added[table.name] = added
        if undecided:
            outcome.undecided[table.name] = undecided
    return outcome


def _raw_missing(client: Client, rows: Rows, params: dict) -> tuple[list[int], int]:
    """(positions of the rows the raw table lacks, rows it holds more than once)."""
    stored = Counter({(offset, event_id): n for offset, event_id, n in client.query(
        f"SELECT kafka_offset, toString(event_id), count() FROM {RAW} WHERE {_BATCH_FILTER} GROUP BY 1, 2",
        parameters=params).result_rows})
    keys = [(rec.offset, event_id) for rec, event_id in zip(rows.records, rows.column("event_id"), strict=True)]
    extra = sum((stored - Counter(keys)).values())
    missing = []
    for pos, key in enumerate(keys):
        if stored[key] > 0:
            stored[key] -= 1
        else:
            missing.append(pos)
    return missing, extra


def _add_raw(client: Client, rows: Rows) -> None:
    """Into the raw table without passing through its views: staged, then attached."""
    client.command(f"DROP TABLE IF EXISTS {REPAIR_STAGE} SYNC")  # left by a crash during a repair
    client.command(f"CREATE TABLE {REPAIR_STAGE} AS {RAW}")
    try:
        # Rows the sink already stored (in parts, if it had to halve them): as many day
        # partitions as they span, which the staging insert must allow in one block.
        days = len({ts // 86_400_000 for ts in rows.column("ts_ms")})
        Writer(client, max_partitions=days).insert(rows, None, table=REPAIR_STAGE)
        for (partition_id,) in client.query(f"SELECT DISTINCT _partition_id FROM {REPAIR_STAGE}").result_rows:
            if not _PARTITION_ID.match(partition_id):
                raise ValueError(f"unexpected partition id {partition_id!r}")
            client.command(f"ALTER TABLE {RAW} ATTACH PARTITION ID '{partition_id}' FROM {REPAIR_STAGE}")
    finally:
        client.command(f"DROP TABLE IF EXISTS {REPAIR_STAGE} SYNC")


def _complete_rollup(client: Client, table: Table, rows: Rows, params: dict, batch: Range,
                     reads: int, pause_s: float) -> tuple[int, int]:
    """(groups added, groups undecided) of one rollup, for the batch's (org, bucket) groups."""
    grain = table.grain_ms
    share: dict[tuple[str, int], tuple[int, int, int]] = {}
    for org, ts, req, resp in zip(*map(rows.column, ("org_id", "ts_ms", "request_bytes", "response_bytes")),
                                  strict=True):
        n, a, b = share.get((org, ts // grain * grain), _NONE)
        share[(org, ts // grain * grain)] = (n + 1, a + req, b + resp)
    span = {"orgs": params["orgs"], "b0": min(b for _, b in share), "b1": max(b for _, b in share), "grain": grain}
    before: dict = {}
    for attempt in range(reads):
        if attempt:
            time.sleep(pause_s)
        diff = _shortfall(client, table, span, share)
        if all(d == _NONE for d in diff.values()):
            return 0, 0
        # A group is settled when two reads in a row agree that it holds the batch's share
        # or lacks exactly that: an insert by another writer, half done (raw part in,
        # rollup part not yet), changes between reads.
        settled = {g for g, d in diff.items() if d in (_NONE, share[g]) and before.get(g) == d}
        if len(settled) == len(diff):
            break
        before = diff
    missing = [g for g in settled if diff[g] != _NONE]
    if missing:
        _add_rollup(client, table, params, missing, batch)
    return len(missing), sum(1 for g, d in diff.items() if d != _NONE and g not in settled)


def _shortfall(client: Client, table: Table, span: dict, share: dict) -> dict[tuple[str, int], tuple[int, int, int]]:
    """Per (org, bucket) of the batch: the raw table's (rows, request bytes, response bytes)
    minus the rollup's."""
    raw = {(org, b): tuple(v) for org, b, *v in client.query(
        f"SELECT org_id, intDiv(toUnixTimestamp64Milli(event_time), {{grain:Int64}}) * {{grain:Int64}}, count(), "
        f"sum(request_bytes), sum(response_bytes) FROM {RAW} WHERE org_id IN {{orgs:Array(String)}} "
        f"AND event_time >= fromUnixTimestamp64Milli({{b0:Int64}}, 'UTC') "
        f"AND event_time < fromUnixTimestamp64Milli({{b1:Int64}} + {{grain:Int64}}, 'UTC') GROUP BY 1, 2",
        parameters=span).result_rows}
    col = table.time_column
    rolled = {(org, b): tuple(v) for org, b, *v in client.query(
        f"SELECT org_id, toInt64(toUnixTimestamp({col})) * 1000, sum(requests), sum(request_bytes), "
        f"sum(response_bytes) FROM {table.name} WHERE org_id IN {{orgs:Array(String)}} AND {col} BETWEEN "
        f"toDateTime(intDiv({{b0:Int64}}, 1000), 'UTC') AND toDateTime(intDiv({{b1:Int64}}, 1000), 'UTC') "
        f"GROUP BY 1, 2", parameters=span).result_rows}
    return {g: tuple(x - y for x, y in zip(raw.get(g, _NONE), rolled.get(g, _NONE), strict=True)) for g in share}


def _add_rollup(client: Client, table: Table, params: dict, groups: list[tuple[str, int]], batch: Range) -> None:
    """The batch's share of these groups, rolled up by the table's own view query from the
    batch's raw rows, into this table alone."""
    (db, select), = client.query("SELECT database, as_select FROM system.tables WHERE database = currentDatabase() "
                                 "AND name = {view:String}", parameters={"view": view_of(table)}).result_rows
    source = f"FROM {db}.{RAW}"
    if select.count(source) != 1:
        raise RuntimeError(f"cannot read the source of view {view_of(table)!r}: {select!r}")
    select = select.replace(source, f"FROM (SELECT * FROM {db}.{RAW} WHERE {_BATCH_FILTER}) AS {RAW}")
    columns = ", ".join(name for (name,) in client.query(
        "SELECT name FROM system.columns WHERE database = currentDatabase() AND table = {t:String} ORDER BY position",
        parameters={"t": table.name}).result_rows)
    client.command(
        f"INSERT INTO {table.name} ({columns}) SELECT {columns} FROM ({select}) "
        f"WHERE has({{groups:Array(Tuple(String, Int64))}}, (org_id, toInt64(toUnixTimestamp({table.time_column})) * 1000))",
        parameters={**params, "groups": groups},
        # A token naming the batch and the groups: two sinks completing the same batch at
        # once (a rebalance mid-check) add its share once.
        settings={"insert_deduplication_token": f"{batch.token()}/complete/{_digest(groups)}"})


def _digest(groups: list[tuple[str, int]]) -> str:
    return hashlib.sha256(repr(sorted(groups)).encode()).hexdigest()[:16]
