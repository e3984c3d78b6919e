"""Image folders with paired conditions, and small image helpers.

Sample format
-------------
Every vqgen dataset is a torch ``Dataset`` whose items are dicts, so torch's
default collate batches them. The keys (each present only where the dataset
has that kind of data, the same keys for every item of one dataset):

* ``"image"``: float32 ``[3, H, W]`` in ``[-1, 1]`` (``u8 / 127.5 - 1``).
* ``"label"``: int64 scalar, the class index into ``dataset.classes``.
* ``"segmentation"``: int64 ``[H, W]``; 0 = background, ``1 + class`` for an object
  (a folder's label maps are read as stored).
* ``"depth"``: float32 ``[1, H, W]`` in ``[0, 1]``.
* ``"keypoints"``: float32 ``[max_objects, K, 3]``, rows ``(x, y, visible)`` in pixel
  units. Coordinates are continuous with the origin at the image's top-left
  corner: pixel ``i`` spans ``[i, i + 1)``, so its centre is ``i + 0.5``. A point is
  visible (1) when it was annotated as visible and lies inside the image;
  every point with ``visible = 0`` (including padding objects) has ``x = y = 0``.

Folder layout (``FolderDataset``, registered as dataset ``folder``)
-------------------------------------------------------------------
::

    root/images/<class>/<stem>.<ext>     class = sub-folder name (sorted → index)
    root/images/<stem>.<ext>             flat: unlabelled (classes == [], no "label")
    root/segmentation/<stem>.png         8/16-bit single-channel label map
    root/depth/<stem>.png | <stem>.npy   16-bit PNG (value / 65535; 8-bit: / 255)
                                         or .npy (min-max normalised per image)
    root/keypoints/<stem>.json           {"objects": [[[x, y, v], ...], ...]}

Images are read as 8-bit RGB: grayscale and palette images are expanded,
16-bit images reduced to 8 bits, and transparent images (RGBA, LA, palette or
colour-key transparency) composited onto white. Samples are ordered by class,
then path. Condition files are matched to images by file stem, so stems must
be unique when a condition folder is used. Condition maps may have a different
size than their image (same aspect ratio); they are resized to the image.
Keypoints are in the original image's pixel units (convention above); ``v > 0``
counts as visible, and every object of every file must have the same number of
points. Depth values are passed through (no direction flip): the built-in
``shapes`` data uses 0 = near, 1 = far.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from numpy.lib import format as npy_format
from PIL import Image
from pydantic import Field
from torch.utils.data import Dataset

from vqgen.core.errors import SampleError, VqgenError
from vqgen.core.interfaces import Component, ParamsModel
from vqgen.core.io import atomic_path

__all__ = [
    "read_condition",
    "ConditionInputs",
    "CONDITIONS",
    "IMAGE_EXTENSIONS",
    "DataWarning",
    "TokenCache",
    "FolderDataset",
    "load_rgb",
    "preview_tiles",
    "save_image_grid",
    "state_hash",
    "u8_to_image",
    "write_preview",
]

#: Condition folders a ``FolderDataset`` can read, in the order they are reported.
CONDITIONS: tuple[str, ...] = ("segmentation", "depth", "keypoints")
#: File extensions read as images (case-insensitive).
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".gif",
    ".webp",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
)
_CONDITION_EXTS = {"segmentation": (".png",), "depth": (".png", ".npy"), "keypoints": (".json",)}
_LAYOUT = (
    "expected root/images/<class>/<name>.png (or a flat root/images/<name>.png for "
    "unlabelled data), with optional root/segmentation/<name>.png, "
    "root/depth/<name>.png|.npy and root/keypoints/<name>.json beside images/"
)
# what reading a broken file can raise (PIL, numpy); anything else is a bug and propagates
_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
_SHOW = 3  # how many offending files a report names


class DataWarning(UserWarning):
    """A data problem that vqgen worked around (a file skipped or substituted)."""


# -----------------------------------------------------------------------------
# image helpers


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


_LABEL_MODES = ("1", "L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N")
_DEPTH_MODES = ("L", "I", "I;16", "I;16L", "I;16B", "I;16N")


def _check_mode(im: Image.Image, cond: str) -> None:
    if cond == "segmentation" and im.mode not in _LABEL_MODES:
        raise ValueError(
            f"a segmentation map must be a single-channel 8/16-bit label map, "
            f"got PIL mode {im.mode!r}"
        )
    if cond == "depth" and im.mode not in _DEPTH_MODES:
        raise ValueError(f"a depth PNG must be 8/16-bit grayscale, got PIL mode {im.mode!r}")


def _load_labels(path: Path) -> np.ndarray:
    """A single-channel 8/16-bit label map as ``int64 [H, W]`` (palette: the indices)."""
    with Image.open(path) as im:
        _check_mode(im, "segmentation")
        return np.asarray(im).astype(np.int64)


def _load_depth(path: Path) -> np.ndarray:
    """A depth map as ``float32 [H, W]`` in ``[0, 1]`` (see the module docstring)."""
    if path.suffix.lower() == ".npy":
        a = read_npy_map(path)  # (H, W)
        lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        a = np.nan_to_num(a, nan=hi)
        return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    with Image.open(path) as im:
        _check_mode(im, "depth")
        scale = 255.0 if im.mode == "L" else 65535.0
        a = np.asarray(im).astype(np.float32) / np.float32(scale)
    return np.clip(a, 0.0, 1.0)


MAX_MAP_PIXELS = 8192 * 8192  # a map larger than this is refused before it is read


def read_npy_map(path: str | os.PathLike[str]) -> np.ndarray:
    """A 2-D numeric map from a ``.npy`` file as ``float32 [H, W]``.

    ``[1, H, W]`` and ``[H, W, 1]`` are squeezed. The header is checked against the
    file before anything is allocated (a header may promise far more than the file
    holds); complex, string and object (pickled) arrays are refused. Raises
    ValueError with the reason.
    """
    with open(path, "rb") as f:
        major, _ = npy_format.read_magic(f)
        read_header = npy_format.read_array_header_1_0 if major == 1 else \
            npy_format.read_array_header_2_0
        shape, _fortran, dtype = read_header(f, max_header_size=1 << 16)
        offset = f.tell()
        stored = os.fstat(f.fileno()).st_size - offset
    if dtype.hasobject:
        raise ValueError("it holds pickled Python objects, which cannot be read safely")
    if dtype.kind == "c":
        raise ValueError(f"its values are complex ({dtype}); give real numbers")
    if not (np.issubdtype(dtype, np.number) or dtype == np.bool_):
        raise ValueError(f"its values are {dtype}, not numbers")
    if len(shape) == 3 and 1 in (shape[0], shape[2]):
        shape = shape[:2] if shape[2] == 1 else shape[1:]
    if len(shape) != 2:
        raise ValueError(f"expected a 2-D map, got shape {tuple(shape)}")
    n = int(np.prod(shape, dtype=np.int64))
    if n > MAX_MAP_PIXELS:
        raise ValueError(f"its {shape[0]}×{shape[1]} map is larger than {MAX_MAP_PIXELS} pixels")
    if n * dtype.itemsize > stored:
        raise ValueError(f"its header promises {n * dtype.itemsize} bytes of data, "
                         f"the file holds {stored}")
    a = np.load(path, mmap_mode="r", allow_pickle=False)
    return np.array(a, dtype=np.float32).reshape(shape)  # (H, W)


def _parse_keypoints(path: Path, max_objects: int) -> np.ndarray:
    """A keypoint JSON file as ``float32 [N, K, 3]``; raises ValueError when malformed."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"not valid JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("objects"), list):
        raise ValueError('expected {"objects": [[[x, y, visible], ...], ...]}')
    objects = data["objects"]
    if len(objects) > max_objects:
        raise ValueError(f"has {len(objects)} objects, more than max_objects={max_objects}")
    rows = []
    for i, obj in enumerate(objects):
        ok = isinstance(obj, list) and all(
            isinstance(p, list | tuple)
            and len(p) == 3
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in p)
            for p in obj
        )
        if not ok:
            raise ValueError(f"object {i} is not a list of [x, y, visible] number triples")
        rows.append(obj)
    ks = {len(o) for o in rows}
    if len(ks) > 1:
        raise ValueError(f"objects have different numbers of points: {sorted(ks)}")
    k = ks.pop() if ks else 0
    kp = np.asarray(rows, dtype=np.float32).reshape(len(rows), k, 3)  # (N, K, 3)
    if not np.isfinite(kp).all():
        raise ValueError("contains a non-finite coordinate")
    return kp


