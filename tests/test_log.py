"""broker.log: every string field capped and escaped (no log injection, no flooding)."""

from __future__ import annotations

import io
import json

from broker import log as broker_log
from broker.log import MAX_FIELD, cap_fields


def test_long_values_truncated_with_count():
    out = cap_fields(None, "info", {"event": "x", "user": "a" * 1000})
    assert out["user"].startswith("a" * MAX_FIELD)
    assert out["user"] == "a" * MAX_FIELD + "...(+800)"
    assert len(out["user"]) < 1000


def test_short_values_untouched_and_non_strings_untouched():
    ev = {"event": "hello", "user": "秀樹", "port": 8080, "ok": True, "none": None, "at": "a@b ~c"}
    assert cap_fields(None, "info", dict(ev)) == ev


def test_exact_limit_not_truncated():
    v = "b" * MAX_FIELD
    assert cap_fields(None, "info", {"v": v})["v"] == v


def test_control_characters_escaped():
    out = cap_fields(None, "info", {"user": "evil\nINFO forged line\r\x1b[31mred\x1b[0m\x00\t"})
    v = out["user"]
    for c in "\n\r\x1b\x00\t":
        assert c not in v
    assert "\\n" in v and "\\x1b" in v and "\\r" in v
    assert v.isprintable()


def test_log_injection_renders_as_one_line():
    buf = io.StringIO()
    broker_log.configure("INFO", json=False, stream=buf)
    try:
        broker_log.get_logger(session="s1").info(
            "agent authentication failed",
            user="mallory\n2026-01-01T00:00:00Z [info ] session ready user=admin\x1b[2K\x1b[1A",
            reason="x" * 5000,
        )
        text = buf.getvalue()
        assert text.count("\n") == 1 and text.endswith("\n")
        assert "\x1b" not in text
        assert len(text) < 1000
        assert "mallory" in text
    finally:
        broker_log.configure("INFO")


def test_json_log_is_one_valid_line():
    buf = io.StringIO()
    broker_log.configure("INFO", json=True, stream=buf)
    try:
        broker_log.get_logger().warning("x\ny", user="a\nb\u2028c\x85d")
        lines = buf.getvalue().splitlines()
        assert len(lines) == 1
        rec = json.loads(lines[0])
        assert "\n" not in rec["user"] and "\u2028" not in rec["user"] and "\x85" not in rec["user"]
        assert "\n" not in rec["event"]
    finally:
        broker_log.configure("INFO")
