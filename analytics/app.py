"""The query API over HTTP: JSON answers, and CSV exports streamed as ClickHouse
returns the rows.

    GET /healthz                         no token needed
    GET /metrics                         no token needed: Prometheus metrics of this process
    GET /v1/{question}                   JSON
    GET /v1/{question}.csv               CSV, streamed
    GET /v1/panels?questions=...         several questions of one view in one request (NDJSON, streamed)

Questions: see analytics/queries.py QUESTIONS. Every request carries
``Authorization: Bearer <token>``; the token decides the scope (analytics/scope.py).
Parameters: ``timeframe`` (1h, 24h, 7d, 30d) or ``from`` and ``to`` (ISO 8601 with a
timezone, or epoch milliseconds); optional ``org`` (operators; a scoped caller may
only name its own org), ``api_key``, ``endpoint`` and ``limit``. Anything else is
refused, as is a parameter given twice.

``/v1/panels`` answers a dashboard view's questions together: the same parameters but
``limit``, and ``questions``, a comma-separated list of questions, each optionally with its
limit (``summary,endpoints:20,orgs:50``). The answer is NDJSON, one line per question as
soon as its query is done: exactly what ``/v1/{question}`` would say for the same view, or
``{"question", "error", "status"}`` for a query that failed alone (stopped by a bound, say),
each with ``query_ms`` and ``query_of`` (the questions its query answered). One query slot
serves them all, one after another on one client (analytics/panels.py plans them): the
embedded engine answers one query at a time anyway, and one request spares the page nine
round trips and the queueing between them.

Every input is hostile: a parameter or header the API cannot use is answered 400 (401
for the token) with a reason naming it, never a 500; a filter that could never match
anything stored (an org or key outside the id rule, an endpoint that is not a route
template) is refused rather than answered with nothing. Queries run within bounds
(analytics/queries.py Bounds) and at most ``max_concurrent`` at once; a query stopped
by a bound, or a request that finds no free slot, is answered 503 naming the bound.
"""

from __future__ import annotations

import csv
import io
import logging
import re
import time
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Callable, Iterator

import anyio
import orjson
from clickhouse_connect.driver.client import Client
from prometheus_client import Counter, Gauge
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Send
from starlette.types import Scope as AsgiScope

from quotaflow.analytics import adhoc, dashboard, panels, queries
from quotaflow.analytics.dashboard.dead_letters import DeadLetters
from quotaflow.analytics.dashboard.dead_letters import routes as dead_letter_routes
from quotaflow.analytics.scope import ALL_ORGS, Forbidden, Scope, scope_for_token
from quotaflow.analytics.timing import server_timing
from quotaflow.analytics.window import BadTimeRange, TimeRange, for_range, for_timeframe
from quotaflow.core import metrics
from quotaflow.core.redact import redact
from quotaflow.core.settings import ConfigError
from quotaflow.core.tokens import bearer
from quotaflow.schemas.events import ENDPOINT_MAX, ENDPOINT_PATTERN
from quotaflow.schemas.ids import ID_RULE, id_error, is_valid_id, show

log = logging.getLogger(__name__)

PARAMS = {"timeframe", "from", "to", "org", "api_key", "endpoint", "limit"}
PANELS_PARAMS = PARAMS - {"limit"} | {"questions"}
MAX_VALUE_CHARS = 256
# ASCII digits only: str.isdigit() and int() also take "²" or "٣". 16 digits cover every
# millisecond from 1970 to 2100 and then some; longer numbers are refused before int().
_EPOCH_MS = re.compile(r"-?[0-9]{1,16}")
_LIMIT = re.compile(r"[0-9]{1,7}")
_ENDPOINT = re.compile(ENDPOINT_PATTERN)
RETRY_AFTER_S = 1

QUERIES_RUNNING = Gauge("quotaflow_api_queries_running", "query API queries running (exports included)")
QUERIES_WAITING = Gauge("quotaflow_api_queries_waiting", "query API requests waiting for a query slot")
REFUSED = Counter("quotaflow_api_refused_total", "query API requests answered 503 by a bound", ["bound"])


class BadRequest(ValueError):
    pass


def _parse_time(name: str, text: str) -> int:
    """Epoch milliseconds from an integer or an ISO 8601 time with a timezone."""
    if _EPOCH_MS.fullmatch(text):
        return int(text)
    if re.fullmatch(r"-?[0-9]+", text):
        raise BadRequest(f"{name}: epoch milliseconds out of range, got {show(text)}")
    expected = f"{name}: expected epoch milliseconds or an ISO 8601 time with a timezone, got {show(text)}"
    if not text.isascii():
        raise BadRequest(expected)
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    except ValueError:
        raise BadRequest(expected) from None
    if t.tzinfo is None:
        raise BadRequest(f"{name}: give a timezone (e.g. 2025-01-31T10:00:00Z)")
    try:
        return round(t.timestamp() * 1000)
    except (ValueError, OverflowError):  # year 1 or 9999 shifted out of range by its offset
        raise BadRequest(f"{name}: time out of range, got {show(text)}") from None


