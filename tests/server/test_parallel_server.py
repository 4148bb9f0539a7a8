"""`loramux serve -tp 2` on CPU: the demo answers the openai client as the one-rank server does
(base and both demo adapters), and SIGTERM stops the server and its rank process."""

from __future__ import annotations

import time
from pathlib import Path

from tests.server.conftest import SERVER_FLAGS, start_server, stop_server

PROMPT = "the quick brown"


def children(pid: int) -> list[int]:
    found = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(child) for child in found]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def answers(client) -> dict[str, str]:
    return {model: client.completions.create(model=model, prompt=PROMPT, max_tokens=8,
                                             temperature=0).choices[0].text
            for model in ("demo", "demo-2d", "demo-3d")}


def test_tensor_parallel_server_answers_as_one_rank(open_server, server_env, demo_home):
    srv = start_server([*SERVER_FLAGS, "-tp", "2"], server_env, demo_home / "tp2-server.log")
    try:
        ranks = children(srv.process.pid)
        got = answers(srv.client())
    finally:
        stop_server(srv)
    assert srv.process.returncode == 0
    assert got == answers(open_server.client())
    assert len(set(got.values())) == 3  # the adapters change the answer
    assert ranks, "no rank process under the server"
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in ranks), srv.log_tail()
