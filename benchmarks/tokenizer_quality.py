#!/usr/bin/env python
"""Tokenizer quality on ``shapes`` 32×32: VQGAN (default vs plain quantizer) and k-means f = 1.

Each variant is trained with vqgen's own stage-1 trainer for a fixed number of
steps (sized so that all of them fit in ≤ 10 minutes on 2 CPU cores), then
evaluated on 512 held-out images (the ``val`` split, never seen in training):

* PSNR (dB; mean over images of 10·log10(1 / MSE) with pixels in [0, 1]),
* LPIPS (VGG; the ImageNet backbone when torchvision can load it, otherwise a
  random backbone — then only relative comparisons between variants mean anything),
* codebook usage (fraction of the codes used on the held-out set) and perplexity,
* encode / decode throughput (images/s, CPU, batches of 128) and training time.

The "plain" quantizer is taming's: no projection, no l2 normalisation, no k-means
initialisation, no dead-code restarts. Both VQGANs share every other setting.

Run: ``.venv/bin/python benchmarks/tokenizer_quality.py`` (``--scale 0.1`` for a
quick smoke run). Prints one JSON object and writes
``benchmarks/results/tokenizer_quality.json``.
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import emit, parser, setup

import vqgen
from vqgen.core.config import parse_config
from vqgen.core.errors import VqgenError
from vqgen.plugins.kmeans import KMeansTokenizer, codebook_stats
from vqgen.plugins.shapes import ShapesDataset
from vqgen.plugins.vqgan import VQGAN
from vqgen.plugins.vqgan.losses import load_lpips
from vqgen.training.engine import train_tokenizer

RESOLUTION = 32
HELD_OUT = 512
THREADS = 2

#: A small f = 4 VQGAN for 32×32 images, sized for CPU minutes (ch 16: GroupNorm over
#: 2 groups keeps 8–16 channels per group, which trains faster than taming's 32 groups).
#: Two departures from taming's defaults, both params of the `vqgan` plugin: an L2 pixel
#: loss (`rec_loss: l2`; it optimises PSNR directly) and commitment β = 0.25 (taming's own
#: VectorQuantizer2 default). Measured at 3200 steps (batch 8, lr 3e-4, cosine, 256 held-out
#: images): L1 22.6 dB, L2 24.5 dB, L2 + β 0.25 24.7 dB.
VQGAN_PARAMS: dict[str, Any] = {
    "ch": 16,
    "ch_mult": [1, 2, 2],
    "num_res_blocks": 1,
    "norm_groups": 2,
    "z_channels": 16,
    "embed_dim": 16,
    "n_embed": 512,
    "codebook_dim": 8,
    "beta": 0.25,
    "rec_loss": "l2",
    "perceptual_weight": 0.0,  # offline the LPIPS backbone would be random: no help to PSNR
    "pretrained_backbone": False,
    "disc_start": 4200,  # a short adversarial phase at the end
    "disc_weight": 0.1,
    "disc_n_layers": 2,
    "disc_ch": 32,
}
PLAIN_QUANTIZER = {"codebook_dim": 0, "l2_normalize": False, "kmeans_init": False,
                   "restart_after": 0}
#: lr 3e-4 with cosine decay to 10 %, not 1e-3: with Adam betas (0.5, 0.9) the taming
#: encoder/decoder at 1e-3 sits on a ~16 dB plateau (mean colours) even without a quantizer
#: (unquantized: 16.1 dB at 600 steps vs 20.7 dB at 3e-4); 6e-4 was also worse (23.4 vs
#: 24.5 dB at 3200 steps, L2). The cosine decay adds ~0.5 dB over a constant rate (24.5 vs
#: 24.0 dB at 3200 steps). Batch 8: more updates per CPU second, which wins in this short
#: budget. Betas (0.9, 0.99) were worse (15.5 vs 17.4 dB at 600 steps).
VQGAN_TRAIN: dict[str, Any] = {
    "steps": 4400, "batch_size": 8, "lr": 3e-4, "lr_schedule": "cosine", "log_every": 100,
    "image_every": 0,
}
KMEANS_PARAMS: dict[str, Any] = {"n_embed": 512, "sample_pixels": 16384}
#: A larger palette, for reference: the K = 512 target is out of reach on this data (see
#: the "notes" of the output).
KMEANS_1024_PARAMS: dict[str, Any] = {"n_embed": 1024, "sample_pixels": 16384}
KMEANS_TRAIN: dict[str, Any] = {"steps": 200, "batch_size": 32, "log_every": 50,
                                "image_every": 0}


#: Context for the targets, measured separately on the same data (see the closing note of
#: the change that added this benchmark).
NOTES = {
    "kmeans_f1": (
        "shapes colours are uniform in the RGB cube, so a global palette of K = 512 leaves "
        "~8 levels per channel (RMS error ~0.036, 28.85 dB). Measured on these 512 held-out "
        "images: the 8x8x8 lattice palette 28.95 dB, Lloyd k-means (30 iterations) on 200k "
        "training pixels 28.37 dB; only a palette fitted to the held-out pixels themselves "
        "(not a valid tokenizer) passes 30 dB (31.8). PSNR >= 30 dB needs a larger palette "
        "(K = 1024 shown)"
    ),
    "vqgan_f4": (
        "references on the same held-out images: unquantized 4x4 patch means give 24.1 dB "
        "(25.2 dB bilinear), k-means on 4x4 patches with 512 codes 22.8 dB. What made the "
        "difference (3200 steps, batch 8, 256 held-out images): the L2 pixel loss (24.5 vs "
        "22.6 dB with L1, both with cosine decay), cosine decay (+0.5 dB), beta 0.25 "
        "(+0.2 dB); the fused SiLU made a step ~30 % cheaper, which bought the extra steps. "
        "Not helpful: lr 1e-3 or 6e-4 (the taming blocks stall or lag at betas 0.5, 0.9), "
        "betas (0.9, 0.99), a 16-dim code space instead of 8 (24.0 dB), a codebook learning "
        "rate 10-30x the rest (+0.1 dB at 600 steps), ch 32 (+0.5 dB at 600 steps for 2x "
        "the cost per step). The quantizer, not the architecture, is what slows learning: "
        "a plain 64-channel conv autoencoder reaches 20.8 dB at 600 steps without a "
        "quantizer and 15.4 dB with one"
    ),
}


def registry() -> vqgen.Registry:
    """The default registry, plus this benchmark's components if not yet registered."""
    reg = vqgen.default_registry().copy()
    for kind, name, cls in [
        ("dataset", "shapes", ShapesDataset),
        ("tokenizer", "vqgan", VQGAN),
        ("tokenizer", "kmeans", KMeansTokenizer),
    ]:
        if name not in reg.list(kind):
            reg.add(kind, name, cls)
    return reg


