"""``make demo``'s report: sample and reconstruction pictures, and the figures."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from vqgen.core.layout import DEMO_METRICS, DEMO_RECONSTRUCTIONS, DEMO_SAMPLES, METRICS_FILE
from vqgen.evaluation.metrics import CLASSIFIER_FILE, class_accuracy, psnr
from vqgen.evaluation.pictures import registry_of
from vqgen.evaluation.run import prior_nll

_JUDGED_PER_CLASS = 32  # samples per class the judge sees
_HELD_OUT = 256  # held-out images reconstructed and judged


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
    from vqgen.core.images import save_image_grid
    from vqgen.core.io import atomic_write_text
    from vqgen.plugins.judges import accuracy, load_classifier

    run = Path(run_dir)
    t1 = time.time()
    _ensure_judge(pipe, run, classifier_steps)
    classifier_s = time.time() - t1
    clf = load_classifier(run / CLASSIFIER_FILE)
    judged = class_accuracy(pipe, clf, _JUDGED_PER_CLASS, seed=0)
    n_classes = int(pipe.conditioner.n_classes)
    shown = judged["images"].reshape(n_classes, _JUDGED_PER_CLASS, *judged["images"].shape[1:])
    samples = save_image_grid(shown[:, :per_class].flatten(0, 1), run / DEMO_SAMPLES,
                              nrow=per_class)
    held, x, labels, codes, recon = _reconstruct(pipe)
    recons = save_image_grid(torch.cat([x[:8], recon[:8]]), run / DEMO_RECONSTRUCTIONS, nrow=8)
    gain = prior_nll(pipe, run, held)
    metrics = {
        "train_wall_s": round(train_s, 1),
        "classifier_train_s": round(classifier_s, 1),
        "total_wall_s": round(time.time() - started, 1),
        "tokenizer_psnr_db": round(float(psnr(recon, x).mean()), 2),
        "codebook_usage": round(float(torch.unique(codes).numel()) / pipe.tokenizer.vocab_size,
                                4),
        "prior_val_nll_bits": _last_prior_record(run).get("val_nll_bits"),
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
    atomic_write_text(run / DEMO_METRICS, json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))
    print(f"samples: {samples} (one row per class)\nreconstructions: {recons} "
          f"(held-out inputs above reconstructions)\nmetrics: {run / DEMO_METRICS}")
    return metrics


def _ensure_judge(pipe: Any, run: Path, steps: int) -> None:
    """Train the demo's judge into ``run/classifier.safetensors`` unless it is there."""
    from vqgen.plugins.judges import save_classifier
    from vqgen.training.judges import train_classifier

    if (run / CLASSIFIER_FILE).is_file():
        return
    cfg = pipe.config
    data = registry_of(pipe).create("dataset", cfg.data.name, cfg.data.params)
    # augment: trained on real images, softened at random, so that it judges the
    # shapes of samples rather than the crispness of their edges
    save_classifier(train_classifier(data, steps=steps, seed=0, augment=True),
                    run / CLASSIFIER_FILE)


@torch.no_grad()
def _reconstruct(pipe: Any) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor,
                                     torch.Tensor]:
    """The held-out set, its images, labels, codes and reconstructions."""
    cfg = pipe.config
    held = registry_of(pipe).create("dataset", cfg.data.name,
                                    {**cfg.data.params, "split": "val", "length": _HELD_OUT})
    items = [held[i] for i in range(len(held))]  # each rendered once
    x = torch.stack([it["image"] for it in items])  # (256, 3, H, W)
    labels = torch.stack([it["label"] for it in items])  # (256,)
    codes = pipe.tokenizer.encode(x)  # (256, h, w)
    recon = pipe.tokenizer.decode(codes).clamp(-1, 1)  # (256, 3, H, W)
    return held, x, labels, codes, recon


def _last_prior_record(run: Path) -> dict[str, Any]:
    """The last line of ``run/metrics.jsonl`` that the prior stage wrote, or ``{}``."""
    records = [json.loads(r) for r in (run / METRICS_FILE).read_text().splitlines()]
    return next((r for r in reversed(records) if r.get("stage") == "prior"), {})
