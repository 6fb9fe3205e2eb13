"""The admin HTTP API of the key registry: what `quotaflow keys` does, as JSON over HTTP,
for operators' tools (served by `quotaflow admin`).

    GET    /v1/orgs/{org_id}/keys                    an org's keys (never a secret)
    POST   /v1/orgs/{org_id}/keys                    create a key: 201, the key in the answer, once
    GET    /v1/orgs/{org_id}/keys/{key_id}           one key, and when it was last used
    PATCH  /v1/orgs/{org_id}/keys/{key_id}           change name, scopes, limits or expiry
    POST   /v1/orgs/{org_id}/keys/{key_id}/revoke    revoke it (final)
    POST   /v1/orgs/{org_id}/keys/{key_id}/rotate    a new key replacing it; the old one valid for an overlap
    GET    /openapi.json                             the schema of all of this (no token needed)

Only operator tokens (QUOTAFLOW_API_TOKENS entries mapped to "*") may call it: an org's
token reads its analytics, it does not mint keys. The audit records the token by its
position in that setting (``api:token#2``), never the token. Errors are JSON
``{"error": reason}``: 400 for a request the registry refuses (the reason names the field),
401/403 for the token, 404 for an unknown key, 503 when Kafka or Redis cannot be reached
or the registry in Redis is behind the topic (then nothing was changed). A change is
answered once the broker has it; ``visible_ms`` says how long the processor took to put
it in Redis, where gateways see it (null: not yet, it will be once the processor runs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, AsyncIterator, Literal

from aiokafka.errors import KafkaError
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException

from quotaflow.core import metrics
from quotaflow.core.errors import OperatorError
from quotaflow.core.redact import redact
from quotaflow.core.settings import ConfigError, Settings
from quotaflow.core.tokens import ALL_ORGS, bearer, owner
from quotaflow.keys.changes import KEEP, OVERLAP_MAX_MS, InvalidChange, check_id
from quotaflow.keys.registry import Issued, KeyNotFound, Published, Registry, now_ms, public

log = logging.getLogger(__name__)
OVERLAP_MAX_S = OVERLAP_MAX_MS // 1000


class Key(BaseModel):
    """A key as lists and shows give it: never its secret or its hash."""

    key_id: str
    org_id: str
    name: str
    env: str
    display_prefix: str = Field(description="the key's first characters, to tell keys apart")
    state: Literal["active", "revoked", "expired"] = Field(description="as of the answer")
    scopes: list[str]
    limits: dict[str, int] = Field(description="the key's own limit per window label (e.g. 60s); others: its tier's")
    expires_ms: int | None
    created_ms: int
    updated_ms: int
    version: int
    change: str = Field(description="the last change: create, update, revoke or rotate")
    actor: str = Field(description="who made the last change")
    rotated_from: str | None
    rotated_to: str | None
    secret_id: str = Field(description="the id of the server secret the key's hash is keyed with (not a secret)")


class KeyShown(Key):
    last_used_ms: int | None = Field(description="the last request the processor counted, within the longest window")


class Change(BaseModel):
    changed: bool = Field(description="false: the key already was so, nothing recorded")
    visible_ms: float | None = Field(description="broker acknowledgement to Redis holding it; null: not yet")


class ChangedKey(Change):
    key: Key


class IssuedKey(Key):
    key: str = Field(description="the API key itself: shown in this answer only, quotaflow keeps its hash")
    visible_ms: float | None


class RotatedKey(BaseModel):
    new: IssuedKey
    old: Key = Field(description="the replaced key: valid until its expires_ms (the end of the overlap)")


class NewKey(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    env: Literal["live", "test"] = "live"
    scopes: list[str] = []
    limits: dict[str, int] = Field({}, description="window label (e.g. 60s) -> limit, at most the org's tier")
    expires_ms: int | None = Field(None, description="epoch milliseconds; null: never")


class KeyUpdate(BaseModel):
    """What is given changes; what is left out stays."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: str | None = None
    scopes: list[str] | None = None
    limits: dict[str, int | None] | None = Field(None, description="a patch: a window given null loses its limit")
    expires_ms: int | None = Field(None, description="epoch milliseconds; null: never")


