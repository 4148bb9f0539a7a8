"""--generation-config / --override-generation-config as vLLM reads them, their application to
request bodies (fields a client sends win), and --chat-template's path-or-template rule."""

from __future__ import annotations

import json

import pytest

from loramux.server.generation_defaults import (
    GenerationConfigError,
    parse_override,
    read_generation_config,
    sampling_defaults,
)
from loramux.server.protocol import ChatCompletionRequest, CompletionRequest, unapplied_defaults
from loramux.server.responses_api import ResponsesRequest
from loramux.server.settings import Settings, SettingsError, load_chat_template

QWEN3 = {"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95,
         "eos_token_id": [151645, 151643], "transformers_version": "4.51.0"}


def model_dir(tmp_path, config: dict | None = QWEN3):
    if config is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(config))
    return str(tmp_path)


def test_auto_reads_the_model_dir_vllm_reads_nothing_a_dir_reads_its_own(tmp_path):
    (tmp_path / "m").mkdir()
    model = model_dir(tmp_path / "m")
    assert sampling_defaults(read_generation_config("auto", model), {}) == {
        "temperature": 0.6, "top_k": 20, "top_p": 0.95}
    assert read_generation_config("vllm", model) == {}
    other = tmp_path / "other"
    other.mkdir()
    model_dir(other, {"max_new_tokens": 64, "repetition_penalty": 1.05, "top_p": None})
    assert sampling_defaults(read_generation_config(str(other), model), {}) == {
        "repetition_penalty": 1.05, "max_tokens": 64}
    assert read_generation_config("auto", str(tmp_path)) == {}  # no file: no defaults
    with pytest.raises(GenerationConfigError, match="no generation_config.json"):
        read_generation_config(str(tmp_path), model)


def test_override_wins_over_the_file_and_is_checked():
    assert sampling_defaults(QWEN3, parse_override('{"temperature": 0.2, "min_p": 0.1}')) == {
        "temperature": 0.2, "top_k": 20, "top_p": 0.95, "min_p": 0.1}
    for bad in ("{not json", "[1]"):
        with pytest.raises(GenerationConfigError):
            parse_override(bad)


def test_settings_carry_the_defaults_and_refuse_a_broken_file(tmp_path):
    settings = Settings(model=model_dir(tmp_path), served_model_names=("m",))
    assert settings.sampling_defaults["temperature"] == 0.6
    assert Settings(model=str(tmp_path), served_model_names=("m",),
                    generation_config="vllm").sampling_defaults == {}
    (tmp_path / "generation_config.json").write_text("{broken")
    with pytest.raises(SettingsError, match="cannot read"):
        Settings(model=str(tmp_path), served_model_names=("m",))


def test_fields_the_client_sends_win_and_max_tokens_defaults_only_when_unset():
    defaults = {"temperature": 0.6, "top_k": 20, "max_tokens": 64}
    chat = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 1.0})
    params = chat.with_defaults(defaults).sampling_params()
    assert (params.temperature, params.top_k, params.max_tokens) == (1.0, 20, 64)
    capped = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x"}],
         "max_completion_tokens": 7})
    assert capped.with_defaults(defaults).sampling_params().max_tokens == 7
    completion = CompletionRequest.model_validate({"model": "m", "prompt": "x"})
    params = completion.with_defaults(defaults).sampling_params()
    assert (params.temperature, params.max_tokens) == (0.6, 16)  # vLLM's completion default
    response = ResponsesRequest.model_validate({"model": "m", "input": "x"})
    assert response.with_defaults(defaults).sampling_params().max_tokens == 64


def test_unapplied_and_invalid_defaults_are_named():
    assert unapplied_defaults({"temperature": 0.5, "no_such_knob": 1}) == ["no_such_knob"]
    with pytest.raises(ValueError, match="top_p=3"):
        unapplied_defaults({"top_p": 3})


def test_chat_template_is_a_file_or_the_template_itself(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{{ messages[0].content }}")
    assert load_chat_template(str(path)) == "{{ messages[0].content }}"
    assert load_chat_template("{% for m in messages %}{{ m.content }}\\n{% endfor %}") == \
        "{% for m in messages %}{{ m.content }}\n{% endfor %}"
    assert load_chat_template(None) is None
    with pytest.raises(SettingsError, match="looks like a file path"):
        load_chat_template(str(tmp_path / "missing.jinja"))


def test_penalty_defaults_apply_where_the_client_leaves_them_out_or_null():
    defaults = {"repetition_penalty": 1.05, "presence_penalty": 0.5}
    body = {"model": "m", "prompt": "x", "presence_penalty": None}
    params = CompletionRequest.model_validate(body).with_defaults(defaults).sampling_params()
    assert (params.repetition_penalty, params.presence_penalty) == (1.05, 0.5)
    body = {"model": "m", "prompt": "x", "repetition_penalty": 1.0, "presence_penalty": 0}
    params = CompletionRequest.model_validate(body).with_defaults(defaults).sampling_params()
    assert (params.repetition_penalty, params.presence_penalty) == (1.0, 0.0)
    assert unapplied_defaults(defaults) == []
