"""The dashboard in a real browser: Debian's chromium driven by Playwright, against the
real stack (Kafka, the processor writing Redis, the sink storing into the embedded
engine and serving the page). Known traffic is published; the numbers the page shows,
read from the accessible tables behind its charts, must be what was sent.

Also: sign-in, an org token seeing nothing of another org, filters in the URL
reproducing a view, auto-refresh picking up new events (the page's clock is Playwright's,
so the 10 s refresh is stepped, not waited for), CSV downloads, a phone-sized layout, and
that the page asks nothing of any origin but its own. Screenshots are saved under the
test's tmp dir and in .dashboard-artifacts/ (gitignored).

Chromium comes from Debian's packages (installed when missing, as redis-server is);
Playwright for Python is a test dependency and is pointed at it, since no browser build
can be downloaded here.
"""

from __future__ import annotations

import asyncio
import calendar
import csv
import hashlib
import io
import os
import random
import shutil
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import orjson
import pytest

from quotaflow.schemas.redis_keys import ENFORCEMENT_KEY, ENFORCEMENT_OFF, ORG_TIER_FIELD, org_key, overrides_key
from tests.pipeline import Pipeline, event, publish, unique, wait_for

pytestmark = pytest.mark.stack
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / ".dashboard-artifacts"
MINUTE, DAY = 60_000, 86_400_000
STATUSES = (200, 200, 200, 201, 204, 301, 400, 404, 429, 500, 503)
ENDPOINTS = (("GET", "/v1/orders"), ("GET", "/v1/orders/{id}"), ("POST", "/v1/orders"), ("DELETE", "/v1/users/{id}"))
HOT_LIMIT, HOT_SENT = 5, 8  # the hot key's day limit (an override) and what it sends: limited now


def browser_path() -> str:
    """Debian's chromium (and its driver, as the issue asks), installed when missing."""
    from quotaflow.core.errors import OperatorError
    from quotaflow.deploy.system_packages import ensure_command

    try:
        ensure_command("chromedriver", "chromium-driver")
        return ensure_command("chromium", "chromium")
    except OperatorError as exc:
        pytest.fail(f"the dashboard tests need Debian's chromium and could not install it: {exc}", pytrace=False)


class Traffic:
    """What this module sends: two orgs with tokens of their own, and an operator token."""

    def __init__(self, settings):
        self.a, self.b = unique("dash-a"), unique("dash-b")
        self.tok_a, self.tok_b, self.tok_ops = unique("tok-a"), unique("tok-b"), unique("tok-ops")
        self.tokens = {self.tok_a: self.a, self.tok_b: self.b, self.tok_ops: "*"}
        self.base = f"http://127.0.0.1:{settings.api_port}"
        self.hot = f"{self.a}-hot"
        self.events: list = []

    def make(self, org: str, n: int, seed: int, max_age_ms: int, min_age_ms: int = 0) -> list:
        rnd = random.Random(seed)
        now = int(time.time() * 1000)
        out = []
        for _ in range(n):
            method, endpoint = rnd.choice(ENDPOINTS)
            out.append(event(org, f"{org}-{rnd.choice(['web', 'batch', 'mobile'])}",
                             now - rnd.randrange(min_age_ms, max_age_ms), method=method, endpoint=endpoint,
                             status=rnd.choice(STATUSES), latency_ms=round(rnd.uniform(1, 900), 3),
                             response_bytes=rnd.randrange(50_000)))
        return out

    def of(self, org: str, since_ms: int = 0) -> list:
        return [e for e in self.events if e.org_id == org and e.ts_ms >= since_ms]


