"""Built-in tokenizers, priors and datasets (a plugin like any other)."""

from __future__ import annotations

from typing import Any

from vqgen.core.hookspecs import hookimpl


@hookimpl
def vqgen_register(registry: Any) -> None:
    """Register the built-in tokenizers, priors and datasets."""
