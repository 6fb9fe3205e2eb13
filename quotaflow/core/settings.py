"""All configuration, read once from ``QUOTAFLOW_*`` environment variables.

Defaults run everything on 127.0.0.1 with data under ``.quotaflow/`` in the
current directory. Ports are unusual on purpose so a developer's own Kafka or
Redis on the standard ports is never touched.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from quotaflow.core import redact

ENV_PREFIX = "QUOTAFLOW_"
# What a client can send after "Bearer " as it is: visible ASCII, no spaces.
_TOKEN = re.compile(r"^[\x21-\x7e]+$")
TOKEN_MAX = 512


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

    kafka_port: int = 19092
    kafka_controller_port: int = 19093
    kafka_bootstrap: str | None = Field(None, description="host:port[,host:port]; default: the local stack's broker")
    kafka_heap: str = "768m"
    events_partitions: int = Field(4, ge=1)

    redis_port: int = 16379
    redis_url: str | None = Field(None, description="default: the local stack's redis-server")

    clickhouse_url: str | None = Field(
        None, description="chdb://PATH for the embedded engine (default, under state_dir) or http(s)://user:pass@host:port/db"
    )

    # Prometheus /metrics of each long-running process; 0 disables it.
    processor_metrics_port: int = 19110
    sink_metrics_port: int = 19111

    # Batching knobs of the stream stages.
    processor_batch_size: int = Field(200, ge=1, description="records per batch; a record may carry many events")
    processor_batch_seconds: float = Field(0.05, gt=0)
    processor_commit_interval_s: float = Field(1.0, gt=0, description="how often the processor commits the offsets "
                                               "it has handled; a restart reads again (and recognises) what came after")
    sink_batch_size: int = Field(10000, ge=1, description="records per insert at most")
    sink_batch_bytes: int = Field(32 * 1024 * 1024, ge=1, description="record bytes per insert at most: "
                                                                       "a record may carry a batch of events")
    sink_batch_seconds: float = Field(0.5, gt=0)

    # --- ClickHouse storage and the query API (analytics/) ---
    # HTTP JSON query API; 0 disables it. With the embedded engine it is served by
    # the sink process, the one process that may open the engine.
    api_port: int = 19120
    # Who may ask the query API what: a JSON object of bearer token -> org id, or "*" for
    # every org (operators). Without tokens every request is refused.
    api_tokens: dict[str, str] = Field(default_factory=dict)
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
    windows: str = Field("60,3600,86400", description="window lengths in seconds, comma separated")
    sliding_windows: bool = Field(False, description="sliding windows instead of fixed (epoch-aligned) ones")
    tier_limits: str | None = Field(None, description='JSON {"FREE": [10, 100, 1000], ...}, one limit per window; null: unlimited')
    late_grace_s: float = Field(60.0, ge=0, description="how late an event may arrive and still count")
    max_clock_skew_s: float = Field(300.0, gt=0, description="how far past the time the broker received its record "
                                                             "an event may be stamped; later ones are dead-lettered")
    reservation_ttl_s: float = Field(120.0, gt=0, description="how long a gateway reservation waits for its event")
    dedup_window_s: float = Field(600.0, gt=0, description="how long processors and the sink remember event ids to "
                                                          "count and store an event published twice once (~120 bytes "
                                                          "of Redis each, per stage)")

    # --- Gateways (gateway/) ---
    gateway_port: int = 19130
    gateway_timeout_ms: int = Field(50, gt=0, description="Redis budget of one check")
    gateway_fail_open: bool = Field(True, description="admit (true) or refuse (false) when Redis is slow or down")

    # --- Restarts of the stages the local stack starts (deploy/supervise.py) ---
    supervise_backoff_initial_s: float = Field(1.0, gt=0, description="delay before restarting a stage that "
                                               "exited; doubled with each exit in a row")
    supervise_backoff_max_s: float = Field(60.0, gt=0, description="longest delay before a restart")
    supervise_healthy_s: float = Field(60.0, ge=0, description="a stage up this long before it exits "
                                       "starts the backoff over")

    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"

    @field_validator("api_tokens")
    @classmethod
    def _tokens(cls, tokens: dict[str, str]) -> dict[str, str]:
        # Never name the token itself: the message says which one by position.
        for n, token in enumerate(tokens, 1):
            if not (len(token) <= TOKEN_MAX and _TOKEN.fullmatch(token)):
                raise ValueError(f"token #{n} must be 1-{TOKEN_MAX} visible ASCII characters without spaces, "
                                 "as sent after 'Bearer '")
        return tokens

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, url: str | None) -> str | None:
        return _check_url(url, ("redis://", "rediss://", "unix://"))

    @field_validator("clickhouse_url")
    @classmethod
    def _clickhouse_url(cls, url: str | None) -> str | None:
        return _check_url(url, ("chdb://", "http://", "https://"))

    @model_validator(mode="after")
    def _derive(self) -> "Settings":
        self.state_dir = self.state_dir.expanduser().resolve()
        if self.cache_dir is None:
            self.cache_dir = self.state_dir / "cache"
        self.cache_dir = self.cache_dir.expanduser().resolve()
        if self.kafka_bootstrap is None:
            self.kafka_bootstrap = f"127.0.0.1:{self.kafka_port}"
        if self.redis_url is None:
            self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        if self.clickhouse_url is None:
            self.clickhouse_url = f"chdb://{self.state_dir / 'clickhouse'}"
        ports = [self.kafka_port, self.kafka_controller_port, self.redis_port]
        if len(set(ports)) != len(ports):
            raise ValueError(f"kafka_port, kafka_controller_port and redis_port must differ, got {ports}")
        # Whatever prints or logs these from now on shows *** in their place.
        redact.register(*self.api_tokens, *redact.url_secrets(self.redis_url), *redact.url_secrets(self.clickhouse_url))
        return self

    @property
    def clickhouse_embedded(self) -> bool:
        return self.clickhouse_url.startswith("chdb://")

    @property
    def kafka_is_local(self) -> bool:
        """True when clients talk to the broker the local stack runs."""
        return self.kafka_bootstrap == f"127.0.0.1:{self.kafka_port}"

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
    value: neither pydantic's input nor the location inside a dict (whose keys are the
    API tokens)."""
    if isinstance(exc, ValidationError):
        problems = []
        for err in exc.errors(include_input=False, include_url=False):
            field = str(err["loc"][0]) if err["loc"] else None
            where = f"{env_var(field)} ({field}): " if field else ""
            problems.append(where + err["msg"])
        return redact.redact("; ".join(problems))
    if isinstance(exc, SettingsError):
        # pydantic-settings: 'error parsing value for field "api_tokens" from source ...' (not JSON)
        m = re.search(r'field "([A-Za-z0-9_]+)"', str(exc))
        field = m.group(1) if m else None
        reason = f" ({str(exc.__cause__).splitlines()[0][:200]})" if exc.__cause__ else ""
        where = f"{env_var(field)} ({field})" if field else "a QUOTAFLOW_* variable"
        return redact.redact(f"{where}: cannot parse the value as JSON{reason}")
    return redact.redact(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
