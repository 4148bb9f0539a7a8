"""Drive the model the way the engine does, without the engine: small paged KV caches, block
tables handed out out of order, and a ForwardContext built by hand for each step."""

from __future__ import annotations

import random
from pathlib import Path

import torch

import kernels
from engine.batch import AttentionMeta, ForwardContext
from engine.config import ModelConfig
from engine.memory import MemoryPlan
from engine.model import MoeForCausalLM, build_model, load_weights
from engine.worker.memory import allocate_memory
from kernels import LoraMeta


def load_model(path: Path, max_loras: int = 0, max_lora_rank: int = 0,
               dtype: torch.dtype = torch.float32, device: str = "cpu",
               backend: str = "auto") -> tuple[MoeForCausalLM, str]:
    """Our model of the checkpoint at `path` and its native expert layout."""
    device = torch.device(device)
    config = ModelConfig.from_pretrained(path)
    ops = kernels.select_ops(device, backend)
    model = build_model(config, dtype, device, ops, max_loras, max_lora_rank)
    return model, load_weights(model, path)


class PagedSession:
    """KV caches for a few sequences; `step` runs one batch of (seq, new tokens, slot)."""

    def __init__(self, model: MoeForCausalLM, block_size: int = 4, num_blocks: int = 32,
                 seed: int = 0) -> None:
        allocate_memory(model.memory_modules(), MemoryPlan(block_size, num_blocks), model.device)
        self.model, self.block_size = model, block_size
        self.free = list(range(1, num_blocks))  # block 0 stays unused: it pads block tables
        random.Random(seed).shuffle(self.free)
        self.blocks: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}

    def _positions(self, seq: int, num_new: int) -> list[int]:
        start = self.lens.get(seq, 0)
        blocks = self.blocks.setdefault(seq, [])
        while len(blocks) * self.block_size < start + num_new:
            blocks.append(self.free.pop())
        self.lens[seq] = start + num_new
        return list(range(start, start + num_new))

    def step(self, chunks: list[tuple[int, list[int], int]]) -> list[torch.Tensor]:
        """chunks: (seq id, new token ids, LoRA slot or -1) -> logits [len(new), V] per chunk."""
        device = self.model.device
        positions = [self._positions(seq, len(tokens)) for seq, tokens, _ in chunks]
        flat_pos = [p for pos in positions for p in pos]
        slot_mapping = [self.blocks[seq][p // self.block_size] * self.block_size
                        + p % self.block_size for (seq, _, _), pos in zip(chunks, positions)
                        for p in pos]
        q_lens = [len(tokens) for _, tokens, _ in chunks]
        seq_lens = [self.lens[seq] for seq, _, _ in chunks]
        width = max(len(self.blocks[seq]) for seq, _, _ in chunks)
        tables = [self.blocks[seq] + [0] * (width - len(self.blocks[seq])) for seq, _, _ in chunks]
        attn = AttentionMeta(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64, device=device),
            query_start=torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
            query_lens_host=q_lens, seq_lens_host=seq_lens)
        token_slots = [slot for (_, tokens, slot) in chunks for _ in tokens]
        lora = (LoraMeta.build(token_slots, self.model.max_loras, device)
                if self.model.max_loras else None)
        ctx = ForwardContext(torch.tensor(flat_pos, dtype=torch.int64, device=device), attn, lora)
        ids = torch.tensor([t for _, tokens, _ in chunks for t in tokens], device=device)
        with torch.inference_mode():
            logits = self.model.compute_logits(self.model(ids, ctx))
        return list(logits.split(q_lens))


def reference_logits(ref, tokens: list[int]) -> torch.Tensor:
    """transformers' logits [L, V] for one sequence, float32."""
    with torch.inference_mode():
        return ref(torch.tensor([tokens])).logits[0].float()
