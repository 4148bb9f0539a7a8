"""Inputs that once got a 500 get a 400/404 naming the field, from a real demo server; the
server answers the next request as before."""

from __future__ import annotations

import json
import os

import pytest

from tests.server.test_adapters import load

CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
COMPLETION = {"model": "demo", "prompt": "the model", "max_tokens": 2}


def post(http, path: str, body: dict):
    """The body as JSON text; json.dumps spells a lone surrogate as the escape \\ud800."""
    return http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def refused(reply, status: int, param: str) -> str:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and error["code"] == status, error
    return error["message"]


@pytest.mark.parametrize("seed", [2**70, 2**63, -(2**63) - 1])
@pytest.mark.parametrize("path,body", [("/v1/completions", COMPLETION),
                                       ("/v1/chat/completions", CHAT)])
def test_a_seed_outside_int64_is_400(server, path, body, seed):
    with server.http() as http:
        refused(post(http, path, {**body, "seed": seed, "temperature": 1.0}), 400, "body.seed")
        assert post(http, path, {**body, "seed": 2**63 - 1, "n": 2}).status_code == 200


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {**COMPLETION, "prompt": "the \ud800 model"}, "body.prompt"),
    ("/v1/completions", {**COMPLETION, "stop": ["ok", "\udfff"]}, "body.stop.1"),
    ("/v1/completions", {**COMPLETION, "model": "demo\ud800"}, "body.model"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "\ud83d"}]},
     "body.messages.0.content"),
    ("/v1/chat/completions", {**CHAT, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "a\ud800"}]}]},
     "body.messages.0.content.0.text"),
    ("/v1/chat/completions", {**CHAT, "messages": [
        {"role": "user", "content": "hi", "name": "\ud800"}]}, "body.messages.0.name"),
])
def test_a_lone_surrogate_is_400_naming_the_field(server, path, body, param):
    with server.http() as http:
        message = refused(post(http, path, body), 400, param)
        assert "surrogate" in message
        assert post(http, path, {**body, "model": "demo", "prompt": "ok", "stop": None,
                                 "messages": CHAT["messages"]}).status_code == 200


@pytest.mark.parametrize("field,value", [("temperature", "Infinity"), ("top_p", "NaN"),
                                         ("temperature", "-Infinity")])
def test_non_finite_numbers_are_400(server, field, value):
    text = json.dumps(COMPLETION)[:-1] + f', "{field}": {value}}}'
    with server.http() as http:
        reply = http.post("/v1/completions", content=text,
                          headers={"content-type": "application/json"})
    refused(reply, 400, f"body.{field}")


def test_a_body_nested_too_deeply_is_400(server):
    text = json.dumps(COMPLETION)[:-1] + ', "user": ' + "[" * 100_000 + "]" * 100_000 + "}"
    with server.http() as http:
        reply = http.post("/v1/completions", content=text,
                          headers={"content-type": "application/json"})
    assert reply.status_code == 400, reply.text


def test_an_adapter_config_nested_100000_deep_is_400(server, adapter_root):
    deep = adapter_root / "deep-config"
    deep.mkdir(exist_ok=True)
    (deep / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with server.http() as http:
        message = refused(load(http, "deep", deep), 400, None)
    assert "nested too deeply" in message


def test_an_oversized_adapter_config_is_400_unread(server, adapter_root):
    big = adapter_root / "big-config"
    big.mkdir(exist_ok=True)
    (big / "adapter_config.json").write_text('{"r": 4, "pad": "' + "x" * (2 << 20) + '"}')
    with server.http() as http:
        assert "larger than" in refused(load(http, "big", big), 400, None)


@pytest.mark.parametrize("srv", ["server", "open_server"])
def test_a_symlink_loop_as_lora_path_is_404(request, srv, adapter_root):
    loop = adapter_root / "loop"
    if not loop.is_symlink():
        os.symlink(loop, loop)
    with request.getfixturevalue(srv).http() as http:
        assert "no adapter" in refused(load(http, "loop", loop), 404, "lora_path")
        assert "no adapter" in refused(load(http, "loop", loop / "x"), 404, "lora_path")
        refused(load(http, "nul", str(adapter_root / "a\x00b")), 404, "lora_path")
        refused(load(http, "long", str(adapter_root / ("x" * 5000))), 404, "lora_path")