def _image_size(path: Path) -> tuple[int, int]:
    """``(W, H)`` of an image file after decoding it whole (``verify`` alone passes a
    truncated JPEG), so that a broken file is found when the data set opens."""
    with Image.open(path) as im:
        size = im.size
        im.verify()
    with Image.open(path) as im:
        im.load()
    return size


def _map_size(path: Path, cond: str) -> tuple[int, int]:
    """``(W, H)`` of a segmentation or depth file, after checking its format."""
    if path.suffix.lower() == ".npy":
        values = read_npy_map(path)  # (H, W)
        h, w = values.shape
        if np.isinf(values).any():
            raise ValueError("it holds infinite values")
        if np.isnan(values).all():
            raise ValueError("every value is NaN")
        return w, h
    with Image.open(path) as im:
        _check_mode(im, cond)
        size = im.size
        im.verify()
    return size


# -----------------------------------------------------------------------------
# the folder dataset


@dataclass
class _Sample:
    image: Path
    label: int | None
    size: tuple[int, int]  # (W, H) of the image file
    segmentation: Path | None = None
    depth: Path | None = None
    keypoints: np.ndarray | None = None  # (N, K, 3) in original pixel units


def _files_below(folder: Path) -> list[Path]:
    """Every file below ``folder``, sorted; a sub-folder that cannot be listed is an
    error naming it (``Path.rglob`` would skip it, and its class would look empty)."""
    def refuse(err: OSError) -> None:
        raise VqgenError(
            f"cannot list {err.filename} ({err.strerror or err}); make it readable or "
            "move it out of the data set"
        )

    return sorted(Path(top) / name for top, _, names in os.walk(folder, onerror=refuse)
                  for name in names)


