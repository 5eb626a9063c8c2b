"""Why an agent's authentication failed: one fixed set, shared by the SSH server and the metrics.

The SSH server (:mod:`broker.ssh_server`) decides and logs the reason; the metrics
(:mod:`broker.metrics`) count it as the ``reason`` label of ``broker_agent_auth_failures_total``.
The values are the texts in logs and label values: stable, never built from client input.
"""

from __future__ import annotations

import enum


class AuthFailure(str, enum.Enum):
    """The reason of one failed authentication attempt."""

    NOT_ENROLMENT = "not an enrolment"
    MALFORMED_ENROLMENT = "malformed enrolment"
    UNKNOWN_SESSION = "unknown or closed session"
    WRONG_SECRET = "wrong secret"
    SECRET_SPENT = "secret already spent"
    SECRET_EXPIRED = "secret expired"
    NO_VALID_KEY = "enrolment without a valid public key"
    KEY_UNKNOWN_SESSION = "public key for an unknown, closed or unenrolled session"
    KEY_NOT_BOUND = "public key not bound to this session"

    def __str__(self) -> str:
        return self.value
