"""The engine on a CUDA GPU in bf16 with the Triton kernels, against fp32 transformers.

Tolerance, measured on an H100 (2026-11-22, benchmarks/diagnose_gpu.py): bf16 rounds every
activation to 8 bits of mantissa and routing flips experts at near-tied router scores, so the
bf16 engine's first-step log-probabilities (top 20) differ from fp32 transformers by up to 0.32
with the torch twins and 0.32 with Triton on these tiny models (logit std ~1.6), and 1 prompt
in 16 changed its top-1 token on either path. So tokens are not compared; the Triton error must
stay within 0.5 absolute and within twice the torch twins' own bf16 error plus 0.05. An
indexing or layout bug moves log-probabilities by whole units and fails both bounds.
"""

from __future__ import annotations

import pytest
import torch

from engine import LLM, LoRARequest, SamplingParams
from tests.adapters import make_2d_adapter, make_peft_3d_adapter, merged_reference
from tests.tiny import ARCHS, load_reference, save_tiny_checkpoint

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPTS = [[3, 4, 5, 6, 7, 8, 100, 200], [10, 11], list(range(20, 33)), [40, 41, 42, 43]]
ATOL = 0.5
FIRST = SamplingParams(temperature=0, max_tokens=1, logprobs=20)


def reference_logprobs(model, prompts=PROMPTS) -> list[torch.Tensor]:
    with torch.no_grad():
        return [torch.log_softmax(model(torch.tensor([p])).logits[0, -1].float(), -1)
                for p in prompts]


def max_error(outs, refs) -> float:
    """Largest |logprob - reference| over each output's top-20 tokens."""
    worst = 0.0
    for out, ref in zip(outs, refs):
        lp = out.outputs[0].logprobs[0]
        ids = torch.tensor([t for t, _ in lp.top])
        got = torch.tensor([v for _, v in lp.top])
        worst = max(worst, (got - ref[ids]).abs().max().item())
    return worst


def check(path, prompts, refs, loras=None, **kwargs) -> None:
    """Run the bf16 engine with Triton and with the torch twins; hold Triton to the bounds."""
    errors = {}
    for backend in ("torch", "triton"):
        llm = LLM(str(path), dtype="bfloat16", device="cuda", kernel_backend=backend, **kwargs)
        outs = llm.generate(prompts, FIRST, loras)
        errors[backend] = max_error(outs, refs)
    bound = min(ATOL, 2 * errors["torch"] + 0.05)
    assert errors["triton"] <= bound, f"bf16 logprob errors {errors}, bound {bound:.3f}"


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_first_step_matches_fp32_transformers(tmp_path, arch):
    path = save_tiny_checkpoint(arch, tmp_path / arch)
    check(path, PROMPTS, reference_logprobs(load_reference(path)))


def test_bf16_mixed_2d_3d_batch_matches_references(tmp_path):
    path = save_tiny_checkpoint("qwen3_moe", tmp_path / "base")
    hf = load_reference(path)
    a3 = make_peft_3d_adapter(hf, tmp_path / "a3d", r=4, alpha=8, seed=1)
    a2 = make_2d_adapter(hf, tmp_path / "a2d", r=8, alpha=8, seed=2)
    reqs = [None, LoRARequest("a2d", 1, str(a2)), LoRARequest("a3d", 2, str(a3))]
    refs = [reference_logprobs(hf), reference_logprobs(merged_reference(hf, a2)),
            reference_logprobs(merged_reference(hf, a3))]
    order = [(k, i) for i in range(len(PROMPTS)) for k in range(3)]
    check(path, [PROMPTS[i] for _, i in order], [refs[k][i] for k, i in order], max_loras=2,
          max_lora_rank=16, enable_mixed_moe_lora_format=True, loras=[reqs[k] for k, _ in order])
