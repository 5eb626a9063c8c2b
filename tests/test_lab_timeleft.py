"""The server side of JupyterLab's time-left extension (lab_timeleft/) and the
walltime notice the node agent writes for it (node_agent/agent.py): pure parts, real files.
The extension in a browser, with the agent signalled by Slurm: test_session_card_lab.py."""

from __future__ import annotations

import os
import stat
from datetime import datetime

from lab_timeleft import NOTICE_VAR, end_from_env, parse_squeue_end, read_notice
from node_agent.agent import WALLTIME_NOTICE_VAR, write_notice


def test_the_notice_the_agent_writes_is_what_the_server_reads(tmp_path):
    assert WALLTIME_NOTICE_VAR == NOTICE_VAR
    path = str(tmp_path / "walltime-notice.json")
    assert read_notice(path) is None  # no warning yet
    write_notice(path, "the job is close to its time limit")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    notice = read_notice(path)
    assert notice is not None and notice["message"] == "the job is close to its time limit" and notice["at"] > 0
    (tmp_path / "garbage.json").write_text("[1, 2")
    assert read_notice(str(tmp_path / "garbage.json")) is None
    assert read_notice("") is None


def test_job_end_from_env_and_squeue():
    assert end_from_env({"JUPYTERHUB_WALLTIME_END": "1790000000"}) == 1790000000
    assert end_from_env({}) is None  # outside a batch job: nothing is shown
    assert end_from_env({"JUPYTERHUB_WALLTIME_END": "soon"}) is None
    assert parse_squeue_end("2026-11-30T20:27:06\n") == datetime(2026, 11, 30, 20, 27, 6).timestamp()
    assert parse_squeue_end("N/A") is None and parse_squeue_end("NONE") is None and parse_squeue_end("") is None