def held_out() -> torch.Tensor:
    val = ShapesDataset(resolution=RESOLUTION, split="val", length=HELD_OUT)
    return torch.stack([val[i]["image"] for i in range(HELD_OUT)])  # (512, 3, 32, 32)


def perceptual() -> tuple[torch.nn.Module, str]:
    try:
        return load_lpips(pretrained_backbone=True), "VGG16 ImageNet backbone"
    except VqgenError:
        note = ("random VGG16 backbone: the ImageNet weights could not be loaded offline; "
                "LPIPS values are only comparable between these variants")
        return load_lpips(pretrained_backbone=False), note


@torch.no_grad()
def evaluate(tok: Any, x: torch.Tensor, lpips: torch.nn.Module) -> dict[str, float]:
    """Reconstruction quality, code statistics and throughput on held-out images."""
    tok.eval()
    bs = 128
    tok.encode(x[:bs])  # warm-up
    t = time.perf_counter()
    codes = torch.cat([tok.encode(x[i : i + bs]) for i in range(0, len(x), bs)])
    t_enc = time.perf_counter() - t
    t = time.perf_counter()
    recon = torch.cat([tok.decode(codes[i : i + bs]) for i in range(0, len(x), bs)])
    t_dec = time.perf_counter() - t
    recon = recon.clamp(-1, 1)
    mse = ((recon - x) / 2).square().flatten(1).mean(1)  # (N,) in [0, 1] units
    psnr = (10 * torch.log10(1 / mse.clamp_min(1e-10))).mean()
    lp = torch.cat([lpips(x[i : i + bs], recon[i : i + bs]).flatten()
                    for i in range(0, len(x), bs)]).mean()
    usage, perplexity = codebook_stats(codes, tok.vocab_size)
    return {
        "psnr_db": round(float(psnr), 2),
        "lpips": round(float(lp), 4),
        "codebook_usage": round(float(usage), 4),
        "codes_used": int(torch.unique(codes).numel()),
        "perplexity": round(float(perplexity), 1),
        "encode_images_per_s": round(len(x) / t_enc, 1),
        "decode_images_per_s": round(len(x) / t_dec, 1),
    }


