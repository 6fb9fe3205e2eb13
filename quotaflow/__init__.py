"""quotaflow: API usage monitoring and rate limiting on Kafka, Faust, Redis and ClickHouse.

This package holds what spans the parts: configuration, logging, metrics and
the ``quotaflow`` command. The parts live in collector/, processors/, sinks/,
schemas/ and deploy/.
"""

__version__ = "0.1.0"
