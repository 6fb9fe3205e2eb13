"""Dashboard benchmark: the page loaded in headless Chromium over BENCH_DASHBOARD_EVENTS
events (default 10M), from navigation to every panel drawn.

1. The events are generated inside ClickHouse as bench/clickhouse.py does (100 orgs over
   30 days, org-0 a fifth of them; INSERT ... SELECT FROM numbers(), through the rollup
   views), in an embedded engine of this run's own; Redis and Kafka are started for the
   live limit panel and the dead letters panel.
2. `quotaflow api` serves the query API and the page (a real subprocess, the engine
   opened there alone). Debian's chromium (installed when missing), driven by Playwright,
   opens the page BENCH_DASHBOARD_ROUNDS times (default 20) for org-0 and for every org,
   for 24h and for 30d, signed in already (the token in the tab's sessionStorage). Each load
   reports itself: navigation start to the last panel drawn (the page's own
   performance.now(), so polling adds nothing): ``dashboard_load_p50_ms``,
   ``dashboard_load_p95_ms``, and per timeframe. The first load of all, with an empty
   browser cache, is ``dashboard_cold_load_ms``.
3. Beside it, from the same loads (Resource Timing): each API request the page made,
   request to last byte, ``panel_query_p50_ms`` / ``panel_query_p95_ms``; and the baseline
   of the browser alone, the page without a token (the sign-in form, no query):
   ``page_only_load_p50_ms``.
4. Before the page is served, an A/B of the rollups' latency state on the same rows: the
   events rolled up by API key, endpoint, method and status per day over 30 days (as
   requests_1d) and per hour over the last 24 hours (as requests_1h), once with the
   t-digest states the rollups had before migration 0007 and once with the latency bucket
   counts they have now (schemas/clickhouse/latency.py), in two tables of identical rows;
   then the endpoints question over every org (p95 per endpoint: the widest merge a panel
   asks for) on each, alternately: ``latency_merge_tdigest_{30d,24h}_p50_ms`` and
   ``latency_merge_buckets_{30d,24h}_p50_ms``; beside them the same question on the
   endpoint-level rollup the API reads for it (``latency_merge_buckets_endpoint_rollup_...``).
5. The org-level hour rollup in granules of 8192 rows (as before migration 0010) and of 64
   (as now), two copies of the same rows: the page's 24-hour summary and latency questions
   on each, for org-0 and every org, alternately: ``org_rollup_granule_{8192,64}_24h_...``.
6. Where each load's time went (Breakdown, from the page's marks and the API's
   Server-Timing headers): the page's phases (``phase_*``), each panel's request and its
   server phases (``panel_<question>_<timeframe>_...``: ``server_slot`` waiting for a
   query slot, ``server_query`` the ClickHouse query, ``server_redis``, ``server_kafka``;
   the page asks its ClickHouse questions in one request, ``panel_panels_...``, whose
   ``server_q_<questions>`` are the queries of its plan, analytics/panels.py),
   the static files (revalidated or fetched), the API requests per load and the most in
   flight at once (``api_parallel_peak``).

BENCH_DASHBOARD_KEEP_DATA=1 keeps the generated events for the next run (migrations added
since are applied to them; the latency A/B, step 4, is left out then).

Run: QUOTAFLOW_BENCH_PORT_BASE=35000 .venv/bin/python bench/dashboard.py
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time

import harness  # sets the isolated environment; settings are read later
import orjson
from clickhouse import ENDPOINTS, GENERATE

from quotaflow.deploy import stack
from quotaflow.deploy.system_packages import ensure_command
from quotaflow.schemas.clickhouse import latency
from quotaflow.schemas.clickhouse.client import connect
from quotaflow.schemas.clickhouse.migrate import migrate

EVENTS = int(os.environ.get("BENCH_DASHBOARD_EVENTS", 10_000_000))
ROUNDS = int(os.environ.get("BENCH_DASHBOARD_ROUNDS", 20))
TOKEN = "bench-dashboard-token"
# Keep the generated events for the next run (its time goes to the page, not to generating
# them again); migrations added since are applied to them. Off by default: every run alike.
KEEP_DATA = os.environ.get("BENCH_DASHBOARD_KEEP_DATA") == "1"


def log(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q * 100) - 1]


def generate(url: str, n: int) -> None:
    client = connect(url)
    try:
        migrate(client)
        started = time.perf_counter()
        now_ms, chunk = int(time.time() * 1000), 1_000_000
        for lo in range(0, n, chunk):
            client.command(GENERATE, parameters={"now_ms": now_ms, "span_ms": 30 * 86_400_000, "n": n, "lo": lo,
                                                 "count": min(chunk, n - lo), "endpoints": list(ENDPOINTS)},
                           settings={"max_partitions_per_insert_block": 0})
        harness.report("generate_events_s", time.perf_counter() - started, "s")
    finally:
        client.close()


AB_ROUNDS = 7
_AB_KEYS = "org_id, tier, api_key_id, endpoint, method, status"


def ab_latency_merge(url: str) -> None:
    """The old and the new latency state merged over the same rows (step 4 above)."""
    client = connect(url)
    try:
        for name, grain, since in (("30d", "toStartOfDay", "toStartOfDay(now()) - INTERVAL 29 DAY"),
                                   ("24h", "toStartOfHour", "toStartOfHour(now()) - INTERVAL 23 HOUR")):
            states = {"tdigest": "quantilesTDigestState(0.5, 0.95, 0.99)(latency_ms)",
                      "buckets": f"quantilesExactWeightedState(0.5, 0.95, 0.99)({latency.BUCKET_SQL}, toUInt64(1))"}
            for kind, state in states.items():
                client.command(f"DROP TABLE IF EXISTS ab_{kind}")
                client.command(f"CREATE TABLE ab_{kind} ENGINE = MergeTree ORDER BY (org_id, bucket) AS "
                               f"SELECT {grain}(toDateTime(event_time)) AS bucket, {_AB_KEYS}, count() AS requests, "
                               f"{state} AS {'latency_tdigest' if kind == 'tdigest' else latency.COLUMN} FROM requests "
                               f"WHERE event_time >= {since} GROUP BY bucket, {_AB_KEYS}")
            rows = [client.query(f"SELECT count() FROM ab_{kind}").result_rows[0][0] for kind in states]
            assert rows[0] == rows[1], rows
            merge = {"tdigest": "quantilesTDigestMerge(0.5, 0.95, 0.99)(latency_tdigest)",
                     "buckets": latency.quantiles_sql(raw=False)}
            endpoint_level = f"requests_endpoint_1{name[-1]}"  # what the API reads for this question now
            sources = {"tdigest": "ab_tdigest", "buckets": "ab_buckets", "buckets_endpoint_rollup": endpoint_level}
            timed: dict[str, list[float]] = {kind: [] for kind in sources}
            for _ in range(AB_ROUNDS):
                for kind, table in sources.items():
                    started = time.perf_counter()
                    client.query(f"SELECT method, endpoint, sum(requests), {merge[kind.split('_')[0]]} FROM {table} "
                                 f"WHERE bucket >= {since} GROUP BY method, endpoint")
                    timed[kind].append((time.perf_counter() - started) * 1000)
            for kind in sources:
                harness.report(f"latency_merge_{kind}_{name}_p50_ms", statistics.median(timed[kind]), "ms")
            ep_rows = client.query(f"SELECT count() FROM {endpoint_level} WHERE bucket >= {since}").result_rows[0][0]
            log(f"A/B {name}: {rows[0]} rows in each table, {AB_ROUNDS} rounds each, alternately; "
                f"{ep_rows} rows of {endpoint_level} (after its merges so far)")
            for kind in states:
                client.command(f"DROP TABLE ab_{kind}")
    finally:
        client.close()


def ab_org_granules(url: str) -> None:
    """The org-level hour rollup in granules of 8192 rows (before migration 0010) and of 64
    (after it), two copies of the same rows: the 24-hour summary and latency questions the
    page asks, for org-0 and for every org, on each, alternately (step 5 above)."""
    from quotaflow.analytics import queries
    from quotaflow.analytics.scope import Scope
    from quotaflow.analytics.window import for_timeframe
    from quotaflow.schemas.clickhouse.tables import ORG_ROLLUPS

    hour = ORG_ROLLUPS[1].name
    client = connect(url)
    try:
        ddl = client.query(f"SHOW CREATE TABLE {hour}").result_rows[0][0]
        assert "index_granularity = 64" in ddl, ddl  # migration 0010
        tables = {}
        for granule in (8192, 64):
            copy = f"ab_org_{granule}"
            client.command(f"DROP TABLE IF EXISTS {copy}")
            client.command(ddl.replace(f".{hour}", f".{copy}", 1).replace(f"TABLE {hour}", f"TABLE {copy}", 1)
                           .replace("index_granularity = 64", f"index_granularity = {granule}"))
            client.command(f"INSERT INTO {copy} SELECT * FROM {hour}")
            tables[granule] = copy
        now_ms = int(time.time() * 1000)
        time_range = for_timeframe("24h", now_ms, {t: 3650 for t in ("requests", "requests_1m", "requests_1h")})
        timed: dict[str, list[float]] = {}
        for _ in range(AB_ROUNDS):
            for granule, copy in tables.items():
                for org in ("org-0", None):
                    for question in ("summary", "latency"):
                        query = queries.build(question, Scope.operator(), time_range, queries.Filters(org_id=org))
                        assert query.table.name == hour, query.table.name
                        started = time.perf_counter()
                        client.query(query.sql.replace(f"FROM {hour} ", f"FROM {copy} "), parameters=query.parameters)
                        name = f"org_rollup_granule_{granule}_24h_{'org0' if org else 'every_org'}_{question}_p50_ms"
                        timed.setdefault(name, []).append((time.perf_counter() - started) * 1000)
        for name, values in timed.items():
            harness.report(name, statistics.median(values), "ms")
        log(f"A/B org rollup granules: {client.query(f'SELECT count() FROM {hour}').result_rows[0][0]} rows of "
            f"{hour} in each copy, {AB_ROUNDS} rounds each, alternately")
        for copy in tables.values():
            client.command(f"DROP TABLE {copy}")
    finally:
        client.close()


def serve_api(settings) -> subprocess.Popen:
    env = {**os.environ, "QUOTAFLOW_API_TOKENS": orjson.dumps({TOKEN: "*"}).decode()}
    log_file = open(settings.state_dir / "api.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "quotaflow", "api"], env=env, stdout=log_file, stderr=log_file)
    import httpx

    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{settings.api_port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"quotaflow api did not start; see {settings.state_dir / 'api.log'}")
        time.sleep(0.1)


# What one load left in the page's performance timeline: the navigation, the page's own
# marks (dashboard.js mark(): start, signed-in, refresh, data:Q and drawn:Q per panel), and
# every resource with its Server-Timing phases.
LOAD_ENTRIES = """(() => {
  const nav = performance.getEntriesByType('navigation')[0];
  const marks = Object.fromEntries(performance.getEntriesByType('mark')
    .filter(m => m.name.startsWith('qf:')).map(m => [m.name.slice(3), m.startTime]));
  const resources = performance.getEntriesByType('resource').map(e => ({
    name: e.name, start: e.startTime, requestStart: e.requestStart, responseStart: e.responseStart,
    end: e.responseEnd, transfer: e.transferSize, body: e.encodedBodySize,
    server: Object.fromEntries((e.serverTiming || []).map(t => [t.name, t.duration]))}));
  return {html: nav.responseEnd, dom: nav.domContentLoadedEventEnd, marks, resources};
})()"""


class Breakdown:
    """Where each load's time went (the extra ``name: value unit`` lines): the page's
    phases, each panel's request (browser to last byte) and its server phases, the
    static files (fetched, revalidated or cached), and how many API requests ran at once."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}

    def _put(self, name: str, value: float) -> None:
        self.values.setdefault(name, []).append(value)

    def add(self, timeframe: str, rendered_ms: float, t: dict) -> None:
        marks = t["marks"]
        self._put("phase_html_ms", t["html"])  # navigation start to the page's HTML received
        self._put("phase_dom_content_loaded_ms", t["dom"])  # ... to the HTML parsed and its scripts run
        if marks:  # a page without the marks (an older dashboard.js, for an A/B) has the rest only
            self._put("phase_script_start_ms", marks["start"])  # ... to dashboard.js running (DOMContentLoaded)
            self._put("phase_signin_ms", marks["signed-in"] - marks["start"])  # the whoami round trip
            self._put("phase_panels_ms", rendered_ms - marks["refresh"])  # every panel asked, answered and drawn
            data = [v for k, v in marks.items() if k.startswith("data:")]
            for k, v in marks.items():  # when each answer came (/v1/panels streams them one by one)
                if k.startswith("data:"):
                    self._put(f"answer_{k[5:]}_{timeframe}_ms", v - marks["refresh"])
            self._put("phase_last_answer_to_rendered_ms", rendered_ms - max(data))
            self._put("phase_draw_total_ms", sum(marks["drawn:" + k[5:]] - v for k, v in marks.items()
                                                 if k.startswith("data:") and "drawn:" + k[5:] in marks))
        static = [r for r in t["resources"] if "/static/" in r["name"]]
        self._put("static_files", len(static))
        self._put("static_files_revalidated", sum(1 for r in static if 0 < r["transfer"] and r["body"] == 0)
                  + sum(1 for r in static if r["transfer"] > 0 and r["body"] > 0 and r["transfer"] < 1000))
        self._put("static_files_fetched", sum(1 for r in static if r["transfer"] >= 1000))
        self._put("static_last_end_ms", max((r["end"] for r in static), default=0))
        api = [r for r in t["resources"] if "/v1/" in r["name"] and r["end"] <= rendered_ms + 1]
        self._put("api_requests", len(api))
        # The most API requests in flight at once (browser side: fetch start to last byte).
        edges = sorted([(r["start"], 1) for r in api] + [(r["end"], -1) for r in api])
        peak = now = 0
        for _, step in edges:
            now += step
            peak = max(peak, now)
        self._put("api_parallel_peak", peak)
        for r in api:
            path = r["name"].split("/v1/", 1)[1].split("?", 1)[0]
            self._put(f"panel_{path}_{timeframe}_ms", r["end"] - r["start"])
            for phase, ms in r["server"].items():
                self._put(f"panel_{path}_{timeframe}_server_{phase}_ms", ms)

    def report(self) -> None:
        for name in sorted(self.values):
            values = self.values[name]
            if len(values) < 2:
                continue
            unit = "ms" if name.endswith("_ms") else "count"
            base = name.removesuffix("_ms")
            harness.report(f"{base}_p50" + ("_ms" if unit == "ms" else ""), percentile(values, 0.50), unit)
            if unit == "ms":
                harness.report(f"{base}_p95_ms", percentile(values, 0.95), unit)


