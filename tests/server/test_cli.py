"""`loramux serve` flags: help for each, settings mapping, and start-up failures as one line."""

from __future__ import annotations

import argparse

import pytest

from loramux.engine.config import SUPPORTED_ARCHITECTURES
from loramux.server.cli import build_parser, main, settings_from_args
from loramux.server.settings import LoraModule, SettingsError, parse_lora_module
from tests.bad_adapters import write_bad_adapter
from tests.server.conftest import run_cli

VLLM_FLAGS = ("--host", "--port", "--served-model-name", "--dtype", "--device",
              "--max-model-len", "--max-num-seqs", "--enable-lora", "--max-loras",
              "--max-lora-rank", "--max-cpu-loras", "--lora-modules",
              "--enable-mixed-moe-lora-format", "--api-key", "--load-format")
OUR_FLAGS = ("--allowed-lora-roots", "--lora-resolver-dir", "--allow-runtime-lora-updating",
             "--block-size", "--num-kv-blocks", "--kv-cache-memory-gb", "--seed",
             "--max-num-batched-tokens", "--log-level", "--kernel-backend")


def serve_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]


def parse(*argv: str):
    return settings_from_args(build_parser().parse_args(["serve", *argv]))


def test_every_flag_exists_and_is_explained():
    actions = {opt: a for a in serve_parser()._actions for opt in a.option_strings}
    for flag in VLLM_FLAGS + OUR_FLAGS:
        assert flag in actions, flag
    for action in serve_parser()._actions:
        assert action.help and len(action.help) > 10, action.option_strings or action.dest


def test_help_runs(server_env):
    done = run_cli(["serve", "--help"], server_env, timeout=60)
    assert done.returncode == 0
    assert all(flag in done.stdout for flag in VLLM_FLAGS + OUR_FLAGS)


def test_lora_modules_take_pairs_and_json():
    assert parse_lora_module("a=/x/y") == LoraModule("a", "/x/y")
    assert parse_lora_module('{"name": "b", "path": "/p", "is_3d_lora_weight": true, '
                             '"base_model_name": "m"}') == LoraModule("b", "/p", "m", True)
    for bad in ("noequals", "=p", '{"name": "x"}', '{"name": "x", "path": "p", "extra": 1}',
                "{not json"):
        with pytest.raises(SettingsError):
            parse_lora_module(bad)


def test_settings_map_onto_the_engine_config(tmp_path):
    settings = parse(str(tmp_path), "--served-model-name", "base", "alias", "--max-loras", "3",
                     "--max-lora-rank", "32", "--max-cpu-loras", "5", "--enable-lora",
                     "--lora-modules", "a=/x", '{"name":"b","path":"/y"}', "--num-kv-blocks",
                     "99", "--block-size", "32", "--max-model-len", "512", "--dtype",
                     "bfloat16", "--enable-mixed-moe-lora-format", "--seed", "7",
                     "--kernel-backend", "torch")
    config = settings.to_engine_config()
    assert settings.served_model_names == ("base", "alias") and settings.base_name == "base"
    assert [m.name for m in settings.lora_modules] == ["a", "b"]
    assert (config.model, config.dtype, config.seed, config.kernel_backend) == (
        str(tmp_path), "bfloat16", 7, "torch")
    assert (config.lora.enabled, config.lora.max_loras, config.lora.max_lora_rank,
            config.lora.max_cpu_loras, config.lora.enable_mixed_moe_lora_format) == (
        True, 3, 32, 5, True)
    assert (config.cache.num_blocks, config.cache.block_size) == (99, 32)
    assert config.scheduler.max_model_len == 512


def test_runtime_updating_opt_in_by_flag_or_env(tmp_path, monkeypatch):
    monkeypatch.delenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", raising=False)
    assert not parse(str(tmp_path), "--enable-lora").allow_runtime_lora_updating
    assert parse(str(tmp_path), "--enable-lora",
                 "--allow-runtime-lora-updating").allow_runtime_lora_updating
    for value, expected in (("1", True), ("True", True), ("0", False)):
        monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", value)
        assert parse(str(tmp_path), "--enable-lora").allow_runtime_lora_updating is expected


def test_demo_turns_lora_and_mixed_format_on(demo_home, demo, monkeypatch):
    monkeypatch.setenv("LORAMUX_HOME", str(demo_home))
    settings = parse("--lora-modules", "extra=/x")
    assert settings.model == str(demo.model_dir) and settings.base_name == "demo"
    assert settings.enable_lora and settings.enable_mixed_moe_lora_format
    assert [m.name for m in settings.lora_modules] == ["demo-2d", "demo-3d", "extra"]


@pytest.mark.parametrize("argv, needle", [
    (["serve", "--bogus"], "--bogus"),
    (["serve", "--max-loras", "0"], "--max-loras"),
    (["serve", "--lora-modules", "{broken"], "--lora-modules"),
    (["serve", "MODEL_DIR", "--lora-modules", "a=/x"], "--enable-lora"),
    (["serve", "MODEL_DIR", "--enable-lora", "--allowed-lora-roots", "/no/such/dir"],
     "--allowed-lora-roots"),
    (["serve", "MODEL_DIR/nothing-here"], "config.json"),
])
def test_bad_flags_stop_with_one_line(tmp_path, capsys, argv, needle):
    with pytest.raises(SystemExit) as stop:
        main([a.replace("MODEL_DIR", str(tmp_path)) for a in argv])
    code = stop.value.code
    # argparse prints its line and exits 2; our checks exit with the line as the code
    message = capsys.readouterr().err if isinstance(code, int) else code
    assert code not in (0, None)
    lines = message.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], message


def test_static_adapter_that_fails_stops_start_up(server_env, demo, tmp_path):
    bad = write_bad_adapter("use_dora", demo.adapters["demo-2d"], tmp_path / "dora")
    done = run_cli(["serve", "--log-level", "error", "--num-kv-blocks", "16", "--lora-modules",
                    f"broken={bad}"], server_env)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "'broken'" in last and "DoRA" in last, done.stderr


def test_serve_help_lists_every_architecture(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for arch in SUPPORTED_ARCHITECTURES:
        assert arch in text
    assert "Qwen3_5MoeForConditionalGeneration" in text
