"""The query API on the real stack: events published to Kafka, stored by the sink in the
embedded engine, asked for over HTTP (served by the sink process, which owns the
engine). Every answer is checked against what is computed here from the events
themselves; hostile callers are refused or get nothing of another org's.

Questions whose answers depend on the time they are asked at (a timeframe ends with the
current step) are asked of the same app in this process, on the same engine, with its
clock stopped (the `frozen` fixture): each answer is then exact for one known instant,
and no bucket boundary can pass between two questions. The others go to the sink over
HTTP (the `served` fixture). Either fixture brings the engine's owner into the state it
needs, so the tests run in any order."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from datetime import datetime, timedelta, timezone

import httpx
import pytest

from quotaflow.analytics.app import create_app
from quotaflow.schemas.clickhouse import retention
from quotaflow.schemas.clickhouse.client import connect
from quotaflow.schemas.redis_keys import ORG_TIER_FIELD, org_key
from tests.pipeline import Pipeline, event, publish, unique, wait_for
from tests.storage import latency_bounds

pytestmark = pytest.mark.stack
MINUTE, HOUR, DAY = 60_000, 3_600_000, 86_400_000
STATUSES = (200, 200, 200, 201, 204, 301, 400, 404, 429, 429, 500, 502, 503)
ENDPOINTS = (("GET", "/v1/orders"), ("GET", "/v1/orders/{id}"), ("POST", "/v1/orders"), ("DELETE", "/v1/users/{id}"))


class Data:
    """The events of this module, the tokens, and the API's address."""

    def __init__(self, settings):
        self.a, self.b, self.c = unique("api-a"), unique("api-b"), unique("api-c")
        self.tokens = {unique("tok"): self.a, unique("tok"): self.b, unique("tok-ops"): "*"}
        self.token = {org: tok for tok, org in self.tokens.items()}
        self.base = f"http://127.0.0.1:{settings.api_port}"
        self.events = []
        self.tier_of = {}  # event_id -> tier the org had when the event was stored
        self.now_ms = 0  # once every event is stored: the instant the frozen app answers at

    def make(self, org: str, n: int, seed: int) -> list:
        rnd = random.Random(seed)
        now = int(time.time() * 1000)
        out = []
        for i in range(n):
            # Most events recent, some up to four weeks old: every timeframe has its own answer.
            max_age = rnd.choices([50 * MINUTE, 20 * HOUR, 6 * DAY, 28 * DAY], weights=[4, 3, 2, 1])[0]
            method, endpoint = rnd.choice(ENDPOINTS)
            out.append(event(org, f"{org}-key-{rnd.randrange(3)}", now - rnd.randrange(max_age), method=method,
                             endpoint=endpoint, status=rnd.choice(STATUSES),
                             latency_ms=round(rnd.uniform(1, 2000), 3) + i * 1e-6,
                             request_bytes=rnd.randrange(10_000), response_bytes=rnd.randrange(100_000)))
        return out


@pytest.fixture(scope="module")
def data(live_stack):
    import redis

    d = Data(live_stack)
    r = redis.Redis.from_url(live_stack.redis_url)
    r.hset(org_key(d.a), ORG_TIER_FIELD, "PROFESSIONAL")
    r.hset(org_key(d.b), ORG_TIER_FIELD, "STARTER")  # d.c has no tier: the default, FREE
    os.environ["QUOTAFLOW_API_TOKENS"] = __import__("orjson").dumps(d.tokens).decode()
    pipeline = Pipeline(live_stack)
    try:
        pipeline.start("sink")
        first = d.make(d.a, 2500, 1) + d.make(d.b, 1000, 2) + d.make(d.c, 400, 3)
        asyncio.run(publish(live_stack, first))
        pipeline.wait_sink_caught_up()
        d.tier_of.update({e.event_id: {d.a: "PROFESSIONAL", d.b: "STARTER", d.c: "FREE"}[e.org_id] for e in first})
        # B moves to another tier: its later events are stored with the new one. A sink
        # started after the change reads it (a running sink, once its cached tier is
        # stale: tests/test_clickhouse_sink.py checks the cache).
        pipeline.stop("sink")
        r.hset(org_key(d.b), ORG_TIER_FIELD, "SCALE")
        pipeline.start("sink")
        second = d.make(d.b, 600, 4)
        asyncio.run(publish(live_stack, second))
        pipeline.wait_sink_caught_up()
        d.tier_of.update({e.event_id: "SCALE" for e in second})
        d.events = first + second
        d.now_ms = int(time.time() * 1000)
        d.pipeline = pipeline
        yield d
    finally:
        pipeline.stop_all()
        os.environ.pop("QUOTAFLOW_API_TOKENS", None)
        r.close()


