"""Headers the frontend puts on worker calls so that Envoy routes them well."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Affinity:
    """How many of the prompt's first full KV blocks name its prefix."""

    block_size: int = 16  # tokens per KV block (the worker's)
    max_blocks: int = 4  # 0: no prefix key, requests spread over replicas


def prefix_key(tenant: str, prompt_ids: Sequence[int], *, block_size: int,
               max_blocks: int) -> str | None:
    """A hash of the tenant and the prompt's first full KV blocks (at most ``max_blocks``),
    or None when the prompt has no full block. Tenants never share KV blocks (the worker
    salts its prefix cache with the tenant), so the tenant is part of the key."""
    num_blocks = min(max_blocks, len(prompt_ids) // block_size)
    if num_blocks == 0:
        return None
    digest = hashlib.blake2b(tenant.encode(), digest_size=8)
    digest.update(b"\0" + b",".join(str(t).encode() for t in prompt_ids[:num_blocks * block_size]))
    return digest.hexdigest()


def ab_bucket(tenant: str) -> str | None:
    """A stable unsigned 64-bit number for the tenant (Envoy's weighted split reads it)."""
    if not tenant:
        return None
    return str(int.from_bytes(hashlib.blake2b(tenant.encode(), digest_size=8).digest(), "big"))
