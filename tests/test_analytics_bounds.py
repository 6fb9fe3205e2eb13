"""The query API's bounds on the real stack: the sink serves the API on the stack's
ClickHouse engine, configured by QUOTAFLOW_API_* settings as an operator would; a query
stopped by its time or memory bound, or a request beyond the concurrency bound, is
answered 503 naming the bound, counted in the sink's metrics, and logged in one line
(no traceback), as are hostile parameters (400)."""

from __future__ import annotations

import threading
import time

import httpx
import orjson
import pytest

from quotaflow.schemas.clickhouse.client import connect
from quotaflow.schemas.clickhouse.migrate import migrate
from tests.pipeline import Pipeline, unique, wait_for
from tests.storage import HOUR, insert_bulk

pytestmark = pytest.mark.stack
ROWS = 300_000
REFUSED = "quotaflow_api_refused_total"


@pytest.fixture(scope="module")
def bulk(live_stack):
    """An org of its own with enough rows in the stack's engine for a raw-table question
    to take measurable time and memory (inserted while no sink holds the engine)."""
    pipeline = Pipeline(live_stack)
    pipeline.stop_all()
    org = unique("bulk")
    client = connect(live_stack.clickhouse_url)
    try:
        migrate(client)  # a fresh stack has no tables until a sink started once
        insert_bulk(client, org, ROWS, int(time.time() * 1000))
    finally:
        client.close()
    return org


@pytest.fixture()
def serve(live_stack, pipeline):
    """Start the sink (and so the API) with these QUOTAFLOW_API_* settings and a token."""
    token = unique("tok-ops")

    def start(**env: str) -> tuple[str, str]:
        pipeline.start("sink", QUOTAFLOW_API_TOKENS=orjson.dumps({token: "*"}).decode(), **env)
        return f"http://127.0.0.1:{live_stack.api_port}", token

    return start


def heavy(org: str) -> dict[str, str]:
    """A question only the raw table can answer (the range is off the minute)."""
    now = int(time.time() * 1000)
    return {"from": str(now - 19 * HOUR - 1), "to": str(now), "org": org, "limit": "1000"}


def get(base: str, token: str, path: str, params: dict) -> httpx.Response:
    return httpx.get(base + path, params=params, headers={"authorization": f"Bearer {token}"}, timeout=60)


def refused(pipeline: Pipeline, bound: str) -> float:
    return pipeline.metric("sink", f'{REFUSED}{{bound="{bound}"}}')


def assert_one_line_logs(pipeline: Pipeline) -> None:
    log = pipeline.logs("sink", lines=10_000)
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]


@pytest.mark.parametrize("setting, value, bound, message", [
    ("QUOTAFLOW_API_QUERY_TIMEOUT_S", "0.001", "max_execution_time", "query exceeded max_execution_time=0.001s"),
    ("QUOTAFLOW_API_QUERY_MAX_MEMORY_BYTES", "1000000", "max_memory_usage",
     "query exceeded max_memory_usage=1000000 bytes"),
])
def test_a_query_beyond_its_bound_is_stopped_and_answered_503_naming_the_bound(bulk, serve, pipeline, setting, value,
                                                                               bound, message):
    base, token = serve(**{setting: value})
    for path in ("/v1/api_keys", "/v1/api_keys.csv"):
        resp = get(base, token, path, heavy(bulk))
        assert resp.status_code == 503, (path, resp.text)
        assert message in resp.json()["error"]
    assert refused(pipeline, bound) == 2
    assert "stopped by a bound" in pipeline.logs("sink", lines=10_000)
    assert_one_line_logs(pipeline)


def test_requests_beyond_the_concurrency_bound_get_503_with_retry_after(bulk, serve, pipeline):
    base, token = serve(QUOTAFLOW_API_MAX_CONCURRENT_QUERIES="1", QUOTAFLOW_API_QUEUE_WAIT_S="0")
    # Control: alone, the heavy question is answered.
    want = get(base, token, "/v1/api_keys", heavy(bulk))
    assert want.status_code == 200, want.text
    # Bursts of the same question at once, until one finds the single slot taken.
    seen: list[httpx.Response] = []

    def burst() -> bool:
        go = threading.Barrier(6)
        out: list[httpx.Response] = []

        def one() -> None:
            go.wait()
            out.append(get(base, token, "/v1/api_keys", heavy(bulk)))

        threads = [threading.Thread(target=one) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seen.extend(out)
        return any(r.status_code == 503 for r in out)

    wait_for(burst, 60, "a request refused by the concurrency bound")
    busy = [r for r in seen if r.status_code == 503]
    for r in seen:
        assert r.status_code in (200, 503), r.text
    for r in busy:
        assert "max_concurrent_queries=1" in r.json()["error"] and r.headers["retry-after"] == "1"
    assert any(r.status_code == 200 for r in seen)
    assert refused(pipeline, "max_concurrent_queries") == len(busy)
    assert_one_line_logs(pipeline)


def test_the_reported_hostile_parameters_get_400_from_the_running_server(bulk, serve, pipeline):
    base, token = serve()
    for params, name in [({"from": "--5", "to": "1"}, "from"), ({"from": "\u00b2", "to": "1"}, "from"),
                         ({"timeframe": "1h", "limit": "\u00b2"}, "limit"),
                         ({"timeframe": "1h", "org": "' OR '1'='1"}, "org"),
                         ({"timeframe": "1h", "api_key": "x" * 65}, "api_key"),
                         ({"timeframe": "1h", "endpoint": "/v1/users/42"}, "endpoint")]:
        for path in ("/v1/summary", "/v1/summary.csv"):
            resp = get(base, token, path, params)
            assert resp.status_code == 400, (path, params, resp.text)
            assert resp.json()["error"].startswith(name), resp.text
    assert get(base, token, "/v1/summary", {"timeframe": "24h", "org": bulk}).json()["rows"][0]["requests"] > 0
    assert_one_line_logs(pipeline)
