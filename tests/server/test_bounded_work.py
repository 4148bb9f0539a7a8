"""Bounded work on the event loop: an oversized body is a 413 unread, a prompt that cannot fit
is refused before tokenizing, and prompts are tokenized off the loop, so a concurrent stream
never stalls while they are refused."""

from __future__ import annotations

import json
import threading
import time

import httpx

from loramux.server.admission import default_max_body_bytes

MAX_MODEL_LEN = 2048  # the demo's
HUGE = "the model " * 1_000_000  # 10 MB
LONG = "the model " * 300_000  # 3 MB: under the body limit, far over what 2048 tokens can hold


def _stream_gaps(server, started: threading.Event, stop: threading.Event, gaps: list) -> None:
    body = {"model": "demo", "prompt": "the model", "max_tokens": 1500, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with server.http() as http, http.stream("POST", "/v1/completions", json=body) as reply:
        last = None
        for line in reply.iter_lines():
            now = time.monotonic()
            if line.startswith("data: {"):
                if last is not None:
                    gaps.append(now - last)
                last = now
                started.set()
            if stop.is_set():
                return


def _post(http, path: str, body: dict) -> tuple[httpx.Response, float]:
    began = time.monotonic()
    reply = http.post(path, content=json.dumps(body),
                      headers={"content-type": "application/json"})
    return reply, time.monotonic() - began


def test_default_body_limit_scales_with_the_context():
    assert default_max_body_bytes(2048) == 4 << 20
    assert default_max_body_bytes(1 << 20) == 64 << 20


def test_huge_prompts_are_refused_fast_while_a_stream_goes_on(server):
    started, stop, gaps = threading.Event(), threading.Event(), []
    streamer = threading.Thread(target=_stream_gaps, args=(server, started, stop, gaps))
    streamer.start()
    assert started.wait(60)
    try:
        with server.http() as http:
            too_big, t_big = _post(http, "/v1/completions", {"model": "demo", "prompt": HUGE})
            replies = [_post(http, path, body) for path, body in [
                ("/v1/completions", {"model": "demo", "prompt": LONG}),
                ("/v1/chat/completions", {"model": "demo", "messages": [
                    {"role": "user", "content": LONG}]}),
                ("/v1/completions", {"model": "demo", "prompt": [1] * 400_000}),
            ]]
            ok = http.post("/v1/completions", json={"model": "demo", "prompt": "the model",
                                                    "max_tokens": 2})
        during = len(gaps)
    finally:
        stop.set()
        streamer.join(120)
    assert too_big.status_code == 413, too_big.text
    assert too_big.json()["error"]["code"] == 413 and "--max-request-body-bytes" in \
        too_big.json()["error"]["message"]
    for reply, _ in replies:
        assert reply.status_code == 400, reply.text[:300]
        assert "maximum context length is 2048 tokens" in reply.json()["error"]["message"]
    assert ok.status_code == 200
    assert max(t for _, t in replies + [(too_big, t_big)]) < 5.0
    assert during > 3 and max(gaps[:during]) < 1.0, max(gaps)
