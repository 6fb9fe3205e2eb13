"""Dead-letter records: the original bytes, untouched, plus headers saying why.

Keeping the value as published (rather than wrapping it) lets an operator fix
the cause and replay the record as is. From a batch record only the refused
item is dead-lettered (re-encoded alone), with its index in the record; an item
nested too deep to re-encode is dead-lettered as the whole record, with its index
(SchemaError.payload). A record may be dead-lettered twice after a crash
(at-least-once); the source topic/partition/offset headers identify it.
"""

from __future__ import annotations

HEADER_REASON = "qf.error.reason"  # human readable, every problem found
HEADER_STAGE = "qf.error.stage"  # which stage rejected it: collector, processor, sink
HEADER_SOURCE_TOPIC = "qf.source.topic"
HEADER_SOURCE_PARTITION = "qf.source.partition"
HEADER_SOURCE_OFFSET = "qf.source.offset"
HEADER_SOURCE_INDEX = "qf.source.index"  # position in the source record, when it carried a batch
HEADER_TS_MS = "qf.error.ts_ms"
# A line of a file (the access-log shipper): its file, where it starts, the file's fingerprint.
HEADER_SOURCE_FILE = "qf.source.file"
HEADER_SOURCE_FILE_OFFSET = "qf.source.file_offset"
HEADER_SOURCE_FINGERPRINT = "qf.source.fingerprint"
# An alert notification given up on after its last attempt (stage "alerts"): the value is
# the notification as it was to be sent, never a channel's secret.
HEADER_ALERT_CHANNEL = "qf.alert.channel"
HEADER_ALERT_NOTIFICATION_ID = "qf.alert.notification_id"

STAGE_COLLECTOR = "collector"
STAGE_PROCESSOR = "processor"
STAGE_SINK = "sink"
STAGE_ALERTS = "alerts"

MAX_REASON_BYTES = 2000


def headers(reason: str, stage: str, *, topic: str | None = None, partition: int | None = None,
            offset: int | None = None, index: int | None = None, ts_ms: int, file: str | None = None,
            file_offset: int | None = None, fingerprint: str | None = None) -> list[tuple[str, bytes]]:
    out = [
        (HEADER_REASON, reason.encode()[:MAX_REASON_BYTES]),
        (HEADER_STAGE, stage.encode()),
        (HEADER_TS_MS, str(ts_ms).encode()),
    ]
    if topic is not None:
        out += [
            (HEADER_SOURCE_TOPIC, topic.encode()),
            (HEADER_SOURCE_PARTITION, str(partition).encode()),
            (HEADER_SOURCE_OFFSET, str(offset).encode()),
        ]
    if index is not None:
        out.append((HEADER_SOURCE_INDEX, str(index).encode()))
    if file is not None:
        out += [
            (HEADER_SOURCE_FILE, file.encode(errors="replace")),
            (HEADER_SOURCE_FILE_OFFSET, str(file_offset).encode()),
            (HEADER_SOURCE_FINGERPRINT, str(fingerprint).encode()),
        ]
    return out


def read_headers(raw: list[tuple[str, bytes]] | tuple | None) -> dict[str, str]:
    return {k: v.decode(errors="replace") for k, v in (raw or ())}
