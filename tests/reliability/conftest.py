"""Real servers for the reliability suite, built on tests/server's demo fixtures and launcher.

`serving(name, *flags)` starts one `loramux serve` of the demo with an API key and runtime
adapter updating, confined to `adapter_root` (its only --allowed-lora-roots directory), and
stops it on exit; each test module holds the configurations it needs in module fixtures.
"""

from __future__ import annotations

import contextlib

import pytest

from tests.server.conftest import (API_KEY, adapter_root, demo, demo_home,  # noqa: F401
                                   hf_demo, server_env, start_server, stop_server)


@pytest.fixture(scope="session")
def serving(server_env, adapter_root, demo_home):  # noqa: F811
    @contextlib.contextmanager
    def _serving(name: str, *flags: str):
        args = [*flags, "--api-key", API_KEY, "--allow-runtime-lora-updating",
                "--allowed-lora-roots", str(adapter_root), "--log-level", "warning"]
        srv = start_server(args, server_env, demo_home / f"{name}.log", api_key=API_KEY)
        try:
            yield srv
        finally:
            stop_server(srv)
    return _serving


@pytest.fixture(scope="session")
def rel_server(serving):
    """The suite's main server: 2 GPU slots, 4 CPU-cached adapters, 32 sequences."""
    with serving("reliability", "--max-loras", "2", "--max-cpu-loras", "4", "--max-num-seqs",
                 "32", "--num-kv-blocks", "512", "--block-size", "16") as srv:
        yield srv
