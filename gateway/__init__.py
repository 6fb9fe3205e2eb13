"""What gateways use: ``RateLimiter.verify`` (an API key verified and its limits checked in
one Redis round trip) and ``.check`` (limits alone, trusted mode), response headers, an ASGI
middleware, and an HTTP check endpoint for nginx and Envoy."""

from quotaflow.gateway.limiter import RateLimiter, SyncRateLimiter, Verdict

__all__ = ["RateLimiter", "SyncRateLimiter", "Verdict"]
