"""On a CUDA GPU: a request whose activations overflow at run time changes no other answer.

As tests/engine/test_isolation.py, against a control run instead of fixed references: the
control registers a clean copy of the adapter under the poisoned one's name, so both runs put
the same requests in the same slots and batches (the poisoned requests take one token, and end
at it either way). Every base and healthy-adapter answer must be token for token the control's,
with the Triton kernels (bf16 and fp32, CUDA graphs and eager; their rows do not depend on the
other rows of a tile) and the torch twins in fp32 (their per-expert cuBLAS calls see other row
counts when a poisoned row routes elsewhere, which in bf16 could flip a near-tied token).
"""

from __future__ import annotations

import pytest

from loramux.engine import LoRARequest, SamplingParams
from loramux.engine.core import EngineCore
from loramux.engine.errors import NonFiniteOutput
from loramux.engine.llm import make_config
from tests.adapters import make_2d_adapter
from tests.poison import register_poisoned, run
from tests.tiny import load_reference, save_tiny_checkpoint

pytestmark = pytest.mark.gpu

PROMPTS = [[3, 4, 5, 6, 7, 8, 100, 200], [10, 11], list(range(20, 33)), list(range(50, 90))]
PARAMS = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
ONE = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
KW = dict(max_loras=2, max_lora_rank=8, block_size=16, num_blocks=48, max_num_batched_tokens=32)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("iso-gpu")
    path = save_tiny_checkpoint("qwen3_moe", root / "base")
    return str(path), str(make_2d_adapter(load_reference(path), root / "good", seed=2))


def rounds(path: str, good: str, factor: float, **kwargs) -> list[dict]:
    core = EngineCore(make_config(path, device="cuda", **KW, **kwargs))
    core.resolve_lora(LoRARequest("good", 0, good))
    register_poisoned(core, "poison", good, factor)
    healthy = [(f"{kind}-{i}", p, None if kind == "base" else kind, PARAMS)
               for i, p in enumerate(PROMPTS) for kind in ("base", "good")]
    poisoned = [(f"poison-{i}", p, "poison", ONE) for i, p in enumerate(PROMPTS[::-1])]
    return [run(core, [(f"{rid}/{n}", *rest) for rid, *rest in requests])
            for n, requests in enumerate((poisoned + healthy, healthy + poisoned, healthy))]


@pytest.mark.parametrize("dtype, backend, enforce_eager", [
    ("bfloat16", "triton", False), ("bfloat16", "triton", True), ("float32", "triton", False),
    ("float32", "torch", True)], ids=["bf16-graphs", "bf16-eager", "fp32-graphs", "fp32-twins"])
def test_poisoned_adapter_changes_no_other_answer_on_gpu(setup, dtype, backend, enforce_eager):
    kwargs = dict(dtype=dtype, kernel_backend=backend, enforce_eager=enforce_eager)
    control, poisoned = (rounds(*setup, factor, **kwargs) for factor in (1.0, 1e30))
    for want, got in zip(control, poisoned):
        assert want.keys() == got.keys()
        for rid, out in got.items():
            if rid.startswith("poison"):
                assert isinstance(out.error, NonFiniteOutput) and want[rid].error is None, rid
            else:
                assert out.error is None and out.outputs[0].token_ids == \
                    want[rid].outputs[0].token_ids, rid
