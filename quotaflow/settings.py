"""All configuration, read once from ``QUOTAFLOW_*`` environment variables.

Defaults run everything on 127.0.0.1 with data under ``.quotaflow/`` in the
current directory. Ports are unusual on purpose so a developer's own Kafka or
Redis on the standard ports is never touched.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QUOTAFLOW_", extra="ignore")

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
    dedup_window_s: float = Field(600.0, gt=0, description="how long processors remember event ids to count "
                                                          "an event published twice once (~120 bytes of Redis each)")

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


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
