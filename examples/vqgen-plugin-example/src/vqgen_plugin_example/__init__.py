"""An example vqgen plugin package: one ordering and one conditioner."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import Field

import vqgen


class Snake(vqgen.Ordering):
    """Boustrophedon: rows top to bottom, even rows left→right, odd rows right→left."""

    def __init__(self) -> None:
        super().__init__()

    def permutation(self, h: int, w: int) -> torch.Tensor:
        grid = torch.arange(h * w).reshape(h, w)  # (h, w) raster indices
        grid[1::2] = grid[1::2].flip(1)
        return grid.reshape(-1)  # (h*w,)


class Brightness(vqgen.Conditioner):
    """One token per image: its mean brightness, quantised into ``n_bins`` bins."""

    condition_key = "image"  # what `vqgen sample --cond FILE` fills

    class Params(vqgen.ParamsModel):
        n_bins: int = Field(8, ge=2, le=256, description="number of brightness bins")

    def __init__(self, n_bins: int = 8) -> None:
        super().__init__(n_bins=n_bins)
        self.vocab_size = n_bins

    def tokens(self, batch: Mapping[str, Any]) -> torch.Tensor:
        image = batch["image"]  # (B, C, H, W) in [-1, 1]
        mean = (image.float().mean(dim=(1, 2, 3)) + 1) / 2  # (B,) in [0, 1]
        bins = (mean * self.vocab_size).long().clamp_(0, self.vocab_size - 1)  # (B,)
        return bins[:, None]  # (B, 1)


@vqgen.hookimpl
def vqgen_register(registry: Any) -> None:
    """Register this package's components with vqgen."""
    registry.add("ordering", "snake", Snake)
    registry.add("conditioner", "brightness", Brightness)