@pytest.fixture(scope="module")
def traffic(live_stack):
    import redis

    t = Traffic(live_stack)
    r = redis.Redis.from_url(live_stack.redis_url)
    r.hset(org_key(t.a), ORG_TIER_FIELD, "ENTERPRISE")  # the org itself is far from its limits
    r.hset(overrides_key(t.a, t.hot), "86400s", HOT_LIMIT)  # as `quotaflow key set-limit` does
    os.environ["QUOTAFLOW_API_TOKENS"] = orjson.dumps(t.tokens).decode()
    pipeline = Pipeline(live_stack)
    try:
        pipeline.start("processor")
        pipeline.start("sink")
        now = int(time.time() * 1000)
        t.events = (t.make(t.a, 300, 1, 50 * MINUTE) + t.make(t.a, 40, 2, 4 * DAY, 2 * DAY)
                    + t.make(t.b, 120, 3, 50 * MINUTE)
                    + [event(t.a, t.hot, now - i, endpoint="/v1/search", method="POST") for i in range(HOT_SENT)])
        asyncio.run(publish(live_stack, t.events))
        pipeline.wait_sink_caught_up()
        pipeline.wait_processor_applied(r)
        t.pipeline, t.redis = pipeline, r
        yield t
    finally:
        pipeline.stop_all()
        os.environ.pop("QUOTAFLOW_API_TOKENS", None)
        r.close()


@pytest.fixture(scope="module")
def browser(traffic):
    from playwright.sync_api import sync_playwright

    path = browser_path()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=["--no-sandbox"])
        yield b
        b.close()


class Page:
    """One tab on the dashboard, recording every request it makes and every console error."""

    def __init__(self, browser, traffic, shots: Path, **context):
        self.traffic = traffic
        self.context = browser.new_context(accept_downloads=True, **context)
        self.page = self.context.new_page()
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.shots = shots
        self.page.on("request", lambda req: self.requests.append(req.url))
        self.page.on("console", lambda msg: msg.type == "error" and self.errors.append(msg.text))
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))

    def open(self, query: str = "", token: str | None = None) -> float:
        """Load the page (signing in with ``token``) and wait for every panel; the time it took, ms."""
        started = time.perf_counter()
        self.page.goto(self.traffic.base + "/" + (f"?{query}" if query else ""))
        if token is not None:
            self.page.fill("#token", token)
            self.page.click("#signin button[type=submit]")
        return self.wait_loaded(1, started)

    def loads(self) -> int:
        return int(self.page.evaluate("Number(document.body.dataset.loads || 0)"))

    def wait_loaded(self, at_least: int, started: float | None = None) -> float:
        started = time.perf_counter() if started is None else started
        # Polled from here: the page's Content-Security-Policy refuses the eval behind wait_for_function.
        wait_for(lambda: self.loads() >= at_least, 60, f"the page's load #{at_least} (every panel answered)",
                 lambda: f"errors: {self.errors}; status: {self.page.text_content('#status')!r}, "
                         f"{self.page.text_content('#error')!r}")
        return (time.perf_counter() - started) * 1000

    def tile(self, field: str) -> str:
        return self.page.locator(f"#panel-summary dd[data-field={field}]").text_content()

    def table(self, panel: str) -> list[dict[str, str]]:
        """The rows of a panel's table, as the page shows them (column key -> text)."""
        return self.page.evaluate("""panel => Array.from(document.querySelectorAll(`#panel-${panel} tbody tr`))
            .filter(tr => tr.querySelector('td[data-col]'))
            .map(tr => Object.fromEntries(Array.from(tr.querySelectorAll('td')).map(td => [td.dataset.col, td.textContent])))""",
                                  panel)

    def fetch_status(self, path: str, token: str) -> int:
        return self.page.evaluate("""([path, token]) => fetch(path, {headers: {Authorization: 'Bearer ' + token}})
            .then(r => r.status)""", [path, token])

    def screenshot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copy(path, ARTIFACTS / path.name)
        return path

    def check_clean(self, refused: tuple[int, ...] = ()) -> None:
        """Nothing asked of another origin; no script error or CSP refusal. ``refused``:
        statuses the test provoked on purpose (the browser logs each as an error)."""
        foreign = [u for u in self.requests if not (u.startswith(self.traffic.base + "/") or u.startswith(("blob:", "data:")))]
        assert not foreign, f"the page asked outside its origin: {foreign}"
        expected = tuple(f"the server responded with a status of {s} " for s in refused)
        errors = [e for e in self.errors if not any(x in e for x in expected)]
        assert not errors, f"console errors: {errors}"

    def close(self) -> None:
        self.context.close()


