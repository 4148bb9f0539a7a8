"""The Gateway API Inference Extension's model-server protocol (its proposal 003, and what its
endpoint picker's metrics extractor reads), checked against a real server: OpenAI completions
and chat with the adapter in `model`, `/v1/models` with `parent`, and the metrics by name, type
and label semantics, read the way the extractor reads them, while two adapters hold both GPU
slots (--max-loras 2) and a third one waits.
"""

from __future__ import annotations

import threading
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.adapters import make_2d_adapter

GAUGES = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
          "vllm:lora_requests_info", "vllm:cache_config_info")


def epp_view(text: str) -> dict:
    """What the extractor takes from one scrape: each metric's family must be a gauge; of
    vllm:lora_requests_info the series with the latest value (a timestamp) counts, its adapter
    lists split on commas and trimmed, max_lora an integer; block_size from cache_config_info."""
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in GAUGES:
        assert families[name].type == "gauge", (name, families[name].type)

    def one(name: str):
        (sample,) = families[name].samples
        return sample
    lora = max(families["vllm:lora_requests_info"].samples, key=lambda s: s.value)

    def adapters(label: str) -> set[str]:
        return {a.strip() for a in lora.labels[label].split(",") if a.strip()}
    return {"waiting": int(one("vllm:num_requests_waiting").value),
            "running": int(one("vllm:num_requests_running").value),
            "kv_usage": one("vllm:kv_cache_usage_perc").value,
            "active_adapters": adapters("running_lora_adapters"),
            "waiting_adapters": adapters("waiting_lora_adapters"),
            "max_active": int(lora.labels["max_lora"]), "lora_updated": lora.value,
            "block_size": int(one("vllm:cache_config_info").labels["block_size"])}


def _hold(server, model: str, started: threading.Event, stop: threading.Event) -> None:
    """A long stream of `model` that holds its slot until `stop`."""
    body = {"model": model, "prompt": "the model", "max_tokens": 1500, "temperature": 0,
            "stream": True, "ignore_eos": True}
    with server.http() as http, http.stream("POST", "/v1/completions", json=body) as reply:
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                started.set()
            if stop.is_set():
                return


def _complete(server, model: str) -> None:
    with server.http() as http:
        assert http.post("/v1/completions", json={"model": model, "prompt": "the model",
                                                  "max_tokens": 2}).status_code == 200


def test_openai_routes_take_the_adapter_in_model(server, client):
    assert client.completions.create(model="demo-2d", prompt="the model",
                                     max_tokens=4).choices[0].text
    assert client.chat.completions.create(
        model="demo-3d", messages=[{"role": "user", "content": "hello"}],
        max_tokens=4).choices[0].message.content is not None


def test_models_list_adapters_with_their_parent(client):
    cards = {card.id: card for card in client.models.list().data}
    assert cards["demo"].parent is None
    adapters = [card for card in cards.values() if card.id != "demo"]
    assert {"demo-2d", "demo-3d"} <= {card.id for card in adapters}
    assert all(card.parent == "demo" and card.object == "model" for card in adapters)


def test_metrics_as_the_endpoint_picker_reads_them(server, hf_demo, adapter_root):
    path = make_2d_adapter(hf_demo, adapter_root / "gie-third", r=4, seed=41)
    with server.http() as http:
        assert http.post("/v1/load_lora_adapter", json={
            "lora_name": "gie-third", "lora_path": str(path)}).status_code == 200
        idle = epp_view(http.get("/metrics").text)
        assert (idle["max_active"], idle["block_size"]) == (2, 16)
        assert 0 <= idle["kv_usage"] <= 1
        stop, holders = threading.Event(), []
        for model in ("demo-2d", "demo-3d"):
            started = threading.Event()
            holders.append(threading.Thread(target=_hold, args=(server, model, started, stop)))
            holders[-1].start()
            assert started.wait(60), model
        third = threading.Thread(target=_complete, args=(server, "gie-third"))
        third.start()
        try:
            deadline = time.monotonic() + 30
            while (busy := epp_view(http.get("/metrics").text))["waiting"] == 0 \
                    and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            stop.set()
            for thread in (*holders, third):
                thread.join(60)
        assert busy["active_adapters"] == {"demo-2d", "demo-3d"}, busy
        assert busy["waiting_adapters"] == {"gie-third"}, busy
        assert (busy["running"], busy["waiting"]) == (2, 1), busy
        assert 0 < busy["kv_usage"] <= 1 and busy["lora_updated"] >= idle["lora_updated"]
        assert http.post("/v1/unload_lora_adapter",
                         json={"lora_name": "gie-third"}).status_code == 200
