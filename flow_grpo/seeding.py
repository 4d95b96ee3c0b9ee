"""Seeds derived from run settings, stable across processes, machines and Python versions."""

from __future__ import annotations

import hashlib


def stable_seed(key: str) -> int:
    """A 63-bit seed from a text key (sha256, not Python's salted `hash`)."""
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (run seed, epoch, rank, batch ...), stable across runs."""
    return stable_seed(",".join(str(p) for p in parts))
