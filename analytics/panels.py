"""A view's questions planned together (/v1/panels, analytics/app.py): where two questions
read the same table under the same conditions, one query answers both, grouped finely
enough for each, and each answer is derived from its rows here as its own SQL computes it
(analytics/queries.py). tests/test_analytics_panels.py compares every answer with the
question asked alone.

- ``status_series`` and ``status``: requests per bucket and status code, one scan of the
  status-level rollup (or whatever table both would read).
- ``api_keys`` and ``denials``: totals per API key, one scan of the key-level rollup; only
  the keys either ranking shows come back.

Every other question is asked on its own. On the embedded engine the questions run one
after another anyway; each one saved is a scan and a query's fixed cost saved.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from clickhouse_connect.driver.client import Client

from quotaflow.analytics.queries import Bounds, Filters, Query, _Source, _where
from quotaflow.schemas.clickhouse.tables import DENIAL_STATUS

# A series longer than this (a custom range of years by day) is asked on its own: the
# combined answer has a row per bucket and status code.
MAX_COMBINED_BUCKETS = 400

Rows = list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Step:
    """One query of the plan and the questions it answers."""

    queries: tuple[Query, ...]
    sql: str
    parameters: dict[str, Any]
    split: Callable[[list[tuple]], dict[str, Rows]]

    @property
    def name(self) -> str:
        return "-".join(q.question for q in self.queries)

    def run(self, client: Client, bounds: Bounds) -> dict[str, Rows]:
        result = client.query(self.sql, parameters=self.parameters, settings=bounds.settings())
        return self.split(result.result_rows)


def _alone(query: Query) -> Step:
    return Step((query,), query.sql, query.parameters,
                lambda rows: {query.question: [dict(zip(query.columns, r, strict=True)) for r in rows]})


def _iso(epoch_s: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_s))  # as queries._ISO formats a bucket


def _status_class(code: int) -> str:
    """The status_series class of a code (queries._status_series), 429 apart."""
    if code == DENIAL_STATUS:
        return "429"
    return "5xx" if code >= 500 else f"{max(1, code // 100)}xx"


def _by_status(series: Query, breakdown: Query, filters: Filters) -> Step:
    table, time_range = series.table, series.time_range
    s = _Source(table, time_range.step_ms)
    where, params = _where(table, time_range, series.org_id, filters)
    sql = f"SELECT toUnixTimestamp({s.bucket}) AS b, status AS code, {s.requests} FROM {table.name} WHERE {where} " \
          f"GROUP BY b, code"
    step_s, fill_from_s, end_s = (series.parameters[k] for k in ("step_s", "fill_from_s", "end_s"))
    classes = [c.removeprefix("status_") for c in series.columns[2:]]

    def split(rows: list[tuple]) -> dict[str, Rows]:
        # status_series: every step from the range's first to its end (WITH FILL), each
        # bucket's requests by class.
        buckets: dict[int, dict[str, int]] = {b: dict.fromkeys(classes, 0) for b in range(fill_from_s, end_s, step_s)}
        per_code: dict[int, int] = {}
        for b, code, n in rows:
            buckets.setdefault(b, dict.fromkeys(classes, 0))[_status_class(code)] += n
            per_code[code] = per_code.get(code, 0) + n
        series_rows = [dict(zip(series.columns, (_iso(b), sum(by_class.values()), *by_class.values()), strict=True))
                       for b, by_class in sorted(buckets.items())]
        # status: each code's requests and share, and its class's (queries._status).
        total = sum(per_code.values())
        per_class: dict[str, int] = {}
        for code, n in per_code.items():
            per_class[f"{code // 100}xx"] = per_class.get(f"{code // 100}xx", 0) + n
        breakdown_rows = [dict(zip(breakdown.columns, (f"{code // 100}xx", code, n, n / total,
                                                       per_class[f"{code // 100}xx"],
                                                       per_class[f"{code // 100}xx"] / total), strict=True))
                          for code, n in sorted(per_code.items())]
        return {series.question: series_rows, breakdown.question: breakdown_rows}

    return Step((series, breakdown), sql, params, split)


def _by_key(ranking: Query, denials: Query, filters: Filters) -> Step:
    table, time_range = ranking.table, ranking.time_range
    s = _Source(table, time_range.step_ms)
    where, params = _where(table, time_range, ranking.org_id, filters)
    params.update(top=ranking.parameters["limit"], top_denied=denials.parameters["limit"])
    # Only the keys one of the two rankings shows: the first `top` by requests, the first
    # `top_denied` by denials among keys with any.
    sql = f"""
SELECT k, n, n_errors, n_denials, bytes_in, bytes_out
FROM (SELECT k, n, n_errors, n_denials, bytes_in, bytes_out,
             row_number() OVER (ORDER BY n DESC, k) AS by_requests,
             row_number() OVER (ORDER BY n_denials > 0 DESC, n_denials DESC, k) AS by_denials
      FROM (SELECT api_key_id AS k, {s.requests} AS n, {s.errors} AS n_errors, {s.denials} AS n_denials,
                   {s.request_bytes} AS bytes_in, {s.response_bytes} AS bytes_out
            FROM {table.name} WHERE {where} GROUP BY k))
