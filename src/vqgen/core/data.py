"""The sample format of every data set, and reading condition files.

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

Condition files (a folder data set's, ``vqgen sample --cond FILE``'s) are read here:
label maps (:func:`load_label_map`), depth maps (:func:`load_depth_map`,
:func:`read_npy_map`), keypoint JSON (:func:`parse_keypoints`); a data set names the
file a sample came from with ``source(index, key)`` (:func:`sample_source`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib import format as npy_format
from PIL import Image
from torch.utils.data import Dataset

from vqgen.core.errors import EmptySplit, SampleError, VqgenError
from vqgen.core.images import load_rgb, u8_to_image

__all__ = [
    "CONDITIONS",
    "IMAGE_EXTENSIONS",
    "MAX_MAP_PIXELS",
    "ConditionInputs",
    "DataWarning",
    "Spread",
    "check_map_mode",
    "held_out_dataset",
    "load_depth_map",
    "load_label_map",
    "parse_keypoints",
    "read_condition",
    "read_npy_map",
    "sample_source",
    "spread_indices",
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
class DataWarning(UserWarning):
    """A data problem that vqgen worked around (a file skipped or substituted)."""


_LABEL_MODES = ("1", "L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N")
_DEPTH_MODES = ("L", "I", "I;16", "I;16L", "I;16B", "I;16N")


def check_map_mode(im: Image.Image, cond: str) -> None:
    if cond == "segmentation" and im.mode not in _LABEL_MODES:
        raise ValueError(
            f"a segmentation map must be a single-channel 8/16-bit label map, "
            f"got PIL mode {im.mode!r}"
        )
    if cond == "depth" and im.mode not in _DEPTH_MODES:
        raise ValueError(f"a depth PNG must be 8/16-bit grayscale, got PIL mode {im.mode!r}")


def load_label_map(path: Path) -> np.ndarray:
    """A single-channel 8/16-bit label map as ``int64 [H, W]`` (palette: the indices)."""
    with Image.open(path) as im:
        check_map_mode(im, "segmentation")
        return np.asarray(im).astype(np.int64)


def load_depth_map(path: Path) -> np.ndarray:
    """A depth map as ``float32 [H, W]`` in ``[0, 1]`` (see the module docstring)."""
    if path.suffix.lower() == ".npy":
        a = read_npy_map(path)  # (H, W)
        if np.isinf(a).any() or np.isnan(a).all():
            raise ValueError("it holds infinite values" if np.isinf(a).any()
                             else "every value is NaN")
        lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        a = np.nan_to_num(a, nan=hi)
        return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    with Image.open(path) as im:
        check_map_mode(im, "depth")
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


def parse_keypoints(path: Path, max_objects: int) -> np.ndarray:
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


def sample_source(dataset: Any, index: int, key: str) -> str:
    """Where ``key`` of sample ``index`` of ``dataset`` comes from: the data set's
    ``source(index, key)`` (e.g. a file) where it has one, through ``Subset``s."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset, index = dataset.dataset, int(dataset.indices[index])
    source = getattr(dataset, "source", None)
    return source(index, key) if callable(source) else f"sample {index} of the data set"


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
        self.labels = getattr(dataset, "labels", None)  # for previews across classes

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
            return torch.from_numpy(load_label_map(path))[None]  # (1, H, W)
        if key == "depth":
            return torch.from_numpy(load_depth_map(path))[None, None]  # (1, 1, H, W)
        if key == "keypoints":
            return torch.from_numpy(parse_keypoints(path, 1 << 16))[None]  # (1, N, K, 3)
        if key == "edges":
            with Image.open(path) as im:
                a = np.asarray(im.convert("L"), dtype=np.float32) / np.float32(255)
            return torch.from_numpy(a)[None, None]  # (1, 1, H, W)
        return u8_to_image(np.asarray(load_rgb(path)))[None]  # (1, 3, H, W)
    except VqgenError:
        raise
    except Image.DecompressionBombError as err:  # neither OSError nor ValueError
        raise VqgenError(f"condition file {path} is too large to read as {key!r} ({err}); "
                         "resize it to the size you sample at") from None
    except (ValueError, OSError) as err:
        raise VqgenError(f"condition file {path} cannot be read as {key!r}: {err}") from None


def held_out_dataset(config: Any, registry: Any, n: int = 512) -> Any | None:
    """The held-out part of a config's data (``split: val``, at most ``n`` samples spread
    over the whole split), or None for a data set without splits or with an empty one
    (:class:`~vqgen.core.errors.EmptySplit`): what validation, ``best/``, evaluation and
    the judges use."""
    entry = registry.get("dataset", config.data.name)
    fields = entry.params_model.model_fields
    if "split" not in fields:
        return None
    params = {**config.data.params, "split": "val"}
    if "length" in fields:
        params["length"] = min(n, int(params.get("length") or n))
    try:
        held = registry.create("dataset", config.data.name, params)
    except EmptySplit:
        return None
    return held if len(held) <= n else Spread(held, n)


class Spread(Dataset):  # type: ignore[type-arg]
    """``n`` samples of ``dataset`` at evenly spaced indices (so a data set sorted by class
    keeps its mix of classes); its other attributes (``classes``, ``source``) pass through."""

    def __init__(self, dataset: Any, n: int) -> None:
        self.dataset = dataset
        total = len(dataset)
        self.indices = [i * total // n for i in range(min(n, total))]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.dataset[self.indices[i]]  # type: ignore[no-any-return]

    def source(self, index: int, key: str) -> str:
        """The file of sample ``index`` (see :func:`sample_source`)."""
        return sample_source(self.dataset, self.indices[index], key)

    @property
    def labels(self) -> list[int] | None:
        """The labels of the chosen samples, where the data set lists them."""
        labels = getattr(self.dataset, "labels", None)
        return None if labels is None else [labels[i] for i in self.indices]

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.dataset, name)


def spread_indices(dataset: Any, n: int, seed: int = 0) -> list[int]:
    """Indices of ``n`` samples of ``dataset`` that mix its classes: round-robin over the
    classes in ``dataset.labels`` (each class's samples in a seeded order), or the first
    ``n`` where the data set lists no labels (a generated one mixes them by itself).
    Fixed for a given data set and seed."""
    total = len(dataset)
    n = min(n, total)
    labels = getattr(dataset, "labels", None)
    if labels is None or len(labels) != total:
        return list(range(n))
    by_class: dict[int, list[int]] = {}
    for i, c in enumerate(labels):
        by_class.setdefault(int(c), []).append(i)
    g = torch.Generator().manual_seed(seed)
    queues = [[members[j] for j in torch.randperm(len(members), generator=g).tolist()]
              for _, members in sorted(by_class.items())]
    out: list[int] = []
    while len(out) < n:
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out
