"""vLLM command lines: vLLM's spellings parse into the same Settings, harmless vLLM flags warn
with one line, unsupported values stop with one line naming the flag, and a command line from
vLLM's LoRA docs starts a real server unchanged (with `loramux` for `vllm`)."""

from __future__ import annotations

import argparse

import httpx
import pytest

from loramux.server.cli import build_parser, human_int, settings_from_args
from loramux.server.settings import SettingsError
from loramux.server.vllm_flags import COMPAT, FlagRefused, judge_compat_flags, vllm_spellings
from tests.server.conftest import run_cli, start_server, stop_server


def args_of(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(vllm_spellings(["serve", *argv]))


def judge(*argv: str) -> list[str]:
    return judge_compat_flags(args_of("m", *argv))


def test_human_readable_counts_as_vllm_reads_them():
    assert [human_int(t) for t in ("4096", "32k", "32K", "1m", "1M", "25.6k", "2g")] == [
        4096, 32_000, 32_768, 1_000_000, 1_048_576, 25_600, 2_000_000_000]
    for bad in ("1.5K", "0", "-3", "12q", "k"):
        with pytest.raises((argparse.ArgumentTypeError, ValueError)):
            human_int(bad)


def test_vllm_spellings_of_loramux_flags(tmp_path):
    s = settings_from_args(args_of(
        "--model", str(tmp_path), "--max_model_len", "32k", "--max-num-batched-tokens", "8K",
        "--served-model-name", "a", "b", "--api-key", "k1", "k2", "--num-gpu-blocks-override",
        "64", "--uvicorn-log-level", "trace", "--disable-uvicorn-access-log"))
    assert (s.model, s.max_model_len, s.max_num_batched_tokens) == (str(tmp_path), 32_000, 8192)
    assert (s.served_model_names, s.api_keys, s.num_kv_blocks) == (("a", "b"), ("k1", "k2"), 64)
    assert (s.uvicorn_log_level, s.access_log) == ("trace", False)
    caching = [settings_from_args(args_of(str(tmp_path), *flag)).enable_prefix_caching
               for flag in ((), ("--enable-prefix-caching",), ("--no-enable-prefix-caching",),
                            ("--enable_prefix_caching",))]
    assert caching == [None, True, False, True]
    assert settings_from_args(args_of(str(tmp_path), "--max-model-len", "auto")).max_model_len \
        is None
    with pytest.raises(SettingsError, match="MODEL given twice"):
        settings_from_args(args_of(str(tmp_path), "--model", "/elsewhere"))


def test_neutral_values_are_quiet_and_harmless_ones_warn_once_each():
    assert judge("-tp", "1", "--kv-cache-dtype", "auto", "--no-enable-prefix-caching",
                 "--disable-log-requests", "--enable-chunked-prefill", "--lora-dtype", "auto",
                 "--response-role", "assistant", "--quantization", "None") == []
    warnings = judge("--trust-remote-code", "--disable-log-stats", "--enable-prefix-caching",
                     "--lora_dtype", "bfloat16", "-O3", "--fully-sharded-loras",
                     "--prefix-caching-hash-algo", "sha256")
    assert sorted(w.split(":")[0] for w in warnings) == [
        "--disable-log-stats", "--fully-sharded-loras", "--lora-dtype bfloat16",
        "--optimization-level 3", "--prefix-caching-hash-algo sha256", "--trust-remote-code"]
    assert all("\n" not in w for w in warnings)


@pytest.mark.parametrize("argv, flag", [
    (("--pipeline_parallel_size=4",), "--pipeline"),
    (("--kv-cache-dtype", "fp8"), "--kv-cache-dtype fp8"), (("-q", "awq"), "--quantization"),
    (("--response-role", "bot"), "--response-role"), (("-pp", "2"), "--pipeline-parallel"),
])
def test_unhonourable_values_are_refused_naming_the_flag(argv, flag):
    with pytest.raises(FlagRefused, match=f"^{flag}"):
        judge(*argv)


def test_every_compat_flag_has_a_judgement():
    for c in COMPAT:
        assert c.help and (c.warn or c.refuse or c.neutral), c.flags
        assert c.switch or c.warn or c.refuse, c.flags  # a value flag outside neutral says why


def test_refusals_and_unknown_vllm_flags_are_one_line(server_env, demo):
    model = str(demo.model_dir)
    for argv, names in ((["-pp", "2"], "--pipeline-parallel-size 2"),
                        (["--kv-cache-dtype", "fp8"], "--kv-cache-dtype fp8"),
                        (["--default_mm_loras", "{}"], "--default-mm-loras")):
        done = run_cli(["serve", model, *argv], server_env, timeout=60)
        lines = done.stderr.strip().splitlines()
        assert done.returncode != 0 and len(lines) == 1 and names in lines[0], done.stderr


def test_vllm_lora_docs_command_line_starts_unchanged(server_env, demo, tmp_path):
    """vLLM's docs/features/lora.md: `vllm serve MODEL --enable-lora --lora-modules
    sql-lora=PATH`, then the docs' /v1/models and completions requests."""
    srv = start_server([str(demo.model_dir), "--enable-lora", "--lora-modules",
                        f"sql-lora={demo.adapters['demo-2d']}"], server_env,
                       tmp_path / "docs.log")
    try:
        ids = [m["id"] for m in httpx.get(f"{srv.url}/v1/models").json()["data"]]
        assert ids == [str(demo.model_dir), "sql-lora"]
        reply = httpx.post(f"{srv.url}/v1/completions", timeout=60, json={
            "model": "sql-lora", "prompt": "San Francisco is a", "max_tokens": 7,
            "temperature": 0})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] >= 1
    finally:
        stop_server(srv)
    assert "WARNING loramux.server" not in srv.log.read_text()  # nothing needed a warning


