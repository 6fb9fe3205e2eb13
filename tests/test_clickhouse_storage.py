"""The ClickHouse schema on the real embedded engine (chDB), in a directory of its own:
migrations (also on a database that predates the rollups), rollups equal to the raw
totals, TTLs from the retention settings, and deduplication of a retried batch.

These open the engine in the test process, on a path of their own, and close it
before returning (one engine path per process at a time: the `engine` fixture,
tests/conftest.py)."""

from __future__ import annotations

import math
import random
import time
import uuid

import orjson
import pytest

from quotaflow.core.settings import Settings
from quotaflow.schemas.clickhouse import latency, retention
from quotaflow.schemas.clickhouse.client import connect
from quotaflow.schemas.clickhouse.migrate import available, migrate, statements
from quotaflow.schemas.clickhouse.tables import (
    ALL_ROLLUPS,
    DENIALS_ROLLUPS,
    ENDPOINT_ROLLUPS,
    INGEST,
    LATENCY_ROLLUPS,
    ORG_ROLLUPS,
    RAW,
    RAW_COLUMNS,
    ROLLUPS,
    TABLES,
)
from quotaflow.schemas.events import RequestEvent
from quotaflow.sinks.clickhouse.rows import to_rows
from quotaflow.sinks.clickhouse.writer import Writer
from tests.pipeline import event
from tests.storage import (
    DAY_S,
    assert_status_and_key_rollups,
    check_latencies,
    events,
    expected_endpoint_groups,
    expected_groups,
    expected_org_groups,
    float32,
    insert_bulk,
    insert_latencies,
    latency_answers,
    latency_bounds,
    records,
    store,
    stored_endpoint_groups,
    stored_groups,
    stored_org_groups,
)


