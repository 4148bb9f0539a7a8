"""SIGTERM drains a real server: new requests get 503, running streams finish within
--shutdown-timeout or end with an error frame and [DONE], and the process exits with 0."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx

from tests.server.conftest import SERVER_FLAGS, start_server, stop_server

DRAIN_S = 5
SHORT, LONG = 16, 1900  # tokens: SHORT ends within the drain, LONG cannot


def _stream(server, max_tokens: int, first: threading.Event, frames: list) -> None:
    body = {"model": "demo", "prompt": "the model", "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True}
    try:
        with httpx.Client(base_url=server.url, timeout=120) as http, \
                http.stream("POST", "/v1/completions", json=body) as reply:
            for line in reply.iter_lines():
                if line.startswith("data: "):
                    frames.append(line[6:])
                    first.set()
    except httpx.HTTPError as exc:  # a cut connection: the test fails on the frames
        frames.append(f"transport error: {exc!r}")
    first.set()


def test_sigterm_drains_streams_and_exits_0(server_env, tmp_path):
    srv = start_server([*SERVER_FLAGS, "--shutdown-timeout", str(DRAIN_S)], server_env,
                       tmp_path / "drain.log")
    try:
        lengths = [SHORT, LONG] * 8
        firsts = [threading.Event() for _ in lengths]
        frames: list[list[str]] = [[] for _ in lengths]
        threads = [threading.Thread(target=_stream, args=(srv, n, e, f))
                   for n, e, f in zip(lengths, firsts, frames)]
        for t in threads:
            t.start()
        assert all(e.wait(60) for e in firsts)
        signalled = time.monotonic()
        srv.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        health = httpx.get(f"{srv.url}/health", timeout=10)
        refused = httpx.post(f"{srv.url}/v1/completions", timeout=10,
                             json={"model": "demo", "prompt": "x", "max_tokens": 1})
        code = srv.process.wait(timeout=DRAIN_S + 20)
        exited = time.monotonic() - signalled
        for t in threads:
            t.join(30)
    finally:
        stop_server(srv)
    assert code == 0, srv.log_tail()
    assert exited < DRAIN_S + 10
    assert health.status_code == 503 and refused.status_code == 503
    assert refused.json()["error"]["code"] == 503
    for n, stream in zip(lengths, frames):
        assert stream[-1] == "[DONE]", (n, stream[-3:])
        last = json.loads(stream[-2])
        if n == SHORT:  # finished inside the drain
            assert last["choices"][0]["finish_reason"] == "length", stream[-3:]
        else:
            assert last["error"]["code"] == 503 and "shutting down" in last["error"]["message"]
