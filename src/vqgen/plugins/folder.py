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
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
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
from vqgen.core.errors import EmptySplit, VqgenError
from vqgen.core.images import load_rgb, u8_to_image
from vqgen.core.interfaces import Component, ParamsModel
from vqgen.core.io import atomic_write_text, cache_dir

__all__ = ["EmptySplit", "FolderDataset"]

_CONDITION_EXTS = {"segmentation": (".png",), "depth": (".png", ".npy"), "keypoints": (".json",)}
_LAYOUT = (
    "expected root/images/<class>/<name>.png (or a flat root/images/<name>.png for "
    "unlabelled data), with optional root/segmentation/<name>.png, "
    "root/depth/<name>.png|.npy and root/keypoints/<name>.json beside images/"
)
# what reading a broken file can raise (PIL, numpy); anything else is a bug and propagates
_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
_SHOW = 3  # how many offending files a report names
_HELD_OUT_DIRS = ("val", "held_out")  # an explicit held-out folder beside images/
# Salt of the held-out hash: fixed, so that a file's split never depends on params
# (``seed`` is for crops). Changing it reshuffles every user's split: don't.
_SPLIT_SALT = "vqgen-folder-held-out-v1"
_CACHE_VERSION = 1
_DIGITS = re.compile(r"([0-9]+)")


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


def _quoted(names: Iterable[str]) -> str:
    return _shown([repr(n) for n in names])


# -- layout and classes ---------------------------------------------------------------
def _natural_key(name: str) -> tuple[tuple[str | int, ...], str]:
    """Sort key of a class folder name: digit runs as numbers, the rest case-insensitively,
    ties by the exact name (``img2`` < ``img10``, ``9`` < ``10``)."""
    parts = _DIGITS.split(name)  # text, digits, text, …: digits at the odd positions
    return tuple(int(s) if i % 2 else s.casefold() for i, s in enumerate(parts)), name


def _entries(folder: Path) -> tuple[list[str], list[Path]]:
    """The visible sub-folder names of ``folder`` and the images directly inside it."""
    try:
        children = list(folder.iterdir())
    except OSError as err:
        raise VqgenError(f"cannot list {folder} ({err.strerror or err}); make it readable") \
            from None
    dirs = sorted(p.name for p in children if p.is_dir() and not p.name.startswith("."))
    return dirs, sorted(p for p in children if _is_image(p))


def _order_classes(images: Path, dirs: list[str], wanted: list[str] | str) -> list[str]:
    """Class names by id: ``dirs`` in natural order (``"auto"``), or the list ``wanted``
    after checking that it names every folder of ``dirs`` exactly once."""
    if wanted == "auto":
        return sorted(dirs, key=_natural_key)
    how = "classes must name each class folder of images/ once, in id order, or be 'auto'"
    dup = [n for n, k in Counter(wanted).items() if k > 1]
    if dup:
        raise VqgenError(f"classes lists {_quoted(dup)} more than once; {how}")
    missing = [n for n in wanted if n not in dirs]
    if missing:
        have = f"its class folders are {_quoted(dirs)}" if dirs else "it has no class folders"
        raise VqgenError(
            f"classes lists {_quoted(missing)}, but {images} has no such folder ({have}); "
            "create the folder or remove the name from classes"
        )
    extra = [n for n in sorted(dirs, key=_natural_key) if n not in wanted]
    if extra:
        raise VqgenError(
            f"the class folder(s) {_quoted(extra)} of {images} are not in classes; add them "
            f"to the list (a class's id is its position) or move them out of {images}"
        )
    return list(wanted)


def _held_out_dir(root: Path) -> Path | None:
    """``root/val`` or ``root/held_out`` where one exists; both is an error."""
    found = [root / n for n in _HELD_OUT_DIRS if (root / n).is_dir()]
    if len(found) > 1:
        raise VqgenError(
            f"{root} has both {found[0]} and {found[1]}; keep the held-out images in one "
            "of them (they are read the same way)"
        )
    return found[0] if found else None


def _check_held_out_dir(val: Path, images: Path, classes: list[str]) -> None:
    """``val`` must be laid out like ``images`` and hold no class that images/ lacks."""
    dirs, top = _entries(val)
    if classes and top:
        raise VqgenError(
            f"{val} holds images directly inside it ({_shown([p.name for p in top])}), but "
            f"{images} has class folders; put each held-out image in {val}/<class>/"
        )
    if not classes and dirs:
        raise VqgenError(
            f"{val} has sub-folders ({_quoted(dirs)}), but {images} is flat (unlabelled); "
            f"put the held-out images directly in {val}, or use class folders in both"
        )
    unknown = [d for d in sorted(dirs, key=_natural_key) if d not in classes]
    if unknown:
        raise VqgenError(
            f"{val} has class folder(s) {_quoted(unknown)} that are not classes of {images} "
            f"({_quoted(classes)}); class ids come from images/, so rename the folder to one "
            "of its classes, add the class to images/ as well, or move the folder out"
        )


