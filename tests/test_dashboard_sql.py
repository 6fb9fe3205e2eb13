"""Ad-hoc SQL (analytics/adhoc.py): POST /v1/sql for operator tokens, on an embedded engine
of the test's own holding known rows, and `quotaflow sql` through a served API.

Everything a statement could do beyond reading is refused by ClickHouse itself
(readonly=1), as are answers beyond the bounds; an org token never reaches it."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import subprocess
import sys
import threading
import time

import httpx
import orjson
import pytest
import uvicorn

from quotaflow.analytics import adhoc
from quotaflow.analytics.app import create_app
from quotaflow.analytics.queries import Bounds
from quotaflow.schemas.clickhouse import retention
from quotaflow.schemas.clickhouse.client import connect
from quotaflow.schemas.clickhouse.migrate import migrate

TOKENS = {"tok-ops": "*", "tok-acme": "acme"}
ROWS = {"acme": 3, "globex": 5}


@pytest.fixture()
def store(tmp_path, settings):
    """An engine with ROWS events per org, and the URL to open more clients on it."""
    url = f"chdb://{tmp_path / 'clickhouse'}"
    client = connect(url)
    migrate(client)
    values = ", ".join(f"(generateUUIDv4(), now64(3), '{org}', '{org}-k', 'svc', '/v1/x', 'GET', 200, 1.5, 0, 10, "
                       f"toIPv6('::1'), 'ua', 1, 0, {i}, 'FREE')"
                       for org, n in ROWS.items() for i in range(n))
    client.command("INSERT INTO requests (event_id, event_time, org_id, api_key_id, service, endpoint, method, status, "
                   "latency_ms, request_bytes, response_bytes, client_ip, user_agent, schema_version, kafka_partition, "
                   f"kafka_offset, tier) VALUES {values}")
    yield url, client
    client.close()


def app_for(store, settings, bounds: Bounds = Bounds()):
    url, client = store
    return create_app(TOKENS, retention.wanted_days(settings), client, lambda: connect(url), bounds=bounds)


def post(app, sql: str | bytes, token: str | None = "tok-ops", fmt: str | None = None) -> httpx.Response:
    async def go() -> httpx.Response:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        params = {"format": fmt} if fmt else {}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api", timeout=60) as c:
            return await c.post("/v1/sql", content=sql, headers=headers, params=params)

    return asyncio.run(go())


def test_an_operator_reads_with_sql_in_each_format(store, settings):
    app = app_for(store, settings)
    sql = "SELECT org_id, count() AS n FROM requests GROUP BY org_id ORDER BY org_id"
    answer = post(app, sql)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert [m["name"] for m in body["meta"]] == ["org_id", "n"]
    assert {r["org_id"]: int(r["n"]) for r in body["data"]} == ROWS
    as_csv = post(app, sql + ";", fmt="csv")  # one trailing ';' is still one statement
    assert as_csv.headers["content-type"].startswith("text/csv")
    assert list(csv.reader(io.StringIO(as_csv.text))) == [["org_id", "n"], ["acme", "3"], ["globex", "5"]]
    parquet = post(app, sql, fmt="parquet")
    assert parquet.status_code == 200 and parquet.content[:4] == b"PAR1" and parquet.content[-4:] == b"PAR1"
    # The dashboard's own client was not touched: its questions still answer.
    async def summary() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as c:
            return await c.get("/v1/summary?timeframe=1h", headers={"authorization": "Bearer tok-ops"})
    assert asyncio.run(summary()).json()["rows"][0]["requests"] == sum(ROWS.values())


@pytest.mark.parametrize("sql", [
    "INSERT INTO requests (org_id) VALUES ('x')",
    "CREATE TABLE probe (a UInt8) ENGINE = Memory",
    "DROP TABLE requests",
    "ALTER TABLE requests DELETE WHERE 1",
    "SELECT * FROM file('/etc/hostname', 'LineAsString')",
    "SELECT * FROM url('http://127.0.0.1:9/', 'LineAsString')",
    "SELECT * FROM executable('ls', 'LineAsString', 'x String')",
    "INSERT INTO FUNCTION file('/tmp/quotaflow-probe.csv', 'CSV', 'a UInt8') VALUES (1)",
    "SELECT 1 SETTINGS readonly = 0",
    "SELECT 1 SETTINGS max_result_rows = 0",
    "SET readonly = 0",
])
def test_anything_but_reading_is_refused_by_the_engine(store, settings, sql):
    answer = post(app_for(store, settings), sql)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    # SET cannot even be read: the format the API adds after the statement makes it a syntax error.
    assert "READONLY" in error or (sql.startswith("SET") and "SYNTAX_ERROR" in error), error
    assert not os.path.exists("/tmp/quotaflow-probe.csv")


@pytest.mark.parametrize(("sql", "token", "fmt", "status", "reason"), [
    ("SELECT 1", None, None, 401, "missing Authorization"),
    ("SELECT 1", "nope", None, 401, "unknown bearer token"),
    ("SELECT 1", "tok-acme", None, 403, "operator token"),
    ("SELECT count() FROM requests WHERE org_id = 'acme'", "tok-acme", None, 403, "operator token"),
    ("SELECT 1", "tok-ops", "xml", 400, "format: one of"),
    ("SELECT 1; SELECT 2", "tok-ops", None, 400, "one statement"),
    ("SELECT 'a;b'", "tok-ops", None, 400, "one statement"),
    ("   ", "tok-ops", None, 400, "empty"),
    (b"SELECT '\xff'", "tok-ops", None, 400, "UTF-8"),
    ("SELECT '" + "x" * (adhoc.MAX_SQL_BYTES + 1) + "'", "tok-ops", None, 413, "longer than"),
    ("SELECT nonsense(", "tok-ops", None, 400, "refused the statement"),
])
def test_hostile_requests_get_the_reason(store, settings, sql, token, fmt, status, reason):
    answer = post(app_for(store, settings), sql, token=token, fmt=fmt)
    assert answer.status_code == status, answer.text
    assert reason in answer.json()["error"]
    if token:
        assert token not in answer.text


def test_bounds_stop_a_statement_with_a_503_naming_them(store, settings):
    app = app_for(store, settings, Bounds(max_execution_time_s=0.2, max_memory_usage=1024 ** 3))
    too_many = post(app, f"SELECT number FROM numbers({adhoc.MAX_RESULT_ROWS + 1})")
    assert too_many.status_code == 503 and "max_result_rows" in too_many.json()["error"]
    too_long = post(app, "SELECT count() FROM numbers(100000000000)")
    assert too_long.status_code == 503 and "max_execution_time" in too_long.json()["error"]
    assert post(app, "SELECT 1 AS one").json()["data"] == [{"one": 1}]  # and the next statement is answered


def test_quotaflow_sql_through_the_served_api(store, settings, port_base):
    port = port_base + 98
    server = uvicorn.Server(uvicorn.Config(app_for(store, settings), host="127.0.0.1", port=port, log_config=None,
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the API did not start"
            time.sleep(0.05)
        env = {**os.environ, "QUOTAFLOW_API_TOKENS": orjson.dumps(TOKENS).decode(), "QUOTAFLOW_API_PORT": str(port)}
        run = lambda *a, **kw: subprocess.run([sys.executable, "-m", "quotaflow", "sql", *a], capture_output=True,  # noqa: E731
                                              timeout=60, **kw)
        done = run("SELECT org_id, count() AS n FROM requests GROUP BY org_id ORDER BY org_id", env=env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.decode().splitlines() == ['"org_id","n"', '"acme",3', '"globex",5']
        from_stdin = run("-", "--format", "json", input=b"SELECT count() AS n FROM requests", env=env)
        assert [int(r["n"]) for r in orjson.loads(from_stdin.stdout)["data"]] == [sum(ROWS.values())]
        refused = run("DROP TABLE requests", env=env)
        assert refused.returncode == 1 and b"400" in refused.stderr and b"READONLY" in refused.stderr
        no_operator = run("SELECT 1", env={**env, "QUOTAFLOW_API_TOKENS": orjson.dumps({"t": "acme"}).decode()})
        assert no_operator.returncode == 2 and b"operator token" in no_operator.stderr
        for secret in TOKENS:
            assert secret.encode() not in done.stderr + refused.stderr + no_operator.stderr
    finally:
        server.should_exit = True
        thread.join(30)
    gone = subprocess.run([sys.executable, "-m", "quotaflow", "sql", "SELECT 1"], capture_output=True, timeout=60,
                          env=env)
    assert gone.returncode == 1 and b"cannot reach the query API" in gone.stderr
