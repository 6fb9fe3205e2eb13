"""The query API against hostile callers and heavy questions: the real Starlette app,
asked over httpx's ASGI transport, on a real embedded engine (chDB) holding enough rows
for a question to take measurable time and memory.

Bad parameters and headers get a 4xx with a reason, never a 5xx (a Hypothesis search
over arbitrary query strings and headers); the bounds on query time, memory and
concurrency answer 503 naming the bound they hit."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta, timezone
from urllib.parse import quote, unquote, urlencode

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from quotaflow.analytics import queries
from quotaflow.analytics.app import MAX_VALUE_CHARS, PARAMS, create_app
from quotaflow.analytics.queries import Bounds
from quotaflow.analytics.window import for_timeframe
from quotaflow.core.settings import Settings
from quotaflow.schemas.clickhouse import retention
from quotaflow.schemas.clickhouse.client import connect
from quotaflow.schemas.clickhouse.migrate import migrate
from tests.storage import HOUR, insert_bulk

OPS, ACME = "tok-ops-0123456789", "tok-acme-0123456789"
TOKENS = {OPS: "*", ACME: "acme"}
RETENTION = retention.wanted_days(Settings())
BULK_ROWS = 300_000  # org "bulk": enough for a raw-table question to take a few ms and MBs


@pytest.fixture(scope="module")
def bulk_engine(tmp_path_factory):
    url = f"chdb://{tmp_path_factory.mktemp('hostile') / 'clickhouse'}"
    client = connect(url)
    migrate(client)
    insert_bulk(client, "bulk", BULK_ROWS, int(time.time() * 1000), every_1000th="acme")
    yield url, client
    client.close()


def make_app(bulk_engine, **kw):
    url, client = bulk_engine
    return create_app(TOKENS, RETENTION, client, lambda: connect(url), **kw)


async def _get(app, path: str, params=None, headers=None) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client:
        return await client.get(path, params=params, headers=headers)


def get(app, path: str, params=None, token: str | None = OPS, headers=None) -> httpx.Response:
    headers = dict(headers or {})
    if token is not None:
        headers.setdefault("authorization", f"Bearer {token}")
    return asyncio.run(_get(app, path, params, headers))


def raw_range(hours: float = 19) -> dict[str, str]:
    """A range off the minute: only the raw table answers it (the heaviest reads)."""
    now = int(time.time() * 1000)
    return {"from": str(now - int(hours * HOUR) - 1), "to": str(now)}


def reason(resp: httpx.Response) -> str:
    body = resp.json()
    assert isinstance(body.get("error"), str) and body["error"], resp.text
    return body["error"]


# --- bad parameters: 400 naming the parameter, never a 500 -----------------------------

@pytest.mark.parametrize("params, names", [
    ({"from": "--5", "to": "1"}, "from"),
    ({"from": "\u00b2", "to": "1"}, "from"),  # "²": str.isdigit() says yes
    ({"from": "1", "to": "\u0663"}, "to"),  # Arabic-Indic three
    ({"from": "1", "to": "\uff11\uff12"}, "to"),  # fullwidth digits
    ({"from": "9" * 17, "to": "1"}, "from"),
    ({"from": "9" * 256, "to": "1"}, "from"),
    ({"from": "-" * 256, "to": "1"}, "from"),
    ({"from": "2025-01-01T00:00:00", "to": "1"}, "from"),  # no timezone
    ({"from": "0001-01-01T00:00:00+23:59", "to": "1"}, "from"),
    ({"from": "9999-12-31T23:59:59-23:59", "to": "1"}, "from"),
    ({"from": "2025-13-01T00:00:00Z", "to": "1"}, "from"),
    ({"from": "\u0662\u0660\u0662\u0665-01-01T00:00:00Z", "to": "1"}, "from"),
    ({"timeframe": "1h", "limit": "\u00b2"}, "limit"),
    ({"timeframe": "1h", "limit": "+5"}, "limit"),
    ({"timeframe": "1h", "limit": " 5"}, "limit"),
    ({"timeframe": "1h", "limit": "9" * 200}, "limit"),
    ({"timeframe": "1h", "limit": "1001"}, "limit"),
    ({"timeframe": "\u00b9h"}, "timeframe"),
    ({"timeframe": ""}, "timeframe"),
    ({"timeframe": "1h", "org": "' OR '1'='1"}, "org"),
    ({"timeframe": "1h", "org": ""}, "org"),
    ({"timeframe": "1h", "org": "a" * 65}, "org"),
    ({"timeframe": "1h", "org": "acme}:x"}, "org"),
    ({"timeframe": "1h", "api_key": "k 1"}, "api_key"),
    ({"timeframe": "1h", "api_key": "\u0430cme"}, "api_key"),  # Cyrillic a
    ({"timeframe": "1h", "api_key": "%"}, "api_key"),
    ({"timeframe": "1h", "endpoint": "/v1/users/42"}, "endpoint"),  # a raw id: never stored
    ({"timeframe": "1h", "endpoint": "v1/users"}, "endpoint"),
    ({"timeframe": "1h", "endpoint": "/v1/users?id=1"}, "endpoint"),
    ({"timeframe": "1h", "endpoint": "/v1/\u00fcsers"}, "endpoint"),
    ({"timeframe": "1h", "x" * 300: "1"}, "parameter"),
    ({"timeframe": "1h", "api_key": "k" * (MAX_VALUE_CHARS + 1)}, "api_key"),
])
def test_bad_parameters_are_answered_400_naming_the_parameter(bulk_engine, params, names):
    app = make_app(bulk_engine)
    for path in ("/v1/summary", "/v1/endpoints.csv"):
        resp = get(app, path, params)
        assert resp.status_code == 400, (path, params, resp.text)
        assert names in reason(resp), (params, resp.text)


def test_filters_that_could_match_answer_and_a_scoped_caller_naming_another_org_is_forbidden(bulk_engine):
    app = make_app(bulk_engine)
    # Valid ids and route templates are answered, with nothing when nothing matches.
    for params in ({"api_key": "no-such-key"}, {"endpoint": "/v1/orders/{id}"}, {"org": "globex"}):
        resp = get(app, "/v1/summary", {"timeframe": "24h", **params})
        assert resp.status_code == 200 and resp.json()["rows"][0]["requests"] == 0, (params, resp.text)
    assert get(app, "/v1/summary", {"timeframe": "24h", "org": "acme"}).json()["rows"][0]["requests"] > 0
    # A scoped caller naming any org but its own is refused as before: 403, whatever the value.
    for org in ("bulk", "' OR '1'='1", "acme}:x", ""):
        resp = get(app, "/v1/summary", {"timeframe": "24h", "org": org}, token=ACME)
        assert resp.status_code == 403, (org, resp.text)
        assert "bulk" not in resp.text or org == "bulk"


@pytest.mark.parametrize("headers", [
    {},
    {"authorization": ""},
    {"authorization": "Bearer"},
    {"authorization": "Bearer "},
    {"authorization": "Basic " + OPS},
    {"authorization": OPS},
    {"authorization": "Bearer " + OPS + "x"},
    {"authorization": "Bearer " + "x" * 100_000},
    {"authorization": b"Bearer \xff\xfe\x00"},
    {"authorization": ("Bearer \u00e9" + OPS).encode("latin-1")},
])
def test_requests_without_a_usable_token_get_401_with_the_reason(bulk_engine, headers):
    resp = get(make_app(bulk_engine), "/v1/summary", {"timeframe": "1h"}, token=None, headers=headers)
    assert resp.status_code == 401, resp.text
    assert reason(resp) and resp.headers["www-authenticate"].startswith("Bearer")


def test_a_token_given_twice_is_refused(bulk_engine):
    async def twice() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_app(bulk_engine)), base_url="http://api") as c:
            return await c.get("/v1/summary", params={"timeframe": "1h"},
                               headers=[("authorization", f"Bearer {OPS}"), ("authorization", f"Bearer {ACME}")])
    resp = asyncio.run(twice())
    assert resp.status_code == 401 and "more than once" in reason(resp)


# Values a caller may send: anything, and near misses of what the API takes.
_NEAR = ["--5", "\u00b2", "\u0663", "1e3", "0x10", " 1", "1 ", "+1", "-0", "", "9" * 17, "NaN", "inf", "1h", "30d",
         "24H", "*", "%", "%00", "\x00", "acme", "bulk", "k1", "/v1/e1", "/v1/users/{id}", "/v1/users/42",
         "' OR 1=1 --", "{org:String}", "2025-01-01T00:00:00Z", "2025-01-01T00:00:00", "2025-01-01",
         "9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59", "1000", "0"]
_offsets = st.timedeltas(min_value=-timedelta(hours=23, minutes=59), max_value=timedelta(hours=23, minutes=59))


def weighted(*pairs: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """One of the strategies, each drawn about ``weight`` times as often as a weight of 1
    (st.one_of would draw them alike)."""
    return st.sampled_from([s for weight, s in pairs for _ in range(weight)]).flatmap(lambda s: s)


values = weighted(
    (4, st.sampled_from(_NEAR)),
    (3, st.text(st.characters(categories=("Nd", "No", "Pd")), min_size=1, max_size=6)),  # digits of any script
    (2, st.text(max_size=40)),
    (1, st.text(max_size=300)),
    (1, st.integers(min_value=-10**20, max_value=10**20).map(str)),
    (1, st.integers(min_value=0, max_value=4_200_000_000_000).map(str)),
    (1, st.datetimes(timezones=st.none() | _offsets.map(timezone)).map(lambda d: d.isoformat())),
)
_now_ms = int(time.time() * 1000)
plausible = {
    "timeframe": st.sampled_from(["1h", "24h", "7d", "30d"]),
    "from": st.integers(_now_ms - 40 * 24 * HOUR, _now_ms).map(str),
    "to": st.integers(_now_ms - HOUR, _now_ms + HOUR).map(str),
    "org": st.sampled_from(["acme", "bulk", "globex"]),
    "api_key": st.sampled_from(["k1", "k2", "no-such-key"]),
    "endpoint": st.sampled_from(["/v1/e1", "/v1/orders/{id}"]),
    "limit": st.integers(1, 1000).map(str),
}
# A parameter: mostly a known name with a value that may well be valid, else anything.
param = weighted(
    (2, st.sampled_from(sorted(PARAMS)).flatmap(lambda n: st.tuples(st.just(n), plausible[n]))),
    (2, st.tuples(st.sampled_from(sorted(PARAMS)), values)),
    (1, st.tuples(st.text(max_size=12), values)),
)
questions = st.sampled_from(list(queries.QUESTIONS))
paths = weighted((3, questions), (1, st.text(min_size=1, max_size=20))).flatmap(
    lambda q: st.sampled_from([f"/v1/{q}", f"/v1/{q}.csv"]))
valid_auth = st.sampled_from([f"Bearer {OPS}", f"Bearer {ACME}", f"bearer  {OPS} "]).map(str.encode)
auth = weighted((3, valid_auth), (1, st.binary(max_size=80)))
raw_query = st.text(alphabet=st.sampled_from("abcdefimorstz0123456789%&=;+-_.:/{}[]' \u00b2"), max_size=60)


def valid_but_one(data) -> list[tuple[str, str]]:
    """A valid time range and filters, with any one parameter's value drawn from anything."""
    # The parsed ones (numbers, times) twice as often: they are where parsers differ.
    name = data.draw(st.sampled_from(sorted(PARAMS) + ["from", "to", "limit"]), label="name")
    value = data.draw(weighted((1, plausible[name]), (2, st.sampled_from(_NEAR)), (3, values)), label="value")
    if name in ("from", "to") or data.draw(st.booleans(), label="from/to"):
        params = {"from": data.draw(plausible["from"]), "to": data.draw(plausible["to"])}
    else:
        params = {"timeframe": data.draw(plausible["timeframe"])}
    if data.draw(st.booleans(), label="a filter"):
        extra = data.draw(st.sampled_from(["org", "api_key", "endpoint", "limit"]))
        params[extra] = data.draw(plausible[extra])
    params[name] = value
    return list(params.items())


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(path=paths, params=st.lists(param, max_size=4), authorization=auth,
       raw=weighted((3, st.none()), (1, raw_query), (1, st.binary(max_size=60))), data=st.data())
