"""Cold-L2 CUDA-graph timing, the method of the vLLM reference note.

Each op is captured CALLS times in one graph, each call preceded by a 256 MiB memset that
flushes L2; a second graph holds the memsets alone. Per-call time = (median replay of the first
- median replay of the second) / CALLS.
"""

from __future__ import annotations

import statistics
from typing import Callable

import torch

FLUSH_BYTES = 256 << 20
CALLS = 10
REPLAYS = 7
PEAK_BYTES_PER_S = 3.0e12


def _capture(body: Callable[[], None]) -> torch.cuda.CUDAGraph:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph


def _replay_ms(graph: torch.cuda.CUDAGraph) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(REPLAYS):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_time_us(op: Callable[[], object]) -> float:
    """Cold-L2 time of one call of op in microseconds (op must be graph-capturable)."""
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # inputs were made on the default stream
    with torch.cuda.stream(stream):
        op()  # compile and warm up outside the capture
    torch.cuda.synchronize()

    def with_op():
        for _ in range(CALLS):
            flush.zero_()
            op()

    def flush_only():
        for _ in range(CALLS):
            flush.zero_()

    timed, base = _capture(with_op), _capture(flush_only)
    _replay_ms(timed)
    ms = _replay_ms(timed) - _replay_ms(base)
    del timed, base
    return max(ms, 0.0) * 1000 / CALLS


def eager_time_us(op: Callable[[], object]) -> float:
    """Cold-L2 eager time (host launch included), for ops that cannot be captured."""
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    op()
    times = []
    for _ in range(5):
        flush.zero_()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        op()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return statistics.median(times)


def roofline_us(num_bytes: float) -> float:
    return num_bytes / PEAK_BYTES_PER_S * 1e6
