"""The token bucket: the one rate limiter of both sides (stdlib only).

A bucket holds at most ``burst`` tokens and refills at ``rate`` tokens per second; each event
spends one. ``rate`` 0 means no limit: every :meth:`TokenBucket.take` succeeds. Used per agent
connection for control messages (:mod:`broker.ssh_server`) and per session for hub-API requests
(:mod:`wire.hubapi`, the broker's and the node agent's hub-API relays).
"""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """``burst`` tokens at most, refilled at ``rate`` per second; ``rate`` 0 means unlimited."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.burst = float(burst)
        self.clock = clock
        self.tokens = float(burst)
        self.stamp = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self) -> bool:
        """Spend one token; False (and nothing spent) when the bucket is empty."""
        if self.rate == 0:
            return True
        self._refill()
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def full(self) -> bool:
        """Whether the bucket is as good as new (so it may be forgotten)."""
        if self.rate == 0:
            return True
        self._refill()
        return self.tokens >= self.burst

    def retry_after(self) -> float:
        """Seconds until the next token (1 when the bucket never refills)."""
        return max(0.0, (1.0 - self.tokens) / self.rate) if self.rate > 0 else 1.0
