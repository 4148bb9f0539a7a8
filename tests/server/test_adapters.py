"""Runtime adapter management over HTTP: load, use, unload, reload, and every way to fail."""

from __future__ import annotations

import threading
import time

import openai
import pytest

from tests.adapters import make_2d_adapter, make_peft_3d_adapter, split_3d_to_2d
from tests.bad_adapters import BAD_KINDS, write_bad_adapter

PROMPT = "the expert adapter"
NO_EOS = {"extra_body": {"ignore_eos": True}}

# What each broken adapter's 400 message must name (a word of the problem, not a status).
PROBLEM_WORDS = {
    "not_an_adapter": "adapter_config.json", "invalid_json": "JSON",
    "no_weights": "adapter_model", "truncated_safetensors": "truncated",
    "corrupt_safetensors": "corrupt", "nan_weights": "NaN", "inf_weights": "Inf",
    "use_dora": "DoRA", "modules_to_save": "modules_to_save", "bias": "bias",
    "missing_lora_b": "lora_B", "unknown_module": "layers.99", "non_lora_key": "not a LoRA",
    "unsupported_target_parameter": "target_parameters", "wrong_hidden_size": "hidden_size",
    "wrong_num_experts": "num_experts", "wrong_intermediate_size": "intermediate_size",
    "rank_mismatch": "rank", "rank_too_high": "--max-lora-rank", "nan_alpha": "lora_alpha",
    "huge_alpha": "lora_alpha", "huge_alpha_pattern": "alpha_pattern", "bool_rank": "r must be",
    "bool_rank_pattern": "rank_pattern", "overflowing_delta": "LoRA delta",
    "huge_delta": "LoRA delta",
}


@pytest.fixture(scope="module")
def peft_3d(hf_demo, adapter_root):
    return make_peft_3d_adapter(hf_demo, adapter_root / "peft-3d", r=4, seed=11)


@pytest.fixture(scope="module")
def split_2d(peft_3d, adapter_root):
    """The same weights as peft_3d, repacked per expert (2D)."""
    return split_3d_to_2d(peft_3d, adapter_root / "peft-3d-as-2d")


@pytest.fixture(scope="module")
def hand_2d(hf_demo, adapter_root):
    return make_2d_adapter(hf_demo, adapter_root / "hand-2d", r=4, seed=12)


def load(http, name: str, path, **extra):
    return http.post("/v1/load_lora_adapter",
                     json={"lora_name": name, "lora_path": str(path), **extra})


def unload(http, name: str):
    return http.post("/v1/unload_lora_adapter", json={"lora_name": name})


def greedy(client, model: str, max_tokens: int = 8) -> str:
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens,
                                     temperature=0, **NO_EOS).choices[0].text


def model_ids(client) -> list[str]:
    return [card.id for card in client.models.list().data]


def test_load_use_unload_reload(server, client, peft_3d):
    with server.http() as http:
        added = load(http, "t-3d", peft_3d, is_3d_lora_weight=True)
        assert (added.status_code, added.text) == (
            200, "Success: LoRA adapter 't-3d' added successfully.")
        assert "t-3d" in model_ids(client)
        answer = greedy(client, "t-3d")
        assert answer != greedy(client, "demo")
        removed = unload(http, "t-3d")
        assert (removed.status_code, removed.text) == (
            200, "Success: LoRA adapter 't-3d' removed successfully.")
        assert "t-3d" not in model_ids(client)
        with pytest.raises(openai.NotFoundError):
            greedy(client, "t-3d")
        again = unload(http, "t-3d")
        assert again.status_code == 404
        assert again.json()["error"]["message"] == "The lora adapter 't-3d' cannot be found."
        assert load(http, "t-3d", peft_3d).status_code == 200  # layout detected from files
        assert greedy(client, "t-3d") == answer
        assert unload(http, "t-3d").status_code == 200


def test_unload_lets_in_flight_requests_finish(server, client, hand_2d):
    with server.http() as http:
        assert load(http, "in-flight", hand_2d).status_code == 200
        expected = greedy(client, "in-flight", 64)
        chunks = iter(client.completions.create(model="in-flight", prompt=PROMPT, max_tokens=64,
                                                temperature=0, stream=True, **NO_EOS))
        first = next(chunks).choices[0].text
        assert unload(http, "in-flight").status_code == 200
        with pytest.raises(openai.NotFoundError):
            greedy(client, "in-flight")
        assert first + "".join(c.choices[0].text for c in chunks) == expected