def test_a_vllm_lora_deployment_line_starts_with_one_warning_per_ignored_flag(
        server_env, demo, tmp_path):
    """A manifest's worth of vLLM flags; sampling defaults from --generation-config DIR and a
    --chat-template file act on requests, and fields a request sends win."""
    gen = tmp_path / "gen"
    gen.mkdir()
    (gen / "generation_config.json").write_text('{"top_k": 1, "max_new_tokens": 5}')
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}<<{{ m.content }}>>{% endfor %}")
    key = "k-0123456789"
    argv = [str(demo.model_dir), "--served-model-name", "base", "--enable-lora",
            "--lora-modules", f'{{"name": "sql-lora", "path": "{demo.adapters["demo-2d"]}", '
            '"base_model_name": "base"}', "--max-loras", "2", "--max-lora-rank", "16",
            "--max-cpu-loras", "4", "--max-model-len", "2k", "--max-num-seqs", "8",
            "--max-num-batched-tokens", "1k", "--gpu-memory-utilization", "0.9", "--dtype",
            "auto", "--seed", "0", "--api-key", key, "-tp", "1", "--kv-cache-dtype", "auto",
            "--enable-prefix-caching", "--trust-remote-code", "--disable-log-stats",
            "--disable-log-requests", "--uvicorn-log-level", "warning", "--generation-config",
            str(gen), "--chat-template", str(template), "--response-role", "assistant"]
    srv = start_server(argv, server_env, tmp_path / "deploy.log", api_key=key)
    try:
        client = srv.client()
        assert [m.id for m in client.models.list().data] == ["base", "sql-lora"]
        chat = dict(model="sql-lora", messages=[{"role": "user", "content": "hi"}])
        defaulted = client.chat.completions.create(**chat, seed=3, extra_body={
            "ignore_eos": True})
        greedy = client.chat.completions.create(**chat, temperature=0, max_tokens=5)
        assert defaulted.usage.completion_tokens == 5  # max_new_tokens as the default
        assert defaulted.choices[0].message.content == greedy.choices[0].message.content
        sampled = client.chat.completions.create(**chat, seed=3, max_tokens=40,
                                                 extra_body={"top_k": 0, "ignore_eos": True})
        longer_greedy = client.chat.completions.create(**chat, temperature=0, max_tokens=40,
                                                       extra_body={"ignore_eos": True})
        assert sampled.usage.completion_tokens == 40  # the request's max_tokens wins
        assert sampled.choices[0].message.content != longer_greedy.choices[0].message.content
        completion = client.completions.create(model="base", prompt="the", extra_body={
            "ignore_eos": True})
        assert completion.usage.completion_tokens == 16  # completions keep vLLM's 16
        with srv.http() as http:  # the chat template is the file's
            rendered = http.post("/tokenize", json={"messages": chat["messages"]}).json()
            expected = http.post("/tokenize", json={"prompt": "<<hi>>",
                                                    "add_special_tokens": False}).json()
    finally:
        stop_server(srv)
    log = srv.log.read_text()
    for flag in ("--trust-remote-code", "--disable-log-stats"):
        assert log.count(f"WARNING loramux.server.launch: {flag}:") == 1, log
    assert "--kv-cache-dtype" not in log and "--tensor-parallel-size" not in log
    assert "--enable-prefix-caching" not in log and "prefix caching on" in log  # honoured
    assert rendered["tokens"] == expected["tokens"]
