"""Slurm's per-user choices: accounts and QoS from the user's associations, reservations the
user may use.

Queries (run like sbatch: locally or on the login node, through the spawner's ``run_command``)::

    sacctmgr -nP show assoc user=NAME format=account,qos     # "account|qos1,qos2" per association
    sacctmgr -nP show user NAME format=defaultaccount         # the user's default account
    scontrol -o show res                                      # one reservation a line

Contracts:

* :func:`slurm_choices` returns a :class:`~hub_plugin.choices.SchedulerChoices` with the fields
  asked for (``account``, ``qos``, ``reservation``): only the user's own accounts (the default
  account preselected), for each account only the QoS its associations allow, and only the
  reservations whose ``Users=``/``Accounts=`` admit the user (:meth:`Reservation.admits`).
* A failing query (sacctmgr without slurmdbd, controller down) makes its fields *unavailable*
  with a message for the user; the real error goes to the log only. Nothing is offered then,
  so nothing can be chosen: deny by default.
* Answers are cached per (runner, user) for ``cache_seconds`` (the reservation list per runner),
  so a busy spawn page costs at most one round of queries per user per period; the queries of
  one round run at once.
* A user name that Slurm would read as a list or a pattern (anything but
  ``[A-Za-z0-9._@-]``) gets no associations, never someone else's.
"""

from __future__ import annotations

import asyncio
import re
import shlex
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .choices import ChoiceField, SchedulerChoices

__all__ = [
    "FIELDS",
    "Associations",
    "Reservation",
    "parse_assoc",
    "parse_reservations",
    "slurm_choices",
]

#: The choice fields this module can fill, and their labels.
FIELDS = ("account", "qos", "reservation")
LABELS = {"account": "Account", "qos": "QoS", "reservation": "Reservation"}

_USER_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._@-]{0,63}\Z")

ACCOUNTS_UNREADABLE = (
    "Your Slurm accounts could not be read right now, so no account or QoS can be chosen "
    "(your default account is used). Please try again in a minute, or tell the administrators."
)
RESERVATIONS_UNREADABLE = "The cluster's reservations could not be read right now; please try again in a minute."


@dataclass(frozen=True)
class Associations:
    """A user's accounts (sacctmgr's order), the QoS allowed per account, the default account."""

    accounts: tuple[str, ...] = ()
    qos: dict[str, tuple[str, ...]] | None = None
    default_account: str = ""


