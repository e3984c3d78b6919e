"""``vqgen eval``: how good is a trained run? Reconstruction, likelihood, samples.

:func:`evaluate_run` reports, as a JSON-ready dict:

* **tokenizer** on held-out images: PSNR (dB), SSIM (11×11 Gaussian window,
  σ = 1.5, on ``[0, 1]`` images), LPIPS (VGG; with the ImageNet backbone when
  torchvision can load it, otherwise a random backbone, and the output says
  which), codebook usage (fraction of codes hit) and code perplexity;
* **prior**: held-out NLL in nats and bits per token; with a conditioner also the
  NLL when every sample gets the next sample's condition, and the difference,
  ``cond_gain_bits`` (about 0: the prior ignores its condition);
* **samples**: with a class conditioner, the accuracy of a classifier (the one
  shipped in :mod:`vqgen.plugins.judges`, read from a file) on samples
  drawn for every class;
* **FID / IS** through ``torch-fidelity`` when the ``eval`` extra is installed and
  its Inception weights can be loaded; otherwise one line saying what is missing.

This module sits outside :mod:`vqgen.core` because it uses the shipped
classifier and the LPIPS network.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vqgen.core.errors import VqgenError
from vqgen.core.layout import METRICS_FILE, TOKENS_DIR

__all__ = [
    "class_accuracy", "condition_picture", "condition_sheet", "evaluate_run", "find_classifier",
    "prior_nll", "psnr", "run_demo", "ssim",
]

CLASSIFIER_FILE = "classifier.safetensors"


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


def _lpips() -> tuple[Any, str]:
    """LPIPS-VGG with the ImageNet backbone if it loads, else a random one; and which."""
    from vqgen.plugins.vqgan.losses import load_lpips

    try:
        with contextlib.redirect_stdout(sys.stderr):  # torch.hub's download notes
            return load_lpips(True), "VGG16, ImageNet backbone"
    except VqgenError:
        return (load_lpips(False), "random VGG16 backbone (the ImageNet weights could not be "
                "loaded offline): comparable only between runs measured the same way")


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


# label colours of condition_picture for condition inputs with more than 3 channels
_LABEL_COLOURS = torch.tensor(
    [[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
     [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60]], dtype=torch.float32,
) / 127.5 - 1  # (10, 3) in [-1, 1]


def condition_picture(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A spatial conditioner's ``condition_input`` ``[B, C, h, w]`` as RGB ``[B, 3, H, W]``.

    One channel (edges, depth, a pose rendering) is shown in grey, three as they are,
    more (a one-hot label map) as the colour of each pixel's largest channel.
    """
    x = x.detach().float().cpu()
    if x.shape[1] == 1:
        rgb = x.expand(-1, 3, -1, -1)  # (B, 3, h, w)
    elif x.shape[1] == 3:
        rgb = x
    else:
        idx = x.argmax(1) % len(_LABEL_COLOURS)  # (B, h, w)
        rgb = _LABEL_COLOURS[idx].permute(0, 3, 1, 2)  # (B, 3, h, w)
    if tuple(rgb.shape[-2:]) != tuple(size):
        rgb = F.interpolate(rgb, size=size, mode="nearest")  # (B, 3, H, W)
    return rgb.clamp(-1, 1)


