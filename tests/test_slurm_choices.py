"""The Slurm choices on the options form, piece by piece: parsing sacctmgr's and scontrol's
answers, who a reservation admits, the check of a submitted choice, and the spawner's hooks
(cache, a failing sacctmgr, a site's own template).

The spawner tests give it a scripted ``run_command`` that answers with the real output below
(captured from Slurm 22.05.8 with slurmdbd, as tests/slurm_cluster.py's NsCluster runs it): the
same spawner against the real sacctmgr, scontrol and sbatch is tests/test_slurm_accounts.py.
"""

from __future__ import annotations

import shlex
from unittest import mock

import pytest
from tornado import web

from hub_plugin import slurm_assoc
from hub_plugin.choices import ChoiceField, SchedulerChoices, check_choices
from hub_plugin.options_form import render_form
from hub_plugin.resources import OptionsError, parse_sinfo
from hub_plugin.slurm import SlurmBrokerSpawner

# `sacctmgr -nP show assoc user=i15alice format=account,qos` after
# `add user i15alice account=i15a,i15b defaultaccount=i15b` and `set qos+=i15fast` on i15a
REAL_ASSOC = "i15b|normal\ni15a|i15fast,normal\n"
# `scontrol -o show res` (two reservations)
REAL_RES = (
    "ReservationName=i15r_acct StartTime=2026-11-30T20:31:26 EndTime=2026-11-30T21:31:26 Duration=01:00:00 "
    "Nodes=vm NodeCnt=1 CoreCnt=2 Features=(null) PartitionName=(null) Flags=SPEC_NODES,ALL_NODES TRES=cpu=2 "
    "Users=(null) Groups=(null) Accounts=i15a Licenses=(null) State=INACTIVE BurstBuffer=(null) Watts=n/a "
    "MaxStartDelay=(null)\n"
    "ReservationName=i15r_other StartTime=2026-11-30T22:31:26 EndTime=2026-11-30T23:31:26 Duration=01:00:00 "
    "Nodes=vm NodeCnt=1 CoreCnt=2 Features=(null) PartitionName=(null) Flags=SPEC_NODES,ALL_NODES TRES=cpu=2 "
    "Users=root Groups=(null) Accounts=(null) Licenses=(null) State=ACTIVE BurstBuffer=(null) Watts=n/a "
    "MaxStartDelay=(null)\n"
)
SINFO = "debug*|1:00:00|4|8000|(null)|up\n"


def test_parse_assoc_merges_an_accounts_associations():
    assert slurm_assoc.parse_assoc(REAL_ASSOC) == {"i15b": ("normal",), "i15a": ("i15fast", "normal")}
    # per-partition associations of one account are merged; empty lines and QoS are fine
    assert slurm_assoc.parse_assoc("a|q1\nb|\na|q2,q1\n\n") == {"a": ("q1", "q2"), "b": ()}


def test_parse_reservations():
    acct, other = slurm_assoc.parse_reservations(REAL_RES)
    assert (acct.name, acct.users, acct.accounts, acct.state) == ("i15r_acct", (), ("i15a",), "INACTIVE")
    assert (other.users, other.accounts, other.groups) == (("root",), (), ())
    assert acct.title() == "i15r_acct (2026-11-30 20:31:26 to 2026-11-30 21:31:26)"
    assert other.title() == "i15r_other (until 2026-11-30 23:31:26)"
    assert slurm_assoc.parse_reservations("No reservations in the system\n") == []


R = slurm_assoc.Reservation


@pytest.mark.parametrize(
    "res,user,accounts,admitted",
    [
        (R("r", users=("alice", "bob")), "alice", (), True),
        (R("r", users=("bob",)), "alice", ("a",), False),
        (R("r", users=("-bob",)), "alice", (), True),  # everyone but bob
        (R("r", users=("-alice", "-bob")), "alice", (), False),
        (R("r", accounts=("a",)), "alice", ("b", "a"), True),
        (R("r", accounts=("a",)), "alice", ("b",), False),
        (R("r", accounts=("-a",)), "alice", ("b",), True),
        (R("r", accounts=("-a",)), "alice", (), False),  # no account of hers is outside the exclusion
        (R("r", users=("alice",), accounts=("a",)), "alice", ("b",), False),  # both must pass
        (R("r", users=("alice",), accounts=("a",)), "alice", ("a",), True),
        (R("r", users=("alice",), groups=("staff",)), "alice", (), False),  # groups: never offered
        (R("r"), "alice", ("a",), False),
    ],
)
def test_who_a_reservation_admits(res, user, accounts, admitted):
    assert res.admits(user, accounts) is admitted


