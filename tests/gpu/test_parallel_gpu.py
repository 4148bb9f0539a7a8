"""-tp 2 on two GPUs (NCCL, fp32): the Triton kernels with decode CUDA graphs (the all_reduces
captured in them), and expert parallelism on the torch ops, give one GPU's greedy tokens for
base, 2D and 3D adapter requests in one batch. Needs 2 GPUs."""

from __future__ import annotations

import pytest
import torch

from loramux.engine import LLM, LoRARequest, SamplingParams
from tests.adapters import make_2d_adapter, make_peft_3d_adapter
from tests.tiny import load_reference, save_tiny_checkpoint

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")]

PROMPTS = [[3, 4, 5, 6, 7, 8, 100, 200], [10, 11], list(range(20, 33)), [40, 41, 42, 43]]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def tokens(path, reqs, **kwargs) -> list[list[int]]:
    llm = LLM(str(path), dtype="float32", device="cuda", max_num_seqs=8, max_loras=2,
              max_lora_rank=8, enable_mixed_moe_lora_format=True, **kwargs)
    try:
        order = [(name, p) for p in PROMPTS for name in reqs]
        outs = llm.generate([p for _, p in order], GREEDY, [reqs[n] for n, _ in order])
        return [o.outputs[0].token_ids for o in outs]
    finally:
        llm.shutdown()


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen3_5_moe"])
def test_two_gpus_give_one_gpus_tokens(tmp_path, arch):
    path = save_tiny_checkpoint(arch, tmp_path / "model")
    hf = load_reference(path)
    reqs = {"base": None,
            "a3d": LoRARequest("a3d", 1, str(make_peft_3d_adapter(hf, tmp_path / "a3d"))),
            "a2d": LoRARequest("a2d", 2, str(make_2d_adapter(hf, tmp_path / "a2d")))}
    want = tokens(path, reqs, kernel_backend="triton")
    assert tokens(path, reqs, kernel_backend="triton", tensor_parallel_size=2) == want
    assert tokens(path, reqs, kernel_backend="torch", enforce_eager=True,
                  tensor_parallel_size=2, enable_expert_parallel=True) == want
