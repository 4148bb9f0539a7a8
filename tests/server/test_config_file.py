"""`--config FILE`: vLLM's YAML of serve options becomes the same flags; the command line wins;
a bad file stops start-up with one line."""

from __future__ import annotations

import httpx
import pytest

from loramux.server.cli import build_parser, settings_from_args
from loramux.server.config_file import ConfigFileError, expand_config_file
from loramux.server.vllm_flags import vllm_spellings
from tests.server.conftest import run_cli, start_server, stop_server


def settings(argv):
    return settings_from_args(build_parser().parse_args(vllm_spellings(
        expand_config_file(argv))))


def test_yaml_keys_become_flags_and_the_command_line_wins(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text(f"model: {tmp_path}\nmax_model_len: 32k\nmax-num-seqs: 7\n"
                      "served-model-name: [a, b]\nenable-lora: true\nenforce-eager: false\n"
                      'override-generation-config: {"temperature": 0.5}\n')
    s = settings(["serve", "--config", str(config), "--max-num-seqs", "9"])
    assert (s.model, s.max_model_len, s.max_num_seqs) == (str(tmp_path), 32_000, 9)
    assert s.served_model_names == ("a", "b") and s.enable_lora
    assert s.override_generation_config == {"temperature": 0.5}
    assert settings(["serve", f"--config={config}"]).max_num_seqs == 7


@pytest.mark.parametrize("text,problem", [
    ("[1, 2]", "must be a mapping"), ("max-model-len: [", "not valid YAML"),
    ("--max-model-len: 4", "is not a flag name")])
def test_bad_files_are_one_line_errors(text, problem, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    with pytest.raises(ConfigFileError, match=problem):
        expand_config_file(["serve", "--config", str(config)])
    with pytest.raises(ConfigFileError, match="No such file"):
        expand_config_file(["serve", "--config", str(tmp_path / "missing.yaml")])


def test_a_server_starts_from_a_config_file(server_env, demo, tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text(f"model: {demo.model_dir}\nenable-lora: true\nlora-modules:\n"
                      f"  - sql-lora={demo.adapters['demo-2d']}\nserved-model-name: base\n")
    srv = start_server(["--config", str(config)], server_env, tmp_path / "config.log")
    try:
        ids = [m["id"] for m in httpx.get(f"{srv.url}/v1/models").json()["data"]]
        assert ids == ["base", "sql-lora"]
    finally:
        stop_server(srv)
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list")
    result = run_cli(["serve", "--config", str(bad)], server_env)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("loramux: error: --config")
