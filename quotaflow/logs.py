"""Structured logging: one JSON object per line (or plain text for humans).

Context goes in ``extra=``: ``log.info("batch stored", extra={"rows": 500})``
becomes ``{"ts": ..., "level": "info", "logger": ..., "msg": "batch stored", "rows": 500}``.
"""

from __future__ import annotations

import logging
import logging.config
import time

import orjson

# Attributes every LogRecord has; anything else on a record came from extra=.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        return line


FORMATTERS = {"json": JsonFormatter, "text": TextFormatter}


def logging_dict(level: str = "INFO", fmt: str = "json") -> dict:
    """dictConfig for every process (Faust's worker takes it too): one handler on
    stderr, our format; the chatty libraries at WARNING unless we debug."""
    quiet = "DEBUG" if level.upper() == "DEBUG" else "WARNING"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"quotaflow": {"()": FORMATTERS[fmt]}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "quotaflow", "stream": "ext://sys.stderr"}},
        "root": {"level": level.upper(), "handlers": ["stderr"]},
        "loggers": {name: {"level": quiet} for name in ("aiokafka", "faust", "mode", "kafka")},
    }


def setup_logging(level: str = "INFO", fmt: str = "json") -> None:
    logging.config.dictConfig(logging_dict(level, fmt))
