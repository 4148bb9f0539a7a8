"""The README's curl and openai examples, run as written against a demo server."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.S)


def on(server, code: str) -> str:
    port = server.url.rsplit(":", 1)[1]
    return code.replace("localhost:8000", f"127.0.0.1:{port}")


def test_quick_start_is_make_serve_then_make_test():
    quick = README.read_text().split("## Quick start", 1)[1].split("##", 1)[0]
    assert re.search(r"```\nmake serve\nmake test\n```", quick)


@pytest.mark.skipif(shutil.which("curl") is None, reason="the examples need curl")
def test_curl_examples_run(open_server):
    script = "\n".join(on(open_server, b) for b in blocks("bash") if "curl" in b)
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True,
                          text=True, timeout=120)
    out = done.stdout
    assert done.returncode == 0, done.stderr
    assert '"error"' not in out, out
    for expected in ('"id":"demo-3d"', '"object":"chat.completion"', '"object":"text_completion"',
                     '"object":"chat.completion.chunk"', '"usage":{"prompt_tokens"',
                     "data: [DONE]", "Success: LoRA adapter 'my-3d' added successfully.",
                     '"model":"my-3d"', '"model":"demo-2d"',
                     "Success: LoRA adapter 'my-3d' removed successfully."):
        assert expected in out, expected


def test_openai_examples_run(open_server):
    for code in blocks("python"):
        done = subprocess.run([sys.executable, "-c", on(open_server, code)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "completion_tokens=" in done.stdout