def test_no_query_string_or_header_gets_a_5xx_and_every_4xx_says_why(bulk_engine, path, params, authorization, raw, data):
    app = make_app(bulk_engine)
    if data.draw(st.booleans(), label="a valid request but for one value"):
        path = data.draw(questions.flatmap(lambda q: st.sampled_from([f"/v1/{q}", f"/v1/{q}.csv"])), label="path")
        authorization, params, raw = data.draw(valid_auth), valid_but_one(data), None
    if raw is None:  # as a client library sends it
        query = urlencode(params).encode()
    else:  # whatever bytes a hostile client puts on the request line
        query = raw.encode() if isinstance(raw, str) else raw

    status, headers, body = asyncio.run(asgi_get(app, "/v1/" + quote(path.removeprefix("/v1/"), safe=""), query,
                                                 [(b"authorization", authorization)]))
    event(f"status {status}")
    assert status < 500, (path, params, raw, authorization, status, body[:500])
    if status >= 400:
        message = orjson.loads(body)["error"]
        assert isinstance(message, str) and message, body
        if status == 400:  # names what was wrong: a parameter, or the time range as a whole
            assert any(p in message for p in PARAMS | {"parameter"}), message
    else:
        assert status == 200, body[:500]
        if path.endswith(".csv"):
            assert headers[b"content-type"].startswith(b"text/csv")
        else:
            answer = orjson.loads(body)
            assert set(answer) >= {"rows", "columns", "from", "to", "source"}
            if authorization.strip().split()[-1:] == [ACME.encode()]:
                assert answer["org"] == "acme"  # a scoped caller's answer is always about its own org


