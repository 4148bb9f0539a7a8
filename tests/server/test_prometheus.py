"""A real Prometheus (deploy/prometheus.yml, pointed at a real loramux server) answers every
query of vLLM's Grafana dashboard with series, so a dashboard built for vLLM is not blank."""

from __future__ import annotations

import shutil
import subprocess
import time

import httpx
import pytest
import yaml

from tests.server.conftest import free_port
from tests.server.test_deploy import ROOT
from tests.server.test_metrics import scrape

PROMETHEUS = shutil.which("prometheus")
WINDOW = "30s"  # the dashboard's $__rate_interval

# The metric names vLLM's "vLLM" Grafana dashboard (examples/observability/prometheus_grafana in
# vLLM's repository) queries, each with the shape of the panel's PromQL: a histogram's
# quantiles and mean, a counter's rate, a gauge as it is, a heatmap's increase by bucket, the
# finish reasons' increase.
DASHBOARD = (
    ("histogram", "vllm:e2e_request_latency_seconds"),
    ("histogram", "vllm:inter_token_latency_seconds"),
    ("histogram", "vllm:time_to_first_token_seconds"),
    ("rate", "vllm:prompt_tokens_total"),
    ("rate", "vllm:generation_tokens_total"),
    ("gauge", "vllm:num_requests_running"),
    ("gauge", "vllm:num_requests_waiting"),
    ("gauge", "vllm:kv_cache_usage_perc"),
    ("heatmap", "vllm:request_prompt_tokens_bucket"),
    ("heatmap", "vllm:request_generation_tokens_bucket"),
    ("by_reason", "vllm:request_success_total"),
    ("rate", "vllm:request_queue_time_seconds_sum"),
    ("rate", "vllm:request_prefill_time_seconds_sum"),
    ("rate", "vllm:request_decode_time_seconds_sum"),
    ("rate", "vllm:request_max_num_generation_tokens_sum"),
)
# vLLM's other names the project promises (README): present, with the served name.
ALSO = ("vllm:num_preemptions_total", "vllm:time_per_output_token_seconds_count",
        "vllm:request_inference_time_seconds_count", "vllm:request_params_n_count",
        "vllm:request_params_max_tokens_count", "vllm:request_time_per_output_token_seconds_count",
        "vllm:cache_config_info")


def queries(kind: str, name: str, model: str) -> list[str]:
    sel = f'{{model_name="{model}"}}'

    def rate(suffix: str) -> str:
        return f"rate({name}{suffix}{sel}[{WINDOW}])"
    return {
        "histogram": [f"histogram_quantile({q}, sum by(le) ({rate('_bucket')}))"
                      for q in (0.99, 0.5)] + [f"{rate('_sum')} / {rate('_count')}"],
        "rate": [rate("")],
        "gauge": [f"{name}{sel}"],
        "heatmap": [f"sum by(le) (increase({name}{sel}[{WINDOW}]))"],
        "by_reason": [f"sum by(finished_reason) (increase({name}{sel}[{WINDOW}]))"],
    }[kind]


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    if PROMETHEUS is None:
        pytest.skip("no prometheus binary on PATH (.ci/run installs Debian's prometheus)")
    work = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["scrape_configs"][0]["static_configs"] = [
        {"targets": [server.url.removeprefix("http://")]}]
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{free_port()}"
    log = (work / "prometheus.log").open("w")
    process = subprocess.Popen(
        [PROMETHEUS, f"--config.file={work / 'prometheus.yml'}",
         f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address={url[7:]}"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait(lambda: httpx.get(f"{url}/-/ready", timeout=2).status_code == 200, 60)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def _wait(ready, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if ready():
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise AssertionError("timed out")


def query(prometheus: str, expr: str) -> list[dict]:
    reply = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert reply["status"] == "success", (expr, reply)
    return reply["data"]["result"]


def test_every_dashboard_query_returns_series(prometheus, server, client):
    _wait(lambda: bool(query(prometheus, 'up{job="loramux"} == 1')), 30)
    for model in ("demo", "demo-2d", "demo-3d"):  # traffic after the first scrapes
        client.completions.create(model=model, prompt="the model", max_tokens=6)
        list(client.chat.completions.create(model=model, max_tokens=6, stream=True,
                                            messages=[{"role": "user", "content": "hi"}]))
    finished = sum(value for (name, _), value in scrape(server).items()
                   if name == "vllm:request_success_total")
    _wait(lambda: bool(query(prometheus, "sum(vllm:request_success_total{model_name=\"demo\"})"
                                         f" >= {finished}")), 30)
    time.sleep(2.5)  # two more scrapes, so every rate has samples on both sides
    empty = [expr for kind, name in DASHBOARD for expr in queries(kind, name, "demo")
             if not query(prometheus, expr)]
    empty += [name for name in ALSO if not query(prometheus, f'{name}{{model_name="demo"}}'
                                                 if name != "vllm:cache_config_info" else name)]
    assert empty == []
    names = httpx.get(f"{prometheus}/api/v1/label/model_name/values", timeout=10).json()
    assert "demo" in names["data"]  # the dashboard's model_name variable offers the model
