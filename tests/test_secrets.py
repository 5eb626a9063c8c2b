"""broker.secrets: generation, at-rest hashing, verification."""

from __future__ import annotations

import hashlib
import re

import pytest

from broker.secrets import hash_secret, new_id, new_secret, verify_secret


def test_hash_is_hex_sha256_and_not_the_secret():
    s = new_secret()
    h = hash_secret(s)
    assert h == hashlib.sha256(s.encode()).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", h)
    assert s not in h


def test_verify_right_secret():
    s = new_secret()
    assert verify_secret(s, hash_secret(s)) is True


@pytest.mark.parametrize("wrong", ["", "x", "secret ", " secret", "SECRET", "secreT"])
def test_verify_wrong_secret(wrong):
    assert verify_secret(wrong, hash_secret("secret")) is False


@pytest.mark.parametrize("stored", [None, ""])
def test_verify_without_hash_is_false(stored):
    assert verify_secret("anything", stored) is False
    assert verify_secret("", stored) is False


def test_verify_against_the_secret_itself_is_false():
    # the stored value is the hash: presenting the hash as the secret must not work
    s = new_secret()
    h = hash_secret(s)
    assert verify_secret(h, h) is False
    assert verify_secret(s, s) is False


def test_non_ascii_and_surrogates_hash():
    assert verify_secret("秀樹", hash_secret("秀樹"))
    assert not verify_secret("秀樹", hash_secret("秀"))
    hash_secret("\udcff")  # lone surrogate must not raise


def test_new_secret_length_alphabet_entropy():
    s = new_secret()
    assert len(s) == 43  # 32 bytes url-safe base64 without padding
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", s)
    # many secrets: all distinct, and together they use (nearly) the whole alphabet
    many = [new_secret() for _ in range(2000)]
    assert len(set(many)) == len(many)
    chars = set("".join(many))
    assert len(chars) >= 60
    # no fixed prefix
    assert len({m[:4] for m in many}) > 1900


def test_new_id_hex_and_unique():
    ids = {new_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(re.fullmatch(r"[0-9a-f]{24}", i) for i in ids)
    assert re.fullmatch(r"[0-9a-f]{8}", new_id(4))
