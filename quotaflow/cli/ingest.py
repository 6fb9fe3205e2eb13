"""``quotaflow ingest``: the HTTP ingest (POST /v1/events) in the foreground."""

from __future__ import annotations

import argparse
import sys

from quotaflow.cli.registry import Command, host_argument
from quotaflow.core.logs import logging_dict
from quotaflow.core.settings import Settings


def run_ingest(args: argparse.Namespace, settings: Settings) -> int:
    from quotaflow.collector.ingest import serve

    if not settings.ingest_port:
        print("quotaflow: QUOTAFLOW_INGEST_PORT is 0 (disabled)", file=sys.stderr)
        return 2
    if not settings.ingest_tokens and not settings.key_hash_secrets:
        print("quotaflow: QUOTAFLOW_INGEST_TOKENS and QUOTAFLOW_KEY_HASH_SECRETS are empty: every request would be "
              'refused (set QUOTAFLOW_INGEST_TOKENS to \'{"TOKEN": "ORG"}\', or "*" for a token that may publish '
              "any org's events; or the key hash secrets, for orgs' API keys)", file=sys.stderr)
        return 2
    serve(settings, host=args.host, log_config=logging_dict(settings.log_level, settings.log_format))
    return 0


COMMANDS = (
    Command("ingest", "serve the HTTP ingest (POST /v1/events) in the foreground", run_ingest,
            description="Takes request events from services in any language on "
                        "127.0.0.1:QUOTAFLOW_INGEST_PORT: POST /v1/events with a token of QUOTAFLOW_INGEST_TOKENS "
                        "or an org's API key holding QUOTAFLOW_INGEST_KEY_SCOPE (events:write), "
                        "a JSON array or NDJSON (gzip accepted), answered 202 with the accepted and refused counts "
                        "and each refused event's reasons; 413 over QUOTAFLOW_INGEST_MAX_BODY_BYTES; 429 or 503 "
                        "with Retry-After when Kafka and the disk spool cannot keep up. Publishes through the "
                        "producer core, spooling to QUOTAFLOW_SPOOL_DIR/ingest while Kafka is away. OpenAPI schema "
                        "at /openapi.json, metrics at /metrics. Stop it with Ctrl-C or SIGTERM.",
            arguments=host_argument),
)
