"""Kafka records to the columns of the raw table, ready for a column-oriented insert
(sinks/clickhouse/writer.py sends them as one JSON document that ClickHouse parses)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from quotaflow.schemas.clickhouse.tables import RAW_COLUMNS
from quotaflow.schemas.events import FIELD_NAMES, FORWARDED_HEADER, RequestEvent, TimeBounds, decode_columns

_ORG = FIELD_NAMES.index("org_id")
_TS = FIELD_NAMES.index("ts_ms")


@dataclass
class Rows:
    """Valid events as columns and where each row came from."""

    fields: list[list[Any]] = field(default_factory=lambda: [[] for _ in FIELD_NAMES])  # per field of FIELDS
    records: list[Any] = field(default_factory=list)  # per row: its ConsumerRecord
    indexes: list[int] = field(default_factory=list)  # per row: its index in the record
    tiers: list[str] = field(default_factory=list)  # per row: its org's tier, from set_tiers
    skipped: Counter = field(default_factory=Counter)  # events not stored, by why (SchemaError.kind, FORWARDED)

    def __len__(self) -> int:
        return len(self.indexes)

    def column(self, name: str) -> list[Any]:
        """One field's values (a name of FIELD_NAMES)."""
        return self.fields[FIELD_NAMES.index(name)]

    @property
    def org_ids(self) -> set[str]:
        return set(self.fields[_ORG])

    def set_tiers(self, tiers: dict[str, str]) -> None:
        self.tiers = [tiers[org] for org in self.fields[_ORG]]

    @property
    def columns(self) -> list[list[Any]]:
        """The rows as the columns of RAW_COLUMNS, in that order."""
        own = {
            # Seconds with 3 decimals: how DateTime64(3) reads a number in text formats. Any ms
            # timestamp divided by 1000 prints back as exactly those decimals (< 16 digits).
            "event_time": [ts / 1000 for ts in self.fields[_TS]],
            "kafka_partition": [rec.partition for rec in self.records],
            "kafka_offset": [rec.offset for rec in self.records],
            "tier": self.tiers,
        }
        return [own[name] if name in own else self.fields[FIELD_NAMES.index(name)] for name in RAW_COLUMNS]

    def source(self, row: int) -> tuple[Any, int, RequestEvent]:
        """(record, index in it, event) of a row."""
        return self.records[row], self.indexes[row], RequestEvent._make(f[row] for f in self.fields)

    def place(self, row: int) -> str:
        """"offset.index" of a row: a record may carry several events."""
        return f"{self.records[row].offset}.{self.indexes[row]}"

    def slice(self, lo: int, hi: int) -> "Rows":
        return Rows([f[lo:hi] for f in self.fields], self.records[lo:hi], self.indexes[lo:hi], self.tiers[lo:hi])

    def take(self, positions: list[int]) -> "Rows":
        """The rows at these positions, in that order."""
        return Rows([[f[i] for i in positions] for f in self.fields], [self.records[i] for i in positions],
                    [self.indexes[i] for i in positions], [self.tiers[i] for i in positions] if self.tiers else [])

    @staticmethod
    def join(parts: list["Rows"]) -> "Rows":
        """The rows of the parts one after the other."""
        if len(parts) == 1:
            return parts[0]
        return Rows([[v for p in parts for v in p.fields[i]] for i in range(len(FIELD_NAMES))],
                    [r for p in parts for r in p.records], [i for p in parts for i in p.indexes],
                    [t for p in parts for t in p.tiers], sum((p.skipped for p in parts), Counter()))


FORWARDED = "forwarded"  # a copy the processor made to count events on their org's partition


def to_rows(records, bounds: TimeBounds | None = None) -> Rows:
    """Rows for the schema-valid events of the records (a record may carry a batch);
    invalid ones, and events too far in time from their record's arrival (``bounds``),
    are counted and skipped (the processor dead-letters them, by the same rules), as are
    the processor's forwarded copies (their originals are stored). The tier column is
    filled in by set_tiers.

    A record whose events are all valid (the usual case) comes decoded as columns,
    which are appended whole: no per-event Python code."""
    rows = Rows()
    for rec in records:
        if rec.headers and any(name == FORWARDED_HEADER for name, _ in rec.headers):
            rows.skipped[FORWARDED] += 1
            continue
        decoded = decode_columns(rec.value, rec.timestamp, bounds)
        for _, exc in decoded.refused:
            rows.skipped[exc.kind] += 1
        if not decoded.indexes:
            continue
        for values, column in zip(rows.fields, decoded.columns, strict=True):
            values.extend(column)
        rows.indexes.extend(decoded.indexes)
        rows.records.extend([rec] * len(decoded.indexes))
    return rows
