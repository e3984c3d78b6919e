"""What a ``folder`` data set holds on disk, read from listings: its layout and classes,
the held-out split, the scan cache of image sizes, and the file checks.

:class:`vqgen.plugins.folder.FolderDataset` builds on this; its module docstring is
the user's description of the layout, the split and the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vqgen.core.data import (
    IMAGE_EXTENSIONS,
    check_map_mode,
    read_npy_map,
)
from vqgen.core.errors import VqgenError
from vqgen.core.io import atomic_write_text, cache_dir

__all__ = [
    "CONDITION_EXTS", "LAYOUT_HELP", "READ_ERRORS", "Layout", "Listed", "Sample", "ScanCache",
    "list_images", "map_size", "read_layout", "shown", "split_held_out",
]

CONDITION_EXTS = {"segmentation": (".png",), "depth": (".png", ".npy"), "keypoints": (".json",)}
LAYOUT_HELP = (
    "expected root/images/<class>/<name>.png (or a flat root/images/<name>.png for "
    "unlabelled data), with optional root/segmentation/<name>.png, "
    "root/depth/<name>.png|.npy and root/keypoints/<name>.json beside images/"
)
# what reading a broken file can raise (PIL, numpy); anything else is a bug and propagates
READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
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


def map_size(path: Path, cond: str) -> tuple[int, int]:
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
class Sample:
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


def shown(items: list[str]) -> str:
    more = f", … ({len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return ", ".join(items[:_SHOW]) + more


def _quoted(names: Iterable[str]) -> str:
    return shown([repr(n) for n in names])


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
            f"{val} holds images directly inside it ({shown([p.name for p in top])}), but "
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
class Layout:
    classes: list[str]  # names by id; [] for a flat (unlabelled) folder
    held_out: Path | None  # root/val or root/held_out, when there is one


def read_layout(root: Path, wanted: list[str] | str) -> Layout:
    """The classes and the held-out folder of ``root``, from folder listings alone."""
    if not root.is_dir():
        raise VqgenError(f"dataset root {root} does not exist or is not a folder; {LAYOUT_HELP}")
    images = root / "images"
    if not images.is_dir():
        raise VqgenError(f"dataset root {root} has no images/ folder; {LAYOUT_HELP}")
    dirs, top = _entries(images)
    if dirs and top:
        raise VqgenError(
            f"{images} mixes class sub-folders ({shown(dirs)}) with images directly "
            f"inside it ({shown([p.name for p in top])}); put every image in a class "
            "sub-folder, or use a flat folder without sub-folders for unlabelled data"
        )
    classes = _order_classes(images, dirs, wanted)
    val = _held_out_dir(root)
    if val is not None:
        _check_held_out_dir(val, images, classes)
    return Layout(classes, val)


def list_images(folder: Path, classes: list[str]) -> list[tuple[Path, int | None]]:
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


def split_held_out(found: Listed, images: Path, held_out: float) -> tuple[Listed, Listed]:
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


class ScanCache:
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
