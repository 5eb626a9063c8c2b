"""The spawn options form, generated from the cluster, and the session's walltime.

``class MySpawner(ResourceOptionsMixin, BrokerSpawnerMixin, SomeBatchSpawner)`` adds:

* **An options form built from the cluster.** For Slurm the partitions and their limits come
  from ``sinfo -h -o '%P|%l|%c|%m|%G|%a'`` (max time, CPUs, memory and GPU GRES per node,
  availability); for the embedded local backend from the machine (CPUs, memory, NVIDIA
  devices). Fields: profile, partition, CPUs, memory, GPUs, walltime, image (compute/GPU).
  Admins may add ``profiles`` (a list of dicts: ``name``, ``description`` and ``req_*``
  overrides), and may hide the free fields (``allow_custom_resources = False``).
* **Validation with a message the user reads.** ``options_from_form`` checks the choice
  against the partition's limits and raises :class:`OptionsError`; JupyterHub shows the form
  again with the message above it. Options sent through the REST API are checked the same way
  (``apply_user_options``) and fail the spawn with the same message.
* **Accepted values go onto the batchspawner traits** ``req_partition``, ``req_nprocs``,
  ``req_memory``, ``req_ngpus``, ``req_runtime``; ``user_options`` is replaced by the checked
  values only, so nothing else from the request reaches the batch script. The image choice
  becomes ``JUPYTERHUB_IMAGE`` (``compute``/``gpu``) in the job environment and, when the
  agent command is ``node-agent launch``, its ``--gpu`` / ``--no-gpu`` option.
* **Walltime.** The job script exports ``JUPYTERHUB_WALLTIME_END`` (epoch seconds, computed
  in the job when it starts) and ``JUPYTERHUB_WALLTIME_SECONDS``; the hub records when it saw
  the job start and shows the time left on its home page (``hub_plugin/templates``, see
  :data:`TEMPLATE_DIR`), with a warning in the last ``walltime_warning_minutes`` and the
  broker's walltime notice (SIGUSR1 from the batch system). With ``walltime_enforce`` (the
  default for the local backend, which has no scheduler to do it) the hub stops the server
  when the time is up.
"""

from __future__ import annotations

import glob
import html
import json
import os
import re
import shlex
import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from traitlets import Bool, Dict, Float, List, Unicode, default
from traitlets.config import LoggingConfigurable

#: Directory with the hub page templates (``c.JupyterHub.template_paths = [TEMPLATE_DIR]``).
TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")

#: sinfo's output format: partition|time limit|CPUs|memory (MB)|GRES|availability.
SINFO_FORMAT = "%P|%l|%c|%m|%G|%a"

IMAGES = {"compute": "Compute (CPU)", "gpu": "GPU"}
FIELDS = ("partition", "nprocs", "memory", "ngpus", "runtime", "image")
#: Profile keys: display fields plus the req_* overrides (and image).
PROFILE_KEYS = {"name", "display_name", "description", "req_partition", "req_nprocs", "req_memory",
                "req_ngpus", "req_runtime", "req_options", "image"}
CUSTOM = "custom"


class OptionsError(ValueError):
    """A spawn option the cluster cannot satisfy; the message is meant for the user.

    JupyterHub shows ``str(exc)`` in the spawn form (options_from_form) and
    ``jupyterhub_message`` in the spawn-failed event (apply_user_options, REST API).
    """

    def __init__(self, message: str):
        super().__init__(message)
        self.jupyterhub_message = message


# -- parsing -----------------------------------------------------------------------------------

_TIME_RE = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def parse_slurm_time(text: str) -> int | None:
    """Seconds of a Slurm time (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``,
    ``D-HH:MM:SS``); None for ``infinite``/``UNLIMITED``/``n/a``/empty.

    Raises ValueError for anything else.
    """
    s = (text or "").strip()
    if s.lower() in ("", "infinite", "unlimited", "n/a", "none"):
        return None
    m = _TIME_RE.match(s)
    if not m:
        raise ValueError(f"not a time: {text!r}")
    days, a, b, c = m.groups()
    a_i, b_i, c_i = int(a), int(b or 0), int(c or 0)
    if days is not None:  # D-HH[:MM[:SS]]
        return int(days) * 86400 + a_i * 3600 + b_i * 60 + c_i
    if c is not None:  # HH:MM:SS
        return a_i * 3600 + b_i * 60 + c_i
    if b is not None:  # MM:SS
        return a_i * 60 + b_i
    return a_i * 60  # MM


