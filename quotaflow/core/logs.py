"""Structured logging: one JSON object per line (or plain text for humans).

Context goes in ``extra=``: ``log.info("batch stored", extra={"rows": 500})``
becomes ``{"ts": ..., "level": "info", "logger": ..., "msg": "batch stored", "rows": 500}``.

Every record passes through RedactSecrets on its way to the handler, whatever logger it
came from (aiokafka, urllib3, clickhouse-connect, uvicorn and ours alike): URL
passwords, bearer tokens and the configured secrets never reach a log line.
"""

from __future__ import annotations

import logging
import logging.config
import time

import orjson

from quotaflow.core.redact import redact, redact_value

# Attributes every LogRecord has; anything else on a record came from extra=.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class RedactSecrets(logging.Filter):
    """Rewrites a record with its secrets hidden: the message (formatted with its
    arguments first), the extra= values, the exception and the stack text."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_redacted", False):
            return True  # already done (a record may pass several handlers)
        try:
            message = record.getMessage()
        except Exception:  # bad %-arguments: show what there is rather than lose the line
            message = f"{record.msg} {record.args!r}"
        record.msg, record.args = redact(message), None
        for key, value in list(vars(record).items()):
            if key not in _STANDARD and not key.startswith("_"):
                setattr(record, key, redact_value(value))
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        record.exc_info = None  # the text above stands for it; the formatters print exc_text
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        record._redacted = True
        return True


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
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            doc["exc"] = record.exc_text
        if record.stack_info:
            doc["stack"] = record.stack_info
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
        "filters": {"redact": {"()": RedactSecrets}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "quotaflow", "stream": "ext://sys.stderr",
                                "filters": ["redact"]}},
        "root": {"level": level.upper(), "handlers": ["stderr"]},
        "loggers": {name: {"level": quiet} for name in ("aiokafka", "faust", "mode", "kafka")},
    }


def setup_logging(level: str = "INFO", fmt: str = "json") -> None:
    logging.config.dictConfig(logging_dict(level, fmt))
