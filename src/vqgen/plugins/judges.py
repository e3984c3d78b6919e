"""Small, fast image classifier and segmentation net: judges of generated samples.

* :class:`ImageClassifier` — images ``[B, 3, H, W]`` in ``[-1, 1]`` → class logits
  ``[B, n_classes]``: a conv stem, ``n_stages`` stride-2 stages of
  conv + GroupNorm + SiLU, global average pooling and a linear head. Any
  resolution ≥ 16 works (the pooling removes the spatial size).
* :class:`SegmentationNet` — images → per-pixel logits ``[B, n_classes, H, W]``: a
  small U-Net (three stride-2 levels, global context at the bottleneck, skip
  connections, bilinear upsampling); any ``H, W`` works.

Both first standardise each image's channels (:func:`standardize`).

The rejection sampler (:mod:`vqgen.samplers.rejection`) scores samples with a
classifier (Tab. 4 of Taming Transformers, after VQ-VAE-2); the segmentation net
measures how well segmentation-conditioned samples follow their map (mIoU).

Files: :func:`save_classifier` writes one safetensors file holding the weights;
its metadata holds ``format = "vqgen-classifier"``, the model type, the
architecture params (JSON), the class names and the training resolution, so
:func:`load_classifier` / :func:`load_segmenter` rebuild the model from the file
alone. Loading never unpickles: only safetensors files written here are read,
and anything else raises a :class:`VqgenError` naming the file. (A classifier
of your own is not loaded from a file: pass the module to
``Rejection.set_classifier``.)

Training lives a floor above, in :mod:`vqgen.training.judges` (the one training
engine)::

    from vqgen.plugins.judges import save_classifier
    from vqgen.plugins.shapes import ShapesDataset
    from vqgen.training.judges import train_classifier
    model = train_classifier(ShapesDataset(resolution=32), steps=800, batch_size=64, seed=0)
    save_classifier(model, "classifier.safetensors")

    python -m vqgen.training.judges --data shapes --data-params '{"resolution": 32}' \\
        --out classifier.safetensors          # add --segmentation for a SegmentationNet

Measured on ``shapes`` 32×32 (held-out: 1000 samples of ``split="val"``), seed 0,
batches of 64. CPU time is for one thread: the defaults took 44 s of CPU (59 s
wall on a loaded, shared 2-core machine); the other rows are scaled from it by
steps and by the measured cost of a step (the 400 and 600 rows trained with 2 threads):

=====================  ============  =====================  ===================
model                  steps         held-out               CPU time (1 thread)
=====================  ============  =====================  ===================
ImageClassifier        400           91.6 % accuracy        ≈ 25 s
ImageClassifier        600           96.6 % accuracy        ≈ 35 s
ImageClassifier        800 (def.)    98.0 % accuracy        44 s
SegmentationNet        600 (def.)    0.915 mIoU             ≈ 2.5 min
=====================  ============  =====================  ===================

(The segmenter's step costs ~4.5× the classifier's; with batches of 32 instead
of 64 it reached 0.69 mIoU after 600 steps: star and triangle get confused.)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from vqgen.core.errors import VqgenError
from vqgen.core.io import atomic_path

__all__ = [
    "FORMAT",
    "ImageClassifier",
    "SegmentationNet",
    "accuracy",
    "degrade",
    "iou_per_class",
    "load_classifier",
    "load_segmenter",
    "mean_iou",
    "predict_segmentation",
    "save_classifier",
]

#: ``format`` entry of the safetensors metadata of a file written by :func:`save_classifier`.
FORMAT = "vqgen-classifier"



def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(8 if c % 8 == 0 else 1, c)


def standardize(x: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    """Each image's channels shifted to mean 0 and scaled to std ~1: ``[B, C, H, W]``.

    The first layer of both nets: shapes come in random colours over random
    backgrounds, and removing each image's colour and contrast makes the nets
    learn several times faster (93 % vs 56 % held-out accuracy after 300 steps).
    """
    mean = x.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
    std = x.std(dim=(2, 3), keepdim=True, correction=0)  # (B, C, 1, 1)
    return (x - mean) / (std + eps)  # (B, C, H, W)


def _block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    """conv3x3 (stride) + GroupNorm + SiLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), _norm(c_out), nn.SiLU()
    )


