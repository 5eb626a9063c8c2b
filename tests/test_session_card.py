"""The session card's facts (hub_plugin/session_card.py) on a real LocalBrokerSpawner object:
the end reason words, the ended record made when the spawner lets go of its job and kept in
its state, the live card, and reading the job's output. No hub runs here (the spawner's user
and hub are stand-ins); the browser tests (test_session_card_browser.py) show the page."""

from __future__ import annotations

import os
import types
from unittest import mock

import pytest

from hub_plugin.session_card import end_reason, tail_local_file
from hub_plugin.spawners import LocalBrokerSpawner


def local_spawner(**kw) -> LocalBrokerSpawner:
    user = mock.Mock()
    user.name = "zoe"
    user.url = "/user/zoe/"
    user.escaped_name = "zoe"
    hub = mock.Mock(
        api_url="http://127.0.0.1:8081/hub/api", base_url="/hub/", public_host="", url="http://127.0.0.1:8081/hub/"
    )
    return LocalBrokerSpawner(user=user, hub=hub, **kw)


@pytest.mark.parametrize(
    "final, exit_status, cause, broker, want",
    [
        ("TIMEOUT", 143, "", "", "walltime reached"),
        ("CANCELLED+", None, "", "", "cancelled"),
        ("CANCELLED", 0, "stopped from the hub", "", "cancelled (stopped from the hub)"),
        ("NODE_FAIL", None, "", "", "node failure"),
        ("FAILED", 3, "", "", "failed, exit status 3"),
        ("OUT_OF_MEMORY", 137, "", "", "out of memory, exit status 137"),
        ("COMPLETED", 0, "", "", "completed"),
        ("", None, "walltime reached", "", "walltime reached"),
        ("GONE", 1, "", "server exited", "server exited, exit status 1"),
        ("", None, "", "", "ended"),
    ],
)
def test_end_reason(final, exit_status, cause, broker, want):
    assert end_reason(final, exit_status, cause, broker) == want


def test_ended_record_is_made_when_the_job_is_let_go_and_survives_the_state():
    s = local_spawner()
    assert s.session_card() == {}
    s.job_id = "17"
    s.job_status = "CANCELLED"
    s.user_options = {"partition": "local"}
    s.last_session = {"state": "closed", "exit_status": 0, "node": "node7", "end_reason": "stopped by the hub"}
    s._stop_cause = "stopped from the hub"
    s.clear_state()
    assert s.job_id == ""
    card = s.session_card()
    assert card["state"] == "ended" and card["job_id"] == "17" and card["node"] == "node7"
    assert card["partition"] == "local" and card["final_state"] == "CANCELLED"
    assert card["reason"] == "cancelled (stopped from the hub)", card
    # a second clear_state (the hub calls it again after stop) keeps the record
    s.clear_state()
    assert s.session_card()["job_id"] == "17"
    # kept in the spawner's state, so a restarted hub and a stopped named server still show it
    t = local_spawner()
    t.load_state(s.get_state())
    assert t.session_card() == card


def test_live_card_states():
    s = local_spawner()
    with mock.patch.object(LocalBrokerSpawner, "active", new_callable=mock.PropertyMock, return_value=True):
        assert s.session_card()["state"] == "submitting"
        s.job_id, s.job_status = "5", "PENDING"
        assert s.session_card()["state"] == "queued"
        s.job_status = "RUNNING host1"
        with mock.patch.object(LocalBrokerSpawner, "ready", new_callable=mock.PropertyMock, return_value=False):
            card = s.session_card()
            assert card["state"] == "starting" and card["node"] == "host1"
        with mock.patch.object(LocalBrokerSpawner, "ready", new_callable=mock.PropertyMock, return_value=True):
            s.req_runtime = "1:00:00"
            s.note_job_started()
            card = s.session_card()
            assert card["state"] == "running" and card["job_id"] == "5"
            assert 3590 <= card["walltime"]["left"] <= 3600


def test_tail_local_file(tmp_path):
    p = tmp_path / "out.log"
    p.write_text("".join(f"line {i}\n" for i in range(1000)))
    assert tail_local_file(str(p), max_lines=3) == "line 997\nline 998\nline 999\n"
    assert tail_local_file(str(p), max_bytes=9) == "line 999\n"
    assert tail_local_file(str(tmp_path / "missing")) is None


@pytest.mark.asyncio
async def test_local_backend_reads_its_spool_only(tmp_path):
    s = local_spawner(spool_dir=str(tmp_path))
    os.makedirs(tmp_path / "12")
    (tmp_path / "12" / "output.log").write_text("a\nb\nc\n")
    assert await s.read_job_output("12", max_lines=2) == "b\nc\n"
    assert await s.read_job_output("12", max_bytes=100) == "a\nb\nc\n"
    assert await s.read_job_output("../12") is None  # not a job id: nothing read
    assert await s.read_job_output("13", max_lines=2) is None


@pytest.mark.asyncio
async def test_a_job_let_go_while_completing_is_ending_until_its_final_state_is_known():
    s = local_spawner()
    s.final_job_state = mock.AsyncMock(return_value="TIMEOUT")  # what the Slurm backend has
    s.job_id, s.job_status = "21", "COMPLETING vm"
    s.last_session = {"state": "closed", "exit_status": 0, "end_reason": "server exited with status 0"}
    s.clear_state()
    assert s.session_card()["state"] == "ending"
    await s._settle_end("21")
    s.final_job_state.assert_awaited_once_with("21")
    card = s.session_card()
    assert card["state"] == "ended" and card["final_state"] == "TIMEOUT" and card["reason"] == "walltime reached"
    # unknown final state (e.g. purged): ended with what is known
    s.final_job_state = mock.AsyncMock(return_value="")
    s.job_id, s.job_status = "22", "COMPLETING vm"
    s.clear_state()
    await s._settle_end("22")
    card = s.session_card()
    assert card["state"] == "ended" and card["reason"] == "server exited with status 0"


@pytest.mark.asyncio
async def test_a_new_spawner_object_shows_what_the_old_one_settled():
    """After a stop the hub drops the Spawner object and makes a new one from the database; the
    old one may still be asking for the job's final state then (seen in CI: the card said
    "ending" for a minute, then "ended" without the walltime). The new one shows the settled
    record the old one saved, and keeps it in its own state."""
    orm_spawner = types.SimpleNamespace(state={}, server=None, name="")
    db = mock.Mock()
    old = local_spawner(orm_spawner=orm_spawner, db=db)
    old.final_job_state = mock.AsyncMock(return_value="TIMEOUT")
    old.job_id, old.job_status = "31", "COMPLETING vm"
    old.last_session = {"state": "closed", "exit_status": 0, "end_reason": "server exited with status 0"}
    old.clear_state()
    orm_spawner.state = old.get_state()  # what the hub's stop saves, the record still settling
    new = local_spawner(orm_spawner=orm_spawner, db=db)
    new.load_state(orm_spawner.state)
    assert new.session_card()["state"] == "ending"
    await old._settle_end("31")
    db.commit.assert_called()
    card = new.session_card()
    assert card["state"] == "ended" and card["reason"] == "walltime reached", card
    assert new.get_state()["ended_job"]["settling"] is False
    # a record of another job in the database is not taken
    new.ended_job = {**new.ended_job, "job_id": "32", "settling": True}
    assert new.session_card()["state"] == "ending"
