"""/metrics: Prometheus text that parses, vLLM's router-facing names, counters that move, and
an aborted stream that gives its KV blocks back."""

from __future__ import annotations

import json
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

NO_EOS = {"extra_body": {"ignore_eos": True}}


def scrape(server) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one scrape."""
    text = httpx.get(f"{server.url}/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(server, check, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(server)
        if check(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def test_vllm_router_metrics_are_exposed(server):
    samples = scrape(server)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc", "loramux_lora_slots_total",
                 "loramux_adapter_loads_total", "loramux_adapter_evictions_total"):
        assert any(key[0] == name for key in samples), name
    info = [dict(labels) for (name, labels) in samples if name == "vllm:lora_requests_info"]
    assert len(info) == 1 and info[0]["max_lora"] == "2"
    assert set(info[0]) == {"running_lora_adapters", "waiting_lora_adapters", "max_lora"}
    assert value(samples, "loramux_lora_slots_total") == 2


def test_request_counters_and_histograms_move(server, client):
    before = scrape(server)
    reply = client.completions.create(model="demo-2d", prompt="the model", max_tokens=5,
                                      temperature=0, **NO_EOS)
    after = scrape(server)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("loramux_requests_total", adapter="demo-2d", finish_reason="length") == 1
    assert delta("loramux_generation_tokens_total", adapter="demo-2d") == 5
    assert delta("loramux_prompt_tokens_total", adapter="demo-2d") == reply.usage.prompt_tokens
    assert delta("loramux_time_to_first_token_seconds_count", adapter="demo-2d") == 1
    assert delta("loramux_inter_token_latency_seconds_count", adapter="demo-2d") == 4
    assert delta("loramux_e2e_request_latency_seconds_count", adapter="demo-2d") == 1


def test_adapter_residency_names_one_tier(server, client):
    client.completions.create(model="demo-3d", prompt="x", max_tokens=1)
    samples = scrape(server)
    tiers = {dict(labels)["tier"]: v for (name, labels), v in samples.items()
             if name == "loramux_adapter_residency" and dict(labels)["adapter"] == "demo-3d"}
    assert set(tiers) == {"gpu", "cpu", "disk"} and sorted(tiers.values()) == [0, 0, 1]
    assert value(samples, "loramux_lora_slots_used") >= 1


def test_aborted_stream_frees_its_request_and_kv_blocks(server):
    before = scrape(server)
    body = {"model": "demo-3d", "prompt": "the model", "max_tokens": 1500, "temperature": 0,
            "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body) as reply:
            lines = reply.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["choices"][0]["text"]
            busy = scrape(server)
    assert value(busy, "vllm:num_requests_running") == 1
    assert value(busy, "vllm:kv_cache_usage_perc") > 0
    assert "demo-3d" in [dict(labels)["running_lora_adapters"]
                         for (name, labels) in busy if name == "vllm:lora_requests_info"]

    def freed(samples) -> bool:
        return (value(samples, "vllm:num_requests_running") == 0
                and value(samples, "vllm:kv_cache_usage_perc") == 0
                and value(samples, "loramux_request_aborts_total", adapter="demo-3d")
                == value(before, "loramux_request_aborts_total", adapter="demo-3d") + 1)

    after = wait_for(server, freed, timeout=5.0)
    assert freed(after), {k: v for k, v in after.items() if k[0].startswith("vllm:")}
    assert value(after, "loramux_requests_total", adapter="demo-3d", finish_reason="length") \
        == value(before, "loramux_requests_total", adapter="demo-3d", finish_reason="length")


def test_abandoned_non_streaming_request_is_aborted(server):
    before = value(scrape(server), "loramux_request_aborts_total", adapter="demo")
    body = {"model": "demo", "prompt": "the model", "max_tokens": 1500, "ignore_eos": True}
    try:
        httpx.post(f"{server.url}/v1/completions", json=body, headers=server.headers,
                   timeout=0.5)
        raise AssertionError("1500 tokens should take longer than the 0.5 s client timeout")
    except httpx.ReadTimeout:
        pass
    after = wait_for(server, lambda s: value(s, "loramux_request_aborts_total", adapter="demo")
                     == before + 1, timeout=5.0)
    assert value(after, "loramux_request_aborts_total", adapter="demo") == before + 1
    assert value(after, "vllm:num_requests_running") == 0
    assert value(after, "vllm:kv_cache_usage_perc") == 0