def measure(base: str) -> None:
    from playwright.sync_api import sync_playwright

    chromium = ensure_command("chromium", "chromium")
    loads: dict[str, list[float]] = {"24h": [], "30d": []}
    queries: list[float] = []
    breakdown = Breakdown()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            # The page alone: no token, so the sign-in form and no query.
            bare = browser.new_context().new_page()
            page_only = []
            for _ in range(ROUNDS):
                bare.goto(base + "/")
                bare.wait_for_selector("#signin:not([hidden])")
                page_only.append(bare.evaluate("performance.getEntriesByType('navigation')[0].loadEventEnd"))
            context = browser.new_context(viewport={"width": 1440, "height": 900})
            context.add_init_script(f"sessionStorage.setItem('quotaflow.token', {orjson.dumps(TOKEN).decode()})")
            page = context.new_page()
            cold = None
            for _ in range(ROUNDS):
                for timeframe in ("24h", "30d"):
                    for org in ("&org=org-0", ""):
                        page.goto(f"{base}/?timeframe={timeframe}{org}")
                        deadline = time.monotonic() + 60
                        while not (ms := page.evaluate("document.body.dataset.renderedMs")):
                            if time.monotonic() > deadline:
                                raise SystemExit(f"the page did not finish loading: {page.text_content('#error')}")
                            time.sleep(0.02)
                        if page.evaluate("document.querySelectorAll('.panel[data-state=error]').length"):
                            raise SystemExit(f"a panel failed: {page.text_content('#error')}")
                        cold = float(ms) if cold is None else cold
                        loads[timeframe].append(float(ms))
                        queries += page.evaluate("""performance.getEntriesByType('resource')
                            .filter(e => e.name.includes('/v1/')).map(e => e.responseEnd - e.requestStart)""")
                        breakdown.add(timeframe, float(ms), page.evaluate(LOAD_ENTRIES))
        finally:
            browser.close()
    every = loads["24h"] + loads["30d"]
    harness.report("dashboard_load_p50_ms", percentile(every, 0.50), "ms")
    harness.report("dashboard_load_p95_ms", percentile(every, 0.95), "ms")
    for timeframe, values in loads.items():
        harness.report(f"dashboard_load_{timeframe}_p50_ms", percentile(values, 0.50), "ms")
        harness.report(f"dashboard_load_{timeframe}_p95_ms", percentile(values, 0.95), "ms")
    harness.report("dashboard_cold_load_ms", cold, "ms")
    harness.report("panel_query_p50_ms", percentile(queries, 0.50), "ms")
    harness.report("panel_query_p95_ms", percentile(queries, 0.95), "ms")
    harness.report("page_only_load_p50_ms", percentile(page_only, 0.50), "ms")
    breakdown.report()
    log(f"{len(every)} loads ({ROUNDS} rounds x 24h/30d x org-0/every org), {len(queries)} API requests, "
        f"{EVENTS} events")
    log(f"load average (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def stored_events(url: str) -> int:
    client = connect(url)
    try:
        started = time.perf_counter()
        if applied := migrate(client):  # what is new since the events were generated, applied to them as to a live store
            log(f"migrations {applied} applied to the stored events in {time.perf_counter() - started:.1f} s")
        return client.query("SELECT count() FROM requests").result_rows[0][0]
    finally:
        client.close()


def main() -> None:
    settings = harness.get_settings()
    stack.down(settings)
    keep = KEEP_DATA and (settings.state_dir / "clickhouse").is_dir()
    if not keep:
        shutil.rmtree(settings.state_dir, ignore_errors=True)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    stack.up(settings)  # Redis (limits) and Kafka (dead letters): panels of the page too
    api = None
    try:
        if keep and stored_events(settings.clickhouse_url) == EVENTS:
            log(f"reusing the {EVENTS} events of an earlier run (BENCH_DASHBOARD_KEEP_DATA)")
        else:
            shutil.rmtree(settings.state_dir / "clickhouse", ignore_errors=True)
            log(f"generating {EVENTS} events")
            generate(settings.clickhouse_url, EVENTS)
            ab_latency_merge(settings.clickhouse_url)
        ab_org_granules(settings.clickhouse_url)
        api = serve_api(settings)
        measure(f"http://127.0.0.1:{settings.api_port}")
    finally:
        if api is not None:
            api.terminate()
            api.wait(30)
        stack.down(settings)


if __name__ == "__main__":
    main()
