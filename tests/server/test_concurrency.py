"""Batching must not change answers: 16 concurrent streams over base, 2D and 3D adapters give
exactly the text each request gives alone (greedy)."""

from __future__ import annotations

import asyncio
import time

import openai

NO_EOS = {"ignore_eos": True}
PROMPTS = ("the model", "hello world", "an expert adapter answers", "why is the server fast",
           "good morning teacher", "the first question of the day")


def requests_mix() -> list[dict]:
    """16 requests: every model, chat and completions, different prompts and lengths."""
    models = ("demo", "demo-2d", "demo-3d")
    mix = []
    for i in range(16):
        kind = "chat" if i % 2 else "completion"
        mix.append(dict(kind=kind, model=models[i % 3], prompt=PROMPTS[i % len(PROMPTS)],
                        max_tokens=12 + (i % 4) * 4))
    return mix


def text_of(kind: str, reply, stream: bool) -> str:
    if not reply.choices:  # a stream's usage chunk
        return ""
    choice = reply.choices[0]
    if kind == "completion":
        return choice.text
    return (choice.delta.content or "") if stream else choice.message.content


async def run_one(client: openai.AsyncOpenAI, spec: dict, stream: bool):
    """(text, first chunk time, end time) of one request."""
    common = dict(model=spec["model"], max_tokens=spec["max_tokens"], temperature=0,
                  extra_body=NO_EOS, stream=stream)
    if spec["kind"] == "chat":
        reply = await client.chat.completions.create(
            messages=[{"role": "user", "content": spec["prompt"]}], **common)
    else:
        reply = await client.completions.create(prompt=spec["prompt"], **common)
    if not stream:
        return text_of(spec["kind"], reply, stream), 0.0, 0.0
    parts, first = [], None
    async for chunk in reply:
        first = first or time.monotonic()
        parts.append(text_of(spec["kind"], chunk, stream))
    return "".join(parts), first, time.monotonic()


def max_overlap(spans: list[tuple[float, float]]) -> int:
    return max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)


def test_concurrent_streams_match_solo_answers(server):
    mix = requests_mix()

    async def main():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=server.api_key,
                                    max_retries=0, timeout=120)
        solo = [(await run_one(client, spec, stream=False))[0] for spec in mix]
        together = await asyncio.gather(*(run_one(client, spec, stream=True) for spec in mix))
        return solo, together

    solo, together = asyncio.run(main())
    assert [text for text, _, _ in together] == solo
    assert len(set(solo)) > 3, "prompts and adapters should give different answers"
    assert max_overlap([(start, end) for _, start, end in together]) >= 4
