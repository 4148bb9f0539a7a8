"""First-step logprob error of the engine against fp32 transformers, per kernel backend and
dtype, beside transformers' own bf16 error on the same card (the error bf16 alone causes):

    PYTHONPATH=. python3 benchmarks/diagnose_gpu.py [ARCH ...]

Per prompt: the largest |logprob - fp32 reference| over the engine's top-20 tokens, and whether
the top-1 token agrees.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from loramux.engine import LLM, SamplingParams
from tests.gpu.test_engine_gpu import PROMPTS, reference_logprobs
from tests.tiny import ARCHS, HYBRID_ARCHS, load_reference, save_tiny_checkpoint

FIRST = SamplingParams(temperature=0, max_tokens=1, logprobs=20)


def errors(tops: list[tuple[int, list[tuple[int, float]]]], refs) -> tuple[list[float], int]:
    """tops: per prompt (chosen token, [(token, logprob)] top 20)."""
    errs, agree = [], 0
    for (chosen, top), ref in zip(tops, refs):
        ids = torch.tensor([t for t, _ in top])
        got = torch.tensor([v for _, v in top])
        errs.append(round((got - ref[ids]).abs().max().item(), 4))
        agree += chosen == int(ref.argmax())
    return errs, agree


def engine_tops(llm: LLM):
    return [(o.outputs[0].logprobs[0].token_id, o.outputs[0].logprobs[0].top)
            for o in llm.generate(PROMPTS, FIRST)]


def hf_bf16_tops(hf):
    model = hf.to("cuda", torch.bfloat16)
    tops = []
    with torch.no_grad():
        for p in PROMPTS:
            lp = torch.log_softmax(model(torch.tensor([p], device="cuda")).logits[0, -1].float(),
                                   -1).cpu()
            v, i = torch.topk(lp, 20)
            tops.append((int(i[0]), list(zip(i.tolist(), v.tolist()))))
    return tops


def report(arch: str, label: str, tops, refs) -> None:
    errs, agree = errors(tops, refs)
    print(f"{arch:13s} {label:22s} max {max(errs):.4f} per prompt {errs} "
          f"top1 {agree}/{len(PROMPTS)}", flush=True)


def main() -> None:
    root = Path(tempfile.mkdtemp())
    for arch in sys.argv[1:] or ARCHS + HYBRID_ARCHS + ("qwen3_vl_moe",):
        path = save_tiny_checkpoint(arch, root / arch)
        refs = reference_logprobs(load_reference(path))
        report(arch, "transformers bfloat16", hf_bf16_tops(load_reference(path)), refs)
        for dtype in ("bfloat16", "float32"):
            for backend in ("torch", "triton"):
                llm = LLM(str(path), dtype=dtype, device="cuda", kernel_backend=backend)
                report(arch, f"{dtype} {backend}", engine_tops(llm), refs)
                del llm
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