def parse_walltime(text: str) -> int:
    """A walltime typed by a user: ``H:MM`` (hours and minutes), ``H:MM:SS``, ``D-HH:MM``,
    or a number of hours (``2``, ``1.5``). Returns seconds (> 0); ValueError otherwise."""
    s = (text or "").strip()
    if not s:
        raise ValueError("empty walltime")
    if re.fullmatch(r"\d+(\.\d+)?", s):
        secs = int(round(float(s) * 3600))
    elif re.fullmatch(r"\d+:\d{1,2}", s):  # H:MM, the natural reading for a user
        h, m = s.split(":")
        if int(m) >= 60:
            raise ValueError(f"minutes must be below 60: {text!r}")
        secs = int(h) * 3600 + int(m) * 60
    else:
        secs = parse_slurm_time(s) or 0
    if secs <= 0:
        raise ValueError(f"walltime must be positive: {text!r}")
    return secs


def format_slurm_time(seconds: int) -> str:
    """Seconds as Slurm's ``HH:MM:SS`` or ``D-HH:MM:SS``."""
    seconds = int(seconds)
    d, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    return f"{d}-{h:02d}:{m:02d}:{s:02d}" if d else f"{h:02d}:{m:02d}:{s:02d}"


def human_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    d, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m = rest // 60
    if seconds >= 2 * 86400:
        return f"{d} d {h} h" if h else f"{d} days"
    h += 24 * d
    if h:
        return f"{h} h {m:02d} min"
    return f"{m} min" if m else f"{seconds} s"


_MEM_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?$", re.I)
_MEM_MB = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}


def parse_memory_mb(text: str, default_unit: str = "G") -> int:
    """``4G``, ``512M``, ``1.5 GB``, ``2T`` (a bare number is in *default_unit*) -> MiB."""
    m = _MEM_RE.match((text or "").strip())
    if not m:
        raise ValueError(f"not a memory size: {text!r}")
    value, unit = float(m.group(1)), (m.group(2) or default_unit).upper()
    mb = int(value * _MEM_MB[unit])
    if mb <= 0:
        raise ValueError(f"memory must be positive: {text!r}")
    return mb


def format_memory(mb: int) -> str:
    """MiB as Slurm's ``--mem`` value (``4G`` when whole GiB, else ``1536M``)."""
    return f"{mb // 1024}G" if mb % 1024 == 0 else f"{mb}M"


def parse_gres_gpus(gres: str) -> tuple[int, str]:
    """GPUs per node and their type from sinfo's ``%G`` (``gpu:a100:4(S:0-1)``, ``gpu:2``,
    ``gpu:tesla:2,mps:100``, ``(null)``)."""
    count, kind = 0, ""
    for item in (gres or "").split(","):
        item = re.sub(r"\(.*?\)", "", item).strip()
        parts = item.split(":")
        if not parts or parts[0] != "gpu":
            continue
        n = parts[-1]
        if n.isdigit() and len(parts) >= 2:
            count += int(n)
            if len(parts) >= 3 and not kind:
                kind = parts[1]
        elif len(parts) == 2:  # gpu:TYPE without count = 1
            count += 1
            kind = kind or parts[1]
    return count, kind


