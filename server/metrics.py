"""Prometheus metrics on the server's own registry, under vLLM's names and under ours.

vLLM's (`vllm:*`, vllm/v1/metrics/loggers.py): the names, labels (`model_name`: the first served
name, as vLLM labels every request, adapters' too; `engine`: "0") and histogram buckets of
vLLM's Prometheus logger, so dashboards, autoscalers and routers built for vLLM read them as
they are. Ours (`loramux_*`) are labelled `adapter` with the `model` the client asked for.
Engine state (queues, KV cache, adapter slots and residency) is read from `engine.stats()` at
scrape time; per-request counters and histograms are recorded as outputs stream by.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from loramux.engine.request import RequestOutput, SamplingParams

# vLLM's bucket families (vllm/v1/metrics/buckets.py)
VLLM_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                     5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
VLLM_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0)
VLLM_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                        50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
VLLM_N_BUCKETS = (1, 2, 5, 10, 20)
VLLM_FINISH_REASONS = ("stop", "length", "abort", "error")
# ours, finer at the low end
_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                240.0, 480.0)
RESIDENCY_TIERS = ("gpu", "cpu", "disk")
_VLLM_LABELS = ["model_name", "engine"]


def token_buckets(max_model_len: int) -> list[int]:
    """vLLM's 1-2-5 series up to max_model_len (build_1_2_5_buckets)."""
    buckets, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_model_len:
                return buckets
            buckets.append(mantissa * scale)
        scale *= 10


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


class EngineStatsCollector(Collector):
    """Reads engine.stats() once per scrape."""

    def __init__(self, engine, model_name: str) -> None:
        self.engine, self.labels = engine, [model_name, "0"]

    def _vllm(self, family, name: str, doc: str, value: float):
        metric = family(name, doc, labels=_VLLM_LABELS)
        metric.add_metric(self.labels, value)
        return metric

    def collect(self) -> Iterator[Metric]:
        s = self.engine.stats()
        g, c = GaugeMetricFamily, CounterMetricFamily
        yield self._vllm(g, "vllm:num_requests_running", "Requests in the running batch.",
                         s.num_running)
        yield self._vllm(g, "vllm:num_requests_waiting", "Requests waiting to run.",
                         s.num_waiting)
        yield self._vllm(g, "vllm:kv_cache_usage_perc",
                         "Fraction of KV-cache blocks in use (1 means 100 percent).",
                         s.kv_cache_usage)
        yield self._vllm(c, "vllm:num_preemptions", "Requests preempted for KV space.",
                         s.preemptions_total)
        yield self._vllm(c, "vllm:prefix_cache_queries",
                         "Prefix cache queries, in tokens looked up.",
                         s.prefix_cache_queries_total)
        yield self._vllm(c, "vllm:prefix_cache_hits", "Prefix cache hits, in tokens found.",
                         s.prefix_cache_hits_total)
        yield self._cache_config(s)
        info = GaugeMetricFamily(
            "vllm:lora_requests_info", "Running and waiting adapters; value is a timestamp.",
            labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])
        info.add_metric([",".join(s.running_lora_adapters), ",".join(s.waiting_lora_adapters),
                         str(s.max_loras)], time.time())
        yield info
        yield from self._loramux(s)

    def _cache_config(self, s) -> Metric:
        """vLLM's CacheConfig as labels of a gauge set to 1 (routers read block_size)."""
        config = {"block_size": str(s.block_size), "num_gpu_blocks": str(s.kv_blocks_total),
                  "cache_dtype": "auto", "enable_prefix_caching": str(s.prefix_caching),
                  "engine": self.labels[1]}
        info = GaugeMetricFamily("vllm:cache_config_info", "The engine's KV-cache config.",
                                 labels=list(config))
        info.add_metric(list(config.values()), 1.0)
        return info

    def _loramux(self, s) -> Iterator[Metric]:
        yield _gauge("loramux_lora_slots_used", "GPU adapter slots holding an adapter.",
                     s.slots_used)
        yield _gauge("loramux_lora_slots", "GPU adapter slots (--max-loras).", s.max_loras)
        yield _counter("loramux_adapter_loads", "Adapter loads into GPU slots.",
                       s.adapter_loads_total)
        yield _counter("loramux_adapter_evictions", "Adapters evicted from GPU slots.",
                       s.adapter_evictions_total)
        yield _counter("loramux_adapter_reads", "Reads of adapter files from disk (loads, and "
                       "re-reads after leaving the CPU cache).", s.adapter_reads_total)
        yield _counter("loramux_preemptions", "Requests preempted for KV space.",
                       s.preemptions_total)
        yield _gauge("loramux_engine_alive", "1 while the engine loop runs.", int(s.is_alive))
        yield _counter("loramux_engine_steps", "Engine steps that ran the model.",
                       s.steps_total)
        residency = GaugeMetricFamily("loramux_adapter_residency",
                                      "1 for the tier (gpu, cpu, disk) holding each adapter.",
                                      labels=["adapter", "tier"])
        for adapter, where in sorted(s.adapter_residency.items()):
            for tier in RESIDENCY_TIERS:
                residency.add_metric([adapter, tier], float(where == tier))
        yield residency


