"""Shared fixtures: the default registry, and a copy with stand-in components."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import vqgen

sys.path.insert(0, str(Path(__file__).parent))  # makes `vqgen_test_stubs` importable
import vqgen_test_stubs  # noqa: E402

STUBS_DIR = str(Path(__file__).parent)


@pytest.fixture(scope="session")
def registry() -> vqgen.Registry:
    """The default registry (built-ins and installed plugins)."""
    return vqgen.default_registry()


@pytest.fixture
def test_registry(registry: vqgen.Registry) -> vqgen.Registry:
    """A copy of the default registry plus the stand-ins of ``vqgen_test_stubs``."""
    reg = registry.copy()
    vqgen_test_stubs.vqgen_register(reg.scoped("tests"))
    return reg


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one torch thread (and never stall a busy machine).

    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
