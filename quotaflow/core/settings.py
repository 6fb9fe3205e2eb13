"""All configuration, read once from ``QUOTAFLOW_*`` environment variables.

Defaults run everything on 127.0.0.1 with data under ``.quotaflow/`` in the
current directory. Ports are unusual on purpose so a developer's own Kafka or
Redis on the standard ports is never touched.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping
from urllib.parse import urlsplit

import orjson
from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from quotaflow.core import redact
from quotaflow.core.channels import Channel, EmailChannel, check_names

ENV_PREFIX = "QUOTAFLOW_"
# What a client can send after "Bearer " as it is: visible ASCII, no spaces.
_TOKEN = re.compile(r"^[\x21-\x7e]+$")
TOKEN_MAX = 512

# The limit policy's defaults (schemas/limits.py builds the policy from them): windows of a
# minute, an hour and a day, each tier's limit in each. The tier names are those of
# schemas/tiers.py (tests/test_config.py checks they agree); orgs without a tier are on
# DEFAULT_TIER.
DEFAULT_WINDOWS_S: tuple[int, ...] = (60, 3600, 86400)
DEFAULT_TIER = "FREE"
DEFAULT_TIER_LIMITS: dict[str, tuple[int, ...]] = {
    "FREE": (10, 100, 1_000),
    "STARTER": (30, 500, 5_000),
    "PROFESSIONAL": (100, 2_000, 20_000),
    "SCALE": (200, 5_000, 50_000),
    "ENTERPRISE": (500, 10_000, 100_000),
}
# A window longer than a year is not a rate; counts and limits stay far below 2**53, where
# the gateways' Lua numbers (doubles) would start to round.
WINDOW_MAX_S = 366 * 86400
LIMIT_MAX = 2**53 - 1
# What `quotaflow org set-tier` can set (it upper-cases its argument): a tier named
# otherwise could never be given to an org.
_TIER_NAME = re.compile(r"^[A-Z][A-Z0-9_]{0,31}$")
_WINDOW = re.compile(r"^[0-9]{1,9}$")
_HEADER_NAME = r"^[A-Za-z0-9-]{1,64}$"  # an HTTP header name, as gateways are configured with one
_HOST_PORT = re.compile(r"^[A-Za-z0-9._\[\]:-]+:([0-9]{1,5})$")

# The values `quotaflow ship` takes from a log line (QUOTAFLOW_SHIP_FIELDS names where each is
# logged); collector/ship/formats.py reads them.
SHIP_FIELD_NAMES = ("time", "method", "path", "status", "request_bytes", "response_bytes", "latency",
                    "client_ip", "user_agent", "org_id", "api_key_id", "event_id", "event_ts")
_LOGGED_FIELD = re.compile(r"^[A-Za-z0-9_.:@-]{1,64}$")
_ROUTE = re.compile(r"^/[A-Za-z0-9._~!$&'()*+,;=:@%/{}-]{0,255}$")
KEY_HASH_SECRET_MIN = 32
# With QUOTAFLOW_KAFKA_BROKERS=N the local stack runs N brokers; broker n (1..N) listens on
# kafka_port + STEP*(n-1) and its controller on kafka_controller_port + STEP*(n-1)
# (19092, 19192, 19292 and 19093, 19193, 19293 by default; a test stack's port base + 92,
# + 192, + 292: apart from every other port of the base, deploy/stack.py isolated_env).
KAFKA_BROKER_PORT_STEP = 100
KAFKA_BROKERS_MAX = 5
# A broker's Java heap when QUOTAFLOW_KAFKA_HEAP is not set: one broker gets more; each of
# several sharing a small machine gets less (the local stack's load is light).
KAFKA_HEAP_SINGLE = "768m"
KAFKA_HEAP_CLUSTER = "320m"
# With QUOTAFLOW_REDIS_CLUSTER the local stack runs a Redis Cluster of REDIS_CLUSTER_MASTERS
# masters, each with one replica: node n (1..6) on redis_port + n-1, its cluster bus on
# redis_port + REDIS_CLUSTER_BUS_OFFSET + n-1 (16379..16384 and 16389..16394 by default; a
# test stack's base + 379.. and + 389..: no other port of the base, deploy/stack.py
# isolated_env), rather than Redis's default of port + 10000, outside the base's range.
REDIS_CLUSTER_MASTERS = 3
REDIS_CLUSTER_NODES = 2 * REDIS_CLUSTER_MASTERS
REDIS_CLUSTER_BUS_OFFSET = 10
Port = Annotated[int, Field(ge=1, le=65535)]
PortOrOff = Annotated[int, Field(ge=0, le=65535, description="0: off")]
Limit = Annotated[int | None, Field(strict=True, ge=0, le=LIMIT_MAX)]
# Fields whose dict keys are secrets: an error never names a place inside them.
SECRET_KEYED = frozenset({"api_tokens", "ingest_tokens", "key_hash_secrets"})


@dataclass(frozen=True)
class LimitSettings:
    """The part of the settings the limit policy is built from (schemas/limits.py
    policy_from_settings), checked together when the settings load: gateways and
    processors read this, and must agree on it."""

    windows_s: tuple[int, ...]
    sliding: bool
    tier_limits: Mapping[str, tuple[int | None, ...]]  # tier -> limit per window, None: unlimited
    default_tier: str
    late_grace_s: float
    reservation_ttl_s: float


class ConfigError(ValueError):
    """A configuration problem the operator can fix; printed as one line that names the
    variable and never its value."""


class Settings(BaseSettings):
    # hide_input_in_errors: a validation error never repeats the value (it may be a secret).
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", hide_input_in_errors=True)

    # Everything the local stack writes lives below state_dir; downloads are
    # cached in cache_dir so a second state dir (tests) does not download again.
    state_dir: Path = Path(".quotaflow")
    cache_dir: Path | None = None

    kafka_port: Port = 19092
    kafka_controller_port: Port = 19093
    kafka_bootstrap: str | None = Field(None, description="host:port[,host:port]; default: the local stack's broker")
    kafka_brokers: int = Field(1, ge=1, le=KAFKA_BROKERS_MAX, description="Kafka brokers the local stack runs "
                               "(KRaft, each also a controller); with 3 or more, quotaflow's topics have 3 replicas "
                               "and min.insync.replicas=2")
    kafka_heap: str | None = Field(None, pattern=r"^[1-9][0-9]{0,11}[kKmMgGtT]?$", description="each broker's Java "
                                   f"heap, as -Xmx takes it; default {KAFKA_HEAP_SINGLE}, or {KAFKA_HEAP_CLUSTER} "
                                   "each with several brokers")
    events_partitions: int = Field(4, ge=1, le=10_000)

    redis_port: Port = 16379
    redis_url: str | None = Field(None, description="default: the local stack's redis-server")
    redis_cluster: bool = Field(False, description="QUOTAFLOW_REDIS_URL is a Redis Cluster (any node of it; the "
                                "clients find the others); the local stack then runs one of 3 masters and 3 replicas")
    redis_cluster_nodes: str | None = Field(None, description="host:port[,host:port] of more nodes of the cluster "
                                            "to start from, should the URL's be down; default: the local cluster's")
    redis_cluster_node_timeout_ms: int = Field(5000, ge=100, le=600_000, description="the local Redis Cluster's "
                                               "cluster-node-timeout: a master silent this long is failed over")

    clickhouse_url: str | None = Field(
        None, description="chdb://PATH for the embedded engine (default, under state_dir) or http(s)://user:pass@host:port/db"
    )

    # Prometheus /metrics of each long-running process; 0 disables it.
    processor_metrics_port: PortOrOff = 19110
    sink_metrics_port: PortOrOff = 19111
    alerts_metrics_port: PortOrOff = 19115

    # Batching knobs of the stream stages.
    processor_batch_events: int = Field(20_000, ge=1, le=1_000_000, description="events in a batch at most, about "
                                        "(a batch is what has arrived, in as many records as carried that many "
                                        "events of late)")
    processor_rebalance_timeout_s: float = Field(60.0, gt=0, description="how long the group waits for a processor "
                                                 "to finish its batch in a rebalance before going on without it")
    processor_commit_interval_s: float = Field(1.0, gt=0, description="how often the processor commits the offsets "
                                               "it has handled; a restart reads again (and recognises) what came after")
    sink_batch_size: int = Field(10000, ge=1, description="records per insert at most")
    sink_batch_bytes: int = Field(32 * 1024 * 1024, ge=1, description="record bytes per insert at most: "
                                                                       "a record may carry a batch of events")
    sink_batch_seconds: float = Field(0.5, gt=0)

    # --- ClickHouse storage and the query API (analytics/) ---
    # HTTP JSON query API; 0 disables it. With the embedded engine it is served by
    # the sink process, the one process that may open the engine.
    api_port: PortOrOff = 19120
    # Who may ask the query API what: a JSON object of bearer token -> org id, or "*" for
    # every org (operators). Without tokens every request is refused.
    api_tokens: dict[str, str] = Field(default_factory=dict)
    # The admin HTTP API (`quotaflow admin`: API keys), for operator tokens of api_tokens;
    # 0 disables it.
    admin_port: PortOrOff = 19140
    # Server secrets API keys are hashed with (HMAC-SHA-256; schemas/api_keys.py): a JSON object
    # of secret id -> secret, the first used for new keys, every one tried when a key is
    # verified, so a secret can be rotated with an overlap. At least 32 characters each.
    key_hash_secrets: dict[str, str] = Field(default_factory=dict)
    # Bounds of each query the API runs (ClickHouse settings max_execution_time and
    # max_memory_usage), and how many run at once; a request that finds no free slot
    # within api_queue_wait_s is answered 503 with Retry-After.
    api_query_timeout_s: float = Field(30.0, gt=0, description="max_execution_time of one API query, seconds")
    api_query_max_memory_bytes: int = Field(1024 ** 3, ge=1, description="max_memory_usage of one API query, bytes")
    api_max_concurrent_queries: int = Field(4, ge=1, description="API queries (exports included) running at once")
    api_queue_wait_s: float = Field(1.0, ge=0, description="how long a request may wait for a query slot")
    retention_raw_days: int = Field(30, ge=1)
    retention_minute_days: int = Field(90, ge=1)
    retention_hour_days: int = Field(365, ge=1)
    retention_day_days: int = Field(1095, ge=1)

    # --- Rate limits (schemas/limits.py), shared by processors and gateways ---
    # As the environment gives them: QUOTAFLOW_WINDOWS=60,3600,86400 and
    # QUOTAFLOW_TIER_LIMITS='{"FREE": [10, 100, 1000], ...}' (NoDecode: parsed by the
    # validators below, which name what is wrong). Read them through `limits`.
    windows: Annotated[tuple[Annotated[int, Field(ge=1, le=WINDOW_MAX_S)], ...], NoDecode] = Field(
        DEFAULT_WINDOWS_S, min_length=1, description="window lengths in seconds, comma separated")
    sliding_windows: bool = Field(False, description="sliding windows instead of fixed (epoch-aligned) ones")
    tier_limits: Annotated[dict[str, tuple[Limit, ...]], NoDecode] = Field(
        default_factory=lambda: dict(DEFAULT_TIER_LIMITS),
        description='JSON {"FREE": [10, 100, 1000], ...}, one limit per window; null: unlimited')
    late_grace_s: float = Field(60.0, ge=0, description="how late an event may arrive and still count")
    max_clock_skew_s: float = Field(300.0, gt=0, description="how far past the time the broker received its record "
                                                             "an event may be stamped; later ones are dead-lettered")
    reservation_ttl_s: float = Field(120.0, gt=0, description="how long a gateway reservation waits for its event")
    dedup_window_s: float = Field(600.0, gt=0, description="how long processors and the sink remember event ids to "
                                                          "count and store an event published twice once (~120 bytes "
                                                          "of Redis each, per stage)")

    # --- Gateways (gateway/) ---
    gateway_port: Port = 19130
    gateway_timeout_ms: int = Field(50, gt=0, description="Redis budget of one check")
    gateway_fail_open: bool = Field(True, description="admit (true) or refuse (false) when Redis is slow or down; "
                                    "failing open admits a presented key unverified")
    # Where `quotaflow gateway` and the ASGI middleware read what they verify: the API key from
    # "Authorization: Bearer <key>" or this header, and the scope a request needs (set by the
    # gateway's own configuration, e.g. nginx, never by the client) from a header or a query
    # parameter of /check.
    gateway_key_header: str = Field("X-Api-Key", pattern=_HEADER_NAME, description="request header a caller may "
                                    "send its API key in, besides Authorization: Bearer")
    gateway_scope_header: str = Field("X-Quotaflow-Scope", pattern=_HEADER_NAME, description="header of a /check "
                                      "request naming the scope the request needs")
    gateway_scope_param: str = Field("scope", pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="query parameter of "
                                     "/check naming the scope the request needs (when the header is absent)")
    # The trusted mode: take X-Api-Key-Id / X-Org-Id as sent, verifying nothing. Only for an
    # auth layer in front that verified the caller and sets those headers itself (a client's
    # own must never reach the gateway): anyone who can send them can be any tenant.
    gateway_trust_identity_headers: bool = Field(False, description="trust X-Api-Key-Id / X-Org-Id as sent instead "
                                                 "of verifying an API key (only behind an auth layer that sets them)")
    # The proxies whose X-Forwarded-For the middlewares believe: a request from one of them is
    # from the address it names (right to left, skipping these); any other's header is ignored.
    gateway_trusted_proxies: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="addresses or CIDR networks of the proxies in front, comma separated, whose "
                        "X-Forwarded-For names the client; default: none (the peer's address is the client's)")

    # --- Collectors (collector/): the producer core's memory bound and disk spool ---
    spool_dir: Path | None = Field(None, description="where collectors spool records Kafka does not take in time; "
                                   "one directory per process; default: state_dir/spool")
    spool_max_bytes: int = Field(256 * 1024 ** 2, ge=8192, description="the spool's byte bound: past it the oldest "
                                 "segment is dropped (counted and logged)")
    spool_segment_bytes: int = Field(16 * 1024 ** 2, ge=4096, description="size of one spool segment file; "
                                     "at most half the byte bound")
    collector_memory_bytes: int = Field(32 * 1024 ** 2, ge=1024, description="records a collector holds in memory "
                                        "(queued, and sent but not acknowledged) before it spools")
    collector_delivery_timeout_s: float = Field(10.0, gt=0, description="how long a collector waits for Kafka to "
                                                "acknowledge a record before it spools it")
    # The Python emitter's batching (collector/emitter.py): an org's events go out as one
    # record when collector_batch_events have come or the batch is collector_batch_ms old. A
    # shorter time cuts decision lag by up to its length and sends more records, which the
    # processor pays for one by one. 50 ms: at 10k events/s over 100 orgs, decision lag p99
    # 114 ms against 160 at 100 ms, for twice the records (bench/ratelimit.py).
    collector_batch_ms: int = Field(50, ge=1, le=60_000, description="longest an event waits in its org's batch")
    collector_batch_events: int = Field(500, ge=1, le=10_000, description="events in one record at most (1: a "
                                        "record per event)")
    collector_linger_ms: int = Field(5, ge=0, le=60_000, description="the Kafka producer's linger before it sends")

    # --- HTTP ingest (`quotaflow ingest`: POST /v1/events for services in other languages) ---
    ingest_port: PortOrOff = 19150
    # Who may publish: a JSON object of bearer token -> org id (publishes that org's events
    # only), or "*" (any org's); or an org's API key (verified against the registry in
    # Redis, with QUOTAFLOW_KEY_HASH_SECRETS) holding ingest_key_scope, for its org's events.
    # Without tokens or hash secrets every request is refused.
    ingest_tokens: dict[str, str] = Field(default_factory=dict)
    ingest_key_scope: str = Field("events:write", pattern=r"^[a-z][a-z0-9_.:-]{0,63}$",
                                  description="the scope an API key needs to publish its org's events")
    ingest_max_body_bytes: int = Field(4 * 1024 ** 2, ge=1024, le=256 * 1024 ** 2, description="largest request "
                                       "body, as sent and after gzip decompression; larger: 413")
    ingest_max_events: int = Field(10_000, ge=1, le=100_000, description="events in one request at most")
    ingest_max_line_bytes: int = Field(64 * 1024, ge=1024, description="longest NDJSON line: longer lines are "
                                       "refused one by one without being parsed")

    # --- The access-log shipper (`quotaflow ship`: collector/ship/) ---
    ship_paths: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="the access logs to tail: paths or globs, comma separated (or a JSON list); include the "
                        "first rotated name (access.log.1), so what is written just before a rotation is read there")
    ship_format: Literal["nginx_json", "nginx_combined", "envoy_json", "envoy_text"] = Field(
        "nginx_json", description="how the lines are written: nginx's log_format escape=json, nginx's combined, "
                                  "Envoy's json_format / typed_json_format, or Envoy's default text format")
    ship_fields: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict, description='JSON {"org_id": "org", ...}: which logged field holds each value, '
                                          "where it differs from the format's default (README: the shipper)")
    ship_routes: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description='route templates paths are mapped to, first match wins: JSON ["/v1/users/{id}", ...] or '
                        "comma separated; a path none matches has its id-like segments replaced by {id}")
    ship_service: str = Field("", description="the service the events name (an id); default: nginx or envoy, "
                                              "by the format")
    ship_org_id: str | None = Field(None, description="the org of lines that log none (an id); none: such lines are "
                                    "dead-lettered")
    ship_api_key_id: str | None = Field(None, description="the API key id of lines that log none (an id)")
    ship_state_dir: Path | None = Field(None, description="the shipper's checkpoints and its spool; one directory "
                                        "per shipper process; default: state_dir/ship")
    ship_fingerprint_bytes: int = Field(1024, ge=16, le=65536, description="a file is known by a hash of its first "
                                        "line, up to this many bytes (and read once it has a whole first line)")
    ship_max_line_bytes: int = Field(64 * 1024, ge=256, le=16 * 1024 ** 2, description="longer lines are "
                                     "dead-lettered (their first bytes) and skipped")
    ship_poll_interval_s: float = Field(0.25, gt=0, le=60, description="how often the files are looked at")
    ship_checkpoint_interval_s: float = Field(1.0, gt=0, le=600, description="how often acknowledged positions "
                                              "are written to the checkpoint file, at most")
    ship_checkpoint_ttl_s: float = Field(7 * 86400.0, gt=0, description="a checkpoint of a file not seen for this "
                                         "long is dropped")
    ship_rotate_wait_s: float = Field(60.0, ge=0, description="how long a file that left the paths (rotated away, "
                                      "deleted) is kept open and read after its last growth")
    ship_start_at: Literal["beginning", "end"] = Field("beginning", description="where a file without a checkpoint "
                                                       "is read from when the shipper starts")
    ship_metrics_port: PortOrOff = 19112

    # --- Alert delivery (alerts/channels/): the channels rules name, with their secrets
    # (quotaflow/core/channels.py), the SMTP server email goes through, and the retries.
    alert_channels: dict[str, Channel] = Field(default_factory=dict, description='JSON {"ops-mail": {"type": '
                                               '"email", "to": ["ops@example.com"]}, ...}')
    smtp_url: str | None = Field(None, description="smtp://[user:password@]host[:port] (STARTTLS when the server "
                                 "offers it; ?starttls=require to insist) or smtps:// (TLS from the start)")
    alert_email_from: str = Field("quotaflow@localhost", max_length=254, description="From: of alert email")
    alert_timeout_s: float = Field(10.0, gt=0, le=120, description="one delivery attempt's time, per channel")
    alert_attempts: int = Field(6, ge=1, le=20, description="delivery attempts before a dead letter")
    alerts_eval_interval_s: float = Field(1.0, gt=0, le=60, description="how often the alerts stage evaluates "
                                          "every alert without new events (windows ending, for_s, cooldowns)")
    alert_retry_max_s: float = Field(60.0, gt=0, description="longest wait between two delivery attempts")

    # --- Restarts of the stages the local stack starts (deploy/supervise.py) ---
    supervise_backoff_initial_s: float = Field(1.0, gt=0, description="delay before restarting a stage that "
                                               "exited; doubled with each exit in a row")
    supervise_backoff_max_s: float = Field(60.0, gt=0, description="longest delay before a restart")
    supervise_healthy_s: float = Field(60.0, ge=0, description="a stage up this long before it exits "
                                       "is restarted at once, and starts the backoff over")

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["json", "text"] = "json"

    @field_validator("ship_paths", "ship_routes", mode="before")
    @classmethod
    def _string_list(cls, value: Any) -> Any:
        """A JSON list, or comma separated (paths and templates hold no commas)."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    value = orjson.loads(text)
                except orjson.JSONDecodeError:
                    raise ValueError("not a JSON list of strings") from None
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ValueError("not a JSON list of strings")
                return tuple(v.strip() for v in value if v.strip())
            return tuple(part.strip() for part in text.split(",") if part.strip())
        return value

    @field_validator("ship_fields", mode="before")
    @classmethod
    def _ship_fields_json(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                value = orjson.loads(value)
            except orjson.JSONDecodeError:
                raise ValueError('not JSON: {"org_id": "org", ...}') from None
        return value

    @field_validator("ship_fields")
    @classmethod
    def _ship_field_names(cls, fields: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(fields) - set(SHIP_FIELD_NAMES))
        if unknown:
            raise ValueError(f"unknown value(s) {', '.join(unknown)[:200]}; known: {', '.join(SHIP_FIELD_NAMES)}")
        for name, logged in fields.items():
            if not _LOGGED_FIELD.fullmatch(logged):
                raise ValueError(f"{name}: a logged field's name is 1-64 letters, digits and _.:@-")
        return fields

    @field_validator("ship_routes")
    @classmethod
    def _ship_route_shapes(cls, routes: tuple[str, ...]) -> tuple[str, ...]:
        for i, route in enumerate(routes):
            if not _ROUTE.fullmatch(route):
                raise ValueError(f"#{i + 1}: a route template starts with / and has path characters and "
                                 "{name} segments only, at most 256 characters")
        return routes

    @field_validator("log_level", mode="before")
    @classmethod
    def _level(cls, level: Any) -> Any:
        return level.upper() if isinstance(level, str) else level

    @field_validator("windows", mode="before")
    @classmethod
    def _windows(cls, value: Any) -> Any:
        """'60,3600,86400' (as the environment gives it) into lengths; digits only, so
        that what the policy counts is what the operator wrote."""
        if not isinstance(value, str):
            return value
        items = [item.strip() for item in value.split(",")]
        if items == [""]:
            raise ValueError("no window given; expected lengths in seconds, comma separated, e.g. 60,3600,86400")
        for n, item in enumerate(items, 1):
            if not _WINDOW.fullmatch(item):
                raise ValueError(f"window #{n} is not a whole number of seconds; expected lengths in seconds, "
                                 "comma separated, e.g. 60,3600,86400")
        return tuple(int(item) for item in items)

    @field_validator("windows")
    @classmethod
    def _distinct_windows(cls, windows: tuple[int, ...]) -> tuple[int, ...]:
        if len(set(windows)) != len(windows):
            raise ValueError("window lengths must differ (each window is named by its length)")
        return windows

    @field_validator("tier_limits", mode="before")
    @classmethod
    def _tier_limits_json(cls, value: Any) -> Any:
        if not isinstance(value, (str, bytes)):
            return value
        if not value.strip():
            return dict(DEFAULT_TIER_LIMITS)  # set but empty: the defaults, as before
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"not JSON ({str(exc).splitlines()[0][:200]}); expected "
                             '{"FREE": [10, 100, 1000], ...}, one limit per window') from None

    @field_validator("tier_limits")
    @classmethod
    def _tier_names(cls, tiers: dict[str, tuple[int | None, ...]]) -> dict[str, tuple[int | None, ...]]:
        for n, name in enumerate(tiers, 1):
            if not _TIER_NAME.fullmatch(name):
                raise ValueError(f"tier #{n}: a tier name is 1-32 upper-case letters, digits or '_', starting "
                                 "with a letter (as 'quotaflow org set-tier' writes it)")
        return tiers

    @field_validator("gateway_key_header")
    @classmethod
    def _key_header(cls, name: str) -> str:
        if name.lower() == "authorization":
            raise ValueError("Authorization is read anyway (as 'Bearer <key>'): name another header, e.g. X-Api-Key")
        return name

    @field_validator("kafka_bootstrap", "redis_cluster_nodes")
    @classmethod
    def _bootstrap(cls, bootstrap: str | None) -> str | None:
        if bootstrap is None:
            return bootstrap
        for n, address in enumerate(bootstrap.split(","), 1):
            m = _HOST_PORT.fullmatch(address.strip())
            if m is None or not 1 <= int(m.group(1)) <= 65535:
                raise ValueError(f"address #{n} is not host:port (port 1-65535); expected host:port[,host:port]")
        return bootstrap

    @field_validator("gateway_trusted_proxies", mode="before")
    @classmethod
    def _proxies(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [item.strip() for item in value.split(",") if item.strip()]
        out = []
        for n, item in enumerate(value or (), 1):
            try:
                out.append(str(ipaddress.ip_network(item, strict=False)))
            except (TypeError, ValueError):
                raise ValueError(f"proxy #{n} is not an IP address or CIDR network; expected e.g. "
                                 "10.0.0.0/8,127.0.0.1") from None
        return tuple(out)

    @field_validator("api_tokens", "ingest_tokens")
    @classmethod
    def _tokens(cls, tokens: dict[str, str]) -> dict[str, str]:
        # Never name the token itself: the message says which one by position.
        for n, token in enumerate(tokens, 1):
            if not (len(token) <= TOKEN_MAX and _TOKEN.fullmatch(token)):
                raise ValueError(f"token #{n} must be 1-{TOKEN_MAX} visible ASCII characters without spaces, "
                                 "as sent after 'Bearer '")
        return tokens

    @field_validator("key_hash_secrets")
    @classmethod
    def _key_hash_secrets(cls, secrets: dict[str, str]) -> dict[str, str]:
        for n, (secret_id, secret) in enumerate(secrets.items(), 1):
            if not (1 <= len(secret_id) <= 16 and secret_id.isascii() and secret_id.isalnum()):
                raise ValueError(f"secret #{n}: its id must be 1-16 ASCII letters or digits")
            if len(secret) < KEY_HASH_SECRET_MIN:
                raise ValueError(f"secret #{n}: at least {KEY_HASH_SECRET_MIN} characters")
        return secrets

    @field_validator("alert_channels")
    @classmethod
    def _channel_names(cls, channels: dict[str, Channel]) -> dict[str, Channel]:
        check_names(channels)
        return channels

    @field_validator("smtp_url")
    @classmethod
    def _smtp_url(cls, url: str | None) -> str | None:
        return _check_url(url, ("smtp://", "smtps://"))

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, url: str | None) -> str | None:
        return _check_url(url, ("redis://", "rediss://", "unix://"))

    @field_validator("clickhouse_url")
    @classmethod
    def _clickhouse_url(cls, url: str | None) -> str | None:
        return _check_url(url, ("chdb://", "http://", "https://"))

    # The settings given (by the environment or by name), before the defaults derived below.
    _given: frozenset[str] = PrivateAttr(default_factory=frozenset)

    @model_validator(mode="after")
    def _derive(self) -> "Settings":
        self._given = frozenset(self.model_fields_set)
        self.state_dir = self.state_dir.expanduser().resolve()
        if self.cache_dir is None:
            self.cache_dir = self.state_dir / "cache"
        self.cache_dir = self.cache_dir.expanduser().resolve()
        if self.spool_dir is None:
            self.spool_dir = self.state_dir / "spool"
        self.spool_dir = self.spool_dir.expanduser().resolve()
        if self.ship_state_dir is None:
            self.ship_state_dir = self.state_dir / "ship"
        self.ship_state_dir = self.ship_state_dir.expanduser().resolve()
        if self.spool_segment_bytes * 2 > self.spool_max_bytes:
            raise ValueError(f"{env_var('spool_segment_bytes')} (spool_segment_bytes) must be at most half of "
                             f"{env_var('spool_max_bytes')} (spool_max_bytes): the spool drops whole segments")
        if self.kafka_heap is None:
            self.kafka_heap = KAFKA_HEAP_SINGLE if self.kafka_brokers == 1 else KAFKA_HEAP_CLUSTER
        if self.kafka_bootstrap is None:
            self.kafka_bootstrap = self._local_bootstrap()
        if self.redis_url is None:  # a cluster has database 0 only, named by no path
            self.redis_url = f"redis://127.0.0.1:{self.redis_port}" + ("" if self.redis_cluster else "/0")
        if self.redis_cluster and self.redis_cluster_nodes is None and self.redis_is_local:
            self.redis_cluster_nodes = ",".join(f"127.0.0.1:{port}" for port, _ in self.redis_cluster_ports)
        if self.clickhouse_url is None:
            self.clickhouse_url = f"chdb://{self.state_dir / 'clickhouse'}"
        ports = [self.kafka_port, self.kafka_controller_port, self.redis_port]
        if len(set(ports)) != len(ports):
            raise ValueError(f"{env_var('kafka_port')}, {env_var('kafka_controller_port')} and "
                             f"{env_var('redis_port')} must differ, got {ports}")
        if self.kafka_brokers > 1:
            cluster = [port for pair in self.kafka_broker_ports for port in pair]
            if max(cluster) > 65535 or len(set(cluster + [self.redis_port])) != len(cluster) + 1:
                raise ValueError(f"{env_var('kafka_brokers')}={self.kafka_brokers}: broker n listens on "
                                 f"{env_var('kafka_port')} + {KAFKA_BROKER_PORT_STEP}*(n-1) and its controller on "
                                 f"{env_var('kafka_controller_port')} + {KAFKA_BROKER_PORT_STEP}*(n-1); these ports "
                                 f"must be at most 65535 and differ from each other and from "
                                 f"{env_var('redis_port')}, got {sorted(cluster)}")
        if self.redis_cluster:
            redis_ports = [port for pair in self.redis_cluster_ports for port in pair]
            kafka_ports = [port for pair in self.kafka_broker_ports for port in pair]
            if max(redis_ports) > 65535 or set(redis_ports) & set(kafka_ports):
                raise ValueError(f"{env_var('redis_cluster')}: the local cluster's node n listens on "
                                 f"{env_var('redis_port')} + n-1 (n = 1..{REDIS_CLUSTER_NODES}), its bus on "
                                 f"{env_var('redis_port')} + {REDIS_CLUSTER_BUS_OFFSET} + n-1; these ports must be "
                                 f"at most 65535 and differ from Kafka's, got {sorted(redis_ports)}")
        self._check_limits()
        if self.smtp_url is None and any(isinstance(c, EmailChannel) for c in self.alert_channels.values()):
            raise ValueError(f"{env_var('alert_channels')} (alert_channels) has email channels: set "
                             f"{env_var('smtp_url')} to the SMTP server that sends them")
        # Whatever prints or logs these from now on shows *** in their place.
        redact.register(*self.api_tokens, *self.ingest_tokens, *self.key_hash_secrets.values(),
                        *redact.url_secrets(self.redis_url),
                        *redact.url_secrets(self.clickhouse_url), *redact.url_secrets(self.smtp_url),
                        *(secret for channel in self.alert_channels.values() for secret in channel.secrets()))
        return self

    def _check_limits(self) -> None:
        """Windows and tier limits together, as the policy needs them: one limit per window
        in every tier, and limits for the tier of orgs that have none."""
        count = len(self.windows)
        if "tier_limits" not in self._given and count != len(DEFAULT_WINDOWS_S):
            raise ValueError(f"{env_var('windows')} (windows) has {count} window{'s' * (count != 1)}, but the default "
                             f"tier limits have {len(DEFAULT_WINDOWS_S)} per tier (one per default window): set "
                             f"{env_var('tier_limits')} too, with {count} per tier")
        for name, limits in self.tier_limits.items():
            if len(limits) != count:
                raise ValueError(f"{env_var('tier_limits')} (tier_limits): tier {name} has {len(limits)} limit"
                                 f"{'s' * (len(limits) != 1)} for the {count} window{'s' * (count != 1)} of "
                                 f"{env_var('windows')}")
        if DEFAULT_TIER not in self.tier_limits:
            raise ValueError(f"{env_var('tier_limits')} (tier_limits): no limits for {DEFAULT_TIER}, the tier of "
                             "every org that has none")

    def is_set(self, field: str) -> bool:
        """Whether the setting was given (QUOTAFLOW_<FIELD> or by name), not a default."""
        return field in self._given

    @property
    def limits(self) -> LimitSettings:
        """What the limit policy is built from, typed and checked (schemas/limits.py)."""
        return LimitSettings(windows_s=self.windows, sliding=self.sliding_windows, tier_limits=dict(self.tier_limits),
                             default_tier=DEFAULT_TIER, late_grace_s=self.late_grace_s,
                             reservation_ttl_s=self.reservation_ttl_s)

    @property
    def clickhouse_embedded(self) -> bool:
        return self.clickhouse_url.startswith("chdb://")

    @property
    def kafka_broker_ports(self) -> list[tuple[int, int]]:
        """(client port, controller port) of each broker the local stack runs, broker 1 first."""
        step = KAFKA_BROKER_PORT_STEP
        return [(self.kafka_port + step * n, self.kafka_controller_port + step * n) for n in range(self.kafka_brokers)]

    def _local_bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{port}" for port, _ in self.kafka_broker_ports)

    @property
    def kafka_replication_factor(self) -> int:
        """Replicas of each of quotaflow's topics: 3 (or as many brokers as there are, if fewer)."""
        return min(self.kafka_brokers, 3)

    @property
    def kafka_min_insync_replicas(self) -> int:
        """Replicas that must have a record before an acks=all producer gets its acknowledgement:
        2 of 3, so a broker can be lost without losing an acknowledged record or stopping writes."""
        return max(1, self.kafka_replication_factor - 1)

    @property
    def kafka_is_local(self) -> bool:
        """True when clients talk to the broker(s) the local stack runs."""
        return self.kafka_bootstrap == self._local_bootstrap()

    @property
    def redis_cluster_ports(self) -> list[tuple[int, int]]:
        """(client port, cluster bus port) of each node of the local Redis Cluster, node 1 first."""
        bus = self.redis_port + REDIS_CLUSTER_BUS_OFFSET
        return [(self.redis_port + n, bus + n) for n in range(REDIS_CLUSTER_NODES)]

    @property
    def redis_is_local(self) -> bool:
        return self.redis_url.startswith(f"redis://127.0.0.1:{self.redis_port}")


