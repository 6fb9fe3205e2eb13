"""The schema for a ClickHouse server cluster, derived from the migrations: what
``quotaflow db migrate --cluster NAME`` prints, for an operator to apply with
clickhouse-client (no server binary installs on the machines quotaflow is built on, so it
is generated and parsed here, never applied).

Every table of the migrations becomes two, so that the sink and the query API keep the
names they use on one server:

- ``<name>_local`` ON CLUSTER, on every replica of every shard: the migration's columns,
  order and TTL, its engine replicated (``AggregatingMergeTree`` ->
  ``ReplicatedAggregatingMergeTree('/clickhouse/tables/{shard}/{database}/<name>_local',
  '{replica}')``), the deduplication window of retried inserts kept through Keeper
  (``replicated_deduplication_window``); a Null table stays Null.
- ``<name>``, a Distributed table over it, sharded by ``cityHash64(org_id)``: an org's
  events, rollups and key changes live on one shard, so its rollups are complete there
  and its questions are answered by one shard's merge.

Materialized views run on each shard, from local table to local table. Views read the
Distributed tables. Backfills (INSERT ... SELECT of rows stored before a migration) have
nothing to do on a new cluster and are left out, named in a comment. A table that a later
migration drops and creates again (another granule size: 0010) is dropped on the cluster
too, the Distributed table before the shards' tables, and created again as that migration
writes it.
"""

from __future__ import annotations

import re

from quotaflow.schemas.clickhouse.migrate import available, statements

LOCAL = "_local"
KEEPER_PATH = "/clickhouse/tables/{shard}/{database}/"
SHARDING_KEY = "cityHash64(org_id)"
# A cluster's name as the server's configuration names it, and as it goes into DDL unquoted.
CLUSTER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")

_CREATE_TABLE = re.compile(r"^CREATE TABLE IF NOT EXISTS (\w+)\s*\(", re.S)
_ENGINE = re.compile(r"ENGINE\s*=\s*(\w+)(?:\(([^)]*)\))?")
_ALTER = re.compile(r"^ALTER TABLE (\w+)\s+(.*)$", re.S)
_MATERIALIZED = re.compile(r"^CREATE MATERIALIZED VIEW IF NOT EXISTS (\w+)\s+TO\s+(\w+)\s+AS\s+(.*)$", re.S)
_VIEW = re.compile(r"^CREATE VIEW IF NOT EXISTS (\w+)\s+AS\s+(.*)$", re.S)
_INSERT = re.compile(r"^INSERT INTO (\w+)")
_UPDATE = re.compile(r"^ALTER TABLE (\w+)\s+UPDATE\b")
_MATERIALIZE_PROJECTION = re.compile(r"^ALTER TABLE (\w+)\s+MATERIALIZE PROJECTION\b")
_LOCAL_ONLY = re.compile(r"^ALTER TABLE (\w+)\s+((?:ADD PROJECTION|MODIFY SETTING)\b.*)$", re.S)
_DROP_VIEW = re.compile(r"^DROP VIEW IF EXISTS (\w+)$")
_DROP_TABLE = re.compile(r"^DROP TABLE IF EXISTS (\w+)$")


class UnknownStatement(ValueError):
    """A migration statement this module does not know how to distribute: a migration
    added without teaching it here (the test over every migration catches it)."""


def check_cluster(name: str) -> str:
    if not CLUSTER_NAME.fullmatch(name):
        raise ValueError(f"cluster: must match {CLUSTER_NAME.pattern} (a name from the servers' "
                         "remote_servers configuration)")
    return name


def cluster_statements(cluster: str) -> list[tuple[int, str]]:
    """(migration version, statement) of the cluster schema, in order. Statements that are
    comments start with ``--``."""
    check_cluster(cluster)
    tables: set[str] = set()
    out: list[tuple[int, str]] = []
    for version, _, sql in available():
        for stmt in statements(sql):
            for converted in _convert(stmt, cluster, tables):
                out.append((version, converted))
    return out


def _local_names(sql: str, tables: set[str]) -> str:
    """``sql`` reading the shard's own tables: every table it reads FROM made local (an
    alias or column of the same name, such as ``requests``, stays)."""
    return re.sub(r"\bFROM\s+(\w+)\b", lambda m: f"FROM {m.group(1)}{LOCAL}" if m.group(1) in tables else m.group(0),
                  sql)