@dataclass
class Partition:
    name: str
    max_time: int | None = None  # seconds; None = no limit
    cpus: int = 1  # largest node
    memory_mb: int = 0  # largest node; 0 = unknown
    gpus: int = 0  # largest node
    gpu_type: str = ""
    available: bool = True
    default: bool = False

    @property
    def memory_known(self) -> bool:
        # A node without RealMemory reports 1 MB: treat anything below 1 GiB as unknown.
        return self.memory_mb >= 1024

    def summary(self) -> str:
        bits = [f"up to {self.cpus} CPUs"]
        if self.memory_known:
            bits.append(f"{self.memory_mb // 1024} GB")
        if self.gpus:
            bits.append(f"{self.gpus} GPU{'s' if self.gpus > 1 else ''}" + (f" ({self.gpu_type})" if self.gpu_type else ""))
        bits.append(f"max {human_duration(self.max_time)}" if self.max_time else "no time limit")
        if not self.available:
            bits.append("unavailable")
        return ", ".join(bits)


def parse_sinfo(text: str) -> list[Partition]:
    """Partitions from ``sinfo -h -o '%P|%l|%c|%m|%G|%a'`` (one line per node group; lines of
    one partition are merged, keeping the largest node). The default partition ends in ``*``."""
    parts: dict[str, Partition] = {}
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) < 6 or not fields[0]:
            continue
        raw, limit, cpus, mem, gres, avail = (f.strip() for f in fields[:6])
        name = raw.rstrip("*")
        try:
            max_time = parse_slurm_time(limit)
        except ValueError:
            max_time = None
        ncpu = _leading_int(cpus)
        nmem = _leading_int(mem)
        ngpu, gtype = parse_gres_gpus(gres)
        p = parts.get(name)
        if p is None:
            p = parts[name] = Partition(name, max_time, ncpu or 1, nmem, ngpu, gtype, avail == "up", raw.endswith("*"))
        else:
            p.cpus, p.memory_mb = max(p.cpus, ncpu), max(p.memory_mb, nmem)
            if ngpu > p.gpus:
                p.gpus, p.gpu_type = ngpu, gtype
            p.available = p.available or avail == "up"
    return list(parts.values())


def _leading_int(s: str) -> int:
    m = re.match(r"\d+", s or "")
    return int(m.group()) if m else 0


def local_partition(max_time: int | None = None) -> Partition:
    """The local machine as one partition: CPUs, MemTotal, NVIDIA devices."""
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = int(line.split()[1]) // 1024
                    break
    except OSError:
        pass
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    gpus = len([p for p in glob.glob("/dev/nvidia[0-9]*") if re.search(r"nvidia\d+$", p)])
    return Partition("local", max_time, cpus, mem, gpus, "", True, True)


# -- validation --------------------------------------------------------------------------------


def _one(value: Any) -> Any:
    """Form data arrives as lists of strings; the REST API may send scalars."""
    if isinstance(value, (list, tuple)):
        return value[0] if value else ""
    return value


def _text(values: dict[str, Any], key: str) -> str:
    """One form field as stripped text ('' when absent)."""
    return str(_one(values.get(key, "")) or "").strip()


def _parsed(values: dict[str, Any], key: str, parse: Any, default: Any, error: str) -> Any:
    """*parse* of a form field, *default* when it is empty; *error* (with ``{raw}``) when it does not parse."""
    raw = _text(values, key)
    if not raw:
        return default
    try:
        return parse(raw)
    except ValueError:
        raise OptionsError(error.format(raw=repr(raw[:40]))) from None


def _int_field(value: Any, label: str) -> int:
    v = _one(value)
    if isinstance(v, bool):
        raise OptionsError(f"{label}: expected a whole number")
    if isinstance(v, int):
        return v
    s = str(v).strip()
    if not re.fullmatch(r"\d{1,6}", s):
        raise OptionsError(f"{label}: {s[:40]!r} is not a whole number")
    return int(s)


@dataclass
class Defaults:
    """Configured values used when a field is left out (from the spawner's req_* traits)."""
    partition: str = ""
    nprocs: int = 1
    memory_mb: int = 0  # 0 = no --mem (partition default)
    ngpus: int = 0
    runtime: int = 3600
    image: str = "compute"


