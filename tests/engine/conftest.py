"""Tiny checkpoints shared by the engine tests (written once per session)."""

from __future__ import annotations

import pytest

from tests.tiny import ARCHS, save_tiny_checkpoint

PROMPTS = [
    [3, 4, 5, 6, 7, 8, 100, 200],
    [10, 11],
    [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32],
    [40, 41, 42, 43],
]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(arch, fused) -> path, cached for the session."""
    made: dict[tuple[str, bool], str] = {}

    def get(arch: str = "qwen3_moe", fused: bool = False) -> str:
        if (arch, fused) not in made:
            path = tmp_path_factory.mktemp(f"{arch}-{'fused' if fused else 'per-expert'}")
            made[arch, fused] = str(save_tiny_checkpoint(arch, path, fused=fused))
        return made[arch, fused]

    return get


__all__ = ["ARCHS", "PROMPTS"]
