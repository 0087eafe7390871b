"""The kernel's log formats: JSON (the default) is one parseable object per event, with the
event's fields; text is one readable line."""

from __future__ import annotations

import io
import json
import logging
import sys
from pathlib import Path

import pytest

from kernel import log as kernel_log
from kernel.config import Config


def _record(**extra: object) -> logging.LogRecord:
    record = logging.getLogger("kernel.test").makeRecord(
        "kernel.test", logging.WARNING, __file__, 1, "denied %s", ("twice",), None,
        extra=extra)
    record.created = 1700000000.1234567
    return record


def test_json_is_the_default_and_one_object_per_event(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Config().log_format == "json"
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        kernel_log.setup(Config().log_format, "info")
        logging.getLogger("kernel.access").info("line\nbreak", extra={"principal": "agent:1"})
        logging.getLogger("kernel.access").debug("below the level")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    [line] = stream.getvalue().splitlines()  # a newline in a message stays inside its event
    entry = json.loads(line)
    assert (entry["level"], entry["logger"], entry["msg"], entry["principal"]) == (
        "info", "kernel.access", "line\nbreak", "agent:1")


def test_json_carries_fields_exceptions_and_unserialisable_values() -> None:
    record = _record(principal="agent:7", call="fs.read", path=Path("/srv/x"))
    try:
        raise ValueError("boom")
    except ValueError:
        record.exc_info = sys.exc_info()
    entry = json.loads(kernel_log.JsonFormatter().format(record))
    assert entry["ts"] == 1700000000.123457 and entry["level"] == "warning"
    assert entry["msg"] == "denied twice" and entry["call"] == "fs.read"
    assert entry["principal"] == "agent:7" and entry["path"] == "/srv/x"
    assert "ValueError: boom" in entry["exc"] and "Traceback" in entry["exc"]
    assert not {"args", "msg_args", "exc_info", "levelno", "pathname"} & set(entry)


def test_text_is_one_line_with_the_fields() -> None:
    line = kernel_log.TextFormatter().format(_record(principal="agent:7"))
    assert line.endswith(" warning kernel.test: denied twice principal=agent:7")
