"""``lowres``: a low-resolution image as condition tokens (stochastic super-resolution).

Reads ``batch["lowres"]`` (``[B, 3, H/factor, W/factor]`` in ``[-1, 1]``) when present,
else downsamples ``batch["image"]`` (``[B, 3, H, W]``) by ``factor`` with an
anti-aliasing box filter (the mean of each block). Training batches hold only ``image``; at
sampling pass the small image, ``{"lowres": small}``, with
``size=(factor * h, factor * w)``, and get a large image back.

The small image is upsampled back to full size (nearest neighbour: each low-res
pixel becomes a ``factor × factor`` block) and encoded by the conditioner's own
3-channel VQGAN. With that tokenizer's f equal to the image tokenizer's (default
f = 4), the condition grid equals the image's latent grid (32×32 images, factor 8:
a 4×4 input, an 8×8 grid), so sliding windows line up at any canvas size.

Ids: the tokenizer's codes, then the null token.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field

from vqgen.conditioners.base import (
    SpatialConditioner,
    TokenizerSpec,
    check_finite,
    require,
)
from vqgen.core.errors import VqgenError
from vqgen.core.interfaces import ParamsModel

__all__ = ["LOWRES_TOKENIZER", "LowResConditioner"]

#: Default cond stage: a small f = 4 RGB VQGAN seeing the upsampled low-res image.
LOWRES_TOKENIZER = TokenizerSpec(name="vqgan", params={"ch": 32, "n_embed": 256})


class LowResConditioner(SpatialConditioner):
    """The image downsampled by ``factor`` (anti-aliased), through an RGB VQGAN."""

    #: the batch key a condition file given to `vqgen sample --cond FILE` fills
    condition_key = "lowres"

    class Params(ParamsModel):
        factor: int = Field(8, ge=1, description="downsampling factor of the condition")
        tokenizer: TokenizerSpec = Field(
            default_factory=lambda: LOWRES_TOKENIZER.model_copy(deep=True),
            description="the cond stage: an RGB tokenizer of the upsampled low-res image",
        )
        null_token: bool = Field(True, description="reserve the last id for 'no condition'")

    def __init__(
        self,
        factor: int = 8,
        tokenizer: TokenizerSpec | Mapping[str, Any] = LOWRES_TOKENIZER,
        null_token: bool = True,
    ) -> None:
        super().__init__(factor=factor, tokenizer=tokenizer, null_token=null_token)
        self.init_tokenizer(self.params.tokenizer, 3, self.params.null_token)

    def lowres(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The small image ``[B, 3, H/factor, W/factor]``: given, or downsampled from the image."""
        f = self.params.factor
        if batch.get("lowres") is not None:
            x = batch["lowres"]
            if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3:
                shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise VqgenError(f"lowres must be small RGB images [B, 3, h, w]; got {shape}")
            check_finite(x, "lowres")
            image = batch.get("image")
            if isinstance(image, torch.Tensor) and tuple(image.shape[-2:]) != (
                x.shape[2] * f, x.shape[3] * f,
            ):
                raise VqgenError(
                    f"lowres is {x.shape[2]}x{x.shape[3]} pixels but the image is "
                    f"{image.shape[-2]}x{image.shape[-1]}; with factor={f} it must be 1/{f} "
                    "of the image's size"
                )
            return x.float()
        x = require(
            batch, "image", "lowres",
            f"([B, 3, H, W], downsampled ×1/{f}) or batch['lowres'] ([B, 3, H/{f}, W/{f}])",
        )
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise VqgenError(f"image must be [B, 3, H, W]; got {shape}")
        h, w = x.shape[-2:]
        if h % f or w % f:
            raise VqgenError(
                f"image of {h}x{w} pixels cannot be downsampled by factor={f}; use a "
                f"multiple of {f} in each dimension"
            )
        check_finite(x, "image")
        return F.avg_pool2d(x.float(), f)  # (B, 3, H/f, W/f): box filter, anti-aliased

    def condition_input(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The small image upsampled back, ``[B, 3, H, W]`` (nearest: blocks of factor²)."""
        f = self.params.factor
        return F.interpolate(self.lowres(batch), scale_factor=f, mode="nearest")
