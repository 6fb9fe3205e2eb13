"""Pure logic of the query API: which range and table answer a question, who may ask,
and that caller input only ever reaches ClickHouse as bound parameters."""

from __future__ import annotations

import pytest

from quotaflow.analytics import queries
from quotaflow.analytics.scope import Forbidden, Scope, scope_for_token
from quotaflow.analytics.window import BadTimeRange, for_range, for_timeframe
from quotaflow.core.settings import Settings
from quotaflow.schemas.clickhouse import retention
from quotaflow.schemas.clickhouse.tables import DAY_MS, HOUR_MS, MINUTE_MS

RETENTION = retention.wanted_days(Settings())  # raw 30, minute 90, hour 365, day 1095 days
NOW = 1_764_000_000_000 + 37 * MINUTE_MS + 12_345  # some time in the middle of an hour


@pytest.mark.parametrize("name, span, step, table", [
    ("1h", HOUR_MS, MINUTE_MS, "requests_1m"),
    ("24h", DAY_MS, HOUR_MS, "requests_1h"),
    ("7d", 7 * DAY_MS, HOUR_MS, "requests_1h"),
    ("30d", 30 * DAY_MS, DAY_MS, "requests_1d"),
])
def test_a_timeframe_ends_with_the_current_step_and_reads_the_rollup_of_its_step(name, span, step, table):
    w = for_timeframe(name, NOW, RETENTION)
    assert (w.end_ms - w.start_ms, w.step_ms, w.table.name) == (span, step, table)
    assert w.start_ms % step == 0 and w.end_ms % step == 0
    assert w.end_ms - step <= NOW < w.end_ms  # the current, partial step is the last bucket


def test_a_timeframe_starting_exactly_on_a_boundary_still_includes_the_current_step():
    on_the_hour = NOW - NOW % HOUR_MS
    w = for_timeframe("24h", on_the_hour, RETENTION)
    assert w.end_ms == on_the_hour + HOUR_MS


def test_an_explicit_range_is_answered_exactly_by_the_coarsest_rollup_that_fits_it():
    day = NOW - NOW % DAY_MS
    # Ends on days but 2 days long: the series step is an hour, so the hour rollup answers.
    assert for_range(day - 2 * DAY_MS, day, NOW, RETENTION).table.name == "requests_1h"
    # Ends on days, 20 days long: day rollup.
    assert for_range(day - 20 * DAY_MS, day, NOW, RETENTION).table.name == "requests_1d"
    # 20 days that end on an hour but not on a day: the hour rollup keeps it exact.
    w = for_range(day - 20 * DAY_MS + HOUR_MS, day + 3 * HOUR_MS, NOW, RETENTION)
    assert (w.table.name, w.step_ms) == ("requests_1h", DAY_MS)
    # Ends on minutes only: the minute rollup, whatever the span.
    assert for_range(day - 3 * DAY_MS + MINUTE_MS, day, NOW, RETENTION).table.name == "requests_1m"
    # Not even on a minute: only the raw events can answer exactly.
    w = for_range(NOW - 90 * MINUTE_MS - 1500, NOW, NOW, RETENTION)
    assert (w.table.name, w.start_ms, w.end_ms) == ("requests", NOW - 90 * MINUTE_MS - 1500, NOW)


def test_data_older_than_what_a_table_keeps_is_read_from_one_that_still_has_it():
    # Minute-aligned, 100 days ago: raw (30 d) and minute (90 d) rows are gone; widened to hours.
    start = NOW - NOW % MINUTE_MS - 100 * DAY_MS + 7 * MINUTE_MS
    w = for_range(start, start + 2 * HOUR_MS, NOW, RETENTION)
    assert w.table.name == "requests_1h"
    assert (w.start_ms, w.end_ms) == (start - start % HOUR_MS, start - start % HOUR_MS + 3 * HOUR_MS)
    # Two years ago: only days are kept.
    start = NOW - 730 * DAY_MS
    w = for_range(start, start + HOUR_MS, NOW, RETENTION)
    assert w.table.name == "requests_1d" and w.step_ms == DAY_MS and w.start_ms % DAY_MS == 0


@pytest.mark.parametrize("start, end", [(NOW, NOW), (NOW, NOW - 1), (0, 3661 * DAY_MS), (-HOUR_MS, 0),
                                        (10**30, 10**30 + HOUR_MS)])
def test_impossible_ranges_are_refused(start, end):
    with pytest.raises(BadTimeRange):
        for_range(start, end, NOW, RETENTION)


def test_unknown_timeframes_are_refused():
    with pytest.raises(BadTimeRange):
        for_timeframe("2h", NOW, RETENTION)


