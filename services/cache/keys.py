"""What a cached answer is filed under: the tenant and the model version in the clear
(invalidation selects by them), everything else that determines the answer hashed."""

from __future__ import annotations

import hashlib
from array import array

from genmesh.v1 import cache_pb2
from services.cache.store import EntryKey


class BadKeyError(ValueError):
    """A key the cache cannot file: the message names the missing part."""


def entry_key(key: cache_pb2.CacheKey) -> EntryKey:
    """The store's key for ``key``: a SHA-256 over the model, the prompt ids and the
    sampling parameters (deterministically serialized, so equal parameters hash equally)."""
    if not key.model:
        raise BadKeyError("key.model is empty")
    if not key.model_version:
        raise BadKeyError("key.model_version is empty")
    if not key.prompt_ids:
        raise BadKeyError("key.prompt_ids is empty")
    digest = hashlib.sha256()
    for part in (key.model.encode(), array("i", key.prompt_ids).tobytes(),
                 key.params.SerializeToString(deterministic=True)):
        digest.update(len(part).to_bytes(8, "little"))  # length-prefixed: no ambiguity
        digest.update(part)
    return EntryKey(tenant=key.tenant, version=key.model_version, digest=digest.hexdigest())
