"""Churn under load: streams over the base model, 2D and 3D adapters while two adapter names
are loaded, reloaded in place with other weights and unloaded, again and again. Every greedy
answer must be exactly the reference of a version that name had while the request started
(computed once per version before the churn); a 404 only while the name was unloaded.

The soak (`-m soak`) runs 1,000 cycles under 32 streams and also bounds the server's RSS
growth (< 5%) and the size of /metrics.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

from tests.adapters import make_2d_adapter, make_peft_3d_adapter
from tests.reliability.helpers import NO_EOS, greedy, load, unload

logger = logging.getLogger(__name__)

PROMPTS = ("the expert adapter", "hello world and the model")
STATIC = ("demo", "demo-2d", "demo-3d")
CHURNED = ("churn-2d", "churn-3d")
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def churn_server(serving):
    """The configuration of the suite's main server, fresh: what other tests sent it stays out."""
    with serving("churn", "--max-loras", "2", "--max-cpu-loras", "4", "--max-num-seqs", "32",
                 "--num-kv-blocks", "512", "--block-size", "16") as srv:
        yield srv


@pytest.fixture(scope="module")
def versions(hf_demo, adapter_root) -> dict[str, tuple[Path, Path]]:
    """Two weight versions of each churned name (2D hand-written, 3D real PEFT)."""
    root = adapter_root / "churn"
    return {"churn-2d": tuple(make_2d_adapter(hf_demo, root / f"2d-v{v}", seed=51 + v)
                              for v in (0, 1)),
            "churn-3d": tuple(make_peft_3d_adapter(hf_demo, root / f"3d-v{v}", seed=61 + v)
                              for v in (0, 1))}


@pytest.fixture(scope="module")
def references(churn_server, versions) -> dict[tuple[str, str | int | None], str]:
    """{(model, version or None for static models), prompt): greedy text}, each computed once."""
    client, refs = churn_server.client(), {}
    for model in STATIC:
        for prompt in PROMPTS:
            refs[(model, None), prompt] = greedy(client, model, MAX_TOKENS, prompt)
    with churn_server.http() as http:
        for name, dirs in versions.items():
            for v, path in enumerate(dirs):
                ref = f"ref-{name}-v{v}"
                assert load(http, ref, path).status_code == 200
                for prompt in PROMPTS:
                    refs[(name, v), prompt] = greedy(client, ref, MAX_TOKENS, prompt)
                assert unload(http, ref).status_code == 200
    for name in CHURNED:  # a version served in place of another would be seen
        for prompt in PROMPTS:
            assert refs[(name, 0), prompt] != refs[(name, 1), prompt], (name, prompt, refs)
    return refs


@dataclass
class Timeline:
    """Each churned name's changes: [began, ended (inf while in progress), state before, state
    after]; a state is a version number, None while unloaded."""

    events: dict[str, list[list]] = field(
        default_factory=lambda: {name: [] for name in CHURNED})

    def possible(self, name: str, start: float, end: float) -> set[int | None]:
        """States the name may have had for a request resolved between start and end."""
        states: set[int | None] = set()
        current = None
        for began, ended, before, after in self.events[name]:
            if ended < start:
                current = after
            elif began <= end:
                states |= {before, after}
        return states | {current}


@dataclass
class Tally:
    answers: int = 0
    churned_answers: int = 0
    not_found: int = 0
    wrong: list[str] = field(default_factory=list)