CHOICES = SchedulerChoices(
    fields=[
        ChoiceField("account", "Account", ("a", "b"), default="b"),
        ChoiceField(
            "qos",
            "QoS",
            ("fast", "normal"),
            depends_on="account",
            allowed_with={"a": ("fast", "normal"), "b": ("normal",)},
        ),
    ],
    unavailable={"reservation": "The cluster's reservations could not be read right now."},
)


def test_check_choices_accepts_only_what_was_offered():
    assert check_choices(CHOICES, {"account": "a", "qos": "fast"}) == {"account": "a", "qos": "fast"}
    assert check_choices(CHOICES, {"account": "", "qos": "", "reservation": ""}) == dict.fromkeys(
        ("account", "qos", "reservation"), ""
    )
    with pytest.raises(OptionsError, match=r"Account: 'x' is not available to you\. Choose one of: a, b\."):
        check_choices(CHOICES, {"account": "x"})
    # a QoS of another account; no account given means the preselected default (b)
    with pytest.raises(OptionsError, match="QoS: 'fast' is not allowed with account 'b'"):
        check_choices(CHOICES, {"qos": "fast"})
    with pytest.raises(OptionsError, match="reservations could not be read"):
        check_choices(CHOICES, {"reservation": "r1"})
    with pytest.raises(OptionsError, match="Queue: 'q' is not available to you"):
        check_choices(CHOICES, {"queue": "q"})


def test_form_shows_choices_narrows_qos_and_lets_profiles_fix_them():
    html = render_form(
        parse_sinfo(SINFO),
        profiles=[{"name": "course", "req_account": "a"}],
        current={"qos": "normal"},
        scheduler=CHOICES,
        fixed_by_profile={"course": ["account"]},
    )
    assert '<select class="form-select hpc-choice" id="hpc-account" name="account">' in html
    assert '<option value="a">a</option><option value="b" selected>b</option>' in html
    assert '<option value="normal" selected>normal</option>' in html
    assert '"qos": {"parent": "account", "allowed": {"a": ["fast", "normal"], "b": ["normal"]}}' in html
    assert 'var fixed = {"course": ["account"]};' in html
    assert 'class="alert alert-warning hpc-problem">The cluster&#x27;s reservations could not be read' in html


# -- the spawner -------------------------------------------------------------------------------------


class ScriptedSlurm:
    """Answers the spawner's commands with the real outputs above; counts each command."""

    def __init__(self, assoc: str | Exception = REAL_ASSOC, default: str = "i15b\n", res: str = REAL_RES):
        self.answers = {"sinfo": SINFO, "assoc": assoc, "user": default, "scontrol": res}
        self.calls: list[list[str]] = []

    async def __call__(self, cmd: str, input=None, env=None) -> str:
        argv = shlex.split(cmd)
        self.calls.append(argv)
        key = argv[0] if argv[0] in ("sinfo", "scontrol") else argv[3]
        answer = self.answers[key]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def count(self, word: str) -> int:
        return sum(1 for argv in self.calls if word in argv)


def spawner(run: ScriptedSlurm, name: str = "i15alice", **kw) -> SlurmBrokerSpawner:
    slurm_assoc.clear_cache()
    SlurmBrokerSpawner._partition_cache.clear()
    user = mock.Mock(settings={})
    user.name = name
    s = SlurmBrokerSpawner(user=user, hub=mock.Mock(), **kw)
    s.run_command = run  # type: ignore[method-assign]
    return s


@pytest.mark.asyncio
async def test_form_lists_the_users_choices_and_caches_the_lookups():
    run = ScriptedSlurm()
    s = spawner(run, req_account="i15a")  # a configured account the user has is preselected
    html = await s.get_options_form()
    assert '<option value="i15b">i15b (default)</option>' in html and '<option value="i15a" selected>' in html
    assert "i15r_acct" in html and "i15r_other" not in html  # Accounts=i15a admits her; Users=root not
    assert ["sacctmgr", "-nP", "show", "assoc", "user=i15alice", "format=account,qos"] in run.calls
    assert ["sacctmgr", "-nP", "show", "user", "i15alice", "format=defaultaccount"] in run.calls
    await s.get_options_form()
    await s.apply_user_options(s, {"account": "i15a", "qos": "i15fast", "reservation": "i15r_acct"})
    assert (run.count("assoc"), run.count("res")) == (1, 1)  # cached
    assert (s.req_account, s.req_qos, s.req_reservation) == ("i15a", "i15fast", "i15r_acct")
    assert {k: s.user_options[k] for k in ("account", "qos", "reservation")} == {
        "account": "i15a",
        "qos": "i15fast",
        "reservation": "i15r_acct",
    }  # what submit_batch_script gives the script template
    # the next spawn without choices: back to the configured account, no lookup needed
    await s.apply_user_options(s, {})
    assert (s.req_account, s.req_qos, s.user_options["account"]) == ("i15a", "", "i15a")