class Api:
    """Where questions go: the sink's HTTP server (``app`` None) or the app in this process."""

    def __init__(self, data: Data, app=None):
        self.data, self.app = data, app

    def request(self, path: str, params, headers: dict[str, str]) -> httpx.Response:
        if self.app is None:
            return httpx.get(self.data.base + path, params=params, headers=headers, timeout=30)

        async def over_asgi() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://api", timeout=30) as client:
                return await client.get(path, params=params, headers=headers)

        return asyncio.run(over_asgi())


@pytest.fixture()
def served(data) -> Api:
    """The API as the sink serves it over HTTP (the sink started again if a test stopped it)."""
    if data.pipeline.pid("sink") is None:
        data.pipeline.start("sink")
    return Api(data)


@pytest.fixture()
def frozen(data, live_stack):
    """The API's app on the stored events, in this process, its clock stopped at
    data.now_ms. The sink is stopped first: the engine is open in one process at a time."""
    data.pipeline.stop("sink")
    url = live_stack.clickhouse_url
    client = connect(url)
    try:
        yield Api(data, create_app(data.tokens, retention.wanted_days(live_stack), client, lambda: connect(url),
                                   clock=lambda: data.now_ms / 1000))
    finally:
        client.close()


def get(api: Api, path: str, as_org: str | None = None, token: str | None = None, **params) -> httpx.Response:
    """GET with the token of as_org (None: the operator's token) or the token given."""
    token = token if token is not None else api.data.token[as_org or "*"]
    return api.request(path, params, {"authorization": f"Bearer {token}"})


def ask(api: Api, question: str, as_org: str | None = None, **params) -> dict:
    resp = get(api, f"/v1/{question}", as_org, **params)
    assert resp.status_code == 200, resp.text
    return resp.json()


def ms(iso: str) -> int:
    return round(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)


def in_range(events, answer, org=None, api_key=None, endpoint=None):
    lo, hi = ms(answer["from"]), ms(answer["to"])
    return [e for e in events if lo <= e.ts_ms < hi and (org is None or e.org_id == org)
            and (api_key is None or e.api_key_id == api_key) and (endpoint is None or e.endpoint == endpoint)]


def check_quantiles(row: dict, latencies: list[float]) -> None:
    for level, col in ((0.5, "p50_ms"), (0.95, "p95_ms"), (0.99, "p99_ms")):
        lo, hi = latency_bounds(latencies, level)
        assert lo <= row[col] <= hi, (col, row[col], lo, hi)


@pytest.mark.parametrize("timeframe, step, source", [("1h", MINUTE, "requests_1m"), ("24h", HOUR, "requests_1h"),
                                                     ("7d", HOUR, "requests_1h"), ("30d", DAY, "requests_1d")])
