"""Decode steps replayed from CUDA graphs give the greedy tokens of eager steps (fp32, Triton).

Batches of 3 and 5 sequences land in the buckets 4 and 8 (max_num_seqs 8), so every replay
also carries padding rows. Both engines run the same kernels; only launch shapes differ (the
padded batch, the full-width block tables), which in fp32 moves logits by rounding only.
"""

from __future__ import annotations

import pytest
import torch

from loramux.engine import LLM, LoRARequest, SamplingParams
from tests.adapters import make_2d_adapter, make_peft_3d_adapter
from tests.tiny import load_reference, save_tiny_checkpoint

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPTS = [[3, 4, 5, 6, 7, 8, 100, 200], [10, 11], list(range(20, 33)), [40, 41, 42, 43],
           [50, 51, 52, 53, 54, 55, 56], [60, 61, 62]]
DECODE = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def greedy_tokens(path, loras: list, **kwargs) -> tuple[list[list[int]], int]:
    """Tokens for the first 3 then the first 5 prompts, and how many steps replayed a graph."""
    llm = LLM(str(path), dtype="float32", device="cuda", kernel_backend="triton",
              max_num_seqs=8, **kwargs)
    graphs = llm.core.worker.graphs
    assert (graphs is None) == kwargs.get("enforce_eager", False)
    replays = []
    if graphs is not None:
        real_replay = graphs.replay
        graphs.replay = lambda bucket: replays.append(bucket) or real_replay(bucket)
    tokens = []
    for n in (3, 5):
        outs = llm.generate(PROMPTS[:n], DECODE, loras[:n])
        tokens += [list(out.outputs[0].token_ids) for out in outs]
    del llm
    torch.cuda.empty_cache()
    return tokens, len(replays)


def check(path, loras=None, **kwargs) -> None:
    loras = loras or [None] * len(PROMPTS)
    eager, _ = greedy_tokens(path, loras, enforce_eager=True, **kwargs)
    graphed, replays = greedy_tokens(path, loras, **kwargs)
    assert replays >= 2 * (DECODE.max_tokens - 1), f"only {replays} steps replayed a graph"
    assert graphed == eager


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe"])
def test_graphs_match_eager_greedy_tokens(tmp_path, arch):
    check(save_tiny_checkpoint(arch, tmp_path / arch))


def test_graphs_match_eager_with_mixed_2d_3d_lora_batch(tmp_path):
    path = save_tiny_checkpoint("qwen3_moe", tmp_path / "base")
    hf = load_reference(path)
    a3 = make_peft_3d_adapter(hf, tmp_path / "a3d", r=4, alpha=8, seed=1)
    a2 = make_2d_adapter(hf, tmp_path / "a2d", r=8, alpha=8, seed=2)
    reqs = [LoRARequest("a2d", 1, str(a2)), None, LoRARequest("a3d", 2, str(a3))]
    check(path, [reqs[i % 3] for i in range(len(PROMPTS))], max_loras=2, max_lora_rank=8,
          enable_mixed_moe_lora_format=True)
