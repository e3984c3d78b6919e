"""Built-in tokenizers, priors and datasets (a plugin like any other)."""

from __future__ import annotations

from typing import Any

from vqgen.core.hookspecs import hookimpl
from vqgen.plugins.folder import FolderDataset
from vqgen.plugins.gpt import GPT
from vqgen.plugins.kmeans import KMeansTokenizer
from vqgen.plugins.maskgit import MaskGIT
from vqgen.plugins.pixelsnail import PixelSNAIL
from vqgen.plugins.shapes import ShapesDataset
from vqgen.plugins.vqgan import VQGAN, VQGANFSQ, VQGANLFQ, VQGANGumbel, VQGANSegmentation


@hookimpl
def vqgen_register(registry: Any) -> None:
    """Register the built-in tokenizers, priors and datasets."""
    registry.add("dataset", "shapes", ShapesDataset)
    registry.add("dataset", "folder", FolderDataset)
    registry.add("tokenizer", "vqgan", VQGAN)
    registry.add("tokenizer", "vqgan_segmentation", VQGANSegmentation)
    registry.add("tokenizer", "vqgan_gumbel", VQGANGumbel)
    registry.add("tokenizer", "fsq", VQGANFSQ)
    registry.add("tokenizer", "lfq", VQGANLFQ)
    registry.add("tokenizer", "kmeans", KMeansTokenizer)
    registry.add("prior", "gpt", GPT)
    registry.add("prior", "pixelsnail", PixelSNAIL)
    registry.add("prior", "maskgit", MaskGIT)
