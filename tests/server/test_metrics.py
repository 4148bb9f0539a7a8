"""/metrics: Prometheus text that parses, vLLM's router-facing names, counters that move, and
an aborted stream that gives its KV blocks back."""

from __future__ import annotations

import json
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

NO_EOS = {"extra_body": {"ignore_eos": True}}
DEMO = {"model_name": "demo", "engine": "0"}  # vLLM's labels: the first served name


def scrape(server) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one scrape."""
    text = httpx.get(f"{server.url}/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def five_tokens(server, client, model: str, prompt: str = "the model", **labels):
    """Send a 5-token greedy completion to `model`; (its reply, the change of a sample of
    /metrics across it, with `labels` added to those asked)."""
    before = scrape(server)
    reply = client.completions.create(model=model, prompt=prompt, max_tokens=5,
                                      temperature=0, **NO_EOS)
    after = scrape(server)

    def delta(name, **more):
        return value(after, name, **labels, **more) - value(before, name, **labels, **more)
    return reply, delta


def engine_value(samples, name: str) -> float:
    """The one series of an engine-wide vllm:* gauge or counter, whatever its labels."""
    found = [v for (n, _), v in samples.items() if n == name]
    assert len(found) == 1, (name, found)
    return found[0]


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
                 "vllm:kv_cache_usage_perc", "vllm:num_preemptions_total"):
        assert (name, tuple(sorted(DEMO.items()))) in samples, name
    for name in ("loramux_lora_slots", "loramux_adapter_loads_total",
                 "loramux_adapter_evictions_total"):
        assert any(key[0] == name for key in samples), name
    info = [dict(labels) for (name, labels) in samples if name == "vllm:lora_requests_info"]
    assert len(info) == 1 and info[0]["max_lora"] == "2"
    assert set(info[0]) == {"running_lora_adapters", "waiting_lora_adapters", "max_lora"}
    assert value(samples, "loramux_lora_slots") == 2
    cache = [dict(labels) for (name, labels) in samples if name == "vllm:cache_config_info"]
    assert len(cache) == 1 and cache[0]["block_size"] == "16"  # the server's flags
    assert cache[0]["num_gpu_blocks"] == "512" and cache[0]["enable_prefix_caching"] == "True"


def test_prefix_cache_counters_count_the_tokens_a_repeated_prompt_finds(server, client):
    prompt = "the system prompt of a long story about a small model " * 4
    client.completions.create(model="demo-2d", prompt=prompt, max_tokens=1)
    reply, delta = five_tokens(server, client, "demo-2d", prompt, **DEMO)
    num_tokens = reply.usage.prompt_tokens
    assert num_tokens > 32
    assert delta("vllm:prefix_cache_queries_total") == num_tokens
    assert delta("vllm:prefix_cache_hits_total") == (num_tokens - 1) // 16 * 16


def test_vllm_histograms_have_vllms_buckets(server):
    samples = scrape(server)

    def bounds(name: str) -> list[float]:
        return sorted(float(dict(labels)["le"]) for (n, labels) in samples
                      if n == f"{name}_bucket")
    assert bounds("vllm:time_to_first_token_seconds")[:3] == [0.001, 0.005, 0.01]
    assert bounds("vllm:time_to_first_token_seconds")[-2:] == [2560.0, float("inf")]
    assert bounds("vllm:inter_token_latency_seconds")[:2] == [0.01, 0.025]
    assert bounds("vllm:e2e_request_latency_seconds")[:3] == [0.3, 0.5, 0.8]
    assert bounds("vllm:e2e_request_latency_seconds")[-2:] == [7680.0, float("inf")]
    # prompt and generation lengths: 1, 2, 5, 10, ... up to max_model_len (2048 here)
    assert bounds("vllm:request_prompt_tokens")[-3:] == [1000, 2000, float("inf")]


def test_vllm_request_metrics_move_under_the_served_name(server, client):
    reply, delta = five_tokens(server, client, "demo-3d", **DEMO)

    assert delta("vllm:request_success_total", finished_reason="length") == 1
    assert delta("vllm:generation_tokens_total") == 5
    assert delta("vllm:prompt_tokens_total") == reply.usage.prompt_tokens
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds", "request_prefill_time_seconds",
                 "request_decode_time_seconds", "request_inference_time_seconds",
                 "request_prompt_tokens", "request_generation_tokens", "request_params_n",
                 "request_params_max_tokens", "request_max_num_generation_tokens",
                 "request_time_per_output_token_seconds"):
        assert delta(f"vllm:{name}_count") == 1, name
    assert delta("vllm:inter_token_latency_seconds_count") == 4
    assert delta("vllm:time_per_output_token_seconds_count") == 4
    assert delta("vllm:request_generation_tokens_sum") == 5
    assert delta("vllm:request_params_max_tokens_sum") == 5
    e2e = delta("vllm:e2e_request_latency_seconds_sum")
    phases = delta("vllm:request_queue_time_seconds_sum") + delta(
        "vllm:request_inference_time_seconds_sum")
    assert 0 < phases <= e2e  # queue + inference happen inside the request's lifetime


def test_request_counters_and_histograms_move(server, client):
    reply, delta = five_tokens(server, client, "demo-2d")

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
    assert value(busy, "vllm:num_requests_running", **DEMO) == 1
    assert value(busy, "vllm:kv_cache_usage_perc", **DEMO) > 0
    assert "demo-3d" in [dict(labels)["running_lora_adapters"]
                         for (name, labels) in busy if name == "vllm:lora_requests_info"]

    def freed(samples) -> bool:
        return (value(samples, "vllm:num_requests_running", **DEMO) == 0
                and value(samples, "vllm:kv_cache_usage_perc", **DEMO) == 0
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
    assert value(after, "vllm:num_requests_running", **DEMO) == 0
    assert value(after, "vllm:kv_cache_usage_perc", **DEMO) == 0
