"""Prometheus metrics of the broker, served at ``GET /metrics`` on the REST API.

Every broker (:class:`~broker.core.Broker`) owns one :class:`BrokerMetrics` with its own
``CollectorRegistry`` (not the process-global one), so several brokers in one process (tests)
never share numbers. Gauges that describe the present (sessions by state, agents connected) are
computed at scrape time from the store and the broker's tables, so they can never drift; events
(byte counts as flushed, auth and connect failures, reconnects, spawn stage durations) are
counted when they happen.

Label values come from small fixed sets only (states, stages, failure reasons chosen in broker
code: :class:`~broker.reasons.AuthFailure`, :data:`CONNECT_REASONS`,
:data:`broker.control.CLOSE_REASONS`), never from user input, so a hostile client cannot blow up
the number of series. The broker counts session events; its SSH server counts the failures of
the connections it serves.

Metric names (all prefixed ``broker_``)::

    broker_sessions{state}                         gauge: live sessions by state
    broker_agents_connected                        gauge: agent SSH connections authenticated now
    broker_agent_throttled_total                   counter: SSH connections that waited (throttled source)
    broker_agent_evicted_total                     counter: pre-auth SSH connections closed to make room
                                                   for a newer one of the same source (broker/limits.py)
    broker_sessions_created_total                  counter
    broker_sessions_closed_total                   counter
    broker_tunnel_bytes_in_total                   counter: bytes hub -> node (flushed counters)
    broker_tunnel_bytes_out_total                  counter: bytes node -> hub
    broker_agent_auth_failures_total{reason}       counter
    broker_agent_connect_failures_total{reason}    counter: SSH connections that ended unauthenticated
    broker_agent_reconnects_total                  counter: logins of an agent already seen before
    broker_control_closed_total{reason}            counter: agent connections closed for their control
                                                   channel: rate_limit, queue_full, line_too_long,
                                                   malformed, protocol (see broker/control.py)
    broker_spawn_stage_seconds{stage}              histogram: registered_to_connected,
                                                   connected_to_ready, total (registered_to_ready)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .control import CLOSE_REASONS as CONTROL_REASONS
from .limits import AdmissionControl
from .reasons import AuthFailure
from .store import LIVE_STATES, SessionStore

#: Why an SSH connection ended before it authenticated.
#: ``refused``: turned away before the banner by admission control (pre-auth caps, penalties).
CONNECT_REASONS = ("auth_failed", "login_timeout", "protocol_error", "closed_before_auth", "refused")
STAGES = ("registered_to_connected", "connected_to_ready", "total")
#: Spawns wait in batch queues: buckets from a second to a few hours.
SPAWN_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, float("inf"))

CONTENT_TYPE = CONTENT_TYPE_LATEST


def connect_reason(exc: BaseException | None, auth_failed: bool) -> str:
    """Map how an unauthenticated connection ended to one of :data:`CONNECT_REASONS`."""
    if auth_failed:
        return "auth_failed"
    text = f"{type(exc).__name__} {exc}".lower() if exc is not None else ""
    if "timeout" in text or "timed out" in text:
        return "login_timeout"
    if exc is not None and (
        "protocol" in text
        or "packet" in text
        or "version" in text
        or "mac" in text
        or "kex" in text
        or "key exchange" in text
        or "invalid" in text
    ):
        return "protocol_error"
    return "closed_before_auth"


class LiveState(Protocol):
    """What the scrape-time gauges read (the broker)."""

    @property
    def store(self) -> SessionStore: ...

    @property
    def agents(self) -> Mapping[str, object]:
        """The authenticated agent connections, by session id."""
        ...

    @property
    def admission(self) -> AdmissionControl: ...


class _LiveCollector:
    """Scrape-time gauges from the broker's current state."""

    def __init__(self, broker: LiveState):
        self.broker = broker

    def describe(self) -> list[Any]:  # no describe-time store access
        return []

    def collect(self) -> Iterator[Any]:
        by_state = GaugeMetricFamily("broker_sessions", "Live sessions by state.", labels=["state"])
        counts = dict.fromkeys(LIVE_STATES, 0)
        counts.update(self.broker.store.count_by_state())
        for state, n in counts.items():
            by_state.add_metric([state], n)
        yield by_state
        yield GaugeMetricFamily(
            "broker_agents_connected", "Agent SSH connections authenticated now.", value=len(self.broker.agents)
        )
        # admission control keeps its own counters (broker/limits.py); exposed as they are
        ad = self.broker.admission
        yield CounterMetricFamily(
            "broker_agent_throttled",
            "SSH connections that had to wait because their source "
            "address was throttled (penalised or at its pre-auth cap).",
            value=ad.throttled_total,
        )
        yield CounterMetricFamily(
            "broker_agent_evicted",
            "Pre-auth SSH connections closed to make room for a newer connection of the same source address.",
            value=ad.evicted_total,
        )


