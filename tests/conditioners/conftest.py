"""Fixtures for the conditioner tests: one torch thread."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # makes `cond_helpers` importable


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Every conditioner test runs on one torch thread (see tests/conftest.py)."""
