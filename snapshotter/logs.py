"""Logging of the long-running processes (`damselfly serve`, the device daemon): text or JSON lines.

``log_format = "json"`` (the config's top-level key; `serve` hands it to the daemon it starts) writes
one JSON object per line, for log shippers that parse rather than guess::

    {"time": "2026-12-07T10:57:00.123Z", "level": "error", "logger": "snapshotter.device.fuse",
     "message": "read of 4096 bytes at 0 failed: ...", "exception": "Traceback (most recent call last): ..."}

`time` is UTC with milliseconds (RFC 3339), `level` one of debug, info, warning, error, critical;
`exception` (the formatted traceback) and `stack` appear only when the record has them. A message
with newlines stays on one line (JSON escapes them).
"""

from __future__ import annotations

import json
import logging
import time

#: The text format (``log_format = "text"``).
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        seconds = int(record.created)
        millis = int((record.created - seconds) * 1000)
        out: dict[str, str] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            record.exc_text = record.exc_text or self.formatException(record.exc_info)
        if record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False)


def formatter(log_format: str) -> logging.Formatter:
    """The formatter of ``log_format`` (``text`` or ``json``)."""
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"log format {log_format!r} is not text or json")


def setup(level: int, log_format: str = "text") -> None:
    """Log records of `level` and above to stderr in `log_format` (`logging.basicConfig`: nothing
    changes when the root logger has handlers already, as under a test runner)."""
    handler = logging.StreamHandler()
    handler.setFormatter(formatter(log_format))
    logging.basicConfig(level=level, handlers=[handler])
