"""Overload: three times more concurrent requests than --max-num-seqs. Each is served (queued)
or refused with a clean 503, never another 5xx; every served answer is its reference, and the
engine is healthy and idle afterwards."""

from __future__ import annotations

import asyncio
import json

import httpx

from tests.reliability.helpers import PROMPT, assert_clean_error
from tests.server.test_metrics import engine_value, value, wait_for

MODELS = ("demo", "demo-2d", "demo-3d")
REQUESTS = 96  # the server runs 32 sequences at once


def body(model: str, stream: bool) -> dict:
    return {"model": model, "prompt": PROMPT, "max_tokens": 8, "ignore_eos": True,
            "temperature": 0, "stream": stream}


async def _one(http: httpx.AsyncClient, i: int) -> tuple[int, str | None]:
    stream = i % 2 == 1
    reply = await http.post("/v1/completions", json=body(MODELS[i % 3], stream))
    assert_clean_error(reply, (200, 503))
    if reply.status_code != 200:
        return reply.status_code, None
    if not stream:
        return 200, reply.json()["choices"][0]["text"]
    assert reply.text.endswith("data: [DONE]\n\n")
    return 200, "".join(json.loads(line[6:])["choices"][0]["text"]
                        for line in reply.text.splitlines() if line.startswith("data: {"))


def test_overload_is_served_or_a_clean_503_and_the_engine_recovers(rel_server):
    async def main():
        async with httpx.AsyncClient(base_url=rel_server.url, headers=rel_server.headers,
                                     timeout=300) as http:
            solo = [await _one(http, i) for i in range(6)]  # each model, JSON and stream
            crowd = await asyncio.gather(*(_one(http, i) for i in range(REQUESTS)))
            after = await _one(http, 0)
        return solo, crowd, after

    solo, crowd, after = asyncio.run(main())
    references = {i % 6: text for i, (_, text) in enumerate(solo)}
    served = [(i, text) for i, (status, text) in enumerate(crowd) if status == 200]
    assert [text for i, text in served] == [references[i % 6] for i, _ in served]
    assert after == solo[0]
    samples = wait_for(rel_server, lambda s: engine_value(s, "vllm:num_requests_running") == 0)
    assert engine_value(samples, "vllm:num_requests_waiting") == 0
    assert engine_value(samples, "vllm:kv_cache_usage_perc") == 0
    assert value(samples, "loramux_engine_alive") == 1