class Problem(BaseModel):
    error: str = Field(description="what is wrong, naming the field, the token rule or the service")


ERRORS: dict[int | str, dict[str, Any]] = {status: {"model": Problem, "description": what} for status, what in (
    (400, "refused: the reason names the field"), (401, "no token, or not one of QUOTAFLOW_API_TOKENS"),
    (403, "not an operator token"), (404, "no such key in that org"),
    (503, "Kafka or Redis unreachable, or the registry in Redis behind the keys topic: nothing changed"))}


class Rotation(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    overlap_s: int = Field(ge=0, le=OVERLAP_MAX_S, description="how long the old key stays valid; 0: it expires now")


def _visible(published: Published | None) -> float | None:
    return None if published is None or published.visible_ms is None else round(published.visible_ms, 3)


def _issued(issued: Issued) -> IssuedKey:
    return IssuedKey(**public(issued.record, issued.record.created_ms), key=issued.key,
                     visible_ms=_visible(issued.published))


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def create_app(settings: Settings, registry: Registry | None = None) -> FastAPI:
    """The app; it starts its own Registry (Kafka producer, Redis) unless given one."""
    tokens = settings.api_tokens
    lock = asyncio.Lock()  # one change at a time: they share the registry's clients, and are rare

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.registry = registry or Registry(settings)
        if registry is None:
            await app.state.registry.start()
        try:
            yield
        finally:
            if registry is None:
                await app.state.registry.stop()

    app = FastAPI(title="quotaflow admin API", version="1", lifespan=lifespan,
                  description=__doc__.split("\n\n")[0],
                  docs_url=None, redoc_url=None)  # their pages load scripts from elsewhere; the schema is enough

    def operator(request: Request) -> str:
        """The actor of the request's changes, once its token is an operator's."""
        try:
            token = bearer(request.headers.getlist("authorization"))
        except ValueError as exc:
            raise HTTPException(401, str(exc), {"www-authenticate": 'Bearer realm="quotaflow"'}) from None
        found = owner(token, tokens)
        if found is None:
            raise HTTPException(401, "unknown bearer token", {"www-authenticate": 'Bearer realm="quotaflow"'})
        if found[1] != ALL_ORGS:
            raise HTTPException(403, "only operator tokens (mapped to \"*\" in QUOTAFLOW_API_TOKENS) may manage keys")
        return f"api:token#{found[0]}"

    OPERATOR = Depends(operator)

    def ids(org_id: str, key_id: str | None = None) -> None:
        check_id("org_id", org_id)
        if key_id is not None:
            check_id("key_id", key_id)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for e in exc.errors()[:5]:
            where = ".".join(str(part) for part in e["loc"] if part != "body") or "body"
            problems.append(f"{where[:100]}: {e['msg']}")
        return _error(400, "; ".join(problems))

    @app.exception_handler(InvalidChange)
    async def refused(request: Request, exc: InvalidChange) -> JSONResponse:
        return _error(404 if isinstance(exc, KeyNotFound) else 400, str(exc))

    async def unavailable(request: Request, exc: Exception) -> JSONResponse:
        message = redact(str(exc)) if isinstance(exc, (OperatorError, ConfigError)) else \
            f"{type(exc).__name__}: {redact(str(exc))[:300]}"  # a service's URL may carry its password
        log.warning("admin request failed: a service is unavailable", extra={"error": message[:500]})
        return _error(503, message, {"retry-after": "5"})

    for kind in (OperatorError, ConfigError, KafkaError, RedisError):
        app.add_exception_handler(kind, unavailable)

    def reg(request: Request) -> Registry:
        return request.app.state.registry

    def schema() -> dict[str, Any]:
        """FastAPI's schema, less the 422 it documents for every route: this API answers 400."""
        if app.openapi_schema is None:
            app.openapi_schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                             routes=app.routes)
            for path in app.openapi_schema["paths"].values():
                for operation in path.values():
                    operation["responses"].pop("422", None)
        return app.openapi_schema

    app.openapi = schema  # type: ignore[method-assign]

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, Any]:
        return {"ok": True}

    app.mount("/metrics", metrics.asgi_app)

    @app.get("/v1/orgs/{org_id}/keys", response_model=list[Key], tags=["keys"], responses=ERRORS)
    async def list_keys(org_id: str, request: Request, actor: str = OPERATOR) -> list[dict]:
        ids(org_id)
        at = now_ms()
        return [public(r, at) for r in await reg(request).store.list(org_id)]

    @app.post("/v1/orgs/{org_id}/keys", status_code=201, response_model=IssuedKey, tags=["keys"], responses=ERRORS)
    async def create_key(org_id: str, body: NewKey, request: Request, actor: str = OPERATOR) -> JSONResponse:
        ids(org_id)
        async with lock:
            issued = await reg(request).create(org_id, body.name, env=body.env, scopes=body.scopes,
                                               limits=body.limits, expires_ms=body.expires_ms, actor=actor)
        return JSONResponse(_issued(issued).model_dump(), status_code=201, headers={"cache-control": "no-store"})

    @app.get("/v1/orgs/{org_id}/keys/{key_id}", response_model=KeyShown, tags=["keys"], responses=ERRORS)
    async def show_key(org_id: str, key_id: str, request: Request, actor: str = OPERATOR) -> dict:
        ids(org_id, key_id)
        store = reg(request).store
        rec = await store.show(org_id, key_id)
        return {**public(rec, now_ms()), "last_used_ms": await store.last_used_ms(org_id, key_id)}

    @app.patch("/v1/orgs/{org_id}/keys/{key_id}", response_model=ChangedKey, tags=["keys"], responses=ERRORS)
    async def update_key(org_id: str, key_id: str, body: KeyUpdate, request: Request, actor: str = OPERATOR) -> dict:
        ids(org_id, key_id)
        given = body.model_fields_set
        if not given:
            raise InvalidChange("nothing to update: give name, scopes, limits or expires_ms")
        attrs = {f: (getattr(body, f) if f in given else KEEP) for f in ("name", "scopes", "limits", "expires_ms")}
        async with lock:
            changed = await reg(request).update(org_id, key_id, actor=actor, **attrs)
        return {"key": public(changed.record, now_ms()), "changed": changed.published is not None,
                "visible_ms": _visible(changed.published)}

    @app.post("/v1/orgs/{org_id}/keys/{key_id}/revoke", response_model=ChangedKey, tags=["keys"], responses=ERRORS)
    async def revoke_key(org_id: str, key_id: str, request: Request, actor: str = OPERATOR) -> dict:
        ids(org_id, key_id)
        async with lock:
            changed = await reg(request).revoke(org_id, key_id, actor=actor)
        return {"key": public(changed.record, now_ms()), "changed": changed.published is not None,
                "visible_ms": _visible(changed.published)}

    @app.post("/v1/orgs/{org_id}/keys/{key_id}/rotate", response_model=RotatedKey, tags=["keys"], responses=ERRORS)
    async def rotate_key(org_id: str, key_id: str, body: Rotation, request: Request,
                         actor: str = OPERATOR) -> JSONResponse:
        ids(org_id, key_id)
        async with lock:
            rotated = await reg(request).rotate(org_id, key_id, overlap_ms=body.overlap_s * 1000, actor=actor)
        answer = RotatedKey(new=_issued(rotated.new), old=Key(**public(rotated.old, now_ms())))
        return JSONResponse(answer.model_dump(), headers={"cache-control": "no-store"})

    return app
