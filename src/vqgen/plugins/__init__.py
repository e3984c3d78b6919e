"""Built-in tokenizers, priors and datasets (a plugin like any other)."""

from __future__ import annotations

from typing import Any

from vqgen.core.data import FolderDataset
from vqgen.core.hookspecs import hookimpl
from vqgen.plugins.gpt import GPT
from vqgen.plugins.pixelsnail import PixelSNAIL
from vqgen.plugins.shapes import ShapesDataset


@hookimpl
def vqgen_register(registry: Any) -> None:
    """Register the built-in tokenizers, priors and datasets."""
    registry.add("dataset", "shapes", ShapesDataset)
    registry.add("dataset", "folder", FolderDataset)
    registry.add("prior", "gpt", GPT)
    registry.add("prior", "pixelsnail", PixelSNAIL)
