"""Completing a retried batch that ClickHouse dropped by mistake (sinks/clickhouse/repair.py),
on the real embedded engine.

The state a crash leaves (a table's deduplication log holds the batch's token, the table
lacks the rows) is set up exactly: the batch is stored, its rows are deleted from one
table (a lightweight DELETE leaves the deduplication log as it is), and the retry with
the same token is then dropped by that table, as after the crash."""

from __future__ import annotations

import pytest

from quotaflow.schemas.clickhouse.migrate import migrate
from quotaflow.schemas.clickhouse.tables import ALL_ROLLUPS, ENDPOINT_ROLLUPS, ORG_ROLLUPS, RAW, ROLLUPS
from quotaflow.sinks.clickhouse import repair
from quotaflow.sinks.clickhouse.plans import Range
from quotaflow.sinks.clickhouse.rows import Rows, to_rows
from quotaflow.sinks.clickhouse.writer import Writer
from tests.storage import (
    DAY_S,
    assert_status_and_key_rollups,
    events,
    expected_endpoint_groups,
    expected_groups,
    expected_org_groups,
    records,
    stored_endpoint_groups,
    stored_groups,
    stored_org_groups,
)

TIERS = {"acme": "FREE"}


def stored_batch(client, evs, first_offset: int = 0):
    """(rows, range) of a batch inserted as the sink does, tiers set."""
    recs = records(evs, first_offset=first_offset)
    rows = to_rows(recs)
    rows.set_tiers(TIERS)
    batch = Range(recs[0].topic, 0, recs[0].offset, recs[-1].offset)
    Writer(client).insert(rows, batch.token())
    return rows, batch


def assert_whole(client, evs) -> None:
    """Every table holds each event once: raw ids, and each rollup group by group."""
    ids = [r[0] for r in client.query("SELECT toString(event_id) FROM requests").result_rows]
    assert sorted(ids) == sorted(e.event_id for e in evs)
    for table in ROLLUPS:
        assert stored_groups(client, table.name) == expected_groups(evs, table.grain_ms // 1000), table.name
    for table in ORG_ROLLUPS:
        assert stored_org_groups(client, table.name) == expected_org_groups(evs, table.grain_ms // 1000, TIERS), \
            table.name
    for table in ENDPOINT_ROLLUPS:
        assert stored_endpoint_groups(client, table.name) == expected_endpoint_groups(evs, table.grain_ms // 1000), \
            table.name
    assert_status_and_key_rollups(client, evs)


def test_a_retry_that_landed_everywhere_is_left_as_it_is(engine):
    migrate(engine)
    evs = events(2000, seed=11)
    rows, batch = stored_batch(engine, evs)
    stored_batch(engine, evs)  # the retry: dropped by every table, rightly
    assert not repair.complete(engine, rows, batch)
    assert_whole(engine, evs)


def test_rows_the_raw_table_lost_are_added_to_it_alone(engine):
    migrate(engine)
    evs = events(2000, seed=12)  # over three days: several partitions of the raw table
    stored_batch(engine, evs)
    engine.command(f"DELETE FROM {RAW} WHERE org_id = 'acme'")
    rows, batch = stored_batch(engine, evs)  # the retry: dropped, the token is in the log
    assert engine.query(f"SELECT count() FROM {RAW}").result_rows[0][0] == 0

    outcome = repair.complete(engine, rows, batch)
    assert (outcome.raw_added, outcome.raw_extra, outcome.groups_added, outcome.undecided) == (len(evs), 0, {}, {})
    assert_whole(engine, evs)  # the rollups, which had the batch, did not get it twice
    assert not repair.complete(engine, rows, batch)  # checked again: nothing left to do


@pytest.mark.parametrize("table", [t.name for t in ALL_ROLLUPS])
def test_groups_a_rollup_lost_are_added_to_it_alone(engine, table):
    migrate(engine)
    evs = events(2000, seed=13)
    stored_batch(engine, evs)
    # One day of the batch lost: the batch spans several partitions, each its own part.
    first_day = min(e.ts_ms for e in evs) // 1000 // DAY_S * DAY_S
    engine.command(f"DELETE FROM {table} WHERE org_id = 'acme' AND toUnixTimestamp(toStartOfDay(bucket)) = {first_day}")
    grain = _grain(table)
    lost = len({e.ts_ms // grain * grain for e in evs if e.ts_ms // 1000 // DAY_S * DAY_S == first_day})
    rows, batch = stored_batch(engine, evs)

    outcome = repair.complete(engine, rows, batch, pause_s=0.01)
    assert (outcome.raw_added, outcome.groups_added, outcome.undecided) == (0, {table: lost}, {})
    assert_whole(engine, evs)


def test_groups_off_by_anything_but_the_batch_are_reported_not_guessed(engine):
    """Another writer half way through an insert (its raw rows in, its rollup rows not
    yet) makes a group differ by its share, not the batch's: left as it is."""
    migrate(engine)
    evs = events(500, seed=14)
    rows, batch = stored_batch(engine, evs)
    others = events(300, seed=15)
    repair._add_raw(engine, _tiered(others))  # rows into the raw table, not through its views
    before = {t.name: engine.query(f"SELECT sum(requests) FROM {t.name}").result_rows[0][0] for t in ROLLUPS}

    outcome = repair.complete(engine, rows, batch, reads=2, pause_s=0.01)
    assert outcome.raw_added == outcome.raw_extra == 0 and not outcome.groups_added
    assert set(outcome.undecided) == {t.name for t in ALL_ROLLUPS}
    assert before == {t.name: engine.query(f"SELECT sum(requests) FROM {t.name}").result_rows[0][0] for t in ROLLUPS}


def _grain(table: str) -> int:
    return next(t.grain_ms for t in ALL_ROLLUPS if t.name == table)


def _tiered(evs):
    rows = to_rows(records(evs, first_offset=10_000))
    rows.set_tiers(TIERS)
    return rows


def test_parts_stored_apart_are_checked_as_one_batch():
    """What the sink hands the check after halving around refused rows: the parts stored."""
    rows = _tiered(events(10, seed=16))
    joined = Rows.join([rows.slice(0, 3), rows.slice(5, 9)])
    assert joined.columns == rows.take([0, 1, 2, 5, 6, 7, 8]).columns
    assert [r.offset for r in joined.records] == [10_000 + i for i in (0, 1, 2, 5, 6, 7, 8)]