def _params(request: Request, known: set[str] = PARAMS) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in request.query_params.multi_items():
        if key not in known:
            raise BadRequest(f"unknown parameter {show(key)}; known: {', '.join(sorted(known))}")
        if key in out:
            raise BadRequest(f"parameter {key!r} given more than once")
        if len(value) > MAX_VALUE_CHARS:
            raise BadRequest(f"parameter {key!r} is longer than {MAX_VALUE_CHARS} characters")
        out[key] = value
    return out


def _time_range(p: dict[str, str], retention_days: dict[str, int], now_ms: int) -> TimeRange:
    """The time range asked for; a timeframe ends with the step ``now_ms`` is in."""
    if "timeframe" in p:
        if "from" in p or "to" in p:
            raise BadRequest("timeframe: give either timeframe or from/to, not both")
        return for_timeframe(p["timeframe"], now_ms, retention_days)
    if "from" not in p or "to" not in p:
        raise BadRequest("timeframe: give timeframe (1h, 24h, 7d, 30d) or both from and to")
    start, end = _parse_time("from", p["from"]), _parse_time("to", p["to"])
    try:
        return for_range(start, end, now_ms, retention_days)
    except BadTimeRange as exc:
        raise BadRequest(f"from/to: {exc}") from None


def _limit(p: dict[str, str]) -> int:
    return _limit_value("limit", p.get("limit", str(queries.DEFAULT_LIMIT)))


def _limit_value(name: str, text: str) -> int:
    if not _LIMIT.fullmatch(text) or not 1 <= int(text) <= queries.MAX_LIMIT:
        raise BadRequest(f"{name}: must be an integer between 1 and {queries.MAX_LIMIT}, got {show(text)}")
    return int(text)


def _questions(p: dict[str, str]) -> dict[str, int]:
    """The questions of /v1/panels and each one's limit, in the order asked."""
    text = p.get("questions")
    if not text:
        raise BadRequest(f"questions: give a comma-separated list of questions, each optionally with its limit "
                         f"(summary,endpoints:20); known: {', '.join(queries.QUESTIONS)}")
    out: dict[str, int] = {}
    for item in text.split(","):
        question, colon, limit = item.partition(":")
        if question not in queries.QUESTIONS:
            raise BadRequest(f"questions: unknown question {show(question)}; known: {', '.join(queries.QUESTIONS)}")
        if question in out:
            raise BadRequest(f"questions: {question!r} asked more than once")
        out[question] = _limit_value(f"questions: the limit of {question!r}", limit) if colon else queries.DEFAULT_LIMIT
    return out


def _filters(p: dict[str, str], scope: Scope) -> queries.Filters:
    """The filters asked for, each refused if nothing stored could ever match it."""
    org = p.get("org")
    if org is not None:
        scope.org_filter(org)  # a scoped caller naming anything but its own org: 403, whatever it is
        if problem := id_error("org", org):
            raise BadRequest(problem)
    api_key = p.get("api_key")
    if api_key is not None and (problem := id_error("api_key", api_key)):
        raise BadRequest(problem)
    endpoint = p.get("endpoint")
    if endpoint is not None and (len(endpoint) > ENDPOINT_MAX or not _ENDPOINT.fullmatch(endpoint)):
        raise BadRequest(f"endpoint: must be a route template as events carry it (/v1/users/{{id}}, never a raw id "
                         f"or a query string), up to {ENDPOINT_MAX} characters, got {show(endpoint)}")
    return queries.Filters(org_id=org, api_key_id=api_key, endpoint=endpoint)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def check_tokens(tokens: dict[str, str]) -> None:
    """Each token must map to '*' or a valid org id; the message names the token by its
    position only."""
    for n, org in enumerate(tokens.values(), 1):
        if org != ALL_ORGS and not is_valid_id(org):
            raise ConfigError(f"QUOTAFLOW_API_TOKENS: token #{n} maps to {show(org)}, which is neither "
                              f"'*' (every org) nor an org id ({ID_RULE})")


