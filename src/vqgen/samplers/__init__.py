"""Built-in samplers (a plugin registered through the `vqgen_register` hook)."""

from __future__ import annotations

from typing import Any

from vqgen.core.hookspecs import hookimpl


@hookimpl
def vqgen_register(registry: Any) -> None:
    """Register the built-in samplers."""
