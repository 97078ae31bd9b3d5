"""JSON logs (`log_format = "json"`): one object per line, with the fields docs/observability.md names."""

from __future__ import annotations

import io
import json
import logging

import pytest

from snapshotter.config import ConfigError, parse
from snapshotter.logs import JsonFormatter, formatter


def _log_to(stream: io.StringIO, fmt: logging.Formatter) -> logging.Logger:
    logger = logging.getLogger(f"damselfly.test.{id(stream)}")
    logger.propagate = False
    handler = logging.StreamHandler(stream)
    handler.setFormatter(fmt)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    return logger


def test_every_record_is_one_json_object_per_line_with_time_level_logger_and_message() -> None:
    out = io.StringIO()
    log = _log_to(out, JsonFormatter())
    log.info("attached %s (%d layers)", "img-1", 2)
    log.warning("two\nlines and ünïcode")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["level"] == "info"
    assert first["logger"] == log.name
    assert first["message"] == "attached img-1 (2 layers)"
    assert first["time"].endswith("Z") and first["time"][10] == "T" and len(first["time"]) == 24
    assert "exception" not in first
    assert second == {**second, "level": "warning", "message": "two\nlines and ünïcode"}


def test_an_exception_is_logged_with_its_traceback_text() -> None:
    out = io.StringIO()
    log = _log_to(out, JsonFormatter())
    try:
        raise ValueError("bad chunk at 4096")
    except ValueError:
        log.exception("read failed")
    (line,) = out.getvalue().splitlines()
    record = json.loads(line)
    assert record["level"] == "error"
    assert record["message"] == "read failed"
    assert record["exception"].startswith("Traceback (most recent call last):")
    assert "ValueError: bad chunk at 4096" in record["exception"]


def test_the_config_takes_text_or_json_and_refuses_anything_else() -> None:
    assert parse("").log_format == "text"
    assert parse('log_format = "json"').log_format == "json"
    with pytest.raises(ConfigError, match="log_format 'xml' is not one of text, json"):
        parse('log_format = "xml"')
    assert isinstance(formatter("json"), JsonFormatter)
    assert not isinstance(formatter("text"), JsonFormatter)