def test_answers_for_an_org_match_what_its_events_say(data, frozen, timeframe, step, source):
    org = data.a
    answers = {q: ask(frozen, q, org, timeframe=timeframe, limit=1000)
               for q in ("summary", "volume", "latency", "status", "endpoints", "orgs", "tiers", "api_keys",
                         "denials")}
    span = {"1h": HOUR, "24h": DAY, "7d": 7 * DAY, "30d": 30 * DAY}[timeframe]
    org_level = {"summary", "volume", "latency", "orgs", "tiers"}  # read from the org-level rollup
    for q, a in answers.items():
        end = ms(a["to"])  # the end of the step the clock is in
        assert end == (data.now_ms // step + 1) * step and ms(a["from"]) == end - span
        want = source.replace("requests_", "requests_org_") if q in org_level else source
        want = source.replace("requests_", "requests_endpoint_") if q == "endpoints" else want  # endpoint-level
        if source != "requests_1m":  # status- and key-level rollups per hour and day only
            want = source.replace("requests_", "requests_status_") if q in ("status", "status_series") else want
            want = source.replace("requests_", "requests_key_") if q in ("api_keys", "denials") else want
        assert (a["source"], a["org"]) == (want, org)
    evs = in_range(data.events, answers["summary"], org)
    assert len(evs) > 0

    s = answers["summary"]["rows"][0]
    assert (s["requests"], s["errors"], s["denials"], s["request_bytes"], s["response_bytes"]) == (
        len(evs), sum(e.status >= 500 for e in evs), sum(e.status == 429 for e in evs),
        sum(e.request_bytes for e in evs), sum(e.response_bytes for e in evs))
    assert s["error_rate"] == pytest.approx(s["errors"] / len(evs))
    check_quantiles(s, [e.latency_ms for e in evs])

    start, end = ms(answers["volume"]["from"]), ms(answers["volume"]["to"])
    per_bucket = defaultdict(list)
    for e in evs:
        per_bucket[e.ts_ms // step * step].append(e)
    vol = answers["volume"]["rows"]
    assert [ms(r["bucket"]) for r in vol] == list(range(start, end, step))  # every bucket, empty ones too
    assert [(r["requests"], r["errors"], r["denials"]) for r in vol] == [
        (len(b), sum(e.status >= 500 for e in b), sum(e.status == 429 for e in b))
        for b in (per_bucket.get(t, []) for t in range(start, end, step))]

    lat = answers["latency"]["rows"]
    assert [(ms(r["bucket"]), r["requests"]) for r in lat] == sorted((t, len(b)) for t, b in per_bucket.items())
    for r in lat:
        check_quantiles(r, [e.latency_ms for e in per_bucket[ms(r["bucket"])]])

    codes = Counter(e.status for e in evs)
    classes = Counter(e.status // 100 for e in evs)
    assert [(r["status_class"], r["status"], r["requests"], r["class_requests"]) for r in answers["status"]["rows"]] \
        == [(f"{c // 100}xx", c, n, classes[c // 100]) for c, n in sorted(codes.items())]
    for r in answers["status"]["rows"]:
        assert r["rate"] == pytest.approx(codes[r["status"]] / len(evs))
        assert r["class_rate"] == pytest.approx(classes[r["status"] // 100] / len(evs))

    by_endpoint = defaultdict(list)
    for e in evs:
        by_endpoint[(e.method, e.endpoint)].append(e)
    want = sorted(((m, ep, len(b), sum(e.status >= 500 for e in b)) for (m, ep), b in by_endpoint.items()),
                  key=lambda t: (-t[2], t[1], t[0]))
    got = answers["endpoints"]["rows"]
    assert [(r["method"], r["endpoint"], r["requests"], r["errors"]) for r in got] == want
    for r in got:
        lo, hi = latency_bounds([e.latency_ms for e in by_endpoint[(r["method"], r["endpoint"])]], 0.95)
        assert lo <= r["p95_ms"] <= hi

    keys = Counter(e.api_key_id for e in evs)
    assert [(r["api_key_id"], r["requests"]) for r in answers["api_keys"]["rows"]] == sorted(
        keys.items(), key=lambda kv: (-kv[1], kv[0]))
    denials = Counter(e.api_key_id for e in evs if e.status == 429)
    assert [(r["api_key_id"], r["denials"], r["requests"]) for r in answers["denials"]["rows"]] == sorted(
        ((k, n, keys[k]) for k, n in denials.items()), key=lambda t: (-t[1], t[0]))

    assert [(r["org_id"], r["requests"]) for r in answers["orgs"]["rows"]] == [(org, len(evs))]  # only its own
    assert [(r["tier"], r["orgs"], r["requests"]) for r in answers["tiers"]["rows"]] == [("PROFESSIONAL", 1, len(evs))]


def test_operators_rank_orgs_and_see_usage_per_tier_at_request_time(data, served):
    a = ask(served, "orgs", timeframe="30d", limit=1000)
    evs = in_range(data.events, a)
    ours = {data.a, data.b, data.c}
    counts = Counter(e.org_id for e in evs)
    ranked = [(r["org_id"], r["requests"]) for r in a["rows"] if r["org_id"] in ours]
    assert ranked == sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    # B changed tier between its two sets of events: each counts under the tier of its time.
    t = ask(served, "tiers", timeframe="30d", org=data.b)
    b_tiers = Counter(data.tier_of[e.event_id] for e in in_range(data.events, t, data.b))
    assert {r["tier"]: r["requests"] for r in t["rows"]} == dict(b_tiers) and set(b_tiers) == {"STARTER", "SCALE"}
    c = ask(served, "tiers", timeframe="30d", org=data.c)
    assert [(r["tier"], r["requests"]) for r in c["rows"]] == [("FREE", len(in_range(data.events, c, data.c)))]


def test_an_explicit_range_off_the_minute_is_answered_exactly_from_the_raw_events(data, served):
    now = int(time.time() * 1000)
    lo, hi = now - 3 * HOUR - 1234, now - 17_777
    hi_iso = datetime.fromtimestamp(hi // 1000, tz=timezone(timedelta(hours=2))).replace(
        microsecond=hi % 1000 * 1000).isoformat()  # any timezone will do
    a = ask(served, "summary", data.a, **{"from": str(lo), "to": hi_iso})
    assert (a["source"], ms(a["from"]), ms(a["to"])) == ("requests", lo, hi)
    evs = [e for e in data.events if e.org_id == data.a and lo <= e.ts_ms < hi]
    assert a["rows"][0]["requests"] == len(evs)
    e = ask(served, "endpoints", data.a, **{"from": str(lo), "to": str(hi)}, endpoint="/v1/orders")
    want = Counter(x.method for x in evs if x.endpoint == "/v1/orders")
    assert {r["method"]: r["requests"] for r in e["rows"]} == dict(want)


def test_csv_exports_hold_the_same_rows_as_the_json_answers(data, frozen):
    for question in ("volume", "status", "endpoints", "api_keys", "summary"):
        answer = ask(frozen, question, data.a, timeframe="24h")
        resp = get(frozen, f"/v1/{question}.csv", data.a, timeframe="24h")  # the same instant: the same time range
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/csv")
        header, *rows = list(csv.reader(io.StringIO(resp.text)))
        assert header == answer["columns"]
        assert len(rows) == len(answer["rows"])
        for cells, row in zip(rows, answer["rows"], strict=True):
            assert [type(row[c])(cell) for c, cell in zip(header, cells, strict=True)] == [row[c] for c in header]


HOSTILE = ["' OR '1'='1", "x'; DROP TABLE requests; --", "%", "*", ".*", "_", "{org:String}",
           "\\' OR 1=1 --", "' UNION SELECT name FROM system.tables --", "\u0430cme", "%00"]


def test_a_caller_scoped_to_one_org_never_reads_another(data, served):
    a, b = data.a, data.b
    baseline = ask(served, "summary", a, timeframe="30d")["rows"][0]["requests"]
    # Naming another org, or anything that is not exactly its own, is refused.
    for other in [b, data.c, b.upper(), f" {a}", f"{a}%", f"{a}' OR '1'='1", *HOSTILE]:
        for path in ("/v1/summary", "/v1/orgs", "/v1/api_keys.csv"):
            resp = get(served, path, a, timeframe="30d", org=other)
            assert resp.status_code == 403, (path, other, resp.text)
            assert b not in resp.text
    # A filter naming another org's key matches nothing of it.
    b_key = next(e.api_key_id for e in data.events if e.org_id == b)
    s = ask(served, "summary", a, timeframe="30d", api_key=b_key)
    assert s["org"] == a and s["rows"][0]["requests"] == 0
    assert ask(served, "api_keys", a, timeframe="30d", api_key=b_key)["rows"] == []
    # Keys and endpoints that no event could carry (outside the id rule, not a route
    # template) are refused with the reason rather than answered with nothing.
    for value in [b_key, *HOSTILE]:
        for name in ("api_key", "endpoint"):
            if name == "api_key" and value == b_key:
                continue
            for question in ("summary", "api_keys"):
                resp = get(served, f"/v1/{question}", a, timeframe="30d", **{name: value})
                assert resp.status_code == 400 and resp.json()["error"].startswith(name), (name, value, resp.text)
                assert b not in resp.text.replace(value, "")  # nothing of b's but what the caller sent
    # Every question of a scoped caller is about its org alone.
    for q in ("orgs", "tiers"):
        rows = ask(served, q, a, timeframe="30d")["rows"]
        assert sum(r["requests"] for r in rows) == baseline
    assert {r["api_key_id"] for r in ask(served, "api_keys", a, timeframe="30d", limit=1000)["rows"]} \
        == {e.api_key_id for e in data.events if e.org_id == a}
    # An operator's hostile org filter is refused with the reason: no org could have that id.
    for value in HOSTILE:
        resp = get(served, "/v1/orgs", timeframe="30d", org=value)
        assert resp.status_code == 400 and resp.json()["error"].startswith("org"), (value, resp.text)
    # Nothing above changed anything.
    assert ask(served, "summary", a, timeframe="30d")["rows"][0]["requests"] == baseline


def test_requests_without_a_valid_token_or_with_malformed_parameters_are_refused(data, served):
    assert httpx.get(data.base + "/v1/summary", params={"timeframe": "1h"}).status_code == 401
    for token in ("nope", data.token[data.a] + "x", data.token[data.a][:-1], data.token[data.a].upper()):
        assert get(served, "/v1/summary", token=token, timeframe="1h").status_code == 401
    for header in ("Bearer", f"Basic {data.token[data.a]}", data.token[data.a]):
        resp = httpx.get(data.base + "/v1/summary", params={"timeframe": "1h"}, headers={"authorization": header})
        assert resp.status_code == 401, header
    bad = [
        [("timeframe", "1h"), ("org", data.a), ("org", data.b)],  # given twice
        [("timeframe", "1h"), ("org_id", data.b)],  # unknown
        [("timeframe", "1h"), ("org[]", data.b)],
        [("timeframe", "2h")],
        [("timeframe", "1h"), ("from", "0"), ("to", "1")],
        [("from", "yesterday"), ("to", "1")],
        [("from", "2025-01-01T00:00:00"), ("to", "2025-01-02T00:00:00")],  # no timezone
        [("from", "1000"), ("to", "10")],
        [("timeframe", "1h"), ("limit", "0")],
        [("timeframe", "1h"), ("limit", "1 OR 1=1")],
        [("timeframe", "1h"), ("api_key", "x" * 300)],
        [],
        # Reported in issue 11 as 500s with a traceback: str.isdigit() takes "²".
        [("from", "--5"), ("to", "1")],
        [("from", "\u00b2"), ("to", "1")],
        [("timeframe", "1h"), ("limit", "\u00b2")],
    ]
    for params in bad:
        resp = httpx.get(data.base + "/v1/summary", params=params,
                         headers={"authorization": f"Bearer {data.token[data.a]}"})
        assert resp.status_code == 400, (params, resp.text)
        assert resp.json()["error"], resp.text  # with the reason
    assert get(served, "/v1/nosuchquestion", data.a, timeframe="1h").status_code == 404
    assert get(served, "/v1/summary;DROP TABLE requests", data.a, timeframe="1h").status_code == 404
    assert "Exception in ASGI application" not in data.pipeline.logs("sink", lines=100_000)  # no 500 anywhere


def test_quotaflow_api_serves_the_same_answers_on_its_own(data, served):
    """`quotaflow api` alone, on the engine the (now stopped) sink used."""
    expected = ask(served, "api_keys", data.a, timeframe="30d")
    data.pipeline.stop("sink")
    proc = subprocess.Popen([sys.executable, "-m", "quotaflow", "api"], env=os.environ.copy(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        def up() -> bool:
            try:
                return httpx.get(data.base + "/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return proc.poll() is not None
        wait_for(up, 60, "quotaflow api to serve")
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        got = ask(served, "api_keys", data.a, timeframe="30d")
        assert (got["rows"], got["from"]) == (expected["rows"], expected["from"])
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
