"""The dashboard: a web page over the query API, served by the same process at ``/``.

    GET /                    the page (static; it signs in with the API's bearer tokens)
    GET /static/...          its script, styles and Chart.js (vendor.py), all from this package; the
                             page asks for each with its content's version (?v=), which the
                             browser keeps without asking again (immutable)
    GET /v1/whoami           the token's scope: {"org": "acme"} or {"org": null} (operators)
    GET /v1/limits           live limit state from Redis (limits.py), JSON
    GET /v1/limits.csv       the same as CSV
    GET /v1/dead_letters     the timeframe's dead letters, operators only (dead_letters.py)

The page asks the query API's questions (analytics/queries.py) itself, all of a view's in one
request (/v1/panels, analytics/app.py), with the token in the Authorization header, never in a URL. It makes no request outside its own origin,
and its Content-Security-Policy says so to the browser too.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from quotaflow.analytics.dashboard import limits as live_limits
from quotaflow.analytics.scope import Forbidden, Scope
from quotaflow.analytics.timing import server_timing
from quotaflow.core.redact import redact
from quotaflow.schemas.ids import id_error, show

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
CHART_JS = STATIC / "vendor" / "chart.umd.min.js"
LIMIT_PARAMS = {"org", "api_key"}
# Everything from this origin; nothing inline, nothing from elsewhere.
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}
# A file of the page asked for with its content's version (?v=, below) never changes under that
# URL: the browser keeps it without asking again, and reuses its compiled script.
IMMUTABLE = "public, max-age=31536000, immutable"
_STATIC_REF = re.compile(r'(src|href)="/static/([^"?]+)"')


def versions() -> dict[str, str]:
    """The page's static files (as index.html names them) and their content's version."""
    page = (STATIC / "index.html").read_text()
    out = {}
    for _, name in _STATIC_REF.findall(page):
        path = STATIC / name
        if path.is_file():  # Chart.js may be missing (see routes): then it is asked for unversioned
            out[name] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return out


def versioned_page(file_versions: dict[str, str]) -> str:
    """index.html with each static file it names asked for with its version."""
    def ref(m: re.Match) -> str:
        v = file_versions.get(m.group(2))
        return m.group(0) if v is None else f'{m.group(1)}="/static/{m.group(2)}?v={v}"'

    return _STATIC_REF.sub(ref, (STATIC / "index.html").read_text())


def _json_error(status: int, message: str) -> JSONResponse:
    headers = {"www-authenticate": 'Bearer realm="quotaflow"'} if status == 401 else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class _Static(StaticFiles):
    """The page's files, with the page's security headers; kept by the browser when asked
    for with their current version."""

    def __init__(self, *args: Any, file_versions: dict[str, str], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._versions = file_versions

    async def get_response(self, path: str, scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        asked = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("v")
        if response.status_code == 200 and asked == [self._versions.get(path)]:
            response.headers["cache-control"] = IMMUTABLE
        return response


def routes(authorize: Callable[[Request], Scope | str], live: live_limits.LiveLimits | None) -> list[BaseRoute]:
    """The dashboard's routes; ``authorize`` is the query API's own (a Scope, or why not),
    ``live`` reads Redis (None: the panel says live state is not available)."""
    if not CHART_JS.is_file():
        log.warning("dashboard: Chart.js is missing (analytics/dashboard/vendor.py fetches it when the package is "
                    "built: make install); the page shows its tables without charts")

    def scope_or_401(request: Request) -> Scope | Response:
        scope = authorize(request)
        return _json_error(401, scope) if isinstance(scope, str) else scope

    file_versions = versions()
    page = versioned_page(file_versions)

    async def index(request: Request) -> Response:
        return HTMLResponse(page, headers=SECURITY_HEADERS)

    async def whoami(request: Request) -> Response:
        scope = scope_or_401(request)
        if isinstance(scope, Response):
            return scope
        return JSONResponse({"org": scope.org_id, "live_limits": live is not None})

    async def state(request: Request) -> live_limits.LiveState | Response:
        scope = scope_or_401(request)
        if isinstance(scope, Response):
            return scope
        p: dict[str, str] = {}
        for key, value in request.query_params.multi_items():
            if key not in LIMIT_PARAMS:
                return _json_error(400, f"unknown parameter {show(key)}; known: {', '.join(sorted(LIMIT_PARAMS))}")
            if key in p:
                return _json_error(400, f"parameter {key!r} given more than once")
            p[key] = value
        try:
            org = scope.org_filter(p.get("org"))  # an org token: always its own org
        except Forbidden as exc:
            return _json_error(403, str(exc))
        for name, value in (("org", org), ("api_key", p.get("api_key"))):
            if value is not None and (problem := id_error(name, value)):
                return _json_error(400, problem)
        if live is None:
            return _json_error(503, "live limit state is not available in this process (no Redis configured)")
        try:
            started = time.perf_counter()
            found = await live.read(org, p.get("api_key"))
            request.state.timing = server_timing(redis=time.perf_counter() - started)
            return found
        except Exception as exc:  # the driver raises several types; to the caller they all mean the same
            log.warning("live limit state failed", extra={"error": redact(str(exc)[:500])})
            return _json_error(503, "Redis did not answer; live limit state is not available right now")

    def row(r: dict[str, Any]) -> dict[str, Any]:
        return {k: _iso(r["reset_ms"]) if k == "reset" else r[k] for k in live_limits.COLUMNS}

    async def limits_json(request: Request) -> Response:
        s = await state(request)
        if isinstance(s, Response):
            return s
        rows = [row(r) for r in s.rows]
        return JSONResponse({"question": "limits", "source": "redis", "now": _iso(s.now_ms), "enforcement": "on" if s.enforcement else "off",
                             "complete": s.complete, "limited_now": len(s.limited),
                             "columns": list(live_limits.COLUMNS), "rows": rows},
                            headers={"server-timing": request.state.timing})

    async def limits_csv(request: Request) -> Response:
        s = await state(request)
        if isinstance(s, Response):
            return s
        buf = io.StringIO()
        out = csv.writer(buf, lineterminator="\n")
        out.writerow(live_limits.COLUMNS)
        for r in s.rows:
            out.writerow(row(r).values())
        return Response(buf.getvalue(), media_type="text/csv; charset=utf-8",
                        headers={"content-disposition": 'attachment; filename="quotaflow-limits.csv"',
                                 "x-quotaflow-enforcement": "on" if s.enforcement else "off",
                                 "x-quotaflow-complete": "true" if s.complete else "false"})

    return [
        Route("/", index),
        Mount("/static", app=_Static(directory=STATIC, file_versions=file_versions), name="static"),
        Route("/v1/whoami", whoami),
        Route("/v1/limits.csv", limits_csv),
        Route("/v1/limits", limits_json),
    ]
