"""/v1/panels: a view's questions in one request. The real Starlette app over httpx's ASGI
transport, on a real embedded engine (chDB) holding two orgs' rows: each answer is what
/v1/{question} says for the same view (the same instant: the app's clock is stopped), an
org token's answers are its org's alone, and bad input is refused naming what was wrong."""

from __future__ import annotations

import random
import time
import uuid
from datetime import datetime, timezone

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quotaflow.analytics import queries
from quotaflow.analytics.queries import Bounds
from tests.test_analytics_hostile import ACME, OPS, bulk_engine, get, make_app, raw_range, reason  # noqa: F401

NOW_MS = int(time.time() * 1000)
DAY = 86_400_000
DASHBOARD = "summary,volume,status_series,latency,status,endpoints:20,orgs:50,tiers,api_keys:50,denials:50,alerts:1000"
LIMITS = {"endpoints": 20, "orgs": 50, "api_keys": 50, "denials": 50, "alerts": 1000}


STATUSES = (100, 101, 200, 200, 201, 204, 301, 304, 400, 404, 429, 429, 499, 500, 503, 599)


@pytest.fixture(scope="module")
def app(bulk_engine):  # noqa: F811
    """Beside the hostile tests' orgs, "mixed": every status class, 429 apart, over 8 days."""
    _, client = bulk_engine
    rnd = random.Random(16)
    columns = ["event_id", "event_time", "org_id", "api_key_id", "service", "endpoint", "method", "status",
               "latency_ms", "request_bytes", "response_bytes", "client_ip", "user_agent", "schema_version",
               "kafka_partition", "kafka_offset", "tier"]
    rows = [[uuid.UUID(int=(16 << 64) + i), datetime.fromtimestamp((NOW_MS - rnd.randrange(8 * DAY)) / 1000, timezone.utc),
             "mixed", f"m{rnd.randrange(80)}", "s", rnd.choice(["/a", "/b/{id}"]), "GET", rnd.choice(STATUSES),
             rnd.uniform(0.1, 900), 1, 2, "::1", "ua", 1, 999999, i, "PRO"] for i in range(20_000)]
    client.insert("requests", rows, column_names=columns, settings={"max_partitions_per_insert_block": 0})
    return make_app(bulk_engine, clock=lambda: NOW_MS / 1000)


def answers_of(resp) -> dict[str, dict]:
    """The NDJSON lines of a /v1/panels answer by question, each asked once, without the
    query's time and name (kept in ``took``)."""
    assert resp.headers["content-type"] == "application/x-ndjson", resp.text
    out: dict[str, dict] = {}
    for line in resp.text.splitlines():
        answer = orjson.loads(line)
        assert answer["question"] not in out, line
        answer["took"] = (answer.pop("query_of"), answer.pop("query_ms"))
        out[answer["question"]] = answer
    return out


def one_by_one(app, token: str, view: dict[str, str], question: str) -> dict:
    params = {**view, **({"limit": str(LIMITS[question])} if question in LIMITS else {})}
    resp = get(app, f"/v1/{question}", params, token=token)
    assert resp.status_code == 200, resp.text
    return resp.json()


@pytest.mark.parametrize("token, view", [
    (OPS, {"timeframe": "24h"}),
    (OPS, {"timeframe": "30d", "org": "acme"}),
    (OPS, {"timeframe": "1h", "org": "bulk", "endpoint": "/v1/e7"}),
    (OPS, {**raw_range(3), "org": "bulk", "api_key": "k3"}),
    (ACME, {"timeframe": "24h"}),
    (ACME, {"timeframe": "7d", "org": "acme"}),
    (OPS, {"timeframe": "24h", "org": "nobody"}),  # nothing stored: series of zeros, empty rankings
    *((OPS, {"timeframe": tf, "org": "mixed"}) for tf in ("1h", "24h", "7d", "30d")),
    (OPS, {"timeframe": "7d", "org": "mixed", "endpoint": "/b/{id}"}),
    (OPS, {"from": str(NOW_MS - 3 * DAY - 7), "to": str(NOW_MS), "org": "mixed"}),  # the raw table, by hour
])
def test_each_answer_is_what_its_own_question_says(app, token, view):
    resp = get(app, "/v1/panels", {**view, "questions": DASHBOARD}, token=token)
    assert resp.status_code == 200, resp.text
    answers = answers_of(resp)
    assert sorted(answers) == sorted(q.partition(":")[0] for q in DASHBOARD.split(","))
    assert view.get("org") == "nobody" or all(a["rows"] for a in answers.values() if a["question"] != "alerts")
    took = {question: answer.pop("took") for question, answer in answers.items()}
    for question, answer in answers.items():
        assert answer == one_by_one(app, token, view, question), question
    # Each answer names the query of the plan that answered it, and the time it took.
    assert all(q in of.split("-") and ms >= 0 for q, (of, ms) in took.items()), took
    together = {"status_series-status", "api_keys-denials", "orgs-tiers"}
    if token == ACME or "org" in view:  # every org's summary and latency read a projection each, apart
        together.add("summary-latency")
    assert together <= {of for of, _ in took.values()}, took
    assert "slot;dur=" in resp.headers["server-timing"]


