"""Kernel-test fixtures: the device, per-case random generators, NaN-poisoned allocations.

tests/conftest.py sets TRITON_INTERPRET=1 when there is no CUDA device, before any kernel
module is imported, so these tests run the Triton kernels in the interpreter on a CPU.
"""

from __future__ import annotations

import zlib

import pytest
import torch


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded from the test id: fresh inputs per case, reproducible per case."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def poison(monkeypatch):
    """torch.empty returns NaN (floats) or -7 (ints) during the test: unwritten reads show."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan") if out.is_floating_point() else -7)

    monkeypatch.setattr(torch, "empty", poisoned)
