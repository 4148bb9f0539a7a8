"""ModelRunner: turns a scheduled Batch into device tensors, runs the model, samples."""

from __future__ import annotations

import functools
import logging
import time

import torch

from engine.batch import AttentionMeta, ForwardContext, StateMeta
from engine.cuda_graphs import DecodeGraphs
from engine.memory import MemoryPlan
from engine.sampler import SampleResult, Sampler
from engine.scheduler import Batch
from engine.worker.memory import allocate_memory
from kernels import LoraMeta

logger = logging.getLogger(__name__)


class ModelRunner:
    """Owns the model, its declared memory (KV caches, states) and the per-step input buffers.

    Step inputs are written into buffers preallocated for the largest step (max tokens, max
    sequences), so a step allocates no device memory and its tensors have fixed addresses.
    With cuda_graphs, decode-only steps replay graphs that read those buffers (cuda_graphs.py).
    """

    def __init__(self, model, plan: MemoryPlan, max_tokens: int, max_seqs: int,
                 max_model_len: int, num_slots: int, device: torch.device,
                 cuda_graphs: bool = False) -> None:
        self.model = model
        self.device = device
        self.block_size = plan.block_size
        self.num_slots = num_slots
        allocated = allocate_memory(model.memory_modules(), plan, device)
        # one block / state slot past the pools': CUDA-graph padding rows write into it
        self.scratch_slot = plan.num_blocks * plan.block_size
        self.scratch_states = dict(plan.state_slots)
        self.max_blocks = -(-max_model_len // plan.block_size)
        self.pinned = device.type == "cuda"
        self._host = self._buffers(max_tokens, max_seqs, self.max_blocks, "cpu")
        self._dev = self._buffers(max_tokens, max_seqs, self.max_blocks, device)
        self.sampler = Sampler()
        logger.info("memory: %s; %.2f GiB allocated", plan.describe(), allocated / 2**30)
        self.graphs = self._capture_graphs(min(max_seqs, max_tokens)) if cuda_graphs else None

    @torch.inference_mode()
    def _capture_graphs(self, max_batch: int) -> DecodeGraphs:
        """One decode graph per batch bucket, from all-padding inputs, LoRA on when enabled."""
        start = time.perf_counter()
        graphs = DecodeGraphs(max_batch, self.device)
        for bucket in reversed(graphs.buckets):
            ctx, input_ids, _ = self._prepare(Batch([]), bucket)
            if self.num_slots:
                slots = [i % self.num_slots for i in range(bucket)]
                ctx.lora = LoraMeta.build(slots, self.num_slots, self.device)
            graphs.capture(bucket, functools.partial(self._all_logits, input_ids, ctx), ctx.lora)
        logger.info("captured %d decode CUDA graphs (batch sizes %s) in %.1f s",
                    len(graphs.buckets), graphs.buckets, time.perf_counter() - start)
        return graphs

    def _all_logits(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """logits [T, V] of every row: what a decode graph computes."""
        return self.model.compute_logits(self.model(input_ids, ctx))

    def _buffers(self, max_tokens: int, max_seqs: int, max_blocks: int, device) -> dict:
        pin = self.pinned and device == "cpu"
        i64, i32 = torch.int64, torch.int32
        states = {f"state:{kind}": torch.zeros(max_seqs, dtype=i32, device=device, pin_memory=pin)
                  for kind in self.scratch_states}
        return states | {
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
        bucket = None if self.graphs is None else self.graphs.bucket(batch)
        ctx, input_ids, rows = self._prepare(batch, bucket)
        if bucket is None:
            out = self.model(input_ids, ctx)  # hidden states [T, H]
        else:
            out = self.graphs.replay(bucket, ctx.lora)  # logits [bucket, V]
        if not rows:  # no host sync this step: wait before the input buffers are rewritten
            if self.pinned:
                torch.cuda.synchronize(self.device)
            return None
        out = out[self._dev["logits_rows"][: len(rows)]]
        logits = self.model.compute_logits(out) if bucket is None else out
        sampling = [item.seq for item in batch.items if item.samples]
        return self.sampler(logits, [s.params for s in sampling], [s.generator for s in sampling])

    def _prepare(self, batch: Batch, bucket: int | None = None,
                 ) -> tuple[ForwardContext, torch.Tensor, list[int]]:
        """Write the step's inputs into the device buffers; with a bucket, pad to that many
        one-token rows and use full-width block tables (the shapes a decode graph holds)."""
        ids, pos, slots, token_slot, rows = [], [], [], [], []
        query_start, query_lens, seq_lens, tables = [0], [], [], []
        states: dict[str, list[int]] = {kind: [] for kind in self.scratch_states}
        bs = self.block_size
        for item in batch.items:
            seq, start = item.seq, item.seq.num_computed
            stop = start + item.num_tokens
            ids += seq.token_range(start, stop)
            pos += range(start, stop)
            slots += [seq.block_table[p // bs] * bs + p % bs for p in range(start, stop)]
            token_slot += [seq.adapter_slot] * item.num_tokens
            for kind, kind_slots in states.items():
                kind_slots.append(seq.state_slots[kind])
            query_start.append(query_start[-1] + item.num_tokens)
            query_lens.append(item.num_tokens)
            seq_lens.append(stop)
            tables.append(seq.block_table)
            if item.samples:
                rows.append(query_start[-1] - 1)
        for _ in range(len(batch.items), bucket or 0):  # padding rows of a graph step
            ids.append(0)
            pos.append(0)
            slots.append(self.scratch_slot)
            token_slot.append(-1)
            query_start.append(query_start[-1] + 1)
            query_lens.append(1)
            seq_lens.append(0)
            tables.append([])
            for kind, kind_slots in states.items():
                kind_slots.append(self.scratch_states[kind])
        num_tokens, num_seqs = len(ids), len(seq_lens)
        self._fill("input_ids", ids)
        self._fill("positions", pos)
        self._fill("slot_mapping", slots)
        self._fill("query_start", query_start)
        self._fill("seq_lens", seq_lens)
        self._fill("logits_rows", rows)
        width = self.max_blocks if bucket else max(len(t) for t in tables)
        d = self._dev
        attn = AttentionMeta(d["slot_mapping"][:num_tokens], d["query_start"][: num_seqs + 1],
                             d["seq_lens"][:num_seqs], self._fill_tables(tables, width),
                             query_lens, seq_lens)
        lora = LoraMeta.build(token_slot, self.num_slots, self.device) if self.num_slots else None
        fresh = [q == n for q, n in zip(query_lens, seq_lens)]
        for kind, kind_slots in states.items():
            self._fill(f"state:{kind}", kind_slots)
        ctx = ForwardContext(d["positions"][:num_tokens], attn, lora, {
            kind: StateMeta(d[f"state:{kind}"][:num_seqs], kind_slots, fresh)
            for kind, kind_slots in states.items()})
        return ctx, d["input_ids"][:num_tokens], rows

    def _fill_tables(self, tables: list[list[int]], width: int) -> torch.Tensor:
        """Block tables [B, width] int32 on the device, padded with block 0."""
        host_tables = self._host["block_tables"][: len(tables), :width]
        host_tables.zero_()
        for i, table in enumerate(tables):
            if table:
                host_tables[i, : len(table)] = torch.tensor(table, dtype=torch.int32)
        dev_tables = self._dev["block_tables"][: len(tables), :width]
        dev_tables.copy_(host_tables, non_blocking=True)
        return dev_tables

    def _fill(self, name: str, values: list[int]) -> None:
        n = len(values)
        if n == 0:
            return
        host = self._host[name][:n]
        host.copy_(torch.tensor(values, dtype=host.dtype))
        self._dev[name][:n].copy_(host, non_blocking=True)
