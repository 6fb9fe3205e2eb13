"""The query API over HTTP: JSON answers, and CSV exports streamed as ClickHouse
returns the rows.

    GET /healthz                         no token needed
    GET /v1/{question}                   JSON
    GET /v1/{question}.csv               CSV, streamed

Questions: see analytics/queries.py QUESTIONS. Every request carries
``Authorization: Bearer <token>``; the token decides the scope (analytics/scope.py).
Parameters: ``timeframe`` (1h, 24h, 7d, 30d) or ``from`` and ``to`` (ISO 8601 with a
timezone, or epoch milliseconds); optional ``org`` (operators; a scoped caller may
only name its own org), ``api_key``, ``endpoint`` and ``limit``. Anything else is
refused, as is a parameter given twice.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

from clickhouse_connect.driver.client import Client
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from analytics import queries
from analytics.scope import Forbidden, Scope, scope_for_token
from analytics.window import BadWindow, Window, for_range, for_timeframe

log = logging.getLogger(__name__)

PARAMS = {"timeframe", "from", "to", "org", "api_key", "endpoint", "limit"}
MAX_VALUE_CHARS = 256


class BadRequest(ValueError):
    pass


def _parse_time(name: str, text: str) -> int:
    """Epoch milliseconds from an integer or an ISO 8601 time with a timezone."""
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    except ValueError:
        raise BadRequest(f"{name}: expected epoch milliseconds or an ISO 8601 time, got {text[:40]!r}") from None
    if t.tzinfo is None:
        raise BadRequest(f"{name}: give a timezone (e.g. 2025-01-31T10:00:00Z)")
    return round(t.timestamp() * 1000)


def _params(request: Request) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in request.query_params.multi_items():
        if key not in PARAMS:
            raise BadRequest(f"unknown parameter {key[:40]!r}; known: {', '.join(sorted(PARAMS))}")
        if key in out:
            raise BadRequest(f"parameter {key!r} given more than once")
        if len(value) > MAX_VALUE_CHARS:
            raise BadRequest(f"parameter {key!r} is longer than {MAX_VALUE_CHARS} characters")
        out[key] = value
    return out


def _window(p: dict[str, str], retention_days: dict[str, int]) -> Window:
    now_ms = int(time.time() * 1000)
    if "timeframe" in p:
        if "from" in p or "to" in p:
            raise BadRequest("give either timeframe or from/to, not both")
        return for_timeframe(p["timeframe"], now_ms, retention_days)
    if "from" not in p or "to" not in p:
        raise BadRequest("give timeframe (1h, 24h, 7d, 30d) or both from and to")
    return for_range(_parse_time("from", p["from"]), _parse_time("to", p["to"]), now_ms, retention_days)


def _limit(p: dict[str, str]) -> int:
    text = p.get("limit", str(queries.DEFAULT_LIMIT))
    if not text.isdigit() or not 1 <= int(text) <= queries.MAX_LIMIT:
        raise BadRequest(f"limit must be an integer between 1 and {queries.MAX_LIMIT}")
    return int(text)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(tokens: dict[str, str], retention_days: dict[str, int], client: Client,
               connect_for_export: Callable[[], Client]) -> Starlette:
    """``client`` answers the JSON requests (one at a time per client); each CSV export
    gets a client of its own from ``connect_for_export`` so that a slow reader of a long
    export does not hold up everybody else."""

    def authorize(request: Request) -> Scope | None:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        return scope_for_token(token.strip(), tokens) if scheme.lower() == "bearer" else None

    def prepare(request: Request) -> queries.Query | Response:
        scope = authorize(request)
        if scope is None:
            return _error(401, "missing or unknown bearer token")
        question = request.path_params["question"]
        if question not in queries.QUESTIONS:
            return _error(404, f"unknown question; ask one of: {', '.join(queries.QUESTIONS)}")
        try:
            p = _params(request)
            filters = queries.Filters(org_id=p.get("org"), api_key_id=p.get("api_key"), endpoint=p.get("endpoint"))
            return queries.build(question, scope, _window(p, retention_days), filters, _limit(p))
        except Forbidden as exc:
            return _error(403, str(exc))
        except (BadRequest, BadWindow) as exc:
            return _error(400, str(exc))

    def meta(query: queries.Query) -> dict[str, Any]:
        w = query.window
        return {"question": query.question, "from": _iso(w.start_ms), "to": _iso(w.end_ms), "step": w.step,
                "source": query.table.name, "org": query.org_id}

    async def answer_json(request: Request) -> Response:
        query = prepare(request)
        if isinstance(query, Response):
            return query
        try:
            rows = await run_in_threadpool(queries.run, client, query)
        except Exception as exc:  # the driver raises several types; to the caller they all mean the same
            log.warning("query failed", extra={"question": query.question, "error": str(exc)[:500]})
            return _error(503, "the analytics store could not answer; try again")
        return JSONResponse({**meta(query), "columns": list(query.columns), "rows": rows})

    async def answer_csv(request: Request) -> Response:
        query = prepare(request)
        if isinstance(query, Response):
            return query

        def start() -> tuple[Client, Iterator[tuple]]:
            export_client = connect_for_export()
            try:
                return export_client, queries.open_stream(export_client, query)
            except Exception:
                export_client.close()
                raise

        try:
            export_client, rows = await run_in_threadpool(start)
        except Exception as exc:  # as above; failing here still allows a proper status code
            log.warning("export failed", extra={"question": query.question, "error": str(exc)[:500]})
            return _error(503, "the analytics store could not answer; try again")

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
            finally:
                rows.close()
                export_client.close()

        filename = f"quotaflow-{query.question}.csv"
        return StreamingResponse(lines(), media_type="text/csv; charset=utf-8",
                                 headers={"content-disposition": f'attachment; filename="{filename}"',
                                          "x-quotaflow-from": meta(query)["from"], "x-quotaflow-to": meta(query)["to"],
                                          "x-quotaflow-source": query.table.name})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"ok": True})

    return Starlette(routes=[
        Route("/healthz", healthz),
        Route("/v1/{question:str}.csv", answer_csv),
        Route("/v1/{question:str}", answer_json),
    ])
