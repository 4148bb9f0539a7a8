"""LLM: the offline Python API (as vLLM's), for scripts, tests and benchmarks."""

from __future__ import annotations

from loramux.engine.config import make_config
from loramux.engine.core import EngineCore
from loramux.engine.request import LoRARequest, RequestOutput, SamplingParams


class LLM:
    """Generate for a list of prompts in one call; all requests share batches."""

    def __init__(self, model: str, **kwargs) -> None:
        self.core = EngineCore(make_config(model, **kwargs))
        self.tokenizer = self.core.tokenizer
        self._counter = 0

    def generate(self, prompts: list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None,
                 lora_request: LoRARequest | str | list | None = None) -> list[RequestOutput]:
        params = params or SamplingParams()
        n = len(prompts)
        params_list = params if isinstance(params, list) else [params] * n
        loras = lora_request if isinstance(lora_request, list) else [lora_request] * n
        ids = []
        for prompt, p, lora in zip(prompts, params_list, loras):
            tokens = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            self._counter += 1
            rid = str(self._counter)
            self.core.add_request(rid, tokens, p, lora)
            ids.append(rid)
        return self._run(ids)

    def shutdown(self) -> None:
        """Stop the worker processes of a tensor-parallel engine (-tp > 1)."""
        self.core.shutdown()

    def _run(self, ids: list[str]) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        while self.core.has_work():
            for out in self.core.step():
                if out.error is not None:
                    raise out.error
                if out.finished:
                    results[out.request_id] = out
        return [results[rid] for rid in ids]
