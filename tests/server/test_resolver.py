"""On-demand adapters (--lora-resolver-dir): 200 adapters in a directory, each loaded on its
first request, answered as transformers answers with that adapter merged; bad names and bad
directories refused; concurrent first requests share one load; and cold loads under load never
hold up a warm stream for more than about one engine step.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import random
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch
from transformers import AutoTokenizer

from loramux.server.cli import build_parser, resolver_env_ignored, settings_from_args
from loramux.server.settings import SettingsError
from tests.adapters import make_2d_adapter, make_peft_3d_adapter, merged_reference
from tests.bad_adapters import write_bad_adapter
from tests.server.conftest import start_server, stop_server
from tests.server.test_metrics import scrape, value

logger = logging.getLogger(__name__)

NUM_ADAPTERS = 200
NUM_USED = 20  # the acceptance run: 20 of the 200, chosen at random
PROMPT = "the expert adapter"
MAX_TOKENS = 8
NO_EOS = {"extra_body": {"ignore_eos": True}}
NOT_FOUND = "The model `{}` does not exist. Valid aliases: demo."


def tenant(i: int) -> str:
    return f"tenant-{i:03d}"


@pytest.fixture(scope="module")
def resolver_dir(hf_demo, tmp_path_factory) -> Path:
    """200 distinct adapters, one in ten a real PEFT 3D adapter, the rest 2D."""
    root = tmp_path_factory.mktemp("resolver")
    for i in range(NUM_ADAPTERS):
        maker = make_peft_3d_adapter if i % 10 == 0 else make_2d_adapter
        maker(hf_demo, root / tenant(i), r=4, seed=1000 + i)
    return root


@pytest.fixture(scope="module")
def outside(hf_demo, tmp_path_factory) -> Path:
    """A good adapter outside the resolver directory (what a link must not reach)."""
    return make_2d_adapter(hf_demo, tmp_path_factory.mktemp("outside") / "a", r=4, seed=7)


@pytest.fixture(scope="module")
def resolver_server(server_env, resolver_dir, demo_home):
    """4 GPU slots and 32 CPU-cached adapters: the 20 used ones churn the slots, not the disk."""
    args = ["--max-loras", "4", "--max-cpu-loras", "32", "--max-num-seqs", "32",
            "--num-kv-blocks", "1024", "--block-size", "16", "--max-lora-rank", "16",
            "--lora-resolver-dir", str(resolver_dir), "--log-level", "info",
            "--disable-uvicorn-access-log"]
    srv = start_server(args, server_env, demo_home / "resolver-server.log")
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def reference(hf_demo, demo, resolver_dir):
    """reference(name) -> transformers' greedy text of PROMPT with DIR/name merged (EOS
    ignored, special tokens not shown, as the server's requests here ask)."""
    tokenizer = AutoTokenizer.from_pretrained(demo.model_dir)
    prompt = tokenizer.encode(PROMPT)
    cache: dict[str, str] = {}

    def text(name: str) -> str:
        if name not in cache:
            model, ids = merged_reference(hf_demo, resolver_dir / name), list(prompt)
            with torch.no_grad():
                for _ in range(MAX_TOKENS):
                    ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            decoded = tokenizer.decode(ids, skip_special_tokens=True)
            cache[name] = decoded[len(tokenizer.decode(prompt, skip_special_tokens=True)):]
        return cache[name]
    return text


def greedy(client, model: str, max_tokens: int = MAX_TOKENS) -> str:
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens,
                                     temperature=0, **NO_EOS).choices[0].text


def model_ids(client) -> set[str]:
    return {card.id for card in client.models.list().data}


def test_first_request_loads_the_adapter_then_it_is_listed(resolver_server, reference):
    client, name = resolver_server.client(), tenant(1)
    assert name not in model_ids(client)
    assert greedy(client, name) == reference(name)
    card = next(c for c in client.models.list().data if c.id == name)
    assert (card.parent, card.root) == ("demo", name)  # the path is not shown to clients
    assert greedy(client, name) == reference(name)


def test_names_not_in_the_directory_are_the_usual_404(resolver_server, resolver_dir, outside):
    (resolver_dir / "a-file").write_text("not a directory")
    (resolver_dir / "escape").symlink_to(outside, target_is_directory=True)
    with resolver_server.http() as http:
        for name in ("nope", "../" + resolver_dir.name + "/" + tenant(2), f"./{tenant(2)}",
                     ".", "..", f"{tenant(2)}/", "a-file", "escape", str(resolver_dir / tenant(2))):
            reply = http.post("/v1/completions", json={"model": name, "prompt": PROMPT,
                                                       "max_tokens": 2})
            assert reply.status_code == 404, (name, reply.text)
            shown = name.replace(str(resolver_dir), "<lora-resolver-dir>")  # --redact-paths
            assert reply.json()["error"] == {"message": NOT_FOUND.format(shown),
                                             "type": "NotFoundError", "param": "model",
                                             "code": 404}, name
    assert not {"escape", "a-file"} & model_ids(resolver_server.client())


