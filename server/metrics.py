"""Prometheus metrics on the server's own registry.

Engine state (queues, KV cache, adapter slots and residency) is read from `engine.stats()` at
scrape time under vLLM's names where routers read them (`vllm:*`), ours elsewhere
(`loramux_*`). Per-request counters and latency histograms are recorded as outputs stream by,
labelled `adapter` with the `model` the client asked for (an adapter or the base name).
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

from loramux.engine.request import RequestOutput

_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                240.0, 480.0)
RESIDENCY_TIERS = ("gpu", "cpu", "disk")


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


class EngineStatsCollector(Collector):
    """Reads engine.stats() once per scrape."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        s = self.engine.stats()
        yield _gauge("vllm:num_requests_running", "Requests in the running batch.", s.num_running)
        yield _gauge("vllm:num_requests_waiting", "Requests waiting to run.", s.num_waiting)
        yield _gauge("vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).",
                     s.kv_cache_usage)
        info = GaugeMetricFamily(
            "vllm:lora_requests_info", "Running and waiting adapters; value is a timestamp.",
            labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])
        info.add_metric([",".join(s.running_lora_adapters), ",".join(s.waiting_lora_adapters),
                         str(s.max_loras)], time.time())
        yield info
        yield from self._loramux(s)

    def _loramux(self, s) -> Iterator[Metric]:
        yield _gauge("loramux_lora_slots_used", "GPU adapter slots holding an adapter.",
                     s.slots_used)
        yield _gauge("loramux_lora_slots_total", "GPU adapter slots (--max-loras).", s.max_loras)
        yield _counter("loramux_adapter_loads", "Adapter loads into GPU slots.",
                       s.adapter_loads_total)
        yield _counter("loramux_adapter_evictions", "Adapters evicted from GPU slots.",
                       s.adapter_evictions_total)
        yield _counter("loramux_preemptions", "Requests preempted for KV space.",
                       s.preemptions_total)
        yield _gauge("loramux_engine_alive", "1 while the engine loop runs.", int(s.is_alive))
        residency = GaugeMetricFamily("loramux_adapter_residency",
                                      "1 for the tier (gpu, cpu, disk) holding each adapter.",
                                      labels=["adapter", "tier"])
        for adapter, where in sorted(s.adapter_residency.items()):
            for tier in RESIDENCY_TIERS:
                residency.add_metric([adapter, tier], float(where == tier))
        yield residency


class ServerMetrics:
    """The registry /metrics renders, and the per-request instruments."""

    def __init__(self, engine) -> None:
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
        r.register(EngineStatsCollector(engine))
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
    """Times one request from submission; fed every RequestOutput it yields."""

    def __init__(self, metrics: ServerMetrics, adapter: str) -> None:
        self.metrics, self.adapter = metrics, adapter
        self.start = self.last = time.monotonic()
        self.num_tokens = 0

    def observe(self, out: RequestOutput) -> None:
        if not self.metrics.is_live(self.adapter):  # unloaded while this request ran
            return
        now = time.monotonic()
        # tokens each sequence gained (the n choices of a request advance together)
        new = max((len(choice.token_ids_delta) for choice in out.outputs), default=0)
        if new and self.num_tokens == 0:
            self.metrics.ttft.labels(self.adapter).observe(now - self.start)
        elif new:
            for _ in range(new):
                self.metrics.itl.labels(self.adapter).observe((now - self.last) / new)
        if new:
            self.num_tokens, self.last = self.num_tokens + new, now
        if out.finished:
            self._finish(out, now)

    def _finish(self, out: RequestOutput, now: float) -> None:
        m, adapter = self.metrics, self.adapter
        reason = out.outputs[0].finish_reason if out.outputs else None
        m.count_finished(adapter, reason or "unknown")
        m.prompt_tokens.labels(adapter).inc(len(out.prompt_token_ids))
        m.generation_tokens.labels(adapter).inc(sum(len(c.token_ids) for c in out.outputs))
        m.e2e.labels(adapter).observe(now - self.start)

    def aborted(self) -> None:
        if self.metrics.is_live(self.adapter):
            self.metrics.aborts.labels(self.adapter).inc()