def _is_image(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS


def _shown(items: list[str]) -> str:
    more = f", … ({len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return ", ".join(items[:_SHOW]) + more


class FolderDataset(Component, Dataset):
    """Images in class sub-folders, with optional paired segmentation, depth and keypoints.

    See the module docstring for the layout and the sample format. Images are
    resized so the shorter side equals ``resolution`` (bicubic; segmentation
    nearest, depth bilinear), cropped to ``resolution × resolution`` (centre or
    random) and, with ``hflip``, flipped horizontally with probability 1/2; the
    same transform is applied to every map and to the keypoints (``x → W − x``;
    left/right keypoint names are not swapped). Every file is checked when the
    dataset is opened; problems are an error, or with ``on_bad_file="skip"`` a
    warning and the affected samples are left out. A file that still fails to
    load later is replaced by the next sample, with a warning.

    ``conditions="auto"`` reads every condition folder that exists; a list reads
    exactly those (a missing folder is an error; ``[]`` reads none). ``seed=-1``
    draws random crops and flips from torch's global RNG (fresh every epoch and
    per DataLoader worker; reproducible under ``torch.manual_seed``); ``seed >= 0``
    makes them a function of ``(seed, epoch, index)``, varied by ``set_epoch``.
    """

    class Params(ParamsModel):
        root: str
        resolution: int = Field(256, ge=1)
        crop: Literal["center", "random"] = "center"
        hflip: bool = False
        conditions: list[Literal["segmentation", "depth", "keypoints"]] | Literal["auto"] = "auto"
        max_objects: int = Field(4, ge=1)
        on_bad_file: Literal["error", "skip"] = "error"
        seed: int = Field(-1, ge=-1)

    def __init__(
        self,
        root: str,
        resolution: int = 256,
        crop: Literal["center", "random"] = "center",
        hflip: bool = False,
        conditions: list[Literal["segmentation", "depth", "keypoints"]] | Literal["auto"] = "auto",
        max_objects: int = 4,
        on_bad_file: Literal["error", "skip"] = "error",
        seed: int = -1,
    ) -> None:
        super().__init__(
            root=root,
            resolution=resolution,
            crop=crop,
            hflip=hflip,
            conditions=conditions,
            max_objects=max_objects,
            on_bad_file=on_bad_file,
            seed=seed,
        )
        self.root = Path(root).expanduser()
        self.epoch = 0
        self.classes: list[str] = []
        self.conditions: list[str] = []
        self.num_keypoints = 0  # K, when keypoints are read
        self.samples: list[_Sample] = self._scan()

    @classmethod
    def example_params(cls, tmp_path: Path) -> dict[str, Any]:
        """Params of a tiny two-class folder written under ``tmp_path`` (for tests and docs)."""
        root = Path(tmp_path) / "folder_example"
        for i, name in enumerate(["a", "b"]):
            (root / "images" / name).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (12, 8), (200 * i, 40, 90)).save(root / "images" / name / f"{i}.png")
        return {"root": str(root), "resolution": 8}

    # -- opening --------------------------------------------------------------
    def _list_images(self) -> list[tuple[Path, int | None]]:
        root, images = self.root, self.root / "images"
        if not root.is_dir():
            raise VqgenError(f"dataset root {root} does not exist or is not a folder; {_LAYOUT}")
        if not images.is_dir():
            raise VqgenError(f"dataset root {root} has no images/ folder; {_LAYOUT}")
        class_dirs = sorted(
            p for p in images.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        top = sorted(p for p in images.iterdir() if _is_image(p))
        if class_dirs and top:
            raise VqgenError(
                f"{images} mixes class sub-folders ({_shown([p.name for p in class_dirs])}) with "
                f"images directly inside it ({_shown([p.name for p in top])}); put every "
                "image in a class sub-folder, or use a flat folder without sub-folders for "
                "unlabelled data"
            )
        self.classes = [p.name for p in class_dirs]
        found: list[tuple[Path, int | None]] = [(p, None) for p in top]
        for label, d in enumerate(class_dirs):
            found += [(p, label) for p in _files_below(d) if _is_image(p)]
        if not found:
            exts = ", ".join(IMAGE_EXTENSIONS)
            raise VqgenError(f"{images} contains no images ({exts}); {_LAYOUT}")
        return found

    def _resolve_conditions(self) -> list[str]:
        wanted = self.params.conditions
        if wanted == "auto":
            return [c for c in CONDITIONS if (self.root / c).is_dir()]
        missing = [c for c in wanted if not (self.root / c).is_dir()]
        if missing:
            raise VqgenError(
                f"conditions {missing} were requested but {self.root} has no "
                f"{', '.join(c + '/' for c in missing)} folder; {_LAYOUT}"
            )
        return [c for c in CONDITIONS if c in wanted]

    def _check_sample(
        self, path: Path, label: int | None, bad: Callable[[str, str], None]
    ) -> _Sample | None:
        """The sample of image ``path`` with its condition files, or None (reported to ``bad``)."""
        try:
            size = _image_size(path)
        except Exception as err:  # PIL raises many types for a broken file
            why = " ".join(str(err).split())[:120] or type(err).__name__
            bad("unreadable image file(s)", f"{path} ({why})")
            return None
        s, ok = _Sample(path, label, size), True
        for cond in self.conditions:
            exts = _CONDITION_EXTS[cond]
            f = next((p for e in exts if (p := self.root / cond / (path.stem + e)).is_file()), None)
            if f is None:
                names = " or ".join(f"<stem>{e}" for e in exts)
                bad(f"image(s) without a {cond} file in {self.root / cond} ({names})", path.stem)
                ok = False
                continue
            try:
                if cond == "keypoints":
                    s.keypoints = _parse_keypoints(f, self.params.max_objects)
                    continue
                w, h = _map_size(f, cond)
                if abs(w / h - size[0] / size[1]) > 0.02 * size[0] / size[1]:
                    raise ValueError(
                        f"its size {w}x{h} does not match the image's {size[0]}x{size[1]}"
                    )
                setattr(s, cond, f)
            except Exception as err:
                bad(f"invalid {cond} file(s)", f"{f} ({err})")
                ok = False
        return s if ok else None

    def _scan(self) -> list[_Sample]:
        found = self._list_images()
        self.conditions = self._resolve_conditions()
        if self.conditions:
            dup = sorted(s for s, n in Counter(p.stem for p, _ in found).items() if n > 1)
            if dup:
                raise VqgenError(
                    f"{self.root / 'images'}: {len(dup)} file stems occur more than once "
                    f"({_shown(dup)}); condition files are matched by stem, so stems must "
                    "be unique across class folders"
                )
        # problem kind → list of descriptions; a sample with any problem is bad
        problems: dict[str, list[str]] = {}
        samples: list[_Sample] = []
        kp_counts: Counter[int] = Counter()

        def bad(kind: str, what: str) -> None:
            problems.setdefault(kind, []).append(what)

        for path, label in found:
            sample = self._check_sample(path, label, bad)
            if sample is not None:
                samples.append(sample)
                if sample.keypoints is not None and len(sample.keypoints):
                    kp_counts[sample.keypoints.shape[1]] += 1

        if kp_counts:  # every object in the dataset must have the same K
            self.num_keypoints = kp_counts.most_common(1)[0][0]
            for s in samples:
                k = s.keypoints.shape[1] if s.keypoints is not None and len(s.keypoints) else None
                if k is not None and k != self.num_keypoints:
                    f = self.root / "keypoints" / f"{s.image.stem}.json"
                    why = f"objects have {k} points, most files have {self.num_keypoints}"
                    bad("invalid keypoints file(s)", f"{f} ({why})")
                    s.keypoints = None
            samples = [s for s in samples if s.keypoints is not None]

        if problems:
            n_bad = len(found) - len(samples)
            report = "; ".join(f"{len(v)} {k}: {_shown(v)}" for k, v in problems.items())
            msg = f"{self.root}: {n_bad} of {len(found)} samples have problems: {report}"
            if self.params.on_bad_file == "error":
                raise VqgenError(
                    f"{msg}. Fix or remove these files, or pass on_bad_file='skip' to leave "
                    "them out"
                )
            warnings.warn(f"{msg}. Skipping them.", DataWarning, stacklevel=3)
            if not samples:
                raise VqgenError(f"{self.root}: no usable samples remain after skipping")
        return samples

    # -- reading ----------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.samples)

    def source(self, index: int, key: str) -> str:
        """The file that ``key`` of sample ``index`` comes from (for error messages)."""
        s = self.samples[index]
        if key == "keypoints":
            return str(self.root / "keypoints" / f"{s.image.stem}.json")
        if key == "label":
            return f"{s.image} (class folder {s.image.parent.name})"
        path = getattr(s, key, None) if key in CONDITIONS else None
        return str(path or s.image)

    def set_epoch(self, epoch: int) -> None:
        """With an integer ``seed``: vary crops and flips between epochs."""
        self.epoch = epoch

    def _randint(self, rng: np.random.Generator | None, high: int) -> int:
        """Uniform integer in ``[0, high)``."""
        if high <= 1:
            return 0
        if rng is None:
            return int(torch.randint(high, ()).item())
        return int(rng.integers(high))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} samples")
        index %= n
        for attempt in range(n):
            i = (index + attempt) % n
            try:
                return self._load(self.samples[i], index)
            except _READ_ERRORS as err:  # never crash an epoch halfway
                s = self.samples[(index + attempt + 1) % n]
                warnings.warn(
                    f"could not read sample {self.samples[i].image} ({type(err).__name__}: "
                    f"{err}); using {s.image} instead",
                    DataWarning,
                    stacklevel=2,
                )
        raise VqgenError(f"{self.root}: none of the {n} samples could be read")

    def _load(self, s: _Sample, index: int) -> dict[str, torch.Tensor]:
        p = self.params
        res = p.resolution
        rng = None if p.seed < 0 else np.random.default_rng([p.seed, self.epoch, index])

        img = load_rgb(s.image)
        w0, h0 = img.size
        scale = res / min(w0, h0)
        w1, h1 = max(res, round(w0 * scale)), max(res, round(h0 * scale))
        if p.crop == "center":
            ox, oy = (w1 - res) // 2, (h1 - res) // 2
        else:
            ox, oy = self._randint(rng, w1 - res + 1), self._randint(rng, h1 - res + 1)
        flip = p.hflip and self._randint(rng, 2) == 1

        def fit(a: np.ndarray) -> np.ndarray:  # (h1, w1, ...) → (res, res, ...)
            a = a[oy : oy + res, ox : ox + res]
            return np.ascontiguousarray(a[:, ::-1] if flip else a)

        out: dict[str, torch.Tensor] = {}
        rgb = np.asarray(img.resize((w1, h1), Image.Resampling.BICUBIC))  # (h1, w1, 3)
        out["image"] = u8_to_image(fit(rgb))  # (3, res, res)
        if s.label is not None:
            out["label"] = torch.tensor(s.label, dtype=torch.int64)
        if s.segmentation is not None:
            lab = Image.fromarray(_load_labels(s.segmentation).astype(np.int32))  # mode "I"
            lab = np.asarray(lab.resize((w1, h1), Image.Resampling.NEAREST)).astype(np.int64)
            out["segmentation"] = torch.from_numpy(fit(lab))  # (res, res)
        if s.depth is not None:
            dep = Image.fromarray(_load_depth(s.depth).astype(np.float32))  # mode "F"
            dep = np.asarray(dep.resize((w1, h1), Image.Resampling.BILINEAR), dtype=np.float32)
            out["depth"] = torch.from_numpy(np.clip(fit(dep), 0.0, 1.0))[None]  # (1, res, res)
        if "keypoints" in self.conditions:
            kp = np.zeros((p.max_objects, self.num_keypoints, 3), np.float32)  # (N, K, 3)
            src = s.keypoints if s.keypoints is not None else kp[:0]
            if len(src):
                x = src[..., 0] * np.float32(w1 / w0) - np.float32(ox)
                y = src[..., 1] * np.float32(h1 / h0) - np.float32(oy)
                if flip:
                    x = np.float32(res) - x
                vis = (src[..., 2] > 0) & (x >= 0) & (x < res) & (y >= 0) & (y < res)
                xyv = np.stack([x, y, np.ones_like(x)], -1)  # (n, K, 3)
                kp[: len(src)] = np.where(vis[..., None], xyv, np.float32(0))
            out["keypoints"] = torch.from_numpy(kp)
        return out


