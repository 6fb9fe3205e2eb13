"""Structured logging: one JSON object per line (or plain text for humans).

Context goes in ``extra=``: ``log.info("batch stored", extra={"rows": 500})``
becomes ``{"ts": ..., "level": "info", "logger": ..., "msg": "batch stored", "rows": 500}``.

Every record passes through RedactSecrets on its way to the handler, whatever logger it
came from (aiokafka, urllib3, clickhouse-connect, uvicorn and ours alike): URL
passwords, bearer tokens and the configured secrets never reach a log line. Before
that, ExpectedTransients lowers what a library logs as an error for a condition it
expects and retries (aiokafka's "group coordinator not available" on every start).
"""

from __future__ import annotations

import collections
import logging
import logging.config
import time
from typing import Callable

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


class ExpectedTransients(logging.Filter):
    """aiokafka logs ``Group Coordinator Request failed: [Error 15]
    GroupCoordinatorNotAvailableError`` at error level on every start of a consumer group
    member: the broker has not loaded the group's coordinator yet (on a fresh broker it
    creates __consumer_offsets first), and the client asks again a moment later. Such a
    record is lowered to info, and so shown only where aiokafka logs info (debugging).
    A coordinator that stays unavailable is a real error: past ``burst`` of them within
    ``window_s`` (aiokafka asks about ten times a second), they keep their level."""

    LOGGER = "aiokafka"
    MARK = "GroupCoordinatorNotAvailableError"

    def __init__(self, burst: int = 30, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.burst, self.window_s, self._clock = burst, window_s, clock
        self._seen: collections.deque[float] = collections.deque()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not (record.name == self.LOGGER or record.name.startswith("aiokafka.")):
            return True
        try:
            if self.MARK not in record.getMessage():
                return True
        except Exception:  # bad %-arguments: RedactSecrets shows what there is
            return True
        now = self._clock()
        self._seen.append(now)
        while self._seen and now - self._seen[0] > self.window_s:
            self._seen.popleft()
        if len(self._seen) > self.burst:
            return True  # not transient any more: an error as logged
        record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
        return logging.getLogger(record.name).isEnabledFor(logging.INFO)


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
        "filters": {"transients": {"()": ExpectedTransients}, "redact": {"()": RedactSecrets}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "quotaflow", "stream": "ext://sys.stderr",
                                "filters": ["transients", "redact"]}},
        "root": {"level": level.upper(), "handlers": ["stderr"]},
        "loggers": {name: {"level": quiet} for name in ("aiokafka", "faust", "mode", "kafka")},
    }


def setup_logging(level: str = "INFO", fmt: str = "json") -> None:
    logging.config.dictConfig(logging_dict(level, fmt))
