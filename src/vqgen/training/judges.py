"""Training the judges (:mod:`vqgen.plugins.judges`) with the one training engine.

A classifier judges class-conditional samples (and scores candidates for rejection
sampling); a segmentation net measures how well samples follow their map. Both train
on random batches (with replacement) of a data set, with random horizontal flips,
AdamW (weight decay 0.01) with a short linear warm-up and cosine decay, and
cross-entropy; :class:`~vqgen.training.objectives.judge.JudgeObjective` is the
objective, :func:`~vqgen.training.loop.fit` the loop. See :mod:`vqgen.plugins.judges`
for the models, files and measured accuracy.

From the command line::

    python -m vqgen.training.judges --data shapes --data-params '{"resolution": 32}' \\
        --out classifier.safetensors          # add --segmentation for a SegmentationNet
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vqgen.core.errors import EmptySplit, VqgenError
from vqgen.plugins.judges import (
    ImageClassifier,
    SegmentationNet,
    accuracy,
    degrade,
    mean_iou,
    predict_segmentation,
    save_classifier,
)
from vqgen.training.loop import fit
from vqgen.training.objectives.judge import JudgeObjective
from vqgen.training.runtime import DistInfo, Runtime

__all__ = ["main", "train_classifier", "train_segmenter"]

_CACHE_BYTES = 1 << 30  # training keeps at most this many bytes of decoded samples in memory


class _Batches:
    """Random batches of a map-style dataset, decoded samples cached in memory."""

    def __init__(self, dataset: Any, keys: tuple[str, ...], seed: int,
                 augment: bool = False) -> None:
        self.dataset, self.keys, self.augment = dataset, keys, augment
        self.gen = torch.Generator().manual_seed(seed)
        self.cache: dict[int, tuple[torch.Tensor, ...]] = {}
        self.cached_bytes = 0

    def _item(self, i: int) -> tuple[torch.Tensor, ...]:
        item = self.cache.get(i)
        if item is None:
            sample = self.dataset[i]
            missing = [k for k in self.keys if k not in sample]
            if missing:
                raise VqgenError(
                    f"{type(self.dataset).__name__} samples have no {missing[0]!r} "
                    f"(keys: {sorted(sample)}); training needs {list(self.keys)}"
                )
            item = tuple(torch.as_tensor(sample[k]) for k in self.keys)
            size = sum(t.numel() * t.element_size() for t in item)
            if self.cached_bytes + size <= _CACHE_BYTES:
                self.cache[i] = item
                self.cached_bytes += size
        return item

    def next(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        idx = torch.randint(len(self.dataset), (batch_size,), generator=self.gen).tolist()
        items = [self._item(i) for i in idx]
        out = tuple(torch.stack([it[j] for it in items]) for j in range(len(self.keys)))
        flip = torch.rand(batch_size, generator=self.gen) < 0.5  # (B,) random horizontal flips
        out = tuple(
            torch.where(flip.view(-1, *[1] * (t.ndim - 1)), t.flip(-1), t) if t.ndim > 1 else t
            for t in out
        )  # images (B, 3, H, W) and segmentations (B, H, W) flipped alike
        if self.augment:
            out = (degrade(out[0].float(), self.gen), *out[1:])
        return out


def _n_classes(dataset: Any, n_classes: int | None, extra: int, what: str) -> int:
    if n_classes is not None:
        return n_classes
    classes = getattr(dataset, "classes", None)
    if not classes:
        raise VqgenError(
            f"{type(dataset).__name__} has no `classes` list; pass n_classes= to {what}"
        )
    return len(classes) + extra


def _resolution(dataset: Any) -> int | None:
    r = getattr(getattr(dataset, "params", None), "resolution", None)
    return int(r) if isinstance(r, int) else None


def _train_judge(model: nn.Module, batches: _Batches, *, steps: int, batch_size: int,
                 lr: float, device: str | torch.device, progress: bool, desc: str,
                 history: list[float] | None) -> Any:
    """Train ``model`` with per-sample (or per-pixel) cross-entropy; eval mode after."""
    device = torch.device(device)
    judge = JudgeObjective(model, batches, lambda logits, b: F.cross_entropy(logits, b[1]),
                   steps=steps, batch_size=batch_size, lr=lr, device=device, desc=desc)
    fit(judge, Runtime(info=DistInfo(), device=device), 0, progress=progress)
    if history is not None:
        history.extend(judge.history)
    return model.eval()


def train_classifier(
    dataset: Any,
    *,
    steps: int = 800,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
    n_classes: int | None = None,
    width: int = 16,
    n_stages: int = 3,
    device: str | torch.device = "cpu",
    history: list[float] | None = None,
    augment: bool = False,
) -> ImageClassifier:
    """Train an :class:`ImageClassifier` on ``dataset``'s ``"image"`` / ``"label"`` samples.

    ``augment`` also softens images at random (:func:`degrade`): a judge of generated
    samples should be. ``n_classes`` defaults to ``len(dataset.classes)``.
    Deterministic in ``seed`` on CPU. Returns the model in eval mode on ``device``;
    ``history``, if given, receives every step's loss.
    """
    torch.manual_seed(seed)
    model = ImageClassifier(
        n_classes=_n_classes(dataset, n_classes, 0, "train_classifier"), width=width,
        n_stages=n_stages, classes=getattr(dataset, "classes", None) or None,
        resolution=_resolution(dataset),
    )
    return _train_judge(  # type: ignore[no-any-return]
        model, _Batches(dataset, ("image", "label"), seed, augment=augment), steps=steps,
        batch_size=batch_size, lr=lr, device=device, progress=progress, desc="classifier",
        history=history)


def train_segmenter(
    dataset: Any,
    *,
    steps: int = 600,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
    n_classes: int | None = None,
    width: int = 16,
    device: str | torch.device = "cpu",
    history: list[float] | None = None,
) -> SegmentationNet:
    """Train a :class:`SegmentationNet` on ``dataset``'s ``"image"`` / ``"segmentation"``.

    As :func:`train_classifier`, with per-pixel cross-entropy. ``n_classes``
    defaults to ``len(dataset.classes) + 1`` (background is 0, class ``c`` is
    ``1 + c``).
    """
    torch.manual_seed(seed)
    model = SegmentationNet(
        n_classes=_n_classes(dataset, n_classes, 1, "train_segmenter"), width=width,
        classes=getattr(dataset, "classes", None) or None, resolution=_resolution(dataset),
    )
    return _train_judge(  # type: ignore[no-any-return]
        model, _Batches(dataset, ("image", "segmentation"), seed), steps=steps,
        batch_size=batch_size, lr=lr, device=device, progress=progress, desc="segmenter",
        history=history)


def _stack(dataset: Any, key: str) -> torch.Tensor:
    return torch.stack([torch.as_tensor(dataset[i][key]) for i in range(len(dataset))])


def main(argv: Sequence[str] | None = None) -> int:
    """Train a classifier (or ``--segmentation`` net) on a registered dataset and save it."""
    from vqgen.core.registry import default_registry

    ap = argparse.ArgumentParser(
        prog="python -m vqgen.training.judges", description=main.__doc__
    )
    ap.add_argument("--data", default="shapes", help="registered dataset name (default: shapes)")
    ap.add_argument("--data-params", default="{}", help="dataset params as JSON")
    ap.add_argument("--out", required=True, help="output .safetensors file")
    ap.add_argument("--segmentation", action="store_true", help="train a SegmentationNet")
    ap.add_argument("--steps", type=int, default=None, help="default: 800, --segmentation 600")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--augment", action="store_true",
                    help="classifier: random blur / down-up sampling / noise (a sample judge)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    try:
        params = json.loads(args.data_params)
    except json.JSONDecodeError as err:
        raise VqgenError(f"--data-params is not JSON: {err}") from None
    reg = default_registry()
    dataset = reg.create("dataset", args.data, params)
    train = train_segmenter if args.segmentation else train_classifier
    extra = {} if args.segmentation else {"augment": args.augment}
    t0 = time.perf_counter()
    model = train(
        dataset,
        steps=args.steps or (600 if args.segmentation else 800),
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        device=args.device,
        **extra,
    )
    line = f"trained in {time.perf_counter() - t0:.1f}s"
    fields = reg.get("dataset", args.data).params_model.model_fields
    val = None
    if "split" in fields:  # a held-out check, where the data holds some out
        held_out = {**params, "split": "val"} | ({"length": 1000} if "length" in fields else {})
        try:
            val = reg.create("dataset", args.data, held_out)
        except EmptySplit:
            val = None
    if val is not None:
        images = _stack(val, "image")
        if args.segmentation:
            pred = predict_segmentation(model, images)
            miou = mean_iou(pred, _stack(val, "segmentation"), model.arch["n_classes"])
            line += f"; held-out mIoU {miou:.3f}"
        else:
            line += f"; held-out accuracy {accuracy(model, images, _stack(val, 'label')):.3f}"
    save_classifier(model, args.out)
    print(f"{line}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except VqgenError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
