"""Poison for isolation tests: an adapter that overflows at run time, and NaN-filled caches.

register_poisoned() reads a good adapter and multiplies its lora_B by a huge finite factor after
validation (which would refuse it), then registers it: every token it touches turns to Inf/NaN
in the forward and writes NaN into its KV blocks. run() drives an EngineCore to the end of its
requests and returns each one's final output (an errored request's output carries the error).
stale_caches() builds paged K/V caches whose rows outside the healthy sequences hold a poison.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from loramux.engine.request import LoRARequest, RequestOutput, SamplingParams

if TYPE_CHECKING:
    from loramux.engine.core import EngineCore


def register_poisoned(core: EngineCore, name: str, path: str, factor: float = 1e30) -> None:
    """`path` read, lora_B multiplied by `factor` (1: a clean control copy), registered."""
    req = LoRARequest(name, 0, path)
    adapter = core.lora.read(req)
    for weights in adapter.weights.values():
        weights.b.mul_(factor)
    core.lora.register(req, adapter)


def run(core: EngineCore, requests: list[tuple[str, list[int], str | None, SamplingParams]],
        ) -> dict[str, RequestOutput]:
    """requests: (request id, prompt, adapter name or None, params), all added at once."""
    for rid, prompt, lora, params in requests:
        core.add_request(rid, prompt, params, lora)
    done: dict[str, RequestOutput] = {}
    while core.has_work():
        done.update({out.request_id: out for out in core.step() if out.finished})
    return done


def stale_caches(lens: list[int], tables: torch.Tensor, fill: float, gen: torch.Generator,
                 shape: tuple[int, ...] = (10, 4, 2, 16)) -> tuple[list, list]:
    """(clean, poisoned) K and V caches of `shape` [blocks, block_size, G, D]: random, and the
    same with `fill` in every row but the first lens[b] rows of the tables of sequences b >= 1
    (sequence 0 stands for a poisoned request: its own rows are poisoned too)."""
    clean = [torch.randn(shape, generator=gen) for _ in "kv"]
    block_size = shape[1]
    stale = torch.ones(shape[:2], dtype=torch.bool)
    for b, n in enumerate(lens[1:], 1):
        for j in range(n):
            stale[tables[b, j // block_size], j % block_size] = False
    return clean, [c.masked_fill(stale[:, :, None, None], fill) for c in clean]
