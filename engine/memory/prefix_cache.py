"""Automatic prefix caching: full KV blocks keyed by what they hold, found again by later
sequences that start with the same tokens under the same weights.

Model. Block i of a sequence (its tokens [i * block_size, (i + 1) * block_size)) is keyed, once
full, by a chain hash:
    key[i] = BLAKE2b-128(key[i - 1], token ids of block i),    key[-1] = identity
The identity names the weights that computed the K/V: the base model, or one adapter
registration (its never-reused id: an in-place reload is a new registration, so the blocks of the
old weights are never found again and age out of the pool). Equal keys mean the same identity and
the same whole prefix. A block gets its key when the step that fills it is scheduled: every layer
writes all of a step's K/V before its attention reads any, so a sequence admitted later in the
same step may already share them. A waiting sequence takes the longest run of its full blocks
whose keys are cached, leaving at least one token to compute (the last position's logits give
the next token) and every prompt position whose prompt logprobs it has still to score, and
prefills only the rest. The pool (kv_blocks.py) counts each block's holders
and evicts free cached blocks least recently freed first.

Counters are vLLM's, in tokens: queries (the tokens of every sequence admitted) and hits (those
found cached); lookups of preempted sequences are left out, so a victim finding its own blocks
again does not inflate the hit rate.
"""

from __future__ import annotations

import hashlib
from array import array

from loramux.engine.memory.kv_blocks import BlockAllocator
from loramux.engine.sequence import Sequence

BASE_IDENTITY = b"base"


def identity(seq: Sequence) -> bytes:
    """What computed the sequence's K/V: the base model or one adapter registration."""
    return BASE_IDENTITY if seq.adapter is None else f"adapter {seq.adapter.key!r}".encode()


class PrefixCache:
    def __init__(self, blocks: BlockAllocator) -> None:
        self.blocks = blocks
        self.queries = 0  # tokens looked up
        self.hits = 0  # tokens found

    def lookup(self, seq: Sequence) -> list[int]:
        """The cached blocks of the longest chain of seq's full blocks, one token short of all
        its tokens at most, and none past the prompt positions it has still to score for
        prompt logprobs (their logits must be computed). Nothing is taken; `count` records
        the lookup once the sequence is admitted."""
        num_blocks = (seq.num_tokens - 1) // self.blocks.block_size
        if seq.prompt_logprobs is not None:
            num_blocks = min(num_blocks, len(seq.prompt_logprobs) // self.blocks.block_size)
        keys = self._keys(seq, num_blocks)
        found: list[int] = []
        for i in range(num_blocks):
            block = self.blocks.lookup(keys[i])
            if block is None:
                break
            found.append(block)
        return found

    def count(self, seq: Sequence, found: list[int]) -> None:
        if not seq.preempted:
            self.queries += seq.num_tokens
            self.hits += len(found) * self.blocks.block_size

    def register(self, seq: Sequence, num_tokens: int) -> None:
        """Key the blocks of seq that num_tokens scheduled tokens fill (those full already at
        seq.num_computed have their keys, or were found cached)."""
        block_size = self.blocks.block_size
        first, stop = seq.num_computed // block_size, num_tokens // block_size
        if first == stop:
            return
        keys = self._keys(seq, stop)
        for i in range(first, stop):
            self.blocks.set_key(seq.block_table[i], keys[i])

    def _keys(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """seq.block_keys, extended to hold the keys of its first num_blocks blocks."""
        keys, block_size = seq.block_keys, self.blocks.block_size
        while len(keys) < num_blocks:
            start = len(keys) * block_size
            digest = hashlib.blake2b(keys[-1] if keys else identity(seq), digest_size=16)
            digest.update(array("i", seq.token_range(start, start + block_size)).tobytes())
            keys.append(digest.digest())
        return keys
