"""What the reliability tests share: adapter management calls, greedy references, errors."""

from __future__ import annotations

import bisect
import threading
import time

import openai
import torch
from safetensors.torch import load_file, save_file

PROMPT = "the expert adapter"
NO_EOS = {"extra_body": {"ignore_eos": True}}


def load(http, name: str, path, **extra):
    return http.post("/v1/load_lora_adapter",
                     json={"lora_name": name, "lora_path": str(path), **extra})


def unload(http, name: str):
    return http.post("/v1/unload_lora_adapter", json={"lora_name": name})


def greedy(client, model: str, max_tokens: int = 8, prompt: str = PROMPT) -> str:
    return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                     temperature=0, **NO_EOS).choices[0].text


def replace_weights(adapter_dir, seed: int) -> None:
    """Same names and shapes, other values: still a valid adapter, but not the validated one."""
    path = adapter_dir / "adapter_model.safetensors"
    generator = torch.Generator().manual_seed(seed)
    save_file({k: torch.randn(v.shape, generator=generator) * v.std()
               for k, v in load_file(path).items()}, path)


def assert_clean_error(reply, statuses: tuple[int, ...]) -> None:
    """One of `statuses`; a 4xx/5xx must carry the OpenAI envelope with its own code."""
    assert reply.status_code in statuses, (reply.status_code, reply.text[:500])
    if reply.status_code >= 400:
        error = reply.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert error["code"] == reply.status_code and error["message"], error
        assert isinstance(error["type"], str) and error["type"], error


class Watchdog:
    """A good greedy stream, restarted as soon as it ends, in its own thread: records when each
    chunk arrived and any answer that differs from the reference."""

    def __init__(self, server, model: str, max_tokens: int = 48) -> None:
        self.client, self.model, self.max_tokens = server.client(), model, max_tokens
        self.reference = greedy(self.client, model, max_tokens)
        self.times: list[float] = []
        self.wrong: list[str] = []
        self.streams = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)

    def __enter__(self) -> Watchdog:
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self.times and time.monotonic() < deadline:
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        while not self._stop.is_set():
            parts = []
            try:
                for chunk in self.client.completions.create(
                        model=self.model, prompt=PROMPT, max_tokens=self.max_tokens,
                        temperature=0, stream=True, **NO_EOS):
                    self.times.append(time.monotonic())
                    parts.append(chunk.choices[0].text if chunk.choices else "")
            except openai.OpenAIError as err:
                parts = [repr(err)]
                time.sleep(0.1)
            if "".join(parts) != self.reference:
                self.wrong.append("".join(parts))
            self.streams += 1

    def max_gap(self, start: float, end: float, timeout: float = 30.0) -> float:
        """The longest wait between chunks around [start, end]: from the last chunk before
        start to the first one after end (waited for)."""
        deadline = time.monotonic() + timeout
        while not (self.times and self.times[-1] > end) and time.monotonic() < deadline:
            time.sleep(0.01)
        times = list(self.times)
        lo = max(bisect.bisect_right(times, start) - 1, 0)
        hi = bisect.bisect_right(times, end) + 1
        window = times[lo:hi] if times[-1] > end else [*times[lo:], time.monotonic()]
        return max((b - a for a, b in zip(window, window[1:])), default=float("inf"))
