"""Bounds of the agent's control channel: line splitting, a per-connection token bucket, limits.

The control channel carries newline-delimited JSON messages from one agent (``hello``,
``ready``, ``heartbeat``, ``walltime``, ``exit``). An honest agent sends a handful of them per
connection plus one heartbeat every few seconds; a hostile one can send millions. The pieces
here keep the broker's cost per connection bounded:

- :class:`LineSplitter` splits incoming bytes into lines in time linear in the input (only the
  unfinished tail is kept between packets; it is never re-split) and refuses a line longer
  than the limit as soon as the tail exceeds it.
- :class:`TokenBucket` is the per-connection message rate limit: ``burst`` messages at once,
  refilled at ``rate`` per second.
- :class:`ControlLimits` gathers the configurable limits (``BrokerApp.control_*``).

A connection that exceeds any limit is closed (see ``ControlSession`` in
:mod:`broker.ssh_server`); the reason is one of :data:`CLOSE_REASONS`, counted in ``/metrics``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

#: Why a control channel was closed by the broker (the label values of
#: ``broker_control_closed_total{reason}``).
CLOSE_REASONS = ("rate_limit", "queue_full", "line_too_long", "malformed", "protocol")


@dataclasses.dataclass(frozen=True)
class ControlLimits:
    """Limits of one agent connection's control channel.

    ``rate``: messages per second allowed on average (0: no rate limit); ``burst``: messages
    allowed at once; ``queue``: messages waiting to be handled at most (the reader handles them
    in order, one at a time); ``max_line``: bytes in one message.
    """

    rate: float = 10.0
    burst: int = 100
    queue: int = 256
    max_line: int = 16 * 1024

    def __post_init__(self) -> None:
        if self.rate < 0 or self.burst < 1 or self.queue < 1 or self.max_line < 64:
            raise ValueError(f"control limits out of range: {self}")


class TokenBucket:
    """``burst`` tokens at most, refilled at ``rate`` per second; ``rate`` 0 means unlimited."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self._clock = clock
        self._stamp = clock()

    def take(self) -> bool:
        """Spend one token; False (and nothing spent) when the bucket is empty."""
        if self.rate == 0:
            return True
        now = self._clock()
        self.tokens = min(self.burst, self.tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class LineTooLong(Exception):
    """A line (or the unfinished tail) is longer than the limit."""


class LineSplitter:
    """Newline-delimited framing, linear in the input.

    :meth:`feed` returns the complete lines in *data* (without the newline). The unfinished
    tail is kept in a ``bytearray`` and joined only with the first line of the next packet.
    """

    def __init__(self, max_line: int):
        self.max_line = max_line
        self._tail = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        parts = data.split(b"\n")
        if len(parts) == 1:  # no newline: the line goes on
            self._tail += data
            if len(self._tail) > self.max_line:
                raise LineTooLong(bytes(self._tail[:80]))
            return []
        if self._tail:
            self._tail += parts[0]
            parts[0] = bytes(self._tail)
        self._tail = bytearray(parts.pop())
        if len(self._tail) > self.max_line:
            raise LineTooLong(bytes(self._tail[:80]))
        for line in parts:
            if len(line) > self.max_line:
                raise LineTooLong(line[:80])
        return parts
