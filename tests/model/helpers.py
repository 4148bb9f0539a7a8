"""Drive the model the way the engine does, without the engine: small paged KV caches, block
tables handed out out of order, and a StepPlan built by hand for each step."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from loramux import kernels
from loramux.engine.config import ModelConfig
from loramux.engine.memory import MemoryPlan
from loramux.engine.model import MoeForCausalLM, build_model, load_weights
from loramux.engine.plan import StepPlan
from loramux.engine.worker.inputs import StepInputs
from loramux.engine.worker.memory import allocate_memory


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
        memory = MemoryPlan(block_size, num_blocks)
        allocate_memory(model.memory_modules(), memory, model.device)
        self.inputs = StepInputs(memory, max_tokens=1024, max_seqs=32,
                                 max_model_len=num_blocks * block_size,
                                 num_adapter_slots=model.max_loras, device=model.device)
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
        plan = StepPlan([], [], [], [], [], [])
        for seq, tokens, slot in chunks:
            plan.positions += self._positions(seq, len(tokens))
            plan.token_ids += tokens
            plan.adapter_slots += [slot] * len(tokens)
            plan.query_lens.append(len(tokens))
            plan.context_lens.append(self.lens[seq])
            plan.block_tables.append(self.blocks[seq])
        ctx, ids, _ = self.inputs.prepare(plan)
        with torch.inference_mode():
            logits = self.model.compute_logits(self.model(ids, ctx))
        return list(logits.split(plan.query_lens))


def reference_logits(ref, tokens: list[int]) -> torch.Tensor:
    """transformers' logits [L, V] for one sequence, float32."""
    with torch.inference_mode():
        return ref(torch.tensor([tokens])).logits[0].float()