@torch.no_grad()
def condition_sheet(pipe: Any, rows: int = 8, per_row: int = 4, seed: int = 0,
                    sampler: Any = None, guidance: float | None = None,
                    held: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Samples of a spatially conditioned run for held-out conditions, laid out as the
    paper's figures: each row is ``condition | per_row samples | the real image``.

    The conditions are the first ``rows`` items of ``held`` (a batch mapping with
    ``"image"`` and whatever the conditioner reads), by default of the run config's
    held-out split. Returns ``[rows * (per_row + 2), 3, H, W]`` for
    ``save_image_grid(..., nrow=per_row + 2)``.
    """
    cond = pipe.conditioner
    if cond is None or not getattr(cond, "spatial", False):
        raise VqgenError("condition_sheet needs a spatially conditioned run")
    if rows < 1 or per_row < 1:
        raise VqgenError(f"rows and per_row must be at least 1, got {rows} and {per_row}")
    if held is None:
        held = _held_out_batch(pipe, rows)
    batch = {k: v[:rows] for k, v in held.items()}
    real = batch["image"].float().cpu()  # (R, 3, H, W)
    r = len(real)
    size = (int(real.shape[-2]), int(real.shape[-1]))
    shown = condition_picture(cond.condition_input(pipe.cond_batch(batch, r)), size)
    repeated = {k: v.repeat_interleave(per_row, 0) for k, v in batch.items()}
    out = pipe.generate(r * per_row, repeated, sampler=sampler, seed=seed, guidance=guidance)
    samples = out.images.float().cpu().clamp(-1, 1).reshape(r, per_row, *real.shape[1:])
    sheet = torch.cat([shown[:, None], samples, real[:, None]], dim=1)  # (R, per_row + 2, ...)
    return sheet.flatten(0, 1)  # (R * (per_row + 2), 3, H, W)


def _registry_of(pipe: Any) -> Any:
    """The registry ``pipe`` was assembled from (the default one for a hand-made pipe)."""
    from vqgen.core.registry import default_registry

    registry = getattr(pipe, "registry", None)
    return registry if registry is not None else default_registry()


def _held_out_batch(pipe: Any, n: int) -> dict[str, torch.Tensor]:
    """The first ``n`` items of the run config's held-out split, stacked per key."""
    from vqgen.core.data import held_out_dataset

    held = held_out_dataset(pipe.config, _registry_of(pipe), n=n)
    if held is None or len(held) == 0:
        raise VqgenError(
            f"the run's data set {pipe.config.data.name!r} has no held-out split to draw "
            "conditions from; pass a condition file with --cond"
        )
    items = [held[i] for i in range(min(n, len(held)))]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def _fid(pipe: Any, held: torch.Tensor, n: int) -> dict[str, Any]:
    """FID / IS through torch-fidelity, or ``{"fid_is": <what is missing>}``."""
    try:
        import torch_fidelity  # type: ignore[import-not-found]
    except ImportError:
        return {"fid_is": "skipped: torch-fidelity is not installed (pip install 'vqgen[eval]')"}
    from vqgen.core.images import save_image_grid

    n_classes = getattr(pipe.conditioner, "n_classes", None)
    cond = torch.arange(n)[:n] % n_classes if n_classes else None
    fake = pipe.generate(n, cond, seed=1).images
    with tempfile.TemporaryDirectory() as tmp:
        for name, images in (("real", held[:n]), ("fake", fake)):
            d = Path(tmp) / name
            d.mkdir()
            for i, im in enumerate(images):
                save_image_grid(im[None], d / f"{i:05d}.png", nrow=1, padding=0)
        try:
            m = torch_fidelity.calculate_metrics(
                input1=str(Path(tmp) / "fake"), input2=str(Path(tmp) / "real"), fid=True,
                isc=True, verbose=False, cuda=torch.cuda.is_available(),
            )
        except Exception as exc:  # noqa: BLE001 - download failures come in many kinds
            return {"fid_is": "skipped: torch-fidelity could not load its Inception weights "
                    f"({type(exc).__name__}); it downloads them on first use, which needs "
                    "network access"}
    return {"fid": m.get("frechet_inception_distance"),
            "inception_score": m.get("inception_score_mean"), "fid_is_samples": n}


@torch.no_grad()
def evaluate_run(
    pipe: Any,
    run_dir: str | os.PathLike[str],
    *,
    n: int = 512,
    per_class: int = 32,
    classifier: str | os.PathLike[str] | None = None,
    fid_samples: int = 0,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate the trained ``pipe`` of run directory ``run_dir`` (loaded by
    :func:`vqgen.runs.load_run`; see the module docstring); a JSON-ready dict.

    ``n`` held-out images for the tokenizer, ``per_class`` samples per class for
    the class accuracy, ``fid_samples`` > 0 to try FID / IS.
    """
    from vqgen.core.data import held_out_dataset

    run = Path(run_dir)
    config = pipe.config  # type: ignore[attr-defined]
    reg = _registry_of(pipe)
    held = held_out_dataset(config, reg, n)
    if held is None:
        raise VqgenError(
            f"dataset {config.data.name!r} has no held-out data (no 'split' param, or an "
            "empty held-out split), so there is nothing to evaluate on; for a folder, add "
            "root/val/<class>/ images or set data.params.held_out above 0"
        )
    out: dict[str, Any] = {"run_dir": str(run), "held_out_samples": len(held)}
    tok = pipe.tokenizer
    key = config.train.tokenizer.input_key or getattr(tok, "input_key", "image")
    x = torch.stack([held[i][key] for i in range(len(held))])  # (N, C, H, W)
    codes = torch.cat([tok.encode(x[i : i + 64]) for i in range(0, len(x), 64)])  # (N, h, w)
    counts = torch.bincount(codes.flatten(), minlength=tok.vocab_size).float()  # (V,)
    p = counts / counts.sum()
    tok_metrics: dict[str, Any] = {
        "codebook_usage": float((counts > 0).float().mean()),
        "perplexity": float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum())),
    }
    if x.is_floating_point() and x.shape[1] in (1, 3):
        recon = torch.cat([tok.decode(codes[i : i + 64]) for i in range(0, len(x), 64)])
        recon = recon.clamp(-1, 1)  # (N, C, H, W)
        lpips_model, backbone = _lpips()
        d = torch.cat([lpips_model(x[i : i + 64], recon[i : i + 64]).flatten()
                       for i in range(0, len(x), 64)])
        tok_metrics.update(
            psnr_db=float(psnr(recon, x).mean()), ssim=float(ssim(recon, x).mean()),
            lpips=float(d.mean()), lpips_backbone=backbone,
        )
    out["tokenizer"] = tok_metrics
    if pipe.prior is not None:
        out["prior"] = prior_nll(pipe, run, held, progress)
        if getattr(pipe.conditioner, "n_classes", None) and pipe.conditioner.spatial is False:
            path = find_classifier(run, classifier, config)
            if path is None:
                data = json.dumps(config.data.params)
                out["samples"] = {"class_accuracy": None, "note": (
                    f"no classifier: train one with `python -m vqgen.training.judges --data "
                    f"{config.data.name} --data-params '{data}' --augment --out "
                    f"{run / CLASSIFIER_FILE}` (or pass --classifier FILE)")}
            else:
                from vqgen.plugins.judges import load_classifier

                acc = class_accuracy(pipe, load_classifier(path), per_class, seed)
                acc.pop("images")
                out["samples"] = {**acc, "classifier": str(path)}
        if fid_samples > 0 and x.shape[1] == 3:
            out["fid_is"] = _fid(pipe, x, fid_samples)
    else:
        out["prior"] = None
    _round(out)
    return out


def prior_nll(pipe: Any, run: Path, held: Any, progress: bool = False) -> dict[str, float]:
    """Held-out NLL of ``pipe``'s prior on ``held`` (tokens cached under ``run/tokens``);
    for a masked prior its masked-token cross-entropy, named so (``val_masked_ce_*``).

    With a conditioner it adds the NLL with mismatched conditions and
    ``cond_gain_bits``, how much the prior uses its condition
    (:func:`vqgen.training.objectives.prior.condition_gain`).
    """
    from vqgen.training.objectives.prior import condition_gain, token_nll
    from vqgen.training.tokens import TokenCache

    config = pipe.config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cache = TokenCache.build(
            run / TOKENS_DIR, held, pipe.tokenizer, pipe.conditioner,
            data={"data": config.data.model_dump(mode="json"), "split": "val", "n": len(held)},
            progress=progress,
        )
    name = pipe.prior.loss_name  # nll, or a masked prior's masked_ce: never called an NLL
    if pipe.conditioner is None:
        return {f"val_{k}": v for k, v in token_nll(pipe, cache).items()}
    gain = condition_gain(pipe, cache)
    return {f"val_{name}_nats": gain[f"val_{name}_bits"] * math.log(2), **gain}


def _round(d: dict[str, Any]) -> None:
    for k, v in d.items():
        if isinstance(v, float) and math.isfinite(v):
            d[k] = round(v, 5)
        elif isinstance(v, dict):
            _round(v)
        elif isinstance(v, list):
            d[k] = [round(u, 5) if isinstance(u, float) else u for u in v]


def demo_report(pipe: Any, run_dir: str | os.PathLike[str], *, train_s: float,
                started: float, per_class: int = 8,
                classifier_steps: int = 800) -> dict[str, Any]:
    """``make demo``'s pictures and figures for the trained ``pipe`` of ``run_dir``.

    Writes ``samples.png`` (one row per class), ``reconstructions.png`` (held-out
    inputs above their reconstructions) and ``metrics.json`` (wall time, PSNR,
    codebook usage, held-out NLL, how much the prior uses the label
    (``prior_cond_gain_bits``), and the class accuracy of 32 samples per class
    judged by a classifier trained on real images with random blur / down-up sampling /
    noise (``train_classifier(augment=True)``), kept as ``classifier.safetensors``).
    ``train_s`` is the training time and ``started`` (``time.time()``) when it began.
    """
    import json
    import time

    from vqgen.core.images import save_image_grid
    from vqgen.core.io import atomic_write_text
    from vqgen.plugins.judges import accuracy, load_classifier, save_classifier
    from vqgen.training.judges import train_classifier

    run = Path(run_dir)
    t0 = started
    cfg = pipe.config  # type: ignore[attr-defined]
    reg = _registry_of(pipe)
    t1 = time.time()
    if not (run / CLASSIFIER_FILE).is_file():
        data = reg.create("dataset", cfg.data.name, cfg.data.params)
        # augment: trained on real images, softened at random, so that it judges the
        # shapes of samples rather than the crispness of their edges
        save_classifier(train_classifier(data, steps=classifier_steps, seed=0, augment=True),
                        run / CLASSIFIER_FILE)
    classifier_s = time.time() - t1
    clf = load_classifier(run / CLASSIFIER_FILE)
    judged = class_accuracy(pipe, clf, 32, seed=0)
    n_classes = int(pipe.conditioner.n_classes)
    shown = judged["images"].reshape(n_classes, 32, *judged["images"].shape[1:])
    samples = save_image_grid(shown[:, :per_class].flatten(0, 1), run / "samples.png",
                              nrow=per_class)
    held = reg.create("dataset", cfg.data.name, {**cfg.data.params, "split": "val",
                                                  "length": 256})
    items = [held[i] for i in range(len(held))]  # each rendered once
    x = torch.stack([it["image"] for it in items])  # (256, 3, H, W)
    labels = torch.stack([it["label"] for it in items])  # (256,)
    with torch.no_grad():
        codes = pipe.tokenizer.encode(x)  # (256, h, w)
        recon = pipe.tokenizer.decode(codes).clamp(-1, 1)  # (256, 3, H, W)
    recons = save_image_grid(torch.cat([x[:8], recon[:8]]), run / "reconstructions.png", nrow=8)
    gain = prior_nll(pipe, run, held)
    records = [json.loads(r) for r in (run / METRICS_FILE).read_text().splitlines()]
    last_prior = next((r for r in reversed(records) if r.get("stage") == "prior"), {})
    metrics = {
        "train_wall_s": round(train_s, 1),
        "classifier_train_s": round(classifier_s, 1),
        "total_wall_s": round(time.time() - t0, 1),
        "tokenizer_psnr_db": round(float(psnr(recon, x).mean()), 2),
        "codebook_usage": round(float(torch.unique(codes).numel()) / pipe.tokenizer.vocab_size,
                                4),
        "prior_val_nll_bits": last_prior.get("val_nll_bits"),
        # held-out bits/token with the next image's label minus with its own (256 images)
        "prior_cond_gain_bits": round(gain.get("cond_gain_bits", 0.0), 5),
        "sample_class_accuracy": round(judged["class_accuracy"], 4),
        "sample_class_accuracy_per_class": [round(a, 3) for a in judged["per_class"]],
        # the judge on 256 held-out images and on their reconstructions: the ceiling
        "real_class_accuracy": round(accuracy(clf, x, labels), 4),
        "reconstruction_class_accuracy": round(accuracy(clf, recon, labels), 4),
        "samples_judged": judged["n_samples"],
        "samples": str(samples),
        "reconstructions": str(recons),
    }
    atomic_write_text(run / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))
    print(f"samples: {samples} (one row per class)\nreconstructions: {recons} "
          f"(held-out inputs above reconstructions)\nmetrics: {run / 'metrics.json'}")
    return metrics
