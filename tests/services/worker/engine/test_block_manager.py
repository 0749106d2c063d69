from __future__ import annotations

from services.worker.engine.block_manager import BlockManager, hash_block
from services.worker.engine.params import SamplingParams
from services.worker.engine.request import Request


def req(rid: str, ids: list[int], salt: str = "") -> Request:
    return Request(request_id=rid, prompt_ids=ids, params=SamplingParams(), cache_salt=salt)


def manager(num_blocks: int = 11, block_size: int = 4) -> BlockManager:
    return BlockManager(num_blocks=num_blocks, block_size=block_size,
                        enable_prefix_caching=True)


def compute(bm: BlockManager, r: Request, num_tokens: int) -> list[int]:
    """Allocate and mark ``num_tokens`` more tokens of r as computed."""
    new = bm.allocate(r, num_tokens)
    assert new is not None
    r.num_computed_tokens += num_tokens
    bm.cache_full_blocks(r)
    return new


def test_allocation_takes_lowest_free_ids_in_order():
    bm = manager()
    a = req("a", list(range(10)))
    assert compute(bm, a, 10) == [0, 1, 2]
    assert bm.block_ids("a") == [0, 1, 2]
    assert bm.num_free_blocks == 8
    # Decoding into the partly filled third block needs no new block.
    for token in (97, 98):
        a.append_output(token)
        assert bm.allocate(a, 1) == []
        a.num_computed_tokens += 1
    a.append_output(99)  # the 13th token starts a fourth block
    assert bm.allocate(a, 1) == [3]


def test_ask_then_commit_returns_none_and_changes_nothing():
    bm = manager(num_blocks=3)
    a = req("a", list(range(8)))
    compute(bm, a, 8)
    b = req("b", list(range(100, 108)))
    free_before = bm.free_queue()
    assert bm.allocate(b, 8) is None
    assert bm.free_queue() == free_before
    assert bm.block_ids("b") == []


def test_prefix_hit_shares_full_blocks_only_and_keeps_the_last_token_to_compute():
    bm = manager()
    a = req("a", list(range(10)))
    compute(bm, a, 10)  # blocks 0,1 full and hashed; block 2 partial
    assert bm.num_cached_blocks == 2
    b = req("b", list(range(10)) + [50, 51])
    hit = bm.find_cached_prefix(b)
    assert hit == [0, 1]
    assert bm.allocate(b, 4, hit) == [3]
    assert bm.block_ids("b") == [0, 1, 3]
    assert bm.ref_count(0) == 2 and bm.ref_count(1) == 2
    # A prompt that is exactly two cached blocks reuses only one: its last token
    # (in block 1) must be computed to get logits.
    c = req("c", list(range(8)))
    assert bm.find_cached_prefix(c) == [0]


def test_hash_chain_depends_on_parent_tokens_and_salt():
    h0 = hash_block(b"", [1, 2, 3, 4], "")
    assert h0 == hash_block(b"", [1, 2, 3, 4], "")
    assert h0 != hash_block(b"", [1, 2, 3, 5], "")
    assert h0 != hash_block(b"", [1, 2, 3, 4], "tenant-b")
    assert hash_block(h0, [5, 6, 7, 8], "") != hash_block(b"", [5, 6, 7, 8], "")


def test_different_salts_never_share_blocks():
    bm = manager()
    a = req("a", list(range(12)), salt="tenant-a")
    compute(bm, a, 12)
    b = req("b", list(range(12)), salt="tenant-b")
    assert bm.find_cached_prefix(b) == []
    compute(bm, b, 12)
    assert not set(bm.block_ids("a")) & set(bm.block_ids("b"))
    same = req("c", list(range(12)), salt="tenant-a")
    assert bm.find_cached_prefix(same) == [0, 1]


def test_free_puts_uncached_blocks_first_and_cached_tail_before_head():
    bm = manager(num_blocks=6)
    a = req("a", list(range(10)))
    compute(bm, a, 10)  # blocks 0,1 cached, 2 partial
    bm.free(a)
    # Untouched 3,4,5 and the uncached 2 are reused before cached blocks; among
    # cached ones the tail (1) is evicted before the head (0).
    assert bm.free_queue() == [2, 3, 4, 5, 1, 0]
    assert bm.num_cached_blocks == 2


def test_eviction_order_is_lru_and_evicted_hash_is_forgotten():
    bm = manager(num_blocks=4)
    a = req("a", [1, 2, 3, 4, 9])
    compute(bm, a, 5)  # blocks [0, 1]; 0 cached
    bm.free(a)
    assert bm.free_queue() == [1, 2, 3, 0]
    b = req("b", [5, 6, 7, 8, 9])
    assert compute(bm, b, 5) == [1, 2]  # 1 cached
    bm.free(b)
    assert bm.free_queue() == [2, 3, 0, 1]  # a's cached block was released first
    c = req("c", list(range(100, 112)))
    assert compute(bm, c, 12) == [2, 3, 0]  # evicts a's block, keeps b's
    assert bm.find_cached_prefix(req("a2", [1, 2, 3, 4, 7])) == []
    assert bm.find_cached_prefix(req("b2", [5, 6, 7, 8, 7])) == [1]


def test_reusing_a_free_cached_block_removes_it_from_the_free_queue():
    bm = manager(num_blocks=4)
    a = req("a", [1, 2, 3, 4, 9])
    compute(bm, a, 5)
    bm.free(a)
    b = req("b", [1, 2, 3, 4, 5, 6])
    hit = bm.find_cached_prefix(b)
    assert hit == [0]
    assert bm.allocate(b, 2, hit) == [1]
    assert bm.free_queue() == [2, 3]
    assert bm.ref_count(0) == 1
    # Ask-then-commit counts a reclaimed cached block against the free pool.
    bm.free(b)
    c = req("c", [1, 2, 3, 4] + list(range(20, 32)))
    hit = bm.find_cached_prefix(c)
    assert hit == [0]
    assert bm.allocate(c, 12, hit) == [1, 2, 3]
    assert bm.num_free_blocks == 0
