"""Ad-hoc SQL for operators: ``POST /v1/sql`` runs one read-only statement on the
analytics store and answers in JSON, CSV or Parquet (``?format=json|csv|parquet``).

With the embedded engine only the sink process may open ClickHouse, so analysts cannot
point a client of their own at it; this is their way in. Against a ClickHouse server
they can connect directly (README).

Who: operator tokens only. SQL cannot be scoped to one org (any statement may read any
row), so an org token is refused (403), whatever the statement.

Bounds, all enforced by ClickHouse itself:
- ``readonly=1``: reads only, no setting may be changed by the statement (its own
  ``SETTINGS`` clause or ``SET``), and no table function that reaches outside the store
  (``file``, ``url``, ``executable``, ...): ClickHouse refuses them all in this mode.
- execution time and memory: the query API's own bounds (QUOTAFLOW_API_QUERY_TIMEOUT_S,
  QUOTAFLOW_API_QUERY_MAX_MEMORY_BYTES).
- result size: ``max_result_rows`` and ``max_result_bytes`` (MAX_RESULT_ROWS,
  MAX_RESULT_BYTES), with ``result_overflow_mode=throw``: a larger answer is refused
  (503 naming the bound), never cut short silently.
- one statement of at most MAX_SQL_BYTES; at most MAX_CONCURRENT at once (503 with
  Retry-After beyond).

Each statement gets a ClickHouse client of its own, closed after it: the embedded
engine's driver applies settings as SETs on the client's session, and a session left
in readonly=1 (or after a refused result, see analytics/queries.py) must not be the one
the dashboard's questions use.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import anyio
from clickhouse_connect.driver.client import Client
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from quotaflow.analytics.queries import Bounds
from quotaflow.analytics.scope import Scope
from quotaflow.core.redact import redact
from quotaflow.schemas.clickhouse.client import ClickHouseUnavailable
from quotaflow.schemas.ids import show

log = logging.getLogger(__name__)

FORMATS = {  # ?format= -> (ClickHouse output format, media type)
    "json": ("JSON", "application/json"),
    "csv": ("CSVWithNames", "text/csv; charset=utf-8"),
    "parquet": ("Parquet", "application/vnd.apache.parquet"),
}
MAX_SQL_BYTES = 64 * 1024
MAX_RESULT_ROWS = 100_000
MAX_RESULT_BYTES = 64 * 1024 * 1024
MAX_CONCURRENT = 2


def settings(bounds: Bounds) -> dict[str, Any]:
    """The statement's bounds; readonly comes last, since the engine's driver applies them
    one SET at a time and none may follow readonly=1."""
    return {"max_execution_time": bounds.max_execution_time_s, "timeout_overflow_mode": "throw",
            "max_memory_usage": bounds.max_memory_usage,
            "max_result_rows": MAX_RESULT_ROWS, "max_result_bytes": MAX_RESULT_BYTES, "result_overflow_mode": "throw",
            "readonly": 1}


def one_statement(sql: str) -> str | None:
    """Why ``sql`` is not one statement, or None. The embedded engine runs every statement
    of a multi-statement text; a ';' anywhere but at the end is refused (in a string
    literal too: write char(59) there)."""
    body = sql.strip().rstrip(";").strip()
    if not body:
        return "the body is empty; send one SQL statement"
    if ";" in body:
        return "send one statement: ';' may only end it (in a string, write char(59))"
    return None


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _engine_reason(exc: BaseException) -> str:
    """ClickHouse's own reason, first line, bounded and redacted: what the analyst needs
    to fix the statement."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return redact(text[:500])


def routes(authorize: Callable[[Request], Scope | str], connect: Callable[[], Client], bounds: Bounds) -> list[BaseRoute]:
    slots = anyio.Semaphore(MAX_CONCURRENT)

    def run(sql: str, fmt: str) -> bytes:
        client = connect()
        try:
            return client.raw_query(sql, fmt=fmt, settings=settings(bounds))
        finally:
            client.close()

    async def answer(request: Request) -> Response:
        scope = authorize(request)
        if isinstance(scope, str):
            return _error(401, scope, {"www-authenticate": 'Bearer realm="quotaflow"'})
        if scope.org_id is not None:
            return _error(403, "ad-hoc SQL needs an operator token: a statement cannot be limited to one org")
        params = dict(request.query_params)
        unknown = set(params) - {"format"}
        if unknown or len(request.query_params.multi_items()) > len(params):
            return _error(400, f"unknown or repeated parameter; known: format ({', '.join(FORMATS)})")
        name = params.get("format", "json")
        if name not in FORMATS:
            return _error(400, f"format: one of {', '.join(FORMATS)}, got {show(name)}")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_SQL_BYTES:
                return _error(413, f"the statement is longer than {MAX_SQL_BYTES} bytes")
        try:
            sql = body.decode("utf-8")
        except UnicodeDecodeError:
            return _error(400, "the body must be the SQL statement in UTF-8")
        if problem := one_statement(sql):
            return _error(400, problem)
        fmt, media_type = FORMATS[name]
        try:
            slots.acquire_nowait()
        except anyio.WouldBlock:
            return _error(503, f"{MAX_CONCURRENT} ad-hoc statements are running; try again shortly", {"retry-after": "1"})
        try:
            with anyio.CancelScope(shield=True):  # the slot is held until the engine is done
                data = await run_in_threadpool(run, sql, fmt)
        except ClickHouseUnavailable as exc:
            log.warning("ad-hoc statement: no store", extra={"error": redact(str(exc)[:500])})
            return _error(503, "the analytics store could not be reached; try again")
        except Exception as exc:  # the driver raises several types; the engine's reason decides
            reason = _engine_reason(exc)
            if "TIMEOUT_EXCEEDED" in reason:
                return _error(503, f"the statement exceeded max_execution_time={bounds.max_execution_time_s:g}s")
            if "MEMORY_LIMIT_EXCEEDED" in reason:
                return _error(503, f"the statement exceeded max_memory_usage={bounds.max_memory_usage} bytes")
            if "TOO_MANY_ROWS_OR_BYTES" in reason:
                return _error(503, f"the answer exceeds max_result_rows={MAX_RESULT_ROWS} or "
                                   f"max_result_bytes={MAX_RESULT_BYTES}; aggregate, or add a LIMIT")
            log.info("ad-hoc statement refused", extra={"error": reason})
            return _error(400, f"the analytics store refused the statement: {reason}")
        finally:
            slots.release()
        headers = {}
        if name != "json":
            headers["content-disposition"] = f'attachment; filename="quotaflow-sql.{name}"'
        return Response(data, media_type=media_type, headers=headers)

    return [Route("/v1/sql", answer, methods=["POST"])]
