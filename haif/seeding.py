"""Reproducible randomness: one ``random.Random`` per named component.

A run has one integer seed. Each component (workload, placement, retry
jitter, heartbeat loss, ...) derives its own generator from the seed and its
name through SHA-256, so adding draws to one component never shifts another,
and nothing depends on ``hash()`` randomisation or creation order.
"""

from __future__ import annotations

import hashlib
import random


def derive_seed(seed: int, name: str) -> int:
    """A 64-bit seed for ``name`` under the run seed ``seed``."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def derive_rng(seed: int, name: str) -> random.Random:
    """A generator private to the component ``name``."""
    return random.Random(derive_seed(seed, name))
