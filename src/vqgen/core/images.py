"""Small image helpers: 8-bit images to tensors, image grids, data-set previews."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vqgen.core.errors import VqgenError
from vqgen.core.io import atomic_path

__all__ = ["image_grid", "load_rgb", "preview_tiles", "save_image_grid", "u8_to_image",
           "write_preview"]


def u8_to_image(u8: np.ndarray) -> torch.Tensor:
    """``uint8 [H, W, 3]`` → float32 ``[3, H, W]`` in ``[-1, 1]`` (``u8 / 127.5 - 1``)."""
    chw = np.ascontiguousarray(u8.transpose(2, 0, 1))  # (3, H, W)
    return torch.from_numpy(chw.astype(np.float32) / np.float32(127.5) - np.float32(1.0))


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB; transparency is composited onto white."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grey (mode "I" is assumed to hold 16-bit values): reduce to 8 bits
        a = np.asarray(im).astype(np.float32)  # (H, W)
        im = Image.fromarray(np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8))
    elif im.mode == "F":
        a = np.asarray(im, dtype=np.float32)  # (H, W), assumed in [0, 1]
        im = Image.fromarray(np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8))
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        im.mode in ("P", "L", "RGB") and "transparency" in im.info
    )
    if has_alpha:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def load_rgb(path: str | os.PathLike[str]) -> Image.Image:
    """Open an image file as 8-bit RGB.

    Grayscale and palette images are expanded, 16-bit images reduced to 8 bits,
    and images with transparency (RGBA, LA, palette or colour-key transparency)
    composited onto a white background. EXIF orientation is not applied.
    """
    with Image.open(path) as im:
        im.load()
        return _to_rgb(im)


def image_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2,
               pad_value: float = 1.0) -> torch.Tensor:
    """``images`` ``[N, C, H, W]`` in ``[-1, 1]`` (C = 1 or 3) tiled into one uint8 picture
    ``[C, Hg, Wg]``: ``nrow`` images per row, ``ncol * (W + padding) + padding`` wide and
    ``rows * (H + padding) + padding`` high, padded with ``pad_value`` (white by default)."""
    x = torch.as_tensor(images).detach().float().cpu()
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] == 0:
        raise ValueError(f"expected images [N, 1 or 3, H, W] with N >= 1, got {tuple(x.shape)}")
    n, c, h, w = x.shape
    ncol = max(1, min(nrow, n))
    nrows = math.ceil(n / ncol)
    grid = torch.full(
        (c, nrows * (h + padding) + padding, ncol * (w + padding) + padding), float(pad_value)
    )  # (C, Hg, Wg)
    for k in range(n):
        r, col = divmod(k, ncol)
        y0, x0 = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, y0 : y0 + h, x0 : x0 + w] = x[k]
    return ((grid.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (C, Hg, Wg)


def save_image_grid(
    images: torch.Tensor,
    path: str | os.PathLike[str],
    nrow: int = 8,
    padding: int = 2,
    pad_value: float = 1.0,
    row_labels: Sequence[str] | None = None,
) -> Path:
    """Write ``images`` ``[N, C, H, W]`` in ``[-1, 1]`` (C = 1 or 3) as one PNG grid
    (:func:`image_grid`), atomically (a temporary file in the same folder, then
    ``os.replace``); ``row_labels`` (one per row, e.g. class names) are written in a
    margin on the left. Returns the path.
    """
    u8 = image_grid(images, nrow, padding, pad_value)  # (C, Hg, Wg)
    arr = u8.permute(1, 2, 0).numpy()  # (Hg, Wg, C)
    pil = Image.fromarray(arr[..., 0] if u8.shape[0] == 1 else arr)
    if row_labels:
        pil = _with_row_labels(pil, list(row_labels), int(torch.as_tensor(images).shape[-2]),
                               padding)

    with atomic_path(path) as tmp:
        pil.save(tmp, format="PNG")
    return Path(path)


def _with_row_labels(pil: Image.Image, labels: list[str], h: int, padding: int) -> Image.Image:
    """``pil`` (a grid of rows ``h + padding`` high) with a white left margin holding
    ``labels[r]`` beside row ``r`` (names longer than 24 characters are cut)."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default()
    labels = [s if len(s) <= 24 else s[:23] + "…" for s in labels]
    probe = ImageDraw.Draw(pil)
    width = max(int(probe.textlength(s, font=font)) for s in labels) + 2 * padding + 4
    out = Image.new(pil.mode, (pil.width + width, pil.height), "white" if pil.mode == "RGB"
                    else 255)
    out.paste(pil, (width, 0))
    draw = ImageDraw.Draw(out)
    for r, text in enumerate(labels):
        top, bottom = font.getbbox(text)[1::2]
        y = padding + r * (h + padding) + (h - (bottom - top)) // 2 - top
        draw.text((padding + 2, y), text, fill="black" if pil.mode == "RGB" else 0, font=font)
    return out


