"""``pose``: keypoints rendered into a limb / heat-map image, through a VQGAN.

Reads ``batch["keypoints"]``: float ``[B, N, K, 3]``, per object (person) ``K`` rows
``(x, y, visible)`` in pixel units of the rendered image (origin at the top-left
corner, pixel ``i`` spans ``[i, i + 1)``; ``visible > 0`` counts), as the ``shapes`` and
``folder`` data give them; or a list of JSON paths, one per sample
(:func:`load_keypoints`: ``{"objects": [[[x, y, v], ...], ...]}`` or the bare list).

Rendering (:meth:`PoseConditioner.render`): a Gaussian blob (std ``sigma``) per
visible joint and a soft line (std ``limb_sigma``) per skeleton limb whose two
ends are visible. ``channels: 1`` draws everything into one channel, ``2`` limbs
and joints apart, ``3`` each limb in its own colour (joints white). The render
size is ``batch["size"]`` (``(H, W)``) if given, else the size of
``batch["image"]``, else ``resolution``; a larger canvas at sampling needs
``{"keypoints": ..., "size": (H, W)}``.

``skeleton``: ``coco17`` (the COCO person skeleton), ``shapes`` (the ``shapes``
data's five points), a list of ``[i, j]`` pairs, or ``auto`` (COCO-17 for 17 points,
``shapes`` for 5; other counts need an explicit skeleton).

Ids: the tokenizer's codes, then the null token.
"""

from __future__ import annotations

import colorsys
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, NonNegativeInt

from vqgen.conditioners.base import SpatialConditioner, TokenizerSpec, first_bad, require
from vqgen.conditioners.depth import MAP_TOKENIZER
from vqgen.core.errors import SampleError, VqgenError
from vqgen.core.interfaces import ParamsModel

__all__ = ["COCO17_SKELETON", "SHAPES_SKELETON", "PoseConditioner", "load_keypoints"]

#: COCO person keypoints (nose, eyes, ears, shoulders, elbows, wrists, hips, knees,
#: ankles), 0-indexed limbs as in the COCO annotations.
COCO17_SKELETON: list[tuple[int, int]] = [
    (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7),
    (6, 8), (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6),
]
#: The ``shapes`` data's points (centre, top, right, bottom, left): spokes and a ring
#: (equal to ``vqgen.plugins.shapes.SKELETON``).
SHAPES_SKELETON: list[tuple[int, int]] = [
    (0, 1), (0, 2), (0, 3), (0, 4), (1, 2), (2, 3), (3, 4), (4, 1),
]
#: The ``skeleton`` param: a named skeleton, ``auto``, or ``[[i, j], ...]`` limbs.
Skeleton = Literal["auto", "coco17", "shapes"] | list[tuple[NonNegativeInt, NonNegativeInt]]
_NAMED = {"coco17": COCO17_SKELETON, "shapes": SHAPES_SKELETON}
_AUTO = {17: "coco17", 5: "shapes"}