@dataclass(frozen=True)
class _Layout:
    classes: list[str]  # names by id; [] for a flat (unlabelled) folder
    held_out: Path | None  # root/val or root/held_out, when there is one


def _layout(root: Path, wanted: list[str] | str) -> _Layout:
    """The classes and the held-out folder of ``root``, from folder listings alone."""
    if not root.is_dir():
        raise VqgenError(f"dataset root {root} does not exist or is not a folder; {_LAYOUT}")
    images = root / "images"
    if not images.is_dir():
        raise VqgenError(f"dataset root {root} has no images/ folder; {_LAYOUT}")
    dirs, top = _entries(images)
    if dirs and top:
        raise VqgenError(
            f"{images} mixes class sub-folders ({_shown(dirs)}) with images directly "
            f"inside it ({_shown([p.name for p in top])}); put every image in a class "
            "sub-folder, or use a flat folder without sub-folders for unlabelled data"
        )
    classes = _order_classes(images, dirs, wanted)
    val = _held_out_dir(root)
    if val is not None:
        _check_held_out_dir(val, images, classes)
    return _Layout(classes, val)


def _list_images(folder: Path, classes: list[str]) -> list[tuple[Path, int | None]]:
    """``(path, label)`` of every image of ``folder``, by class, then path."""
    if not classes:
        return [(p, None) for p in _entries(folder)[1]]
    found: list[tuple[Path, int | None]] = []
    for label, name in enumerate(classes):
        if (folder / name).is_dir():  # a class may be missing from a held-out folder
            found += [(p, label) for p in _files_below(folder / name) if _is_image(p)]
    return found


# -- the held-out split -----------------------------------------------------------------
def _held_out_score(relpath: str) -> float:
    """A uniform value in [0, 1) that depends only on ``relpath`` (a posix path below
    images/): the first 8 bytes of a salted sha256, top 53 bits (exact in a float)."""
    digest = hashlib.sha256(f"{_SPLIT_SALT}:{relpath}".encode("utf-8", "surrogateescape"))
    return (int.from_bytes(digest.digest()[:8], "big") >> 11) / 2**53


Listed = list[tuple[Path, int | None]]


def _split(found: Listed, images: Path, held_out: float) -> tuple[Listed, Listed]:
    """``found`` as (train, held out), each in its order: per class (the whole folder when
    unlabelled), the files whose score is below ``held_out``; a class of >= 2 files with
    none lends its lowest-score file, and a class always keeps one training file."""
    if held_out <= 0:
        return found, []
    by_class: dict[int | None, list[int]] = {}
    for i, (_, label) in enumerate(found):
        by_class.setdefault(label, []).append(i)
    out: set[int] = set()
    for members in by_class.values():
        score = {i: (_held_out_score(found[i][0].relative_to(images).as_posix()), found[i][0])
                 for i in members}
        held = {i for i in members if score[i][0] < held_out}
        if not held and len(members) >= 2:
            held = {min(members, key=score.__getitem__)}
        if len(held) == len(members):  # keep the file least inclined to be held out
            held.discard(max(members, key=score.__getitem__))
        out |= held
    return ([f for i, f in enumerate(found) if i not in out],
            [f for i, f in enumerate(found) if i in out])


# -- the scan cache ---------------------------------------------------------------------
def _valid_entry(v: object) -> bool:
    """``[st_size, st_mtime_ns, W, H]``, all ints, with a positive size."""
    return (isinstance(v, list) and len(v) == 4 and all(type(x) is int for x in v)
            and v[0] >= 0 and v[2] >= 1 and v[3] >= 1)