async def asgi_get(app, path: str, query: bytes, headers: list[tuple[bytes, bytes]]) -> tuple[int, dict, bytes]:
    """One GET straight through the ASGI interface, the query string as raw bytes."""
    out: dict = {"body": b""}

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        if message["type"] == "http.response.start":
            out["status"], out["headers"] = message["status"], dict(message["headers"])
        elif message["type"] == "http.response.body":
            out["body"] += message.get("body", b"")

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": "GET", "scheme": "http", "path": unquote(path), "raw_path": path.encode(), "root_path": "",
             "query_string": query, "headers": headers, "client": ("127.0.0.1", 1), "server": ("api", 80)}
    await app(scope, receive, send)
    return out["status"], out["headers"], out["body"]


# --- query bounds: time, memory, concurrency -------------------------------------------

def test_a_timeframe_ends_with_the_step_the_apps_clock_is_in(bulk_engine):
    """The app asks its clock, not the wall's, what time it is: a timeframe's range is the
    one for_timeframe gives for that instant, whenever the test runs."""
    now_ms = 1_764_000_000_000 + 37 * 60_000 + 12_345  # some time in the middle of an hour
    app = make_app(bulk_engine, clock=lambda: now_ms / 1000)
    for timeframe in ("1h", "24h", "7d", "30d"):
        want = for_timeframe(timeframe, now_ms, RETENTION)
        for path in ("/v1/summary", "/v1/summary.csv"):
            resp = get(app, path, {"timeframe": timeframe})
            assert resp.status_code == 200, resp.text
            got = resp.json() if path.endswith("summary") else {
                k: resp.headers[f"x-quotaflow-{k}"] for k in ("from", "to", "source")}
            assert (iso_ms(got["from"]), iso_ms(got["to"]), got["source"]) == (
                want.start_ms, want.end_ms, want.table.name.replace("requests_", "requests_org_")), (timeframe, got)