@pytest.fixture()
def tab(browser, traffic, tmp_path):
    pages: list[Page] = []

    def make(**context) -> Page:
        pages.append(Page(browser, traffic, tmp_path, **context))
        return pages[-1]

    yield make
    for p in pages:
        p.close()


def off_loop(fn):
    """Run ``fn`` in a thread of its own: Playwright's sync API holds an event loop in this
    one, and the helpers publishing to Kafka or asking it run loops of their own."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result()


def n(text: str) -> int:
    return int(text.replace(",", ""))


def test_sign_in_and_the_numbers_match_what_was_sent(tab, traffic):
    t = traffic
    page = tab()
    page.page.goto(t.base + "/?timeframe=1h")
    page.page.fill("#token", "not-a-token")
    page.page.click("#signin button[type=submit]")
    wait_for(lambda: page.page.text_content("#signin-error"), 30, "the sign-in to be refused")
    assert "not accepted" in page.page.text_content("#signin-error")
    assert page.page.is_hidden("#board")

    page.page.fill("#token", t.tok_a)
    started = time.perf_counter()
    page.page.click("#signin button[type=submit]")
    load_ms = page.wait_loaded(1, started)
    recent = t.of(t.a, since_ms=int(time.time() * 1000) - 55 * MINUTE)
    assert n(page.tile("requests")) == len(recent)
    assert n(page.tile("errors")) == sum(e.status >= 500 for e in recent)  # "errors" are server errors
    assert n(page.tile("denials")) == sum(e.status == 429 for e in recent)
    assert page.page.text_content("#who") == f"Org: {t.a}"
    assert page.page.is_hidden("#org-field")  # no org selector for an org token

    assert {int(r["status"]): n(r["requests"]) for r in page.table("status")} == Counter(e.status for e in recent)
    assert {(r["method"], r["endpoint"]): n(r["requests"]) for r in page.table("endpoints")} == \
        Counter((e.method, e.endpoint) for e in recent)
    assert {r["api_key_id"]: n(r["requests"]) for r in page.table("api_keys")} == Counter(e.api_key_id for e in recent)
    volume = page.table("volume")
    assert len(volume) == 60  # one row per minute of the hour, empty ones too
    assert sum(n(r["requests"]) for r in volume) == len(recent)
    minute = lambda e: time.strftime("%Y-%m-%dT%H:%M:00Z", time.gmtime(e.ts_ms // 1000))  # noqa: E731
    by_minute = Counter(minute(e) for e in recent)
    assert {r["bucket"]: n(r["requests"]) for r in volume if n(r["requests"])} == by_minute
    status_class = lambda s: "429" if s == 429 else f"{s // 100}xx"  # noqa: E731
    by_class = Counter((minute(e), status_class(e.status)) for e in recent)
    assert {(r["bucket"], c): n(r[f"status_{c}"]) for r in volume for c in ("1xx", "2xx", "3xx", "4xx", "429", "5xx")
            if n(r[f"status_{c}"])} == by_class
    assert len(page.table("latency")) == len(by_minute)  # buckets with requests only
    assert [r["org_id"] for r in page.table("orgs")] == [t.a]

    # The query API's questions came in one request (/v1/panels), none of them one by one.
    api = [u.split("/v1/", 1)[1].split("?", 1)[0] for u in page.requests if "/v1/" in u]
    assert sorted(api) == ["limits", "panels", "whoami", "whoami"], api  # whoami: the refused token and ours

    # The charts are drawn (Chart.js loaded from the package), one per charted panel.
    assert page.page.evaluate("Object.keys(Chart.instances).length") == 7
    page.screenshot("dashboard-org-1h")
    page.check_clean(refused=(401,))
    print(f"\ndashboard first load (sign-in to every panel rendered): {load_ms:.0f} ms")

    # The token is kept for the session: a reload needs no sign-in.
    page.page.reload()
    page.wait_loaded(1)
    assert n(page.tile("requests")) == len(recent)
    page.page.click("#signout")
    assert page.page.is_visible("#signin")
    assert page.page.evaluate("sessionStorage.length") == 0


def test_an_org_token_sees_nothing_of_another_org(tab, traffic):
    t = traffic
    page = tab()
    page.open(f"timeframe=1h&org={t.b}", token=t.tok_a)  # naming B in the URL
    assert t.b not in page.page.url  # the page shows its own org, and says so in the URL
    recent_a = t.of(t.a, since_ms=int(time.time() * 1000) - 55 * MINUTE)
    assert n(page.tile("requests")) == len(recent_a)
    html = page.page.content()
    assert t.b not in html and all(e.api_key_id not in html for e in t.of(t.b))
    # Asking by hand, with the page's own token: refused, by the query API and the live state.
    for path in (f"/v1/summary?timeframe=1h&org={t.b}", f"/v1/volume.csv?timeframe=1h&org={t.b}",
                 f"/v1/panels?timeframe=1h&org={t.b}&questions=summary,orgs",
                 f"/v1/limits?org={t.b}", f"/v1/limits.csv?org={t.b}"):
        assert page.fetch_status(path, t.tok_a) == 403, path
    assert page.fetch_status("/v1/limits", "not-a-token") == 401
    limits = page.table("limits")
    assert limits and {r["org_id"] for r in limits} == {t.a}
    page.check_clean(refused=(401, 403))


def test_operator_filters_in_the_url_reproduce_the_view(tab, traffic):
    t = traffic
    page = tab()
    page.open("timeframe=24h", token=t.tok_ops)
    assert page.page.text_content("#who") == "Operator: every org"
    options = lambda: page.page.eval_on_selector_all("#org option", "os => os.map(o => o.value)")  # noqa: E731
    wait_for(lambda: {t.a, t.b} <= set(options()), 30, "the org selector to list both orgs")  # filled after the panels
    # An operator's ranking has both orgs, as sent.
    orgs = {r["org_id"]: n(r["requests"]) for r in page.table("orgs")}
    since = int(time.time() * 1000) - 23 * 3_600_000
    assert orgs[t.a] == len(t.of(t.a, since)) and orgs[t.b] == len(t.of(t.b, since))

    key = f"{t.a}-web"
    page.page.select_option("#timeframe", "7d")
    page.page.select_option("#org", t.a)
    page.page.fill("#api_key", key)
    page.page.fill("#endpoint", "/v1/orders/{id}")
    before = page.loads()
    page.page.click("#filters button[type=submit]")
    page.wait_loaded(before + 1)
    url = page.page.url
    assert "timeframe=7d" in url and f"org={t.a}" in url and f"api_key={key}" in url and "endpoint=" in url
    sent = [e for e in t.of(t.a) if e.api_key_id == key and e.endpoint == "/v1/orders/{id}"]
    assert sent and any(e.ts_ms < time.time() * 1000 - DAY for e in sent)  # 7d covers the older events too
    assert n(page.tile("requests")) == len(sent)
    shown = {panel: page.table(panel) for panel in ("status", "endpoints", "api_keys", "volume")}

    # The link alone, in another browser (no session), reproduces the view.
    other = tab()
    other.open(url.split("?", 1)[1], token=t.tok_ops)
    assert other.page.url == url
    assert other.page.input_value("#org") == t.a and other.page.input_value("#api_key") == key
    assert n(other.tile("requests")) == len(sent)
    assert {panel: other.table(panel) for panel in shown} == shown

    # A custom range from the URL: only the older events of A.
    start = time.strftime("%Y-%m-%dT%H:%M:00Z", time.gmtime(time.time() - 5 * 86400))
    end = time.strftime("%Y-%m-%dT%H:%M:00Z", time.gmtime(time.time() - 86400))
    custom = tab()
    custom.open(f"from={start}&to={end}&org={t.a}", token=t.tok_ops)
    assert custom.page.input_value("#timeframe") == "custom"
    assert custom.page.is_visible("#from")
    s_ms = calendar.timegm(time.strptime(start, "%Y-%m-%dT%H:%M:%SZ")) * 1000
    e_ms = calendar.timegm(time.strptime(end, "%Y-%m-%dT%H:%M:%SZ")) * 1000
    assert n(custom.tile("requests")) == sum(s_ms <= e.ts_ms < e_ms for e in t.of(t.a))
    custom.check_clean()
    page.screenshot("dashboard-operator-filtered")
    page.check_clean()


def test_live_limit_state_and_the_enforcement_switch(tab, traffic):
    t = traffic
    page = tab()
    page.page.clock.install()
    page.open("timeframe=1h", token=t.tok_a)
    rows = page.table("limits")
    hot = [r for r in rows if r["api_key_id"] == t.hot and r["window"] == "86400s"]
    assert len(hot) == 1, rows
    assert (n(hot[0]["limit"]), n(hot[0]["used"]), n(hot[0]["remaining"]), hot[0]["limited"]) == \
        (HOT_LIMIT, HOT_SENT, 0, "yes")
    assert rows[0]["limited"] == "yes"  # the limited come first
    limited = {r["api_key_id"] for r in rows if r["limited"] == "yes"}
    assert limited == {t.hot}
    assert page.page.get_attribute("#panel-limits", "data-limited-now") == "1"
    assert page.page.text_content("#enforcement") == "Enforcement on"
    # The org's own row: every A event of today, under its ENTERPRISE limit.
    org_day = [r for r in rows if r["api_key_id"] == "(whole org)" and r["window"] == "86400s"]
    assert len(org_day) == 1 and org_day[0]["tier"] == "ENTERPRISE" and org_day[0]["limited"] == "no"

    t.redis.set(ENFORCEMENT_KEY, ENFORCEMENT_OFF)
    try:
        before = page.loads()
        page.page.clock.fast_forward(10_000)
        page.wait_loaded(before + 1)
        assert page.page.text_content("#enforcement") == "Enforcement off"
        page.screenshot("dashboard-enforcement-off")
    finally:
        t.redis.delete(ENFORCEMENT_KEY)
    page.check_clean()


def test_auto_refresh_picks_up_new_events_and_pauses(tab, traffic):
    t = traffic
    page = tab()
    page.page.clock.install()
    page.open("timeframe=1h", token=t.tok_b)
    # From here the page's time moves only when the test moves it.
    page.page.clock.pause_at(page.page.evaluate("Date.now()") + 10)
    shown = n(page.tile("requests"))
    assert shown == len(t.of(t.b, int(time.time() * 1000) - 55 * MINUTE))
    assert page.page.get_attribute("#refresh-toggle", "aria-pressed") == "false"

    extra = [event(t.b, f"{t.b}-late", int(time.time() * 1000), status=503) for _ in range(7)]
    off_loop(lambda: asyncio.run(publish(t.pipeline.settings, extra)))
    off_loop(t.pipeline.wait_sink_caught_up)
    t.events += extra
    loads = page.loads()
    page.page.clock.fast_forward(9_000)  # not yet: the refresh is every 10 s
    assert page.loads() == loads
    page.page.clock.fast_forward(1_000)
    page.wait_loaded(loads + 1)
    assert n(page.tile("requests")) == shown + 7
    assert {r["api_key_id"]: n(r["requests"]) for r in page.table("api_keys")}[f"{t.b}-late"] == 7

    page.page.click("#refresh-toggle")
    assert page.page.get_attribute("#refresh-toggle", "aria-pressed") == "true"
    loads = page.loads()
    page.page.clock.fast_forward(60_000)
    assert page.loads() == loads  # paused: six periods, no refresh
    page.page.click("#refresh-toggle")  # resuming refreshes at once
    page.wait_loaded(loads + 1)
    page.check_clean()


def test_csv_download_of_a_panel(tab, traffic):
    t = traffic
    page = tab()
    page.open("timeframe=1h", token=t.tok_a)
    recent = t.of(t.a, since_ms=int(time.time() * 1000) - 55 * MINUTE)
    for question in ("endpoints", "limits"):
        with page.page.expect_download() as info:
            page.page.click(f"#panel-{question} button.csv")
        download = info.value
        assert download.suggested_filename == f"quotaflow-{question}.csv"
        rows = list(csv.DictReader(io.StringIO(Path(download.path()).read_text())))
        if question == "endpoints":
            assert {(r["method"], r["endpoint"]): int(r["requests"]) for r in rows} == \
                Counter((e.method, e.endpoint) for e in recent)
        else:
            hot = [r for r in rows if r["api_key_id"] == t.hot and r["window"] == "86400s"]
            assert [(r["limit"], r["used"], r["limited"]) for r in hot] == [(str(HOT_LIMIT), str(HOT_SENT), "True")]
    page.check_clean()


def test_phone_sized_and_accessible(tab, traffic):
    t = traffic
    page = tab(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True, has_touch=True)
    page.open("timeframe=24h", token=t.tok_a)
    width = page.page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1], f"the page scrolls sideways on a phone: {width}"
    # Every control has a label; every chart a text alternative and a table with headers.
    unlabeled = page.page.evaluate("""Array.from(document.querySelectorAll('input, select'))
        .filter(el => !el.labels || el.labels.length === 0).map(el => el.id)""")
    assert unlabeled == []
    assert page.page.evaluate("""Array.from(document.querySelectorAll('canvas'))
        .every(c => c.getAttribute('role') === 'img' && c.getAttribute('aria-label'))""")
    assert page.page.evaluate("""Array.from(document.querySelectorAll('.panel:not([hidden]) table'))
        .every(t => t.caption && t.tHead.querySelectorAll('th[scope=col]').length > 0)""")
    # The keyboard reaches the filters and applies them.
    page.page.focus("#timeframe")
    page.page.keyboard.press("Tab")
    assert page.page.evaluate("document.activeElement.id") == "api_key"
    page.screenshot("dashboard-phone")
    page.check_clean()


def test_the_page_and_its_chart_library_come_from_the_package(traffic):
    """Chart.js as served is the pinned file (analytics/dashboard/vendor.sha256), and the
    page tells the browser to load nothing from elsewhere."""
    from quotaflow.analytics.dashboard import vendor

    _, _, digests = vendor.pins()
    served = httpx.get(traffic.base + "/static/vendor/chart.umd.min.js", timeout=10)
    assert served.status_code == 200
    assert hashlib.sha256(served.content).hexdigest() == digests["package/dist/chart.umd.min.js"]
    page = httpx.get(traffic.base + "/", timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "script-src 'self'" in csp
    assert httpx.get(traffic.base + "/static/../app.py", timeout=10).status_code == 404


def test_the_operators_sql_box(tab, traffic):
    t = traffic
    page = tab()
    page.open("timeframe=1h", token=t.tok_ops)
    assert page.page.is_visible("#panel-sql")
    page.page.fill("#sql", f"SELECT api_key_id, count() AS n FROM requests WHERE org_id = '{t.b}' "
                           "GROUP BY api_key_id ORDER BY api_key_id")
    page.page.click("#sql-form button[type=submit]")
    wait_for(lambda: "rows in" in page.page.text_content("#sql-summary") or page.page.text_content("#sql-error"), 60,
             "the statement's answer")
    assert {r["api_key_id"]: n(r["n"]) for r in page.table("sql")} == Counter(e.api_key_id for e in t.of(t.b))
    page.page.select_option("#sql-format", "csv")
    with page.page.expect_download() as info:
        page.page.click("#sql-form button[type=submit]")
    rows = list(csv.DictReader(io.StringIO(Path(info.value.path()).read_text())))
    assert {r["api_key_id"]: int(r["n"]) for r in rows} == Counter(e.api_key_id for e in t.of(t.b))
    page.page.fill("#sql", "DROP TABLE requests")
    page.page.select_option("#sql-format", "json")
    page.page.click("#sql-form button[type=submit]")
    wait_for(lambda: page.page.text_content("#sql-error"), 60, "the refusal")
    assert "READONLY" in page.page.text_content("#sql-error")
    page.check_clean(refused=(400,))
    # An org token has no SQL box, and the endpoint refuses it.
    org = tab()
    org.open("timeframe=1h", token=t.tok_a)
    assert org.page.is_hidden("#panel-sql")
    assert org.fetch_status("/v1/sql", t.tok_a) in (404, 405)  # GET: no such thing
    assert org.page.evaluate("""token => fetch('/v1/sql', {method: 'POST', body: 'SELECT 1',
        headers: {Authorization: 'Bearer ' + token}}).then(r => r.status)""", t.tok_a) == 403
    org.check_clean(refused=(403, 404, 405))


def test_alerts_panel_shows_the_orgs_transitions_newest_first(tab, traffic):
    """Alert history records on their topic, as the alerts stage writes them, stored by the
    sink: the panel lists the org's transitions newest first (not its delivery attempts,
    nor another org's), and counts the alerts whose last transition is firing."""
    from aiokafka import AIOKafkaProducer

    from quotaflow.schemas.alert_history import DELIVERY, TRANSITION, HistoryRecord
    from quotaflow.schemas.topics import ALERT_HISTORY_TOPIC

    t = traffic
    now = int(time.time() * 1000)
    rule = {"rule_org_id": t.b, "rule_type": "usage_threshold", "severity": "high"}

    def transition(i: int, org: str, fp: str, rule_id: str, kind: str, to: str, ago_s: int) -> HistoryRecord:
        return HistoryRecord(record=TRANSITION, row_id=unique("row"), at_ms=now - ago_s * 1000, org_id=org,
                             fingerprint=fp, rule_id=rule_id, kind=kind, from_status="", to_status=to,
                             value=80.0 + i, threshold=80.0, notification_id=f"msg_{i}", **rule)

    records = [transition(1, t.b, "fp-a", "usage-80", "firing", "firing", 300),
               transition(2, t.b, "fp-b", "errors-5", "firing", "firing", 200),
               transition(3, t.b, "fp-b", "errors-5", "resolved", "inactive", 100),
               transition(4, t.a, "fp-c", "usage-90", "firing", "firing", 50),  # another org's
               HistoryRecord(record=DELIVERY, row_id=unique("row"), at_ms=now - 250_000, org_id=t.b, fingerprint="fp-a",
                             rule_id="usage-80", kind="firing", notification_id="msg_1", channel="ops-hook",
                             attempt=1, outcome="ok", **rule)]

    async def send() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=t.pipeline.settings.kafka_bootstrap, acks="all")
        await producer.start()
        try:
            for r in records:
                await producer.send_and_wait(ALERT_HISTORY_TOPIC, r.encode(), key=r.org_id.encode())
        finally:
            await producer.stop()

    off_loop(lambda: asyncio.run(send()))
    headers = {"Authorization": f"Bearer {t.tok_b}"}
    wait_for(lambda: len(httpx.get(f"{t.base}/v1/alerts", params={"timeframe": "1h"}, headers=headers,
                                   timeout=10).json().get("rows", [])) == 4, 60, "the sink to store the alert history")

    page = tab()
    page.open("timeframe=1h", token=t.tok_b)
    rows = page.table("alerts")
    assert [(r["rule_id"], r["kind"], r["to_status"]) for r in rows] == [
        ("errors-5", "resolved", "inactive"), ("errors-5", "firing", "firing"), ("usage-80", "firing", "firing")]
    assert page.page.get_attribute("#panel-alerts", "data-firing") == "1"
    assert page.page.text_content("#alerts-firing").startswith("1 firing now")
    page.check_clean()


