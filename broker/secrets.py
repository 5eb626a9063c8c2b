"""Secrets: generation, hashing at rest, constant-time verification.

Every secret the broker issues is 32 random bytes (url-safe text). High-entropy secrets
need no slow KDF: a SHA-256 digest is what is stored, and comparisons go through
:func:`hmac.compare_digest`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets as _secrets


def new_secret() -> str:
    """Return a fresh random secret (43 url-safe characters)."""
    return _secrets.token_urlsafe(32)


def new_id(nbytes: int = 12) -> str:
    """Return a fresh random, non-secret identifier (hex)."""
    return _secrets.token_hex(nbytes)


def hash_secret(secret: str) -> str:
    """Return the at-rest form of *secret* (hex SHA-256)."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def verify_secret(secret: str, stored_hash: str | None) -> bool:
    """True iff *secret* hashes to *stored_hash*; constant time in the secret's content."""
    if not stored_hash:
        # still do the work so timing doesn't reveal that no hash exists
        hmac.compare_digest(hash_secret(secret), "0" * 64)
        return False
    return hmac.compare_digest(hash_secret(secret), stored_hash)
