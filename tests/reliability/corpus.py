"""The bad-input corpus: one entry per kind of bad request a client can send, as data.

Each Case is sent as one HTTP request to a real server and must get one of `statuses` (a 4xx in
the OpenAI error envelope, or a documented 200). Adapter cases name how the lora_path is made
(`adapter`, a function of the Paths below); request cases give a JSON body (`body`) or raw bytes
(`content`). `fix`: the issue-12 item whose fix makes the entry pass, while it is not landed
(the test marks the entry xfail(strict=True) with it).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.bad_adapters import BAD_KINDS, write_bad_adapter

COMPLETIONS, CHAT, LOAD, UNLOAD = ("/v1/completions", "/v1/chat/completions",
                                   "/v1/load_lora_adapter", "/v1/unload_lora_adapter")
GOOD_COMPLETION = {"model": "demo", "prompt": "the model", "max_tokens": 2}
GOOD_CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hello"}],
             "max_tokens": 2}


@dataclass(frozen=True)
class Paths:
    """Where adapter cases build their lora_path: `root` is the allowed root, `outside` not."""

    root: Path
    outside: Path
    good: Path  # a valid 2D adapter directory under root

    def fresh(self, name: str) -> Path:
        path = self.root / "corpus" / name
        shutil.rmtree(path, ignore_errors=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path


@dataclass(frozen=True)
class Case:
    id: str
    path: str = COMPLETIONS
    body: dict | list | None = None
    content: bytes | None = None  # raw body (sent as application/json unless headers say)
    headers: dict = field(default_factory=dict)
    adapter: Callable[[Paths], str] | None = None  # a load of the lora_path it returns
    statuses: tuple[int, ...] = (400,)
    method: str = "POST"
    fix: str | None = None


def completion(**fields) -> dict:
    return {**GOOD_COMPLETION, **fields}


def chat(**fields) -> dict:
    return {**GOOD_CHAT, **fields}


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def _bad_kind(kind: str) -> Callable[[Paths], str]:
    return lambda p: str(write_bad_adapter(kind, p.good, p.fresh(kind)))


def _linking(file_name: str, target: Callable[[Paths], Path]) -> Callable[[Paths], str]:
    """A copy of the good adapter whose `file_name` is a symlink to `target`."""
    def make(p: Paths) -> str:
        path = p.fresh(f"link-{file_name}-{target.__name__}")
        shutil.copytree(p.good, path)
        (path / file_name).unlink()
        (path / file_name).symlink_to(target(p))
        return str(path)
    return make


def _outside_weights(p: Paths) -> Path:
    return p.outside / "adapter_model.safetensors"


def _outside_nothing(p: Paths) -> Path:
    return p.outside / "no-such-file"


def _dir_loop(p: Paths) -> str:
    loop = p.fresh("loop")
    os.symlink(loop, loop)
    return str(loop)


def _config(**fields) -> Callable[[Paths], str]:
    """The good adapter with adapter_config.json fields replaced (raw JSON text values)."""
    def make(p: Paths) -> str:
        path = p.fresh("config-" + "-".join(fields))
        shutil.copytree(p.good, path)
        text = (path / "adapter_config.json").read_text()[:-1]
        extra = "".join(f', "{k}": {v}' for k, v in fields.items())
        (path / "adapter_config.json").write_text(text + extra + "}")
        return str(path)
    return make


def _config_text(name: str, text: str | bytes) -> Callable[[Paths], str]:
    def make(p: Paths) -> str:
        path = p.fresh(name)
        shutil.copytree(p.good, path)
        (path / "adapter_config.json").write_bytes(text if isinstance(text, bytes)
                                                  else text.encode())
        return str(path)
    return make


def _empty_weights(p: Paths) -> str:
    path = p.fresh("empty-weights")
    shutil.copytree(p.good, path)
    (path / "adapter_model.safetensors").write_bytes(b"")
    return str(path)


def _weights_dir(p: Paths) -> str:
    path = p.fresh("weights-dir")
    shutil.copytree(p.good, path)
    (path / "adapter_model.safetensors").unlink()
    (path / "adapter_model.safetensors").mkdir()
    return str(path)


_REQUESTS = [
    # --- bodies -------------------------------------------------------------------------------
    Case("invalid_json", content=b'{"model": "demo", "prompt": '),
    Case("body_is_a_list", body=[GOOD_COMPLETION]),
    Case("body_is_a_string", body="the model"),
    Case("empty_body", content=b""),
    Case("not_utf8", content=b'{"model": "demo", "prompt": "\xff\xfe"}'),
    Case("nested_100000_deep", content=_raw(json.dumps(GOOD_COMPLETION)[:-1] + ', "user": '
                                            + "[" * 100_000 + "]" * 100_000 + "}")),
    # --- completions fields ---------------------------------------------------------------------
    Case("missing_model", body={"prompt": "the model"}),
    Case("model_wrong_type", body=completion(model=7)),
    Case("unknown_model", body=completion(model="no-such-model"), statuses=(404,)),
    Case("empty_model", body=completion(model=""), statuses=(400, 404)),
    Case("missing_prompt", body={"model": "demo"}),
    Case("prompt_wrong_type", body=completion(prompt={"text": "x"})),
    Case("empty_prompt", body=completion(prompt="")),
    Case("empty_prompt_in_a_batch", body=completion(prompt=["a", ""])),
    Case("token_ids_outside_vocab", body=completion(prompt=[1, 10**9])),
    Case("negative_token_id", body=completion(prompt=[-1])),
    Case("lone_surrogate_prompt", content=_raw(json.dumps(completion(prompt="a \ud800 b")))),
    Case("max_tokens_zero", body=completion(max_tokens=0)),
    Case("max_tokens_negative", body=completion(max_tokens=-5)),
    Case("max_tokens_huge", body=completion(max_tokens=10**12)),
    Case("max_tokens_string", body=completion(max_tokens="ten")),
    Case("max_tokens_float", body=completion(max_tokens=2.5)),
    Case("temperature_negative", body=completion(temperature=-1)),
    Case("temperature_string", body=completion(temperature="hot")),
    Case("temperature_nan", content=_raw(json.dumps(completion())[:-1] + ', "temperature": NaN}')),
    Case("top_p_zero", body=completion(top_p=0)),
    Case("top_p_above_one", body=completion(top_p=1.5)),
    Case("top_k_below_minus_one", body=completion(top_k=-7)),
    Case("min_p_above_one", body=completion(min_p=2)),
    Case("n_zero", body=completion(n=0)),
    Case("n_huge", body=completion(n=10**6)),
    Case("seed_2_pow_70", body=completion(seed=2**70, temperature=1)),
    Case("seed_string", body=completion(seed="x")),
    Case("logprobs_21", body=completion(logprobs=21)),
    Case("logprobs_negative", body=completion(logprobs=-1)),
    Case("stop_wrong_type", body=completion(stop=5)),
    Case("stop_token_ids_strings", body=completion(stop_token_ids=["a"])),
    Case("prompt_logprobs_21", body=completion(prompt_logprobs=21)),
    Case("unhonoured_field", body=completion(best_of=2)),
    Case("presence_penalty_above_two", body=completion(presence_penalty=2.5)),
    Case("repetition_penalty_zero", body=completion(repetition_penalty=0)),
    Case("logit_bias_key_not_a_token_id", body=completion(logit_bias={"the": 5})),
    Case("logit_bias_outside_vocab", body=completion(logit_bias={"99999999": 5})),
    Case("logit_bias_above_100", body=completion(logit_bias={"5": 150})),
    Case("allowed_token_ids_outside_vocab", body=completion(allowed_token_ids=[-1])),
    Case("min_tokens_above_max_tokens", body=completion(min_tokens=5)),
    Case("stream_options_wrong_type", body=completion(stream=True, stream_options="usage")),
    Case("bad_field_in_stream", body=completion(stream=True, max_tokens=-1)),
    Case("unknown_model_in_stream", body=completion(stream=True, model="nope"),
         statuses=(404,)),
    # --- chat fields ----------------------------------------------------------------------------
    Case("messages_missing", CHAT, body={"model": "demo"}),
    Case("messages_empty", CHAT, body=chat(messages=[])),
    Case("messages_a_string", CHAT, body=chat(messages="hello")),
    Case("message_without_role", CHAT, body=chat(messages=[{"content": "hi"}])),
    Case("message_content_wrong_type", CHAT, body=chat(messages=[{"role": "user",
                                                                  "content": 5}])),
    Case("message_image_part", CHAT, body=chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])),
    Case("lone_surrogate_chat", CHAT, content=_raw(json.dumps(chat(messages=[
        {"role": "user", "content": "a \udfff"}])))),
    Case("top_logprobs_21", CHAT, body=chat(logprobs=True, top_logprobs=21)),
    Case("tools", CHAT, body=chat(tools=[{"type": "function",
                                         "function": {"name": "f", "parameters": {}}}])),
    Case("chat_unknown_model", CHAT, body=chat(model="nope"), statuses=(404,)),
    # --- other routes -------------------------------------------------------------------------
    Case("unknown_route", "/v1/nothing-here", body={}, statuses=(404,)),
    Case("wrong_method", COMPLETIONS, method="GET", statuses=(405,)),
    Case("no_api_key", body=completion(), headers={"Authorization": ""}, statuses=(401,)),
    Case("wrong_api_key", body=completion(), headers={"Authorization": "Bearer nope"},
         statuses=(401,)),
    Case("unload_unknown", UNLOAD, body={"lora_name": "never-loaded"}, statuses=(404,)),
    Case("unload_without_name", UNLOAD, body={}),
    Case("load_without_path", LOAD, body={"lora_name": "x"}),
    Case("load_base_name", LOAD, body={"lora_name": "demo", "lora_path": "/tmp"},
         statuses=(400, 403)),
    Case("load_empty_name", LOAD, body={"lora_name": "", "lora_path": "/tmp"}),
]

_ADAPTERS = [
    *(Case(f"adapter_{kind}", LOAD, adapter=_bad_kind(kind),
           statuses=(404,) if kind == "not_an_adapter" else (400,)) for kind in BAD_KINDS),
    Case("adapter_empty_weights_file", LOAD, adapter=_empty_weights),
    Case("adapter_weights_a_directory", LOAD, adapter=_weights_dir),
    Case("adapter_r_zero", LOAD, adapter=_config(r=0)),
    Case("adapter_r_negative", LOAD, adapter=_config(r=-4)),
    Case("adapter_r_string", LOAD, adapter=_config(r='"4"')),
    Case("adapter_config_a_list", LOAD, adapter=_config_text("config-list", "[1, 2]")),
    Case("adapter_config_not_utf8", LOAD, adapter=_config_text(
        "config-latin1", '{"r": 4, "x": "\xe9"}'.encode("latin-1"))),
    Case("adapter_lora_alpha_nan", LOAD, adapter=_config(lora_alpha="NaN")),
    Case("adapter_lora_alpha_1e300", LOAD, adapter=_config(lora_alpha="1e300")),
    Case("adapter_r_true", LOAD, adapter=_config(r="true")),
    Case("adapter_config_nested_100000_deep", LOAD, adapter=_config_text(
        "config-deep", "[" * 100_000 + "]" * 100_000)),
    # --- paths ----------------------------------------------------------------------------------
    Case("path_missing", LOAD, adapter=lambda p: str(p.root / "no-such-adapter"),
         statuses=(404,)),
    Case("path_outside_roots", LOAD, adapter=lambda p: str(p.outside), statuses=(403,)),
    Case("path_dotdot_escape", LOAD, adapter=lambda p: str(p.root / ".." / p.outside.name),
         statuses=(403,)),
    Case("path_relative", LOAD, adapter=lambda p: "adapters/x", statuses=(403,)),
    Case("path_is_a_file", LOAD, adapter=lambda p: str(p.good / "adapter_config.json"),
         statuses=(400, 404)),
    Case("path_symlink_loop", LOAD, adapter=_dir_loop, statuses=(400, 404)),
    Case("path_nul_byte", LOAD, adapter=lambda p: str(p.root / "a\x00b"), statuses=(400, 404)),
    Case("path_weights_linked_outside", LOAD,
         adapter=_linking("adapter_model.safetensors", _outside_weights), statuses=(403,)),
    Case("path_config_linked_outside", LOAD,
         adapter=_linking("adapter_config.json", _outside_weights), statuses=(403,)),
    Case("path_dangling_link_outside", LOAD,
         adapter=_linking("adapter_model.safetensors", _outside_nothing), statuses=(403,)),
]


CASES: tuple[Case, ...] = (*_REQUESTS, *_ADAPTERS)
