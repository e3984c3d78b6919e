"""Measures of images and codes: PSNR, SSIM, LPIPS, code usage, sample class accuracy."""

from __future__ import annotations

import contextlib
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vqgen.core.errors import VqgenError
from vqgen.core.layout import CLASSIFIER_FILE

__all__ = [
    "CLASSIFIER_FILE", "class_accuracy", "code_usage", "find_classifier", "lpips_model", "psnr",
    "rounded", "ssim",
]


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of ``[B, C, H, W]`` images in ``[-1, 1]`` (peak-to-peak 2)."""
    mse = ((x - y) / 2).square().flatten(1).mean(1)  # (B,)
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM of ``[B, C, H, W]`` images in ``[-1, 1]``, averaged over channels.

    The usual constants ``(0.01·L)²`` and ``(0.03·L)²`` with ``L = 1`` on images
    mapped to ``[0, 1]``; a Gaussian window, valid positions only.
    """
    x, y = (x.float() + 1) / 2, (y.float() + 1) / 2
    c = x.shape[1]
    window = min(window, x.shape[-1], x.shape[-2])
    t = torch.arange(window, dtype=torch.float32) - (window - 1) / 2
    g = torch.exp(-t.square() / (2 * sigma**2))
    g = g / g.sum()  # (window,)
    kernel = (g[:, None] * g[None, :]).expand(c, 1, window, window).to(x.device)

    def blur(v: torch.Tensor) -> torch.Tensor:
        return F.conv2d(v, kernel, groups=c)  # (B, C, H', W')

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)  # (B,)


def lpips_model() -> tuple[Any, str]:
    """LPIPS-VGG with the ImageNet backbone if it loads, else a random one; and which."""
    from vqgen.plugins.vqgan.losses import load_lpips

    try:
        with contextlib.redirect_stdout(sys.stderr):  # torch.hub's download notes
            return load_lpips(True), "VGG16, ImageNet backbone"
    except VqgenError:
        return (load_lpips(False), "random VGG16 backbone (the ImageNet weights could not be "
                "loaded offline): comparable only between runs measured the same way")


def code_usage(codes: torch.Tensor, vocab_size: int) -> dict[str, float]:
    """Fraction of the ``vocab_size`` codes that ``codes`` (any shape) hit, and the
    perplexity of their frequencies."""
    counts = torch.bincount(codes.flatten(), minlength=vocab_size).float()  # (V,)
    p = counts[counts > 0] / counts.sum()
    return {"codebook_usage": float((counts > 0).float().mean()),
            "perplexity": float(torch.exp(-(p * p.log()).sum()))}


def find_classifier(run_dir: Path, explicit: str | os.PathLike[str] | None,
                    config: Any) -> Path | None:
    """The classifier file: ``explicit``, else ``RUN_DIR/classifier.safetensors``, else the
    file the config's rejection sampler names; ``None`` when there is none."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise VqgenError(f"--classifier {path}: no such file")
        return path
    if (run_dir / CLASSIFIER_FILE).is_file():
        return run_dir / CLASSIFIER_FILE
    sampler = getattr(config, "sampler", None)
    named = (sampler.params.get("classifier") if sampler is not None else None)
    if named and Path(named).is_file():
        return Path(named)
    return None


@torch.no_grad()
def class_accuracy(pipe: Any, classifier: torch.nn.Module, per_class: int, seed: int = 0
                   ) -> dict[str, Any]:
    """Sample ``per_class`` images of every class; the classifier's accuracy on them."""
    from vqgen.plugins.judges import accuracy

    n_classes = int(pipe.conditioner.n_classes)
    labels = torch.arange(n_classes).repeat_interleave(per_class)  # (n,)
    images = pipe.generate(len(labels), labels, seed=seed).images  # (n, 3, H, W)
    logits = classifier(images.to(next(classifier.parameters()).device))
    pred = logits.argmax(1).cpu()  # (n,)
    per = [float((pred[labels == c] == c).float().mean()) for c in range(n_classes)]
    return {"class_accuracy": accuracy(classifier, images, labels), "per_class": per,
            "n_samples": len(labels), "images": images}


def rounded(d: dict[str, Any], places: int = 5) -> dict[str, Any]:
    """``d`` with its finite floats (nested in dicts and lists) rounded, in place."""
    for k, v in d.items():
        if isinstance(v, float) and math.isfinite(v):
            d[k] = round(v, places)
        elif isinstance(v, dict):
            rounded(v, places)
        elif isinstance(v, list):
            d[k] = [round(u, places) if isinstance(u, float) else u for u in v]
    return d
