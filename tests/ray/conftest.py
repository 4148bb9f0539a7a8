"""tests/server's demo fixtures (the demo, the single-process server) for the Ray tests."""

from tests.server.conftest import (demo, demo_home, hf_demo, open_server,  # noqa: F401
                                   server_env)