@pytest.mark.asyncio
async def test_failing_sacctmgr_is_shown_on_the_form_and_refuses_choices():
    run = ScriptedSlurm(assoc=RuntimeError("You are not running a supported accounting_storage plugin"))
    s = spawner(run)
    html = await s.get_options_form()
    assert "Your Slurm accounts could not be read right now" in html and 'name="account"' not in html
    assert "accounting_storage" not in html  # the real error goes to the log only
    assert 'name="partition"' in html  # the rest of the form still works
    with pytest.raises(web.HTTPError) as e:
        await s.apply_user_options(s, {"account": "i15a"})
    assert e.value.status_code == 400 and "could not be read" in e.value.jupyterhub_message
    await s.apply_user_options(s, {"partition": "debug"})  # no choice: no lookup needed
    assert s.req_account == ""


@pytest.mark.asyncio
async def test_user_names_slurm_would_read_as_a_list_get_nothing():
    run = ScriptedSlurm()
    s = spawner(run, name="i15alice,root")
    html = await s.get_options_form()
    assert run.count("sacctmgr") == 0 and 'name="account"' not in html and "i15r_other" not in html
    with pytest.raises(web.HTTPError):
        await s.apply_user_options(s, {"account": "i15a"})


@pytest.mark.asyncio
async def test_fields_not_offered_are_refused_and_profiles_set_them():
    run = ScriptedSlurm()
    course = {"name": "course", "req_account": "teaching", "req_qos": "class", "req_reservation": "lab"}
    s = spawner(run, form_slurm_choices=["account"], profiles=[course])
    html = await s.get_options_form()
    assert 'name="account"' in html and 'name="qos"' not in html and 'name="reservation"' not in html
    with pytest.raises(web.HTTPError) as e:
        await s.apply_user_options(s, {"qos": "i15fast"})
    assert e.value.jupyterhub_message == "QoS: 'i15fast' is not available to you."
    # the admin's profile is used as written (the user's own values are ignored then)
    await s.apply_user_options(s, {"profile": "course", "account": "i15b"})
    assert (s.req_account, s.req_qos, s.req_reservation) == ("teaching", "class", "lab")
    with pytest.raises(ValueError, match="unknown keys"):
        spawner(run, profiles=[{"name": "x", "req_queue": "q"}])._profiles()


@pytest.mark.asyncio
async def test_a_sites_template_in_template_paths_replaces_the_form(tmp_path):
    (tmp_path / "options_form.html").write_text(
        "<p>site form</p>{% for f in choice_fields %}<i>{{ f.name }}={{ f.options|map(attribute='value')|join(',') }}</i>{% endfor %}"
    )
    s = spawner(ScriptedSlurm())
    s.user.settings = {"template_path": [str(tmp_path), "/nonexistent"]}
    html = await s.get_options_form()
    assert html == "<p>site form</p><i>account=i15b,i15a</i><i>qos=normal,i15fast</i><i>reservation=i15r_acct</i>"


@pytest.mark.asyncio
async def test_reservations_alone_need_sacctmgr_only_for_account_reservations():
    users_only = REAL_RES.split("\n")[1].replace("Users=root", "Users=root,i15alice") + "\n"
    run = ScriptedSlurm(assoc=RuntimeError("accounting storage is disabled"), res=users_only)
    s = spawner(run, form_slurm_choices=["reservation"])
    html = await s.get_options_form()
    assert run.count("sacctmgr") == 0 and '<option value="i15r_other">' in html
    assert "could not be read" not in html
    # an Accounts= reservation needs her accounts: sacctmgr fails, so it is not offered, quietly
    run = ScriptedSlurm(assoc=RuntimeError("accounting storage is disabled"))
    s = spawner(run, form_slurm_choices=["reservation"])
    html = await s.get_options_form()
    assert run.count("assoc") == 1 and "i15r_acct" not in html and "could not be read" not in html
