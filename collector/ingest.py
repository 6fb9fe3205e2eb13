"""HTTP ingest: ``POST /v1/events`` for services in other languages (``quotaflow ingest``).

    POST /v1/events     Authorization: Bearer <ingest token> (QUOTAFLOW_INGEST_TOKENS: token ->
                        org id, whose events alone it may publish, or "*" for any org's)
                        or Bearer <an org's API key> holding QUOTAFLOW_INGEST_KEY_SCOPE
                        (events:write): that org's events alone
                        Content-Type: application/json (a JSON array of events) or
                        application/x-ndjson (one event per line); Content-Encoding: gzip accepted
      -> 202 {"accepted": n, "rejected": m, "errors": [{"index", "line", "reasons"}, ...]}: the
             accepted events are on Kafka (acknowledged) or in the disk spool (fsync'd);
             each refused one is named with the schema's reasons (or the org it may not publish)
      -> 400 the body is not what the Content-Type says (bad JSON, bad gzip, empty), or no
             event in it is valid (the same errors as above)
      -> 401 no token, or not one of QUOTAFLOW_INGEST_TOKENS nor a valid API key (the error
             names why: unknown_token, malformed_key, unknown_key, revoked_key, expired_key)
      -> 403 insufficient_scope: an API key without QUOTAFLOW_INGEST_KEY_SCOPE
      -> 413 the body, as sent or decompressed, is over QUOTAFLOW_INGEST_MAX_BODY_BYTES
             (checked while it arrives), or holds more than QUOTAFLOW_INGEST_MAX_EVENTS events
      -> 415 another Content-Type or Content-Encoding
      -> 429 + Retry-After: the producer's memory is full (Kafka or the disk is behind)
      -> 503 + Retry-After: Kafka is unreachable and the spool has no room left, or an API
             key cannot be verified (Redis unreachable)
    GET /metrics, GET /healthz, GET /openapi.json

Every refusal is JSON {"error": code, "reason": words}. Events are published through the
producer core (collector/producer.py): a request is answered once its events are
acknowledged by Kafka or in the spool, so a 202 loses nothing; one answered 503 after
some of its events were published may be sent again whole: the processor and the sink
count and store an event id once. Tokens and keys are never logged: a log line names a
token by its position in the setting (``ingest:token#2``), a key by its id (``key:key_...``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, AsyncIterator

import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import Counter, Histogram
from pydantic import BaseModel, Field
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Route

from quotaflow.collector import ingest_body
from quotaflow.collector.ingest_body import BodyError
from quotaflow.collector.producer import BUFFER_FULL, LOST, ProducerCore
from quotaflow.collector.spool import Record
from quotaflow.core import metrics
from quotaflow.core.settings import Settings
from quotaflow.core.tokens import ALL_ORGS, bearer, owner
from quotaflow.schemas import api_keys
from quotaflow.schemas.events import (
    RequestEvent,
    SchemaError,
    encode_batch,
    json_schema,
    partition_key,
    time_bounds_from_settings,
    validate,
)
from quotaflow.schemas.topics import EVENTS_TOPIC

log = logging.getLogger(__name__)

REQUESTS = Counter("quotaflow_ingest_requests_total", "HTTP ingest requests by answer status", ["status"])
EVENTS = Counter("quotaflow_ingest_events_total", "Events the HTTP ingest took or refused", ["outcome"])
SECONDS = Histogram("quotaflow_ingest_request_seconds", "Time to answer an ingest request, by answer status",
                    ["status"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))

RECORD_EVENTS = 500  # events of one org per Kafka record, as the Python emitter batches them
MAX_ERRORS_SHOWN = 100
RETRY_AFTER_FULL_S = 1
RETRY_AFTER_UNREACHABLE_S = 5
KEY_CHECK_TIMEOUT_S = 2
_UNAUTHORIZED = {"www-authenticate": 'Bearer realm="quotaflow"'}


class EventError(BaseModel):
    index: int = Field(description="the event's position in the body, from 0")
    line: int | None = Field(None, description="its line, from 1 (NDJSON)")
    reasons: list[str]


class Accepted(BaseModel):
    accepted: int
    rejected: int
    errors: list[EventError] = Field(description=f"why each refused event was refused (the first {MAX_ERRORS_SHOWN})")
    errors_truncated: bool = False


class Refusal(BaseModel):
    error: str
    reason: str


_REFUSALS = {status: {"model": Refusal, "description": words} for status, words in (
    (400, "bad JSON or gzip, or no valid event"), (401, "no or an unknown token, or an invalid API key"),
    (403, "an API key without the ingest scope"), (413, "body too large"),
    (415, "unsupported Content-Type or Content-Encoding"), (429, "producer memory full: retry after"),
    (503, "Kafka unreachable and the spool full: retry after"))}


class _Refused(Exception):
    def __init__(self, status: int, code: str, reason: str, headers: dict[str, str] | None = None,
                 extra: dict | None = None):
        self.status, self.code, self.reason, self.headers, self.extra = status, code, reason, headers, extra


def core_from_settings(settings: Settings) -> ProducerCore:
    """The producer core of the ingest process, spooling to QUOTAFLOW_SPOOL_DIR/ingest (a
    directory of its own: a spool is one process's)."""
    return ProducerCore(settings.kafka_bootstrap, spool_dir=settings.spool_dir / "ingest",
                        spool_max_bytes=settings.spool_max_bytes, spool_segment_bytes=settings.spool_segment_bytes,
                        spool_topics=(EVENTS_TOPIC,), memory_bytes=settings.collector_memory_bytes,
                        delivery_timeout_s=settings.collector_delivery_timeout_s)


def create_app(settings: Settings, core: ProducerCore | None = None) -> FastAPI:
    """The app; it starts (and stops) its own producer core unless given one."""
    tokens = settings.ingest_tokens
    key_secrets = tuple(secret.encode() for secret in settings.key_hash_secrets.values())
    key_scope = settings.ingest_key_scope
    bounds = time_bounds_from_settings(settings)
    limit, max_events, max_line = settings.ingest_max_body_bytes, settings.ingest_max_events, \
        settings.ingest_max_line_bytes

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own = core is None
        app.state.core = core_from_settings(settings) if own else core
        # the key registry, read when a caller presents an API key
        app.state.redis = aioredis.Redis.from_url(settings.redis_url, decode_responses=True) if key_secrets else None
        if own:
            await app.state.core.start()
        try:
            yield
        finally:
            if own:
                await app.state.core.stop()
            if app.state.redis is not None:
                await app.state.redis.aclose()

    app = FastAPI(title="quotaflow ingest", version="1", lifespan=lifespan, description=__doc__.split("\n\n")[0],
                  docs_url=None, redoc_url=None)
    app.state.core = core

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        return JSONResponse({"error": code,
                             "reason": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, Any]:
        return {"ok": True}

    app.router.routes.append(Route("/metrics", metrics.asgi_app))  # at /metrics itself (a mount redirects there)

    async def who(request: Request) -> tuple[str, str]:
        """(the caller as logs may name it, the org whose events it may publish or ALL_ORGS)"""
        try:
            token = bearer(request.headers.getlist("authorization"))
        except ValueError as exc:
            raise _Refused(401, "missing_token", str(exc), _UNAUTHORIZED) from None
        found = owner(token, tokens)
        if found is not None:
            return f"ingest:token#{found[0]}", found[1]
        if not (key_secrets and token.startswith(api_keys.PREFIX + "_")):
            raise _Refused(401, "unknown_token", "unknown bearer token", _UNAUTHORIZED)
        identity = await key_owner(request.app.state.redis, token)
        if identity.outcome == api_keys.INSUFFICIENT_SCOPE:
            raise _Refused(403, identity.outcome, f"this API key lacks the scope {key_scope}")
        if identity.outcome != api_keys.ACTIVE:
            raise _Refused(401, identity.outcome, api_keys.KEY_REASONS[identity.outcome], _UNAUTHORIZED)
        return f"key:{identity.key_id}", identity.org_id

    async def key_owner(redis: aioredis.Redis, presented: str) -> api_keys.KeyIdentity:
        """The presented key's record, judged as the gateway's check judges it: a bad shape or
        checksum refused offline, then one round trip for its record under each secret."""
        try:
            names = api_keys.record_names(presented, key_secrets)
        except api_keys.InvalidKey as exc:
            raise _Refused(401, api_keys.MALFORMED_KEY, str(exc), _UNAUTHORIZED) from None
        try:
            async with asyncio.timeout(KEY_CHECK_TIMEOUT_S):
                async with redis.pipeline(transaction=False) as pipe:
                    for name in names:
                        pipe.hgetall(name)
                    records = await pipe.execute()
        except (RedisError, TimeoutError) as exc:
            log.warning("API key registry unreachable", extra={"error": type(exc).__name__})
            raise _Refused(503, "key_check_unavailable", "API keys cannot be verified now (the key registry is "
                                                         "unreachable); retry later",
                           {"retry-after": str(RETRY_AFTER_UNREACHABLE_S)}) from None
        return api_keys.record_outcome(next((r for r in records if r), None), int(time.time() * 1000), key_scope)

    def judge(items: list[ingest_body.Item], org: str) -> tuple[list[RequestEvent], list[dict]]:
        received = int(time.time() * 1000)
        accepted, errors = [], []
        for index, item in enumerate(items):
            reasons = [item.error] if item.error else None
            if reasons is None:
                try:
                    event = validate(item.doc)
                except SchemaError as exc:
                    reasons = exc.errors
                else:
                    if org != ALL_ORGS and event.org_id != org:
                        reasons = ["org_id: this token or key publishes the events of its own org only"]
                    elif problem := bounds.error(event.ts_ms, received):
                        reasons = [problem.replace("the broker received the record", "the ingest received it")]
                    else:
                        accepted.append(event)
                        continue
            errors.append({"index": index, "line": item.line, "reasons": reasons})
        return accepted, errors

    def records(events: list[RequestEvent]) -> list[Record]:
        by_org: dict[str, list[RequestEvent]] = {}
        for event in events:
            by_org.setdefault(event.org_id, []).append(event)
        out = []
        for org_id, evs in by_org.items():
            for i in range(0, len(evs), RECORD_EVENTS):
                chunk = evs[i:i + RECORD_EVENTS]
                value = chunk[0].encode() if len(chunk) == 1 else encode_batch(chunk)
                out.append(Record(EVENTS_TOPIC, partition_key(org_id), value, events=len(chunk)))
        return out

    def pushed_back(producer: ProducerCore, size: int) -> None:
        why = producer.pressure(size)
        if why == BUFFER_FULL:
            raise _Refused(429, "buffer_full", "the producer's memory is full (Kafka or the disk is behind); "
                                               "retry after a moment", {"retry-after": str(RETRY_AFTER_FULL_S)})
        if why is not None:
            raise _Refused(503, "broker_unreachable", "Kafka is unreachable and the disk spool has no room left; "
                                                      "retry later", {"retry-after": str(RETRY_AFTER_UNREACHABLE_S)})

    async def publish(producer: ProducerCore, events: list[RequestEvent]) -> None:
        out = records(events)
        pushed_back(producer, sum(r.size for r in out))
        outcomes = [producer.submit(r, want_outcome=True) for r in out]
        results = await asyncio.gather(*outcomes)
        lost = sum(r.events for r, result in zip(out, results) if result == LOST)
        if lost:
            raise _Refused(503, "unavailable", f"{lost} of {len(events)} events could not be published; send the "
                                               "request again (an event is counted once by its event_id)",
                           {"retry-after": str(RETRY_AFTER_UNREACHABLE_S)})

    @app.post("/v1/events", status_code=202, response_model=Accepted, tags=["events"], responses=_REFUSALS,
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": {"type": "array", "items": json_schema()}},
                  "application/x-ndjson": {"schema": {"type": "string",
                                                      "description": "one event (a JSON object) per line"}}}}})
    async def post_events(request: Request) -> JSONResponse:
        """Publish request events: a JSON array, or NDJSON; gzip accepted."""
        started = time.perf_counter()
        caller = None
        try:
            caller, org = await who(request)
            ndjson, gzip = ingest_body.media(request.headers.get("content-type"),
                                             request.headers.get("content-encoding"))
            ingest_body.declared_length(request.headers.get("content-length"), limit)
            pushed_back(request.app.state.core, 0)  # before reading a body that could not be kept
            body = await ingest_body.read(request.stream(), limit=limit, gzip=gzip)
            items = ingest_body.items(body, ndjson=ndjson, max_events=max_events, max_line=max_line)
            del body
            accepted, errors = judge(items, org)
            shown = errors[:MAX_ERRORS_SHOWN]
            answer = {"accepted": len(accepted), "rejected": len(errors), "errors": shown,
                      "errors_truncated": len(errors) > len(shown)}
            if not accepted:
                raise _Refused(400, "no_valid_events", "no event in the body is valid: see errors", extra=answer)
            await publish(request.app.state.core, accepted)
        except BodyError as exc:
            return _refuse(exc.status, exc.code, exc.reason, None, None, caller, started)
        except ClientDisconnect:  # gone before its body arrived: nothing was published, no one reads an answer
            return _refuse(400, "client_disconnected", "the client closed the connection before the body's end",
                           None, None, caller, started)
        except _Refused as exc:
            return _refuse(exc.status, exc.code, exc.reason, exc.headers, exc.extra, caller, started)
        EVENTS.labels("accepted").inc(len(accepted))
        EVENTS.labels("rejected").inc(len(errors))
        REQUESTS.labels("202").inc()
        SECONDS.labels("202").observe(time.perf_counter() - started)
        log.debug("events ingested", extra={"accepted": len(accepted), "rejected": len(errors),
                                            "caller": caller})
        return JSONResponse(answer, status_code=202)

    return app


def _refuse(status: int, code: str, reason: str, headers: dict[str, str] | None, extra: dict | None,
            caller: str | None, started: float) -> JSONResponse:
    REQUESTS.labels(str(status)).inc()
    SECONDS.labels(str(status)).observe(time.perf_counter() - started)
    if extra:
        EVENTS.labels("rejected").inc(extra["rejected"])
    level = logging.WARNING if status in (429, 503) else logging.INFO
    log.log(level, "ingest request refused", extra={"status": status, "error": code, "reason": reason[:300],
                                                   "caller": caller})
    return JSONResponse({"error": code, "reason": reason, **(extra or {})}, status_code=status, headers=headers)


def serve(settings: Settings, *, host: str, log_config: dict) -> None:
    """Serve the app with uvicorn: no access log (a query string may carry a secret), the
    request head bounded."""
    import uvicorn

    uvicorn.run(create_app(settings), host=host, port=settings.ingest_port, access_log=False, log_config=log_config,
                h11_max_incomplete_event_size=64 * 1024, timeout_graceful_shutdown=15)