def test_3d_adapter_and_its_2d_split_answer_alike_in_one_batch(server, client, peft_3d,
                                                                split_2d):
    with server.http() as http:
        assert load(http, "same-3d", peft_3d, is_3d_lora_weight=True).status_code == 200
        assert load(http, "same-2d", split_2d, is_3d_lora_weight=False).status_code == 200
        results: dict[str, str] = {}
        threads = [threading.Thread(target=lambda m=m: results.update({m: greedy(client, m, 16)}))
                   for m in ("same-3d", "same-2d", "demo")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results["same-3d"] == results["same-2d"] != results["demo"]
        assert unload(http, "same-3d").status_code == unload(http, "same-2d").status_code == 200


def test_duplicate_name_is_400_unless_in_place(server, hand_2d, peft_3d):
    with server.http() as http:
        assert load(http, "dup", hand_2d).status_code == 200
        again = load(http, "dup", hand_2d)
        assert again.status_code == 400
        assert "already been loaded" in again.json()["error"]["message"]
        assert load(http, "dup", peft_3d, load_inplace=True).status_code == 200
        assert load(http, "demo", hand_2d).status_code == 400  # the base model's name
        assert unload(http, "dup").status_code == 200


def test_missing_path_is_404(server, adapter_root):
    with server.http() as http:
        reply = load(http, "ghost", adapter_root / "does-not-exist")
    assert reply.status_code == 404 and reply.json()["error"]["type"] == "NotFoundError"


def test_paths_outside_the_allowed_roots_are_refused(server, demo, adapter_root):
    escape = adapter_root / "escape"
    if not escape.exists():
        escape.symlink_to(demo.adapters["demo-2d"], target_is_directory=True)
    with server.http() as http:
        outside = load(http, "outside", demo.adapters["demo-2d"])
        via_link = load(http, "via-link", escape)
        dotdot = load(http, "dotdot", adapter_root / ".." / demo.adapters["demo-2d"].name)
    for reply in (outside, via_link, dotdot):
        assert reply.status_code == 403, reply.text
        assert reply.json()["error"]["param"] == "lora_path"


def test_layout_flag_contradicting_the_files_is_400(server, peft_3d, hand_2d):
    with server.http() as http:
        wrong_3d = load(http, "w3", peft_3d, is_3d_lora_weight=False)
        wrong_2d = load(http, "w2", hand_2d, is_3d_lora_weight=True)
    for reply in (wrong_3d, wrong_2d):
        assert reply.status_code == 400 and "is_3d_lora_weight" in reply.json()["error"]["message"]


def test_invalid_load_body_is_400(server):
    with server.http() as http:
        reply = http.post("/v1/load_lora_adapter", json={"lora_name": "x"})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "body.lora_path"


def test_runtime_updates_are_off_without_the_opt_in(server_env, tmp_path):
    from tests.server.conftest import start_server, stop_server

    srv = start_server(["--num-kv-blocks", "64", "--log-level", "warning"], server_env,
                       tmp_path / "no-updates.log")
    try:
        with srv.http() as http:
            assert load(http, "x", tmp_path).status_code == 404
            assert unload(http, "demo-2d").status_code == 404
            assert http.post("/v1/completions", json={
                "model": "demo-2d", "prompt": "x", "max_tokens": 1}).status_code == 200
    finally:
        stop_server(srv)


@pytest.mark.parametrize("good", ["peft_3d", "hand_2d"])
def test_each_bad_adapter_is_400_naming_the_problem_while_streams_go_on(
        server, client, adapter_root, good, request):
    good_dir = request.getfixturevalue(good)
    expected = {m: greedy(client, m, 96) for m in ("demo-2d", "demo-3d")}
    streamed: dict[str, tuple[str, float, float]] = {}

    def stream(model: str) -> None:
        chunks = iter(client.completions.create(model=model, prompt=PROMPT, max_tokens=96,
                                                temperature=0, stream=True, **NO_EOS))
        first = next(chunks)
        began = time.monotonic()
        text = first.choices[0].text + "".join(c.choices[0].text for c in chunks)
        streamed[model] = (text, began, time.monotonic())

    threads = [threading.Thread(target=stream, args=(m,)) for m in expected]
    for t in threads:
        t.start()
    loads_began = time.monotonic()
    with server.http() as http:
        for kind in BAD_KINDS:
            bad = write_bad_adapter(kind, good_dir, adapter_root / f"bad-{good}-{kind}")
            reply = load(http, f"bad-{kind}", bad)
            # a directory without adapter_config.json is "no adapter there", as a missing path
            assert reply.status_code == (404 if kind == "not_an_adapter" else 400), (kind,
                                                                                      reply.text)
            assert PROBLEM_WORDS[kind] in reply.json()["error"]["message"], (kind, reply.text)
    loads_ended = time.monotonic()
    for t in threads:
        t.join()
    assert {m: text for m, (text, _, _) in streamed.items()} == expected
    for _, began, ended in streamed.values():  # the streams ran while the loads failed
        assert began < loads_ended and ended > loads_began
    assert not [m for m in model_ids(client) if m.startswith("bad-")]
