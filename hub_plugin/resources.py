"""Partitions and resource requests: parsing the cluster's answer and the user's choice, and
checking that choice against the partition's limits.

Pure: standard library only (no JupyterHub, batchspawner or traitlets), so every rule here is
unit-testable on its own. The spawner side (:mod:`hub_plugin.options`) calls it; the form
(:mod:`hub_plugin.options_form`) shows what it accepts.

Contracts:

* A :class:`Partition` is the largest node of one Slurm partition (``sinfo`` lists node
  groups; :func:`parse_sinfo` merges them) or this machine (:func:`local_partition`).
* :func:`validate_options` takes form data (lists of strings) or a REST body (scalars) and
  returns the normalized choice as the batch templates use it (all strings), or raises
  :class:`OptionsError`, whose message is meant for the user.
* :func:`check_profiles` validates the admin's profiles; a ``ValueError`` names the profile and
  the key (a configuration error, not a user's).
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CUSTOM",
    "FIELDS",
    "IMAGES",
    "PROFILE_KEYS",
    "SINFO_FORMAT",
    "Defaults",
    "OptionsError",
    "Partition",
    "check_profiles",
    "format_memory",
    "format_slurm_time",
    "human_duration",
    "local_partition",
    "parse_gres_gpus",
    "parse_memory_mb",
    "parse_sinfo",
    "parse_slurm_time",
    "parse_walltime",
    "validate_options",
]

#: sinfo's output format: partition|time limit|CPUs|memory (MB)|GRES|availability.
SINFO_FORMAT = "%P|%l|%c|%m|%G|%a"

IMAGES = {"compute": "Compute (CPU)", "gpu": "GPU"}
FIELDS = ("partition", "nprocs", "memory", "ngpus", "runtime", "image")
#: Profile keys: display fields plus the req_* overrides (and image).
PROFILE_KEYS = {
    "name",
    "display_name",
    "description",
    "req_partition",
    "req_nprocs",
    "req_memory",
    "req_ngpus",
    "req_runtime",
    "req_options",
    "image",
}
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
    """A duration for people: ``45 min``, ``2 h 05 min``, ``3 d 4 h`` (from two days on)."""
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
    """What one partition offers: limits of its largest node, availability, default flag."""

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
        """One line for the form: ``up to 64 CPUs, 500 GB, 4 GPUs (a100), max 2 days``."""
        bits = [f"up to {self.cpus} CPUs"]
        if self.memory_known:
            bits.append(f"{self.memory_mb // 1024} GB")
        if self.gpus:
            bits.append(
                f"{self.gpus} GPU{'s' if self.gpus > 1 else ''}" + (f" ({self.gpu_type})" if self.gpu_type else "")
            )
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


def _parsed(values: dict[str, Any], key: str, parse: Callable[[str], int], default: int, error: str) -> int:
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


def check_profiles(profiles: Iterable[Mapping[str, Any]], extra_keys: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Validate the admin's profiles (a config error names the profile and the key).

    *extra_keys*: the spawner's choice fields as profile keys (``req_account``, ...)."""
    allowed_keys = PROFILE_KEYS | set(extra_keys)
    out = []
    seen = set()
    for i, p in enumerate(profiles):
        if not isinstance(p, Mapping) or not p.get("name"):
            raise ValueError(f"profiles[{i}]: each profile needs a 'name'")
        name = str(p["name"])
        if name == CUSTOM or name in seen or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise ValueError(f"profiles[{i}]: name {name!r} must be unique, [A-Za-z0-9_.-], not {CUSTOM!r}")
        unknown = set(p) - allowed_keys
        if unknown:
            raise ValueError(f"profiles[{i}] ({name}): unknown keys {sorted(unknown)}; allowed: {sorted(allowed_keys)}")
        seen.add(name)
        out.append(dict(p))
    return out


def validate_options(
    options: Mapping[str, Any],
    partitions: list[Partition],
    *,
    profiles: list[dict[str, Any]] | None = None,
    defaults: Defaults | None = None,
    allow_custom: bool = True,
) -> dict[str, Any]:
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
        values = {
            k[4:] if k.startswith("req_") else k: v for k, v in prof.items() if k.startswith("req_") or k == "image"
        }
    elif profiles and not allow_custom:
        if not profile_name and len(profiles) == 1:
            return validate_options(
                {"profile": profiles[0]["name"]}, partitions, profiles=profiles, defaults=d, allow_custom=allow_custom
            )
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
    mem_mb = _parsed(
        values, "memory", parse_memory_mb, d.memory_mb, "Memory: {raw} is not a size (use e.g. 4, 4G or 512M)."
    )
    if mem_mb and part.memory_known and mem_mb > part.memory_mb:
        raise OptionsError(
            f"Memory: {format_memory(mem_mb)} requested, but partition {part.name} has at most "
            f"{part.memory_mb // 1024} GB per node."
        )

    # GPUs
    ngpus = _int_field(values["ngpus"], "GPUs") if _text(values, "ngpus") else d.ngpus
    if ngpus > part.gpus:
        have = f"at most {part.gpus}" if part.gpus else "no"
        raise OptionsError(f"GPUs: {ngpus} requested, but partition {part.name} has {have} GPUs per node.")

    # walltime
    runtime = _parsed(
        values,
        "runtime",
        parse_walltime,
        d.runtime,
        "Walltime: {raw} is not a duration (use hours like 2 or 1.5, or H:MM).",
    )
    if part.max_time and runtime > part.max_time:
        raise OptionsError(
            f"Walltime: {human_duration(runtime)} requested, but partition {part.name} allows at most "
            f"{human_duration(part.max_time)}."
        )

    # image
    image = _text(values, "image") or d.image
    if image not in IMAGES:
        raise OptionsError(f"Image: {image[:40]!r} is not one of: {', '.join(IMAGES)}.")
    if image == "gpu" and ngpus < 1:
        raise OptionsError("Image: the GPU image needs at least one GPU (set GPUs to 1 or more).")

    # strings, as the batch script templates see them ("" = option not given)
    return {
        "profile": profile_name,
        "partition": part.name,
        "nprocs": str(nprocs),
        "memory": format_memory(mem_mb) if mem_mb else "",
        "ngpus": str(ngpus) if ngpus else "",
        "runtime": format_slurm_time(runtime),
        "image": image,
    }
