"""LocalServer, the loramux server inside each Ray replica (no Ray needed): it serves on the
free port it bound, and releasing an adapter unloads it only if the resolver loaded it."""

from __future__ import annotations

import time

import httpx
import pytest

from loramux.ray_serve.local import LocalServer
from loramux.server.cli import build_parser, settings_from_args
from tests.adapters import make_2d_adapter


@pytest.fixture(scope="module")
def local(server_env, hf_demo, tmp_path_factory):
    """The demo (--lora-modules demo-2d, demo-3d) with a resolver directory of one adapter."""
    resolver_dir = tmp_path_factory.mktemp("local-adapters")
    make_2d_adapter(hf_demo, resolver_dir / "on-demand", r=4, seed=61)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LORAMUX_HOME", server_env["LORAMUX_HOME"])  # the session's demo
        settings = settings_from_args(build_parser().parse_args(
            ["serve", "--max-loras", "2", "--num-kv-blocks", "256", "--host", "127.0.0.1",
             "--lora-resolver-dir", str(resolver_dir), "--log-level", "warning"]))
    server = LocalServer(settings)
    yield server
    server.stop()
    assert not server.engine.is_alive


def _models(server) -> set[str]:
    return {card["id"] for card in httpx.get(f"{server.url}/v1/models").json()["data"]}


def _complete(server, model: str) -> str:
    reply = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
        "model": model, "prompt": "the model", "max_tokens": 4, "temperature": 0})
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["text"]


def _wait_until(check, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        time.sleep(0.05)
    return check()


def test_it_serves_on_the_port_it_bound(local):
    assert local.url.startswith("http://127.0.0.1:")
    assert httpx.get(f"{local.url}/health").status_code == 200


def test_release_unloads_only_what_the_resolver_loaded(local):
    answer = _complete(local, "on-demand")
    assert "on-demand" in _models(local)
    local.release("demo-2d")  # a --lora-modules adapter of the demo: it stays
    local.release("on-demand")
    assert _wait_until(lambda: "on-demand" not in _models(local))
    assert "demo-2d" in _models(local)
    assert _complete(local, "on-demand") == answer  # loaded again on its next request