def test_dead_letters_panel_for_operators_only_never_their_content(tab, traffic):
    """Records the processor refuses, read back from the dead-letter topic: an operator's
    page counts them by stage and field and lists the newest with their reasons, never
    their content; an org token sees no such panel and gets 403 from the endpoint."""
    t = traffic
    secret = unique("never-shown")
    bad = [dict(event(t.b, f"{t.b}-web", int(time.time() * 1000)).to_dict(), status="teapot", user_agent=secret)
           for _ in range(3)]
    raw = [(t.b.encode(), orjson.dumps(b)) for b in bad]
    off_loop(lambda: asyncio.run(publish(t.pipeline.settings, [], raw=raw)))

    ops = {"Authorization": f"Bearer {t.tok_ops}"}

    def status_refusals() -> int:
        got = httpx.get(f"{t.base}/v1/dead_letters", params={"timeframe": "1h"}, headers=ops, timeout=15).json()
        return sum(r["count"] for r in got["by_reason"] if (r["stage"], r["field"]) == ("processor", "status"))

    wait_for(lambda: status_refusals() >= 3, 60, "the processor to dead-letter the records",
             lambda: httpx.get(f"{t.base}/v1/dead_letters", params={"timeframe": "1h"}, headers=ops, timeout=15).text)
    answer = httpx.get(f"{t.base}/v1/dead_letters", params={"timeframe": "1h"}, headers=ops, timeout=15)
    assert answer.status_code == 200 and secret not in answer.text
    csv_answer = httpx.get(f"{t.base}/v1/dead_letters.csv", params={"timeframe": "1h"}, headers=ops, timeout=15)
    assert csv_answer.status_code == 200 and secret not in csv_answer.text and "processor" in csv_answer.text
    org = httpx.get(f"{t.base}/v1/dead_letters", headers={"Authorization": f"Bearer {t.tok_b}"}, timeout=15)
    assert org.status_code == 403 and "operator" in org.json()["error"]
    bad_param = httpx.get(f"{t.base}/v1/dead_letters", params={"timeframe": "2h"}, headers=ops, timeout=15)
    assert bad_param.status_code == 400 and "timeframe" in bad_param.json()["error"]

    page = tab()
    page.open("timeframe=1h", token=t.tok_ops)
    assert page.page.is_visible("#panel-dead_letters")
    by = page.page.evaluate("""() => Array.from(document.querySelectorAll('#dead-letters-by tbody tr'))
        .map(tr => Array.from(tr.querySelectorAll('td')).map(td => td.textContent))""")
    assert ["processor", "status"] in [row[:2] for row in by] and int(dict(
        ((r[0], r[1]), r[2]) for r in by)[("processor", "status")].replace(",", "")) >= 3
    recent = page.page.text_content("#dead-letters-recent")
    assert "status: must be" in recent and secret not in page.page.content()
    page.check_clean()

    mine = tab()
    mine.open("timeframe=1h", token=t.tok_b)
    assert mine.page.is_hidden("#panel-dead_letters")
    assert not any("/v1/dead_letters" in u for u in mine.requests)
    mine.check_clean()
