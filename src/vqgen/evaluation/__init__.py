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

This package sits outside :mod:`vqgen.core` because it uses the shipped
classifier and the LPIPS network. By job: :mod:`~vqgen.evaluation.metrics` (measures
of images, codes and samples), :mod:`~vqgen.evaluation.pictures` (condition sheets),
:mod:`~vqgen.evaluation.run` (``vqgen eval``), :mod:`~vqgen.evaluation.demo`
(``make demo``'s report).
"""

from __future__ import annotations

from vqgen.evaluation.demo import demo_report
from vqgen.evaluation.metrics import (
    CLASSIFIER_FILE,
    class_accuracy,
    code_usage,
    find_classifier,
    lpips_model,
    psnr,
    ssim,
)
from vqgen.evaluation.pictures import condition_picture, condition_sheet, held_out_batch
from vqgen.evaluation.run import evaluate_run, prior_nll, tokenizer_metrics

__all__ = [
    "CLASSIFIER_FILE", "class_accuracy", "code_usage", "condition_picture", "condition_sheet",
    "demo_report", "evaluate_run", "find_classifier", "held_out_batch", "lpips_model",
    "prior_nll", "psnr", "ssim", "tokenizer_metrics",
]