class _Streamed(StreamingResponse):
    """A streamed answer (a CSV export, a view's panels) that gives its query slot back
    when the response ends, however it ends (done, failed, client gone)."""

    def __init__(self, *args: Any, release: Callable[[], None], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._release = release

    async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except _ExportAborted:
            # Already logged with its reason. Returning without finishing the body makes the
            # server cut the connection: the client sees a broken export, not a short one.
            pass
        finally:
            self._release()


class _ExportAborted(Exception):
    pass


def create_app(tokens: dict[str, str], retention_days: dict[str, int], client: Client,
               connect_for_export: Callable[[], Client], bounds: queries.Bounds = queries.Bounds(),
               max_concurrent: int = 4, queue_wait_s: float = 1.0,
               clock: Callable[[], float] = time.time, live: dashboard.limits.LiveLimits | None = None,
               dead_letters: DeadLetters | None = None) -> Starlette:
    """``client`` answers the JSON requests (one at a time per client); each CSV export
    gets a client of its own from ``connect_for_export`` so that a slow reader of a long
    export does not hold up everybody else. At most ``max_concurrent`` queries run at
    once (exports until their last row is sent); a request waits up to ``queue_wait_s``
    for a slot, then gets 503 with Retry-After. ``clock`` (epoch seconds) is what a
    timeframe ends at, and which data retention still covers: the wall clock, or a
    given one in tests. ``live`` reads the live limit state from Redis for the dashboard
    (analytics/dashboard/), which is served at ``/``; ``dead_letters`` reads the dead-letter
    topic back for operators (analytics/dashboard/dead_letters.py)."""
    check_tokens(tokens)
    slots = anyio.Semaphore(max_concurrent)

    async def acquire() -> bool:
        try:
            slots.acquire_nowait()
        except anyio.WouldBlock:
            with QUERIES_WAITING.track_inprogress(), anyio.move_on_after(queue_wait_s):
                await slots.acquire()
                return _running(+1)
            REFUSED.labels("max_concurrent_queries").inc()
            return False
        return _running(+1)

    def _running(delta: int) -> bool:
        QUERIES_RUNNING.inc(delta)
        return True

    def release() -> None:
        QUERIES_RUNNING.dec()
        slots.release()

    def busy() -> Response:
        return _error(503, f"too many queries at once (max_concurrent_queries={max_concurrent}); try again shortly",
                      {"retry-after": str(RETRY_AFTER_S)})

    def authorize(request: Request) -> Scope | str:
        """The caller's scope, or why it has none (for a 401)."""
        try:
            token = bearer(request.headers.getlist("authorization"))
        except ValueError as exc:
            return str(exc)
        return scope_for_token(token, tokens) or "unknown bearer token"

    def prepare(request: Request) -> queries.Query | Response:
        scope = authorize(request)
        if isinstance(scope, str):
            return _error(401, scope, {"www-authenticate": 'Bearer realm="quotaflow"'})
        question = request.path_params["question"]
        if question not in queries.QUESTIONS:
            return _error(404, f"unknown question; ask one of: {', '.join(queries.QUESTIONS)}")
        try:
            p = _params(request)
            filters = _filters(p, scope)
            time_range = _time_range(p, retention_days, int(clock() * 1000))
            return queries.build(question, scope, time_range, filters, _limit(p))
        except Forbidden as exc:
            return _error(403, str(exc))
        except (BadRequest, BadTimeRange) as exc:
            return _error(400, str(exc))

    def prepare_panels(request: Request) -> list[panels.Step] | Response:
        """The queries of a view's questions (/v1/panels), checked as one request: every
        question shares the view's parameters, so one refusal answers them all."""
        scope = authorize(request)
        if isinstance(scope, str):
            return _error(401, scope, {"www-authenticate": 'Bearer realm="quotaflow"'})
        try:
            p = _params(request, PANELS_PARAMS)
            asked = _questions(p)
            filters = _filters(p, scope)
            time_range = _time_range(p, retention_days, int(clock() * 1000))
            return panels.plan([queries.build(question, scope, time_range, filters, limit)
                                for question, limit in asked.items()], filters)
        except Forbidden as exc:
            return _error(403, str(exc))
        except (BadRequest, BadTimeRange) as exc:
            return _error(400, str(exc))

    def meta(query: queries.Query) -> dict[str, Any]:
        r = query.time_range
        return {"question": query.question, "from": _iso(r.start_ms), "to": _iso(r.end_ms), "step": r.step,
                "source": query.table.name, "org": query.org_id}

    def why_failed(query: queries.Query, exc: BaseException, what: str) -> str:
        """Logged and counted; the reason for the caller (a 503's)."""
        hit = queries.bound_hit(exc, bounds)
        if hit is not None:
            REFUSED.labels(hit.setting).inc()
            log.warning(f"{what} stopped by a bound", extra={"question": query.question, "bound": hit.setting})
            return hit.message
        log.warning(f"{what} failed", extra={"question": query.question, "error": redact(str(exc)[:500])})
        return "the analytics store could not answer; try again"

    def failed(query: queries.Query, exc: BaseException, what: str) -> Response:
        return _error(503, why_failed(query, exc, what))

    async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
        # Shielded: a query keeps its slot until ClickHouse is done with it, even when
        # the caller has gone, so the bound on queries running at once is exact.
        with anyio.CancelScope(shield=True):
            return await run_in_threadpool(fn, *args)

    async def answer_json(request: Request) -> Response:
        query = prepare(request)
        if isinstance(query, Response):
            return query
        arrived = time.perf_counter()
        if not await acquire():
            return busy()
        started = time.perf_counter()
        try:
            rows = await in_thread(queries.run, client, query, bounds)
        except Exception as exc:  # the driver raises several types; to the caller they all mean the same
            return failed(query, exc, "query")
        finally:
            release()
        done = time.perf_counter()
        # Where a request's time went, for the browser's Resource Timing (bench/dashboard.py
        # reads it): waiting for a query slot, then the query (ClickHouse and the rows).
        timing = server_timing(slot=started - arrived, query=done - started)
        return JSONResponse({**meta(query), "columns": list(query.columns), "rows": rows},
                            headers={"server-timing": timing})

    async def answer_panels(request: Request) -> Response:
        prepared = prepare_panels(request)
        if isinstance(prepared, Response):
            return prepared
        arrived = time.perf_counter()
        if not await acquire():
            return busy()
        waited = time.perf_counter() - arrived

        async def lines() -> AsyncIterator[bytes]:
            # Each answer as soon as its query is done, so that the page draws it while the
            # next one runs. The slot is held until the last (released by _Streamed).
            for step in prepared:
                began = time.perf_counter()
                try:
                    rows = await in_thread(step.run, client, bounds)
                except Exception as exc:  # as in answer_json, but for this step's questions alone
                    reason = why_failed(step.queries[0], exc, "query")
                    answers = [{"question": q.question, "error": reason, "status": 503} for q in step.queries]
                else:
                    answers = [{**meta(q), "columns": list(q.columns), "rows": rows[q.question]} for q in step.queries]
                took = round((time.perf_counter() - began) * 1000, 1)
                yield b"".join(orjson.dumps({**a, "query_ms": took, "query_of": step.name}) + b"\n" for a in answers)

        return _Streamed(lines(), media_type="application/x-ndjson", release=release,
                         headers={"server-timing": server_timing(slot=waited)})

    async def answer_csv(request: Request) -> Response:
        query = prepare(request)
        if isinstance(query, Response):
            return query
        if not await acquire():
            return busy()

        def start() -> tuple[Client, Iterator[tuple]]:
            export_client = connect_for_export()
            try:
                return export_client, queries.open_stream(export_client, query, bounds)
            except Exception:
                export_client.close()
                raise

        try:
            export_client, rows = await in_thread(start)
        except Exception as exc:  # as above; failing here still allows a proper status code
            release()
            return failed(query, exc, "export")

        def lines() -> Iterator[str]:
            buf = io.StringIO()
            out = csv.writer(buf, lineterminator="\n")
            try:
                out.writerow(query.columns)
                for n, row in enumerate(rows, 1):
                    out.writerow(row)
                    if n % 1000 == 0:
                        yield buf.getvalue()
                        buf.seek(0)
                        buf.truncate()
                yield buf.getvalue()
            except Exception as exc:  # the status is sent: all that is left is to say why and cut it
                hit = queries.bound_hit(exc, bounds)
                log.warning("export cut short", extra={"question": query.question,
                                                       "bound": hit.setting if hit else None,
                                                       "error": redact(str(exc)[:500])})
                raise _ExportAborted() from None
            finally:
                rows.close()
                export_client.close()

        filename = f"quotaflow-{query.question}.csv"
        return _Streamed(lines(), media_type="text/csv; charset=utf-8", release=release,
                       headers={"content-disposition": f'attachment; filename="{filename}"',
                                "x-quotaflow-from": meta(query)["from"], "x-quotaflow-to": meta(query)["to"],
                                "x-quotaflow-source": query.table.name})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def http_error(request: Request, exc: Exception) -> Response:
        # Starlette's own answers (no such route, method not allowed) with a reason too.
        assert isinstance(exc, HTTPException)
        return _error(exc.status_code, exc.detail or "error", dict(exc.headers or {}))

    app = Starlette(routes=[
        Route("/healthz", healthz),
        Route("/metrics", metrics.asgi_app),
        *dashboard.routes(authorize, live),
        *dead_letter_routes(authorize, dead_letters, clock),  # GET /v1/dead_letters, operators only
        *adhoc.routes(authorize, connect_for_export, bounds),  # POST /v1/sql, operators only
        Route("/v1/panels", answer_panels),
        Route("/v1/{question:str}.csv", answer_csv),
        Route("/v1/{question:str}", answer_json),
    ], exception_handlers={HTTPException: http_error})
    # No redirect of /v1/x/ to /v1/x: nothing is there to find, and building the redirect
    # from a query string that is not UTF-8 raised (a 500).
    app.router.redirect_slashes = False
    return app
