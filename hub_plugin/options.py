"""The spawn options form and its checks, on a broker spawner.

``class MySpawner(ResourceOptionsMixin, BrokerSpawnerMixin, SomeBatchSpawner)`` adds:

* **An options form built from the cluster.** For Slurm the partitions and their limits come
  from ``sinfo -h -o '%P|%l|%c|%m|%G|%a'`` (max time, CPUs, memory and GPU GRES per node,
  availability); for the embedded local backend from the machine (CPUs, memory, NVIDIA
  devices). Fields: profile, partition, CPUs, memory, GPUs, walltime, image (compute/GPU),
  plus the scheduler's own choice fields (:meth:`ResourceOptionsMixin.scheduler_choices`,
  :mod:`hub_plugin.choices`; Slurm: account, QoS, reservation from :mod:`hub_plugin.slurm_assoc`).
  Admins may add ``profiles`` (a list of dicts: ``name``, ``description`` and ``req_*``
  overrides), and may hide the free fields (``allow_custom_resources = False``). A site's own
  ``options_form.html`` in ``c.JupyterHub.template_paths`` replaces the shipped template.
* **Validation with a message the user reads.** ``options_from_form`` checks the choice
  against the partition's limits and raises :class:`OptionsError`; JupyterHub shows the form
  again with the message above it. Options sent through the REST API are checked the same way
  (``apply_user_options``) and fail the spawn with the same message.
* **Accepted values go onto the batchspawner traits** ``req_partition``, ``req_nprocs``,
  ``req_memory``, ``req_ngpus``, ``req_runtime``; ``user_options`` is replaced by the checked
  values only, so nothing else from the request reaches the batch script. Choice fields go onto
  ``req_<name>`` (``req_account``, ...) once checked against what this user was offered. The image choice
  becomes ``JUPYTERHUB_IMAGE`` (``compute``/``gpu``) in the job environment and, when the
  agent command is ``node-agent launch``, its ``--gpu`` / ``--no-gpu`` option.
* **Walltime** (:class:`~hub_plugin.walltime.WalltimeMixin`, a base of this mixin): the job
  knows its end, the hub home page shows the time left (enable the page with
  ``c.JupyterHub.template_paths = [TEMPLATE_DIR]``), and with ``walltime_enforce`` (the
  default for the local backend, which has no scheduler to do it) the hub stops the server
  when the time is up.

The parts: :mod:`hub_plugin.resources` (parsing and checks, no JupyterHub),
:mod:`hub_plugin.options_form` (the form, a Jinja template in :data:`TEMPLATE_DIR`),
:mod:`hub_plugin.walltime` and this module (the spawner hooks).
"""

from __future__ import annotations

import html
import shlex
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from tornado import web
from traitlets import Bool, Dict, Float, List, Unicode, default

from .choices import SchedulerChoices, check_choices
from .options_form import TEMPLATE_DIR, render_form
from .resources import (
    IMAGES,
    SINFO_FORMAT,
    Defaults,
    OptionsError,
    Partition,
    _text,
    check_profiles,
    local_partition,
    parse_memory_mb,
    parse_sinfo,
    parse_slurm_time,
    validate_options,
)
from .walltime import WalltimeMixin

__all__ = ["REQ_FIELDS", "TEMPLATE_DIR", "OptionsError", "ResourceOptionsMixin"]

#: The checked choices that go onto batchspawner's ``req_<field>`` traits.
REQ_FIELDS = ("partition", "nprocs", "memory", "ngpus", "runtime")


class OptionsHTTPError(web.HTTPError):
    """A 400 for options JupyterHub's REST API received; ``jupyterhub_message`` is what the
    user sees in the spawn-failed event."""

    def __init__(self, message: str):
        super().__init__(400, message)
        self.jupyterhub_message = message


