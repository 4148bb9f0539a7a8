"""Paged KV-cache bookkeeping: a free list of fixed-size blocks and per-sequence block tables."""

from __future__ import annotations


class BlockAllocator:
    """Hands out KV blocks of `block_size` token slots; a sequence's table grows as it does.

    Invariant: every block is either in the free list or in exactly one sequence's table.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def blocks_needed(self, table: list[int], num_tokens: int) -> int:
        """Blocks to add so that `table` holds `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(table))

    def can_grow(self, table: list[int], num_tokens: int) -> bool:
        return self.blocks_needed(table, num_tokens) <= self.num_free

    def grow(self, table: list[int], num_tokens: int) -> None:
        """Append blocks to `table` (in place) until it holds `num_tokens` tokens."""
        needed = self.blocks_needed(table, num_tokens)
        if needed > self.num_free:
            raise RuntimeError(f"KV cache exhausted: need {needed} blocks, {self.num_free} free")
        table.extend(self._free.pop() for _ in range(needed))

    def free(self, table: list[int]) -> None:
        self._free.extend(reversed(table))
        table.clear()