class BrokerMetrics:
    """The broker's metrics: the broker and its SSH server call the ``on_*`` hooks; the gauges
    are read from *broker* at scrape time."""

    def __init__(self, broker: LiveState):
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.sessions_created = Counter("broker_sessions_created", "Sessions registered.", registry=r)
        self.sessions_closed = Counter("broker_sessions_closed", "Sessions closed.", registry=r)
        self.bytes_in = Counter(
            "broker_tunnel_bytes_in", "Tunnel bytes hub -> node (as flushed from the listeners).", registry=r
        )
        self.bytes_out = Counter(
            "broker_tunnel_bytes_out", "Tunnel bytes node -> hub (as flushed from the listeners).", registry=r
        )
        self.auth_failures = self._by_reason(
            "broker_agent_auth_failures",
            "Failed agent authentications, by reason.",
            [reason.value for reason in AuthFailure],
        )
        self.connect_failures = self._by_reason(
            "broker_agent_connect_failures",
            "Agent SSH connections that ended without authenticating, by reason.",
            CONNECT_REASONS,
        )
        self.reconnects = Counter(
            "broker_agent_reconnects", "Agent logins to a session whose agent had connected before.", registry=r
        )
        self.control_closed = self._by_reason(
            "broker_control_closed",
            "Agent connections closed for exceeding a control channel limit or bad control input, by reason.",
            CONTROL_REASONS,
        )
        self.spawn_seconds = Histogram(
            "broker_spawn_stage_seconds", "Spawn durations by stage.", ["stage"], buckets=SPAWN_BUCKETS, registry=r
        )
        for stage in STAGES:
            self.spawn_seconds.labels(stage)
        r.register(_LiveCollector(broker))

    def _by_reason(self, name: str, text: str, reasons: Iterable[str]) -> Counter:
        """A counter labelled by reason, with every reason's series there from the start."""
        counter = Counter(name, text, ["reason"], registry=self.registry)
        for reason in reasons:
            counter.labels(reason)
        return counter

    # -- hooks -----------------------------------------------------------------------------
    def on_created(self) -> None:
        self.sessions_created.inc()

    def on_closed(self) -> None:
        self.sessions_closed.inc()

    def on_bytes(self, bytes_in: int, bytes_out: int) -> None:
        self.bytes_in.inc(bytes_in)
        self.bytes_out.inc(bytes_out)

    def on_auth_failure(self, reason: AuthFailure) -> None:
        self.auth_failures.labels(reason.value).inc()

    def on_connect_failure(self, exc: BaseException | None, auth_failed: bool, *, refused: bool = False) -> None:
        self.connect_failures.labels("refused" if refused else connect_reason(exc, auth_failed)).inc()

    def on_control_closed(self, reason: str) -> None:
        self.control_closed.labels(reason if reason in CONTROL_REASONS else "protocol").inc()

    def on_reconnect(self) -> None:
        self.reconnects.inc()

    def on_connected(self, created: float, connected_at: float) -> None:
        self.spawn_seconds.labels("registered_to_connected").observe(max(0.0, connected_at - created))

    def on_ready(self, created: float, connected_at: float | None, ready_at: float) -> None:
        if connected_at is not None:
            self.spawn_seconds.labels("connected_to_ready").observe(max(0.0, ready_at - connected_at))
        self.spawn_seconds.labels("total").observe(max(0.0, ready_at - created))

    # -- exposition ------------------------------------------------------------------------
    def render(self) -> bytes:
        return generate_latest(self.registry)