def iso_ms(text: str) -> int:
    return round(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


def test_a_query_over_its_time_bound_is_stopped_and_answered_503_naming_it(bulk_engine):
    generous = make_app(bulk_engine)
    tight = make_app(bulk_engine, bounds=Bounds(max_execution_time_s=0.001))
    params = {**raw_range(), "org": "bulk", "limit": "1000"}
    for path in ("/v1/endpoints", "/v1/api_keys", "/v1/endpoints.csv"):
        assert get(generous, path, params).status_code == 200  # the question itself is fine
        resp = get(tight, path, params)
        assert resp.status_code == 503, (path, resp.text)
        assert "max_execution_time=0.001s" in reason(resp)


def test_a_query_over_its_memory_bound_is_stopped_and_answered_503_naming_it(bulk_engine):
    tight = make_app(bulk_engine, bounds=Bounds(max_memory_usage=1_000_000))
    params = {**raw_range(), "org": "bulk", "limit": "1000"}
    for path in ("/v1/api_keys", "/v1/api_keys.csv"):
        resp = get(tight, path, params)
        assert resp.status_code == 503, (path, resp.text)
        assert "max_memory_usage=1000000 bytes" in reason(resp)
    # Within the bound, the same app answers: the bound is per query, not a broken client.
    small = get(tight, "/v1/summary", {"timeframe": "1h", "org": "acme"})
    assert small.status_code == 200, small.text


def test_every_query_carries_its_bounds_and_reads_only():
    b = Bounds(max_execution_time_s=2.5, max_memory_usage=12345)
    assert b.settings() == {"max_execution_time": 2.5, "timeout_overflow_mode": "throw", "max_memory_usage": 12345,
                            "readonly": 2}


def test_the_engine_enforces_each_bound_setting(bulk_engine):
    """What the API relies on, asked of chDB directly: each setting stops a query, and
    bound_hit names the one that did."""
    url, _ = bulk_engine
    client = connect(url)  # a client of its own: the app's shared one stays as the API leaves it
    try:
        for sql, settings_, error in [
            ("SELECT count() FROM numbers(10000000000)", {"max_execution_time": 0.05}, "TIMEOUT_EXCEEDED"),
            ("SELECT uniqExact(number) FROM numbers(10000000)", {"max_memory_usage": 1_000_000},
             "MEMORY_LIMIT_EXCEEDED"),
            ("CREATE TABLE hostile_probe (a UInt8) ENGINE = Memory", {"readonly": 2}, "READONLY"),
        ]:
            with pytest.raises(Exception, match=error):
                client.query(sql, settings=settings_)
        # each query against one tight bound, the other generous: on a loaded machine a tight
        # time bound could otherwise stop the memory query first
        for sql, b, setting in [
            ("SELECT count() FROM numbers(10000000000)", Bounds(max_execution_time_s=0.05), "max_execution_time"),
            ("SELECT uniqExact(number) FROM numbers(10000000)",
             Bounds(max_execution_time_s=600, max_memory_usage=1_000_000), "max_memory_usage")]:
            with pytest.raises(Exception) as caught:
                client.query(sql, settings=b.settings())
            hit = queries.bound_hit(caught.value, b)
            assert hit is not None and hit.setting == setting, (sql, str(caught.value)[:300])
        # An answer as large as any the API gives (LIMIT 1000; 3661 daily buckets) is not refused.
        tight = Bounds(max_execution_time_s=5, max_memory_usage=1_000_000)
        assert len(client.query("SELECT number FROM numbers(5000)", settings=tight.settings()).result_rows) == 5000
    finally:
        client.close()


def waiting() -> float:
    return REGISTRY.get_sample_value("quotaflow_api_queries_waiting") or 0.0


def _asgi_get(path: str, query: str, token: str) -> dict:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
            "method": "GET", "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
            "query_string": query.encode(), "headers": [(b"authorization", f"Bearer {token}".encode())],
            "client": ("127.0.0.1", 1), "server": ("api", 80)}


