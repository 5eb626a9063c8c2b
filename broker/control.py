"""Bounds of the agent's control channel: line splitting and limits.

The control channel carries newline-delimited JSON messages from one agent (``hello``,
``ready``, ``heartbeat``, ``walltime``, ``exit``). An honest agent sends a handful of them per
connection plus one heartbeat every few seconds; a hostile one can send millions. The pieces
here keep the broker's cost per connection bounded:

- :class:`LineSplitter` splits incoming bytes into lines in time linear in the input (only the
  unfinished tail is kept between packets; it is never re-split) and refuses a line longer
  than the limit as soon as the tail exceeds it.
- :class:`ControlLimits` gathers the limits: the per-connection message rate (a
  :class:`~wire.ratelimit.TokenBucket`: ``burst`` messages at once, refilled at ``rate`` per
  second), the queue and the line length. The broker makes it from its options
  (``c.Broker.control_*``).

A connection that exceeds any limit is closed (see ``ControlSession`` in
:mod:`broker.ssh_server`); the reason is one of :data:`CLOSE_REASONS`, counted in ``/metrics``.
"""

from __future__ import annotations

import dataclasses

#: Why a control channel was closed by the broker (the label values of
#: ``broker_control_closed_total{reason}``).
CLOSE_REASONS = ("rate_limit", "queue_full", "line_too_long", "malformed", "protocol")
#: Bytes in one control message, at most.
MAX_LINE = 16 * 1024


@dataclasses.dataclass(frozen=True)
class ControlLimits:
    """Limits of one agent connection's control channel.

    ``rate``: messages per second allowed on average (0: no rate limit); ``burst``: messages
    allowed at once; ``queue``: messages waiting to be handled at most (the reader handles them
    in order, one at a time); ``max_line``: bytes in one message.
    """

    rate: float
    burst: int
    queue: int
    max_line: int = MAX_LINE

    def __post_init__(self) -> None:
        if self.rate < 0 or self.burst < 1 or self.queue < 1 or self.max_line < 64:
            raise ValueError(f"control limits out of range: {self}")


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
