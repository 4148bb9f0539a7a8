"""A request whose activations turn non-finite at run time changes no other request's output.

The poisoned adapter (tests/poison.py) passes validation only because the test scales it after
reading; its requests write NaN into their KV blocks (over several chunked-prefill steps while
the others decode), and those blocks are freed uncleared and handed to the next requests. Base
and healthy-adapter answers must equal their references in the same batches and afterwards; the
poisoned requests end with a NonFiniteOutput error and the engine goes on. On a hybrid model
(Qwen3.5-MoE) the poisoned requests also leave NaN in the recurrent and conv state slots that
the next sequences are given.
"""

from __future__ import annotations

import pytest

from loramux.engine import LLM, LoRARequest, SamplingParams
from loramux.engine.core import EngineCore
from loramux.engine.errors import NonFiniteOutput
from loramux.engine.llm import make_config
from tests.adapters import make_2d_adapter
from tests.engine.conftest import PROMPTS
from tests.poison import register_poisoned, run
from tests.tiny import load_reference

PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
KW = dict(max_loras=2, max_lora_rank=8, block_size=4, num_blocks=64, max_num_batched_tokens=16)
LONG = list(range(50, 90))  # a poisoned prompt prefilled in chunks over three steps


@pytest.fixture(scope="module", params=["qwen3_moe", "qwen3_5_moe"])
def setup(request, checkpoint, tmp_path_factory):
    path = checkpoint(request.param)
    good = make_2d_adapter(load_reference(path), tmp_path_factory.mktemp("iso") / "good", seed=2)
    ref = LLM(path, **KW)
    want = {(kind, i): out.outputs[0].token_ids for kind, lora in
            (("base", None), ("good", LoRARequest("good", 0, str(good))))
            for i, out in enumerate(ref.generate(PROMPTS, PARAMS, lora))}
    return path, str(good), want


def test_poisoned_adapter_changes_no_other_answer_concurrently_or_afterwards(setup):
    path, good, want = setup
    core = EngineCore(make_config(path, **KW))
    core.resolve_lora(LoRARequest("good", 0, good))
    register_poisoned(core, "poison", good)
    healthy = [(f"{kind}-{i}", prompt, None if kind == "base" else kind, PARAMS)
               for i, prompt in enumerate(PROMPTS) for kind in ("base", "good")]
    poisoned = [(f"poison-{i}", prompt, "poison", PARAMS)
                for i, prompt in enumerate([LONG, *PROMPTS])]
    # the poisoned requests first (they get the low blocks, block 0 among them), mixed, then after
    for round_, requests in enumerate((poisoned + healthy, healthy + poisoned[:1], healthy)):
        got = run(core, [(f"{rid}/{round_}", *rest) for rid, *rest in requests])
        assert len(got) == len(requests)
        for rid, out in got.items():
            kind, i = rid.split("/")[0].split("-")
            if kind == "poison":
                assert isinstance(out.error, NonFiniteOutput), (rid, out.error)
                assert "adapter 'poison'" in str(out.error)
                assert out.outputs[0].finish_reason == "error" and not out.outputs[0].token_ids
            else:
                assert out.error is None, (rid, out.error)
                assert out.outputs[0].token_ids == want[kind, int(i)], rid
    assert core.pools.blocks.num_free == core.pools.blocks.num_blocks
    assert all(pool.num_free == pool.size for pool in core.pools.states.values())
