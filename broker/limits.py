"""Admission control for the agents' SSH port: throttle and share fairly instead of shutting out.

Modelled on OpenSSH's ``MaxStartups`` / ``PerSourceMaxStartups`` and ``PerSourcePenalties``,
with one difference: **a source address is never shut out.** Compute nodes are shared, and a
whole cluster often reaches the hub through one NAT address, so refusing an address that
misbehaves would lock the honest agents behind it out with the attacker. Such an address is
*throttled* instead, and what it gets is shared fairly among its connections.

Terms: a connection is *pre-auth* from TCP accept until its credential has been verified (or it
closes). A pre-auth connection is either *waiting* — the broker's accept loop
(``broker/acceptor.py``) holds the bare socket: no SSH state, no banner sent, nothing read — or
*admitted* — handed to asyncssh.

Contract (per source address unless said otherwise):

1. **Open sources.** A connection from a source that is not penalised, has fewer than
   ``max_preauth_per_source`` admitted pre-auth connections and nobody waiting is admitted at once.
2. **Throttled sources.** A source that is penalised (rule 6) or at its cap is *throttled*: its new
   connections wait, and it gets **one admission per** ``throttle_interval`` seconds, each interval
   jittered uniformly over ×[0.5, 1.5] (an attacker cannot time its connections to the slot).
   Once the source is open again (a slot freed, the penalty over), waiting connections are
   admitted at once, up to the cap.
3. **Fair order among one source's waiting connections.** The accept loop peeks at what a waiting
   client has sent (``MSG_PEEK``, 16 bytes, no SSH parsing): the start of an SSH identification
   line (``SSH-2.0-``, ``SSH-1.99-``) makes it *identified* (SSH clients, node agents among them,
   send it at once); nothing yet leaves it *silent*; anything else is garbage and is closed.
   An admission goes to the oldest identified connection, else the oldest silent one. At most
   ``max_waiting_per_source`` connections wait: a newcomer to a full room takes the place of the
   oldest *silent* one, which is closed (*evicted*); if all are identified the newcomer is refused
   (closed before the banner). A connection that has waited ``max_wait`` seconds (the broker's
   login timeout; 0: no limit) is closed.
4. **Rotation of the admitted slots.** A throttled admission while the source is at its cap
   replaces one of its admitted pre-auth connections, which is closed (*evicted*): the one that
   has made the least progress (:data:`PROGRESS_ADMITTED` < :data:`PROGRESS_AUTH` <
   :data:`PROGRESS_KEY`), oldest first. Idle hogs therefore rotate out at the throttle rate instead
   of holding every slot for the login timeout; a new connection keeps its slot for about
   ``max_preauth_per_source × throttle_interval`` seconds even under attack.
5. **Verified credentials leave the accounting.** A connection whose credential the broker has
   verified (an enrolment secret, or the session's key with a valid signature) stops being pre-auth
   at that moment: it no longer counts towards any cap and can never be evicted. Failed attempts
   still count towards the source's penalty, and the SSH server still closes a connection after
   ``MAX_AUTH_TRIES`` failures.
6. **Penalties.** After ``penalty_threshold`` failed authentications within ``penalty_window``
   seconds, the source is penalised — throttled (rule 2) even below its cap — for ``penalty_base``
   seconds; each further penalty while the last is recent doubles that, up to ``penalty_max``. A
   success does not clear a penalty (an attacker may hold one valid credential).
7. **Total.** ``max_preauth_total`` bounds waiting + admitted pre-auth connections over all
   sources; at the cap the accept loop stops accepting, and further connections wait in the
   kernel's listen queue until a slot frees (:attr:`AdmissionControl.on_room`).
8. **Exemptions.** ``penalty_exempt`` networks are never penalised nor throttled (the total still holds).

Cost bound: a throttled source costs the broker at most one SSH handshake per
``throttle_interval``; everything else it sends costs an ``accept()``, a peek and a ``close()``.
Limit: before key exchange the broker cannot tell two clients of one address apart. An attacker
that completes identification lines on many connections and reopens each refused one at once
competes with an honest agent of its own address as an equal (see docs/reliability.md).

Pure bookkeeping with an injectable clock and random source; the sockets (waiting connections)
and SSH server objects (admitted ones) are reached through the two small protocols below.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import random
import time
from collections.abc import Callable
from typing import Any, Literal, Protocol

from traitlets import Float, Integer, List, Unicode, observe
from traitlets.config import Configurable

from .options import each, is_network, minimum, refuse_unknown

#: How far an admitted pre-auth connection got (rule 4: the least progressed is evicted first).
PROGRESS_ADMITTED = 0  # banner sent; no authentication request yet
PROGRESS_AUTH = 1  # key exchange done, authentication requested
PROGRESS_KEY = 2  # offered the session's own key (signature not yet verified)

#: What :meth:`Waiting.probe` reports.
Probe = Literal["silent", "identified", "garbage", "gone"]
#: What :meth:`AdmissionControl.arrive` decides for a new connection.
Verdict = Literal["admit", "wait", "refuse"]

_IDENT_PREFIXES = (b"SSH-2.0-", b"SSH-1.99-")


def classify_first_bytes(data: bytes | None) -> Probe:
    """Classify the first bytes a client sent (None: nothing yet, b"": it closed)."""
    if data is None:
        return "silent"
    if not data:
        return "gone"
    if any(p.startswith(data[: len(p)]) for p in _IDENT_PREFIXES):
        return "identified"
    return "garbage"


class Waiting(Protocol):
    """A waiting connection (the accept loop's bare socket)."""

    def probe(self) -> Probe:
        """Look, without consuming anything, at what the client has sent so far."""

    def close(self, refused: bool = True) -> None:
        """Close it before the banner (*refused*: closed by admission control, not by the peer)."""


class Admitted(Protocol):
    """An admitted pre-auth connection (the broker's SSH server object)."""

    progress: int

    def evict(self) -> None:
        """Close the connection; admission control has already taken it out of its accounting."""


@dataclasses.dataclass(eq=False)
class _Wait:
    conn: Waiting
    since: float
    identified: bool = False


@dataclasses.dataclass
class _Source:
    exempt: bool = False
    admitted: int = 0  # admitted pre-auth connections, attached or not
    handles: dict[Any, float] = dataclasses.field(default_factory=dict)  # attached ones, oldest first
    waiting: list[_Wait] = dataclasses.field(default_factory=list)  # arrival order
    next_admit: float = 0.0  # earliest time of the next throttled admission
    failures: list[float] = dataclasses.field(default_factory=list)
    penalised_until: float = 0.0
    penalty: float = 0.0  # the last penalty's length (doubles)
    refused: int = 0
    last_logged: float = -1e9


class AdmissionControl(Configurable):
    """Admission control of the agents' SSH port: pre-auth caps, throttling, fair waiting and
    penalties per source address (``c.AdmissionControl.<name>``; see the module docstring)."""

    # one option a line: the class reads as a table of its options
    # fmt: off
    # caps and throttling
    max_preauth_per_source = Integer(64, help="Unauthenticated SSH connections admitted at once from one source address (0: no cap). At the cap the source is throttled: newer connections wait (no banner) and each admission replaces its least advanced unauthenticated connection.").tag(config=True)
    max_preauth_total = Integer(512, help="Unauthenticated SSH connections (admitted or waiting) allowed at once in total (0: no cap); at the cap the broker stops accepting and further connections wait in the kernel's listen queue.").tag(config=True)
    max_waiting_per_source = Integer(32, help="Connections of a throttled source held waiting for their turn (no SSH state); a newcomer to a full room replaces the oldest one that has sent nothing. 0: refuse a throttled source's connections outright.").tag(config=True)
    throttle_interval = Float(1.0, help="Seconds between admissions of a throttled source (penalised, or at max_preauth_per_source), jittered by ±50%.").tag(config=True)
    _positive = minimum({"throttle_interval": 0}, exclusive=True)
    # penalties for failed authentications
    penalty_threshold = Integer(10, help="Failed SSH authentications from one source (within penalty_window) before it is penalised: throttled even below its cap (0: no penalties).").tag(config=True)
    penalty_window = Float(60.0, help="Seconds over which failed authentications from one source are counted.").tag(config=True)
    penalty_base = Float(10.0, help="Seconds a penalised source is throttled; doubles for each further penalty.").tag(config=True)
    penalty_max = Float(600.0, help="Longest penalty, in seconds.").tag(config=True)
    penalty_exempt = List(Unicode(), help="Networks (CIDR) never penalised nor throttled per source, e.g. a NAT gateway all compute nodes share.").tag(config=True)
    _networks = each(is_network, "a network", "penalty_exempt")

    max_wait = Float(0.0, help="Seconds a connection may wait before it is closed (0: no limit). Not an option: the accept loop (broker/acceptor.py) sets it to the broker's login timeout.")
    # fmt: on

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None, **kwargs: Any):
        """*kwargs*: options (traits) and the ``parent``/``config`` of a Configurable; *clock* and
        *rng* are injectable for tests."""
        refuse_unknown(type(self), kwargs)
        super().__init__(**kwargs)
        self.clock = clock
        self.rng = rng or random.Random()
        self.preauth_total = 0  # waiting + admitted pre-auth, all sources
        self.waiting_total = 0
        self.refused_total = 0  # closed by admission control before the banner
        self.throttled_total = 0  # connections that had to wait
        self.evicted_total = 0  # closed to make room for a newer connection of the same source
        self.penalties_total = 0
        self._sources: dict[str, _Source] = {}
        self._queued: set[str] = set()  # sources with waiting connections
        #: Called when something may be admitted now: the pre-auth total dropped, a slot of a source
        #: with waiting connections freed (the accept loop resumes / re-checks :meth:`due`).
        self.on_room: Callable[[], None] | None = None
        self.exempt = self._networks_of(self.penalty_exempt)

    @staticmethod
    def _networks_of(texts: list[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(n, strict=False) for n in texts]

    @observe("penalty_exempt")
    def _exempt_changed(self, change: Any) -> None:
        self.exempt = self._networks_of(change["new"])

    # -- sources ---------------------------------------------------------------------------
    def is_exempt(self, source: str) -> bool:
        try:
            addr = ipaddress.ip_address(source)
        except ValueError:
            return False
        return any(addr in net for net in self.exempt)

    def _get(self, source: str) -> _Source:
        s = self._sources.get(source)
        if s is None:
            s = self._sources[source] = _Source(exempt=self.is_exempt(source))
        return s

    def _forget_if_idle(self, source: str) -> None:
        s = self._sources.get(source)
        now = self.clock()
        if (
            s
            and not s.admitted
            and not s.waiting
            and not s.failures
            and s.penalised_until <= now
            and now - s.penalised_until > self.penalty_max
        ):  # keep the doubling memory while recent
            del self._sources[source]

    def _why_throttled(self, s: _Source, now: float) -> str | None:
        """Why the source is throttled now (rule 2), or None if it is open."""
        if s.exempt:
            return None
        if s.penalised_until > now:
            return f"penalised for repeated authentication failures ({s.penalised_until - now:.0f}s left)"
        if self.max_preauth_per_source and s.admitted >= self.max_preauth_per_source:
            return f"at its cap of {self.max_preauth_per_source} unauthenticated connections"
        return None

    def _at_cap(self, s: _Source) -> bool:
        return bool(self.max_preauth_per_source) and not s.exempt and s.admitted >= self.max_preauth_per_source

    def _room(self) -> None:
        if self.on_room is not None:
            self.on_room()

    # -- new connections -------------------------------------------------------------------
    def arrive(self, source: str, conn: Waiting) -> tuple[Verdict, str]:
        """Decide for a connection just accepted: ``admit`` (counted as admitted pre-auth: hand it
        to asyncssh), ``wait`` (kept in the source's waiting room; :meth:`due` admits it later) or
        ``refuse`` (not counted: close it). The second item says why it was not admitted."""
        now = self.clock()
        s = self._get(source)
        why = self._why_throttled(s, now)
        if why is None and not s.waiting:
            self._count_admitted(s)
            return "admit", ""
        why = why or "earlier connections of this source are waiting"
        if not self.max_waiting_per_source:
            return self._refuse(s, why)
        state = conn.probe()
        if state in ("garbage", "gone"):
            return self._refuse(s, "not an SSH client" if state == "garbage" else "closed by the client")
        if len(s.waiting) >= self.max_waiting_per_source and not self._make_room(s):
            return self._refuse(s, f"{why}; its {self.max_waiting_per_source} waiting connections all identified")
        s.waiting.append(_Wait(conn, now, identified=state == "identified"))
        self._queued.add(source)
        self.waiting_total += 1
        self.preauth_total += 1
        self.throttled_total += 1
        return "wait", why

    def _refuse(self, s: _Source, why: str) -> tuple[Verdict, str]:
        s.refused += 1
        self.refused_total += 1
        return "refuse", why

    def _count_admitted(self, s: _Source) -> None:
        s.admitted += 1
        self.preauth_total += 1

    def _drop_waiting(self, s: _Source, w: _Wait, *, refused: bool) -> None:
        s.waiting.remove(w)
        self.waiting_total -= 1
        self.preauth_total -= 1
        if refused:
            self.refused_total += 1
        w.conn.close(refused=refused)
        self._room()  # the total dropped (the accept loop may resume)

    def _make_room(self, s: _Source) -> bool:
        """Free one place in a full waiting room: drop a departed or garbage client, else evict the
        oldest silent one. False if every waiting connection is identified."""
        for w in list(s.waiting):
            if w.identified:
                continue
            state = w.conn.probe()
            if state == "identified":
                w.identified = True
                continue
            if state == "silent":
                self.evicted_total += 1
            self._drop_waiting(s, w, refused=state != "gone")
            return True
        return False

    # -- admissions from the waiting rooms -------------------------------------------------
    def due(self) -> list[tuple[str, Waiting]]:
        """Admit what may be admitted now (rules 2-4): the connections returned are counted as
        admitted pre-auth; hand each to asyncssh. Closes expired and departed waiting ones."""
        now = self.clock()
        out: list[tuple[str, Waiting]] = []
        for source in list(self._queued):
            s = self._sources[source]
            while s.waiting and self.max_wait > 0 and now - s.waiting[0].since >= self.max_wait:
                self._drop_waiting(s, s.waiting[0], refused=True)
            while s.waiting:
                throttled = self._why_throttled(s, now) is not None
                if throttled and now < s.next_admit:
                    break
                victim = self._victim(s) if throttled and self._at_cap(s) else None
                if throttled and self._at_cap(s) and victim is None:
                    break  # every admitted slot is still being set up; attach() wakes us
                w = self._next_waiting(s)
                if w is None:
                    break
                if victim is not None:
                    self._evict(s, victim)
                s.waiting.remove(w)
                self.waiting_total -= 1
                s.admitted += 1  # (moves within preauth_total)
                out.append((source, w.conn))
                if throttled:
                    s.next_admit = now + self.throttle_interval * self.rng.uniform(0.5, 1.5)
            if not s.waiting:
                self._queued.discard(source)
                self._forget_if_idle(source)
        return out

    def next_due(self) -> float | None:
        """Seconds until :meth:`due` has something to do (0: now), or None while nothing waits."""
        now = self.clock()
        best: float | None = None
        for source in self._queued:
            s = self._sources[source]
            if not s.waiting:
                continue
            t = s.waiting[0].since + self.max_wait if self.max_wait > 0 else float("inf")
            if self._why_throttled(s, now) is None:
                t = now
            elif not (self._at_cap(s) and not s.handles):
                t = min(t, s.next_admit)
            best = t if best is None else min(best, t)
        return None if best is None or best == float("inf") else max(0.0, best - now)

    def _next_waiting(self, s: _Source) -> _Wait | None:
        """The oldest identified waiting connection, else the oldest silent one (rule 3)."""
        for w in list(s.waiting):  # (re-)probe all: clients that sent their line or left since
            state = w.conn.probe()
            if state in ("garbage", "gone"):
                self._drop_waiting(s, w, refused=state == "garbage")
            elif state == "identified":
                w.identified = True
        return next((w for w in s.waiting if w.identified), s.waiting[0] if s.waiting else None)

    def _victim(self, s: _Source) -> Any:
        """The admitted pre-auth connection with the least progress, oldest first (rule 4)."""
        best, best_progress = None, None
        for handle in s.handles:  # insertion order: oldest first
            p = getattr(handle, "progress", PROGRESS_ADMITTED)
            if best_progress is None or p < best_progress:
                best, best_progress = handle, p
        return best

    def _evict(self, s: _Source, handle: Admitted) -> None:
        del s.handles[handle]
        s.admitted -= 1
        self.preauth_total -= 1
        self.evicted_total += 1
        handle.evict()

    # -- admitted connections --------------------------------------------------------------
    def attach(self, source: str, handle: Admitted) -> None:
        """An admitted connection's SSH server object exists: it can now be evicted (rule 4)."""
        s = self._sources.get(source)
        if s is not None and len(s.handles) < s.admitted:
            s.handles[handle] = self.clock()
            if s.waiting:
                self._room()

    def left_preauth(self, source: str, handle: Admitted | None = None) -> None:
        """An admitted connection's credential was verified, or it closed (rule 5)."""
        s = self._sources.get(source)
        if s is None or s.admitted <= 0:
            return
        if handle is not None:
            s.handles.pop(handle, None)
        s.admitted -= 1
        self.preauth_total = max(0, self.preauth_total - 1)
        self._forget_if_idle(source)
        if s.waiting or not self.max_preauth_total or self.preauth_total < self.max_preauth_total:
            self._room()

    def close_waiting(self) -> None:
        """Close every waiting connection (the broker is stopping)."""
        for source in list(self._queued):
            s = self._sources[source]
            for w in list(s.waiting):
                self._drop_waiting(s, w, refused=False)
        self._queued.clear()

    # -- penalties -------------------------------------------------------------------------
    def auth_failed(self, source: str) -> bool:
        """Record one failed attempt; True if this started a penalty for the source (rule 6)."""
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

    # -- reporting -------------------------------------------------------------------------
    def should_log(self, source: str, every: float = 10.0) -> bool:
        """Rate-limit logging about a source: at most one line per *every* seconds."""
        s = self._get(source)
        now = self.clock()
        if now - s.last_logged >= every:
            s.last_logged = now
            return True
        return False

    def waiting(self, source: str) -> int:
        s = self._sources.get(source)
        return len(s.waiting) if s else 0

    def admitted(self, source: str) -> int:
        s = self._sources.get(source)
        return s.admitted if s else 0

    def stats(self) -> dict[str, int]:
        now = self.clock()
        return {
            "preauth": self.preauth_total,
            "waiting": self.waiting_total,
            "refused": self.refused_total,
            "throttled": self.throttled_total,
            "evicted": self.evicted_total,
            "penalties": self.penalties_total,
            "penalised_sources": sum(1 for s in self._sources.values() if s.penalised_until > now),
        }
