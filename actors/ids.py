"""Unique identifiers that are cheap to make.

Owns `new_id()`. `uuid.uuid4()` reads `os.urandom`, which costs tens of
microseconds per call on some sandboxed kernels; that is more than a whole
workflow run. These ids come from a Mersenne Twister seeded from `os.urandom`
once per process: 128 random bits, unique in practice, not secret.
"""

from __future__ import annotations

import os
import random

_random = random.Random(os.urandom(32))
_bits = _random.getrandbits


def new_id() -> str:
    """32 lowercase hex digits (a UUID's 128 bits, accepted by Postgres' `uuid` type)."""
    # What Random.randbytes does, without its Python frame: 2.5k instructions, not 3.4k.
    return _bits(128).to_bytes(16, "little").hex()


def new_urn() -> str:
    """An actor URN in pykka's format, without pykka's per-actor `os.urandom` call."""
    value = f"{_bits(128):032x}"
    return f"urn:uuid:{value[:8]}-{value[8:12]}-{value[12:16]}-{value[16:20]}-{value[20:]}"


def reseed_after_fork() -> None:
    _random.seed(os.urandom(32))


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=reseed_after_fork)
