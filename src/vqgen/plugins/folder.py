"""The ``folder`` data set: images in class sub-folders, with paired conditions.

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

import os
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field
from torch.utils.data import Dataset

from vqgen.core.data import (
    CONDITIONS,
    IMAGE_EXTENSIONS,
    DataWarning,
    check_map_mode,
    load_depth_map,
    load_label_map,
    parse_keypoints,
    read_npy_map,
)
from vqgen.core.errors import VqgenError
from vqgen.core.images import load_rgb, u8_to_image
from vqgen.core.interfaces import Component, ParamsModel

__all__ = ["FolderDataset"]

_CONDITION_EXTS = {"segmentation": (".png",), "depth": (".png", ".npy"), "keypoints": (".json",)}
_LAYOUT = (
    "expected root/images/<class>/<name>.png (or a flat root/images/<name>.png for "
    "unlabelled data), with optional root/segmentation/<name>.png, "
    "root/depth/<name>.png|.npy and root/keypoints/<name>.json beside images/"
)
# what reading a broken file can raise (PIL, numpy); anything else is a bug and propagates
_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
_SHOW = 3  # how many offending files a report names


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
        check_map_mode(im, cond)
        size = im.size
        im.verify()
    return size




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
                    s.keypoints = parse_keypoints(f, self.params.max_objects)
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
            lab = Image.fromarray(load_label_map(s.segmentation).astype(np.int32))  # mode "I"
            lab = np.asarray(lab.resize((w1, h1), Image.Resampling.NEAREST)).astype(np.int64)
            out["segmentation"] = torch.from_numpy(fit(lab))  # (res, res)
        if s.depth is not None:
            dep = Image.fromarray(load_depth_map(s.depth).astype(np.float32))  # mode "F"
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


