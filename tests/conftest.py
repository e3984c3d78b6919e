"""Shared fixtures: the default registry, and a copy with stand-in components."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

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
