"""Worker: owns everything on the device and executes StepPlans.

The model and its weights, the per-sequence memory it declares (KV caches, states), the adapter
slot buffers, the step input buffers, the decode CUDA graphs, the sampler, each sequence's
torch.Generator and, for sequences with logits processors, their output tokens. Nothing else
crosses: AdapterOps and StepPlans come in (engine/plan.py), SampleResults go out. Build it,
size memory with `plan_memory` (or take a plan made elsewhere), `allocate(plan)`, then per step
`apply(ops)` and `execute(plan)`.
"""

from __future__ import annotations

import functools
import logging
import time

import torch

from loramux.engine.config import EngineConfig, ModelConfig, parse_dtype
from loramux.engine.memory import MemoryPlan, device_budget, plan_memory
from loramux.engine.memory.plan import state_kinds
from loramux.engine.model import build_model, load_weights
from loramux.engine.model.forward import ForwardContext
from loramux.engine.model.parallel import Shard, reduce_count
from loramux.engine.plan import AdapterOp, SampleResult, SampleRow, StepPlan, WriteAdapter
from loramux.engine.worker.cuda_graphs import DecodeGraphs
from loramux.engine.worker.inputs import StepInputs
from loramux.engine.worker.logits_processors import OutputHistory
from loramux.engine.worker.prompt_logprobs import score_prompt_tokens
from loramux.engine.worker.memory import allocate_memory
from loramux.engine.worker.profile_run import largest_step
from loramux.engine.worker.sampler import Sampler
from loramux.kernels import select_ops

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, model_config: ModelConfig, device: torch.device) -> torch.dtype:
    """auto: the checkpoint's dtype on CUDA, float32 on CPU (CPUs lack fast bf16)."""
    if name != "auto":
        return parse_dtype(name)
    if device.type == "cpu":
        return torch.float32
    return parse_dtype(model_config.torch_dtype or "bfloat16")


