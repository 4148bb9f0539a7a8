"""loramux behind Ray Serve (deploy/ray/serve.yaml's application, 2 replicas of the demo on CPU):
the README's requests through the ingress with the openai SDK, answers equal to the
single-process server's, adapter affinity, load / unload on every replica, /v1/models as the
union, metrics labelled by replica, disconnects, and a replica killed mid-stream.

One Ray cluster for the module, started by this process (ray.init) and stopped at its end.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import yaml

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from loramux.ray_serve.app import build_app  # noqa: E402
from tests.adapters import make_2d_adapter  # noqa: E402
from tests.server.conftest import free_port  # noqa: E402
from tests.server.test_metrics import value  # noqa: E402

pytestmark = pytest.mark.ray

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "ray" / "serve.yaml"
RESOLVER_DIR_IN_CONFIG = "/tmp/loramux-adapters"
PROMPT = "the expert adapter"
NO_EOS = {"extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def resolver_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("shared-adapters")


@pytest.fixture(scope="module")
def ingress(server_env, resolver_dir):
    """serve.yaml's application with the resolver directory here; its URL."""
    app_config = yaml.safe_load(CONFIG.read_text())["applications"][0]
    assert app_config["import_path"] == "loramux.ray_serve.app:build_app"
    args = app_config["args"]
    args["serve_args"] = args["serve_args"].replace(RESOLVER_DIR_IN_CONFIG, str(resolver_dir))
    os.environ.update({**server_env, **app_config["runtime_env"]["env_vars"]})  # for workers
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name="loramux", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def client(ingress) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{ingress}/v1", api_key="none", max_retries=0, timeout=120)


def scrape(ingress) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families
    text = httpx.get(f"{ingress}/metrics", timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def replicas_holding(ingress, adapter: str) -> set[str]:
    """Replicas where the adapter is registered (any tier), from the merged metrics."""
    return {dict(labels)["replica"] for (name, labels), v in scrape(ingress).items()
            if name == "loramux_adapter_residency" and dict(labels)["adapter"] == adapter
            and v == 1}


def greedy(client, model: str, max_tokens: int = 8) -> str:
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens,
                                     temperature=0, **NO_EOS).choices[0].text


