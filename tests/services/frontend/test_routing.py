"""Routing headers the frontend sets: the prefix key and the A/B bucket."""

from __future__ import annotations

from services.frontend.routing import ab_bucket, prefix_key


def test_prefix_key_covers_only_full_blocks_and_depends_on_the_tenant():
    ids = list(range(100))
    key = prefix_key("t", ids, block_size=16, max_blocks=4)
    # Same first 64 tokens, different tail: same key (same replica, same cached blocks).
    assert prefix_key("t", ids[:64] + [7] * 30, block_size=16, max_blocks=4) == key
    assert prefix_key("t", [9] + ids[1:], block_size=16, max_blocks=4) != key
    assert prefix_key("u", ids, block_size=16, max_blocks=4) != key  # tenants never share KV
    assert prefix_key("t", ids[:15], block_size=16, max_blocks=4) is None  # no full block
    assert prefix_key("t", ids, block_size=16, max_blocks=0) is None


def test_ab_bucket_is_a_stable_uint64():
    bucket = ab_bucket("acme")
    assert bucket == ab_bucket("acme") and bucket != ab_bucket("other")
    assert bucket is not None and 0 <= int(bucket) < 2**64
    assert ab_bucket("") is None