# -----------------------------------------------------------------------------
# models


class ImageClassifier(nn.Module):
    """Images ``[B, 3, H, W]`` in ``[-1, 1]`` → class logits ``[B, n_classes]``.

    ``classes`` (names) and ``resolution`` (what it was trained at; the rejection
    sampler resizes samples to it) are carried along into saved files.
    """

    def __init__(
        self,
        n_classes: int = 4,
        in_channels: int = 3,
        width: int = 16,
        n_stages: int = 3,
        classes: Sequence[str] | None = None,
        resolution: int | None = None,
    ) -> None:
        super().__init__()
        if n_classes < 1 or width < 1 or n_stages < 1:
            raise ValueError("n_classes, width and n_stages must be at least 1")
        self.arch = dict(
            n_classes=n_classes, in_channels=in_channels, width=width, n_stages=n_stages
        )
        self.classes = list(classes) if classes is not None else None
        self.resolution = resolution
        chans = [width * 2**i for i in range(n_stages)]
        layers = [_block(in_channels, width)]
        for c_in, c_out in zip([width, *chans[:-1]], chans, strict=True):
            layers += [_block(c_in, c_out, stride=2), _block(c_out, c_out)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(chans[-1], n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(standardize(x))  # (B, C, H / 2**n_stages, W / 2**n_stages)
        return self.head(h.mean(dim=(2, 3)))  # (B, n_classes)


def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Bilinear upsampling of ``x`` to ``like``'s height and width."""
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


class SegmentationNet(nn.Module):
    """Images ``[B, 3, H, W]`` in ``[-1, 1]`` → per-pixel logits ``[B, n_classes, H, W]``.

    ``n_classes`` counts the background: ``shapes`` has 5 (background + 4 shapes).
    A U-Net with three stride-2 levels; the bottleneck adds a projection of its
    global average (which class is in the picture is a global question), and the
    full-resolution decoder is a cheap 1x1 conv on the skip.
    """

    def __init__(
        self,
        n_classes: int = 5,
        in_channels: int = 3,
        width: int = 16,
        classes: Sequence[str] | None = None,
        resolution: int | None = None,
    ) -> None:
        super().__init__()
        if n_classes < 1 or width < 1:
            raise ValueError("n_classes and width must be at least 1")
        self.arch = dict(n_classes=n_classes, in_channels=in_channels, width=width)
        self.classes = list(classes) if classes is not None else None
        self.resolution = resolution
        w = width
        self.enc0 = _block(in_channels, w)
        self.enc1 = nn.Sequential(_block(w, 2 * w, stride=2), _block(2 * w, 2 * w))
        self.enc2 = nn.Sequential(_block(2 * w, 4 * w, stride=2), _block(4 * w, 4 * w))
        self.enc3 = nn.Sequential(_block(4 * w, 4 * w, stride=2), _block(4 * w, 4 * w))
        self.context = nn.Linear(4 * w, 4 * w)
        self.dec2 = _block(8 * w, 4 * w)
        self.dec1 = _block(6 * w, 2 * w)
        self.dec0 = nn.Conv2d(3 * w, w, 1)
        self.head = nn.Sequential(nn.SiLU(), nn.Conv2d(w, n_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e0 = self.enc0(standardize(x))  # (B, w, H, W)
        e1 = self.enc1(e0)  # (B, 2w, H/2, W/2)
        e2 = self.enc2(e1)  # (B, 4w, H/4, W/4)
        e3 = self.enc3(e2)  # (B, 4w, H/8, W/8)
        e3 = e3 + self.context(e3.mean(dim=(2, 3)))[:, :, None, None]  # global context
        d2 = self.dec2(torch.cat([_up(e3, e2), e2], dim=1))  # (B, 4w, H/4, W/4)
        d1 = self.dec1(torch.cat([_up(d2, e1), e1], dim=1))  # (B, 2w, H/2, W/2)
        d0 = self.dec0(torch.cat([_up(d1, e0), e0], dim=1))  # (B, w, H, W)
        return self.head(d0)  # (B, n_classes, H, W)


_MODELS: dict[str, type[nn.Module]] = {
    "ImageClassifier": ImageClassifier,
    "SegmentationNet": SegmentationNet,
}


# -----------------------------------------------------------------------------
# metrics


def _device(model: nn.Module, fallback: torch.Tensor) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else fallback.device


@torch.no_grad()
def accuracy(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256
) -> float:
    """Fraction of ``images [N, 3, H, W]`` whose arg-max class equals ``labels [N]``."""
    was_training = model.training
    model.eval()
    device = _device(model, images)
    correct = 0
    for i in range(0, len(images), batch_size):
        logits = model(images[i : i + batch_size].to(device))  # (b, n_classes)
        correct += int((logits.argmax(dim=1).cpu() == labels[i : i + batch_size].cpu()).sum())
    model.train(was_training)
    return correct / max(len(images), 1)


@torch.no_grad()
def predict_segmentation(
    model: nn.Module, images: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    """Per-pixel arg-max labels ``int64 [N, H, W]`` of ``images [N, 3, H, W]`` (on CPU)."""
    was_training = model.training
    model.eval()
    device = _device(model, images)
    out = [
        model(images[i : i + batch_size].to(device)).argmax(dim=1).cpu()  # (b, H, W)
        for i in range(0, len(images), batch_size)
    ]
    model.train(was_training)
    return torch.cat(out)


def iou_per_class(pred: torch.Tensor, target: torch.Tensor, n_classes: int) -> torch.Tensor:
    """``float64 [n_classes]`` intersection over union of each class, pooled over all pixels.

    A class in neither ``pred`` nor ``target`` has no IoU: its entry is NaN.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    p, t = pred.reshape(-1).long(), target.reshape(-1).long()
    for name, x in (("pred", p), ("target", t)):
        if x.numel() and (x.min() < 0 or x.max() >= n_classes):
            raise ValueError(f"{name} has labels outside [0, {n_classes})")
    inter = torch.bincount(p[p == t], minlength=n_classes).double()  # (n_classes,)
    union = (
        torch.bincount(p, minlength=n_classes) + torch.bincount(t, minlength=n_classes)
    ).double() - inter  # (n_classes,)
    return torch.where(union > 0, inter / union.clamp(min=1), torch.nan)


def mean_iou(pred_labels: torch.Tensor, target_labels: torch.Tensor, n_classes: int) -> float:
    """Mean over classes of :func:`iou_per_class`, skipping classes absent from both.

    Pixels are pooled over the whole batch (not averaged per image). NaN when no
    class occurs at all (empty input).
    """
    iou = iou_per_class(pred_labels, target_labels, n_classes)
    present = iou[~iou.isnan()]
    return float(present.mean()) if present.numel() else math.nan


# -----------------------------------------------------------------------------
# training


def degrade(x: torch.Tensor, gen: torch.Generator, p: float = 0.6) -> torch.Tensor:
    """Randomly soften images ``[B, C, H, W]`` the way imperfect decoders do.

    Each image, with probability ``p``, is downsampled by 2 or 4 (area) and
    upsampled back (bilinear), or blurred (Gaussian, σ = 1 px), and gets Gaussian
    noise of a random strength (std up to 0.08). A judge trained with this still
    sees only real images, but learns shapes rather than pixel-exact edges, so
    it can score blurry samples and reconstructions.
    """
    b, _, h, w = x.shape
    soft = [
        F.interpolate(F.interpolate(x, scale_factor=1 / f, mode="area"), size=(h, w),
                      mode="bilinear", align_corners=False)
        for f in (2, 4)
    ]  # 2 × (B, C, H, W)
    k = torch.exp(-0.5 * torch.arange(-2.0, 3.0).square())  # (5,) σ = 1 px
    k2 = torch.outer(k, k) / k.sum() ** 2  # (5, 5) separable Gaussian
    c = x.shape[1]
    blur = F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), k2.expand(c, 1, 5, 5),
                    groups=c)  # (B, C, H, W)
    choice = torch.randint(3, (b,), generator=gen).view(b, 1, 1, 1)  # which softening
    on = (torch.rand(b, generator=gen) < p).view(b, 1, 1, 1)  # (B, 1, 1, 1)
    softened = torch.where(choice == 0, soft[0], torch.where(choice == 1, soft[1], blur))
    noise_std = torch.rand(b, generator=gen).view(b, 1, 1, 1) * 0.08
    noise = torch.randn(x.shape, generator=gen) * noise_std * on
    return (torch.where(on, softened, x) + noise).clamp(-1, 1)  # (B, C, H, W)


# -----------------------------------------------------------------------------
# files


def save_classifier(model: ImageClassifier | SegmentationNet, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` (either kind) to ``path`` as safetensors, atomically; returns the path.

    The metadata holds everything :func:`load_classifier` needs to rebuild it.
    """
    kind = type(model).__name__
    if kind not in _MODELS or not isinstance(model, _MODELS[kind]):
        raise TypeError(
            f"save_classifier writes ImageClassifier or SegmentationNet, not {kind}; "
            "pass your own module to Rejection.set_classifier instead"
        )
    meta = {
        "format": FORMAT,
        "version": "1",
        "model": kind,
        "arch": json.dumps(model.arch),
        "classes": json.dumps(model.classes),
        "resolution": json.dumps(model.resolution),
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def _load(path: str | os.PathLike[str], want: type[nn.Module]) -> Any:
    path = Path(path).expanduser()
    hint = "write one with vqgen.plugins.judges.save_classifier"
    if not path.is_file():
        raise VqgenError(f"classifier file {path} does not exist ({hint})")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise VqgenError(
            f"cannot read classifier file {path}: not a safetensors file ({err}); {hint}"
        ) from None
    if meta.get("format") != FORMAT:
        raise VqgenError(
            f"{path} is a safetensors file but not a vqgen classifier (its metadata has no "
            f"format={FORMAT!r}); {hint}"
        )
    kind = meta.get("model")
    if kind != want.__name__:
        loader = {"ImageClassifier": "load_classifier", "SegmentationNet": "load_segmenter"}
        raise VqgenError(
            f"{path} holds a {kind} (read it with {loader.get(str(kind), 'another loader')}), "
            f"not the {want.__name__} asked for"
        )
    try:
        model = want(
            **json.loads(meta["arch"]),
            classes=json.loads(meta.get("classes", "null")),
            resolution=json.loads(meta.get("resolution", "null")),
        )
        model.load_state_dict(state, strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise VqgenError(
            f"classifier file {path} is damaged or from another version: {err}"
        ) from None
    return model.eval()


def load_classifier(path: str | os.PathLike[str]) -> ImageClassifier:
    """Read an :class:`ImageClassifier` written by :func:`save_classifier` (eval mode, CPU).

    Raises :class:`VqgenError` naming ``path`` for a missing, unreadable or foreign file.
    """
    return _load(path, ImageClassifier)


def load_segmenter(path: str | os.PathLike[str]) -> SegmentationNet:
    """Read a :class:`SegmentationNet` written by :func:`save_classifier` (eval mode, CPU)."""
    return _load(path, SegmentationNet)


# -----------------------------------------------------------------------------
# command line: python -m vqgen.plugins.judges --help
