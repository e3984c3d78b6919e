"""``depth``: depth maps as condition tokens, through a 1-channel VQGAN.

Reads ``batch["depth"]``: float ``[B, 1, H, W]`` (the ``shapes`` and ``folder`` data
give ``[0, 1]``, 0 = near; a folder reads 16-bit PNG or ``.npy`` files), or a list
of ``.png`` / ``.npy`` paths, one per sample (:func:`load_depth`). Each map is
normalised per image (min-max to ``[0, 1]``, a constant map to 0.5, then to
``[-1, 1]``), so only relative depth matters, and encoded by the conditioner's own
1-channel VQGAN (default f = 4: a 32×32 map gives an 8×8 grid).

Ids: the tokenizer's codes, then the null token.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pydantic import Field

from vqgen.conditioners.base import (
    SpatialConditioner,
    TokenizerSpec,
    check_finite,
    check_image_size,
    require,
)
from vqgen.core.data import read_npy_map
from vqgen.core.errors import VqgenError
from vqgen.core.interfaces import ParamsModel

__all__ = ["MAP_TOKENIZER", "DepthConditioner", "load_depth", "normalize_per_image"]

#: Default cond stage of rendered maps (depth, edges, pose): a small VQGAN; its input
#: channels and f are filled in (what the conditioner feeds it, the image tokenizer's f).
MAP_TOKENIZER = TokenizerSpec(name="vqgan", params={"ch": 32, "n_embed": 256})


def load_depth(paths: Sequence[str | os.PathLike[str]]) -> torch.Tensor:
    """Depth files (8/16-bit grayscale PNG or 2-D ``.npy``), one per sample → ``[B, 1, H, W]``.

    Values are returned as stored (PNG scaled to ``[0, 1]``); the conditioner
    normalises per image anyway. Every map must have the same size.
    """
    maps = []
    for i, p in enumerate(paths):
        path = Path(p)
        if not path.is_file():
            raise VqgenError(f"depth of sample {i}: no such file {path}")
        try:
            if path.suffix.lower() == ".npy":
                a = read_npy_map(path)  # (H, W)
            else:
                with Image.open(path) as im:
                    scale = 255.0 if im.mode == "L" else 65535.0
                    a = np.asarray(im).astype(np.float32) / np.float32(scale)
        except (OSError, ValueError) as err:
            raise VqgenError(f"depth of sample {i}: cannot read {path} ({err})") from None
        a = a.squeeze()
        if a.ndim != 2:
            raise VqgenError(f"depth of sample {i}: {path} is not a 2-D map (shape {a.shape})")
        maps.append(torch.from_numpy(a))
    sizes = {tuple(m.shape) for m in maps}
    if len(sizes) > 1:
        raise VqgenError(f"depth maps differ in size ({sorted(sizes)}); give maps of one size")
    return torch.stack(maps)[:, None]  # (B, 1, H, W)


def normalize_per_image(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` min-max normalised per image to ``[0, 1]``; constant maps → 0.5."""
    lo = x.amin(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    span = hi - lo
    out = (x - lo) / span.clamp_min(torch.finfo(x.dtype).tiny)
    return torch.where(span > 0, out, torch.full_like(x, 0.5))


class DepthConditioner(SpatialConditioner):
    """Depth maps, normalised per image, through a 1-channel VQGAN."""

    #: the batch key a condition file given to `vqgen sample --cond FILE` fills
    condition_key = "depth"

    class Params(ParamsModel):
        tokenizer: TokenizerSpec = Field(
            default_factory=lambda: MAP_TOKENIZER.model_copy(deep=True),
            description="the cond stage: a tokenizer of 1-channel maps",
        )
        null_token: bool = Field(True, description="reserve the last id for 'no condition'")

    def __init__(
        self,
        tokenizer: TokenizerSpec | Mapping[str, Any] = MAP_TOKENIZER,
        null_token: bool = True,
    ) -> None:
        super().__init__(tokenizer=tokenizer, null_token=null_token)
        self.init_tokenizer(self.params.tokenizer, 1, self.params.null_token)

    def depth(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """``batch["depth"]`` as float ``[B, 1, H, W]``, checked (paths are read)."""
        d = require(batch, "depth", "depth", "(float [B, 1, H, W], or .png/.npy paths)")
        if isinstance(d, list | tuple):
            d = load_depth(d)
        if not isinstance(d, torch.Tensor) or d.ndim != 4 or d.shape[1] != 1:
            shape = tuple(d.shape) if isinstance(d, torch.Tensor) else type(d).__name__
            raise VqgenError(f"depth must be single-channel maps [B, 1, H, W]; got {shape}")
        d = d.float()
        check_finite(d, "depth")
        check_image_size(batch, "depth", (d.shape[2], d.shape[3]))
        return d  # (B, 1, H, W)

    def condition_input(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Per-image normalised depth ``[B, 1, H, W]`` in ``[-1, 1]``."""
        return normalize_per_image(self.depth(batch)) * 2 - 1
