"""Scheduler-specific choices on the options form: the interface a spawner fills.

Besides the resources every backend has (partition, CPUs, memory, GPUs, walltime), a scheduler
may let a user choose among values that depend on who they are: Slurm's account, QoS and
reservation (:mod:`hub_plugin.slurm_assoc`), Grid Engine's queue. A spawner offers them by
returning a :class:`SchedulerChoices` from
:meth:`~hub_plugin.options.ResourceOptionsMixin.scheduler_choices`; the form shows each
:class:`ChoiceField` as a select, and on submit :func:`check_choices` accepts only the values
that were offered to this user.

Contracts:

* A field's ``name`` is the option key (form field and REST body) and the spawner's
  ``req_<name>`` trait, i.e. ``{{name}}`` in the batch script.
* ``""`` always means "not given" (the scheduler's default) and is always accepted.
* A value outside ``choices`` is refused with an :class:`~hub_plugin.resources.OptionsError`
  naming the field; so is a value for a field that is not offered, and a value whose lookup
  failed (``unavailable``: the message says why). Deny by default: nothing unchecked reaches
  the batch script.
* A field with ``depends_on`` narrows its values by the other field's value
  (``allowed_with[parent_value]``; a parent value without an entry allows all ``choices``).

Pure: standard library only, unit-testable without JupyterHub.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .resources import OptionsError

__all__ = ["ChoiceField", "SchedulerChoices", "check_choices"]


@dataclass(frozen=True)
class ChoiceField:
    """One select on the form (see the module docstring)."""

    name: str
    label: str
    choices: tuple[str, ...]
    #: preselected value ("" = the scheduler's default)
    default: str = ""
    #: text shown per value (default: the value)
    titles: Mapping[str, str] = field(default_factory=dict)
    #: text of the empty option; None: the form offers no empty option
    empty_title: str | None = None
    help: str = ""
    depends_on: str = ""
    allowed_with: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def allowed(self, parent_value: str) -> tuple[str, ...]:
        """The values allowed with *parent_value* of :attr:`depends_on`."""
        return self.allowed_with.get(parent_value, self.choices)


@dataclass
class SchedulerChoices:
    """What the scheduler offers this user: fields, and why others are missing."""

    fields: list[ChoiceField] = field(default_factory=list)
    #: field name -> message for the user, for fields whose lookup failed
    unavailable: dict[str, str] = field(default_factory=dict)
    #: plain-text remarks for the form (e.g. "you have no Slurm account")
    notes: list[str] = field(default_factory=list)
    #: field name -> label, for messages about fields that are not offered
    labels: dict[str, str] = field(default_factory=dict)

    def by_name(self, name: str) -> ChoiceField | None:
        return next((f for f in self.fields if f.name == name), None)

    def problems(self) -> list[str]:
        """The lookup failures, one message each (shown on the form as warnings)."""
        return list(dict.fromkeys(self.unavailable.values()))


def check_choices(choices: SchedulerChoices, wanted: Mapping[str, str]) -> dict[str, str]:
    """Check *wanted* (field name -> value; ``""`` = not given) against what was offered.

    Returns the accepted values (every key of *wanted*); raises OptionsError naming the field.
    """
    out: dict[str, str] = {}
    for name, value in wanted.items():
        if not value:
            out[name] = ""
            continue
        f = choices.by_name(name)
        if f is None:
            if name in choices.unavailable:
                raise OptionsError(choices.unavailable[name])
            label = choices.labels.get(name, name.capitalize())
            raise OptionsError(f"{label}: {value[:64]!r} is not available to you.")
        if value not in f.choices:
            offered = ", ".join(f.choices) or "none"
            raise OptionsError(f"{f.label}: {value[:64]!r} is not available to you. Choose one of: {offered}.")
        out[name] = value
    for name, value in out.items():
        f = choices.by_name(name)
        if not value or f is None or not f.depends_on:
            continue
        parent = choices.by_name(f.depends_on)
        parent_value = out.get(f.depends_on) or (parent.default if parent else "")
        allowed = f.allowed(parent_value)
        if value not in allowed:
            plabel = parent.label if parent else f.depends_on
            raise OptionsError(
                f"{f.label}: {value[:64]!r} is not allowed with {plabel.lower()} {parent_value!r}. "
                f"Choose one of: {', '.join(allowed) or 'none'}."
            )
    return out
