"""``segmentation``: semantic label maps as condition tokens.

Reads ``batch["segmentation"]``: integer ``[B, H, W]`` label maps with values in
``[0, n_labels)`` (the ``shapes`` data: 0 = background, ``1 + class``: 5 labels).

``mode: vqgan`` (the paper's choice) one-hot encodes the map and tokenizes it with
its own segmentation VQGAN (cross-entropy reconstruction; default
``vqgan_segmentation``, f = 4: a 32×32 map gives an 8×8 grid, the image
tokenizer's). ``mode: downsample`` needs no training: each ``downsample × downsample``
block becomes its majority label (ties → the smaller label), so the vocabulary
is the labels themselves; ``tokenizer`` is then unused and ``self.tokenizer`` None.

Ids: the tokenizer's codes (or the labels), then the null token.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import Field

from vqgen.conditioners.base import (
    SpatialConditioner,
    TokenizerSpec,
    check_image_size,
    first_bad,
    require,
)
from vqgen.core.errors import SampleError, VqgenError
from vqgen.core.interfaces import AUTO, Auto, ParamsModel, require_wired

__all__ = ["SEGMENTATION_TOKENIZER", "SegmentationConditioner"]

#: Default cond stage: a small segmentation VQGAN (its n_labels and f are filled in).
SEGMENTATION_TOKENIZER = TokenizerSpec(name="vqgan_segmentation", params={"ch": 32, "n_embed": 256})


class SegmentationConditioner(SpatialConditioner):
    """Label maps → tokens, by a segmentation VQGAN or by majority-vote downsampling."""

    #: the batch key a condition file given to `vqgen sample --cond FILE` fills
    condition_key = "segmentation"

    class Params(ParamsModel):
        mode: Literal["vqgan", "downsample"] = Field(
            "vqgan", description="vqgan: its own tokenizer; downsample: majority vote"
        )
        n_labels: int = Field(5, ge=2, description="label values, background included")
        downsample: Annotated[int, Field(ge=1)] | Auto = Field(
            AUTO, description="block size of the majority vote (auto: the image tokenizer's f)"
        )
        tokenizer: TokenizerSpec = Field(
            default_factory=lambda: SEGMENTATION_TOKENIZER.model_copy(deep=True),
            description="the cond stage (mode vqgan); its n_labels must match",
        )
        null_token: bool = Field(True, description="reserve the last id for 'no condition'")

    def __init__(
        self,
        mode: Literal["vqgan", "downsample"] = "vqgan",
        n_labels: int = 5,
        downsample: int | Auto = AUTO,
        tokenizer: TokenizerSpec | Mapping[str, Any] = SEGMENTATION_TOKENIZER,
        null_token: bool = True,
    ) -> None:
        super().__init__(
            mode=mode, n_labels=n_labels, downsample=downsample, tokenizer=tokenizer,
            null_token=null_token,
        )
        p = self.params
        if p.mode == "vqgan":
            self.init_tokenizer(p.tokenizer, p.n_labels, p.null_token, channel_param="n_labels")
        else:
            require_wired(self, ("downsample",))
            self.tokenizer = None  # majority vote: nothing to train
            self.set_vocab(p.n_labels, p.null_token)

    def labels(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """``batch["segmentation"]`` as int64 ``[B, H, W]``, checked."""
        n = self.params.n_labels
        seg = require(
            batch, "segmentation", "segmentation", f"(int64 [B, H, W] labels in [0, {n}))"
        )
        if not isinstance(seg, torch.Tensor) or seg.ndim != 3:
            shape = tuple(seg.shape) if isinstance(seg, torch.Tensor) else type(seg).__name__
            raise VqgenError(
                f"segmentation must be integer label maps [B, H, W]; got {shape}"
            )
        if seg.is_floating_point() or seg.dtype == torch.bool or seg.is_complex():
            raise VqgenError(
                f"segmentation must hold integer labels (int64 [B, H, W]), got dtype {seg.dtype}"
            )
        seg = seg.long()
        check_image_size(batch, "segmentation", (seg.shape[1], seg.shape[2]))
        i = first_bad((seg < 0) | (seg >= n))
        if i is not None:
            bad = seg[i][(seg[i] < 0) | (seg[i] >= n)]
            raise SampleError(
                "segmentation", i, f"has label {int(bad[0])}, outside [0, {n}) "
                f"(n_labels={n}); raise n_labels to cover every label value"
            )
        return seg  # (B, H, W)

    def condition_input(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """One-hot maps ``[B, n_labels, H, W]`` float (what the segmentation VQGAN encodes)."""
        onehot = F.one_hot(self.labels(batch), self.params.n_labels)  # (B, H, W, n)
        return rearrange(onehot, "b h w n -> b n h w").float()

    def condition_shape(self, height: int, width: int) -> tuple[int, ...]:
        """``(hc, wc)``: the own tokenizer's grid, or the majority-vote blocks'."""
        if self.tokenizer is not None:
            return super().condition_shape(height, width)
        f = int(self.params.downsample)
        if height % f or width % f:
            raise ValueError(f"{height}x{width} maps are not divisible by downsample={f}")
        return height // f, width // f

    def grid(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """``[B, hc, wc]`` codes (vqgan) or majority labels (downsample)."""
        if self.tokenizer is not None:
            return self.encode(self.condition_input(batch))
        f = int(self.params.downsample)
        onehot = self.condition_input(batch)  # (B, n, H, W)
        h, w = onehot.shape[-2:]
        if h % f or w % f:
            raise VqgenError(
                f"segmentation of {h}x{w} pixels is not divisible by downsample={f}"
            )
        votes = F.avg_pool2d(onehot, f)  # (B, n, H/f, W/f) label fractions per block
        return votes.argmax(1)  # (B, H/f, W/f), ties → smaller label