def load_keypoints(paths: Sequence[str | os.PathLike[str]]) -> torch.Tensor:
    """Keypoint JSON files, one per sample → float ``[B, N, K, 3]`` (missing objects zero).

    Each file is ``{"objects": [[[x, y, visible], ...], ...]}`` or that list of
    objects; every object of every file has the same number of points ``K``.
    """
    per_sample: list[torch.Tensor] = []
    for i, p in enumerate(paths):
        path = Path(p)
        if not path.is_file():
            raise VqgenError(f"keypoints of sample {i}: no such file {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise VqgenError(f"keypoints of sample {i}: cannot read {path} ({err})") from None
        objects = data.get("objects") if isinstance(data, dict) else data
        try:
            kp = torch.tensor(objects, dtype=torch.float32)  # (N, K, 3)
            if kp.numel() == 0:
                kp = kp.reshape(0, 0, 3)
        except (TypeError, ValueError, RuntimeError):  # not numbers, or ragged
            kp = torch.zeros(0)
        if kp.ndim != 3 or kp.shape[-1] != 3:
            raise VqgenError(
                f"keypoints of sample {i}: {path} must hold a list of objects, each a list "
                "of [x, y, visible] triples with the same number of points"
            )
        per_sample.append(kp)
    ks = {kp.shape[1] for kp in per_sample if len(kp)}
    if len(ks) > 1:
        raise VqgenError(f"keypoint files have different numbers of points per object: {ks}")
    k = ks.pop() if ks else 0
    n = max([len(kp) for kp in per_sample], default=0)
    out = torch.zeros(len(per_sample), max(n, 1), k, 3)  # (B, N, K, 3)
    for i, kp in enumerate(per_sample):
        out[i, : len(kp)] = kp
    return out


def _segment_dist2(
    px: torch.Tensor, py: torch.Tensor, a: torch.Tensor, b: torch.Tensor
) -> torch.Tensor:
    """Squared distance ``[B, N, H, W]`` from pixel centres to segments ``a → b`` ``[B, N, 2]``."""
    ax, ay = a[..., 0, None, None], a[..., 1, None, None]  # (B, N, 1, 1)
    dx, dy = (b - a)[..., 0, None, None], (b - a)[..., 1, None, None]
    t = ((px - ax) * dx + (py - ay) * dy) / (dx * dx + dy * dy).clamp_min(1e-12)
    t = t.clamp(0, 1)  # (B, N, H, W): nearest point's position along the segment
    return (px - ax - t * dx) ** 2 + (py - ay - t * dy) ** 2


class PoseConditioner(SpatialConditioner):
    """Keypoints rendered as limbs and joint heat-maps, through a VQGAN."""

    #: the batch key a condition file given to `vqgen sample --cond FILE` fills
    condition_key = "keypoints"

    class Params(ParamsModel):
        skeleton: Skeleton = Field(
            "auto", description="limbs: coco17, shapes, [[i, j], ...], or auto (by K)"
        )
        sigma: float = Field(1.0, gt=0.0, description="joint blob std (pixels)")
        limb_sigma: float = Field(0.5, gt=0.0, description="limb line std (pixels)")
        channels: Literal[1, 2, 3] = Field(
            1, description="1: all in one; 2: limbs, joints; 3: limbs coloured, joints white"
        )
        resolution: int = Field(
            32, ge=1, description="render size when the batch has neither 'size' nor 'image'"
        )
        tokenizer: TokenizerSpec = Field(
            default_factory=lambda: MAP_TOKENIZER.model_copy(deep=True),
            description="the cond stage: a tokenizer of `channels`-channel maps",
        )
        null_token: bool = Field(True, description="reserve the last id for 'no condition'")

    def __init__(
        self,
        skeleton: Skeleton = "auto",
        sigma: float = 1.0,
        limb_sigma: float = 0.5,
        channels: Literal[1, 2, 3] = 1,
        resolution: int = 32,
        tokenizer: TokenizerSpec | Mapping[str, Any] = MAP_TOKENIZER,
        null_token: bool = True,
    ) -> None:
        super().__init__(
            skeleton=skeleton, sigma=sigma, limb_sigma=limb_sigma, channels=channels,
            resolution=resolution, tokenizer=tokenizer, null_token=null_token,
        )
        p = self.params
        self.init_tokenizer(p.tokenizer, p.channels, p.null_token)

    def skeleton(self, k: int) -> list[tuple[int, int]]:
        """The limbs for objects of ``k`` points; an index ``>= k`` is an error."""
        sk = self.params.skeleton
        if sk == "auto":
            if k not in _AUTO:
                raise VqgenError(
                    f"the pose conditioner's skeleton is 'auto', which knows 17 points "
                    f"(coco17) and 5 (shapes), but the keypoints have K={k}; set "
                    "params.skeleton to a list of [i, j] pairs"
                )
            sk = _AUTO[k]
        limbs = _NAMED[sk] if isinstance(sk, str) else [tuple(pair) for pair in sk]
        bad = [pair for pair in limbs if max(pair) >= k]
        if bad:
            raise VqgenError(
                f"skeleton {sk if isinstance(sk, str) else 'list'} joins keypoints {bad[0]}, "
                f"but the keypoints have K={k} points per object (indices 0..{k - 1}); "
                "choose a skeleton for this data"
            )
        return limbs  # type: ignore[return-value]

    def keypoints(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """``batch["keypoints"]`` as float ``[B, N, K, 3]``, checked (paths are read)."""
        kp = require(
            batch, "keypoints", "pose",
            "[B, N, K, 3] float (x, y, visible) per object, or a list of JSON paths",
        )
        if isinstance(kp, list | tuple):
            kp = load_keypoints(kp)
        if not isinstance(kp, torch.Tensor) or kp.ndim != 4 or kp.shape[-1] != 3:
            shape = tuple(kp.shape) if isinstance(kp, torch.Tensor) else type(kp).__name__
            raise VqgenError(
                f"keypoints must be [B, N, K, 3] (x, y, visible) per object; got {shape}"
            )
        kp = kp.float()
        i = first_bad(~torch.isfinite(kp))
        if i is not None:
            raise SampleError("keypoints", i, "contain NaN or infinite values")
        return kp

    def size(self, batch: Mapping[str, Any]) -> tuple[int, int]:
        """Render size ``(H, W)``: ``batch["size"]``, the image's, or ``resolution``."""
        if batch.get("size") is not None:
            size = torch.as_tensor(batch["size"]).reshape(-1).tolist()
            if len(size) != 2 or min(size) < 1:
                raise VqgenError(f"size must be (H, W) in pixels, got {batch['size']!r}")
            return int(size[0]), int(size[1])
        image = batch.get("image")
        if isinstance(image, torch.Tensor) and image.ndim == 4:
            return int(image.shape[-2]), int(image.shape[-1])
        return self.params.resolution, self.params.resolution

    def render(self, keypoints: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``[B, N, K, 3]`` keypoints → ``[B, channels, H, W]`` in ``[0, 1]``."""
        b, _, k, _ = keypoints.shape
        h, w = size
        p = self.params
        limbs = self.skeleton(k)
        dev = keypoints.device
        py = (torch.arange(h, device=dev, dtype=torch.float32) + 0.5)[:, None]  # (H, 1)
        px = (torch.arange(w, device=dev, dtype=torch.float32) + 0.5)[None, :]  # (1, W)
        xy, vis = keypoints[..., :2], keypoints[..., 2] > 0  # (B, N, K, 2), (B, N, K)
        zero = torch.zeros(b, h, w, device=dev)
        joints = zero.clone()  # (B, H, W)
        for j in range(k):
            d2 = (px - xy[:, :, j, 0, None, None]) ** 2 + (py - xy[:, :, j, 1, None, None]) ** 2
            blob = torch.exp(-d2 / (2 * p.sigma**2)) * vis[:, :, j, None, None]  # (B, N, H, W)
            joints = torch.maximum(joints, blob.amax(1))
        limb_maps = []
        for i, j in limbs:
            d2 = _segment_dist2(px, py, xy[:, :, i], xy[:, :, j])  # (B, N, H, W)
            both = (vis[:, :, i] & vis[:, :, j])[..., None, None]  # (B, N, 1, 1)
            limb_maps.append((torch.exp(-d2 / (2 * p.limb_sigma**2)) * both).amax(1))
        if p.channels == 3:
            out = torch.zeros(b, 3, h, w, device=dev)
            for n, m in enumerate(limb_maps):
                rgb = torch.tensor(colorsys.hsv_to_rgb(n / len(limb_maps), 1.0, 1.0), device=dev)
                out = torch.maximum(out, m[:, None] * rgb[None, :, None, None])
            return torch.maximum(out, joints[:, None])  # (B, 3, H, W)
        limbs_map = torch.stack(limb_maps).amax(0) if limb_maps else zero  # (B, H, W)
        if p.channels == 2:
            return torch.stack([limbs_map, joints], 1)  # (B, 2, H, W)
        return torch.maximum(limbs_map, joints)[:, None]  # (B, 1, H, W)

    def condition_input(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The rendered pose ``[B, channels, H, W]`` in ``[-1, 1]``."""
        return self.render(self.keypoints(batch), self.size(batch)) * 2 - 1
