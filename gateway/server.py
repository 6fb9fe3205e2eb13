"""The HTTP check endpoint, for gateways that are not Python.

    GET|POST /check        X-Api-Key-Id, X-Org-Id request headers
      -> 200 (admitted) or 429 (refused), with the rate-limit headers, and
         X-Quotaflow-Event-Id / X-Quotaflow-Event-Ts: publish the request's event
         with these so the processors release the reservation exactly.
      -> 401 when either header is missing; 400 when one is not an id by the rule
         of schemas/ids.py, with the reason (header and rule) in the body and in
         X-Quotaflow-Error. Nothing is read from or written to Redis then.
      -> 431 when the request line and headers exceed protocol.MAX_HEAD_BYTES.
    GET /metrics           Prometheus metrics of this process (quotaflow/core/metrics.py)

Envoy's ext_authz (HTTP mode) forwards a refusal's status and headers as they
are. nginx's auth_request only understands 2xx, 401 and 403, so nginx asks with
``?deny_status=403&invalid_status=401``, maps 403 to 429 and a 401 carrying
X-Quotaflow-Error to 400 itself (see deploy/nginx/quotaflow.conf).
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from quotaflow.core import metrics
from quotaflow.gateway import identity
from quotaflow.gateway.headers import rate_limit_headers
from quotaflow.gateway.limiter import RateLimiter
from quotaflow.gateway.protocol import MAX_HEAD_BYTES, BoundedH11Protocol

DENY_STATUSES = {"429": 429, "403": 403, "401": 401}
INVALID_STATUSES = {"400": 400, "401": 401, "403": 403}
ERROR_HEADER = "X-Quotaflow-Error"


def create_app(limiter: RateLimiter) -> Starlette:
    async def check(request: Request) -> Response:
        key, org = request.headers.get("x-api-key-id"), request.headers.get("x-org-id")
        if not key or not org:
            return PlainTextResponse("X-Api-Key-Id and X-Org-Id headers are required\n", status_code=401)
        deny_status = DENY_STATUSES.get(request.query_params.get("deny_status", "429"))
        if deny_status is None:
            return PlainTextResponse("deny_status must be 429, 403 or 401\n", status_code=400)
        invalid_status = INVALID_STATUSES.get(request.query_params.get("invalid_status", "400"))
        if invalid_status is None:
            return PlainTextResponse("invalid_status must be 400, 401 or 403\n", status_code=400)
        refused = identity.problem(key, org)
        if refused:
            return JSONResponse({"error": "invalid identity", "reason": refused}, status_code=invalid_status,
                                headers={ERROR_HEADER: refused})
        d = await limiter.check(key, org)
        headers = dict(rate_limit_headers(d))
        if d.event_id:
            headers["X-Quotaflow-Event-Id"] = d.event_id
            headers["X-Quotaflow-Event-Ts"] = str(d.now_ms)
        if d.allowed:
            return Response(status_code=200, headers=headers)
        return JSONResponse({"error": "rate limit exceeded", "window": d.denied_by, "retry_after_s": d.retry_after_s},
                            status_code=deny_status, headers=headers)

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    @asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        await limiter.aclose()

    return Starlette(routes=[Route("/check", check, methods=["GET", "POST", "HEAD"]), Route("/healthz", healthz),
                             Route("/metrics", metrics.asgi_app)],
                     lifespan=lifespan)


def serve(limiter: RateLimiter, *, host: str, port: int, log_config: dict) -> None:
    """Serve the endpoint with uvicorn, its HTTP limits set here rather than left to
    defaults: h11 with the bounded protocol (431 for a head too large, an answer the
    client can read), no access log (paths and headers may carry secrets)."""
    import uvicorn

    uvicorn.run(create_app(limiter), host=host, port=port, log_config=log_config, access_log=False,
                http=BoundedH11Protocol, h11_max_incomplete_event_size=MAX_HEAD_BYTES)
