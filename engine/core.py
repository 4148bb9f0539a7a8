"""EngineCore: the synchronous engine. add_request / abort / step; no threads of its own."""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

from loramux.engine.batch import Batch, make_plan
from loramux.engine.config import EngineConfig, ModelConfig
from loramux.engine.detokenizer import IncrementalDetokenizer
from loramux.engine.errors import (AdapterLoadError, EngineOverloaded, InvalidRequest, NonFiniteOutput,
                           PromptTooLong)
from loramux.engine.lora.manager import AdapterHandle, LoraManager
from loramux.engine.memory import MemoryPools
from loramux.engine.outputs import RequestState
from loramux.engine.plan import SampleResult
from loramux.engine.processors import ProcessorParams, processor_params
from loramux.engine.request import LoRARequest, RequestOutput, SamplingParams, TokenLogprob
from loramux.engine.scheduler import Scheduler
from loramux.engine.sequence import Sequence, SeqStatus
from loramux.engine.stats import EngineStats
from loramux.engine.structured import Grammars
from loramux.engine.tokenizer import eos_token_ids, load_tokenizer
from loramux.engine.worker.parallel import ParallelWorker
from loramux.engine.worker.worker import Worker

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_config = ModelConfig.from_pretrained(config.model)
        self._rng = random.Random(config.seed)
        self.max_model_len = self._max_model_len()
        self.tokenizer = load_tokenizer(config.tokenizer or config.model)
        self.eos_ids = eos_token_ids(config.model, self.model_config, self.tokenizer)
        self.grammars = Grammars(self.tokenizer, self.model_config.vocab_size, self.eos_ids)
        self.worker = (Worker(config, self.model_config, self.max_model_len)
                       if config.parallel.tensor_parallel_size == 1 else
                       ParallelWorker(config, self.model_config, self.max_model_len))
        try:
            self.native_layout = self.worker.native_layout
            plan = self.worker.plan_memory()
            self.worker.allocate(plan)
            self.pools = MemoryPools(plan)
            self.lora = (LoraManager(config.lora, self.model_config, self.native_layout,
                                     self.pools.adapters, self.worker.dtype, config.model)
                         if config.lora.enabled else None)
        except BaseException:
            self.worker.shutdown()
            raise
        self.scheduler = Scheduler(config.scheduler, self.pools, self.lora)
        self.requests: dict[str, RequestState] = {}
        self._next_seq_id = 0
        self._released: list[int] = []  # finished sequences the worker has not been told of
        self.steps_total = 0  # steps that ran the model
        logger.info("engine ready: %s (%s, %s) on %s, max_model_len %d, LoRA slots %d",
                    Path(config.model).name, self.model_config.architecture, self.worker.dtype,
                    self.worker.device, self.max_model_len, config.lora.num_slots)

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
        processors = processor_params(params, prompt, self.tokenizer, self.eos_ids, vocab)
        seqs = [self._sequence(request_id, i, prompt, params, lora, max_tokens, processors)
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
                  lora: AdapterHandle | None, max_tokens: int,
                  processors: ProcessorParams | None) -> Sequence:
        seed = None
        if not params.is_greedy:
            seed = params.seed + index if params.seed is not None else self._rng.getrandbits(63)
        detok = IncrementalDetokenizer(self.tokenizer, prompt, params.stop,
                                       params.skip_special_tokens,
                                       params.include_stop_str_in_output, params.min_tokens)
        constraint = (None if params.structured_outputs is None
                      else self.grammars.constraint(params.structured_outputs))
        self._next_seq_id += 1
        scored = [] if params.prompt_logprobs is not None and index == 0 else None
        return Sequence(self._next_seq_id, request_id, index, list(prompt), params, lora, detok,
                        max_tokens, seed, constraint=constraint, processors=processors,
                        prompt_logprobs=scored)

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
            self._finish(seq)
        return state.output()

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def shutdown(self) -> None:
        """Stop the worker processes of a tensor-parallel engine (nothing for one rank)."""
        self.worker.shutdown()

    def stats(self) -> EngineStats:
        """A plain snapshot of the queues, the memory pools and the adapter counters."""
        sched = self.scheduler
        running = {q.request_id: q.adapter_name for q in sched.running}
        waiting = {q.request_id: q.adapter_name for q in sched.waiting
                   if q.status is SeqStatus.WAITING}
        stats = EngineStats(
            num_running=len(running), num_waiting=len(waiting),
            kv_cache_usage=self.pools.blocks.usage, kv_blocks_total=self.pools.blocks.num_blocks,
            block_size=self.pools.blocks.block_size,
            running_lora_adapters=sorted({a for a in running.values() if a}),
            waiting_lora_adapters=sorted({a for a in waiting.values() if a}),
            max_loras=self.config.lora.num_slots, slots_used=self.pools.adapters.num_used,
            preemptions_total=sched.num_preemptions, steps_total=self.steps_total)
        if self.pools.prefix is not None:
            stats.prefix_caching = True
            stats.prefix_cache_queries_total = self.pools.prefix.queries
            stats.prefix_cache_hits_total = self.pools.prefix.hits
        if self.lora is not None:
            stats.adapter_loads_total = self.lora.loads_total
            stats.adapter_evictions_total = self.lora.evictions_total
            stats.adapter_reads_total = self.lora.reads_total
        return stats

    # --- the step --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, and return an event for every request it changed."""
        if self.lora is not None:
            self.lora.release_stale({seq.adapter.key for seq in self.scheduler.waiting
                                     if seq.adapter is not None})
        batch, failed = self.scheduler.schedule()
        now = time.monotonic()
        for item in batch.items:  # a request's queue time ends when it is first scheduled
            if (state := self.requests.get(item.seq.request_id)) is not None:
                state.metrics.setdefault("scheduled", now)
        touched = {seq.request_id for seq in failed}
        for seq in failed:
            self._fail(seq)
        if self.lora is not None:
            self.worker.apply(self.lora.take_ops())
        if batch.items:
            plan = make_plan(batch, self._released, self._token_masks(batch))
            self._released = []
            result = self.worker.execute(plan)
            for row, scored in zip(plan.prompt_logprobs, result.prompt_logprobs if result
                                   else [], strict=True):
                batch.items[row.row].seq.prompt_logprobs.extend(scored)
            touched |= self._update(batch, result)
            self.steps_total += 1
        return [self._emit(rid) for rid in touched if rid in self.requests]

    def _token_masks(self, batch: Batch) -> dict[int, object]:
        """seq id -> the bitmask of its grammar's next tokens, for each sampling row with a
        constraint (one batch fill). A grammar that allows no token of the vocabulary sets the
        sequence's error: it fails in _update instead of appending a token."""
        seqs = [item.seq for item in batch.items if item.samples
                and item.seq.constraint is not None and item.seq.constraint.active]
        if not seqs:
            return {}
        bitmask = self.grammars.fill([seq.constraint for seq in seqs])
        masks = {}
        for seq, row, alive in zip(seqs, bitmask, bitmask.any(dim=1).tolist()):
            masks[seq.seq_id] = row
            if not alive:
                seq.error = InvalidRequest(
                    f"the requested structure allows no token of this model's vocabulary at "
                    f"output token {len(seq.output)}")
        return masks

    def _fail(self, seq: Sequence) -> None:
        state = self.requests[seq.request_id]
        state.error = seq.error
        for other in state.seqs:
            other.finish_reason = other.finish_reason or "error"
            self._finish(other)

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
            if seq.error is not None:  # its grammar allowed no token
                self._fail(seq)
            elif finite:
                self._append(seq, token, logprob)
            else:
                seq.error = NonFiniteOutput(_non_finite_message(seq))
                self._fail(seq)
        return touched

    def _append(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> None:
        seq.output.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        complete = False
        if seq.constraint is not None:
            try:
                complete = seq.constraint.advance(token)
            except InvalidRequest as exc:
                seq.error = exc
                self._fail(seq)
                return
        params = seq.params
        if token in params.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        elif token in self.eos_ids and not params.ignore_eos:
            seq.finish_reason = "stop"
        else:
            stop = seq.detok.add(token)
            if stop is not None:
                seq.finish_reason, seq.stop_reason = "stop", stop
            elif complete:  # the grammar allows nothing but EOS: the structure is done
                seq.finish_reason = "stop"
            elif len(seq.output) >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
                seq.finish_reason = "length"
        if seq.finish_reason is not None:
            self._finish(seq)

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        if seq.seed is not None or seq.processors is not None:  # the worker keeps state for it
            self._released.append(seq.seq_id)

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