class _ScanCache:
    """The ``(W, H)`` of the images of ``root`` that passed the check, keyed by their path
    below ``root`` with their size and mtime (see the module docstring). The cache file
    is untrusted: anything wrong with it means starting afresh, never an error."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.old: dict[str, list[int]] = {}  # as read
        self.new: dict[str, list[int]] = {}  # checked (or confirmed) in this scan
        self.file: Path | None = None
        try:
            self.key = str(root.resolve())
            digest = hashlib.sha256(self.key.encode("utf-8", "surrogateescape")).hexdigest()
            self.file = cache_dir() / "folder-scan" / f"{digest[:16]}.json"
        except (OSError, RuntimeError):  # no home folder, a path that cannot be resolved
            return
        self.old = self._read(self.file)

    def _read(self, file: Path) -> dict[str, list[int]]:
        try:
            if not file.is_file():  # missing, or a FIFO that a read would block on
                return {}
            data = json.loads(file.read_bytes())
            files = data.get("files")
            if (data.get("version") == _CACHE_VERSION and data.get("root") == self.key
                    and isinstance(files, dict) and all(map(_valid_entry, files.values()))):
                return files
        except Exception:  # untrusted input: whatever is wrong with it, start afresh
            pass
        return {}

    def size(self, path: Path) -> tuple[int, int]:
        """``(W, H)`` of image ``path``: cached while its size and mtime are unchanged,
        else from :func:`_image_size` (which raises for a broken file: never cached)."""
        rel = path.relative_to(self.root).as_posix()
        try:
            st = path.stat()
        except OSError:
            return _image_size(path)  # raises, naming the problem
        hit = self.old.get(rel)
        if hit is not None and hit[:2] == [st.st_size, st.st_mtime_ns]:
            w, h = hit[2], hit[3]
        else:
            w, h = _image_size(path)
        self.new[rel] = [st.st_size, st.st_mtime_ns, w, h]
        return w, h

    def save(self, listed: Iterable[Path]) -> None:
        """Write the entries of the files in ``listed`` (the folder's files now), checked
        in this scan or before; skipped silently where the cache cannot be written."""
        if self.file is None:
            return
        keep = {p.relative_to(self.root).as_posix() for p in listed}
        entries = {k: v for k, v in self.old.items() if k in keep} | self.new
        if entries == self.old:
            return
        text = json.dumps({"version": _CACHE_VERSION, "root": self.key, "files": entries},
                          sort_keys=True, separators=(",", ":"))
        try:
            atomic_write_text(self.file, text)
        except (VqgenError, OSError):  # a read-only or missing cache dir costs only time
            pass


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
        self.samples: list[_Sample] = self._scan()
        self.labels: list[int] = [-1 if s.label is None else s.label for s in self.samples]

    @classmethod
    def class_names(cls, params: Mapping[str, Any]) -> list[str] | None:
        """The class names by id that ``cls(**params).classes`` will have (None for a flat,
        unlabelled folder), from folder listings alone: no class folder is walked and no
        image is read. Raises the constructor's VqgenError for a bad layout or list."""
        p = cls.Params(**params)
        return _layout(Path(p.root).expanduser(), p.classes).classes or None

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
                f"{', '.join(c + '/' for c in missing)} folder; {_LAYOUT}"
            )
        return [c for c in CONDITIONS if c in wanted]

    def _check_sample(
        self, path: Path, label: int | None, bad: Callable[[str, str], None], cache: _ScanCache
    ) -> _Sample | None:
        """The sample of image ``path`` with its condition files, or None (reported to ``bad``)."""
        try:
            size = cache.size(path)
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

    def _scan(self) -> list[_Sample]:
        layout = _layout(self.root, self.params.classes)
        self.classes = layout.classes
        images = self.root / "images"
        found = _list_images(images, self.classes)
        if not found:
            exts = ", ".join(IMAGE_EXTENSIONS)
            raise VqgenError(f"{images} contains no images ({exts}); {_LAYOUT}")
        held = [] if layout.held_out is None else _list_images(layout.held_out, self.classes)
        self.conditions = self._resolve_conditions()
        if self.conditions:
            dup = sorted(s for s, n in Counter(p.stem for p, _ in found + held).items() if n > 1)
            if dup:
                where = images if layout.held_out is None else f"{images} and {layout.held_out}"
                raise VqgenError(
                    f"{where}: {len(dup)} file stems occur more than once "
                    f"({_shown(dup)}); condition files are matched by stem, so stems must "
                    "be unique across class folders (and across images/ and the held-out "
                    "folder)"
                )
        if layout.held_out is not None:
            train, val = found, held
        else:
            train, val = _split(found, images, self.params.held_out)
        chosen = train if self.params.split == "train" else val
        if not chosen:
            raise self._empty_split(layout.held_out)
        return self._check(chosen, [p for p, _ in found + held])

    def _check(self, chosen: Listed, listed: list[Path]) -> list[_Sample]:
        """The samples of ``chosen`` whose files pass the checks (``listed``: every image
        of the folder, whose cache entries are kept)."""
        # problem kind → list of descriptions; a sample with any problem is bad
        problems: dict[str, list[str]] = {}
        samples: list[_Sample] = []
        kp_counts: Counter[int] = Counter()
        cache = _ScanCache(self.root)

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
            report = "; ".join(f"{len(v)} {k}: {_shown(v)}" for k, v in problems.items())
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