def check_profiles(profiles: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Validate the admin's profiles (a config error names the profile and the key)."""
    out = []
    seen = set()
    for i, p in enumerate(profiles):
        if not isinstance(p, Mapping) or not p.get("name"):
            raise ValueError(f"profiles[{i}]: each profile needs a 'name'")
        name = str(p["name"])
        if name == CUSTOM or name in seen or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise ValueError(f"profiles[{i}]: name {name!r} must be unique, [A-Za-z0-9_.-], not {CUSTOM!r}")
        unknown = set(p) - PROFILE_KEYS
        if unknown:
            raise ValueError(f"profiles[{i}] ({name}): unknown keys {sorted(unknown)}; allowed: {sorted(PROFILE_KEYS)}")
        seen.add(name)
        out.append(dict(p))
    return out


def validate_options(options: Mapping[str, Any], partitions: list[Partition], *,
                     profiles: list[dict[str, Any]] | None = None, defaults: Defaults | None = None,
                     allow_custom: bool = True) -> dict[str, Any]:
    """Check the user's choice against the cluster and return the normalized options.

    *options* is form data (lists of strings) or a REST body (scalars). Missing fields take
    *defaults*; a profile's values replace the fields. Raises :class:`OptionsError` with a
    message meant for the user. The result (all strings, as the batch templates use them) has
    ``profile``, ``partition``, ``nprocs``, ``memory`` (``4G`` or ``""``), ``ngpus`` (``""`` for
    none), ``runtime`` (``HH:MM:SS``), ``image``.
    """
    profiles = profiles or []
    d = defaults or Defaults()
    if not partitions:
        raise OptionsError("No partition is available on the cluster right now.")
    by_name = {p.name: p for p in partitions}

    profile_name = str(_one(options.get("profile", "")) or "").strip()
    values: dict[str, Any] = {k: options[k] for k in FIELDS if k in options}
    if profile_name and profile_name != CUSTOM:
        prof = next((p for p in profiles if p["name"] == profile_name), None)
        if prof is None:
            raise OptionsError(f"Unknown profile {profile_name[:64]!r}.")
        values = {k[4:] if k.startswith("req_") else k: v for k, v in prof.items()
                  if k.startswith("req_") or k == "image"}
    elif profiles and not allow_custom:
        if not profile_name and len(profiles) == 1:
            return validate_options({"profile": profiles[0]["name"]}, partitions, profiles=profiles,
                                    defaults=d, allow_custom=allow_custom)
        raise OptionsError("Please choose one of the profiles.")
    else:
        profile_name = CUSTOM if profiles else ""

    # partition
    pname = _text(values, "partition")
    if not pname:
        pname = d.partition or next((p.name for p in partitions if p.default), partitions[0].name)
    part = by_name.get(pname)
    if part is None:
        raise OptionsError(f"Partition {pname[:64]!r} does not exist. Choose one of: {', '.join(by_name)}.")
    if not part.available:
        raise OptionsError(f"Partition {pname} is not available right now (down or drained).")

    # CPUs
    nprocs = _int_field(values["nprocs"], "CPUs") if _text(values, "nprocs") else d.nprocs
    if nprocs < 1:
        raise OptionsError("CPUs: at least 1.")
    if nprocs > part.cpus:
        raise OptionsError(f"CPUs: {nprocs} requested, but partition {part.name} has at most {part.cpus} per node.")

    # memory
    mem_mb = _parsed(values, "memory", parse_memory_mb, d.memory_mb,
                     "Memory: {raw} is not a size (use e.g. 4, 4G or 512M).")
    if mem_mb and part.memory_known and mem_mb > part.memory_mb:
        raise OptionsError(f"Memory: {format_memory(mem_mb)} requested, but partition {part.name} has at most "
                           f"{part.memory_mb // 1024} GB per node.")

    # GPUs
    ngpus = _int_field(values["ngpus"], "GPUs") if _text(values, "ngpus") else d.ngpus
    if ngpus > part.gpus:
        have = f"at most {part.gpus}" if part.gpus else "no"
        raise OptionsError(f"GPUs: {ngpus} requested, but partition {part.name} has {have} GPUs per node.")

    # walltime
    runtime = _parsed(values, "runtime", parse_walltime, d.runtime,
                      "Walltime: {raw} is not a duration (use hours like 2 or 1.5, or H:MM).")
    if part.max_time and runtime > part.max_time:
        raise OptionsError(f"Walltime: {human_duration(runtime)} requested, but partition {part.name} allows at most "
                           f"{human_duration(part.max_time)}.")

    # image
    image = _text(values, "image") or d.image
    if image not in IMAGES:
        raise OptionsError(f"Image: {image[:40]!r} is not one of: {', '.join(IMAGES)}.")
    if image == "gpu" and ngpus < 1:
        raise OptionsError("Image: the GPU image needs at least one GPU (set GPUs to 1 or more).")

    # strings, as the batch script templates see them ("" = option not given)
    return {"profile": profile_name, "partition": part.name, "nprocs": str(nprocs),
            "memory": format_memory(mem_mb) if mem_mb else "", "ngpus": str(ngpus) if ngpus else "",
            "runtime": format_slurm_time(runtime), "image": image}


# -- the form ----------------------------------------------------------------------------------

FORM_TEMPLATE = """
<div class="hpc-options">
{notes_html}{profiles_html}
<fieldset id="hpc-custom" {custom_disabled}>
  <div class="mb-3">
    <label class="form-label" for="hpc-partition">Partition</label>
    <select class="form-select" id="hpc-partition" name="partition">{partition_options}</select>
  </div>
  <div class="row">
    <div class="col-sm-3 mb-3">
      <label class="form-label" for="hpc-nprocs">CPUs</label>
      <input class="form-control" type="number" id="hpc-nprocs" name="nprocs" min="1" value="{nprocs}">
    </div>
    <div class="col-sm-3 mb-3">
      <label class="form-label" for="hpc-memory">Memory (GB)</label>
      <input class="form-control" type="text" id="hpc-memory" name="memory" value="{memory}"
             placeholder="partition default">
    </div>
    <div class="col-sm-3 mb-3">
      <label class="form-label" for="hpc-ngpus">GPUs</label>
      <input class="form-control" type="number" id="hpc-ngpus" name="ngpus" min="0" value="{ngpus}">
    </div>
    <div class="col-sm-3 mb-3">
      <label class="form-label" for="hpc-runtime">Walltime (hours or H:MM)</label>
      <input class="form-control" type="text" id="hpc-runtime" name="runtime" value="{runtime}">
    </div>
  </div>
  <div class="mb-3">
    <label class="form-label" for="hpc-image">Image</label>
    <select class="form-select" id="hpc-image" name="image">{image_options}</select>
  </div>
  <p class="form-text" id="hpc-limits">{limits}</p>
</fieldset>
</div>
<script>
(function () {{
  var limits = {limits_json};
  var part = document.getElementById("hpc-partition");
  function show() {{
    var p = limits[part.value];
    if (!p) return;
    document.getElementById("hpc-limits").textContent = part.value + ": " + p.summary;
    document.getElementById("hpc-nprocs").max = p.cpus;
    document.getElementById("hpc-ngpus").max = p.gpus;
  }}
  part.addEventListener("change", show);
  show();
  var custom = document.getElementById("hpc-custom");
  document.querySelectorAll("input[name=profile]").forEach(function (r) {{
    r.addEventListener("change", function () {{ custom.disabled = (r.value !== "{custom}"); }});
  }});
}})();
</script>
"""


def render_form(partitions: list[Partition], *, profiles: list[dict[str, Any]] | None = None,
                current: Mapping[str, Any] | None = None, defaults: Defaults | None = None,
                allow_custom: bool = True, notes: Iterable[str] = ()) -> str:
    """The options form's HTML (placed by JupyterHub inside its spawn form); ``notes`` are
    plain-text remarks shown above the fields (escaped here)."""
    profiles = profiles or []
    d = defaults or Defaults()
    cur = dict(current or {})
    esc = html.escape
    selected_profile = str(cur.get("profile") or (CUSTOM if allow_custom else (profiles[0]["name"] if profiles else "")))
    part_default = cur.get("partition") or d.partition or next((p.name for p in partitions if p.default),
                                                                partitions[0].name if partitions else "")
    popts = []
    for p in partitions:
        sel = " selected" if p.name == part_default else ""
        dis = "" if p.available else " disabled"
        popts.append(f'<option value="{esc(p.name)}"{sel}{dis}>{esc(p.name)} — {esc(p.summary())}</option>')
    image = cur.get("image") or d.image
    iopts = "".join(f'<option value="{k}"{" selected" if k == image else ""}>{esc(v)}</option>' for k, v in IMAGES.items())
    mem = cur.get("memory", None)
    if mem is None:
        mem = format_memory(d.memory_mb) if d.memory_mb else ""
    mem = str(mem)
    if mem.endswith("G") and mem[:-1].isdigit():
        mem = mem[:-1]
    runtime = cur.get("runtime") or format_slurm_time(d.runtime)
    try:  # show H:MM for the common case
        secs = parse_slurm_time(str(runtime)) or d.runtime
        if secs < 86400:
            runtime = f"{secs // 3600}:{(secs % 3600) // 60:02d}"
    except ValueError:
        pass

    prof_html = ""
    if profiles:
        items = []
        choices = [*((p["name"], p.get("display_name") or p["name"], p.get("description", "")) for p in profiles)]
        if allow_custom:
            choices.append((CUSTOM, "Custom", "Choose partition, CPUs, memory, GPUs and walltime yourself."))
        for name, title, desc in choices:
            chk = " checked" if name == selected_profile else ""
            items.append(
                f'<div class="form-check"><input class="form-check-input" type="radio" name="profile" '
                f'id="hpc-profile-{esc(name)}" value="{esc(name)}"{chk}>'
                f'<label class="form-check-label" for="hpc-profile-{esc(name)}"><strong>{esc(title)}</strong>'
                f'{" — " + esc(desc) if desc else ""}</label></div>')
        prof_html = '<fieldset class="mb-3"><legend>Profile</legend>' + "".join(items) + "</fieldset>"
    custom_disabled = "" if (allow_custom and selected_profile in ("", CUSTOM)) else "disabled"
    limits = {p.name: {"cpus": p.cpus, "gpus": p.gpus, "summary": p.summary()} for p in partitions}
    sel_part = next((p for p in partitions if p.name == part_default), None)
    notes_html = "".join(f'<p class="alert alert-info hpc-note">{esc(n)}</p>\n' for n in notes)
    return FORM_TEMPLATE.format(
        notes_html=notes_html, profiles_html=prof_html, custom_disabled=custom_disabled, partition_options="".join(popts),
        nprocs=esc(str(cur.get("nprocs") or d.nprocs)), memory=esc(mem), ngpus=esc(str(cur.get("ngpus", d.ngpus) or 0)),
        runtime=esc(str(runtime)), image_options=iopts,
        limits=esc(f"{sel_part.name}: {sel_part.summary()}" if sel_part else ""),
        limits_json=json.dumps(limits).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"), custom=CUSTOM)


# -- the spawner mixin -------------------------------------------------------------------------


class ResourceOptionsMixin(LoggingConfigurable):
    """Options form + validation + walltime for a broker spawner (put it first in the bases)."""

    options_form_enabled = Bool(
        True, help="Show the generated options form (partition, CPUs, memory, GPUs, walltime, image)."
    ).tag(config=True)
    resource_source = Unicode(
        "auto",
        help="Where partitions and limits come from: 'slurm' (sinfo), 'local' (this machine), or "
        "'auto' (slurm for Slurm spawners, else local).",
    ).tag(config=True)
    sinfo_command = Unicode(
        f"sinfo -h -o '{SINFO_FORMAT}'",
        help="Command listing partitions (run like the submit command: locally or on the login node).",
    ).tag(config=True)
    partitions_allowed = List(
        Unicode(), help="Partitions offered in the form (empty: all that sinfo lists)."
    ).tag(config=True)
    partitions_cache_seconds = Float(60.0, help="How long the sinfo answer is reused.").tag(config=True)
    local_max_runtime = Unicode(
        "24:00:00", help="Longest walltime on the local backend (Slurm time syntax; '' = no limit)."
    ).tag(config=True)
    default_runtime = Unicode(
        "", help="Walltime preselected in the form (Slurm time syntax). Default: req_runtime, else 1 hour."
    ).tag(config=True)
    profiles = List(
        Dict(),
        help="Admin-defined profiles: [{'name': 'course', 'display_name': 'Course', 'description': "
        "'2 CPUs, 4 GB, 2 h', 'req_nprocs': '2', 'req_memory': '4G', 'req_runtime': '2:00:00', "
        "'req_partition': 'short', 'req_ngpus': '0', 'image': 'compute'}]. A profile's values are "
        "checked against the partition's limits like a user's choice.",
    ).tag(config=True)
    allow_custom_resources = Bool(
        True, help="Let users choose partition/CPUs/memory/GPUs/walltime freely (else only profiles)."
    ).tag(config=True)
    image_env_var = Unicode(
        "JUPYTERHUB_IMAGE", help="Job environment variable carrying the image choice ('compute' or 'gpu')."
    ).tag(config=True)
    walltime_warning_minutes = Float(
        10.0, help="The hub home page warns when less than this many minutes are left."
    ).tag(config=True)
    walltime_enforce = Bool(
        help="Stop the server from the hub when its walltime is over (default: on for backends "
        "without a scheduler that enforces it, i.e. the local backend)."
    ).tag(config=True)

    @default("walltime_enforce")
    def _walltime_enforce_default(self) -> bool:
        return self._resource_kind() == "local"

    # state kept across hub restarts
    job_started_at = Float(0.0)
    walltime_seconds = Float(0.0)
    walltime_notice = Unicode("")

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
                    raise OptionsError("The cluster's partition list could not be read right now; please try again "
                                       "in a minute.") from None
                parts = parse_sinfo(out or "")
                self._partition_cache[key] = (time.monotonic(), parts)
        if self.partitions_allowed:
            parts = [p for p in parts if p.name in self.partitions_allowed]
        return parts

    # configured values, captured before any user's choice is applied
    _configured: dict[str, str] | None = None

    def _configured_req(self) -> dict[str, str]:
        if self._configured is None:
            self._configured = {k: str(getattr(self, f"req_{k}", "") or "")
                                for k in ("partition", "nprocs", "memory", "ngpus", "runtime")}
        return self._configured

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
    def _options_form_default(self):
        if not self.options_form_enabled:
            return ""

        async def form(spawner):
            return await spawner.render_options_form()

        return form

    async def render_options_form(self) -> str:
        try:
            parts = await self.cluster_partitions()
            profiles = check_profiles(self.profiles)
        except OptionsError as e:
            return f'<div class="alert alert-danger">{html.escape(str(e))}</div>'
        current = self.user_options if isinstance(getattr(self, "user_options", None), dict) else {}
        # only values that still pass are offered again
        try:
            current = validate_options(current, parts, profiles=profiles, defaults=self._defaults(),
                                       allow_custom=self.allow_custom_resources) if current else {}
        except OptionsError:
            current = {}
        return render_form(parts, profiles=profiles, current=current, defaults=self._defaults(),
                           allow_custom=self.allow_custom_resources,
                           notes=self.options_form_notes())

    def options_form_notes(self) -> list[str]:
        """Plain-text remarks the form shows above its fields (subclasses add theirs)."""
        return []

    @default("options_from_form")
    def _options_from_form_default(self):
        return self._resource_options_from_form

    async def _resource_options_from_form(self, form_data: dict[str, list[str]]) -> dict[str, Any]:
        """Validate the submitted form; an OptionsError's message is shown in the form."""
        return await self.check_resource_options(form_data)

    async def check_resource_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        parts = await self.cluster_partitions()
        try:
            profiles = check_profiles(self.profiles)
        except ValueError as e:
            self.log.error("%s: bad profiles configuration: %s", self._log_name, e)
            raise OptionsError("The server profiles are misconfigured; please tell the administrators.") from None
        return validate_options(options or {}, parts, profiles=profiles, defaults=self._defaults(),
                                allow_custom=self.allow_custom_resources)

    @default("apply_user_options")
    def _apply_user_options_default(self):
        async def apply(spawner, user_options):
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
            from tornado import web
            err = web.HTTPError(400, str(e))
            err.jupyterhub_message = str(e)
            raise err from None
        # extra batch options come only from the admin's profile, never from the request
        if not hasattr(self, "_configured_req_options"):
            self._configured_req_options = getattr(self, "req_options", "")
        extra = self._configured_req_options
        prof = next((p for p in check_profiles(self.profiles) if p["name"] == opts.get("profile")), None)
        if prof is not None and prof.get("req_options"):
            extra = " ".join(str(prof["req_options"]).split())
        if hasattr(self, "req_options"):
            self.req_options = extra
        self.req_partition = opts["partition"]
        self.req_nprocs = opts["nprocs"]
        self.req_memory = opts["memory"]
        self.req_ngpus = opts["ngpus"]
        self.req_runtime = opts["runtime"]
        self.user_options = opts
        self.log.info("%s: options %s", self._log_name,
                      " ".join(f"{k}={v}" for k, v in opts.items() if v not in ("", None)))

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
        secs = self._runtime_seconds()
        if secs:
            env["JUPYTERHUB_WALLTIME_SECONDS"] = str(secs)
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

    def get_req_subvars(self) -> dict[str, Any]:
        """The prologue exports the job's own end time (computed when the job starts)."""
        subvars = super().get_req_subvars()
        secs = self._runtime_seconds()
        if secs:
            line = f'export JUPYTERHUB_WALLTIME_END="$(( $(date +%s) + {int(secs)} ))"'
            subvars["prologue"] = f"{subvars.get('prologue') or ''}\n{line}".strip()
        return subvars

    # -- walltime ----------------------------------------------------------------------------
    def _runtime_seconds(self) -> int:
        try:
            return parse_slurm_time(str(getattr(self, "req_runtime", "") or "")) or 0
        except ValueError:
            return 0

    def note_job_started(self) -> None:
        """Called (by the broker mixin) when the job is first seen running."""
        if not self.job_started_at:
            self.job_started_at = time.time()
            self.walltime_seconds = float(self._runtime_seconds())

    def walltime_end(self) -> float:
        """Epoch seconds when the job's time runs out (as seen by the hub; 0 = unknown)."""
        if self.job_started_at and self.walltime_seconds:
            return self.job_started_at + self.walltime_seconds
        return 0.0

    def walltime_status(self) -> dict[str, Any]:
        """For the home page: end (epoch s), seconds left, human text, warning flag and notice."""
        end = self.walltime_end()
        if not end:
            return {}
        left = end - time.time()
        warn = left <= self.walltime_warning_minutes * 60 or bool(self.walltime_notice)
        return {"end": int(end), "left": int(max(0, left)), "text": human_duration(left),
                "warning": warn, "warning_seconds": int(self.walltime_warning_minutes * 60),
                "notice": self.walltime_notice}

    async def start(self):
        self.job_started_at = 0.0
        self.walltime_seconds = 0.0
        self.walltime_notice = ""
        url = await super().start()
        self.note_job_started()  # at the latest when ready
        return url

    async def poll(self):
        status = await super().poll()
        if status is None:
            # the broker mixin's poll keeps the session it read (walltime warning from the agent)
            s = getattr(self, "last_session", None) or {}
            if s.get("walltime_warning"):
                self.walltime_notice = str(s["walltime_warning"])[:200]
            end = self.walltime_end()
            if self.walltime_enforce and end and time.time() >= end:
                self.log.info("%s: walltime of %s is over; stopping the server", self._log_name,
                              human_duration(self.walltime_seconds))
                await self.stop()
                self.clear_state()
                return 0
        return status

    def get_state(self) -> dict[str, Any]:
        state = super().get_state()
        if self.job_started_at:
            state["job_started_at"] = self.job_started_at
            state["walltime_seconds"] = self.walltime_seconds
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self.job_started_at = float(state.get("job_started_at") or 0.0)
        self.walltime_seconds = float(state.get("walltime_seconds") or 0.0)

    def clear_state(self) -> None:
        super().clear_state()
        self.job_started_at = 0.0
        self.walltime_seconds = 0.0
        self.walltime_notice = ""
