"""The threaded Engine: concurrent streams, aborts that free resources, errors that stay local."""

from __future__ import annotations

import asyncio
import time

import pytest

from loramux.engine import LLM, Engine, SamplingParams
from loramux.engine.errors import PromptTooLong
from loramux.engine.config import make_config
from tests.engine.conftest import PROMPTS


@pytest.fixture(scope="module")
def engine(checkpoint):
    eng = Engine(make_config(checkpoint("qwen3_moe"), block_size=4, num_blocks=128))
    eng.start()
    yield eng
    eng.shutdown()


async def collect(engine, prompt, params):
    deltas, last = [], None
    async for out in engine.generate(prompt, params):
        deltas += out.outputs[0].token_ids_delta
        last = out
    assert deltas == last.outputs[0].token_ids  # the deltas add up to the whole
    return last.outputs[0].token_ids


def wait_until(predicate, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_concurrent_streams_equal_offline(engine, checkpoint):
    params = SamplingParams(temperature=0, max_tokens=10)
    offline = [o.outputs[0].token_ids for o in LLM(checkpoint("qwen3_moe")).generate(PROMPTS,
                                                                                     params)]

    async def main():
        return await asyncio.gather(*(collect(engine, p, params) for p in PROMPTS * 3))

    assert asyncio.run(main()) == offline * 3


def test_leaving_a_stream_aborts_and_frees_blocks(engine):
    async def main():
        gen = engine.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=200,
                                                         ignore_eos=True))
        async for out in gen:
            if len(out.outputs[0].token_ids) >= 2:
                break
        await gen.aclose()

    asyncio.run(main())
    allocator = engine.core.pools.blocks
    assert wait_until(lambda: allocator.num_free == allocator.num_blocks)
    assert wait_until(lambda: engine.stats().num_running == 0)


def test_bad_request_leaves_engine_running(engine):
    async def main():
        with pytest.raises(PromptTooLong):
            async for _ in engine.generate([5] * 600, SamplingParams(max_tokens=4)):
                pass
        return await collect(engine, PROMPTS[1], SamplingParams(temperature=0, max_tokens=3))

    assert len(asyncio.run(main())) == 3
    assert engine.is_alive