def test_queries_beyond_the_concurrency_bound_wait_briefly_then_get_503_with_retry_after(bulk_engine):
    """An export whose reader has stopped reading holds its slot (a real slow client, at
    the ASGI level); with one slot, others wait up to queue_wait_s, then get 503."""

    async def scenario(app, wait_then_free: bool):
        reading = asyncio.Event()  # the export has sent its first chunk
        go_on = asyncio.Event()  # the slow reader reads again
        statuses = []

        async def receive():
            await asyncio.Event().wait()  # never disconnects

        async def send(message):
            if message["type"] == "http.response.start":
                statuses.append(message["status"])
            if message["type"] == "http.response.body" and message.get("body"):
                reading.set()
                await go_on.wait()

        export = asyncio.create_task(app(_asgi_get("/v1/volume.csv", "timeframe=24h", OPS), receive, send))
        await asyncio.wait_for(reading.wait(), 30)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client:
            asked = asyncio.create_task(client.get("/v1/summary", params={"timeframe": "1h"},
                                                   headers={"authorization": f"Bearer {OPS}"}))
            if wait_then_free:
                while waiting() < 1:  # the request is queued for the slot...
                    await asyncio.sleep(0.01)
                go_on.set()  # ...when the export ends and frees it
            resp = await asked
            go_on.set()
            await asyncio.wait_for(export, 30)
            after = await client.get("/v1/summary", params={"timeframe": "1h"},
                                     headers={"authorization": f"Bearer {OPS}"})
        return statuses, resp, after

    # The slot stays taken: the request is refused once queue_wait_s has passed.
    app = make_app(bulk_engine, max_concurrent=1, queue_wait_s=0.2)
    started = time.monotonic()
    statuses, resp, after = asyncio.run(scenario(app, wait_then_free=False))
    assert statuses == [200], statuses
    assert resp.status_code == 503, resp.text
    assert "max_concurrent_queries=1" in reason(resp) and resp.headers["retry-after"] == "1"
    assert time.monotonic() - started >= 0.2
    assert after.status_code == 200, after.text  # the export's end gave the slot back
    # The slot is freed while the request waits: it is answered.
    app = make_app(bulk_engine, max_concurrent=1, queue_wait_s=30)
    statuses, resp, after = asyncio.run(scenario(app, wait_then_free=True))
    assert (statuses, resp.status_code, after.status_code) == ([200], 200, 200), (resp.text, after.text)


def test_a_failing_export_connection_is_answered_503_without_the_url_password(bulk_engine, caplog):
    url, client = bulk_engine
    secret = "s3cret-pass-for-export"
    app = create_app(TOKENS, RETENTION, client, lambda: connect(f"http://user:{secret}@127.0.0.1:9/db"))
    resp = get(app, "/v1/summary.csv", {"timeframe": "1h"})
    assert resp.status_code == 503 and "could not answer" in reason(resp)
    assert secret not in resp.text
    assert "export failed" in caplog.text
    for record in caplog.records:  # the message and every extra= value, whichever logger wrote it
        assert secret not in str(vars(record)), vars(record)
    # The slot was given back: the app still answers.
    assert get(app, "/v1/summary", {"timeframe": "1h"}).status_code == 200
