"""Worst first-step logprob error of the bf16 engine vs fp32 transformers, per kernel backend.

    PYTHONPATH=. python3 benchmarks/diagnose_gpu.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from loramux.engine import LLM, SamplingParams
from tests.gpu.test_engine_gpu import PROMPTS, reference_logprobs
from tests.tiny import ARCHS, load_reference, save_tiny_checkpoint

FIRST = SamplingParams(temperature=0, max_tokens=1, logprobs=20)


def worst(outs, refs) -> tuple[float, int]:
    err, agree = 0.0, 0
    for out, ref in zip(outs, refs):
        lp = out.outputs[0].logprobs[0]
        ids = torch.tensor([t for t, _ in lp.top])
        got = torch.tensor([v for _, v in lp.top])
        err = max(err, (got - ref[ids]).abs().max().item())
        agree += lp.token_id == int(ref.argmax())
    return err, agree


def main() -> None:
    root = Path(tempfile.mkdtemp())
    for arch in ARCHS:
        path = save_tiny_checkpoint(arch, root / arch)
        refs = reference_logprobs(load_reference(path))
        for dtype in ("bfloat16", "float32"):
            for backend in ("torch", "triton"):
                llm = LLM(str(path), dtype=dtype, device="cuda", kernel_backend=backend)
                err, agree = worst(llm.generate(PROMPTS, FIRST), refs)
                print(f"{arch:10s} {dtype:9s} {backend:6s} max|dlogprob| {err:.4f} "
                      f"top1 {agree}/{len(PROMPTS)}", flush=True)


if __name__ == "__main__":
    main()