class Worker:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, max_model_len: int,
                 shard: Shard = Shard()) -> None:
        self.config = config
        self.max_model_len = max_model_len
        self.shard = shard
        self.device = resolve_device(config.device)
        if self.device.type == "cuda" and shard.active:  # rank r drives GPU r
            self.device = torch.device("cuda", shard.rank)
        self.dtype = resolve_dtype(config.dtype, model_config, self.device)
        torch.manual_seed(config.seed)
        self.num_adapter_slots = config.lora.num_slots
        self.ops = select_ops(self.device, config.kernel_backend)
        self.model = build_model(model_config, self.dtype, self.device, self.ops,
                                 max_loras=self.num_adapter_slots,
                                 max_lora_rank=config.lora.max_lora_rank, shard=shard)
        self.native_layout = load_weights(self.model, config.model, config.load_format)
        self.sampler = Sampler()
        self._generators: dict[int, torch.Generator] = {}
        self._histories: dict[int, OutputHistory] = {}
        self.inputs: StepInputs | None = None
        self.graphs: DecodeGraphs | None = None
        self.activation_bytes = 0  # what the memory plan left for activations (profile run)

    def plan_memory(self) -> MemoryPlan:
        """Size every pool from what the model declares and the device memory left now, less
        the activations of the largest step (measured by a profile run on CUDA)."""
        specs = [module.memory_spec() for module in self.model.memory_modules()]
        trial_bytes = activations = 0
        if self.device.type == "cuda":  # elsewhere the budget is a setting, not what is free
            trial_bytes, activations = self.profile_run(list(state_kinds(specs)))
        self.activation_bytes = activations
        # the trial pools count as used until allocate() replaces them: add them back
        budget = device_budget(self.config.cache, self.device) + trial_bytes - activations
        plan = plan_memory(specs, self.config.cache, budget, self.max_model_len,
                           self.config.scheduler.max_num_seqs, self.num_adapter_slots)
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        logger.info("memory plan: weights %.2f GiB, %d adapter slots %.2f GiB, activations "
                    "%.2f GiB (profile run of a %d-token step), %s", weights / 2**30,
                    self.num_adapter_slots,
                    self.num_adapter_slots * self.model.adapter_slot_bytes() / 2**30,
                    activations / 2**30, self.config.scheduler.max_num_batched_tokens,
                    plan.describe())
        return plan

    @torch.inference_mode()
    def profile_run(self, kinds: list[str]) -> tuple[int, int]:
        """Run the largest step the scheduler may build (engine/worker/profile_run.py) on
        throwaway pools; returns the pools' bytes and the step's peak activation bytes (0 off
        CUDA, where memory is not measured). The pools stay bound until `allocate`."""
        sched = self.config.scheduler
        memory, step = largest_step(sched.max_num_batched_tokens, sched.max_num_seqs,
                                    self.max_model_len, self.config.cache.block_size, kinds,
                                    self.num_adapter_slots)
        trial_bytes = allocate_memory(self.model.memory_modules(), memory, self.device)
        self.inputs = StepInputs(memory, sched.max_num_batched_tokens, sched.max_num_seqs,
                                 self.max_model_len, self.num_adapter_slots, self.device)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
        self.execute(step)
        self.inputs = None
        if not cuda:
            return trial_bytes, 0
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        torch.cuda.empty_cache()
        return trial_bytes, peak

    def allocate(self, plan: MemoryPlan) -> None:
        """Allocate the planned memory and the step buffers, and capture the decode graphs."""
        allocated = allocate_memory(self.model.memory_modules(), plan, self.device)
        sched = self.config.scheduler
        self.inputs = StepInputs(plan, sched.max_num_batched_tokens, sched.max_num_seqs,
                                 self.max_model_len, self.num_adapter_slots, self.device)
        logger.info("memory: %s; %.2f GiB allocated", plan.describe(), allocated / 2**30)
        use_graphs = (self.device.type == "cuda" and self.ops.CUDA_GRAPH_SAFE
                      and not self.config.enforce_eager)
        if use_graphs:
            self.graphs = self.capture_graphs(min(sched.max_num_seqs,
                                                  sched.max_num_batched_tokens))

    def summary(self) -> dict:
        """What this rank holds: the shapes of its parameters, slot buffers and per-sequence
        memory (KV caches, states), its weight bytes and the all_reduces of its process."""
        shapes = {name: tuple(t.shape) for name, t in [*self.model.named_parameters(),
                                                       *self.model.named_buffers()]}
        memory = [tuple(t.shape) for m in self.model.memory_modules()
                  for t in (getattr(m, "k_cache", None), getattr(m, "recurrent_state", None))
                  if t is not None]
        return {"rank": self.shard.rank, "shapes": shapes, "memory": memory,
                "weight_bytes": sum(p.numel() * p.element_size()
                                    for p in self.model.parameters()),
                "all_reduces": reduce_count()}

    def shutdown(self) -> None:
        """Nothing to stop: an in-process worker is released with the engine."""

    def apply(self, ops: list[AdapterOp]) -> None:
        """Write or clear adapter slots, in order."""
        for op in ops:
            if isinstance(op, WriteAdapter):
                self.model.write_lora_slot(op.slot, op.weights)
            else:
                self.model.clear_lora_slot(op.slot)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> SampleResult | None:
        """Run one step; returns the sampled tokens of the plan's sampling rows, in order."""
        for seq_id in plan.released:
            self._generators.pop(seq_id, None)
            self._histories.pop(seq_id, None)
        eager = self.graphs is None or plan.prompt_logprobs  # graphs keep sampling rows only
        bucket = None if eager else self.graphs.bucket(plan)
        ctx, input_ids, num_rows = self.inputs.prepare(plan, bucket)
        if bucket is None:
            out = self.model(input_ids, ctx)  # hidden states [T, H]
        else:
            out = self.graphs.replay(bucket)  # logits [bucket, V]
        scored = (score_prompt_tokens(out, plan, self.model.compute_logits)
                  if plan.prompt_logprobs else [])
        if not num_rows:  # no host sync this step: wait before the input buffers are rewritten
            if self.inputs.pinned:
                torch.cuda.synchronize(self.device)
            return SampleResult([], [], [], scored) if scored else None
        out = out[self.inputs.logits_rows(num_rows)]
        logits = self.model.compute_logits(out) if bucket is None else out
        result = self._sample(logits, plan.samples)
        result.prompt_logprobs = scored
        return result

    def _sample(self, logits: torch.Tensor, rows: list[SampleRow]) -> SampleResult:
        """Sample every row; rows with processors get their sampled token in their history."""
        processed = [(i, row.processors, self._histories.setdefault(row.seq_id, OutputHistory()))
                     for i, row in enumerate(rows) if row.processors is not None]
        result = self.sampler(logits, [row.params for row in rows],
                              [self._generator(row) for row in rows],
                              [row.token_mask for row in rows], processed)
        for i, _, history in processed:
            history.append(result.token_ids[i])
        return result

    def _generator(self, row: SampleRow) -> torch.Generator | None:
        """The sequence's generator, seeded on its first draw (None for greedy rows)."""
        if row.seed is None:
            return None
        generator = self._generators.get(row.seq_id)
        if generator is None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(row.seed)
            self._generators[row.seq_id] = generator
        return generator

    @torch.inference_mode()
    def capture_graphs(self, max_batch: int) -> DecodeGraphs:
        """One decode graph per batch bucket, from all-padding inputs, LoRA on when enabled."""
        start = time.perf_counter()
        graphs = DecodeGraphs(max_batch, self.device)
        empty = StepPlan([], [], [], [], [], [])
        for bucket in reversed(graphs.buckets):
            ctx, input_ids, _ = self.inputs.prepare(empty, bucket)
            if self.num_adapter_slots:  # the same buffers prepare fills for `bucket` tokens
                ctx.lora = self.inputs.lora.fill([i % self.num_adapter_slots
                                                  for i in range(bucket)])
            graphs.capture(bucket, functools.partial(self._all_logits, input_ids, ctx))
        logger.info("captured %d decode CUDA graphs (batch sizes %s) in %.1f s",
                    len(graphs.buckets), graphs.buckets, time.perf_counter() - start)
        return graphs

    def _all_logits(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """logits [T, V] of every row: what a decode graph computes."""
        return self.model.compute_logits(self.model(input_ids, ctx))
