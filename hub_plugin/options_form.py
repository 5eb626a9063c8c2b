"""The spawn options form: what to show, rendered from ``templates/options_form.html``.

:func:`render_form` turns the partitions, the admin's profiles and the current choice into the
HTML that JupyterHub places inside its spawn form. The markup lives in the Jinja template next
to the hub's ``home.html`` (a site's own ``options_form.html`` in ``c.JupyterHub.template_paths``
is used instead); this module only prepares the values. Everything is autoescaped
(partition names and profile texts come from the cluster and the configuration), and the
partition limits reach the page's script as HTML-safe JSON.
"""

from __future__ import annotations

import html
import os
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

import jinja2
import markupsafe

from .choices import SchedulerChoices
from .resources import CUSTOM, IMAGES, Defaults, Partition, format_memory, format_slurm_time, parse_slurm_time

__all__ = ["FORM_TEMPLATE_NAME", "TEMPLATE_DIR", "render_form"]

#: Directory with the hub page templates: ``home.html`` (the walltime box; enable it with
#: ``c.JupyterHub.template_paths = [TEMPLATE_DIR]``) and the options form.
TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")

#: The options form's template, in :data:`TEMPLATE_DIR`.
FORM_TEMPLATE_NAME = "options_form.html"


def _escape(value: Any) -> markupsafe.Markup:
    """Every ``{{ value }}`` escaped as :func:`html.escape` spells it (``&quot;``, ``&#x27;``);
    markup built on purpose (``|tojson``) passes unchanged."""
    if isinstance(value, markupsafe.Markup):
        return value
    return markupsafe.Markup(html.escape(str(value)))


@lru_cache(maxsize=8)
def _environment(site_paths: tuple[str, ...] = ()) -> jinja2.Environment:
    """The form's Jinja environment: the site's template directories first (JupyterHub's
    ``template_paths``), then :data:`TEMPLATE_DIR`; so a site's ``options_form.html`` wins."""
    loader = jinja2.FileSystemLoader([*site_paths, TEMPLATE_DIR])
    env = jinja2.Environment(loader=loader, autoescape=True, finalize=_escape)
    env.policies["json.dumps_kwargs"] = {}  # keep the partitions in the cluster's order
    return env


def _form_memory(value: Any) -> str:
    """Memory as the form field shows it: whole GiB as a bare number (``16``), else as is."""
    mem = str(value)
    return mem[:-1] if mem.endswith("G") and mem[:-1].isdigit() else mem


def _form_runtime(value: Any, default_seconds: int) -> str:
    """Walltime as the form field shows it: ``H:MM`` below a day, else Slurm's syntax."""
    runtime = str(value)
    try:
        secs = parse_slurm_time(runtime) or default_seconds
    except ValueError:
        return runtime
    return f"{secs // 3600}:{(secs % 3600) // 60:02d}" if secs < 86400 else runtime


def render_form(
    partitions: list[Partition],
    *,
    profiles: list[dict[str, Any]] | None = None,
    current: Mapping[str, Any] | None = None,
    defaults: Defaults | None = None,
    allow_custom: bool = True,
    notes: Iterable[str] = (),
    scheduler: SchedulerChoices | None = None,
    fixed_by_profile: Mapping[str, list[str]] | None = None,
    template_paths: Iterable[str] = (),
) -> str:
    """The options form's HTML (placed by JupyterHub inside its spawn form).

    *current* is a checked choice (:func:`~hub_plugin.resources.validate_options`) to preselect,
    else *defaults* are shown; *notes* are plain-text remarks shown above the fields.
    *scheduler* holds the scheduler's fields (:mod:`hub_plugin.choices`), shown for every profile
    except where *fixed_by_profile* (profile -> field names) says the profile sets them.
    *template_paths* (the hub's ``c.JupyterHub.template_paths``) are searched for
    ``options_form.html`` before :data:`TEMPLATE_DIR`.
    """
    profiles = profiles or []
    d = defaults or Defaults()
    cur = dict(current or {})
    selected_profile = str(
        cur.get("profile") or (CUSTOM if allow_custom else (profiles[0]["name"] if profiles else ""))
    )
    part_default = (
        cur.get("partition")
        or d.partition
        or next((p.name for p in partitions if p.default), partitions[0].name if partitions else "")
    )
    choices = [(p["name"], p.get("display_name") or p["name"], p.get("description", "")) for p in profiles]
    if profiles and allow_custom:
        choices.append((CUSTOM, "Custom", "Choose partition, CPUs, memory, GPUs and walltime yourself."))
    mem = cur.get("memory", None)
    if mem is None:
        mem = format_memory(d.memory_mb) if d.memory_mb else ""
    sel_part = next((p for p in partitions if p.name == part_default), None)
    template = _environment(tuple(template_paths)).get_template(FORM_TEMPLATE_NAME)
    return template.render(
        notes=list(notes),
        profiles=[
            {"name": name, "title": title, "description": desc, "checked": name == selected_profile}
            for name, title, desc in choices
        ],
        custom_disabled=not (allow_custom and selected_profile in ("", CUSTOM)),
        partitions=[
            {"name": p.name, "summary": p.summary(), "available": p.available, "selected": p.name == part_default}
            for p in partitions
        ],
        nprocs=cur.get("nprocs") or d.nprocs,
        memory=_form_memory(mem),
        ngpus=cur.get("ngpus", d.ngpus) or 0,
        runtime=_form_runtime(cur.get("runtime") or format_slurm_time(d.runtime), d.runtime),
        images=list(IMAGES.items()),
        image=cur.get("image") or d.image,
        limits_text=f"{sel_part.name}: {sel_part.summary()}" if sel_part else "",
        limits={p.name: {"cpus": p.cpus, "gpus": p.gpus, "summary": p.summary()} for p in partitions},
        custom=CUSTOM,
        **_choice_values(scheduler or SchedulerChoices(), cur, fixed_by_profile or {}),
    )


def _choice_values(
    choices: SchedulerChoices, current: Mapping[str, Any], fixed: Mapping[str, list[str]]
) -> dict[str, Any]:
    """The template's values for the scheduler's choice fields (``choice_fields``), the rules its
    script applies (``choice_rules``), and the lookup failures (``choice_problems``)."""
    fields = []
    for f in choices.fields:
        selected = str(current.get(f.name) or "")
        if selected not in f.choices:
            selected = f.default
        fields.append(
            {
                "name": f.name,
                "label": f.label,
                "help": f.help,
                "empty_title": f.empty_title,
                "options": [{"value": v, "title": f.titles.get(v, v), "selected": v == selected} for v in f.choices],
            }
        )
    rules = {
        f.name: {"parent": f.depends_on, "allowed": {k: list(v) for k, v in f.allowed_with.items()}}
        for f in choices.fields
        if f.depends_on and choices.by_name(f.depends_on)
    }
    return {
        "choice_fields": fields,
        "choice_rules": rules,
        "choice_fixed": {k: list(v) for k, v in fixed.items() if v},
        "choice_problems": choices.problems(),
    }