class VllmRequestMetrics:
    """vLLM's per-request series, all under one model_name (the base's first served name)."""

    def __init__(self, registry: CollectorRegistry, model_name: str, max_model_len: int) -> None:
        labels, r, tokens = _VLLM_LABELS, registry, token_buckets(max_model_len)
        values = (model_name, "0")

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r).labels(*values)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=r).labels(*values)

        self.prompt_tokens = counter("vllm:prompt_tokens", "Prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Generation tokens.")
        success = Counter("vllm:request_success", "Finished requests by finish reason.",
                          [*labels, "finished_reason"], registry=r)
        self.success = {reason: success.labels(*values, reason)
                        for reason in VLLM_FINISH_REASONS}
        self.request_prompt_tokens = histogram("vllm:request_prompt_tokens",
                                               "Prompt tokens per request.", tokens)
        self.request_generation_tokens = histogram("vllm:request_generation_tokens",
                                                   "Generated tokens per request.", tokens)
        self.max_num_generation_tokens = histogram(
            "vllm:request_max_num_generation_tokens",
            "Most tokens generated by one of a request's n sequences.", tokens)
        self.params_n = histogram("vllm:request_params_n", "The n request parameter.",
                                  VLLM_N_BUCKETS)
        self.params_max_tokens = histogram("vllm:request_params_max_tokens",
                                           "The max_tokens request parameter.", tokens)
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Time to first token.",
                              VLLM_TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Inter-token latency.",
                             VLLM_ITL_BUCKETS)
        self.tpot = histogram("vllm:time_per_output_token_seconds",
                              "Time per output token (vLLM's older name of the inter-token "
                              "latency).", VLLM_ITL_BUCKETS)
        self.request_tpot = histogram("vllm:request_time_per_output_token_seconds",
                                      "Mean time per output token of each request.",
                                      VLLM_ITL_BUCKETS)
        phases = {"e2e": ("vllm:e2e_request_latency_seconds", "End-to-end request latency."),
                  "queue": ("vllm:request_queue_time_seconds", "Time waiting to be scheduled."),
                  "inference": ("vllm:request_inference_time_seconds",
                                "Time from first scheduled to the last token."),
                  "prefill": ("vllm:request_prefill_time_seconds",
                              "Time from first scheduled to the first token."),
                  "decode": ("vllm:request_decode_time_seconds",
                             "Time from the first token to the last.")}
        self.phases = {key: histogram(name, doc, VLLM_LATENCY_BUCKETS)
                       for key, (name, doc) in phases.items()}


