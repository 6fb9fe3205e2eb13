"""RequestEvent: one API request, as every publisher puts it on the events topic.

Wire format: a JSON object (UTF-8), exactly the fields of ``FIELDS``, no others; a record
carries one, or an array of one org's. This module is the import path for all of it;
each part lives in a module of its own:

- event_fields.py: the fields and each one's rule, declared once. The checker's
  messages, the fast paths' wire types and the JSON Schema are all derived from it.
- event_validation.py: ``RequestEvent``, ``SchemaError``, ``validate``.
- event_decoding.py: records of the events topic read into events or columns.
- event_time.py: ``TimeBounds``, an event's time judged against its record's arrival.
- event_partitions.py: an event's record key and its org's partition.
- event_json_schema.py: the JSON Schema exported as request_event.v1.schema.json.
"""

from quotaflow.schemas.event_decoding import (
    MAX_DEPTH,
    MAX_EVENTS_PER_RECORD,
    RecordColumns,
    decode,
    decode_columns,
    decode_one,
    decode_record,
    encode_batch,
)
from quotaflow.schemas.event_fields import (
    BYTES_MAX,
    CLIENT_IP_MAX,
    ENDPOINT_MAX,
    ENDPOINT_PATTERN,
    FIELD_NAMES,
    FIELDS,
    LATENCY_MAX_MS,
    METHODS,
    RAW_ID_SEGMENT,
    SCHEMA_VERSION,
    TS_MAX_MS,
    TS_MIN_MS,
    USER_AGENT_MAX,
    UUID_PATTERN,
    Field,
)
from quotaflow.schemas.event_json_schema import json_schema, render_json_schema
from quotaflow.schemas.event_partitions import FORWARDED_HEADER, partition_key, partition_of
from quotaflow.schemas.event_time import DAY_MS, TimeBounds, time_bounds_from_settings
from quotaflow.schemas.event_validation import MAX_ERRORS, RequestEvent, SchemaError, validate

__all__ = [
    "BYTES_MAX", "CLIENT_IP_MAX", "DAY_MS", "ENDPOINT_MAX", "ENDPOINT_PATTERN", "FIELDS", "FIELD_NAMES",
    "FORWARDED_HEADER", "LATENCY_MAX_MS", "MAX_DEPTH", "MAX_ERRORS", "MAX_EVENTS_PER_RECORD", "METHODS",
    "RAW_ID_SEGMENT", "SCHEMA_VERSION", "TS_MAX_MS", "TS_MIN_MS", "USER_AGENT_MAX", "UUID_PATTERN",
    "Field", "RecordColumns", "RequestEvent", "SchemaError", "TimeBounds",
    "decode", "decode_columns", "decode_one", "decode_record", "encode_batch", "json_schema", "partition_key",
    "partition_of", "render_json_schema", "time_bounds_from_settings", "validate",
]
