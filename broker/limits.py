"""Admission control for the agents' SSH port: pre-auth caps and per-source penalties.

Modelled on OpenSSH's ``MaxStartups`` / ``PerSourceMaxStartups`` and ``PerSourcePenalties``:

- **Pre-auth caps.** A connection counts as *pre-auth* from TCP accept until it authenticates
  (or closes). At most ``max_preauth_per_source`` such connections per source address: an
  excess one is closed at once, before the broker sends its SSH banner (no key exchange, no CPU
  spent). At most ``max_preauth_total`` in all: at that point the broker's accept loop
  (``broker/acceptor.py``) stops accepting and further connections wait in the kernel's listen
  queue until a slot frees (:attr:`AdmissionControl.on_room`) — a reconnect storm queues instead
  of being refused and retrying. Together with ``login_timeout`` this bounds what idle or slow
  clients (slowloris) can hold, and one source cannot starve others.
- **Penalties.** Every failed authentication attempt is recorded against its source. After
  ``penalty_threshold`` failures (a window of ``penalty_window`` seconds), the source is refused
  new connections for ``penalty_base`` seconds; each further penalty doubles the time, up to
  ``penalty_max``. A success does not clear a penalty (an attacker may hold one valid
  credential), but the failure window ages out.
- **Exemptions.** ``exempt`` lists networks (e.g. a NAT gateway all compute nodes share) that
  are never penalised and not capped per source (the total cap still holds).

Pure bookkeeping with an injectable clock, so it is unit-testable without sockets.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import time
from typing import Callable, Iterable


@dataclasses.dataclass
class _Source:
    preauth: int = 0
    failures: list[float] = dataclasses.field(default_factory=list)
    penalised_until: float = 0.0
    penalty: float = 0.0  # the last penalty's length (doubles)
    refused: int = 0
    last_logged: float = -1e9


class AdmissionControl:
    """Decides whether a new SSH connection from *source* may proceed."""

    def __init__(
        self,
        *,
        max_preauth_per_source: int = 64,
        max_preauth_total: int = 512,
        penalty_threshold: int = 10,
        penalty_window: float = 60.0,
        penalty_base: float = 10.0,
        penalty_max: float = 600.0,
        exempt: Iterable[str] = (),
        clock: Callable[[], float] = time.monotonic,
    ):
        self.max_preauth_per_source = max_preauth_per_source
        self.max_preauth_total = max_preauth_total
        self.penalty_threshold = penalty_threshold
        self.penalty_window = penalty_window
        self.penalty_base = penalty_base
        self.penalty_max = penalty_max
        self.exempt = [ipaddress.ip_network(n, strict=False) for n in exempt]
        self.clock = clock
        self.preauth_total = 0
        self.refused_total = 0
        self.penalties_total = 0
        self._sources: dict[str, _Source] = {}
        #: Called when the pre-auth total drops below ``max_preauth_total`` (the accept loop resumes).
        self.on_room: Callable[[], None] | None = None

    def is_exempt(self, source: str) -> bool:
        try:
            addr = ipaddress.ip_address(source)
        except ValueError:
            return False
        return any(addr in net for net in self.exempt)

    def _get(self, source: str) -> _Source:
        s = self._sources.get(source)
        if s is None:
            s = self._sources[source] = _Source()
        return s

    def _forget_if_idle(self, source: str) -> None:
        s = self._sources.get(source)
        if s and not s.preauth and not s.failures and s.penalised_until <= self.clock():
            # keep the doubling memory only while a penalty is recent
            if self.clock() - s.penalised_until > self.penalty_max:
                del self._sources[source]

    def admit(self, source: str) -> str | None:
        """Count a new connection in, or return why it must be closed (it is then not counted)."""
        now = self.clock()
        s = self._get(source)
        reason = None
        if s.penalised_until > now:
            reason = f"source penalised for repeated authentication failures ({s.penalised_until - now:.0f}s left)"
        elif self.max_preauth_total and self.preauth_total >= self.max_preauth_total:
            reason = f"too many unauthenticated connections in total ({self.max_preauth_total})"
        elif (self.max_preauth_per_source and s.preauth >= self.max_preauth_per_source
              and not self.is_exempt(source)):
            reason = f"too many unauthenticated connections from this source ({self.max_preauth_per_source})"
        if reason:
            s.refused += 1
            self.refused_total += 1
            return reason
        s.preauth += 1
        self.preauth_total += 1
        return None

    def should_log(self, source: str, every: float = 10.0) -> bool:
        """Rate-limit refusal logging: at most one line per source per *every* seconds."""
        s = self._get(source)
        now = self.clock()
        if now - s.last_logged >= every:
            s.last_logged = now
            return True
        return False

    def left_preauth(self, source: str) -> None:
        """An admitted connection authenticated or closed."""
        s = self._sources.get(source)
        if s is not None and s.preauth > 0:
            s.preauth -= 1
            self.preauth_total = max(0, self.preauth_total - 1)
            self._forget_if_idle(source)
            if self.on_room is not None and (not self.max_preauth_total or self.preauth_total < self.max_preauth_total):
                self.on_room()

    def auth_failed(self, source: str) -> bool:
        """Record one failed attempt; True if this started a penalty for the source."""
        if not self.penalty_threshold or self.is_exempt(source):
            return False
        now = self.clock()
        s = self._get(source)
        s.failures = [t for t in s.failures if now - t < self.penalty_window]
        s.failures.append(now)
        if len(s.failures) < self.penalty_threshold:
            return False
        recent = s.penalised_until and now - s.penalised_until < self.penalty_max
        s.penalty = min(self.penalty_max, s.penalty * 2 if recent and s.penalty else self.penalty_base)
        s.penalised_until = now + s.penalty
        s.failures.clear()
        self.penalties_total += 1
        return True

    def penalty_left(self, source: str) -> float:
        s = self._sources.get(source)
        return max(0.0, s.penalised_until - self.clock()) if s else 0.0

    def stats(self) -> dict[str, int]:
        return {"preauth": self.preauth_total, "refused": self.refused_total, "penalties": self.penalties_total,
                "penalised_sources": sum(1 for s in self._sources.values() if s.penalised_until > self.clock())}
