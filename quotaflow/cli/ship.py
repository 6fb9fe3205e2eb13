"""``quotaflow ship``: the access-log shipper (collector/ship/) in the foreground."""

from __future__ import annotations

import argparse
import asyncio
import signal

from quotaflow.cli.registry import Command
from quotaflow.cli.stages import serve_metrics
from quotaflow.core.errors import OperatorError
from quotaflow.core.settings import ConfigError, Settings

DESCRIPTION = """\
Tails access logs (QUOTAFLOW_SHIP_PATHS, globs allowed; name the first rotated file too,
e.g. /var/log/nginx/access.log,/var/log/nginx/access.log.1) written in QUOTAFLOW_SHIP_FORMAT:
nginx_json (log_format ... escape=json), nginx_combined, envoy_json or envoy_text (Envoy's
default), and publishes one event per line to Kafka (idempotent, acks=all; a disk spool in
QUOTAFLOW_SHIP_STATE_DIR/spool while Kafka is away). Paths become route templates by
QUOTAFLOW_SHIP_ROUTES, else with id-like segments replaced by {id}; the org and key id come
from the logged fields QUOTAFLOW_SHIP_FIELDS names (or QUOTAFLOW_SHIP_ORG_ID /
QUOTAFLOW_SHIP_API_KEY_ID). Each file's position is checkpointed in
QUOTAFLOW_SHIP_STATE_DIR/checkpoints.json once its lines are acknowledged (or spooled);
files are known by their first line, so rename and copytruncate rotation lose and repeat
nothing, and a line shipped twice is one event downstream (its id comes from the file and the
line's offset, or is the gateway's X-Quotaflow-Event-Id when logged). Malformed lines go to
the dead-letter topic with the reason, the file and the offset. Metrics on
127.0.0.1:QUOTAFLOW_SHIP_METRICS_PORT. Runs in the foreground, logging to stderr, until Ctrl-C
or SIGTERM. `quotaflow config check` shows every QUOTAFLOW_SHIP_* setting."""


def run_ship(args: argparse.Namespace, settings: Settings) -> int:
    from quotaflow.collector.producer import ProducerCore
    from quotaflow.collector.ship.shipper import ConfigProblem, Shipper, ShipConfig
    from quotaflow.collector.spool import SpoolLocked
    from quotaflow.schemas.topics import DEAD_LETTER_TOPIC, EVENTS_TOPIC

    config = ShipConfig.from_settings(settings)
    core = ProducerCore(settings.kafka_bootstrap, spool_dir=config.state_dir / "spool",
                        spool_max_bytes=settings.spool_max_bytes, spool_segment_bytes=settings.spool_segment_bytes,
                        spool_topics=(EVENTS_TOPIC, DEAD_LETTER_TOPIC), memory_bytes=settings.collector_memory_bytes,
                        delivery_timeout_s=settings.collector_delivery_timeout_s)
    try:
        shipper = Shipper(config, core)
    except ConfigProblem as exc:
        raise ConfigError(str(exc)) from None
    serve_metrics(settings, "ship_metrics_port")
    from quotaflow.core import gc_tuning

    gc_tuning.for_streaming()  # a dict per line: young collections would rescan the batches in flight

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, shipper.stop)
        try:
            await core.start()
        except SpoolLocked:
            raise OperatorError(f"another shipper uses {config.state_dir} (its spool is locked): give each shipper "
                                "its own QUOTAFLOW_SHIP_STATE_DIR") from None
        try:
            await shipper.run(until_idle=args.until_idle)
        finally:
            await core.stop()
            shipper.checkpoint_now()

    asyncio.run(main())
    return 0


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--until-idle", action="store_true",
                   help="exit once every file is read to its end and every line is acknowledged (or spooled)")


COMMANDS = (
    Command("ship", "tail nginx / Envoy access logs and publish their requests as events", run_ship,
            description=DESCRIPTION, arguments=_arguments),
)
