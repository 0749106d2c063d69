"""The KV block pool: the only owner of block ids, ref counts and the prefix cache.

A block holds the KV of ``block_size`` consecutive tokens of one sequence. A *full*
block whose tokens are computed gets a hash chained over its parent block's hash, its
token ids and the request's cache salt, so two requests share a block only when they
share the whole prefix up to it *and* the salt (tenants never share KV).

Free blocks sit in one LRU queue: blocks without a hash at the front (reused first),
cached blocks after them in the order they were released. Taking a cached block off
the queue for a new use evicts its hash. Allocation is ask-then-commit: ``allocate``
returns ``None`` and changes nothing when the pool cannot cover the request.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from services.worker.engine.request import Request


def hash_block(parent: bytes, token_ids: list[int], cache_salt: str) -> bytes:
    """The chained hash of one full block (16 bytes)."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(cache_salt.encode())
    h.update(b"\x00")
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class BlockManager:
    def __init__(self, *, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_cnt = [0] * num_blocks
        self._hash: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}  # block hash -> block id
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self._tables: dict[str, list[int]] = {}  # request id -> its block ids, in order
        self._num_hashed: dict[str, int] = {}  # request id -> leading blocks registered

    # -- queries ---------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (including evictable cached ones)."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def block_ids(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def ref_count(self, block_id: int) -> int:
        return self._ref_cnt[block_id]

    def free_queue(self) -> list[int]:
        """Free block ids in eviction order (first is reused first); for tests and stats."""
        return list(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache ----------------------------------------------------------------

    def _extend_hashes(self, req: Request, num_full_blocks: int) -> None:
        """Make ``req.block_hashes`` cover its first ``num_full_blocks`` full blocks."""
        bs = self.block_size
        hashes = req.block_hashes
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else b""
            hashes.append(hash_block(parent, req.all_ids[i * bs:(i + 1) * bs], req.cache_salt))

    def find_cached_prefix(self, req: Request) -> list[int]:
        """Blocks holding the longest cached prefix of ``req`` (nothing is committed).

        At most ``num_tokens - 1`` tokens are taken from the cache: the last token must
        be computed to produce logits, and a block is reused whole or not at all.
        """
        if not self.enable_prefix_caching:
            return []
        max_blocks = (req.num_tokens - 1) // self.block_size
        self._extend_hashes(req, max_blocks)
        hit = []
        for block_hash in req.block_hashes[:max_blocks]:
            block = self._cached.get(block_hash)
            if block is None:
                break
            hit.append(block)
        return hit

    def cache_full_blocks(self, req: Request) -> None:
        """Register the hashes of blocks of ``req`` that became full and computed."""
        if not self.enable_prefix_caching:
            return
        table = self._tables[req.request_id]
        num_full = min(req.num_computed_tokens // self.block_size, len(table))
        start = self._num_hashed.get(req.request_id, 0)
        if num_full <= start:
            return
        self._extend_hashes(req, num_full)
        for i in range(start, num_full):
            block, block_hash = table[i], req.block_hashes[i]
            if self._hash[block] is None and block_hash not in self._cached:
                self._hash[block] = block_hash
                self._cached[block_hash] = block
            # else: the same content already lives in another block; keep that one.
        self._num_hashed[req.request_id] = num_full

    # -- allocation ------------------------------------------------------------------

    def allocate(self, req: Request, num_new_tokens: int,
                 cached_blocks: list[int] | None = None) -> list[int] | None:
        """Give ``req`` blocks for ``num_new_tokens`` more tokens, after any
        ``cached_blocks`` (from ``find_cached_prefix``, only on a first allocation).

        Returns the newly allocated block ids, or ``None`` (and changes nothing) when the
        pool cannot cover them.
        """
        cached_blocks = cached_blocks or []
        table = self._tables.get(req.request_id, [])
        if cached_blocks and table:
            raise ValueError("cached blocks can only start a request's block table")
        num_new_blocks = self._num_new_blocks(req, num_new_tokens, cached_blocks)
        if self.shortfall(req, num_new_tokens, cached_blocks) > 0:
            return None

        table = self._tables.setdefault(req.request_id, table)
        for block in cached_blocks:
            if self._ref_cnt[block] == 0:
                del self._free[block]
            self._ref_cnt[block] += 1
            table.append(block)
        if cached_blocks:
            self._num_hashed[req.request_id] = len(cached_blocks)
        new_blocks = []
        for _ in range(max(num_new_blocks, 0)):
            block, _ = self._free.popitem(last=False)
            self._evict(block)
            self._ref_cnt[block] = 1
            new_blocks.append(block)
        table.extend(new_blocks)
        return new_blocks

    def _num_new_blocks(self, req: Request, num_new_tokens: int,
                        cached_blocks: list[int]) -> int:
        num_tokens_after = (
            req.num_computed_tokens + len(cached_blocks) * self.block_size + num_new_tokens
        )
        table = self._tables.get(req.request_id, [])
        return self.blocks_needed(num_tokens_after) - len(table) - len(cached_blocks)

    def blocks_for(self, req: Request, num_new_tokens: int,
                   cached_blocks: list[int] | None = None) -> int:
        """How many free blocks ``allocate(req, num_new_tokens, cached_blocks)`` would
        take: new ones, and cached ones nobody uses (they sit in the free queue)."""
        cached_blocks = cached_blocks or []
        num_reclaimed = sum(1 for b in cached_blocks if self._ref_cnt[b] == 0)
        return max(0, self._num_new_blocks(req, num_new_tokens, cached_blocks)) + num_reclaimed

    def shortfall(self, req: Request, num_new_tokens: int,
                  cached_blocks: list[int] | None = None) -> int:
        """How many more free blocks ``allocate`` would need to succeed (0: it would)."""
        return max(0, self.blocks_for(req, num_new_tokens, cached_blocks) - len(self._free))

    def num_slots(self, req: Request, num_new_blocks: int) -> int:
        """Tokens ``req`` could compute after its computed ones in its blocks and
        ``num_new_blocks`` more."""
        num_blocks = len(self._tables.get(req.request_id, [])) + num_new_blocks
        return num_blocks * self.block_size - req.num_computed_tokens

    def num_exclusive_blocks(self, req: Request) -> int:
        """Blocks that freeing ``req`` would return to the pool (those no one else holds)."""
        return sum(1 for b in self._tables.get(req.request_id, []) if self._ref_cnt[b] == 1)

    def _evict(self, block: int) -> None:
        block_hash = self._hash[block]
        if block_hash is not None:
            if self._cached.get(block_hash) == block:
                del self._cached[block_hash]
            self._hash[block] = None

    def free(self, req: Request) -> None:
        """Release every block of ``req``. Tail blocks go first so that, among cached
        blocks, a sequence's shared head outlives its private tail."""
        table = self._tables.pop(req.request_id, [])
        self._num_hashed.pop(req.request_id, None)
        for block in reversed(table):
            self._ref_cnt[block] -= 1
            if self._ref_cnt[block] == 0:
                self._free[block] = None
                if self._hash[block] is None:
                    self._free.move_to_end(block, last=False)  # nothing to keep: reuse first

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (used blocks keep their data)."""
        for block_hash, block in list(self._cached.items()):
            self._hash[block] = None
            del self._cached[block_hash]
