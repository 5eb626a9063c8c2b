"""Grid Engine cluster queues as the options form's "partitions".

The form (:mod:`hub_plugin.options`) offers :class:`~hub_plugin.resources.Partition` objects.
On Grid Engine they come from two commands, run like the submit command (locally or on the
login node) and cached by the spawner:

* ``qconf -sql``: the cluster queue names;
* ``qconf -sq Q1,Q2,...``: each queue's configuration, of which the form uses
  ``slots`` (the most on any host: the CPUs a job may ask for, when a parallel environment is
  configured, else 1), ``h_rt`` (the longest walltime; ``INFINITY`` = no limit) and ``h_vmem``
  (memory per slot; ``INFINITY`` = unknown to the form).

The first queue listed is the default unless the spawner's ``req_partition`` names another.
"""

from __future__ import annotations

import re

from .resources import Partition, parse_memory_mb

__all__ = ["parse_ge_time", "parse_qconf_sq", "parse_qconf_sql"]


def parse_ge_time(text: str) -> int | None:
    """Grid Engine time (``HH:MM:SS``, ``MM:SS``, seconds, ``INFINITY``) in seconds; None = no
    limit. ValueError for anything else."""
    text = text.strip()
    if not text or text.upper() == "INFINITY":
        return None
    parts = text.split(":")
    if len(parts) > 3 or not all(p.isdigit() for p in parts):
        raise ValueError(f"not a Grid Engine time: {text!r}")
    secs = 0
    for p in parts:
        secs = secs * 60 + int(p)
    return secs


def format_ge_time(seconds: int) -> str:
    """Seconds as ``HH:MM:SS`` (hours may exceed 24), what ``-l h_rt=`` takes."""
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def parse_qconf_sql(text: str) -> list[str]:
    """Queue names from ``qconf -sql`` (one a line)."""
    return [line.strip() for line in text.splitlines() if re.fullmatch(r"[A-Za-z0-9_.@-]+", line.strip())]


def _max_int(value: str) -> int:
    """The largest number in a Grid Engine host-specific list (``1,[node1=4],[node2=8]``)."""
    nums = [int(n) for n in re.findall(r"(?:^|[,=\[])\s*(\d+)\b", value)]
    return max(nums) if nums else 0


def parse_qconf_sq(text: str, *, parallel: bool) -> list[Partition]:
    """Partitions from ``qconf -sq Q1,Q2,...`` (each queue's ``qname`` line starts its block).

    ``parallel``: whether jobs may ask for more than one slot (a parallel environment is
    configured); else every queue offers 1 CPU.
    """
    queues: list[dict[str, str]] = []
    key = ""
    for line in text.splitlines():
        if not line.strip():
            continue
        if line[:1].isspace() and key and queues:
            queues[-1][key] += " " + line.strip().rstrip("\\").strip()  # continuation line
            continue
        fields = line.split(None, 1)
        key = fields[0]
        value = fields[1].strip().rstrip("\\").strip() if len(fields) > 1 else ""
        if key == "qname":
            queues.append({})
        if queues:
            queues[-1][key] = value
    parts = []
    for q in queues:
        name = q.get("qname", "")
        if not name:
            continue
        try:
            max_time = parse_ge_time(q.get("h_rt", "INFINITY").split(",")[0])
        except ValueError:
            max_time = None
        mem = q.get("h_vmem", "INFINITY").split(",")[0].strip()
        try:
            memory_mb = 0 if mem.upper() == "INFINITY" else parse_memory_mb(mem)
        except ValueError:
            memory_mb = 0
        cpus = _max_int(q.get("slots", "1")) or 1
        parts.append(Partition(name, max_time, cpus if parallel else 1, memory_mb, 0, "", True, False))
    return parts