class ResourceOptionsMixin(WalltimeMixin):
    """Options form + validation + walltime for a broker spawner (put it first in the bases)."""

    # one option a line: a table to read (not formatted into repeated blocks)
    # fmt: off
    options_form_enabled = Bool(True, help="Show the generated options form (partition, CPUs, memory, GPUs, walltime, image).").tag(config=True)
    resource_source = Unicode("auto", help="Where partitions and limits come from: 'slurm' (sinfo), 'local' (this machine), or 'auto' (slurm for Slurm spawners, else local).").tag(config=True)
    sinfo_command = Unicode(f"sinfo -h -o '{SINFO_FORMAT}'", help="Command listing partitions (run like the submit command: locally or on the login node).").tag(config=True)
    partitions_allowed = List(Unicode(), help="Partitions offered in the form (empty: all that sinfo lists).").tag(config=True)
    partitions_cache_seconds = Float(60.0, help="How long the sinfo answer is reused.").tag(config=True)
    local_max_runtime = Unicode("24:00:00", help="Longest walltime on the local backend (Slurm time syntax; '' = no limit).").tag(config=True)
    default_runtime = Unicode("", help="Walltime preselected in the form (Slurm time syntax). Default: req_runtime, else 1 hour.").tag(config=True)
    profiles = List(Dict(), help="Admin-defined profiles: [{'name': 'course', 'display_name': 'Course', 'description': '2 CPUs, 4 GB, 2 h', 'req_nprocs': '2', 'req_memory': '4G', 'req_runtime': '2:00:00', 'req_partition': 'short', 'req_ngpus': '0', 'image': 'compute'}]. A profile's values are checked against the partition's limits like a user's choice.").tag(config=True)
    allow_custom_resources = Bool(True, help="Let users choose partition/CPUs/memory/GPUs/walltime freely (else only profiles).").tag(config=True)
    image_env_var = Unicode("JUPYTERHUB_IMAGE", help="Job environment variable carrying the image choice ('compute' or 'gpu').").tag(config=True)
    # fmt: on

    @default("walltime_enforce")
    def _walltime_enforce_default(self) -> bool:
        # the local backend has no scheduler that ends the job at its time limit
        return self._resource_kind() == "local"

    _partition_cache: dict[Any, tuple[float, list[Partition]]] = {}

    def _resource_kind(self) -> str:
        if self.resource_source in ("slurm", "local"):
            return self.resource_source
        try:
            from batchspawner import SlurmSpawner

            if isinstance(self, SlurmSpawner):
                return "slurm"
        except ImportError:  # pragma: no cover
            pass
        return "local"

    async def cluster_partitions(self) -> list[Partition]:
        """The partitions offered, from sinfo (cached hub-wide) or from this machine."""
        kind = self._resource_kind()
        if kind == "local":
            max_time = parse_slurm_time(self.local_max_runtime) if self.local_max_runtime else None
            parts = [local_partition(max_time)]
        else:
            key = (type(self).__name__, self.sinfo_command, getattr(self, "login_node_host", ""))
            hit = self._partition_cache.get(key)
            if hit and time.monotonic() - hit[0] < self.partitions_cache_seconds:
                parts = hit[1]
            else:
                try:
                    out = await self.run_command(self.sinfo_command)
                except Exception as e:
                    self.log.error("%s: %s failed: %s", self._log_name, self.sinfo_command, str(e)[:300])
                    raise OptionsError(
                        "The cluster's partition list could not be read right now; please try again in a minute."
                    ) from None
                parts = parse_sinfo(out or "")
                self._partition_cache[key] = (time.monotonic(), parts)
        if self.partitions_allowed:
            parts = [p for p in parts if p.name in self.partitions_allowed]
        return parts

    # configured values, captured before any user's choice is applied
    _configured: dict[str, str] | None = None
    _configured_req_options: str | None = None

    def _configured_req(self) -> dict[str, str]:
        if self._configured is None:
            names = (*REQ_FIELDS, *self.choice_field_names)
            self._configured = {k: str(getattr(self, f"req_{k}", "") or "") for k in names}
        return self._configured

    # -- scheduler-specific choices (hub_plugin.choices) ---------------------------------------
    #: The choice fields a subclass may offer (Slurm: account, qos, reservation); each is an
    #: option key, a ``req_<name>`` trait and a profile key ``req_<name>``.
    choice_field_names: tuple[str, ...] = ()

    async def scheduler_choices(self) -> SchedulerChoices:
        """What this user may choose besides the resources (subclasses look it up)."""
        return SchedulerChoices()

    def _profiles(self) -> list[dict[str, Any]]:
        return check_profiles(self.profiles, extra_keys={f"req_{n}" for n in self.choice_field_names})

    async def check_choice_options(self, options: Mapping[str, Any], profile: str) -> dict[str, str]:
        """The choice fields of *options*, checked against :meth:`scheduler_choices` (only
        looked up when a value is given). A profile's ``req_<name>`` is the admin's choice and
        replaces the user's."""
        if not self.choice_field_names:
            return {}
        prof = next((p for p in self._profiles() if p["name"] == profile), None) or {}
        fixed = {n: str(prof[f"req_{n}"]) for n in self.choice_field_names if f"req_{n}" in prof}
        wanted = {n: _text(dict(options), n) for n in self.choice_field_names if n not in fixed}
        checked = dict.fromkeys(wanted, "")
        if any(wanted.values()):
            checked = check_choices(await self.scheduler_choices(), wanted)
        return {**checked, **fixed}

    def _defaults(self) -> Defaults:
        c = self._configured_req()
        d = Defaults(partition=c["partition"])
        try:
            d.nprocs = int(c["nprocs"]) if c["nprocs"] else 1
        except ValueError:
            pass
        try:
            d.memory_mb = parse_memory_mb(c["memory"]) if c["memory"] else 0
        except ValueError:
            pass
        try:
            d.ngpus = int(c["ngpus"]) if c["ngpus"] else 0
        except ValueError:
            pass
        for candidate in (self.default_runtime, c["runtime"]):
            try:
                secs = parse_slurm_time(candidate) if candidate else None
            except ValueError:
                secs = None
            if secs:
                d.runtime = secs
                break
        return d

    # -- JupyterHub hooks --------------------------------------------------------------------
    @default("options_form")
    def _options_form_default(self) -> str | Callable[[ResourceOptionsMixin], Awaitable[str]]:
        if not self.options_form_enabled:
            return ""

        async def form(spawner: ResourceOptionsMixin) -> str:
            return await spawner.render_options_form()

        return form

    async def render_options_form(self) -> str:
        try:
            parts = await self.cluster_partitions()
            profiles = self._profiles()
        except OptionsError as e:
            return f'<div class="alert alert-danger">{html.escape(str(e))}</div>'
        choices = await self.scheduler_choices()
        current = self.user_options if isinstance(getattr(self, "user_options", None), dict) else {}
        # only values that still pass are offered again
        try:
            current = (
                validate_options(
                    current,
                    parts,
                    profiles=profiles,
                    defaults=self._defaults(),
                    allow_custom=self.allow_custom_resources,
                )
                if current
                else {}
            )
        except OptionsError:
            current = {}
        if current:
            current.update({n: str(self.user_options.get(n) or "") for n in self.choice_field_names})
        return render_form(
            parts,
            profiles=profiles,
            current=current,
            defaults=self._defaults(),
            allow_custom=self.allow_custom_resources,
            notes=[*self.options_form_notes(), *choices.notes],
            scheduler=choices,
            template_paths=self._site_template_paths(),
            fixed_by_profile={p["name"]: [n for n in self.choice_field_names if f"req_{n}" in p] for p in profiles},
        )

    def _site_template_paths(self) -> list[str]:
        """The hub's ``c.JupyterHub.template_paths`` (where a site's own options_form.html lives)."""
        settings = getattr(getattr(self, "user", None), "settings", None)
        paths = settings.get("template_path") if isinstance(settings, dict) else None
        if isinstance(paths, str):
            paths = [paths]
        return [p for p in paths or [] if isinstance(p, str)]

    def options_form_notes(self) -> list[str]:
        """Plain-text remarks the form shows above its fields (subclasses add theirs)."""
        return []

    @default("options_from_form")
    def _options_from_form_default(self) -> Callable[[dict[str, list[str]]], Awaitable[dict[str, Any]]]:
        return self._resource_options_from_form

    async def _resource_options_from_form(self, form_data: dict[str, list[str]]) -> dict[str, Any]:
        """Validate the submitted form; an OptionsError's message is shown in the form."""
        return await self.check_resource_options(form_data)

    async def check_resource_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        parts = await self.cluster_partitions()
        try:
            profiles = self._profiles()
        except ValueError as e:
            self.log.error("%s: bad profiles configuration: %s", self._log_name, e)
            raise OptionsError("The server profiles are misconfigured; please tell the administrators.") from None
        opts = validate_options(
            options or {}, parts, profiles=profiles, defaults=self._defaults(), allow_custom=self.allow_custom_resources
        )
        opts.update(await self.check_choice_options(options or {}, opts["profile"]))
        return opts

    @default("apply_user_options")
    def _apply_user_options_default(
        self,
    ) -> Callable[[ResourceOptionsMixin, Mapping[str, Any] | None], Awaitable[None]]:
        async def apply(spawner: ResourceOptionsMixin, user_options: Mapping[str, Any] | None) -> None:
            await spawner.apply_resource_options(user_options)

        return apply

    async def apply_resource_options(self, user_options: Mapping[str, Any] | None) -> None:
        """Check *user_options* (form or REST API) and put them on the req_* traits.

        ``self.user_options`` becomes the checked dict, so nothing else a request carried
        reaches the batch script's template variables.
        """
        configured = self._configured_req()
        for k, v in configured.items():  # start from the configuration, not the last user's choice
            setattr(self, f"req_{k}", v)
        try:
            opts = await self.check_resource_options(user_options or {})
        except OptionsError as e:
            raise OptionsHTTPError(str(e)) from None
        # extra batch options come only from the admin's profile, never from the request
        if self._configured_req_options is None:
            self._configured_req_options = getattr(self, "req_options", "")
        extra = self._configured_req_options
        prof = next((p for p in self._profiles() if p["name"] == opts.get("profile")), None)
        if prof is not None and prof.get("req_options"):
            extra = " ".join(str(prof["req_options"]).split())
        if hasattr(self, "req_options"):
            self.req_options = extra
        for k in REQ_FIELDS:
            setattr(self, f"req_{k}", opts[k])
        for k in self.choice_field_names:  # "" = not chosen: the configured value stays
            opts[k] = opts.get(k) or configured[k]
            setattr(self, f"req_{k}", opts[k])
        self.user_options = opts
        self.log.info(
            "%s: options %s", self._log_name, " ".join(f"{k}={v}" for k, v in opts.items() if v not in ("", None))
        )

    # -- job environment and script ----------------------------------------------------------
    def _image(self) -> str:
        opts = getattr(self, "user_options", None) or {}
        image = opts.get("image") if isinstance(opts, dict) else None
        return image if image in IMAGES else ""

    def get_env(self) -> dict[str, str]:
        env = super().get_env()
        image = self._image()
        if image and self.image_env_var:
            env[self.image_env_var] = image
        return env

    def cmd_formatted_for_batch(self) -> str:
        """Pass the image choice to ``node-agent launch`` as ``--gpu`` / ``--no-gpu``."""
        image = self._image()
        words = shlex.split(self.agent_command)
        if image and "launch" in words and "--gpu" not in words and "--no-gpu" not in words:
            i = words.index("launch") + 1
            words.insert(i, "--gpu" if image == "gpu" else "--no-gpu")
            saved = self.agent_command
            self.agent_command = shlex.join(words)
            try:
                return super().cmd_formatted_for_batch()
            finally:
                self.agent_command = saved
        return super().cmd_formatted_for_batch()
