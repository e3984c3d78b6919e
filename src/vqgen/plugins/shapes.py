"""``shapes``: procedural coloured shapes with class, segmentation, depth and keypoints.

The embedded default dataset: generated on the fly (no files), deterministic.
Sample ``index`` is drawn from its own random stream ``PCG64([seed, split, index])``
(split: train = 0, val = 1), so a sample does not depend on access order, on
DataLoader workers, or on ``length``, and train and val never share a sample.

Each image holds 1..``max_shapes`` shapes of the classes ``circle``, ``square``,
``star``, ``triangle`` (sorted, as a folder written by :func:`write_shapes` lists
them), each with a random colour (kept apart from the background's mean
colour), size, position and rotation, over a flat, linear-gradient or noise
texture background (``background="textured"``, the default). Two params make
the shape carry the picture instead of the colours, for small CPU budgets:
``background="flat"`` (one random flat colour) or ``"gray"`` (a flat grey of
level 0.5), and ``palette=N`` (shape colours drawn from the
first ``N`` of the eight corners of the RGB cube instead of the whole cube).
Class, size, position and rotation stay random in every setting. Edges are
anti-aliased: coverage is exact along x and sampled on 8 sub-rows per pixel along y.

The *main* shape, whose class is ``"label"``, is the largest (its circumradius
is 0.22–0.4 × resolution; every other shape is 0.35–0.65 × as large) and the
nearest. Shapes are painted back to front in order of size, like objects seen
in perspective, so the main shape is never occluded.

Sample format (see :mod:`vqgen.core.data` for the shared conventions):

* ``"image"``: float32 ``[3, H, W]`` in ``[-1, 1]``; the values are exactly 8-bit
  levels (``u8 / 127.5 - 1``), so a written PNG reads back identically.
* ``"label"``: int64 scalar, the main shape's class index into ``CLASSES``.
* ``"segmentation"``: int64 ``[H, W]``: 0 = background, ``1 + class`` where the
  front-most shape covering the pixel by more than 50 % has that class.
* ``"depth"``: float32 ``[1, H, W]``, an absolute (not per-image normalised)
  distance from the camera: 0 = near, 1 = far. The background is a random
  sloped plane with depths in ``[0.6, 1]``; each shape is a flat card at a
  constant depth in ``[0.1, 0.5]``, nearer for larger shapes; edge pixels blend
  object and background depth by coverage, like the colours.
* ``"keypoints"``: float32 ``[max_shapes, 5, 3]``, rows ``(x, y, visible)`` in pixel
  units (origin at the top-left image corner, pixel ``i`` spans ``[i, i + 1)``).
  Object ``j`` is the ``j``-th largest shape (object 0 = the main shape); rows
  of absent objects are zero. Points (``KEYPOINT_NAMES``): the centre, then where
  rays from the centre along the shape's own (rotated) up, right, down and left
  axes leave the shape: a circle's rim, a square's edge midpoints, a
  triangle's apex, side points and base midpoint, a star's top tip, the edges
  it crosses left and right and the inner vertex below. ``visible`` is 1 when
  the point lies inside the image; invisible points are ``(0, 0, 0)``.
  ``SKELETON`` joins the centre to each boundary point and the boundary points
  in a ring.

Why one file of this size: the generator of the embedded data and its writer to the
folder layout, which must agree sample for sample.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from PIL import Image
from pydantic import Field, ValidationError
from torch.utils.data import Dataset

from vqgen.core.errors import VqgenError
from vqgen.core.images import u8_to_image
from vqgen.core.interfaces import Component, ParamsModel
from vqgen.core.progress import track
from vqgen.core.registry import format_validation_error

__all__ = ["CLASSES", "KEYPOINT_NAMES", "SKELETON", "ShapesDataset", "write_shapes"]

CLASSES: list[str] = ["circle", "square", "star", "triangle"]
KEYPOINT_NAMES: list[str] = ["center", "top", "right", "bottom", "left"]
SKELETON: list[tuple[int, int]] = [(0, 1), (0, 2), (0, 3), (0, 4), (1, 2), (2, 3), (3, 4), (4, 1)]

_SPLIT_STREAM = {"train": 0, "val": 1}
_SUBROWS = 8  # vertical anti-aliasing samples per pixel row
_STAR_INNER = 0.45  # inner / outer radius of the five-pointed star (a pentagram has 0.38)
# shape colours of palette=N: the first N corners of the RGB cube
_PALETTE = np.array(
    [[1, 0, 0], [0, 0, 1], [1, 1, 0], [0, 1, 0], [1, 0, 1], [0, 1, 1], [1, 1, 1], [0, 0, 0]],
    np.float32,
)


# -----------------------------------------------------------------------------
# shape geometry, in a local frame: unit circumradius, y pointing down, "up" = (0, -1)


def _regular(n: int, phase: float, radii: tuple[float, ...] = (1.0,)) -> np.ndarray:
    a = phase + 2 * math.pi * np.arange(n) / n
    r = np.resize(np.asarray(radii), n)
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)  # (n, 2)


_POLYGONS: dict[str, np.ndarray | None] = {
    "circle": None,  # rendered exactly, not as a polygon
    "square": _regular(4, math.pi / 4),  # corners on the diagonals: axis-aligned edges
    "star": _regular(10, -math.pi / 2, (1.0, _STAR_INNER)),  # a tip points up
    "triangle": _regular(3, -math.pi / 2),  # apex up
}
_DIRECTIONS = np.array([[0.0, -1.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # up right down left


def _ray_exit(poly: np.ndarray, d: np.ndarray) -> float:
    """Distance from the origin along ``d`` to the nearest polygon edge."""
    best = math.inf
    for i in range(len(poly)):
        p, e = poly[i], poly[(i + 1) % len(poly)] - poly[i]
        det = -d[0] * e[1] + e[0] * d[1]  # solve t * d - s * e = p
        if abs(det) < 1e-12:
            continue
        t = (-p[0] * e[1] + e[0] * p[1]) / det
        s = (d[0] * p[1] - d[1] * p[0]) / det
        if t > 1e-9 and -1e-9 <= s <= 1 + 1e-9:
            best = min(best, t)
    return best


def _keypoints_local(poly: np.ndarray | None) -> np.ndarray:
    dist = [1.0] * 4 if poly is None else [_ray_exit(poly, d) for d in _DIRECTIONS]
    return np.concatenate([[[0.0, 0.0]], _DIRECTIONS * np.array(dist)[:, None]])  # (5, 2)


_KEYPOINTS = [_keypoints_local(_POLYGONS[c]) for c in CLASSES]


# -----------------------------------------------------------------------------
# anti-aliased coverage: exact along x, _SUBROWS samples along y


def _spans_to_coverage(
    xa: np.ndarray, xb: np.ndarray, valid: np.ndarray, nrows: int, width: int
) -> np.ndarray:
    """Horizontal spans ``[xa, xb)`` on ``nrows * _SUBROWS`` sub-rows → ``(nrows, width)``."""
    xa = np.where(valid, np.clip(xa, 0, width), 0.0)  # (S, M)
    xb = np.where(valid, np.clip(xb, 0, width), 0.0)
    row = (np.arange(xa.shape[0]) // _SUBROWS)[:, None] * (width + 2)  # (S, 1)
    idx, wts = [], []
    # the coverage of [0, x) in column c is 1 left of floor(x), frac(x) at it, 0 after;
    # as differences along x: +frac - 1 at floor(x), -frac at floor(x) + 1
    for x, sign in ((xb, 1.0), (xa, -1.0)):
        f = np.floor(x)
        fr = x - f
        base = row + f.astype(np.int64)
        idx += [base.ravel(), base.ravel() + 1]
        wts += [(sign * (fr - 1)).ravel(), (-sign * fr).ravel()]
    diff = np.bincount(
        np.concatenate(idx), np.concatenate(wts), minlength=nrows * (width + 2)
    )  # (nrows * (w + 2),)
    cov = np.cumsum(diff.reshape(nrows, width + 2), axis=1)[:, :width] / _SUBROWS
    return np.clip(cov, 0.0, 1.0).astype(np.float32)  # (nrows, w)


class _Box(NamedTuple):
    """Coverage ``cov`` (float32 ``(y1 - y0, x1 - x0)``) of the pixels ``[y0:y1, x0:x1]``."""

    y0: int
    y1: int
    x0: int
    x1: int
    cov: np.ndarray


def _clamp(lo: float, hi: float, size: int) -> tuple[int, int]:
    a = min(max(math.floor(lo), 0), size)
    return a, max(min(math.ceil(hi), size), a)


def _subrows(y0: int, y1: int) -> np.ndarray:
    return y0 + (np.arange((y1 - y0) * _SUBROWS) + 0.5) / _SUBROWS  # (S,) sub-row centres


def _circle_coverage(cx: float, cy: float, r: float, size: int) -> _Box:
    """Anti-aliased coverage of a ``size × size`` image by a disc."""
    (y0, y1), (x0, x1) = _clamp(cy - r, cy + r, size), _clamp(cx - r, cx + r, size)
    ys = _subrows(y0, y1)
    h2 = r * r - (ys - cy) ** 2  # (S,)
    h = np.sqrt(np.maximum(h2, 0.0))[:, None]  # (S, 1)
    cov = _spans_to_coverage(cx - x0 - h, cx - x0 + h, h2[:, None] > 0, y1 - y0, x1 - x0)
    return _Box(y0, y1, x0, x1, cov)


def _polygon_coverage(verts: np.ndarray, size: int) -> _Box:
    """Anti-aliased coverage of a ``size × size`` image by a simple polygon ``(V, 2)``."""
    y0, y1 = _clamp(verts[:, 1].min(), verts[:, 1].max(), size)
    x0, x1 = _clamp(verts[:, 0].min(), verts[:, 0].max(), size)
    p, q = verts, np.roll(verts, -1, axis=0)  # edges p → q, (E, 2) each
    lo, hi = np.minimum(p[:, 1], q[:, 1]), np.maximum(p[:, 1], q[:, 1])
    dy = q[:, 1] - p[:, 1]
    slope = (q[:, 0] - p[:, 0]) / np.where(dy == 0, 1.0, dy)
    y = _subrows(y0, y1)[:, None]  # (S, 1)
    cross = (y >= lo) & (y < hi)  # (S, E), half-open so a vertex counts once
    xs = np.where(cross, p[:, 0] - x0 + (y - p[:, 1]) * slope, np.inf)
    xs.sort(axis=1)  # crossings left to right; even-odd fill pairs them up
    m = len(verts) // 2
    xa, xb = xs[:, 0 : 2 * m : 2], xs[:, 1 : 2 * m : 2]  # (S, m)
    valid = np.isfinite(xb)
    xa, xb = np.where(valid, xa, 0.0), np.where(valid, xb, 0.0)
    return _Box(y0, y1, x0, x1, _spans_to_coverage(xa, xb, valid, y1 - y0, x1 - x0))


# -----------------------------------------------------------------------------
# the dataset


class _Raw(NamedTuple):
    image: np.ndarray  # (H, W, 3) uint8
    label: int
    segmentation: np.ndarray  # (H, W) int64
    depth: np.ndarray  # (H, W) float32
    keypoints: np.ndarray  # (max_shapes, 5, 3) float32
    n_objects: int


class ShapesDataset(Component, Dataset):
    """Procedural coloured shapes (circle, square, star, triangle) with all conditions.

    Generated on the fly and deterministic in ``(seed, split, index)``; see the
    module docstring for the sample format.
    """

    classes: list[str] = CLASSES
    keypoint_names: list[str] = KEYPOINT_NAMES
    skeleton: list[tuple[int, int]] = SKELETON

    class Params(ParamsModel):
        resolution: int = Field(32, ge=32, le=256)
        length: int = Field(10000, ge=1, le=10_000_000,
                            description="samples per split (generated on the fly)")
        seed: int = Field(0, ge=0)
        split: Literal["train", "val"] = "train"
        max_shapes: int = Field(1, ge=1, le=4)
        background: Literal["textured", "flat", "gray"] = Field(
            "textured", description="textured: flat, gradient or noise (the default); flat: "
            "one random colour; gray: flat mid-grey (0.5)"
        )
        palette: int = Field(
            0, ge=0, le=len(_PALETTE),
            description="0: shape colours anywhere in the RGB cube; N: the first N corners "
            "of the RGB cube (red, blue, yellow, green, magenta, cyan, white, black)",
        )

    @classmethod
    def class_names(cls, params: Mapping[str, Any]) -> list[str]:
        """The names of the class ids (the same for every params): ``CLASSES``."""
        return list(CLASSES)

    def __init__(
        self,
        resolution: int = 32,
        length: int = 10000,
        seed: int = 0,
        split: Literal["train", "val"] = "train",
        max_shapes: int = 1,
        background: Literal["textured", "flat", "gray"] = "textured",
        palette: int = 0,
    ) -> None:
        super().__init__(
            resolution=resolution, length=length, seed=seed, split=split, max_shapes=max_shapes,
            background=background, palette=palette,
        )
        self.classes = list(CLASSES)
        self.keypoint_names = list(KEYPOINT_NAMES)
        self.skeleton = list(SKELETON)
        n = self.params.resolution
        self._u = ((np.arange(n) + 0.5) / n).astype(np.float32)  # pixel centres in (0, 1)

    def __len__(self) -> int:
        return self.params.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        n = self.params.length
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} samples")
        raw = self.generate(index % n)
        return {
            "image": u8_to_image(raw.image),  # (3, H, W)
            "label": torch.tensor(raw.label, dtype=torch.int64),
            "segmentation": torch.from_numpy(raw.segmentation),  # (H, W)
            "depth": torch.from_numpy(raw.depth)[None],  # (1, H, W)
            "keypoints": torch.from_numpy(raw.keypoints),  # (max_shapes, 5, 3)
        }

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        """A flat, gradient or noise-texture background, float32 ``(H, W, 3)`` in [0, 1]."""
        n, u = self.params.resolution, self._u
        if self.params.background != "textured":
            img = np.empty((n, n, 3), np.float32)
            if self.params.background == "gray":
                img[:] = np.float32(0.5)
            else:
                img[:] = rng.random(3, np.float32)
            return img
        kind = int(rng.integers(3))
        if kind == 0:  # flat
            img = np.empty((n, n, 3), np.float32)
            img[:] = rng.random(3, np.float32)
        elif kind == 1:  # linear gradient between two colours at a random angle
            c0, c1 = rng.random((2, 3), np.float32)
            phi = float(rng.uniform(0, 2 * math.pi))
            cs, sn = math.cos(phi), math.sin(phi)
            t = ((u[None, :] - 0.5) * cs + (u[:, None] - 0.5) * sn) / (abs(cs) + abs(sn)) + 0.5
            img = c0 + t[..., None] * (c1 - c0)  # (H, W, 3)
        else:  # noise texture: coarse colour blobs plus fine grain around a base colour
            g = int(rng.integers(2, 6))
            coarse = rng.random(3) + rng.normal(0.0, 0.15, (g, g, 3))
            coarse_u8 = np.clip(coarse * 255 + 0.5, 0, 255).astype(np.uint8)
            fine_u8 = rng.integers(0, 256, (n // 2, n // 2, 3), dtype=np.uint8)
            big = Image.fromarray(coarse_u8).resize((n, n), Image.Resampling.BICUBIC)
            grain = Image.fromarray(fine_u8).resize((n, n), Image.Resampling.BILINEAR)
            grain_f = np.asarray(grain, np.float32) * np.float32(0.12 / 255) - np.float32(0.06)
            img = np.asarray(big, np.float32) * np.float32(1 / 255) + grain_f
            np.clip(img, 0.0, 1.0, out=img)
        return img

    def generate(self, index: int) -> _Raw:
        """Sample ``index`` as numpy arrays (what ``__getitem__`` and ``write_shapes`` use)."""
        p = self.params
        size, u = p.resolution, self._u
        rng = np.random.default_rng([p.seed, _SPLIT_STREAM[p.split], index])

        img = self._background(rng)  # (H, W, 3)
        bg_mean = img[::4, ::4].reshape(-1, 3).mean(axis=0)  # (3,)
        far = float(rng.uniform(0.75, 0.85))
        gx, gy = (float(g) for g in rng.uniform(-0.15, 0.15, 2))
        depth = far + gx * (u[None, :] - 0.5) + gy * (u[:, None] - 0.5)  # (H, W) in [0.6, 1]

        n = int(rng.integers(1, p.max_shapes + 1))
        cls = rng.integers(0, len(CLASSES), n)
        r0 = float(rng.uniform(0.22, 0.4)) * size
        radii = np.concatenate([[r0], np.sort(r0 * rng.uniform(0.35, 0.65, n - 1))[::-1]])
        centres = np.concatenate(
            [rng.uniform(0.5 * r0, size - 0.5 * r0, (1, 2)), rng.uniform(0, size, (n - 1, 2))]
        )  # (n, 2): the main shape's centre stays well inside
        angles = rng.uniform(0, 2 * math.pi, n)
        obj_depth = np.sort(rng.uniform(0.1, 0.5, n))  # object 0 (the largest) is nearest
        colours = rng.random((n, 4, 3), np.float32)  # 4 candidates per shape
        seg = np.zeros((size, size), np.int64)
        kp = np.zeros((p.max_shapes, len(KEYPOINT_NAMES), 3), np.float32)

        for j in reversed(range(n)):  # paint back to front
            c, r, (cx, cy) = int(cls[j]), float(radii[j]), centres[j]
            cs, sn = math.cos(angles[j]), math.sin(angles[j])
            rot = np.array([[cs, -sn], [sn, cs]]) * r  # local → image, scaled
            poly = _POLYGONS[CLASSES[c]]
            if poly is None:
                y0, y1, x0, x1, cov = _circle_coverage(cx, cy, r, size)
            else:
                y0, y1, x0, x1, cov = _polygon_coverage(poly @ rot.T + centres[j], size)
            candidates = colours[j]  # (4, 3)
            if p.palette:
                candidates = _PALETTE[rng.integers(0, p.palette, 4)]  # (4, 3)
            dist = np.linalg.norm(candidates - bg_mean, axis=1)  # (4,)
            far_enough = np.nonzero(dist > 0.4)[0]
            col = candidates[far_enough[0] if len(far_enough) else int(dist.argmax())]
            if cov.size:
                a = cov[..., None]  # (h, w, 1)
                img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - a) + col * a
                d = np.float32(obj_depth[j])
                depth[y0:y1, x0:x1] = depth[y0:y1, x0:x1] * (1 - cov) + d * cov
                seg[y0:y1, x0:x1][cov > 0.5] = c + 1
            pts = (_KEYPOINTS[c] @ rot.T + centres[j]).astype(np.float32)  # (5, 2)
            vis = ((pts >= 0) & (pts < size)).all(axis=1)  # (5,)
            kp[j] = np.where(vis[:, None], np.concatenate([pts, np.ones((5, 1), np.float32)], 1), 0)

        # every step was a convex blend of values in [0, 1]: no clipping needed
        image = (img * 255 + 0.5).astype(np.uint8)  # (H, W, 3)
        depth = np.clip(depth, 0.0, 1.0).astype(np.float32)
        return _Raw(image, int(cls[0]), seg, depth, kp, n)

    # -----------------------------------------------------------------------------
    # writing the folder format

    def write_folder(
        self, out_dir: str | Path, *, overwrite: bool = False, progress: bool = True
    ) -> Path:
        """Write every sample to ``out_dir`` in the ``folder`` dataset's layout.

        Writes ``images/<class>/<stem>.png`` (a folder for every class, even an empty
        one, so class indices match ``CLASSES``), ``segmentation/<stem>.png`` (8-bit
        label maps), ``depth/<stem>.png`` (16-bit, ``round(depth * 65535)``),
        ``keypoints/<stem>.json`` (one object per shape, largest first) and
        ``shapes.json`` (the generator's params, classes, keypoint names and
        skeleton). Stems are ``000000``, ``000001``, … A non-empty ``out_dir`` is
        refused unless ``overwrite``, which first deletes those four folders and
        ``shapes.json`` (nothing else). Returns ``out_dir``.
        """
        out = Path(out_dir).expanduser()
        n, ds = len(self), self
        if out.exists() and not out.is_dir():
            raise VqgenError(f"{out} exists and is not a directory")
        if out.is_dir() and any(out.iterdir()):
            if not overwrite:
                raise VqgenError(
                    f"refusing to write shapes data into {out}: the directory is not empty "
                    "(choose a new directory, or pass overwrite=True / --overwrite to replace "
                    "its images/, segmentation/, depth/ and keypoints/ folders)"
                )
            for sub in ("images", "segmentation", "depth", "keypoints"):
                if (out / sub).is_dir():
                    shutil.rmtree(out / sub)
            (out / "shapes.json").unlink(missing_ok=True)

        dirs = {k: out / k for k in ("segmentation", "depth", "keypoints")}
        for d in [*dirs.values(), *(out / "images" / c for c in CLASSES)]:
            d.mkdir(parents=True, exist_ok=True)
        width = max(6, len(str(n - 1)))
        for i in track(range(n), n, desc=f"shapes → {out}", enabled=progress, unit="img"):
            raw = ds.generate(i)
            stem = f"{i:0{width}d}"
            Image.fromarray(raw.image).save(out / "images" / CLASSES[raw.label] / f"{stem}.png")
            seg8 = raw.segmentation.astype(np.uint8)  # (H, W) label map
            Image.fromarray(seg8).save(dirs["segmentation"] / f"{stem}.png")
            depth16 = np.rint(raw.depth * 65535).astype(np.uint16)  # (H, W)
            Image.fromarray(depth16).save(dirs["depth"] / f"{stem}.png")
            objects = [
                [[float(x), float(y), int(v)] for x, y, v in obj]
                for obj in raw.keypoints[: raw.n_objects].tolist()
            ]
            (dirs["keypoints"] / f"{stem}.json").write_text(json.dumps({"objects": objects}) + "\n")
        meta = {
            "generator": "vqgen shapes",
            "n": n,
            "params": ds.params.model_dump(),
            "classes": CLASSES,
            "keypoint_names": KEYPOINT_NAMES,
            "skeleton": SKELETON,
        }
        (out / "shapes.json").write_text(json.dumps(meta, indent=2) + "\n")
        return out


def write_shapes(
    out_dir: str | Path,
    n: int,
    resolution: int = 32,
    seed: int = 0,
    split: Literal["train", "val"] = "train",
    max_shapes: int = 1,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write ``n`` shapes samples to ``out_dir`` in the ``folder`` dataset's layout.

    See :meth:`ShapesDataset.write_folder`. Returns ``out_dir``.
    """
    try:
        ds = ShapesDataset(
            resolution=resolution, length=n, seed=seed, split=split, max_shapes=max_shapes
        )
    except ValidationError as err:
        problems = format_validation_error(err)
        reasons = "; ".join(f"{'n' if p == 'length' else p}: {r}" for p, r in problems)
        raise VqgenError(f"cannot write shapes data: {reasons}") from None
    return ds.write_folder(out_dir, overwrite=overwrite, progress=progress)
