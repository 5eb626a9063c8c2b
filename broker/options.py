"""Checks for the broker's options (traitlets traits), whose errors name the option.

Every component of the broker is a traitlets ``Configurable`` holding its own options
(``c.<Class>.<name>`` in broker_config.py, ``--<Class>.<name>=…`` on the command line). A bad
value raises :class:`OptionError` when the value is set (from the config, the command line or
a constructor keyword), with a message that starts with ``<Class>.<name>:``; the ``broker``
command reports it as a configuration error (exit status 2).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from typing import Any

from traitlets import HasTraits, TraitError, validate
from traitlets.traitlets import ValidateHandler

#: What a proposal passed to a ``@validate`` handler holds (``trait``, ``value``, ``owner``).
Proposal = Mapping[str, Any]

_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class OptionError(TraitError, ValueError):
    """A bad option value; the message names the option as ``<Class>.<name>``."""


def refuse_unknown(cls: type[HasTraits], kwargs: Mapping[str, Any]) -> None:
    """Raise TypeError for keyword arguments of *cls* that are neither traits nor ``parent`` or
    ``config`` (traitlets itself only warns, so a misspelt option would be ignored)."""
    unknown = sorted(set(kwargs) - set(cls.class_trait_names()) - {"parent", "config"})
    if unknown:
        raise TypeError(f"{cls.__name__}() got unexpected keyword arguments: {', '.join(unknown)}")


def option_name(proposal: Proposal) -> str:
    """``<Class>.<name>`` of the trait a proposal is for (the class that declares it)."""
    trait = proposal["trait"]
    return f"{trait.this_class.__name__}.{trait.name}"


def minimum(limits: Mapping[str, float], *, exclusive: bool = False) -> ValidateHandler:
    """A ``@validate`` handler for the traits named in *limits*: each value must be at least (with
    *exclusive*: more than) its limit; NaN is refused."""

    def check(_self: HasTraits, proposal: Proposal) -> Any:
        value = proposal["value"]
        low = limits[proposal["trait"].name]
        if not (value > low if exclusive else value >= low):
            word = "more than" if exclusive else "at least"
            raise OptionError(f"{option_name(proposal)}: must be {word} {low:g}, got {value}")
        return value

    return validate(*limits)(check)


def each(check_item: Callable[[str], bool], what: str, *names: str) -> ValidateHandler:
    """A ``@validate`` handler for list traits: every item must pass *check_item* (else: "not *what*")."""

    def check(_self: HasTraits, proposal: Proposal) -> Any:
        for item in proposal["value"]:
            if not check_item(item):
                raise OptionError(f"{option_name(proposal)}: not {what}: {item!r}")
        return proposal["value"]

    return validate(*names)(check)


def is_network(text: str) -> bool:
    """A network in CIDR notation (or a single address)."""
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return True


def is_header_name(text: str) -> bool:
    """An HTTP header name (an RFC 9110 token)."""
    return bool(_HEADER_NAME.fullmatch(text))