def run_variant(
    reg: vqgen.Registry,
    tokenizer: str,
    params: dict[str, Any],
    train: dict[str, Any],
    x: torch.Tensor,
    lpips: torch.nn.Module,
) -> dict[str, Any]:
    cfg = parse_config(
        {
            "data": {"name": "shapes", "params": {"resolution": RESOLUTION, "length": 100_000}},
            "tokenizer": {"name": tokenizer, "params": params},
            "train": {"tokenizer": train},
        },
        registry=reg,
    )
    with tempfile.TemporaryDirectory() as run_dir:
        t = time.perf_counter()
        tok = train_tokenizer(cfg, run_dir, registry=reg, progress=False)
        train_s = time.perf_counter() - t
        last = [json.loads(line) for line in
                (Path(run_dir) / "metrics.jsonl").read_text().splitlines()][-1]
    out = {
        "tokenizer": tokenizer,
        "downsample": tok.downsample,
        "vocab_size": tok.vocab_size,
        "params": cfg.tokenizer.params if tokenizer == "kmeans" else params,
        "train": train,
        "train_s": round(train_s, 1),
        "final_train_metrics": {k: round(v, 5) for k, v in last.items()
                                if isinstance(v, float)},
        **evaluate(tok, x, lpips),
    }
    brief = {k: out[k] for k in ("psnr_db", "codebook_usage", "train_s")}
    print(f"{tokenizer}: {json.dumps(brief)}", file=sys.stderr, flush=True)
    return out


def scaled(train: dict[str, Any], scale: float) -> dict[str, Any]:
    out = dict(train, steps=max(1, round(train["steps"] * scale)))
    if "disc_start" in out:
        out["disc_start"] = round(out["disc_start"] * scale)
    return out


def main() -> None:
    ap = parser(__doc__, "tokenizer_quality")
    ap.set_defaults(threads=THREADS)
    args = ap.parse_args()
    setup(args)  # --out by --scale, --threads (default THREADS)
    t0 = time.perf_counter()
    reg = registry()
    x = held_out()
    lpips, lpips_note = perceptual()
    vq_params = dict(VQGAN_PARAMS, disc_start=round(VQGAN_PARAMS["disc_start"] * args.scale))
    vq_train = scaled(VQGAN_TRAIN, args.scale)
    variants = {
        "vqgan_f4_default_quantizer": run_variant(reg, "vqgan", vq_params, vq_train, x, lpips),
        "vqgan_f4_plain_quantizer": run_variant(
            reg, "vqgan", {**vq_params, **PLAIN_QUANTIZER}, vq_train, x, lpips
        ),
        "kmeans_f1": run_variant(reg, "kmeans", KMEANS_PARAMS,
                                 scaled(KMEANS_TRAIN, args.scale), x, lpips),
        "kmeans_f1_K1024": run_variant(reg, "kmeans", KMEANS_1024_PARAMS,
                                       scaled(KMEANS_TRAIN, args.scale / 2), x, lpips),
    }
    d, p, k = (variants[n] for n in list(variants)[:3])
    targets = {
        "vqgan_default_usage_ge_0.9": d["codebook_usage"] >= 0.9,
        "vqgan_default_usage_ge_2x_plain": d["codebook_usage"] >= 2 * p["codebook_usage"],
        "vqgan_f4_psnr_ge_25": d["psnr_db"] >= 25.0,
        "kmeans_f1_psnr_ge_30": k["psnr_db"] >= 30.0,
    }
    result = {
        "benchmark": "tokenizer_quality",
        "data": f"shapes {RESOLUTION}x{RESOLUTION}; held-out: {HELD_OUT} images of the val split",
        "lpips_backbone": lpips_note,
        "variants": variants,
        "targets": targets,
        "all_targets_met": all(targets.values()),
        "notes": NOTES,
        "total_s": round(time.perf_counter() - t0, 1),
        "scale": args.scale,
        "env": {
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "machine": platform.machine(),
        },
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
