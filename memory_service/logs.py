"""Structured logs: one JSON object per line and per event.

Events are logged with a short message (the event) and their fields as `extra`:

    log.info("bank created", extra={"tenant": "research", "bank": "book-1"})

`JsonFormatter` writes them as
`{"ts": ..., "level": "info", "logger": "longmem.server", "event": "bank created",
"tenant": "research", "bank": "book-1"}`. API keys are never a field of any event.
`configure` sends the `longmem` loggers to stderr in that form (`longmem serve` does).
"""

from __future__ import annotations

import json
import logging
import sys
import time

# the attributes every LogRecord has; anything else on a record came from `extra`
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """A record as one JSON line: time, level, logger, event and the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        line |= {k: v for k, v in vars(record).items() if k not in _STANDARD}
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure(level: str = "INFO", stream=sys.stderr) -> None:
    """Log the `longmem` loggers at `level` and above to `stream`, one JSON line each."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("longmem")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
