"""Tiny checkpoints shared by the model tests (written once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny import save_tiny_checkpoint


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(arch, fused=False) -> path of a tiny float32 checkpoint of that layout."""
    cache: dict[tuple[str, bool], Path] = {}

    def get(arch: str, fused: bool = False) -> Path:
        if (arch, fused) not in cache:
            path = tmp_path_factory.mktemp(f"{arch}_{'3d' if fused else '2d'}")
            cache[arch, fused] = save_tiny_checkpoint(arch, path, fused=fused)
        return cache[arch, fused]

    return get