def test_bad_adapter_directories_are_4xx_naming_the_problem_and_retried(
        resolver_server, resolver_dir, outside):
    client = resolver_server.client()
    write_bad_adapter("nan_weights", outside, resolver_dir / "broken")
    linked = resolver_dir / "linked-file"  # a directory inside whose weights link outside
    linked.mkdir()
    shutil.copy(outside / "adapter_config.json", linked)
    (linked / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    shutil.copytree(outside, resolver_dir / "comma,name")
    (resolver_dir / "empty").mkdir()
    expected = {"broken": (openai.BadRequestError, "NaN"),
                "linked-file": (openai.PermissionDeniedError, "allowed"),
                "comma,name": (openai.BadRequestError, "','"),
                "empty": (openai.BadRequestError, "adapter_config.json")}
    for name, (error, word) in expected.items():
        for _ in range(2):  # a failed load is not remembered: the second request reads again
            with pytest.raises(error) as caught:
                greedy(client, name)
            message = caught.value.body["message"]
            assert f"adapter '{name}'" in message or repr(name) in message, message
            assert word in message and str(resolver_dir) not in message, message
    shutil.rmtree(resolver_dir / "broken")
    shutil.copytree(outside, resolver_dir / "broken")  # fixed on disk: now it loads
    assert greedy(client, "broken") == greedy(client, "broken")
    assert "broken" in model_ids(client) and "empty" not in model_ids(client)


def test_concurrent_first_requests_share_one_load(resolver_server, reference):
    client, name = resolver_server.client(), tenant(3)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: greedy(client, name), range(8)))
    assert answers == [reference(name)] * 8
    loads = [line for line in resolver_server.log.read_text().splitlines()
             if f"adapter {name} registered" in line]
    assert len(loads) == 1, loads


class WarmStream:
    """One long greedy stream of a warm adapter in its own thread: when each chunk arrived."""

    def __init__(self, server, model: str = "demo-2d") -> None:
        self.client, self.model = server.client(), model
        self.times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="warm-stream", daemon=True)

    def __enter__(self) -> WarmStream:
        self._thread.start()
        while len(self.times) < 20 and self._thread.is_alive():
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        stream = self.client.completions.create(model=self.model, prompt=PROMPT,
                                                max_tokens=1800, temperature=0, stream=True,
                                                **NO_EOS)
        with stream:
            for _ in stream:
                self.times.append(time.monotonic())
                if self._stop.is_set():
                    return

    def gaps(self, start: float, end: float) -> list[float]:
        """Waits between chunks over [start, end], from the last chunk before start to the
        first one after end (or now, if none came)."""
        times = list(self.times)
        lo = max(bisect.bisect_left(times, start) - 1, 0)
        hi = bisect.bisect_right(times, end)
        window = times[lo:hi + 1] if hi < len(times) else [*times[lo:], time.monotonic()]
        return [b - a for a, b in zip(window, window[1:])]


def _steps(server) -> float:
    return value(scrape(server), "loramux_engine_steps_total")


# As in tests/reliability: on a quiet machine LORAMUX_STALL_S=0.5 holds; on shared cores a busy
# neighbour alone can stretch one step to half a second or more.
STALL_FLOOR_S = float(os.environ.get("LORAMUX_STALL_S", "2.0"))


