"""Paged KV-cache bookkeeping: a pool of fixed-size blocks and per-sequence block tables.

Model. Blocks are reference-counted: a block is in as many tables as its count says, so
sequences can share the blocks of a common prefix (engine/memory/prefix_cache.py). A block may
carry a key (what it holds); a keyed block whose count drops to zero stays findable by its key
while it is free. Free blocks are handed out unkeyed ones first (low ids first, the most
recently freed first), then keyed ones least recently freed first (LRU), and a keyed block
that is handed out loses its key: it is evicted from the cache. Without keys (prefix caching
off) every block is in at most one table and the pool is a plain free list.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence


class BlockAllocator:
    """Hands out KV blocks of `block_size` token slots; a sequence's table grows as it does.

    Invariant: every block has a count of the tables holding it; a block with count 0 is in
    exactly one of the free lists (unkeyed, or keyed in LRU order).
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache block pool needs at least one, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._refs = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # unkeyed; pop() gives low ids first
        self._idle: OrderedDict[int, None] = OrderedDict()  # keyed and free, LRU first
        self._block_of: dict[Hashable, int] = {}
        self._key_of: dict[int, Hashable] = {}

    @property
    def num_free(self) -> int:
        """Blocks in no table: unkeyed ones and cached ones that can be evicted."""
        return len(self._free) + len(self._idle)

    @property
    def usage(self) -> float:
        """Fraction of the blocks held by tables (cached free blocks count as free)."""
        return 1.0 - self.num_free / self.num_blocks

    def blocks_needed(self, table: Sequence[int], num_tokens: int) -> int:
        """Blocks to add so that `table` holds `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(table))

    def can_grow(self, table: Sequence[int], num_tokens: int) -> bool:
        return self.blocks_needed(table, num_tokens) <= self.num_free

    def can_share(self, shared: Sequence[int], num_tokens: int) -> bool:
        """Whether a new table can take the `shared` blocks and grow to num_tokens tokens
        (a shared block that is free now leaves the free lists)."""
        reclaimed = sum(1 for block in shared if self._refs[block] == 0)
        return self.blocks_needed(shared, num_tokens) + reclaimed <= self.num_free

    def grow(self, table: list[int], num_tokens: int) -> None:
        """Append blocks to `table` (in place) until it holds `num_tokens` tokens."""
        needed = self.blocks_needed(table, num_tokens)
        if needed > self.num_free:
            raise RuntimeError(f"KV cache block pool exhausted: need {needed}, "
                               f"{self.num_free} free")
        table.extend(self._take() for _ in range(needed))

    def share(self, table: list[int], blocks: Sequence[int]) -> None:
        """Append blocks other tables may hold (cached ones) to `table`, counting it."""
        for block in blocks:
            if self._refs[block] == 0:
                del self._idle[block]
            self._refs[block] += 1
        table.extend(blocks)

    def free(self, table: list[int]) -> None:
        """Drop `table`'s hold on its blocks, last block first: a cached prefix is evicted from
        its tail, so its head (the part other prompts share) stays longest."""
        for block in reversed(table):
            self._refs[block] -= 1
            assert self._refs[block] >= 0, f"KV block {block} freed twice"
            if self._refs[block] == 0:
                if block in self._key_of:
                    self._idle[block] = None
                else:
                    self._free.append(block)
        table.clear()

    def lookup(self, key: Hashable) -> int | None:
        """The block holding `key`, held or free, or None."""
        return self._block_of.get(key)

    def set_key(self, block: int, key: Hashable) -> None:
        """Make a held block findable by `key` (no-op if either is taken already)."""
        assert self._refs[block] > 0, f"KV block {block} is free"
        if key not in self._block_of and block not in self._key_of:
            self._block_of[key] = block
            self._key_of[block] = key

    def _take(self) -> int:
        if self._free:
            block = self._free.pop()
        else:
            block, _ = self._idle.popitem(last=False)
            del self._block_of[self._key_of.pop(block)]
        self._refs[block] = 1
        return block
