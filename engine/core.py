"""EngineCore: the synchronous engine. add_request / abort / step; no threads of its own."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import torch

from engine.config import EngineConfig, ModelConfig, parse_dtype
from engine.detokenizer import IncrementalDetokenizer
from engine.errors import (AdapterLoadError, EngineOverloaded, InvalidRequest, NonFiniteOutput,
                           PromptTooLong)
from engine.lora.manager import AdapterHandle, LoraManager
from engine.memory import MemoryPools, device_budget, plan_memory
from engine.model import build_model, load_weights
from engine.outputs import RequestState
from engine.request import LoRARequest, RequestOutput, SamplingParams, TokenLogprob
from engine.runner import ModelRunner
from engine.sampler import SampleResult
from engine.scheduler import Batch, Scheduler
from engine.sequence import Sequence
from engine.tokenizer import eos_token_ids, load_tokenizer
from kernels import select_ops

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


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.model_config = ModelConfig.from_pretrained(config.model)
        self.dtype = resolve_dtype(config.dtype, self.model_config, self.device)
        torch.manual_seed(config.seed)
        self._rng = random.Random(config.seed)
        self.max_model_len = self._max_model_len()
        lora = config.lora
        num_slots = lora.max_loras if lora.enabled else 0
        ops = select_ops(self.device, config.kernel_backend)
        self.model = build_model(self.model_config, self.dtype, self.device, ops,
                                 max_loras=num_slots, max_lora_rank=lora.max_lora_rank)
        self.native_layout = load_weights(self.model, config.model, config.load_format)
        sched = config.scheduler
        specs = [module.memory_spec() for module in self.model.memory_modules()]
        plan = plan_memory(specs, config.cache, device_budget(config.cache, self.device),
                           self.max_model_len, sched.max_num_seqs, num_slots)
        self.pools = MemoryPools(plan)
        cuda_graphs = (self.device.type == "cuda" and ops.CUDA_GRAPH_SAFE
                       and not config.enforce_eager)
        self.runner = ModelRunner(self.model, plan, sched.max_num_batched_tokens,
                                  sched.max_num_seqs, self.max_model_len, num_slots,
                                  self.device, cuda_graphs)
        self.lora = (LoraManager(lora, self.model_config, self.model, self.native_layout,
                                 self.pools.adapters, config.model) if lora.enabled else None)
        self.scheduler = Scheduler(sched, self.pools, self.lora)
        self.tokenizer = load_tokenizer(config.tokenizer or config.model)
        self.eos_ids = eos_token_ids(config.model, self.model_config, self.tokenizer)
        self.requests: dict[str, RequestState] = {}
        self._next_seq_id = 0
        logger.info("engine ready: %s (%s, %s) on %s, max_model_len %d, LoRA slots %d",
                    Path(config.model).name, self.model_config.architecture, self.dtype,
                    self.device, self.max_model_len, num_slots)

    def _max_model_len(self) -> int:
        limit = self.model_config.max_position_embeddings
        wanted = self.config.scheduler.max_model_len or limit
        if wanted > limit:
            raise ValueError(f"max_model_len {wanted} exceeds the model's "
                             f"max_position_embeddings {limit}")
        return wanted

    # --- requests --------------------------------------------------------------------------
    def make_request(self, request_id: str, prompt: list[int], params: SamplingParams,
                     lora: AdapterHandle | None) -> RequestState:
        """Validate a request and build its sequences (touches no engine state)."""
        if request_id in self.requests:
            raise InvalidRequest(f"request id {request_id!r} is already in use")
        if not prompt:
            raise InvalidRequest("the prompt is empty")
        vocab = self.model_config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise InvalidRequest(f"prompt token ids must be in [0, {vocab})")
        max_tokens = self._max_tokens(len(prompt), params)
        seqs = [self._sequence(request_id, i, prompt, params, lora, max_tokens)
                for i in range(params.n)]
        return RequestState(request_id, list(prompt), seqs,
                            None if lora is None else lora.name)

    def _max_tokens(self, prompt_len: int, params: SamplingParams) -> int:
        limit = self.max_model_len
        max_tokens = params.max_tokens if params.max_tokens is not None else limit - prompt_len
        if prompt_len + max(max_tokens, 1) > limit:
            raise PromptTooLong(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} "
                "for the completion). Please reduce the length of the prompt or completion.")
        blocks = self.pools.blocks
        if blocks.blocks_needed([], prompt_len + max_tokens) > blocks.num_blocks:
            raise PromptTooLong(
                f"the request needs {prompt_len + max_tokens} tokens of KV cache but the cache "
                f"holds {blocks.num_blocks * blocks.block_size}")
        return max_tokens

    def _sequence(self, request_id: str, index: int, prompt: list[int], params: SamplingParams,
                  lora: AdapterHandle | None, max_tokens: int) -> Sequence:
        generator = None
        if not params.is_greedy:
            generator = torch.Generator(device=self.device)
            seed = params.seed + index if params.seed is not None else self._rng.getrandbits(63)
            generator.manual_seed(seed)
        detok = IncrementalDetokenizer(self.tokenizer, prompt, params.stop,
                                       params.skip_special_tokens,
                                       params.include_stop_str_in_output)
        self._next_seq_id += 1
        return Sequence(self._next_seq_id, request_id, index, list(prompt), params, lora, detok,
                        max_tokens, generator)

    def add(self, state: RequestState) -> None:
        if len(self.scheduler.waiting) >= self.config.scheduler.max_waiting:
            raise EngineOverloaded("the server is overloaded: too many queued requests")
        self.requests[state.request_id] = state
        for seq in state.seqs:
            self.scheduler.add(seq)

    def add_request(self, request_id: str, prompt: list[int], params: SamplingParams,
                    lora: LoRARequest | str | None = None) -> RequestState:
        state = self.make_request(request_id, prompt, params, self.resolve_lora(lora))
        self.add(state)
        return state

    def resolve_lora(self, lora: LoRARequest | str | None) -> AdapterHandle | None:
        """A handle for a registered adapter name, or register a LoRARequest (offline API)."""
        if lora is None:
            return None
        if self.lora is None:
            raise AdapterLoadError("LoRA is not enabled on this engine (use --enable-lora)")
        if isinstance(lora, str):
            return self.lora.resolve(lora)
        if lora.lora_name not in {r.lora_name for r in self.lora.list()}:
            self.lora.register(lora, self.lora.read(lora))
        return self.lora.resolve(lora.lora_name)

    def abort(self, request_id: str) -> RequestOutput | None:
        state = self.requests.pop(request_id, None)
        if state is None:
            return None
        for seq in state.seqs:
            if seq.finish_reason is None:
                seq.finish_reason = "abort"
            self.scheduler.finish(seq)
        return state.output()

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # --- the step --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, and return an event for every request it changed."""
        if self.lora is not None:
            self.lora.release_stale()
        batch, failed = self.scheduler.schedule()
        touched = {seq.request_id for seq in failed}
        for seq in failed:
            self._fail(seq)
        if batch.items:
            result = self.runner.run(batch)
            touched |= self._update(batch, result)
        return [self._emit(rid) for rid in touched if rid in self.requests]

    def _fail(self, seq: Sequence) -> None:
        state = self.requests[seq.request_id]
        state.error = seq.error
        for other in state.seqs:
            other.finish_reason = other.finish_reason or "error"
            self.scheduler.finish(other)

    def _update(self, batch: Batch, result: SampleResult | None) -> set[str]:
        touched: set[str] = set()
        row = 0
        for item in batch.items:
            seq = item.seq
            seq.num_computed += item.num_tokens
            if not item.samples:
                continue
            token, logprob = result.token_ids[row], result.logprobs[row]
            finite = result.finite[row]
            row += 1
            touched.add(seq.request_id)
            if seq.finish_reason is not None:  # a sibling sample failed earlier in this step
                continue
            if finite:
                self._append(seq, token, logprob)
            else:
                seq.error = NonFiniteOutput(_non_finite_message(seq))
                self._fail(seq)
        return touched

    def _append(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> None:
        seq.output.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        params = seq.params
        if token in params.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        elif token in self.eos_ids and not params.ignore_eos:
            seq.finish_reason = "stop"
        else:
            stop = seq.detok.add(token)
            if stop is not None:
                seq.finish_reason, seq.stop_reason = "stop", stop
            elif len(seq.output) >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
                seq.finish_reason = "length"
        if seq.finish_reason is not None:
            self.scheduler.finish(seq)

    def _emit(self, request_id: str) -> RequestOutput:
        state = self.requests[request_id]
        out = state.output()
        if out.finished:
            del self.requests[request_id]
        return out


def _non_finite_message(seq: Sequence) -> str:
    where = f"at output token {len(seq.output)}"
    if seq.adapter_name is None:
        return f"the model's logits for this request are not finite (NaN or Inf) {where}"
    return (f"the logits of adapter '{seq.adapter_name}' for this request are not finite (NaN or "
            f"Inf) {where}: its LoRA delta overflows on this input")