WHERE by_requests <= {{top:UInt32}} OR (n_denials > 0 AND by_denials <= {{top_denied:UInt32}})""".strip()

    def split(rows: list[tuple]) -> dict[str, Rows]:
        top = sorted(rows, key=lambda r: (-r[1], r[0]))[: params["top"]]
        denied = sorted((r for r in rows if r[3] > 0), key=lambda r: (-r[3], r[0]))[: params["top_denied"]]
        return {ranking.question: [dict(zip(ranking.columns, r, strict=True)) for r in top],
                denials.question: [dict(zip(denials.columns, (k, d, n, d / n), strict=True))
                                   for k, n, _, d, _, _ in denied]}

    return Step((ranking, denials), sql, params, split)


def _by_org_and_tier(ranking: Query, tiers: Query, filters: Filters) -> Step:
    table, time_range = ranking.table, ranking.time_range
    s = _Source(table, time_range.step_ms)
    where, params = _where(table, time_range, ranking.org_id, filters)
    params.update(top=ranking.parameters["limit"])
    # Grouped by org and by tier in one scan; of the orgs, only the first `top` by requests.
    sql = f"""
SELECT by_tier, org_id, tier, orgs, n, n_errors, n_denials, bytes_in, bytes_out
FROM (SELECT *, row_number() OVER (PARTITION BY by_tier ORDER BY n DESC, org_id, tier) AS place
      FROM (SELECT grouping(org_id) AS by_tier, org_id, tier, uniqExact(org_id) AS orgs, {s.requests} AS n,
                   {s.errors} AS n_errors, {s.denials} AS n_denials, {s.request_bytes} AS bytes_in,
                   {s.response_bytes} AS bytes_out
            FROM {table.name} WHERE {where} GROUP BY GROUPING SETS ((org_id), (tier))))
WHERE by_tier = 1 OR place <= {{top:UInt32}}""".strip()

    def split(rows: list[tuple]) -> dict[str, Rows]:
        orgs = sorted((r for r in rows if r[0] == 0), key=lambda r: (-r[4], r[1]))[: params["top"]]
        by_tier = sorted((r for r in rows if r[0] == 1), key=lambda r: (-r[4], r[2]))
        return {ranking.question: [dict(zip(ranking.columns, (r[1], *r[4:]), strict=True)) for r in orgs],
                tiers.question: [dict(zip(tiers.columns, (r[2], *r[3:]), strict=True)) for r in by_tier]}

    return Step((ranking, tiers), sql, params, split)


def _summary_and_latency(summary: Query, series: Query, filters: Filters) -> Step:
    table, time_range = summary.table, summary.time_range
    s = _Source(table, time_range.step_ms)
    where, params = _where(table, time_range, summary.org_id, filters)
    # The whole range and each bucket in one scan. Not for every org: there, each of the two
    # alone reads the rollup's projection without org (migration 0012), which this cannot.
    sql = f"""
SELECT grouping(b) AS whole, toUnixTimestamp({s.bucket}) AS b, {s.requests} AS n, {s.errors}, {s.denials},
       {s.request_bytes}, {s.response_bytes}, {s.latency}
FROM {table.name} WHERE {where} GROUP BY GROUPING SETS ((), (b))""".strip()

    def split(rows: list[tuple]) -> dict[str, Rows]:
        # An empty input still has its row of the whole (n = 0), as the summary's own query.
        whole = next(r for r in rows if r[0] == 1)
        _, _, n, n_errors, n_denials, bytes_in, bytes_out, lat = whole
        total = (n, n_errors, n_errors / n if n else 0.0, n_denials, bytes_in, bytes_out,
                 *(lat if n else (None, None, None)))
        buckets = sorted((r for r in rows if r[0] == 0), key=lambda r: r[1])
        return {summary.question: [dict(zip(summary.columns, total, strict=True))],
                series.question: [dict(zip(series.columns, (_iso(r[1]), r[2], *r[7]), strict=True)) for r in buckets]}

    return Step((summary, series), sql, params, split)


def plan(asked: list[Query], filters: Filters) -> list[Step]:
    """The steps answering ``asked`` (built by queries.build for one view: the same scope,
    time range and filters), in the order asked; pairs that one query answers are joined."""
    by_question = {q.question: q for q in asked}
    joined: dict[str, Step] = {}
    series, breakdown = by_question.get("status_series"), by_question.get("status")
    if series and breakdown and series.table == breakdown.table \
            and (series.time_range.end_ms - series.time_range.start_ms) // series.time_range.step_ms \
            <= MAX_COMBINED_BUCKETS:
        joined["status_series"] = joined["status"] = _by_status(series, breakdown, filters)
    ranking, denials = by_question.get("api_keys"), by_question.get("denials")
    if ranking and denials and ranking.table == denials.table:
        joined["api_keys"] = joined["denials"] = _by_key(ranking, denials, filters)
    ranking, tiers = by_question.get("orgs"), by_question.get("tiers")
    if ranking and tiers and ranking.table == tiers.table:
        joined["orgs"] = joined["tiers"] = _by_org_and_tier(ranking, tiers, filters)
    summary, latency = by_question.get("summary"), by_question.get("latency")
    if summary and latency and summary.table == latency.table and summary.org_id is not None:
        joined["summary"] = joined["latency"] = _summary_and_latency(summary, latency, filters)
    steps: list[Step] = []
    for q in asked:
        step = joined.get(q.question) or _alone(q)
        if not any(step is s for s in steps):
            steps.append(step)
    return steps