def parse_assoc(text: str) -> dict[str, tuple[str, ...]]:
    """``account|qos1,qos2`` lines -> account -> QoS (merged over an account's associations,
    e.g. per partition, in first-seen order)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        acct, _, qos = line.strip().partition("|")
        acct = acct.strip()
        if not acct:
            continue
        known = out.setdefault(acct, [])
        for q in qos.split(","):
            q = q.strip()
            if q and q not in known:
                known.append(q)
    return {a: tuple(q) for a, q in out.items()}


@dataclass(frozen=True)
class Reservation:
    """One reservation from ``scontrol -o show res``."""

    name: str
    users: tuple[str, ...] = ()
    accounts: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    state: str = ""
    start: str = ""
    end: str = ""

    @staticmethod
    def _match(spec: tuple[str, ...], names: Iterable[str]) -> bool | None:
        """None: no restriction of this kind; else whether any of *names* passes *spec*
        (``a,b`` admits a and b; ``-a,-b`` admits everyone but a and b)."""
        if not spec:
            return None
        names = set(names)
        if spec[0].startswith("-"):
            return not names & {s.lstrip("-") for s in spec} and bool(names)
        return bool(names & set(spec))

    def admits(self, user: str, accounts: Iterable[str]) -> bool:
        """Whether *user* (with *accounts*) may use it. Both ``Users=`` and ``Accounts=`` must
        pass when both are set (Slurm's rule). ``Groups=`` reservations are never offered:
        the hub cannot see the cluster's groups."""
        if self.groups:
            return False
        by_user = self._match(self.users, [user])
        by_account = self._match(self.accounts, accounts)
        if by_user is None and by_account is None:
            return False
        return by_user is not False and by_account is not False

    def title(self) -> str:
        when = f"until {self.end}" if self.state == "ACTIVE" else f"{self.start} to {self.end}"
        return f"{self.name} ({when.replace('T', ' ')})"


def _list(value: str) -> tuple[str, ...]:
    if not value or value == "(null)":
        return ()
    return tuple(v for v in value.split(",") if v)


def parse_reservations(text: str) -> list[Reservation]:
    """Reservations from ``scontrol -o show res`` (``No reservations in the system`` -> [])."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("ReservationName="):
            continue
        kv = dict(item.split("=", 1) for item in line.split() if "=" in item)
        out.append(
            Reservation(
                name=kv["ReservationName"],
                users=_list(kv.get("Users", "")),
                accounts=_list(kv.get("Accounts", "")),
                groups=_list(kv.get("Groups", "")),
                state=kv.get("State", ""),
                start=kv.get("StartTime", ""),
                end=kv.get("EndTime", ""),
            )
        )
    return out


#: Runs one command string (shlex-split, no shell) and returns its stdout; raises on failure.
Run = Callable[[str], Awaitable[str]]

_cache: dict[tuple[Any, ...], tuple[float, Any]] = {}


async def _cached(key: tuple[Any, ...], seconds: float, fetch: Callable[[], Awaitable[Any]]) -> Any:
    hit = _cache.get(key)
    if hit and time.monotonic() - hit[0] < seconds:
        return hit[1]
    value = await fetch()
    _cache[key] = (time.monotonic(), value)
    return value


def clear_cache() -> None:
    """Forget every cached answer (tests; a site after changing associations can wait instead)."""
    _cache.clear()


async def user_associations(run: Run, sacctmgr: Sequence[str], user: str) -> Associations:
    """The user's associations and default account (raises what *run* raises)."""
    if not _USER_RE.match(user):
        return Associations()
    assoc_out, user_out = await asyncio.gather(
        run(shlex.join([*sacctmgr, "-nP", "show", "assoc", f"user={user}", "format=account,qos"])),
        run(shlex.join([*sacctmgr, "-nP", "show", "user", user, "format=defaultaccount"])),
    )
    by_account = parse_assoc(assoc_out)
    default = next((ln.strip() for ln in user_out.splitlines() if ln.strip()), "")
    return Associations(tuple(by_account), by_account, default)


async def slurm_choices(
    run: Run,
    *,
    user: str,
    fields: Iterable[str] = FIELDS,
    sacctmgr: str = "sacctmgr",
    scontrol: str = "scontrol",
    cache_key: tuple[Any, ...] = (),
    cache_seconds: float = 60.0,
    preferred_account: str = "",
    log: Any = None,
) -> SchedulerChoices:
    """The account/QoS/reservation fields for *user* (see the module docstring).

    *preferred_account* (the configured ``req_account``) is preselected when it is one of the
    user's accounts; else the user's default account.
    """
    wanted = [f for f in fields if f in FIELDS]
    result = SchedulerChoices(labels=dict(LABELS))

    async def lookup_reservations() -> list[Reservation] | None:
        try:
            return await _cached(("res", *cache_key, scontrol), cache_seconds, lambda: _reservations(run, scontrol))
        except Exception as e:
            if log is not None:
                log.error("scontrol show res failed: %s", str(e)[:300])
            result.unavailable["reservation"] = RESERVATIONS_UNREADABLE
            return None

    async def lookup_associations() -> Associations:
        try:
            return await _cached(
                ("assoc", *cache_key, sacctmgr, user),
                cache_seconds,
                lambda: user_associations(run, shlex.split(sacctmgr), user),
            )
        except Exception as e:
            if log is not None:
                log.error("sacctmgr for %s failed: %s", user, str(e)[:300])
            for f in ("account", "qos"):
                if f in wanted:
                    result.unavailable[f] = ACCOUNTS_UNREADABLE
            return Associations()

    reservations: list[Reservation] | None = None
    assoc = Associations()
    if {"account", "qos"} & set(wanted):  # both lookups at once
        if "reservation" in wanted:
            reservations, assoc = await asyncio.gather(lookup_reservations(), lookup_associations())
        else:
            assoc = await lookup_associations()
    elif "reservation" in wanted:
        reservations = await lookup_reservations()
        if any(r.accounts for r in reservations or ()):  # reservations that admit accounts need hers
            assoc = await lookup_associations()
    if "account" in wanted and "account" not in result.unavailable:
        if assoc.accounts:
            default = preferred_account if preferred_account in assoc.accounts else assoc.default_account
            if default not in assoc.accounts:
                default = assoc.accounts[0]
            result.fields.append(
                ChoiceField(
                    "account",
                    LABELS["account"],
                    assoc.accounts,
                    default=default,
                    titles={a: f"{a} (default)" if a == assoc.default_account else a for a in assoc.accounts},
                    help="The Slurm account the job is charged to.",
                )
            )
        else:
            result.notes.append("You have no Slurm account here; your server is submitted without one.")
    if "qos" in wanted and "qos" not in result.unavailable and assoc.qos:
        all_qos = tuple(dict.fromkeys(q for qs in assoc.qos.values() for q in qs))
        if all_qos:
            result.fields.append(
                ChoiceField(
                    "qos",
                    LABELS["qos"],
                    all_qos,
                    empty_title="the account's default",
                    help="Quality of service: the QoS your account's associations allow.",
                    depends_on="account" if "account" in wanted else "",
                    allowed_with=dict(assoc.qos),
                )
            )
    if reservations is not None:
        mine = [r for r in reservations if _USER_RE.match(user) and r.admits(user, assoc.accounts)]
        if mine:
            result.fields.append(
                ChoiceField(
                    "reservation",
                    LABELS["reservation"],
                    tuple(r.name for r in mine),
                    titles={r.name: r.title() for r in mine},
                    empty_title="none",
                    help="Run in a reservation you are allowed to use.",
                )
            )
    return result


async def _reservations(run: Run, scontrol: str) -> list[Reservation]:
    return parse_reservations(await run(shlex.join([*shlex.split(scontrol), "-o", "show", "res"])))
