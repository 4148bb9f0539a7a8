"""The ingress's merging of replica answers (no Ray needed): metrics and model lists."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from loramux.ray_serve.fanout import merge_metrics, union_models


def _exposition(running: float, adapters: str) -> str:
    registry = CollectorRegistry()
    Gauge("vllm:num_requests_running", "Running.", ["model_name"],
          registry=registry).labels("demo").set(running)
    Counter("loramux_adapter_reads", "Reads.", registry=registry).inc(3)
    Histogram("loramux_e2e_request_latency_seconds", "Latency.", ["adapter"], buckets=(1.0,),
              registry=registry).labels("a").observe(0.5)
    Gauge("vllm:lora_requests_info", "Info.", ["running_lora_adapters"],
          registry=registry).labels(adapters).set(1.7e9)
    return generate_latest(registry).decode()


def test_merged_metrics_keep_each_family_once_with_every_replica_labelled():
    text = merge_metrics({"r1": _exposition(2, "a"), "r2": _exposition(5, "b,c")}).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert text.count("# TYPE vllm:num_requests_running gauge") == 1
    running = {s.labels["replica"]: s.value for s in families["vllm:num_requests_running"].samples}
    assert running == {"r1": 2, "r2": 5}
    assert families["loramux_adapter_reads"].type == "counter"
    assert {s.labels["replica"] for s in families["loramux_adapter_reads"].samples} == {"r1", "r2"}
    buckets = [s for s in families["loramux_e2e_request_latency_seconds"].samples
               if s.name.endswith("_bucket")]
    assert {(s.labels["replica"], s.labels["le"]) for s in buckets} == {
        ("r1", "1.0"), ("r1", "+Inf"), ("r2", "1.0"), ("r2", "+Inf")}
    lora = {s.labels["replica"]: s.labels["running_lora_adapters"]
            for s in families["vllm:lora_requests_info"].samples}
    assert lora == {"r1": "a", "r2": "b,c"}


def test_model_lists_union_with_the_base_first_and_each_adapter_once():
    base = {"id": "demo", "parent": None}
    lists = [{"data": [base, {"id": "a", "parent": "demo"}]},
             {"data": [{"id": "b", "parent": "demo"}, base, {"id": "a", "parent": "demo"}]}]
    merged = union_models(lists)
    assert [card["id"] for card in merged["data"]] == ["demo", "a", "b"]
    assert merged["object"] == "list"
