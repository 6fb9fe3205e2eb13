"""The schema for a ClickHouse server cluster (`quotaflow db migrate --cluster NAME`): every
statement parsed by ClickHouse's own parser (the embedded engine's EXPLAIN AST: no server
cluster can be installed here), and built as schemas/clickhouse/cluster.py says: a
replicated table per shard, a Distributed one over it under the usual name, views from
local table to local table."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from quotaflow.schemas.clickhouse.cluster import LOCAL, SHARDING_KEY, cluster_statements, script
from quotaflow.schemas.clickhouse.migrate import available, statements
from quotaflow.schemas.clickhouse.tables import INGEST, KEY_CHANGES, TABLES

CLUSTER = "qf_cluster"


def _tables_of_the_migrations() -> dict[str, str]:
    """Each table the migrations create, and its column block as the last migration creating
    it writes it."""
    out = {}
    for _, _, sql in available():
        for stmt in statements(sql):
            if m := re.match(r"CREATE TABLE IF NOT EXISTS (\w+)\s*\((.*?)\)\s*ENGINE", stmt, re.S):
                out[m.group(1)] = m.group(2)
    return out


def test_every_statement_parses_as_clickhouse_sql(engine):
    stmts = [s for _, s in cluster_statements(CLUSTER) if not s.startswith("--")]
    assert len(stmts) > 20
    for stmt in stmts:
        engine.query("EXPLAIN AST " + stmt)  # raises on a syntax error
    with pytest.raises(Exception, match="Syntax error"):  # the check can fail
        engine.query("EXPLAIN AST " + stmts[0].replace("ON CLUSTER", "ON CLUSTER ("))


def test_each_table_is_replicated_on_the_shards_and_distributed_under_its_usual_name():
    stmts = [s for _, s in cluster_statements(CLUSTER)]
    created = _tables_of_the_migrations()
    assert {t.name for t in TABLES} | {INGEST, KEY_CHANGES} <= set(created)
    recreated = 0
    for name, columns in created.items():
        local = [s for s in stmts if s.startswith(f"CREATE TABLE IF NOT EXISTS {name}{LOCAL} ON CLUSTER {CLUSTER} (")]
        drops = [f"DROP TABLE IF EXISTS {name} ON CLUSTER {CLUSTER}", f"DROP TABLE IF EXISTS {name}{LOCAL} ON CLUSTER {CLUSTER}"]
        # Created again by a later migration (org rollups, 0010): both tables dropped in between,
        # the Distributed one first; the last creation is the table's layout now.
        for before, after in zip(local, local[1:]):
            at = [stmts.index(d, stmts.index(before)) for d in drops]
            assert stmts.index(before) < at[0] < at[1] < stmts.index(after), name
        recreated += len(local) > 1
        local = local[-1:]
        assert columns in local[0], name  # the same columns, as the migration writes them
        engine = re.search(r"ENGINE = (\w+)", local[0]).group(1)
        if name == INGEST:
            assert engine == "Null"
        else:
            assert engine.startswith("Replicated") and engine.endswith("MergeTree"), (name, engine)
            assert f"'/clickhouse/tables/{{shard}}/{{database}}/{name}{LOCAL}', '{{replica}}'" in local[0]
            assert "non_replicated" not in local[0]
        distributed = [s for s in stmts if s.startswith(f"CREATE TABLE IF NOT EXISTS {name} ON CLUSTER {CLUSTER} ")][-1:]
        assert distributed == [f"CREATE TABLE IF NOT EXISTS {name} ON CLUSTER {CLUSTER} AS {name}{LOCAL}\n"
                               f"ENGINE = Distributed({CLUSTER}, currentDatabase(), {name}{LOCAL}, {SHARDING_KEY})"]
        last_distributed = max(i for i, s in enumerate(stmts) if s == distributed[0])
        assert stmts.index(local[0]) < last_distributed
    assert recreated == 3  # the org rollups


def test_views_run_on_each_shard_from_local_to_local_and_nothing_is_backfilled():
    stmts = [s for _, s in cluster_statements(CLUSTER)]
    tables = set(_tables_of_the_migrations())
    original = {m.group(1): m.group(2) for _, _, sql in available() for s in statements(sql)
                if (m := re.match(r"CREATE MATERIALIZED VIEW IF NOT EXISTS (\w+) TO \w+ AS\s+(.*)$", s, re.S))}
    views = {re.match(r"CREATE MATERIALIZED VIEW IF NOT EXISTS (\w+) ", s).group(1): s for s in stmts
             if s.startswith("CREATE MATERIALIZED VIEW")}
    assert set(views) == set(original) and views
    for name, view in views.items():
        target = re.search(r"\bTO (\w+) AS\b", view).group(1)
        sources = re.findall(r"\bFROM\s+(\w+)", view)
        assert target.endswith(LOCAL) and target.removesuffix(LOCAL) in tables, view
        assert sources and all(s.endswith(LOCAL) for s in sources), view
        # the migration's SELECT, only what it reads FROM made local (aliases such as
        # "count() AS requests" stay as they were)
        select = view.split(" AS ", 1)[1]
        assert select == re.sub(r"\bFROM\s+(\w+)", lambda m: f"FROM {m.group(1)}{LOCAL}", original[name]), name
    assert not any(s.startswith("INSERT") for s in stmts)
    assert all(f"ON CLUSTER {CLUSTER}" in s for s in stmts if not s.startswith("--"))


def test_the_command_prints_the_script_and_refuses_a_name_that_is_not_one(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "quotaflow", "db", "migrate", "--cluster", CLUSTER],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout == script(CLUSTER), ok.stderr
    bad = subprocess.run([sys.executable, "-m", "quotaflow", "db", "migrate", "--cluster", "qf; DROP TABLE requests"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stdout == "" and "cluster: must match" in bad.stderr
