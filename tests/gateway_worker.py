"""One gateway process for tests and benchmarks: `python -m tests.gateway_worker ORG KEY N`.

Checks N requests of one key as fast as it can, publishes each request's event
(the reservation's event_id and time; status 429 when refused, as a real gateway
would) and prints how many it admitted and whether every check was enforced.
"""

import asyncio
import sys

from quotaflow.collector.emitter import Emitter
from quotaflow.core.settings import get_settings
from quotaflow.gateway.limiter import RateLimiter
from quotaflow.schemas.events import RequestEvent


async def main(org_id: str, api_key_id: str, n: int) -> None:
    settings = get_settings()
    limiter = RateLimiter.from_settings(settings)
    admitted, enforced = 0, True
    async with Emitter(settings.kafka_bootstrap) as emitter:
        for _ in range(n):
            d = await limiter.check(api_key_id, org_id)
            admitted += d.allowed
            enforced &= d.enforced
            await emitter.emit(RequestEvent.new(
                event_id=d.event_id, ts_ms=d.now_ms, org_id=org_id, api_key_id=api_key_id, service="gateway-worker",
                endpoint="/v1/things", method="GET", status=200 if d.allowed else 429, latency_ms=1.0,
                request_bytes=0, response_bytes=10, client_ip="192.0.2.1", user_agent="gateway-worker"))
    await limiter.aclose()
    print(f"admitted={admitted} enforced={enforced}", flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
