"""The ``folder`` data set: your own images, in class sub-folders, with paired conditions.

Folder layout (``FolderDataset``, registered as dataset ``folder``)
-------------------------------------------------------------------
::

    root/images/<class>/<stem>.<ext>     class = sub-folder name (ids: see "Classes")
    root/images/<stem>.<ext>             flat: unlabelled (classes == [], no "label")
    root/val/<class>/<stem>.<ext>        optional held-out images (or root/held_out/),
                                         laid out like images/ (flat when images/ is)
    root/segmentation/<stem>.png         8/16-bit single-channel label map
    root/depth/<stem>.png | <stem>.npy   16-bit PNG (value / 65535; 8-bit: / 255)
                                         or .npy (min-max normalised per image)
    root/keypoints/<stem>.json           {"objects": [[[x, y, v], ...], ...]}

Splits
------
``split="train"`` (the default) reads the training images, ``split="val"`` the
held-out ones; the two never share a file.

* With a ``root/val/`` or ``root/held_out/`` folder (not both), train is ``images/``
  and val is that folder; ``held_out`` is then ignored. Its class folders must be
  classes of ``images/`` (a class may be missing from it).
* Otherwise ``held_out`` (default 0.05) of every class is held out: a file is held
  out when a stable hash of its path below ``images/`` (sha256 with a fixed salt,
  mapped to [0, 1)) is below ``held_out``. So a file's split depends only on its own
  path: adding or removing images never moves other images between the splits, with
  one exception. A class of 2 or more images that the hash leaves without a held-out
  image lends its lowest-hash image to val (every class is evaluated), and a class
  never gives up its last training image (a class of one image is train only);
  adding images to such a class can therefore take its lent image back. The split
  is decided from the file listing before any file is read: it does not depend on
  ``seed`` (crops) or on which files are broken. ``held_out=0`` holds out nothing.
* ``split="val"`` without held-out data raises :class:`EmptySplit` (a VqgenError).

Each split is ordered by class, then path; ``labels`` lists its labels (-1 when
unlabelled), for stratified subsets without loading images.

Classes
-------
``classes="auto"`` numbers the class folders of ``images/`` in natural order: digit
runs compare as numbers, the rest case-insensitively, ties by the exact name
(``1, 2, …, 10`` get ids 0..9; ``img2`` comes before ``img10``). A list names the
classes in id order and must name every class folder of ``images/`` exactly once.
:meth:`FolderDataset.class_names` gives the same names from the folder names alone.

Checking, and the scan cache
----------------------------
Every image of the split is decoded when the data set opens, so that a broken file
is reported then, not in the middle of an epoch. The size of each image that passed
is cached in ``<cache dir>/folder-scan/<hash of the root>.json`` with the file's size
and modification time: an unchanged file is not decoded again, a changed one is.
The cache dir is ``$VQGEN_CACHE_DIR``, else ``$XDG_CACHE_HOME/vqgen``, else
``~/.cache/vqgen``; it may be deleted at any time, and a cache that cannot be read
or written is ignored. Condition files are checked on every open.

Images are read as 8-bit RGB: grayscale and palette images are expanded,
16-bit images reduced to 8 bits, and transparent images (RGBA, LA, palette or
colour-key transparency) composited onto white. Condition files are matched to
images by file stem, so stems must be unique (across ``images/`` and ``val/``) when
a condition folder is used. Condition maps may have a different
size than their image (same aspect ratio); they are resized to the image.
Keypoints are in the original image's pixel units (convention above); ``v > 0``
counts as visible, and every object of every file must have the same number of
points. Depth values are passed through (no direction flip): the built-in
``shapes`` data uses 0 = near, 1 = far.

Why one file of this size: a quarter of it is the description above, and checking a
sample's image and condition files together is one job; what the folder holds on disk
(layout, classes, split, scan cache) is read in :mod:`vqgen.plugins.folder_layout`.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Mapping
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
    load_depth_map,
    load_label_map,
    parse_keypoints,
)
from vqgen.core.errors import EmptySplit, VqgenError
from vqgen.core.images import load_rgb, u8_to_image
from vqgen.core.interfaces import Component, ParamsModel
from vqgen.plugins.folder_layout import (
    CONDITION_EXTS,
    LAYOUT_HELP,
    READ_ERRORS,
    Listed,
    Sample,
    ScanCache,
    list_images,
    map_size,
    read_layout,
    shown,
    split_held_out,
)

__all__ = ["EmptySplit", "FolderDataset"]


class FolderDataset(Component, Dataset):
    """Images in class sub-folders, with optional paired segmentation, depth and keypoints.

    See the module docstring for the layout, the splits, class ids and the sample
    format. Images are
    resized so the shorter side equals ``resolution`` (bicubic; segmentation
    nearest, depth bilinear), cropped to ``resolution × resolution`` (centre or
    random) and, with ``hflip``, flipped horizontally with probability 1/2; the
    same transform is applied to every map and to the keypoints (``x → W − x``;
    left/right keypoint names are not swapped). Every file of the split is checked
    when the dataset is opened; problems are an error, or with ``on_bad_file="skip"``
    a warning and the affected samples are left out. A file that still fails to
    load later is replaced by the next sample, with a warning.

    ``conditions="auto"`` reads every condition folder that exists; a list reads
    exactly those (a missing folder is an error; ``[]`` reads none). ``seed=-1``
    draws random crops and flips from torch's global RNG (fresh every epoch and
    per DataLoader worker; reproducible under ``torch.manual_seed``); ``seed >= 0``
    makes them a function of ``(seed, epoch, index)``, varied by ``set_epoch``.
    """

    class Params(ParamsModel):
        root: str = Field(
            ..., json_schema_extra={"path": True},
            description="the data set folder: images/ (class sub-folders, or flat), and "
                        "optionally val/, segmentation/, depth/, keypoints/",
        )
        resolution: int = Field(256, ge=1)
        crop: Literal["center", "random"] = "center"
        hflip: bool = False
        conditions: list[Literal["segmentation", "depth", "keypoints"]] | Literal["auto"] = "auto"
        max_objects: int = Field(4, ge=1)
        on_bad_file: Literal["error", "skip"] = "error"
        seed: int = Field(-1, ge=-1)
        split: Literal["train", "val"] = Field(
            "train", description="read the training images, or the held-out ones (val/, "
                                 "or the held_out fraction of images/)")
        held_out: float = Field(
            0.05, ge=0.0, lt=1.0,
            description="without a val/ folder: the fraction of each class held out for "
                        "split='val', chosen by a stable hash of each file's path; 0 = none",
        )
        classes: list[str] | Literal["auto"] = Field(
            "auto", description="class names in id order, one per class folder of images/; "
                                "'auto': the class folders in natural order (2 before 10)",
        )

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
        split: Literal["train", "val"] = "train",
        held_out: float = 0.05,
        classes: list[str] | Literal["auto"] = "auto",
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
            split=split,
            held_out=held_out,
            classes=classes,
        )
        self.root = Path(root).expanduser()
        self.epoch = 0
        self.classes: list[str] = []  # names by id
        self.conditions: list[str] = []
        self.num_keypoints = 0  # K, when keypoints are read
        self.samples: list[Sample] = self._scan()
        self.labels: list[int] = [-1 if s.label is None else s.label for s in self.samples]

    @classmethod
    def class_names(cls, params: Mapping[str, Any]) -> list[str] | None:
        """The class names by id that ``cls(**params).classes`` will have (None for a flat,
        unlabelled folder), from folder listings alone: no class folder is walked and no
        image is read. Raises the constructor's VqgenError for a bad layout or list."""
        p = cls.Params(**params)
        return read_layout(Path(p.root).expanduser(), p.classes).classes or None

    @classmethod
    def example_params(cls, tmp_path: Path) -> dict[str, Any]:
        """Params of a tiny two-class folder written under ``tmp_path`` (for tests and docs)."""
        root = Path(tmp_path) / "folder_example"
        for i, name in enumerate(["a", "b"]):
            (root / "images" / name).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (12, 8), (200 * i, 40, 90)).save(root / "images" / name / f"{i}.png")
        return {"root": str(root), "resolution": 8}

    # -- opening --------------------------------------------------------------
    def _resolve_conditions(self) -> list[str]:
        wanted = self.params.conditions
        if wanted == "auto":
            return [c for c in CONDITIONS if (self.root / c).is_dir()]
        missing = [c for c in wanted if not (self.root / c).is_dir()]
        if missing:
            raise VqgenError(
                f"conditions {missing} were requested but {self.root} has no "
                f"{', '.join(c + '/' for c in missing)} folder; {LAYOUT_HELP}"
            )
        return [c for c in CONDITIONS if c in wanted]

    def _check_sample(
        self, path: Path, label: int | None, bad: Callable[[str, str], None], cache: ScanCache
    ) -> Sample | None:
        """The sample of image ``path`` with its condition files, or None (reported to ``bad``)."""
        try:
            size = cache.size(path)
        except Exception as err:  # PIL raises many types for a broken file
            why = " ".join(str(err).split())[:120] or type(err).__name__
            bad("unreadable image file(s)", f"{path} ({why})")
            return None
        s, ok = Sample(path, label, size), True
        for cond in self.conditions:
            exts = CONDITION_EXTS[cond]
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
                w, h = map_size(f, cond)
                if abs(w / h - size[0] / size[1]) > 0.02 * size[0] / size[1]:
                    raise ValueError(
                        f"its size {w}x{h} does not match the image's {size[0]}x{size[1]}"
                    )
                setattr(s, cond, f)
            except Exception as err:
                bad(f"invalid {cond} file(s)", f"{f} ({err})")
                ok = False
        return s if ok else None

    def _empty_split(self, held_dir: Path | None) -> EmptySplit:
        """The error for ``split="val"`` without held-out images, saying how to get some."""
        root, p = self.root, self.params
        where = "<class>/<name>.png" if self.classes else "<name>.png"
        if held_dir is not None:
            return EmptySplit(
                f"{root}: split='val' is empty: there is no held-out data ({held_dir} holds "
                f"no images, and held_out is ignored while it exists); put held-out images "
                f"in {held_dir}/{where}, or remove the folder to hold out a fraction of "
                "images/ (held_out)"
            )
        why = ("held_out is 0" if p.held_out <= 0 else
               "no class has 2 or more images, and a class never gives up its only image")
        return EmptySplit(
            f"{root}: split='val' is empty: there is no held-out data ({why}); add a folder "
            f"{root / 'val'} with held-out images laid out like images/ ({root / 'val'}/"
            f"{where}), or set held_out > 0 (e.g. 0.05) with at least 2 images per class"
        )

    def _scan(self) -> list[Sample]:
        layout = read_layout(self.root, self.params.classes)
        self.classes = layout.classes
        images = self.root / "images"
        found = list_images(images, self.classes)
        if not found:
            exts = ", ".join(IMAGE_EXTENSIONS)
            raise VqgenError(f"{images} contains no images ({exts}); {LAYOUT_HELP}")
        held = [] if layout.held_out is None else list_images(layout.held_out, self.classes)
        self.conditions = self._resolve_conditions()
        if self.conditions:
            dup = sorted(s for s, n in Counter(p.stem for p, _ in found + held).items() if n > 1)
            if dup:
                where = images if layout.held_out is None else f"{images} and {layout.held_out}"
                raise VqgenError(
                    f"{where}: {len(dup)} file stems occur more than once "
                    f"({shown(dup)}); condition files are matched by stem, so stems must "
                    "be unique across class folders (and across images/ and the held-out "
                    "folder)"
                )
        if layout.held_out is not None:
            train, val = found, held
        else:
            train, val = split_held_out(found, images, self.params.held_out)
        chosen = train if self.params.split == "train" else val
        if not chosen:
            raise self._empty_split(layout.held_out)
        return self._check(chosen, [p for p, _ in found + held])

    def _check(self, chosen: Listed, listed: list[Path]) -> list[Sample]:
        """The samples of ``chosen`` whose files pass the checks (``listed``: every image
        of the folder, whose cache entries are kept)."""
        # problem kind → list of descriptions; a sample with any problem is bad
        problems: dict[str, list[str]] = {}
        samples: list[Sample] = []
        kp_counts: Counter[int] = Counter()
        cache = ScanCache(self.root)

        def bad(kind: str, what: str) -> None:
            problems.setdefault(kind, []).append(what)

        for path, label in chosen:
            sample = self._check_sample(path, label, bad, cache)
            if sample is not None:
                samples.append(sample)
                if sample.keypoints is not None and len(sample.keypoints):
                    kp_counts[sample.keypoints.shape[1]] += 1
        cache.save(listed)

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
            n_bad = len(chosen) - len(samples)
            report = "; ".join(f"{len(v)} {k}: {shown(v)}" for k, v in problems.items())
            msg = f"{self.root}: {n_bad} of {len(chosen)} samples have problems: {report}"
            if self.params.on_bad_file == "error":
                raise VqgenError(
                    f"{msg}. Fix or remove these files, or pass on_bad_file='skip' to leave "
                    "them out"
                )
            warnings.warn(f"{msg}. Skipping them.", DataWarning, stacklevel=4)
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
            except READ_ERRORS as err:  # never crash an epoch halfway
                s = self.samples[(index + attempt + 1) % n]
                warnings.warn(
                    f"could not read sample {self.samples[i].image} ({type(err).__name__}: "
                    f"{err}); using {s.image} instead",
                    DataWarning,
                    stacklevel=2,
                )
        raise VqgenError(f"{self.root}: none of the {n} samples could be read")

    def _load(self, s: Sample, index: int) -> dict[str, torch.Tensor]:
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