# -----------------------------------------------------------------------------
# writing


def save_image_grid(
    images: torch.Tensor,
    path: str | os.PathLike[str],
    nrow: int = 8,
    padding: int = 2,
    pad_value: float = 1.0,
) -> Path:
    """Write ``images`` ``[N, C, H, W]`` in ``[-1, 1]`` (C = 1 or 3) as one PNG grid.

    ``nrow`` images per row; the grid is ``ncol * (W + padding) + padding`` wide and
    ``rows * (H + padding) + padding`` high, padded with ``pad_value`` (white by
    default). The file is written atomically (a temporary file in the same folder,
    then ``os.replace``). Returns the path.
    """
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
    u8 = ((grid.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (C, Hg, Wg)
    arr = u8.permute(1, 2, 0).numpy()  # (Hg, Wg, C)
    pil = Image.fromarray(arr[..., 0] if c == 1 else arr)

    with atomic_path(path) as tmp:
        pil.save(tmp, format="PNG")
    return Path(path)


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


# -- token cache --------------------------------------------------------------
def state_hash(*modules: torch.nn.Module | None) -> str:
    """SHA-256 of the modules' state dicts (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for m in modules:
        h.update(b"<none>" if m is None else type(m).__qualname__.encode())
        if m is None:
            continue
        for name, t in sorted(m.state_dict().items()):
            t = t.detach().cpu().contiguous().reshape(-1)  # (numel,)
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class TokenCache:
    """A dataset encoded once: code grids ``[N, h, w]`` and condition tokens ``[N, Lc]``.

    Stored as ``.npy`` files under ``root/<key>/`` and opened memory-mapped. The
    ``key`` hashes the tokenizer's and conditioner's weights and the data settings,
    so a retrained tokenizer or other data gets a new cache, never a stale one.
    Grids are stored before the ordering is applied: changing the ordering reuses
    the cache. The condition tokens are the conditioner's own ids (not offset).
    """

    def __init__(self, path: Path, *, with_cond: bool | None = None) -> None:
        """Open the cache at ``path``; ``with_cond`` says whether it must hold condition
        tokens (``None``: as its ``meta.json`` says). A cache whose files disagree with
        its ``meta.json`` (a file missing, truncated or of another length) is refused."""
        self.path = Path(path)
        try:
            self.meta = json.loads((self.path / "meta.json").read_text())
            self.codes = np.load(self.path / "codes.npy", mmap_mode="r")  # (N, h, w)
            cond = self.path / "cond.npy"
            self.cond = np.load(cond, mmap_mode="r") if cond.exists() else None  # (N, Lc)
        except (OSError, ValueError) as exc:
            raise VqgenError(f"token cache {self.path} is unreadable ({exc}); delete it") from None
        problem = self._damage(with_cond)
        if problem:
            raise VqgenError(f"token cache {self.path} is damaged: {problem}; delete it (the "
                             "next training run rebuilds it)")

    def _damage(self, with_cond: bool | None) -> str | None:
        """What disagrees between the files and ``meta.json``, or None."""
        meta = self.meta if isinstance(self.meta, dict) else {}
        n = meta.get("n")
        if meta.get("key") not in (None, self.path.name):
            return f"meta.json is for key {meta.get('key')!r}, not {self.path.name!r}"
        if n is not None and self.codes.shape[0] != n:
            return f"codes.npy holds {self.codes.shape[0]} grids, meta.json says {n}"
        recorded = meta.get("has_cond", with_cond)
        if with_cond is not None and recorded is not None and recorded != with_cond:
            return "it was built " + ("with" if recorded else "without") + " a condition"
        if recorded and self.cond is None:
            return "cond.npy (the condition tokens) is missing"
        if self.cond is not None and self.cond.shape[0] != self.codes.shape[0]:
            return (f"cond.npy holds {self.cond.shape[0]} rows, codes.npy "
                    f"{self.codes.shape[0]}")
        for name, ids, vocab in (("codes.npy", self.codes, meta.get("vocab_size")),
                                 ("cond.npy", self.cond, meta.get("cond_vocab_size"))):
            if ids is not None and isinstance(vocab, int) and ids.size:
                lo, hi = int(ids.min()), int(ids.max())  # one streaming pass over the map
                if lo < 0 or hi >= vocab:
                    what = "code" if name == "codes.npy" else "token"
                    return (f"{name} holds {what} {hi if hi >= vocab else lo}, outside "
                            f"[0, {vocab})")
        return None

    def __len__(self) -> int:
        return int(self.codes.shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        out = {"codes": torch.from_numpy(np.asarray(self.codes[index], dtype=np.int64))}
        if self.cond is not None:
            out["cond"] = torch.from_numpy(np.asarray(self.cond[index], dtype=np.int64))
        return out

    @staticmethod
    def key(tokenizer: torch.nn.Module, conditioner: torch.nn.Module | None, data: Any) -> str:
        """The cache key: weights of both stages and the data settings (JSON-able)."""
        spec = json.dumps(data, sort_keys=True, default=str)
        return hashlib.sha256(
            (state_hash(tokenizer) + state_hash(conditioner) + spec).encode()
        ).hexdigest()[:24]

    @classmethod
    def build(
        cls,
        root: str | os.PathLike[str],
        dataset: Any,
        tokenizer: Any,
        conditioner: Any = None,
        *,
        data: Any = None,
        batch_size: int = 64,
        progress: bool = True,
    ) -> TokenCache:
        """Open the cache for these weights and data, encoding the dataset if needed.

        ``data`` describes the dataset (e.g. its config spec) for the key. The
        cache is written to a temporary folder and renamed into place, so an
        interrupted build leaves nothing half-written.
        """
        from tqdm.auto import tqdm

        key = cls.key(tokenizer, conditioner, data)
        path = Path(root) / key
        if (path / "meta.json").exists():
            try:
                return cls(path, with_cond=conditioner is not None)
            except VqgenError as exc:  # derived data: encode it again
                warnings.warn(f"{exc}; rebuilding it", DataWarning, stacklevel=2)
                shutil.rmtree(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{key}.*"):  # a build that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{key}."))
        try:
            loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
            input_key = getattr(tokenizer, "input_key", "image")  # what the tokenizer encodes
            codes_mm = cond_mm = None
            device = next(iter(tokenizer.parameters()), torch.zeros(())).device
            with torch.no_grad():
                i = 0
                for batch in tqdm(
                    loader, desc="encoding tokens", unit="batch", disable=not progress
                ):
                    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                    codes = tokenizer.encode(batch[input_key]).cpu().numpy()  # (B, h, w)
                    try:
                        cond = conditioner.tokens(batch).cpu().numpy() if conditioner else None
                    except SampleError as err:
                        raise err.at(sample_source(dataset, i + err.index, err.key)) from None
                    if codes_mm is None:
                        n = len(dataset)
                        codes_mm = _open_memmap(
                            tmp / "codes.npy", _int_dtype(tokenizer.vocab_size),
                            (n, *codes.shape[1:]),
                        )
                        if cond is not None:
                            cond_mm = _open_memmap(
                                tmp / "cond.npy", _int_dtype(conditioner.vocab_size),
                                (n, *cond.shape[1:]),
                            )
                    codes_mm[i : i + len(codes)] = codes
                    if cond_mm is not None:
                        cond_mm[i : i + len(codes)] = cond
                    i += len(codes)
            for mm in (codes_mm, cond_mm):
                if mm is not None:
                    mm.flush()
            meta = {"key": key, "n": len(dataset), "data": data, "vocab_size": tokenizer.vocab_size,
                    "has_cond": cond_mm is not None,
                    "cond_vocab_size": conditioner.vocab_size if conditioner else None}
            (tmp / "meta.json").write_text(json.dumps(meta, default=str, indent=2))
            del codes_mm, cond_mm
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls(path)


def sample_source(dataset: Any, index: int, key: str) -> str:
    """Where ``key`` of sample ``index`` of ``dataset`` comes from: the data set's
    ``source(index, key)`` (e.g. a file) where it has one, through ``Subset``s."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset, index = dataset.dataset, int(dataset.indices[index])
    source = getattr(dataset, "source", None)
    return source(index, key) if callable(source) else f"sample {index} of the data set"


def _open_memmap(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A new ``.npy`` memmap whose blocks are reserved on disk first: a full disk is
    then an OSError here, not a SIGBUS when a page of the map is written later."""
    a = np.lib.format.open_memmap(path, "w+", dtype, shape)
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise VqgenError(f"cannot write the token cache {path}: no space left on "
                                 "device; free some space and run the same command") from None
            # a file system without fallocate: the map is written as before
    return a


def _int_dtype(vocab: int) -> np.dtype:
    """The smallest integer dtype that holds ids ``[0, vocab)``."""
    return np.dtype(np.uint8 if vocab <= 256 else np.int16 if vocab <= 32768 else np.int32)


class ConditionInputs(Dataset):
    """A dataset whose samples are what a spatial conditioner's tokenizer trains on.

    Sample ``i`` is ``{key: conditioner.condition_input(dataset[i])}`` (``[C, H, W]``),
    ``key`` defaulting to the tokenizer's ``input_key`` (``"image"`` when it has none),
    so the stage-1 loop trains the cond stage like any tokenizer.
    """

    def __init__(
        self, dataset: Any, conditioner: Any, key: str | None = None
    ) -> None:
        self.dataset, self.conditioner = dataset, conditioner
        self.key = key or getattr(conditioner.tokenizer, "input_key", "image")

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.dataset[index]
        batch = {k: v[None] if isinstance(v, torch.Tensor) else v for k, v in sample.items()}
        try:
            return {self.key: self.conditioner.condition_input(batch)[0]}  # (C, H, W)
        except SampleError as err:
            raise err.at(sample_source(self.dataset, index, err.key)) from None


def read_condition(key: str, path: str | os.PathLike[str]) -> torch.Tensor:
    """A condition file as a batch of one, for the batch key ``key``.

    ``label``: a text file holding a class id → ``[1]``; ``segmentation``: a label
    map PNG → int64 ``[1, H, W]``; ``depth``: a 8/16-bit PNG or ``.npy`` →
    ``[1, 1, H, W]`` in ``[0, 1]``; ``keypoints``: JSON (``{"objects": [[[x, y, v],
    ...]]}``) → ``[1, N, K, 3]``; ``edges``: a grayscale PNG → ``[1, 1, H, W]`` in
    ``[0, 1]``; anything else (``image``, ``lowres``): an RGB image → ``[1, 3, H, W]``
    in ``[-1, 1]``. Errors name the file and what was expected.
    """
    path = Path(path)
    if not path.is_file():
        raise VqgenError(f"condition file {path} not found")
    try:
        if key == "label":
            return torch.tensor([int(path.read_text(encoding="utf-8").strip())])
        if key == "segmentation":
            return torch.from_numpy(_load_labels(path))[None]  # (1, H, W)
        if key == "depth":
            return torch.from_numpy(_load_depth(path))[None, None]  # (1, 1, H, W)
        if key == "keypoints":
            return torch.from_numpy(_parse_keypoints(path, 1 << 16))[None]  # (1, N, K, 3)
        if key == "edges":
            with Image.open(path) as im:
                a = np.asarray(im.convert("L"), dtype=np.float32) / np.float32(255)
            return torch.from_numpy(a)[None, None]  # (1, 1, H, W)
        return u8_to_image(np.asarray(load_rgb(path)))[None]  # (1, 3, H, W)
    except VqgenError:
        raise
    except (ValueError, OSError) as err:
        raise VqgenError(f"condition file {path} cannot be read as {key!r}: {err}") from None
