"""A Kafka record's events that count, as columns (decoded by schemas.events.decode_columns)."""

from __future__ import annotations

from typing import NamedTuple, Sequence

from quotaflow.schemas.events import FIELD_NAMES

# Where each field the processor reads sits in decode_columns' columns
EVENT_ID, TS, ORG, KEY, STATUS = (FIELD_NAMES.index(name) for name in
                                  ("event_id", "ts_ms", "org_id", "api_key_id", "status"))


class Record(NamedTuple):
    """A record's events that count, as columns: ``rows`` says which of the columns' rows."""

    partition: int
    received_ms: int  # when the broker received the record: caps how far its events move clocks
    org_id: str  # a record carries one org's events
    api_key_ids: tuple[str, ...]
    ts_ms: tuple[int, ...]
    event_ids: tuple[str, ...]
    positions: list[int]
    rows: Sequence[int]
    keys: dict[str, list[int]]  # the rows of each API key

    @classmethod
    def of(cls, partition: int, received_ms: int, org_id: str, api_key_ids: tuple[str, ...], ts_ms: tuple[int, ...],
           event_ids: tuple[str, ...], positions: list[int], rows: Sequence[int]) -> "Record":
        if len(set(api_key_ids)) == 1:
            keys = {api_key_ids[0]: list(rows)}
        else:
            keys = {}
            for j in rows:
                keys.setdefault(api_key_ids[j], []).append(j)
        return cls(partition, received_ms, org_id, api_key_ids, ts_ms, event_ids, positions, rows, keys)

    def row_values(self) -> tuple[Sequence[int], Sequence[str], Sequence[int]]:
        """Event times, event ids and positions of the rows, for the duplicate check."""
        if isinstance(self.rows, range):  # all of them
            return self.ts_ms, self.event_ids, self.positions
        return ([self.ts_ms[j] for j in self.rows], [self.event_ids[j] for j in self.rows],
                [self.positions[j] for j in self.rows])

    def without(self, rows: list[int]) -> "Record":
        drop = set(rows)
        return Record.of(*self[:7], [j for j in self.rows if j not in drop])