class ServerMetrics:
    """The registry /metrics renders, and the per-request instruments."""

    def __init__(self, engine, model_name: str) -> None:
        disable_created_metrics()  # vLLM exposes no *_created series either
        self.registry = CollectorRegistry()
        r, by_adapter = self.registry, ["adapter"]
        self.requests = Counter("loramux_requests", "Finished requests by adapter and reason.",
                                ["adapter", "finish_reason"], registry=r)
        self.prompt_tokens = Counter("loramux_prompt_tokens", "Prompt tokens.", by_adapter,
                                     registry=r)
        self.generation_tokens = Counter("loramux_generation_tokens", "Generated tokens.",
                                         by_adapter, registry=r)
        self.aborts = Counter("loramux_request_aborts",
                              "Requests aborted because the client went away.", by_adapter,
                              registry=r)
        self.ttft = Histogram("loramux_time_to_first_token_seconds", "Time to first token.",
                              by_adapter, buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("loramux_inter_token_latency_seconds", "Time between tokens.",
                             by_adapter, buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("loramux_e2e_request_latency_seconds", "Request latency.",
                             by_adapter, buckets=_E2E_BUCKETS, registry=r)
        self.vllm = VllmRequestMetrics(r, model_name, engine.max_model_len)
        r.register(EngineStatsCollector(engine, model_name))
        self._per_adapter = (self.prompt_tokens, self.generation_tokens, self.aborts, self.ttft,
                             self.itl, self.e2e)
        self._reasons: dict[str, set[str]] = {}  # finish reasons seen per live label value
        self._live: set[str] = set()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def timer(self, adapter: str) -> RequestTimer:
        return RequestTimer(self, adapter)

    def track(self, name: str) -> None:
        """Give `name` (a served base name or a registered adapter) per-request series; only
        tracked names get any, so the series are bounded by what is loaded."""
        self._live.add(name)
        self._reasons.setdefault(name, set())

    def forget(self, name: str) -> None:
        """Drop every series of an unloaded adapter (a later load starts them from zero)."""
        self._live.discard(name)
        series = [(self.requests, (name, reason)) for reason in self._reasons.pop(name, ())]
        for metric, labels in series + [(m, (name,)) for m in self._per_adapter]:
            try:
                metric.remove(*labels)
            except KeyError:  # no series yet (prometheus-client < 0.21 raises)
                pass

    def is_live(self, name: str) -> bool:
        return name in self._live

    def count_finished(self, adapter: str, reason: str) -> None:
        self._reasons[adapter].add(reason)
        self.requests.labels(adapter, reason).inc()


class RequestTimer:
    """Times one engine request from submission; fed every RequestOutput it yields."""

    def __init__(self, metrics: ServerMetrics, adapter: str) -> None:
        self.metrics, self.adapter = metrics, adapter
        self.start = self.last = time.monotonic()
        self.num_tokens = 0
        self.params: SamplingParams | None = None

    def submitted(self, params: SamplingParams) -> None:
        self.params = params

    def observe(self, out: RequestOutput) -> None:
        now, v = time.monotonic(), self.metrics.vllm
        # tokens each sequence gained (the n choices of a request advance together)
        new = max((len(choice.token_ids_delta) for choice in out.outputs), default=0)
        live = self.metrics.is_live(self.adapter)  # not unloaded while this request ran
        if new and self.num_tokens == 0:
            v.ttft.observe(now - self.start)
            if live:
                self.metrics.ttft.labels(self.adapter).observe(now - self.start)
        elif new:
            for _ in range(new):
                gap = (now - self.last) / new
                v.itl.observe(gap)
                v.tpot.observe(gap)
                if live:
                    self.metrics.itl.labels(self.adapter).observe(gap)
        if new:
            self.num_tokens, self.last = self.num_tokens + new, now
        if out.finished:
            self._finish_vllm(out, now)
            if live:
                self._finish(out, now)

    def _finish(self, out: RequestOutput, now: float) -> None:
        m, adapter = self.metrics, self.adapter
        reason = out.outputs[0].finish_reason if out.outputs else None
        m.count_finished(adapter, reason or "unknown")
        m.prompt_tokens.labels(adapter).inc(len(out.prompt_token_ids))
        m.generation_tokens.labels(adapter).inc(sum(len(c.token_ids) for c in out.outputs))
        m.e2e.labels(adapter).observe(now - self.start)

    def _finish_vllm(self, out: RequestOutput, now: float) -> None:
        v, times = self.metrics.vllm, out.metrics
        generated = [len(c.token_ids) for c in out.outputs]
        reason = out.outputs[0].finish_reason if out.outputs else None
        v.success.get(reason or "error", v.success["error"]).inc()
        v.prompt_tokens.inc(len(out.prompt_token_ids))
        v.generation_tokens.inc(sum(generated))
        v.request_prompt_tokens.observe(len(out.prompt_token_ids))
        v.request_generation_tokens.observe(sum(generated))
        v.max_num_generation_tokens.observe(max(generated, default=0))
        if self.params is not None:
            v.params_n.observe(self.params.n)
            if self.params.max_tokens is not None:
                v.params_max_tokens.observe(self.params.max_tokens)
        v.phases["e2e"].observe(now - self.start)
        scheduled, first = times.get("scheduled"), times.get("first_token")
        last = times.get("last_token", first)
        if scheduled is not None:
            v.phases["queue"].observe(scheduled - times.get("arrival", scheduled))
        if scheduled is not None and first is not None:
            v.phases["prefill"].observe(first - scheduled)
            v.phases["inference"].observe(last - scheduled)
            v.phases["decode"].observe(last - first)
            if max(generated, default=0) > 1:
                v.request_tpot.observe((last - first) / (max(generated) - 1))

    def aborted(self) -> None:
        if self.metrics.is_live(self.adapter):
            self.metrics.aborts.labels(self.adapter).inc()
