"""Metrics served one way (quotaflow/core/metrics.py): /metrics mounted on the HTTP apps
that exist, the gateway's check server and the query API, in the format of the workers'
own ports. On the real stack: `quotaflow gateway` and the sink (which serves the API)
as subprocesses, scraped over HTTP."""

from __future__ import annotations

import os
import sys

import httpx
import orjson
import pytest

from quotaflow.core import metrics
from quotaflow.deploy.procs import Proc
from tests.key_records import SECRETS_ENV, new_key
from tests.pipeline import unique, wait_for

pytestmark = pytest.mark.stack
CHECKS = "quotaflow_gateway_checks_total"


def _up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture()
def gateway(live_stack, tmp_path):
    """`quotaflow gateway` on a port of its own; yields its base URL."""
    port = live_stack.gateway_port + 2
    log_path = tmp_path / "gateway.log"
    proc = Proc("gateway-metrics", tmp_path / "run")
    proc.start([sys.executable, "-m", "quotaflow", "gateway"], log_path, marker="quotaflow gateway",
               env={**os.environ, **SECRETS_ENV, "QUOTAFLOW_GATEWAY_PORT": str(port),
                    "QUOTAFLOW_GATEWAY_TIMEOUT_MS": "2000"})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _up(base + "/healthz"), 30, "the gateway to serve", log_path.read_text)
        yield base
    finally:
        proc.stop()


def test_the_gateways_checks_counter_is_scraped_after_checks(gateway, redis_client):
    """quotaflow_gateway_checks_total was counted and never served; now /metrics of the
    check server serves it, one count per check by its result (a key refused before the
    limits by its outcome), and never a key."""
    org = unique("org")
    key, _ = new_key(redis_client, org)
    mistyped = key[:-1] + ("x" if key[-1] != "x" else "y")
    before = metrics.parse(httpx.get(gateway + "/metrics", timeout=10).text)
    with httpx.Client(base_url=gateway, timeout=10) as client:
        # FREE allows 10 a minute: 14 checks of one key are some admitted, some refused
        # (how many of each depends on the minute they fall in; the counter must agree).
        statuses = [client.get("/check", headers={"Authorization": f"Bearer {key}"}).status_code for _ in range(14)]
        malformed = [client.get("/check", headers={"Authorization": f"Bearer {mistyped}"}).status_code
                     for _ in range(3)]
    assert set(statuses) <= {200, 429} and 429 in statuses and malformed == [401] * 3
    text = httpx.get(gateway + "/metrics", timeout=10).text
    after = metrics.parse(text)
    for result, count in (("allowed", statuses.count(200)), ("denied", statuses.count(429)), ("malformed_key", 3)):
        sample = f'{CHECKS}{{result="{result}"}}'
        assert after.get(sample, 0) - before.get(sample, 0) == count, (result, after)
    assert key not in text and mistyped not in text


def test_metrics_endpoints_refuse_nothing_a_client_can_send_with_a_500(gateway):
    """What a scraper does not send (a query string that is not UTF-8, a header value
    that is not ASCII, another method) gets the metrics or a 405, never a 500."""
    with httpx.Client(base_url=gateway, timeout=10) as client:
        for resp in (client.get("/metrics?%ff%fe=1&name[]=x"),
                     client.get("/metrics", headers={"Accept": b"text/plain; q=\xff", "Accept-Encoding": "gzip"}),
                     client.head("/metrics")):
            assert resp.status_code == 200, resp.text
        assert CHECKS in client.get("/metrics", headers={"Accept-Encoding": "gzip"}).text  # httpx decodes it
        assert client.post("/metrics").status_code == 405


def test_the_query_api_serves_the_metrics_of_its_process(live_stack, pipeline):
    """With the embedded engine the sink serves the API: the API's /metrics and the sink's
    own port read the one registry of that process, in one format."""
    token = unique("tok-ops")
    pipeline.start("sink", QUOTAFLOW_API_TOKENS=orjson.dumps({token: "*"}).decode())
    base = f"http://127.0.0.1:{live_stack.api_port}"
    resp = httpx.get(base + "/metrics", timeout=10)  # no token: like /healthz
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    served = metrics.parse(resp.text)
    assert served["quotaflow_sink_ready"] == 1.0
    assert served["quotaflow_api_queries_running"] == 0.0 and "quotaflow_api_queries_waiting" in served
    port = metrics.scrape(live_stack.sink_metrics_port)
    always = {"quotaflow_sink_ready", "quotaflow_sink_rows_inserted_total", "quotaflow_sink_buffered_records",
              "quotaflow_sink_insert_seconds_count", "quotaflow_api_queries_running", "quotaflow_api_queries_waiting"}
    assert always <= set(served) and always <= set(port)