#: Colours of segmentation labels 0..15 in previews (0 = background, black).
_PALETTE = (
    torch.tensor(
        [
            [0, 0, 0],
            [230, 25, 75],
            [60, 180, 75],
            [255, 225, 25],
            [0, 130, 200],
            [245, 130, 48],
            [145, 30, 180],
            [70, 240, 240],
            [240, 50, 230],
            [210, 245, 60],
            [250, 190, 212],
            [0, 128, 128],
            [220, 190, 255],
            [170, 110, 40],
            [255, 250, 200],
            [128, 0, 0],
        ],
        dtype=torch.float32,
    )
    / 127.5
    - 1
)  # (16, 3) in [-1, 1]


def preview_tiles(sample: dict[str, torch.Tensor], scale: int = 4) -> list[torch.Tensor]:
    """One sample as RGB tiles ``[3, H*scale, W*scale]`` in ``[-1, 1]``: the image with
    its keypoints marked, then each condition map it has (segmentation, depth)."""
    image = sample["image"]  # (3, H, W)
    up = image.repeat_interleave(scale, 1).repeat_interleave(scale, 2).clone()  # (3, sH, sW)
    tiles = [up]
    if "keypoints" in sample:
        for x, y, v in sample["keypoints"].reshape(-1, 3).tolist():  # (N*K, 3)
            if v > 0:
                cy, cx = int(y * scale), int(x * scale)
                up[:, max(cy - 1, 0) : cy + 2, max(cx - 1, 0) : cx + 2] = torch.tensor(
                    [1.0, -1.0, 1.0]
                )[:, None, None]
    if "segmentation" in sample:
        seg = _PALETTE[sample["segmentation"].clamp(0, len(_PALETTE) - 1)]  # (H, W, 3)
        tiles.append(seg.permute(2, 0, 1).repeat_interleave(scale, 1).repeat_interleave(scale, 2))
    if "depth" in sample:
        depth = sample["depth"].expand(3, -1, -1) * 2 - 1  # (3, H, W)
        tiles.append(depth.repeat_interleave(scale, 1).repeat_interleave(scale, 2))
    return tiles


def write_preview(
    dataset: Any, path: str | os.PathLike[str], per_class: int = 4, scale: int = 4
) -> Path:
    """A PNG with one row per class (or one row, unlabelled): each sample's image with
    keypoints, segmentation and depth side by side."""
    classes = list(getattr(dataset, "classes", [])) or [""]
    rows: dict[int, list[dict[str, torch.Tensor]]] = {c: [] for c in range(len(classes))}
    for i in range(min(len(dataset), 50 * per_class * len(classes))):
        sample = dataset[i]
        label = int(sample.get("label", 0))
        if len(rows[label]) < per_class:
            rows[label].append(sample)
        if all(len(r) == per_class for r in rows.values()):
            break
    first = next((row[0] for row in rows.values() if row), None)
    if first is None:
        raise VqgenError("the dataset is empty: nothing to preview")
    blank = torch.ones_like(preview_tiles(first, scale)[0])  # (3, sH, sW) white
    per_sample = len(preview_tiles(first, scale))
    tiles = []
    for row in rows.values():
        row_tiles = [t for s in row for t in preview_tiles(s, scale)]
        tiles += row_tiles + [blank] * (per_class * per_sample - len(row_tiles))
    per_row = per_class * per_sample
    return save_image_grid(torch.stack(tiles), path, nrow=per_row)