def test_migrations_apply_once_and_upgrade_a_database_that_predates_rollups(engine):
    # A database as the first release left it: only 0001, with rows in it.
    version, name, sql = available()[0]
    assert (version, name) == (1, "requests")
    engine.command("CREATE TABLE schema_migrations (version UInt32, name String, applied_at DateTime DEFAULT now()) "
                   "ENGINE = MergeTree ORDER BY version")
    for stmt in statements(sql):
        engine.command(stmt)
    engine.insert("schema_migrations", [[1, "requests"]], column_names=["version", "name"])
    old = events(300, seed=1, org="old-org")
    old_rows = to_rows(records(old))
    engine.raw_insert(RAW, list(RAW_COLUMNS[:-1]), orjson.dumps(old_rows.columns[:-1]), fmt=Writer.FORMAT)

    assert migrate(engine) == [v for v, _, _ in available() if v > 1]
    assert migrate(engine) == []  # recorded: a second run applies nothing

    # The rows already there were rolled up once, with an unknown tier.
    for table in ROLLUPS:
        assert stored_groups(engine, table.name) == expected_groups(old, table.grain_ms // 1000), table.name
    for table in ORG_ROLLUPS:
        assert stored_org_groups(engine, table.name) == expected_org_groups(old, table.grain_ms // 1000,
                                                                            {"old-org": ""}), table.name
    for table in ENDPOINT_ROLLUPS:  # rolled up from the API-key-level rollups by 0009
        assert stored_endpoint_groups(engine, table.name) == expected_endpoint_groups(old, table.grain_ms // 1000)
    assert_status_and_key_rollups(engine, old)  # rolled up from the API-key-level rollups by 0011
    assert engine.query("SELECT groupUniqArray(tier) FROM requests").result_rows[0][0] == [""]

    # New rows go through the views into every rollup, with their tier.
    new = events(2000, seed=2, org="new-org")
    store(Writer(engine), new, {"new-org": "SCALE"}, first_offset=1000)
    both = old + new
    assert stored_groups(engine, RAW) == expected_groups(both, 60)
    for table in ROLLUPS:
        assert stored_groups(engine, table.name) == expected_groups(both, table.grain_ms // 1000), table.name
    for table in ORG_ROLLUPS:
        assert stored_org_groups(engine, table.name) == expected_org_groups(
            both, table.grain_ms // 1000, {"old-org": "", "new-org": "SCALE"}), table.name
    for table in ENDPOINT_ROLLUPS:
        assert stored_endpoint_groups(engine, table.name) == expected_endpoint_groups(both, table.grain_ms // 1000)
    assert_status_and_key_rollups(engine, both)


def test_rollups_hold_the_same_totals_as_the_raw_table(engine):
    migrate(engine)
    evs = events(3000, seed=3) + events(1000, seed=4, org="globex")
    writer = Writer(engine)
    store(writer, evs[:2500], {"acme": "FREE", "globex": "ENTERPRISE"})
    store(writer, evs[2500:], {"acme": "FREE", "globex": "ENTERPRISE"}, first_offset=2500)
    raw = engine.query("SELECT count(), countIf(status >= 500), sum(request_bytes), sum(response_bytes) "
                       "FROM requests").result_rows[0]
    assert raw == (len(evs), sum(e.status >= 500 for e in evs), sum(e.request_bytes for e in evs),
                   sum(e.response_bytes for e in evs))
    denials = sum(e.status == 429 for e in evs)
    for table in ALL_ROLLUPS:
        rolled = engine.query(f"SELECT sum(requests), sum(errors), sum(request_bytes), sum(response_bytes) "
                              f"FROM {table.name}").result_rows[0]
        assert rolled == raw, table.name
        if table not in ENDPOINT_ROLLUPS:  # no status there
            denied = "sum(denials)" if table in DENIALS_ROLLUPS else "sumIf(requests, status = 429)"
            assert engine.query(f"SELECT {denied} FROM {table.name}").result_rows[0][0] == denials, table.name
        if table not in LATENCY_ROLLUPS:  # the status- and key-level rollups count requests only
            continue
        # Latency states merge to the same bucket counts as the raw latencies give, in every
        # rollup: the same quantiles, within the buckets' error of the exact ones.
        q_raw = engine.query(f"SELECT {latency.quantiles_sql(raw=True)} FROM requests").result_rows[0][0]
        q_rolled = engine.query(f"SELECT {latency.quantiles_sql(raw=False)} FROM {table.name}").result_rows[0][0]
        assert q_rolled == q_raw, table.name
        for level, got in zip((0.5, 0.95, 0.99), q_rolled, strict=True):
            lo, hi = latency_bounds([e.latency_ms for e in evs], level)
            assert lo <= got <= hi, (table.name, level, got, lo, hi)


def test_the_ingest_table_takes_the_sinks_columns_with_the_raw_tables_types(engine):
    # The sink inserts into INGEST, whose view passes the rows on to RAW: a column added to
    # one and not the other would be refused, or silently left at its default.
    migrate(engine)

    def columns(table: str) -> list[tuple[str, str]]:
        sql = ("SELECT name, type FROM system.columns WHERE database = currentDatabase() AND table = {t:String} "
               "ORDER BY position")
        return [tuple(r) for r in engine.query(sql, parameters={"t": table}).result_rows]

    raw = dict(columns(RAW))
    unwrapped = {name: t.removeprefix("LowCardinality(").removesuffix(")") if t.startswith("LowCardinality(") else t
                 for name, t in raw.items()}
    assert columns(INGEST) == [(name, unwrapped[name]) for name in RAW_COLUMNS]
    assert set(raw) - set(RAW_COLUMNS) == {"inserted_at"}  # filled in by ClickHouse
    evs = events(50, seed=9)
    store(Writer(engine), evs, {"acme": "PROFESSIONAL"})
    stored = engine.query("SELECT event_id, org_id, tier, inserted_at > now() - 600 FROM requests").result_rows
    assert sorted((str(r[0]), r[1], r[2], bool(r[3])) for r in stored) == sorted(
        (e.event_id, "acme", "PROFESSIONAL", True) for e in evs)


def test_a_batch_retried_with_its_token_is_stored_once_in_raw_and_rollups(engine):
    migrate(engine)
    writer = Writer(engine)
    evs = events(5000, seed=5)
    batch = store(writer, evs, {"acme": "FREE"})
    # The retry after a crash: same range, same token; the tier read from Redis may differ by then.
    store(writer, evs, {"acme": "ENTERPRISE"})
    # The same events under another range are a different batch: stored again (the token is the identity).
    other = store(writer, evs[:10], {"acme": "FREE"}, first_offset=batch.end + 1)
    assert other.token() != batch.token()
    expected = len(evs) + 10
    assert engine.query("SELECT count() FROM requests").result_rows[0][0] == expected
    assert engine.query("SELECT groupUniqArray(tier) FROM requests").result_rows[0][0] == ["FREE"]
    for table in ROLLUPS + ORG_ROLLUPS:
        assert engine.query(f"SELECT sum(requests) FROM {table.name}").result_rows[0][0] == expected, table.name


def stored_once(client, org: str, n: int) -> None:
    """The raw table and every rollup hold n events of ``org``, each once."""
    p = {"o": org}
    assert client.query(f"SELECT count(), uniqExact(event_id) FROM {RAW} WHERE org_id = {{o:String}}",
                        parameters=p).result_rows[0] == (n, n)
    stored = {t.name: client.query(f"SELECT sum(requests) FROM {t.name} WHERE org_id = {{o:String}}",
                                   parameters=p).result_rows[0][0] for t in ALL_ROLLUPS}
    assert stored == {t.name: n for t in ALL_ROLLUPS}


def test_a_retry_is_dropped_whole_when_the_views_split_their_output_otherwise(engine):
    """ClickHouse numbers the blocks a materialized view outputs in the deduplication token of
    the view's table: a retry whose views split their output otherwise than the first attempt
    did must still be dropped whole (the sink squashes each view's output into one block).
    The split varies within one process: a large aggregation by a view's query leaves
    hash table statistics (process-wide, whatever the engine's path) that make the next one
    of that query two-level, its output several blocks; the retry's, after statistics from
    the batch itself, not. (Another test module's bulk insert run before it in the same
    pytest worker made test_clickhouse_repair's retry land twice in requests_1m or
    requests_endpoint_1m; without the squashing this test failed 4 runs of 4.)"""
    migrate(engine)
    now_ms = int(time.time() * 1000)
    insert_bulk(engine, "bulk", 120_000, now_ms)  # another org's large insert through the same views
    writer = Writer(engine)
    evs = events(2000, seed=21, now_s=now_ms / 1000)
    store(writer, evs, {"acme": "FREE"})
    store(writer, evs, {"acme": "FREE"})  # the retry
    stored_once(engine, "acme", len(evs))


def test_a_retry_by_an_engine_that_splits_blocks_otherwise_is_dropped_whole(engine, tmp_path):
    """The retry of a batch is often another process's (a sink started again after a crash,
    perhaps on another machine or with another server profile): its blocks may be cut at
    another size. Here the retry's session reads 100 rows a block."""
    migrate(engine)
    evs = events(2000, seed=22)
    store(Writer(engine), evs, {"acme": "FREE"})
    other = connect(f"chdb://{tmp_path / 'clickhouse'}")  # the engine fixture's path: the same tables
    try:
        other.command("SET max_block_size = 100")
        store(Writer(other), evs, {"acme": "FREE"})
    finally:
        other.close()
    stored_once(engine, "acme", len(evs))


def test_ttls_follow_the_retention_settings_and_are_set_idempotently(engine):
    migrate(engine)
    defaults = Settings()
    retention.apply(engine, defaults)

    def ttl_days() -> dict[str, int]:
        out = {}
        for table in TABLES:
            ddl = engine.query(f"SHOW CREATE TABLE {table.name}").result_rows[0][0]
            assert f"TTL {table.ttl_expr} + toIntervalDay(" in ddl, ddl
            out[table.name] = retention.current_days(engine, table)
        return out

    def by_grain(raw: int, minute: int, hour: int, day: int) -> dict[str, int]:
        return {"requests": raw, "requests_1m": minute, "requests_1h": hour, "requests_1d": day,
                "requests_org_1m": minute, "requests_org_1h": hour, "requests_org_1d": day,
                "requests_endpoint_1m": minute, "requests_endpoint_1h": hour, "requests_endpoint_1d": day,
                "requests_status_1h": hour, "requests_status_1d": day, "requests_key_1h": hour, "requests_key_1d": day}

    assert ttl_days() == by_grain(defaults.retention_raw_days, defaults.retention_minute_days,
                                  defaults.retention_hour_days, defaults.retention_day_days)
    assert retention.apply(engine, defaults) == {}  # nothing to change: nothing altered

    wanted = by_grain(7, 14, 60, 400)
    changed = Settings(retention_raw_days=7, retention_minute_days=14, retention_hour_days=60, retention_day_days=400)
    assert retention.apply(engine, changed) == wanted
    assert ttl_days() == wanted
    assert retention.apply(engine, changed) == {}


def test_expired_rows_are_dropped_by_the_ttl(engine):
    migrate(engine)
    retention.apply(engine, Settings(retention_raw_days=1))
    now = time.time()
    fresh = events(50, seed=6, now_s=now)
    fresh = [e for e in fresh if e.ts_ms > (now - DAY_S + 3600) * 1000]  # well inside the one day kept
    stale = [RequestEvent.new(**{**e.to_dict(), "event_id": str(uuid.uuid4()), "ts_ms": e.ts_ms - 10 * DAY_S * 1000})
             for e in fresh]
    store(Writer(engine), fresh + stale, {"acme": "FREE"})
    engine.command("OPTIMIZE TABLE requests FINAL")  # TTLs are applied when parts merge
    ids = {r[0] for r in engine.query("SELECT toString(event_id) FROM requests").result_rows}
    assert ids == {e.event_id for e in fresh}


def test_a_block_over_the_partition_bound_is_refused_as_data_and_its_halves_go_in(engine):
    """Inserts allow a bounded number of day partitions (writer.partitions_bound): events
    lie within the raw retention of their record's arrival, so a batch spans no more. A
    block over the bound anyway is refused as data, which the sink halves (sink._store)
    until each part fits, never retried as it is for ever."""
    from quotaflow.sinks.clickhouse.writer import is_rejection

    migrate(engine)
    now = int(time.time() * 1000)
    rows = to_rows(records([event("bound-org", "k", now - day * 86_400_000) for day in range(8)]))
    rows.set_tiers({"bound-org": "FREE"})
    writer = Writer(engine, max_partitions=4)
    with pytest.raises(Exception) as refused:
        writer.insert(rows, None)
    assert is_rejection(refused.value) and "more than 4" in str(refused.value)
    assert engine.query("SELECT count() FROM requests WHERE org_id = 'bound-org'").result_rows == [(0,)]
    for half in (rows.slice(0, 4), rows.slice(4, 8)):
        writer.insert(half, None)
    assert engine.query("SELECT count() FROM requests WHERE org_id = 'bound-org'").result_rows == [(8,)]


def test_rows_stored_with_t_digest_states_are_converted_to_latency_buckets(engine):
    # A database as 0006 left it, with rows whose latency is a t-digest state.
    migrate(engine, upto=6)
    rnd = random.Random(7)
    small = [rnd.uniform(0.05, 900) for _ in range(3000)]  # one or two a minute: one centroid per request
    big = [rnd.lognormvariate(4, 1.5) for _ in range(30_000)]  # a day rolled into few rows
    now = int(time.time() * 1000)
    insert_latencies(engine, "small", small, now, 2 * 86_400_000, 1)
    insert_latencies(engine, "big", big, now, 3_600_000, 2)
    # A first run that failed after the conversion of the first rollup: the migration runs again.
    for stmt in statements(dict((v, s) for v, _, s in available())[7])[:2]:
        engine.command(stmt)
    assert migrate(engine) == [v for v, _, _ in available() if v >= 7]
    for table in LATENCY_ROLLUPS:
        columns = {n for (n,) in engine.query("SELECT name FROM system.columns WHERE table = {t:String}",
                                              parameters={"t": table.name}).result_rows}
        assert latency.COLUMN in columns and "latency_ms" not in columns, table.name
    # Few requests a row: the centroids are the requests, the counts exact.
    check_latencies(latency_answers(engine, "small"), small)
    # Many: the t-digest's centroids stand for neighbouring latencies (rank within 1 %).
    ordered = sorted(map(float32, big))
    for level, i in zip((0.5, 0.95, 0.99), range(3), strict=True):
        lo = ordered[math.ceil((level - 0.01) * len(ordered)) - 1] * (1 - latency.RELATIVE_ERROR)
        hi = ordered[math.ceil((level + 0.01) * len(ordered)) - 1] * (1 + latency.RELATIVE_ERROR)
        for table, got in latency_answers(engine, "big").items():
            assert lo <= got[i] <= hi, (table, level, got[i], lo, hi)
    # Rows stored from now on go into the buckets through the new views.
    fresh = [rnd.uniform(1, 50) for _ in range(500)]
    insert_latencies(engine, "fresh", fresh, now, 86_400_000, 3)
    answers = latency_answers(engine, "fresh")
    assert all(a == answers[RAW] for a in answers.values())
    check_latencies(answers, fresh)


def test_org_rollups_created_again_in_small_granules_keep_every_figure_and_the_migration_runs_again(engine):
    # A database as 0009 left it, with rows of two orgs in every rollup (through the views).
    migrate(engine, upto=9)
    tiers = {"acme": "FREE", "globex": "ENTERPRISE"}
    old = events(1500, seed=11) + events(700, seed=12, org="globex")
    store(Writer(engine), old, tiers)
    figures = ("sum(requests), sum(errors), sum(denials), sum(request_bytes), sum(response_bytes), "
               f"{latency.quantiles_sql(raw=False)}")

    def org_figures() -> dict[str, list]:
        return {t.name: engine.query(f"SELECT bucket, org_id, tier, {figures} FROM {t.name} "
                                     "GROUP BY bucket, org_id, tier ORDER BY bucket, org_id, tier").result_rows
                for t in ORG_ROLLUPS}

    before = org_figures()
    assert all(before.values())
    # A first run that failed while filling the hour rollup (the minute one done: five
    # statements a rollup), with half of it in...
    stmts = statements(dict((v, s) for v, _, s in available())[10])
    assert len(stmts) == 15 and stmts[8].startswith("INSERT INTO requests_org_1h")
    for stmt in stmts[:9]:
        engine.command(stmt)
    engine.command("ALTER TABLE requests_org_1h DELETE WHERE org_id = 'globex' SETTINGS mutations_sync = 2")
    # ... runs again whole.
    assert migrate(engine) == [v for v, _, _ in available() if v >= 10]
    assert org_figures() == before  # the same rows, sums, 429s and latency bucket counts
    for t in ORG_ROLLUPS:
        ddl = engine.query(f"SHOW CREATE TABLE {t.name}").result_rows[0][0]
        assert "index_granularity = 64" in ddl and "ORDER BY (org_id, bucket, tier)" in ddl, ddl
    # Rows stored from now on reach them through the views, as every other rollup.
    new = events(900, seed=13, org="globex")
    store(Writer(engine), new, tiers, first_offset=5000)
    for t in ORG_ROLLUPS:
        assert stored_org_groups(engine, t.name) == expected_org_groups(old + new, t.grain_ms // 1000, tiers), t.name


def test_questions_about_every_org_read_the_projections_and_answer_as_the_rows_do(engine):
    """0012: the org- and endpoint-level rollups keep a projection without org; an operator's
    question about every org reads it, with the answer the rows give, after inserts (a part
    each) and after merges (the projection rebuilt)."""
    from quotaflow.analytics import queries
    from quotaflow.analytics.scope import Scope
    from quotaflow.analytics.window import for_timeframe

    migrate(engine)
    for table in ORG_ROLLUPS + ENDPOINT_ROLLUPS:
        ddl = engine.query(f"SHOW CREATE TABLE {table.name}").result_rows[0][0]
        assert "PROJECTION every_org" in ddl and "deduplicate_merge_projection_mode = 'rebuild'" in ddl, ddl
    tiers = {"acme": "FREE", "globex": "ENTERPRISE"}
    evs = events(2000, seed=21) + events(1000, seed=22, org="globex")
    writer = Writer(engine)
    now_ms = int(time.time() * 1000)
    retention_days = {t.name: 3650 for t in TABLES}
    bounds = queries.Bounds().settings()

    def compare(read_projection: bool) -> None:
        for timeframe in ("1h", "24h", "7d", "30d"):
            time_range = for_timeframe(timeframe, now_ms, retention_days)
            for question in sorted(queries.ORG_LEVEL | queries.ENDPOINT_LEVEL):
                q = queries.build(question, Scope.operator(), time_range, limit=1000)
                answers = [engine.query(q.sql, parameters=q.parameters,
                                        settings={**bounds, "optimize_use_projections": on}).result_rows
                           for on in (0, 1)]
                assert answers[0] == answers[1], (timeframe, question)
                if read_projection and question in ("summary", "latency", "endpoints"):
                    plan = "\n".join(r[0] for r in engine.query(f"EXPLAIN {q.sql}", parameters=q.parameters).result_rows)
                    assert "every_org" in plan, (timeframe, question, plan)

    store(writer, evs[:1500], tiers)
    store(writer, evs[1500:], tiers, first_offset=1500)
    compare(read_projection=True)
    for table in ORG_ROLLUPS + ENDPOINT_ROLLUPS:
        engine.command(f"OPTIMIZE TABLE {table.name} FINAL")
    compare(read_projection=True)
    store(writer, events(500, seed=23, org="globex"), tiers, first_offset=5000)
    compare(read_projection=False)


def test_an_inserts_parts_are_packed_and_merge_and_attach_as_before(engine):
    """0013: each table's part of an insert is one file (data.packed), not a dozen; packed
    parts merge, and attach from a table created AS the raw table (the repair's staging),
    keeping every total."""
    migrate(engine)
    writer = Writer(engine)
    evs = events(1200, seed=21)
    store(writer, evs[:600], {"acme": "FREE"})
    store(writer, evs[600:], {"acme": "FREE"}, first_offset=600)
    kinds = dict(engine.query("SELECT table, groupUniqArray(part_storage_type) FROM system.parts WHERE active "
                              "AND database = currentDatabase() GROUP BY table").result_rows)
    assert {name: kinds.get(name) for name in (t.name for t in TABLES)} == {t.name: ["Packed"] for t in TABLES}

    def totals() -> list[tuple]:
        return [engine.query(f"SELECT {'count()' if t is TABLES[0] else 'sum(requests)'}, sum(request_bytes) "
                             f"FROM {t.name}").result_rows[0] for t in TABLES]

    before = totals()
    assert before == [(len(evs), sum(e.request_bytes for e in evs))] * len(TABLES)
    for table in (RAW, ROLLUPS[0].name, ORG_ROLLUPS[1].name):  # merged: a projection's table among them
        engine.command(f"OPTIMIZE TABLE {table} FINAL")
    assert totals() == before
    engine.command(f"CREATE TABLE stage AS {RAW}")
    extra = events(5, seed=22)
    Writer(engine).insert(_tiered(extra), None, table="stage")
    for (partition_id,) in engine.query("SELECT DISTINCT _partition_id FROM stage").result_rows:
        engine.command(f"ALTER TABLE {RAW} ATTACH PARTITION ID '{partition_id}' FROM stage")
    assert engine.query(f"SELECT count() FROM {RAW}").result_rows[0][0] == len(evs) + len(extra)


def _tiered(evs):
    rows = to_rows(records(evs, first_offset=5000))
    rows.set_tiers({"acme": "FREE"})
    return rows