def test_an_org_token_reads_its_own_org_only(app):
    answers = answers_of(get(app, "/v1/panels", {"timeframe": "24h", "questions": DASHBOARD}, token=ACME))
    assert {a["org"] for a in answers.values()} == {"acme"}
    assert [r["org_id"] for r in answers["orgs"]["rows"]] == ["acme"]
    every = answers_of(get(app, "/v1/panels", {"timeframe": "24h", "questions": "summary"}))["summary"]
    assert 0 < answers["summary"]["rows"][0]["requests"] < every["rows"][0]["requests"]
    for other in ("bulk", "nobody"):
        resp = get(app, "/v1/panels", {"timeframe": "24h", "org": other, "questions": "summary"}, token=ACME)
        assert resp.status_code == 403 and "own org" in reason(resp)


@pytest.mark.parametrize("params, status, names", [
    ({"timeframe": "24h"}, 400, "questions"),
    ({"timeframe": "24h", "questions": ""}, 400, "questions"),
    ({"timeframe": "24h", "questions": "summary,nope"}, 400, "'nope'"),
    ({"timeframe": "24h", "questions": "summary,summary"}, 400, "more than once"),
    ({"timeframe": "24h", "questions": "endpoints:0"}, 400, "limit of 'endpoints'"),
    ({"timeframe": "24h", "questions": "endpoints:1001"}, 400, "limit of 'endpoints'"),
    ({"timeframe": "24h", "questions": "endpoints:"}, 400, "limit of 'endpoints'"),
    ({"timeframe": "24h", "questions": "endpoints:\u00b2"}, 400, "limit of 'endpoints'"),
    ({"timeframe": "24h", "questions": "summary", "limit": "5"}, 400, "unknown parameter 'limit'"),
    ({"timeframe": "2h", "questions": "summary"}, 400, "timeframe"),
    ({"timeframe": "24h", "questions": "summary", "org": "a b"}, 400, "org"),
])
def test_bad_requests_are_refused_naming_what_was_wrong(app, params, status, names):
    resp = get(app, "/v1/panels", params)
    assert resp.status_code == status, resp.text
    assert names in reason(resp)


def test_no_token_is_401(app):
    resp = get(app, "/v1/panels", {"timeframe": "24h", "questions": "summary"}, token=None)
    assert resp.status_code == 401 and resp.headers["www-authenticate"]


def test_a_question_stopped_by_a_bound_fails_alone(bulk_engine):  # noqa: F811
    tight = make_app(bulk_engine, bounds=Bounds(max_memory_usage=1_000_000))
    resp = get(tight, "/v1/panels", {**raw_range(), "org": "bulk", "questions": "api_keys:1000,tiers"})
    assert resp.status_code == 200, resp.text
    answers = answers_of(resp)
    assert answers["api_keys"]["status"] == 503
    assert "max_memory_usage=1000000 bytes" in answers["api_keys"]["error"]
    assert answers["tiers"]["rows"], answers["tiers"]  # the next question on the same client is answered


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(text=st.lists(st.sampled_from([*queries.QUESTIONS, ",", ":", "1", "0", "x", "\u00b2"]), max_size=12)
       .map("".join))
def test_no_questions_list_gets_a_5xx(app, text):
    resp = get(app, "/v1/panels", {"timeframe": "1h", "org": "acme", "questions": text})
    assert resp.status_code in (200, 400), resp.text
    if resp.status_code == 400:
        assert "questions" in reason(resp) or "parameter" in reason(resp)
    else:
        assert set(answers_of(resp)) == {q.partition(":")[0] for q in text.split(",")}