def _convert(stmt: str, cluster: str, tables: set[str]) -> list[str]:
    if m := _CREATE_TABLE.match(stmt):
        name = m.group(1)
        local = name + LOCAL
        engine = _ENGINE.search(stmt)
        if engine is None:
            raise UnknownStatement(f"CREATE TABLE {name} without an engine")
        kind, args = engine.group(1), (engine.group(2) or "").strip()
        if kind.endswith("MergeTree"):
            replicated = f"Replicated{kind}('{KEEPER_PATH}{local}', '{{replica}}'{', ' + args if args else ''})"
        elif kind == "Null":
            replicated = "Null"
        else:
            raise UnknownStatement(f"CREATE TABLE {name}: engine {kind}")
        body = stmt[m.end():]
        body = body[:engine.start() - m.end()] + f"ENGINE = {replicated}" + body[engine.end() - m.end():]
        body = body.replace("non_replicated_deduplication_window", "replicated_deduplication_window")
        if not re.search(r"\borg_id\b", stmt[:engine.start()]):
            raise UnknownStatement(f"CREATE TABLE {name}: no org_id to shard by")
        tables.add(name)
        return [f"CREATE TABLE IF NOT EXISTS {local} ON CLUSTER {cluster} (" + body,
                f"CREATE TABLE IF NOT EXISTS {name} ON CLUSTER {cluster} AS {local}\n"
                f"ENGINE = Distributed({cluster}, currentDatabase(), {local}, {SHARDING_KEY})"]
    if m := _UPDATE.match(stmt):  # rows stored before the migration rewritten: a backfill too
        return [f"-- left out: the backfill of {m.group(1)} (a new cluster has no rows stored before it)"]
    if m := _MATERIALIZE_PROJECTION.match(stmt):  # built for the parts stored before: a backfill too
        return [f"-- left out: the projection's backfill of {m.group(1)} (a new cluster has no rows stored before it)"]
    if m := _LOCAL_ONLY.match(stmt):
        name, rest = m.groups()
        if name not in tables:
            raise UnknownStatement(f"ALTER TABLE {name}: not a table of the migrations")
        # a projection and the settings of the parts it lives in: the shards' tables alone (the
        # Distributed table has no parts; each shard answers from its own projection)
        return [f"ALTER TABLE {name}{LOCAL} ON CLUSTER {cluster} {rest}"]
    if m := _ALTER.match(stmt):
        name, rest = m.groups()
        if name not in tables:
            raise UnknownStatement(f"ALTER TABLE {name}: not a table of the migrations")
        # the shards' tables and the Distributed one over them keep the same columns
        return [f"ALTER TABLE {name}{LOCAL} ON CLUSTER {cluster} {rest}", f"ALTER TABLE {name} ON CLUSTER {cluster} {rest}"]
    if m := _MATERIALIZED.match(stmt):
        view, target, select = m.groups()
        if target not in tables:
            raise UnknownStatement(f"materialized view {view}: its target {target} is not a table of the migrations")
        return [f"CREATE MATERIALIZED VIEW IF NOT EXISTS {view} ON CLUSTER {cluster} TO {target}{LOCAL} AS "
                + _local_names(select, tables)]
    if m := _DROP_VIEW.match(stmt):  # a view replaced by a later migration
        return [f"DROP VIEW IF EXISTS {m.group(1)} ON CLUSTER {cluster}"]
    if m := _DROP_TABLE.match(stmt):  # a table created again by a later migration (another layout)
        name = m.group(1)
        if name not in tables:
            raise UnknownStatement(f"DROP TABLE {name}: not a table of the migrations")
        tables.discard(name)
        return [f"DROP TABLE IF EXISTS {name} ON CLUSTER {cluster}", f"DROP TABLE IF EXISTS {name}{LOCAL} ON CLUSTER {cluster}"]
    if m := _VIEW.match(stmt):
        view, select = m.groups()
        return [f"CREATE VIEW IF NOT EXISTS {view} ON CLUSTER {cluster} AS {select}"]
    if m := _INSERT.match(stmt):
        return [f"-- left out: the backfill of {m.group(1)} (a new cluster has no rows stored before it)"]
    raise UnknownStatement(f"a statement of an unknown kind: {stmt[:60]!r}")


def script(cluster: str) -> str:
    """The whole cluster schema as one script, a comment per migration."""
    lines, last = [], None
    names = {version: name for version, name, _ in available()}
    for version, stmt in cluster_statements(cluster):
        if version != last:
            lines.append(f"\n-- migration {version:04d}_{names[version]}")
            last = version
        lines.append(stmt if stmt.startswith("--") else stmt + ";")
    return "\n".join(lines).lstrip() + "\n"