async def _churn(server, versions, cycles: int, dwell: float, timeline: Timeline,
                 on_cycle) -> None:
    """cycles x (load version a, reload in place with version b, unload), names alternating,
    each state held `dwell` seconds."""
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers,
                                 timeout=120) as http:
        for cycle in range(cycles):
            name = CHURNED[cycle % 2]
            a = (cycle // 2) % 2
            for body, before, after in (
                    ({"lora_path": str(versions[name][a])}, None, a),
                    ({"lora_path": str(versions[name][1 - a]), "load_inplace": True}, a, 1 - a),
                    (None, 1 - a, None)):
                event = [time.monotonic(), float("inf"), before, after]  # in progress
                timeline.events[name].append(event)
                if body is None:
                    reply = await http.post("/v1/unload_lora_adapter", json={"lora_name": name})
                else:
                    reply = await http.post("/v1/load_lora_adapter",
                                            json={"lora_name": name, **body})
                assert reply.status_code == 200, reply.text
                event[1] = time.monotonic()
                await asyncio.sleep(dwell)
            await on_cycle(cycle)


async def _stream(client, worker: int, references, timeline: Timeline, tally: Tally,
                  done: asyncio.Event) -> None:
    models = itertools.cycle(STATIC + CHURNED)
    for _ in range(worker):
        next(models)
    for i in itertools.count():
        if done.is_set():
            return
        model, prompt = next(models), PROMPTS[(worker + i) % len(PROMPTS)]
        began = time.monotonic()
        try:
            chunks = await client.completions.create(model=model, prompt=prompt,
                                                     max_tokens=MAX_TOKENS, temperature=0,
                                                     stream=True, **NO_EOS)
        except openai.NotFoundError:
            resolved = time.monotonic()
            if model in STATIC or None not in timeline.possible(model, began, resolved):
                tally.wrong.append(f"{model}: 404 while loaded")
            tally.not_found += 1
            continue
        resolved = time.monotonic()
        text = "".join([c.choices[0].text async for c in chunks if c.choices])
        states = {None} if model in STATIC else timeline.possible(model, began, resolved) - {None}
        if not any(references.get(((model, s), prompt)) == text for s in states):
            tally.wrong.append(f"{model} {prompt!r} (states {states}): {text!r}")
        tally.answers += 1
        tally.churned_answers += model in CHURNED


def run_churn(server, versions, references, cycles: int, streams: int, dwell: float,
              on_cycle=None) -> Tally:
    async def main() -> Tally:
        timeline, tally, done = Timeline(), Tally(), asyncio.Event()
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=server.api_key,
                                    max_retries=0, timeout=120)

        async def nothing(cycle):
            await asyncio.sleep(0)

        workers = [asyncio.create_task(_stream(client, w, references, timeline, tally, done))
                   for w in range(streams)]
        try:
            await _churn(server, versions, cycles, dwell, timeline, on_cycle or nothing)
        finally:
            done.set()
            await asyncio.gather(*workers)
        return tally

    return asyncio.run(main())


def test_churn_under_load_never_gives_a_wrong_answer(churn_server, versions, references):
    tally = run_churn(churn_server, versions, references, cycles=6, streams=8, dwell=0.6)
    assert tally.wrong == []
    assert tally.answers >= 24 and tally.churned_answers >= 2, tally
    with churn_server.http() as http:
        models = [m["id"] for m in http.get("/v1/models").json()["data"]]
    assert not set(CHURNED) & set(models)


def _rss_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1])


@pytest.mark.soak
@pytest.mark.timeout(3 * 3600)
def test_soak_1000_cycles_under_32_streams(churn_server, versions, references):
    samples: list[tuple[int, int, int]] = []  # (cycle, RSS kB, /metrics bytes)

    async def measure(cycle: int) -> None:
        if cycle % 50 == 49:
            async with httpx.AsyncClient(base_url=churn_server.url) as http:
                size = len((await http.get("/metrics")).content)
            samples.append((cycle, _rss_kb(churn_server.process.pid), size))

    tally = run_churn(churn_server, versions, references, cycles=1000, streams=32, dwell=0.1,
                      on_cycle=measure)
    assert tally.wrong == []
    assert tally.churned_answers >= 100, tally
    quarter = len(samples) // 4  # after the first quarter: caches and pools are warm
    rss, sizes = [s[1] for s in samples], [s[2] for s in samples]
    report = f"(cycle, RSS kB, /metrics bytes): {samples}; answers {tally.answers}"
    assert max(rss[quarter:]) < rss[quarter] * 1.05, report
    assert max(sizes[quarter:]) < max(sizes[:quarter + 1]) * 1.1, report
    logger.info("soak: %s", report)  # shown with --log-cli-level=INFO
