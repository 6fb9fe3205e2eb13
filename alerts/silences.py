"""Silences on their compacted topic (schemas/topics.py ALERT_SILENCES_TOPIC): one record per
silence, keyed by "<org>/<silence id>" ("*" for every org), a tombstone when removed. The
alerts stage follows the topic (alerts/sources.py); `quotaflow alerts silences` writes it."""

from __future__ import annotations

from pydantic import ValidationError

from quotaflow.alerts.compacted import CompactedTopic
from quotaflow.core.errors import OperatorError
from quotaflow.schemas.alert_rules import Silence
from quotaflow.schemas.topics import ALERT_SILENCES_TOPIC


def silence_key(org_id: str, silence_id: str) -> bytes:
    return f"{org_id}/{silence_id}".encode()


class SilenceStore(CompactedTopic):
    def __init__(self, bootstrap: str, topic: str = ALERT_SILENCES_TOPIC):
        super().__init__(bootstrap, topic)

    async def read(self) -> dict[tuple[str, str], Silence]:
        """Every silence the topic holds (ended ones too, until removed), by (org, id)."""
        out: dict[tuple[str, str], Silence] = {}
        await self._read_all(lambda record: self._apply(out, record))
        return out

    @staticmethod
    def _apply(out: dict[tuple[str, str], Silence], record) -> None:
        org, _, sid = (record.key or b"").decode(errors="replace").partition("/")
        if record.value is None:
            out.pop((org, sid), None)
            return
        try:
            out[(org, sid)] = Silence.model_validate_json(record.value)
        except ValidationError:
            pass  # not a silence: the stage skips it too

    async def put(self, silence: Silence) -> None:
        await self._send(silence_key(silence.org_id, silence.silence_id), silence.model_dump_json().encode())

    async def remove(self, org_id: str, silence_id: str) -> Silence:
        existing = (await self.read()).get((org_id, silence_id))
        if existing is None:
            raise OperatorError(f"no silence {silence_id} for {'every org' if org_id == '*' else 'org ' + org_id}")
        await self._send(silence_key(org_id, silence_id), None)
        return existing
