"""``edge``: edge maps as condition tokens, through a 1-channel VQGAN.

``source: image`` (default) computes edges from ``batch["image"]`` (``[B, 3, H, W]`` in
``[-1, 1]``) with the batched torch Canny of :mod:`vqgen.conditioners.canny`;
``source: batch`` reads ready-made maps from ``batch["edges"]`` (``[B, 1, H, W]``,
values in ``[0, 1]``). The map, grown by ``dilate`` pixels on each side and scaled to
``[-1, 1]``, is encoded by the conditioner's own 1-channel VQGAN (default f = 4:
32×32 → an 8×8 grid). One-pixel edges on a plain background are so sparse that a small
codebook trained on them can collapse to "no edge" (measured on the demo data: 17 of 32
codes used, 12.8 dB, the PSNR of a blank map); ``dilate: 1`` (3-pixel lines) gives the
cond stage something to reconstruct.

The thresholds are gradient magnitudes of the ``[0, 1]`` grayscale image, per
pixel (see :mod:`~vqgen.conditioners.canny`); the defaults suit the ``shapes`` data.

Ids: the tokenizer's codes, then the null token.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from vqgen.conditioners.base import (
    SpatialConditioner,
    TokenizerSpec,
    check_finite,
    check_image_size,
    first_bad,
    require,
)
from vqgen.conditioners.canny import canny
from vqgen.conditioners.depth import MAP_TOKENIZER
from vqgen.core.errors import SampleError, VqgenError
from vqgen.core.interfaces import ParamsModel

__all__ = ["EdgeConditioner"]


class EdgeConditioner(SpatialConditioner):
    """Canny edges of the image (or given edge maps) through a 1-channel VQGAN."""

    #: the batch key a condition file given to `vqgen sample --cond FILE` fills
    condition_key = "image"

    class Params(ParamsModel):
        source: Literal["image", "batch"] = Field(
            "image", description="image: Canny of batch['image']; batch: batch['edges']"
        )
        sigma: float = Field(1.0, ge=0.0, description="Gaussian blur before Sobel (pixels)")
        low_threshold: float = Field(0.02, gt=0.0, description="weak-edge gradient magnitude")
        high_threshold: float = Field(0.05, gt=0.0, description="strong-edge gradient magnitude")
        tokenizer: TokenizerSpec = Field(
            default_factory=lambda: MAP_TOKENIZER.model_copy(deep=True),
            description="the cond stage: a tokenizer of 1-channel maps",
        )
        dilate: int = Field(
            0, ge=0, le=7, description="grow edges by this many pixels on each side "
            "(lines 1 + 2·dilate wide) before tokenizing; sparse 1-pixel maps can collapse "
            "a small codebook",
        )
        null_token: bool = Field(True, description="reserve the last id for 'no condition'")

        @model_validator(mode="after")
        def _check_thresholds(self) -> EdgeConditioner.Params:
            if self.low_threshold > self.high_threshold:
                raise ValueError(
                    f"low_threshold={self.low_threshold} is above "
                    f"high_threshold={self.high_threshold}"
                )
            return self

    def __init__(
        self,
        source: Literal["image", "batch"] = "image",
        sigma: float = 1.0,
        low_threshold: float = 0.02,
        high_threshold: float = 0.05,
        tokenizer: TokenizerSpec | Mapping[str, Any] = MAP_TOKENIZER,
        dilate: int = 0,
        null_token: bool = True,
    ) -> None:
        super().__init__(
            source=source, sigma=sigma, low_threshold=low_threshold,
            high_threshold=high_threshold, tokenizer=tokenizer, dilate=dilate,
            null_token=null_token,
        )
        self.init_tokenizer(self.params.tokenizer, 1, self.params.null_token)

    def edges(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Edge maps ``[B, 1, H, W]`` in ``[0, 1]``: computed or read, per ``source``."""
        p = self.params
        if p.source == "batch":
            e = require(batch, "edges", "edge", "(float [B, 1, H, W] in [0, 1]; source: batch)")
            if not isinstance(e, torch.Tensor) or e.ndim != 4 or e.shape[1] != 1:
                shape = tuple(e.shape) if isinstance(e, torch.Tensor) else type(e).__name__
                raise VqgenError(f"edges must be single-channel maps [B, 1, H, W]; got {shape}")
            e = e.float()
            check_finite(e, "edges")
            i = first_bad((e < 0) | (e > 1))
            if i is not None:
                raise SampleError("edges", i, "has values outside [0, 1]")
            check_image_size(batch, "edges", (e.shape[2], e.shape[3]))
            return e
        x = require(batch, "image", "edge", "(float [B, 3, H, W] in [-1, 1]; source: image)")
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] not in (1, 3):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise VqgenError(f"image must be [B, 3, H, W] (or 1-channel); got {shape}")
        check_finite(x, "image")
        return canny(x.float(), p.sigma, p.low_threshold, p.high_threshold)  # (B, 1, H, W)

    def condition_input(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Edge maps ``[B, 1, H, W]``, grown by ``dilate``, scaled to ``[-1, 1]`` (edges
        at +1)."""
        e = self.edges(batch)  # (B, 1, H, W) in [0, 1]
        d = self.params.dilate
        if d:
            e = F.max_pool2d(e, 2 * d + 1, stride=1, padding=d)  # (B, 1, H, W)
        return e * 2 - 1