def test_the_readme_requests_work_through_the_ingress(client):
    cards = {card.id: card for card in client.models.list().data}
    assert set(cards) == {"demo", "demo-2d", "demo-3d"}
    assert cards["demo-2d"].parent == "demo" and cards["demo"].parent is None
    reply = client.chat.completions.create(
        model="demo-2d", messages=[{"role": "user", "content": "hello, who are you?"}],
        max_tokens=16, temperature=0)
    assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
    completion = client.completions.create(model="demo-3d", prompt="the model", max_tokens=16,
                                           logprobs=2)
    assert len(completion.choices[0].logprobs.top_logprobs[0]) == 2
    chunks = list(client.chat.completions.create(
        model="demo-3d", messages=[{"role": "user", "content": "tell me a story"}],
        max_tokens=16, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].usage.completion_tokens == 16


def test_answers_equal_the_single_process_servers(client, open_server):
    single = open_server.client()
    for model in ("demo", "demo-2d", "demo-3d"):
        assert greedy(client, model, 12) == greedy(single, model, 12), model


def test_an_adapter_loads_on_one_replica_and_its_requests_stay_there(
        client, ingress, resolver_dir, hf_demo):
    make_2d_adapter(hf_demo, resolver_dir / "affine", r=4, seed=31)
    answers = {greedy(client, "affine") for _ in range(6)}
    assert len(answers) == 1 and answers != {greedy(client, "demo")}
    assert len(replicas_holding(ingress, "affine")) == 1
    assert "affine" in {card.id for card in client.models.list().data}


def test_load_and_unload_act_on_every_replica(client, ingress, hf_demo, tmp_path):
    path = make_2d_adapter(hf_demo, tmp_path / "everywhere", r=4, seed=32)
    with httpx.Client(base_url=ingress, timeout=60) as http:
        added = http.post("/v1/load_lora_adapter",
                          json={"lora_name": "everywhere", "lora_path": str(path)})
        assert (added.status_code, added.text) == (
            200, "Success: LoRA adapter 'everywhere' added successfully.")
        assert len(replicas_holding(ingress, "everywhere")) == 2
        again = http.post("/v1/load_lora_adapter",
                          json={"lora_name": "everywhere", "lora_path": str(path)})
        assert again.status_code == 400 and "already been loaded" in again.json()["error"][
            "message"]
        assert greedy(client, "everywhere")
        removed = http.post("/v1/unload_lora_adapter", json={"lora_name": "everywhere"})
        assert removed.status_code == 200
    assert replicas_holding(ingress, "everywhere") == set()
    with pytest.raises(openai.NotFoundError):
        greedy(client, "everywhere")


def test_metrics_name_their_replica(ingress):
    samples = scrape(ingress)
    info = [dict(labels) for (name, labels) in samples if name == "vllm:lora_requests_info"]
    assert len({i["replica"] for i in info}) == 2 and all(i["max_lora"] == "2" for i in info)
    running = [dict(labels)["replica"] for (name, labels) in samples
               if name == "vllm:num_requests_running"]
    assert len(set(running)) == 2


def _running(ingress) -> float:
    return sum(v for (name, _), v in scrape(ingress).items()
               if name == "vllm:num_requests_running")


def _replica_state(ingress) -> dict:
    return {k: v for k, v in scrape(ingress).items()
            if k[0] in ("vllm:num_requests_running", "loramux_request_aborts_total")}


def _wait(check, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_a_client_that_leaves_aborts_its_request_on_the_replica(ingress):
    body = {"model": "demo-2d", "prompt": PROMPT, "max_tokens": 1500, "temperature": 0,
            "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=ingress, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body) as reply:
            lines = reply.iter_lines()  # held: a dropped iterator closes the connection
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["choices"][0]["text"]
            assert _wait(lambda: _running(ingress) == 1, timeout=10), _replica_state(ingress)
    assert _wait(lambda: _running(ingress) == 0, timeout=20), _replica_state(ingress)


def test_a_killed_replica_fails_its_streams_cleanly_and_ray_replaces_it(client, ingress):
    greedy(client, "affine")  # where the adapter lives
    (victim,) = replicas_holding(ingress, "affine")
    body = {"model": "affine", "prompt": PROMPT, "max_tokens": 1500, "temperature": 0,
            "stream": True, "ignore_eos": True}
    with ThreadPoolExecutor(1) as pool, httpx.Client(base_url=ingress, timeout=60) as http:
        whole = pool.submit(http.post, "/v1/completions", json={**body, "stream": False})
        with http.stream("POST", "/v1/completions", json=body) as reply:
            lines = reply.iter_lines()
            next(line for line in lines if line.startswith("data: {"))
            assert _wait(lambda: _running(ingress) == 2, timeout=20)
            ray.kill(_replica_actor(victim), no_restart=True)
            rest = [line for line in lines if line.startswith("data: ")]
        answer = whole.result(timeout=60)
    assert rest[-1] == "data: [DONE]" and "error" in json.loads(rest[-2][6:]), rest[-3:]
    assert answer.status_code == 503 and answer.json()["error"]["code"] == 503, answer.text
    assert greedy(client, "affine")  # the survivor loads it from the shared directory
    assert _wait(lambda: len({dict(labels)["replica"] for (name, labels) in scrape(ingress)
                              if name == "vllm:num_requests_running"}) == 2, timeout=180)
    assert victim not in {dict(labels)["replica"] for (name, labels) in scrape(ingress)
                          if name == "vllm:num_requests_running"}


def _replica_actor(replica_id: str):
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].endswith(f"#{replica_id}")]
    assert len(names) == 1, names
    return ray.get_actor(names[0], namespace="serve")
