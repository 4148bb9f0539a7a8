"""What the reliability tests share: adapter management calls, greedy references, errors."""

from __future__ import annotations

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
