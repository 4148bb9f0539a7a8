"""lm-eval against a real `loramux serve` with an adapter as the model, through
`local-completions` with `--batch_size 4`: the multiple-choice (loglikelihood) task and the
generation task shipped in tests/server/lm_eval_tasks/ (the demo's vocabulary). Every
loglikelihood equals that of lm-eval's own transformers + PEFT model (`hf`, fp32, CPU) on the
same requests to 1e-4, and so do the greedy generations.

Needs the `eval` extra (pip install -e '.[eval]'); skipped without lm_eval. Marked lm_eval.
tests/server/test_echo_logprobs.py checks the same loglikelihoods through the openai client
in every run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.lm_eval

TASKS = Path(__file__).parent / "lm_eval_tasks"
ADAPTER = "demo-3d"
LM_EVAL_TIMEOUT_S = 900


def lm_eval(model: str, model_args: list[str], out: Path, env: dict[str, str],
            *extra: str) -> dict[str, list]:
    """Run lm-eval on both tasks; the logged samples of each task, by doc_id."""
    cmd = [sys.executable, "-m", "lm_eval", "--model", model, "--model_args",
           ",".join(model_args), "--tasks", "loramux_mc,loramux_gen", "--include_path",
           str(TASKS), "--batch_size", "4", "--output_path", str(out), "--log_samples", *extra]
    # data_files in the task configs are relative to the tasks directory
    run = subprocess.run(cmd, cwd=TASKS, env=env, capture_output=True, text=True,
                         timeout=LM_EVAL_TIMEOUT_S)
    assert run.returncode == 0, run.stderr[-4000:]
    samples = {}
    for task in ("loramux_mc", "loramux_gen"):
        (path,) = out.rglob(f"samples_{task}_*.jsonl")
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        samples[task] = sorted(rows, key=lambda row: row["doc_id"])
    return samples


@pytest.fixture(scope="module")
def env(server_env, tmp_path_factory) -> dict[str, str]:
    cache = tmp_path_factory.mktemp("hf-datasets")
    return {**server_env, "HF_DATASETS_CACHE": str(cache), "HF_DATASETS_OFFLINE": "1",
            "OPENAI_API_KEY": ""}


@pytest.mark.timeout(2 * LM_EVAL_TIMEOUT_S)
def test_lm_eval_through_local_completions_equals_transformers_peft(open_server, demo, env,
                                                                    tmp_path):
    served = lm_eval("local-completions", [
        f"model={ADAPTER}", f"base_url={open_server.url}/v1/completions",
        "tokenizer_backend=huggingface", f"tokenizer={demo.model_dir}",
        "tokenized_requests=True", "max_retries=1"], tmp_path / "served", env)
    reference = lm_eval("hf", [f"pretrained={demo.model_dir}", f"peft={demo.adapters[ADAPTER]}",
                               "dtype=float32"], tmp_path / "reference", env, "--device", "cpu")
    mc = list(zip(served["loramux_mc"], reference["loramux_mc"], strict=True))
    assert len(mc) == 8  # 30 loglikelihood requests, in prompt batches of 4
    worst = 0.0
    for got, want in mc:
        assert got["arguments"] == want["arguments"]  # the same requests
        for (ll, greedy), (ref_ll, ref_greedy) in zip(  # logged as strings
                [r[0] for r in got["resps"]], [r[0] for r in want["resps"]], strict=True):
            worst = max(worst, abs(float(ll) - float(ref_ll)))
            assert greedy == ref_greedy
    assert worst < 1e-4, f"largest loglikelihood difference {worst:.2e}"
    gen = list(zip(served["loramux_gen"], reference["loramux_gen"], strict=True))
    assert len(gen) == 6
    # the served text keeps the space before its first word (it continues the prompt); hf
    # decodes the new tokens alone
    texts = [(g["resps"][0][0], r["resps"][0][0]) for g, r in gen]
    assert [got.strip() for got, _ in texts] == [want.strip() for _, want in texts]
    assert all(got.strip() for got, _ in texts), "generations must not be empty"
