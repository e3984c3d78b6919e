"""Shared fixtures: the default registry, and a copy with stand-in components."""

from __future__ import annotations

import os
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


@pytest.fixture(scope="session", autouse=True)
def _cache_dir_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Point ``VQGEN_CACHE_DIR`` at a temporary folder: no test writes below the home
    folder (set and restored by hand: ``monkeypatch`` is function-scoped)."""
    old = os.environ.get("VQGEN_CACHE_DIR")
    os.environ["VQGEN_CACHE_DIR"] = str(tmp_path_factory.mktemp("vqgen-cache"))
    yield
    if old is None:
        os.environ.pop("VQGEN_CACHE_DIR", None)
    else:
        os.environ["VQGEN_CACHE_DIR"] = old