def _check_url(url: str | None, schemes: tuple[str, ...]) -> str | None:
    """A service URL the clients can use; the errors say what is wrong without the URL
    (it may hold a password)."""
    if url is None:
        return url
    if not url.startswith(schemes):
        raise ValueError(f"must start with {', '.join(schemes[:-1])} or {schemes[-1]}")
    try:
        urlsplit(url).port  # parsed here, so that a client library never prints it in its own error
    except ValueError:
        raise ValueError("the port must be a number from 0 to 65535") from None
    return url


def env_var(field: str) -> str:
    return f"{ENV_PREFIX}{field.upper()}"


def describe_error(exc: Exception) -> str:
    """One line for a settings error that names each variable and the problem, never the
    value: neither pydantic's input nor a location inside a dict whose keys are secrets
    (the API tokens)."""
    if isinstance(exc, ValidationError):
        problems = []
        for err in exc.errors(include_input=False, include_url=False):
            field = str(err["loc"][0]) if err["loc"] else None
            where = ""
            if field:
                inside = [f"#{p + 1}" if isinstance(p, int) else " ".join(str(p).split())[:40]
                          for p in err["loc"][1:]]
                at = f" at {'/'.join(inside)}" if inside and field not in SECRET_KEYED else ""
                where = f"{env_var(field)} ({field}){at}: "
            problems.append(where + err["msg"].removeprefix("Value error, "))
        return redact.redact(" ".join("; ".join(problems).split()))
    if isinstance(exc, SettingsError):
        # pydantic-settings: 'error parsing value for field "api_tokens" from source ...' (not JSON)
        m = re.search(r'field "([A-Za-z0-9_]+)"', str(exc))
        field = m.group(1) if m else None
        reason = f" ({str(exc.__cause__).splitlines()[0][:200]})" if exc.__cause__ else ""
        where = f"{env_var(field)} ({field})" if field else "a QUOTAFLOW_* variable"
        return redact.redact(f"{where}: cannot parse the value as JSON{reason}")
    return redact.redact(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


def effective(settings: Settings) -> list[tuple[str, str, bool]]:
    """(variable, value as the environment would give it, set or a default) for every
    setting, secrets hidden: passwords in URLs and every API token, whatever its length
    (redact hides only the longer ones anywhere else)."""
    out = []
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if name in SECRET_KEYED:
            text = "{" + ",".join(f'"{redact.MASK}":{orjson.dumps(redact.redact_value(v)).decode()}'
                                  for v in value.values()) + "}"
        elif isinstance(value, tuple):  # the windows, the shipper's paths and routes: comma separated
            text = ",".join(str(item) for item in value)
        elif name == "alert_channels":  # their secrets are registered: redact hides them below
            text = orjson.dumps({k: v.model_dump(mode="json", exclude_none=True) for k, v in value.items()}).decode()
        elif isinstance(value, dict):
            text = orjson.dumps(value).decode()
        elif isinstance(value, bool):
            text = str(value).lower()
        else:
            text = "" if value is None else str(value)
        out.append((env_var(name), redact.redact(text), settings.is_set(name)))
    return out


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
