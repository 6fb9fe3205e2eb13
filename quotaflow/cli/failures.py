"""One line for the error that stopped a command: what could not be reached and why,
every secret redacted."""

from __future__ import annotations

from quotaflow.core.errors import OperatorError
from quotaflow.core.redact import redact
from quotaflow.core.settings import Settings


def describe(exc: Exception, settings: Settings) -> str | None:
    """The line for an error the operator can act on; None for one nobody foresaw (a bug)."""
    import redis

    from quotaflow.schemas.clickhouse.client import ClickHouseUnavailable

    if isinstance(exc, (OperatorError, ClickHouseUnavailable)):
        message = redact(exc)
    elif isinstance(exc, redis.exceptions.AuthenticationError):
        message = f"Redis at {redact(settings.redis_url)} refused the credentials: {redact(exc)}"
    elif isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
        message = f"cannot reach Redis at {redact(settings.redis_url)}: {redact(exc)}"
    elif isinstance(exc, redis.exceptions.RedisError):
        message = f"Redis at {redact(settings.redis_url)}: {redact(exc)}"
    elif isinstance(exc, OSError):
        message = redact(exc)
    else:
        return None
    return " ".join(message.split())  # one line
