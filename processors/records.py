"""Events that count, as columns: a record's (decoded by schemas.events.decode_columns), or
several one-event records' of one org and partition, gathered (OneEventRecords)."""

from __future__ import annotations

from typing import NamedTuple, Sequence

from quotaflow.schemas.events import FIELD_NAMES

# Where each field the processor reads sits in a decoded event's values
EVENT_ID, TS, ORG, KEY, STATUS = (FIELD_NAMES.index(name) for name in
                                  ("event_id", "ts_ms", "org_id", "api_key_id", "status"))


class Record(NamedTuple):
    """Events of one org from one partition, in position order, as columns: ``rows`` says
    which of the columns' rows count."""

    partition: int
    org_id: str
    api_key_ids: Sequence[str]
    ts_ms: Sequence[int]
    event_ids: Sequence[str]
    positions: Sequence[int]
    # per event, how far it moves its subjects' clocks: its time, capped by the time the
    # broker received its record
    clocks: Sequence[int]
    rows: Sequence[int]
    keys: dict[str, list[int]]  # the rows of each API key

    @classmethod
    def of(cls, partition: int, org_id: str, api_key_ids: Sequence[str], ts_ms: Sequence[int],
           event_ids: Sequence[str], positions: Sequence[int], clocks: Sequence[int], rows: Sequence[int]) -> "Record":
        if len(set(api_key_ids)) == 1:
            keys = {api_key_ids[0]: list(rows)}
        else:
            keys = {}
            for j in rows:
                keys.setdefault(api_key_ids[j], []).append(j)
        return cls(partition, org_id, api_key_ids, ts_ms, event_ids, positions, clocks, rows, keys)

    def row_values(self) -> tuple[Sequence[int], Sequence[str], Sequence[int]]:
        """Event times, event ids and positions of the rows, for the duplicate check."""
        if isinstance(self.rows, range):  # all of them
            return self.ts_ms, self.event_ids, self.positions
        return ([self.ts_ms[j] for j in self.rows], [self.event_ids[j] for j in self.rows],
                [self.positions[j] for j in self.rows])

    def without(self, rows: list[int]) -> "Record":
        drop = set(rows)
        return Record.of(*self[:7], [j for j in self.rows if j not in drop])


class OneEventRecords:
    """One-event records of one org and partition in a batch, gathered into one Record: what
    is done per record (its bookkeeping, its part of the duplicate check, its runs) is then
    done once for all of them. Kafka's own unit is one event a record (kcat, Kafka Connect)."""

    __slots__ = ("partition", "org_id", "api_key_ids", "ts_ms", "event_ids", "positions", "clocks", "keys")

    def __init__(self, partition: int, org_id: str):
        self.partition = partition
        self.org_id = org_id
        self.api_key_ids: list[str] = []
        self.ts_ms: list[int] = []
        self.event_ids: list[str] = []
        self.positions: list[int] = []
        self.clocks: list[int] = []
        self.keys: dict[str, list[int]] = {}

    def add(self, values: tuple, position: int, received_ms: int) -> None:
        """An event's values (FIELDS order), the position of its record, and when the broker received it."""
        key, ts = values[KEY], values[TS]
        rows = self.keys.get(key)
        if rows is None:
            rows = self.keys[key] = []
        rows.append(len(self.ts_ms))
        self.api_key_ids.append(key)
        self.ts_ms.append(ts)
        self.event_ids.append(values[EVENT_ID])
        self.positions.append(position)
        self.clocks.append(ts if ts <= received_ms else received_ms)

    def record(self) -> Record:
        return Record(self.partition, self.org_id, self.api_key_ids, self.ts_ms, self.event_ids, self.positions,
                      self.clocks, range(len(self.ts_ms)), self.keys)
