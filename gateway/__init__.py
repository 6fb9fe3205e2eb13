"""What gateways use: ``RateLimiter.check`` (one Redis round trip), response headers,
an ASGI middleware, and an HTTP check endpoint for nginx and Envoy."""

from quotaflow.gateway.limiter import RateLimiter, SyncRateLimiter

__all__ = ["RateLimiter", "SyncRateLimiter"]
