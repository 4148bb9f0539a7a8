"""Paged KV-cache bookkeeping: a pool of fixed-size blocks and per-sequence block tables."""

from __future__ import annotations

from loramux.engine.memory.id_pool import IdPool


class BlockAllocator:
    """Hands out KV blocks of `block_size` token slots; a sequence's table grows as it does.

    Invariant: every block is either free or in exactly one sequence's table.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._blocks = IdPool("KV cache block", num_blocks)

    @property
    def num_free(self) -> int:
        return self._blocks.num_free

    @property
    def usage(self) -> float:
        return self._blocks.usage

    def blocks_needed(self, table: list[int], num_tokens: int) -> int:
        """Blocks to add so that `table` holds `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(table))

    def can_grow(self, table: list[int], num_tokens: int) -> bool:
        return self.blocks_needed(table, num_tokens) <= self.num_free

    def grow(self, table: list[int], num_tokens: int) -> None:
        """Append blocks to `table` (in place) until it holds `num_tokens` tokens."""
        table.extend(self._blocks.allocate(self.blocks_needed(table, num_tokens)))

    def free(self, table: list[int]) -> None:
        self._blocks.free(table)
        table.clear()
