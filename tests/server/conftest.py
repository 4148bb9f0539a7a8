"""Real `loramux serve` processes on 127.0.0.1, one per configuration, shared by the session.

`server` is the demo with an API key, runtime adapter updating and --allowed-lora-roots;
`open_server` is the demo as the README starts it (no key). Both share one demo directory.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from loramux.engine.demo import DEMO_VERSION, ensure_demo

API_KEY = "test-key-0123456789"
STARTUP_TIMEOUT_S = 180
SERVER_FLAGS = ("--max-num-seqs", "32", "--num-kv-blocks", "512", "--block-size", "16",
                "--max-loras", "2", "--max-cpu-loras", "8", "--max-lora-rank", "16",
                "--log-level", "warning")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def loramux_command() -> list[str]:
    """The installed console script when there is one (make test installs it), else -m."""
    script = Path(sys.executable).with_name("loramux")
    return [str(script)] if script.exists() else [sys.executable, "-m", "server"]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path
    api_key: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "none",
                             max_retries=0, timeout=120)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=120)

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def run_cli(args: list[str], env: dict[str, str], timeout: float = STARTUP_TIMEOUT_S):
    return subprocess.run(loramux_command() + args, env=env, capture_output=True, text=True,
                          timeout=timeout)


def start_server(args: list[str], env: dict[str, str], log: Path,
                 api_key: str | None = None) -> Server:
    port = free_port()
    cmd = loramux_command() + ["serve", *args, "--host", "127.0.0.1", "--port", str(port)]
    with log.open("w") as sink:
        process = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", process, log, api_key)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    process.kill()
    raise RuntimeError(f"server did not become healthy:\n{server.log_tail()}")


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()


@pytest.fixture(scope="session")
def demo_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("loramux-home")


@pytest.fixture(scope="session")
def demo(demo_home):
    """Built once here; servers find it through LORAMUX_HOME (ensure_demo()'s default)."""
    return ensure_demo(demo_home / f"demo-v{DEMO_VERSION}")


@pytest.fixture(scope="session")
def server_env(demo_home, demo) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_API_KEY",
                                                             "VLLM_ALLOW_RUNTIME_LORA_UPDATING")}
    return {**env, "LORAMUX_HOME": str(demo_home), "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="session")
def adapter_root(tmp_path_factory) -> Path:
    """Runtime loads must come from here (--allowed-lora-roots)."""
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="session")
def server(server_env, adapter_root, demo_home):
    args = [*SERVER_FLAGS, "--api-key", API_KEY, "--allow-runtime-lora-updating",
            "--allowed-lora-roots", str(adapter_root)]
    srv = start_server(args, server_env, demo_home / "server.log", api_key=API_KEY)
    yield srv
    stop_server(srv)


@pytest.fixture(scope="session")
def open_server(server_env, demo_home):
    env = {**server_env, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true"}
    srv = start_server([*SERVER_FLAGS], env, demo_home / "open-server.log")
    yield srv
    stop_server(srv)


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory) -> dict[str, Path]:
    """tests/chat_model.py's checkpoint: byte-level tokenizer, Qwen3-style template, adapters."""
    from tests.chat_model import build_chat_model

    return build_chat_model(tmp_path_factory.mktemp("chat-model"))


@pytest.fixture(scope="session")
def chat_server(server_env, chat_model, demo_home):
    """The chat model with its 2D adapter (a2d) and 3D adapter (a3d), tool calls and the
    qwen3 reasoning parser on."""
    args = [str(chat_model["model"]), "--served-model-name", "chat", *SERVER_FLAGS,
            "--enable-lora", "--enable-mixed-moe-lora-format", "--enable-auto-tool-choice",
            "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3",
            "--lora-modules", f"a2d={chat_model['a2d']}", f"a3d={chat_model['a3d']}"]
    srv = start_server(args, server_env, demo_home / "chat-server.log")
    yield srv
    stop_server(srv)


@pytest.fixture(scope="session")
def client(server) -> openai.OpenAI:
    return server.client()


@pytest.fixture(scope="session")
def hf_demo(demo):
    """The demo base as a transformers model (tests/adapters.py builds adapters from it)."""
    from tests.tiny import load_reference

    return load_reference(demo.model_dir)
