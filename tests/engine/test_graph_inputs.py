"""The padded inputs of a CUDA-graph decode step, checked on CPU: a stand-in for DecodeGraphs
re-runs the captured forward instead of replaying a graph, so padding rows (scratch KV slot,
seq_len 0, LoRA slot -1), full-width block tables and the LoraMeta refilled in the captured
buffers must give the greedy tokens of ordinary steps."""

from __future__ import annotations

from loramux.engine import LLM, LoRARequest, SamplingParams
from loramux.engine.worker import worker as worker_module
from loramux.engine.worker.cuda_graphs import DecodeGraphs, batch_buckets
from tests.adapters import make_2d_adapter
from tests.tiny import load_reference

PROMPTS = [[3, 4, 5, 6, 7, 8, 100, 200], [10, 11], list(range(20, 33)), [40, 41, 42, 43],
           [50, 51, 52]]
DECODE = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


class RerunGraphs(DecodeGraphs):
    """Keeps each bucket's forward and calls it on replay (no CUDA needed)."""

    def capture(self, bucket, forward):
        self._graphs[bucket] = forward

    def replay(self, bucket):
        self.replays = getattr(self, "replays", 0) + 1
        return self._graphs[bucket]()


def test_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(5) == [1, 2, 4, 5]
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 64]


def _tokens(path, loras, graphs: bool, monkeypatch) -> list[list[int]]:
    llm = LLM(path, block_size=4, num_blocks=64, max_num_seqs=8, max_loras=2, max_lora_rank=8)
    worker = llm.core.worker
    if graphs:
        monkeypatch.setattr(worker_module, "DecodeGraphs", RerunGraphs)
        worker.graphs = worker.capture_graphs(8)
    outs = llm.generate(PROMPTS, DECODE, loras)
    if graphs:
        assert worker.graphs.replays == DECODE.max_tokens - 1
    return [list(out.outputs[0].token_ids) for out in outs]


def test_padded_decode_steps_match_eager(checkpoint, tmp_path, monkeypatch):
    path = checkpoint("qwen3_moe")
    adapter = make_2d_adapter(load_reference(path), tmp_path / "a2d", r=8, alpha=8, seed=2)
    loras = [None, LoRARequest("a2d", 1, str(adapter))] * 3
    eager = _tokens(path, loras[:5], False, monkeypatch)
    assert _tokens(path, loras[:5], True, monkeypatch) == eager
