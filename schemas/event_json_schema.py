"""The JSON Schema (draft 2020-12) of the events topic's records, for publishers in other
languages: derived from the fields' declaration (schemas/event_fields.py) and exported as
request_event.v1.schema.json by ``quotaflow schema export`` (a test keeps the two identical)."""

from __future__ import annotations

from typing import Any

import orjson

from quotaflow.schemas.event_decoding import MAX_EVENTS_PER_RECORD
from quotaflow.schemas.event_fields import FIELD_NAMES, FIELDS


def json_schema() -> dict[str, Any]:
    event = {
        "description": "One API request.",
        "type": "object",
        "additionalProperties": False,
        "required": list(FIELD_NAMES),
        "properties": {f.name: f.json_schema() for f in FIELDS},
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "urn:quotaflow:schema:request_event:v1",
        "title": "quotaflow RequestEvent v1",
        "description": "A record of the events topic, keyed by org_id, UTF-8 JSON: one RequestEvent, or an array "
                       f"of 1 to {MAX_EVENTS_PER_RECORD} RequestEvents of that same org (cheaper to publish and "
                       "to process).",
        "oneOf": [
            {"$ref": "#/$defs/RequestEvent"},
            {"type": "array", "minItems": 1, "maxItems": MAX_EVENTS_PER_RECORD,
             "items": {"$ref": "#/$defs/RequestEvent"}},
        ],
        "$defs": {"RequestEvent": event},
    }


def render_json_schema() -> bytes:
    return orjson.dumps(json_schema(), option=orjson.OPT_INDENT_2) + b"\n"
