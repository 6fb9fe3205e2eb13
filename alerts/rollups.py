"""Unusual-activity baselines from the ClickHouse rollups, read through the query API: the
embedded engine can be open in one process only (the sink's, which serves the API), so
the alerts stage asks the API, as an operator (a token of QUOTAFLOW_API_TOKENS for "*"),
for each past hour a baseline needs: GET /v1/summary for that hour, requests minus
denials (what the stage itself counts).

Never in the way of an evaluation: an hour not fetched yet is fetched in the background
and the stage's own hourly counts stand in meanwhile (alerts/measures.py); a past hour's
answer is kept (the past does not change). An hour with no requests counts as an hour not
seen: an org that did not exist yet has no baseline, not a baseline of zero. Without an
operator token or the API (QUOTAFLOW_API_PORT=0) the stage uses its own counts only.
"""

from __future__ import annotations

import asyncio
import logging

import httpx

from quotaflow.core.settings import Settings

log = logging.getLogger(__name__)

MAX_CACHED = 200_000
MAX_INFLIGHT = 8


class RollupBaselines:
    def __init__(self, url: str, token: str):
        self.url, self._token = url.rstrip("/"), token
        self._client = httpx.AsyncClient(timeout=5.0, headers={"authorization": f"Bearer {token}"})
        self._hours: dict[tuple[str, str | None, int], float | None] = {}
        self._inflight: set[tuple[str, str | None, int]] = set()
        self._sem = asyncio.Semaphore(MAX_INFLIGHT)
        self.fetched = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> "RollupBaselines | None":
        token = next((t for t, org in sorted(settings.api_tokens.items()) if org == "*"), None)
        if not settings.api_port or token is None:
            return None
        return cls(f"http://127.0.0.1:{settings.api_port}", token)

    async def close(self) -> None:
        await self._client.aclose()

    def hours(self, org_id: str, api_key_id: str | None, starts: list[int]) -> list[float] | None:
        """The volume of each hour starting at ``starts`` that had requests, once every one
        is known; None (and the missing ones fetched) before that."""
        missing = [h for h in starts if (org_id, api_key_id, h) not in self._hours]
        for h in missing:
            key = (org_id, api_key_id, h)
            if key not in self._inflight and len(self._inflight) < 10 * MAX_INFLIGHT:
                self._inflight.add(key)
                asyncio.get_running_loop().create_task(self._fetch(key))
        if missing:
            return None
        values = [self._hours[(org_id, api_key_id, h)] for h in starts]
        return [v for v in values if v]

    async def _fetch(self, key: tuple[str, str | None, int]) -> None:
        org_id, api_key_id, start = key
        params = {"org": org_id, "from": str(start), "to": str(start + 3_600_000)}
        if api_key_id is not None:
            params["api_key"] = api_key_id
        try:
            async with self._sem:
                response = await self._client.get(f"{self.url}/v1/summary", params=params)
            if response.status_code == 200:
                (row,) = response.json()["rows"]
                if len(self._hours) > MAX_CACHED:
                    self._hours.clear()
                self._hours[key] = float(row["requests"] - row["denials"])
                self.fetched += 1
            else:
                log.debug("baseline hour not available", extra={"status": response.status_code})
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            log.debug("baseline hour not available", extra={"error": type(exc).__name__})
        finally:
            self._inflight.discard(key)