def _stall(stream: WarmStream, start: float, end: float, steps: float) -> dict:
    """The warm stream's waits in [start, end], against the engine steps run meanwhile."""
    gaps = sorted(stream.gaps(start, end))
    step_s = (end - start) / steps
    return {"seconds": round(end - start, 2), "steps": steps, "warm_chunks": len(gaps) - 1,
            "step_ms": round(1e3 * step_s, 1), "max_gap_ms": round(1e3 * gaps[-1], 1),
            "max_gap_steps": round(gaps[-1] / step_s, 2),
            "median_gap_steps": round(gaps[len(gaps) // 2] / step_s, 2)}


def assert_no_stall(measured: dict) -> None:
    """The warm stream advanced in (nearly) every step of the window (a token that decodes to
    no text sends no chunk), and none of its waits was longer than a few mean steps."""
    assert measured["warm_chunks"] >= 0.9 * measured["steps"] - 3, measured
    bound_ms = max(3 * measured["step_ms"], 1e3 * STALL_FLOOR_S)
    assert measured["max_gap_ms"] <= bound_ms, measured


def _phase(server, stream: WarmStream, names: list[str], reference) -> dict:
    """Each name three times, in random order, from 6 clients at once, while the warm stream
    runs: every answer checked, the stream's waits measured."""
    order = random.Random(len(names)).sample(names * 3, len(names) * 3)
    client = server.client()
    steps, start = _steps(server), time.monotonic()
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda name: (name, greedy(client, name)), order))
    end, steps = time.monotonic(), _steps(server) - steps
    wrong = [(name, text) for name, text in answers if text != reference(name)]
    return {"requests": len(order), "wrong": wrong, **_stall(stream, start, end, steps)}


def test_cold_loads_of_20_of_200_adapters_under_load_are_correct_and_never_stall_a_warm_stream(
        resolver_server, reference):
    """Acceptance: the 20 names load on their first requests (the cold phase), then the same
    traffic runs again with all 20 registered (the warm phase: slot churn, no disk reads)."""
    names = [tenant(i) for i in random.Random(0).sample(range(10, NUM_ADAPTERS), NUM_USED)]
    assert len({reference(name) for name in names}) >= NUM_USED - 1  # mix-ups would show
    with WarmStream(resolver_server) as stream:
        cold = _phase(resolver_server, stream, names, reference)
        warm = _phase(resolver_server, stream, names, reference)
    logger.warning("resolver cold phase %s; warm phase %s", json.dumps(cold), json.dumps(warm))
    assert cold["wrong"] == [] and warm["wrong"] == []
    assert set(names) <= model_ids(resolver_server.client())
    assert_no_stall(cold)


def test_a_slow_cold_load_does_not_hold_up_a_warm_stream(resolver_server, resolver_dir, outside):
    """An adapter whose weights file is a FIFO: reading it blocks until the test opens the
    other end, 2 s past the stall bound (a slow network disk). The warm stream goes on
    meanwhile; the load then fails cleanly (not a regular file)."""
    slow = resolver_dir / "slow"
    slow.mkdir()
    shutil.copy(outside / "adapter_config.json", slow)
    os.mkfifo(slow / "adapter_model.safetensors")
    client = resolver_server.client()
    with WarmStream(resolver_server) as stream, ThreadPoolExecutor(1) as pool:
        steps, start = _steps(resolver_server), time.monotonic()
        cold = pool.submit(greedy, client, "slow")
        try:
            time.sleep(STALL_FLOOR_S + 2)
            assert not cold.done()
        finally:
            os.close(os.open(slow / "adapter_model.safetensors", os.O_WRONLY))
        end, steps = time.monotonic(), _steps(resolver_server) - steps
        with pytest.raises(openai.BadRequestError, match="not a regular file"):
            cold.result(timeout=60)
    measured = _stall(stream, start, end, steps)
    logger.warning("a blocked cold load under a warm stream: %s", json.dumps(measured))
    assert_no_stall(measured)


def test_vllm_resolver_environment_is_honoured_as_vllm_does(monkeypatch, tmp_path):
    """VLLM_LORA_RESOLVER_CACHE_DIR counts with VLLM_ALLOW_RUNTIME_LORA_UPDATING on and the
    lora_filesystem_resolver plugin loaded (VLLM_PLUGINS unset or naming it)."""
    adapters = tmp_path / "adapters"
    adapters.mkdir()

    def parse(*argv: str):
        return settings_from_args(build_parser().parse_args(["serve", str(tmp_path),
                                                             "--enable-lora", *argv]))
    for var in ("VLLM_PLUGINS", "VLLM_ALLOW_RUNTIME_LORA_UPDATING"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("VLLM_LORA_RESOLVER_CACHE_DIR", str(adapters))
    assert parse().lora_resolver_dir is None
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" in resolver_env_ignored(parse())
    assert parse("--lora-resolver-dir", str(tmp_path)).lora_resolver_dir == tmp_path
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "true")
    assert parse().lora_resolver_dir == adapters and resolver_env_ignored(parse()) is None
    assert parse().hides_paths  # clients name adapters, so they see no server paths
    monkeypatch.setenv("VLLM_PLUGINS", "lora_filesystem_resolver, other")
    assert parse().lora_resolver_dir == adapters
    monkeypatch.setenv("VLLM_PLUGINS", "other")
    assert parse().lora_resolver_dir is None and resolver_env_ignored(parse()) is None
    with pytest.raises(SettingsError, match="not a directory"):
        parse("--lora-resolver-dir", str(tmp_path / "missing"))
    with pytest.raises(SettingsError, match="needs --enable-lora"):
        settings_from_args(build_parser().parse_args(
            ["serve", str(tmp_path), "--lora-resolver-dir", str(adapters)]))
