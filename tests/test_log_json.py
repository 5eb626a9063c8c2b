"""``BrokerApp.log_json``: a real ``broker serve``; every output line is one JSON object, and
session events carry their bound context (session id, user)."""

from __future__ import annotations

import json

from broker_cli import Served


def test_every_line_is_json_with_session_context(tmp_path):
    s = Served(tmp_path, str(tmp_path / "state"))
    s.args.append("--BrokerApp.log_json=True")
    s.start()
    try:
        created = s.api("POST", "/api/sessions", {"user": "zoe 秀樹", "routespec": "/user/zoe/"})
        s.api("DELETE", f"/api/sessions/{created['id']}?reason=done")
    finally:
        assert s.stop() == 0
    lines = [ln for ln in s.output().splitlines() if ln.strip()]
    assert len(lines) >= 4
    records = []
    for ln in lines:
        rec = json.loads(ln)  # every line, no exceptions
        assert isinstance(rec, dict) and rec["event"] and rec["level"] and rec["timestamp"]
        records.append(rec)
    by_event = {r["event"]: r for r in records}
    for event in ("session registered", "session closed"):
        rec = by_event[event]
        assert rec["session"] == created["id"], rec
        assert rec["user"] == "zoe 秀樹"
    assert by_event["session closed"]["reason"] == "done"
    assert "serving" in by_event and "broker stopped" in by_event
    assert created["secret"] not in s.output()
