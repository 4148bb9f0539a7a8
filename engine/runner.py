"""ModelRunner: turns a scheduled Batch into device tensors, runs the model, samples."""

from __future__ import annotations

import logging

import torch

from engine.batch import AttentionMeta, ForwardContext
from engine.config import CacheConfig, ModelConfig
from engine.errors import ModelLoadError
from engine.sampler import SampleResult, Sampler
from engine.scheduler import Batch
from kernels import LoraMeta

logger = logging.getLogger(__name__)


def kv_block_bytes(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of K and V for one block over all layers."""
    per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim
    return per_token * block_size * torch.empty((), dtype=dtype).element_size()


def choose_num_blocks(config: ModelConfig, cache: CacheConfig, dtype: torch.dtype,
                      device: torch.device, max_model_len: int, max_num_seqs: int) -> int:
    """KV blocks to allocate: an explicit count, else what the memory budget allows, but never
    more than max_num_seqs sequences of max_model_len tokens can use."""
    if cache.num_blocks is not None:
        return cache.num_blocks
    budget = cache.kv_cache_memory_gb * 2**30
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = free - (1 - cache.gpu_memory_utilization) * total
    per_seq = -(-max_model_len // cache.block_size)
    blocks = min(int(budget // kv_block_bytes(config, cache.block_size, dtype)),
                 per_seq * max_num_seqs)
    if blocks < per_seq:
        raise ModelLoadError(
            f"the KV cache budget ({budget / 2**30:.2f} GiB) holds {max(blocks, 0)} blocks of "
            f"{cache.block_size} tokens, fewer than one {max_model_len}-token sequence needs; "
            "lower --max-model-len or give the cache more memory")
    return blocks


class ModelRunner:
    """Owns the model, its KV cache and the per-step input buffers.

    Step inputs are written into buffers preallocated for the largest step (max tokens, max
    sequences), so a step allocates no device memory and its tensors have fixed addresses.
    """

    def __init__(self, model, model_config: ModelConfig, cache: CacheConfig, num_blocks: int,
                 max_tokens: int, max_seqs: int, max_model_len: int, num_slots: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.model = model
        self.device = device
        self.block_size = cache.block_size
        self.num_slots = num_slots
        layers, kv_heads, head_dim = model.kv_cache_spec()
        shape = (num_blocks, cache.block_size, kv_heads, head_dim)
        self.k_caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v_caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        model.bind_kv_cache(self.k_caches, self.v_caches)
        max_blocks = -(-max_model_len // cache.block_size)
        self.pinned = device.type == "cuda"
        self._host = self._buffers(max_tokens, max_seqs, max_blocks, "cpu")
        self._dev = self._buffers(max_tokens, max_seqs, max_blocks, device)
        self.sampler = Sampler()
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB)", num_blocks, cache.block_size,
                    2 * layers * torch.zeros(shape, dtype=dtype, device="meta").nbytes / 2**30)

    def _buffers(self, max_tokens: int, max_seqs: int, max_blocks: int, device) -> dict:
        pin = self.pinned and device == "cpu"
        i64, i32 = torch.int64, torch.int32
        return {
            "input_ids": torch.zeros(max_tokens, dtype=i64, device=device, pin_memory=pin),
            "positions": torch.zeros(max_tokens, dtype=i64, device=device, pin_memory=pin),
            "slot_mapping": torch.zeros(max_tokens, dtype=i64, device=device, pin_memory=pin),
            "query_start": torch.zeros(max_seqs + 1, dtype=i32, device=device, pin_memory=pin),
            "seq_lens": torch.zeros(max_seqs, dtype=i32, device=device, pin_memory=pin),
            "block_tables": torch.zeros(max_seqs, max_blocks, dtype=i32, device=device,
                                        pin_memory=pin),
            "logits_rows": torch.zeros(max_seqs, dtype=i64, device=device, pin_memory=pin),
        }

    @torch.inference_mode()
    def run(self, batch: Batch) -> SampleResult | None:
        """Run one step; returns the sampled tokens of the sequences that sample, in order."""
        ctx, input_ids, rows = self._prepare(batch)
        hidden = self.model(input_ids, ctx)
        if not rows:  # no host sync this step: wait before the input buffers are rewritten
            if self.pinned:
                torch.cuda.synchronize(self.device)
            return None
        logits = self.model.compute_logits(hidden[self._dev["logits_rows"][: len(rows)]])
        sampling = [item.seq for item in batch.items if item.samples]
        return self.sampler(logits, [s.params for s in sampling], [s.generator for s in sampling])

    def _prepare(self, batch: Batch) -> tuple[ForwardContext, torch.Tensor, list[int]]:
        ids, pos, slots, token_slot, rows = [], [], [], [], []
        query_start, seq_lens, tables = [0], [], []
        bs = self.block_size
        for item in batch.items:
            seq, start = item.seq, item.seq.num_computed
            stop = start + item.num_tokens
            ids += seq.token_range(start, stop)
            pos += range(start, stop)
            slots += [seq.block_table[p // bs] * bs + p % bs for p in range(start, stop)]
            token_slot += [seq.slot] * item.num_tokens
            query_start.append(query_start[-1] + item.num_tokens)
            seq_lens.append(stop)
            tables.append(seq.block_table)
            if item.samples:
                rows.append(query_start[-1] - 1)
        num_tokens, num_seqs = len(ids), len(batch.items)
        self._fill("input_ids", ids)
        self._fill("positions", pos)
        self._fill("slot_mapping", slots)
        self._fill("query_start", query_start)
        self._fill("seq_lens", seq_lens)
        self._fill("logits_rows", rows)
        width = max(len(t) for t in tables)
        host_tables = self._host["block_tables"][:num_seqs, :width]
        host_tables.zero_()
        for i, table in enumerate(tables):
            host_tables[i, : len(table)] = torch.tensor(table, dtype=torch.int32)
        dev_tables = self._dev["block_tables"][:num_seqs, :width]
        dev_tables.copy_(host_tables, non_blocking=True)
        d = self._dev
        attn = AttentionMeta(d["slot_mapping"][:num_tokens], d["query_start"][: num_seqs + 1],
                             d["seq_lens"][:num_seqs], dev_tables,
                             [item.num_tokens for item in batch.items], seq_lens)
        lora = LoraMeta.build(token_slot, self.num_slots, self.device) if self.num_slots else None
        ctx = ForwardContext(d["positions"][:num_tokens], attn, lora)
        return ctx, d["input_ids"][:num_tokens], rows

    def _fill(self, name: str, values: list[int]) -> None:
        n = len(values)
        if n == 0:
            return
        host = self._host[name][:n]
        host.copy_(torch.tensor(values, dtype=host.dtype))
        self._dev[name][:n].copy_(host, non_blocking=True)
