"""One log line per event: readable on a terminal, JSON for journald.

Every module logs through `event(name, **fields)`: a short kebab-case name
and its fields as data, so the JSON format gets them as real keys and a
line can be found by its name. Nothing here ever logs a settings value, a
request body or a key: callers pass only names, ids, statuses and numbers.
"""

import logging
import sys
from typing import Any

import orjson

logger = logging.getLogger("wfd")


def event(name: str, level: int = logging.INFO, exc_info: bool = False, **fields: Any
          ) -> None:
    """Log one event with its fields; `exc_info` adds the exception being handled."""
    if logger.isEnabledFor(level):
        logger.log(level, name, exc_info=exc_info, extra={"wfd_fields": fields})


class TextFormatter(logging.Formatter):
    """`2026-11-28 07:30:00 INFO execution workflow=x status=success ...`"""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "wfd_fields", {})
        parts = [self.formatTime(record, "%Y-%m-%d %H:%M:%S"), record.levelname,
                 record.getMessage()]
        parts += [f"{key}={value}" for key, value in fields.items() if value is not None]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: `{"ts", "level", "event", ...fields}`."""

    def format(self, record: logging.LogRecord) -> str:
        data = {"ts": record.created, "level": record.levelname.lower(),
                "event": record.getMessage(), **getattr(record, "wfd_fields", {})}
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(data, default=str).decode()


def setup(log_format: str = "text", level: str = "info") -> None:
    """Send the daemon's log to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False
