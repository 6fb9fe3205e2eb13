"""A key's plaintext is shown once, by the command that creates it, and kept nowhere:
after creating and rotating keys through the whole pipeline, no part of any key's secret
is found in any Kafka topic (records, headers, the broker's files), Redis (every key and
value, its append-only file), ClickHouse (every table), any log of the run, or any
process's arguments."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from quotaflow.schemas import api_keys
from quotaflow.schemas.clickhouse.client import connect
from tests.keys_helpers import keys_cli, keys_json, record_fields, wait_audit_caught_up
from tests.pipeline import read_all, unique

pytestmark = pytest.mark.stack


def secret_part(key: str) -> bytes:
    """What no one may see of a key: all of it after its display prefix (the 22 random
    characters and the checksum), so a partial leak is found as well as a whole one."""
    return key[len(api_keys.display_prefix(key)):].encode()


async def all_topics(bootstrap: str) -> list[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return sorted(await admin.list_topics())
    finally:
        await admin.close()


def files_under(*roots: Path) -> list[Path]:
    return [p for root in roots if root.exists() for p in root.rglob("*") if p.is_file()]


def test_no_plaintext_key_anywhere_but_the_create_output(live_stack, redis_client, pipeline):
    org = unique("secrets")
    pipeline.start("processor")
    pipeline.start("sink")
    outputs, keys = [], []
    done = keys_cli("create", org, "--name", "plain output", "--scope", "orders:read")
    assert done.returncode == 0, done.stderr
    keys.append(done.stdout.splitlines()[-1].removeprefix("key: "))
    outputs.append(done)
    made = keys_json("create", org, "--name", "json output", "--limit", "60s=3")
    keys.append(made["key"])
    rotated = keys_json("rotate", org, made["key_id"], "--overlap", "10m")
    keys.append(rotated["key"])
    for args in (("list", org), ("show", org, made["key_id"]), ("update", org, made["key_id"], "--name", "renamed"),
                 ("revoke", org, rotated["key_id"])):
        outputs.append(keys_cli(*args))
        assert outputs[-1].returncode == 0, outputs[-1].stderr
    for key in keys:
        api_keys.parse(key)
        assert record_fields(redis_client, org, key)  # the keys were materialized: there was something to leak
    secrets = [secret_part(k) for k in keys]
    assert all(len(s) == 29 for s in secrets)

    def leaks(where: str, data: bytes) -> list[str]:
        return [f"{where}: key #{n}" for n, s in enumerate(secrets) if s in data]  # never the secret itself

    found = []
    # the command's other outputs (stderr of every command, stdout of all but create's)
    for out in outputs:
        found += leaks("command stderr", out.stderr.encode())
    for out in outputs[1:]:
        found += leaks("command stdout", out.stdout.encode())

    # Kafka: every record (value, key, headers) of every topic, and the broker's files
    wait_audit_caught_up(live_stack, pipeline)
    for topic in asyncio.run(all_topics(live_stack.kafka_bootstrap)):
        for r in asyncio.run(read_all(live_stack, topic)):
            blob = (r.key or b"") + (r.value or b"") + b"".join(k.encode() + v for k, v in r.headers or ())
            found += leaks(f"kafka topic {topic}", blob)
    state = live_stack.state_dir
    for path in files_under(state / "kafka"):
        found += leaks(f"file {path.relative_to(state)}", path.read_bytes())

    # Redis: every key name and value, and its files
    for name in redis_client.scan_iter(count=1000):
        found += leaks("redis key name", name)
        found += leaks(f"redis {name!r}", redis_client.dump(name) or b"")
    for path in files_under(state / "redis"):
        found += leaks(f"file {path.relative_to(state)}", path.read_bytes())

    # ClickHouse: every table of the stack's engine, every column as text
    pipeline.stop("sink")
    pipeline.stop("processor")
    tables = pipeline.query_clickhouse("SELECT database, name FROM system.tables "
                                       "WHERE database NOT IN ('system', 'INFORMATION_SCHEMA', 'information_schema')")
    assert ("default", "api_key_changes") in tables or any(t[1] == "api_key_changes" for t in tables)
    client = connect(live_stack.clickhouse_url)  # the sink is stopped: the engine is ours
    try:
        for database, table in tables:  # as text, whatever the column types (rollup states too)
            dump = client.raw_query(f"SELECT * FROM `{database}`.`{table}` FORMAT TabSeparated")
            found += leaks(f"clickhouse {database}.{table}", dump)
    finally:
        client.close()
    assert pipeline.query_clickhouse("SELECT count() FROM api_key_changes WHERE org_id = {o:String}", {"o": org}) \
        == [(6,)]  # the audit holds every change: create, create, 2 of the rotation, update, revoke

    # every log of the run: the stages', the servers'
    for path in files_under(state / "logs", state / "kafka", state / "redis", state / "run"):
        if path.suffix in (".log", ".json") or "log" in path.name:
            found += leaks(f"log {path.relative_to(state)}", path.read_bytes())

    # process arguments: every process on the machine now
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                found += leaks(f"arguments of pid {proc.name}", (proc / "cmdline").read_bytes())
            except OSError:  # gone, or not ours to read
                pass
    assert found == []
    # and the test can see a leak: the create command's own output holds the key
    assert leaks("create output", outputs[0].stdout.encode()) == ["create output: key #0"]
    assert os.environ.get("QUOTAFLOW_KEY_HASH_SECRETS") is None  # the secret was given to the commands only