def test_tokens_decide_the_scope():
    tokens = {"tok-acme": "acme", "tok-ops": "*"}
    assert scope_for_token("tok-acme", tokens) == Scope.org("acme")
    assert scope_for_token("tok-ops", tokens) == Scope.operator()
    for bad in ("", None, "tok-acm", "tok-acme ", "TOK-ACME", "*", "acme"):
        assert scope_for_token(bad, tokens) is None, bad
    assert scope_for_token("", {"": "acme"}) is None  # an empty token never matches


def test_a_scoped_caller_reads_only_its_own_org():
    acme = Scope.org("acme")
    assert acme.org_filter(None) == "acme" and acme.org_filter("acme") == "acme"
    for other in ("globex", "*", "%", "acme%", "ACME", " acme", "acme' OR '1'='1", ""):
        with pytest.raises(Forbidden):
            acme.org_filter(other)
    assert Scope.operator().org_filter(None) is None and Scope.operator().org_filter("globex") == "globex"
    with pytest.raises(ValueError):
        Scope.org("*")


HOSTILE = ["acme' OR '1'='1", "x'; DROP TABLE requests; --", "%", "*", "{evil:String}", "\\' OR 1=1 --",
           "acme\x00", "' UNION SELECT * FROM system.tables --"]


@pytest.mark.parametrize("question", list(queries.QUESTIONS))
@pytest.mark.parametrize("timeframe", ["1h", "30d"])
def test_every_query_binds_caller_input_and_always_filters_a_scoped_callers_org(question, timeframe):
    time_range = for_timeframe(timeframe, NOW, RETENTION)
    plain = queries.build(question, Scope.org("acme"), time_range, queries.Filters(api_key_id="k", endpoint="/e"))
    for value in HOSTILE:
        q = queries.build(question, Scope.org("acme"), time_range, queries.Filters(api_key_id=value, endpoint=value))
        assert q.sql == plain.sql  # the SQL text does not depend on what the caller sent...
        assert q.parameters["api_key"] == value and q.parameters["endpoint"] == value  # ...only as parameters
        assert "org_id = {org:String}" in q.sql and q.parameters["org"] == "acme" and q.org_id == "acme"
    # An operator without an org filter reads every org; with one, just that org.
    assert "org_id = {org:String}" not in queries.build(question, Scope.operator(), time_range).sql
    q = queries.build(question, Scope.operator(), time_range, queries.Filters(org_id="globex"))
    assert "org_id = {org:String}" in q.sql and q.parameters["org"] == "globex"


def test_questions_read_the_narrowest_rollup_their_filters_allow():
    """About a whole org: the org-level rollup; about endpoints without an API key filter:
    the endpoint-level one (an endpoint filter too); by status code without a key or endpoint
    filter: the status-level one, and by key without an endpoint filter: the key-level one (a
    key filter too), per hour and day; anything else filtered by key: the widest."""
    for timeframe, grain in (("1h", "1m"), ("24h", "1h"), ("30d", "1d")):
        time_range = for_timeframe(timeframe, NOW, RETENTION)
        for question in set(queries.QUESTIONS) - queries.OWN_TABLE:
            narrow = grain != "1m"  # no minute grain of the status- and key-level rollups
            level = ("org_" if question in queries.ORG_LEVEL else
                     "endpoint_" if question in queries.ENDPOINT_LEVEL else
                     "status_" if question in queries.STATUS_LEVEL and narrow else
                     "key_" if question in queries.KEY_LEVEL and narrow else "")
            by_endpoint = "endpoint_" if question in queries.ENDPOINT_LEVEL else ""
            by_key = "key_" if question in queries.KEY_LEVEL and narrow else ""
            for filters, table in ((queries.Filters(), f"requests_{level}{grain}"),
                                   (queries.Filters(api_key_id="k"), f"requests_{by_key}{grain}"),
                                   (queries.Filters(endpoint="/e"), f"requests_{by_endpoint}{grain}")):
                assert queries.build(question, Scope.org("acme"), time_range, filters).table.name == table, (
                    question, filters)
    raw = for_range(NOW - HOUR_MS - 1, NOW, NOW, RETENTION)
    assert {queries.build(q, Scope.operator(), raw).table.name
            for q in set(queries.QUESTIONS) - queries.OWN_TABLE} == {"requests"}


def test_limits_outside_the_allowed_range_are_refused():
    time_range = for_timeframe("1h", NOW, RETENTION)
    for limit in (0, -1, queries.MAX_LIMIT + 1):
        with pytest.raises(ValueError):
            queries.build("orgs", Scope.operator(), time_range, limit=limit)
