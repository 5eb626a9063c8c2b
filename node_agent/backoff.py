"""Capped exponential backoff with full jitter, for retrying transient errors only.

The project's one backoff: the agent's reconnects (node_agent.agent) and the hub's login-node
connection (hub_plugin.remote) use it. Standard library only.
"""

from __future__ import annotations

import random


class Backoff:
    """Delay n (counting from 0 since the last :meth:`reset`) is uniform in
    ``[0, min(cap, base * 2**n)]`` seconds."""

    def __init__(self, base: float = 0.5, cap: float = 30.0, rng: random.Random | None = None):
        self.base = base
        self.cap = cap
        self.attempt = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        """Delay before the next attempt: uniform in [0, min(cap, base * 2**attempt)]."""
        ceiling = min(self.cap, self.base * (2**self.attempt))
        self.attempt += 1
        return self._rng.uniform(0, ceiling)

    def reset(self) -> None:
        """Start again from the shortest delay (after a success)."""
        self.attempt = 0
