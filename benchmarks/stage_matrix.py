#!/usr/bin/env python
"""Stage matrix: tokenizer {vqgan, fsq, lfq} × prior {gpt, pixelsnail, maskgit}, side by
side on the same data, class-conditional, at an equal CPU-time budget per prior.

For each **data setting** (``demo``: ``configs/demo.yaml``'s one red shape on grey with
its 64-code budget; ``default``: today's textured ``shapes`` with 512 codes):

1. **Tokenizers** at an equal code count, the same network, loss and steps (the small
   f = 4 VQGAN of ``conditioning.py``: L2 pixel loss, lr 3e-4 cosine, batches of 8), only
   the quantizer differs: ``vqgan`` (codebook, ``n_embed``), ``fsq`` (levels [4, 4, 4] =
   64, [8, 8, 8] = 512), ``lfq`` (6 / 9 bits). No k-means init or restarts for fsq / lfq.
   Reported: held-out PSNR (512 ``val`` images) and codebook usage (codes used on them /
   vocabulary), and the class judge's accuracy on the reconstructions (the ceiling).
2. **Priors**, class-conditional with condition dropout 0.1 (for guidance), each trained
   by ``train_prior`` for as many steps as fit **the same CPU-time budget**
   (``--prior-cpu-s``; the per-step CPU time is measured by two short calibration runs,
   10 and 30 steps, whose difference cancels fixed costs): ``gpt`` (3 layers, 4 heads,
   width 96, class added at every position), ``pixelsnail`` (channels matched to the
   GPT's parameter count), ``maskgit`` (the same transformer size, bidirectional,
   T = 8 rounds). Reported: held-out loss in bits per token, named as it is (``nll``:
   autoregressive; ``masked_ce``: the masked prior's cross-entropy on masked cells — not a
   likelihood, not comparable with an NLL), steps, CPU seconds.
3. **Samples**: 64 per cell (16 per class), top-k 20, at guidance 1 and 2, judged by the
   same classifier as ``make demo`` (``train_classifier(augment=True)``, 800 steps, on the
   setting's real training images): accuracy overall and of the worst class; **closure**
   ``(accuracy − chance) / (reconstruction accuracy − chance)`` with chance = 1/4 (no
   unconditional twins here; ``conditioning.py``'s closure uses twins).
4. **Sampling speed**: ms per image (2 threads, idle machine) of each prior architecture
   at 8×8 and 16×16 latents, in batches of 1 (latency) and 16 (throughput); the 16×16
   priors are untrained (speed does not depend on the weights); GPT with its KV cache,
   PixelSNAIL re-running its causal network per token, maskgit in 8 rounds.
5. **Pictures**: ``stage_matrix_<setting>.png`` beside the JSON, one row of 8 samples (2
   per class, guidance 2) per cell, rows in the order of ``cells``.

Budget: ≤ 45 min on 2 idle cores at ``--scale 1``; ``--scale 0.05`` is a smoke run.
Run: ``.venv/bin/python benchmarks/stage_matrix.py --threads 2``.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from _common import LN2, RESOLUTION, TRAIN_IMAGES, emit, env, log, parser, rounded, scaled, setup
from conditioning import IMAGE_TOKENIZER, InMemory, data_settings, psnr, stacked

from vqgen.core.config import parse_config
from vqgen.core.data import held_out_dataset
from vqgen.core.images import save_image_grid
from vqgen.core.interfaces import Decoding
from vqgen.core.registry import default_registry
from vqgen.plugins.judges import accuracy
from vqgen.training.judges import train_classifier
from vqgen.training.stages import train_prior, train_tokenizer

NAME = "stage_matrix"
SEED = 0
TOKENIZERS = ("vqgan", "fsq", "lfq")
PRIORS = ("gpt", "pixelsnail", "maskgit")
N_CLASSES = 4
CHANCE = 1.0 / N_CLASSES
TOKENIZER_TRAIN: dict[str, Any] = {
    "steps": 1600, "batch_size": 8, "lr": 3e-4, "lr_schedule": "cosine", "log_every": 200,
    "image_every": 0, "seed": SEED, "device": "cpu", "keep_last": 0, "keep_best": False,
}
PRIOR_TRAIN: dict[str, Any] = {
    "batch_size": 16, "lr": 2e-3, "warmup_steps": 30, "seed": SEED, "device": "cpu",
    "keep_last": 0, "keep_best": False, "cond_dropout": 0.1, "image_every": 0,
}
BUDGET = {"prior_cpu_s": 75.0}  # CPU seconds of training per prior, at --scale 1
GPT: dict[str, Any] = {"n_layer": 3, "n_head": 4, "n_embd": 96, "cond_fusion": "add"}
MASKGIT: dict[str, Any] = {"n_layer": 3, "n_head": 4, "n_embd": 96, "dropout": 0.1,
                           "steps": 8}
SAMPLER: dict[str, Any] = {"name": "top_k", "params": {"k": 20}}
PER_CLASS = 16
CLASSIFIER_STEPS = 800
HELD = 512


def quantizer_params(name: str, codes: int) -> dict[str, Any]:
    """The tokenizer ``name`` with ``codes`` codes: the shared network, its quantizer."""
    net = {k: v for k, v in IMAGE_TOKENIZER.items()
           if k not in ("n_embed", "embed_dim", "codebook_dim", "beta", "kmeans_init")}
    if name == "vqgan":
        return {**IMAGE_TOKENIZER, "n_embed": codes}
    bits = int(math.log2(codes))
    if name == "fsq":
        return {**net, "levels": [round(codes ** (1 / 3))] * 3}  # 64: [4,4,4]; 512: [8,8,8]
    return {**net, "codebook_bits": bits}


def prior_spec(name: str, pixelsnail_channels: int) -> dict[str, Any]:
    if name == "gpt":
        return {"name": "gpt", "params": GPT}
    if name == "maskgit":
        return {"name": "maskgit", "params": MASKGIT}
    return {"name": "pixelsnail", "params": {"channels": pixelsnail_channels, "n_head": 4}}


def config(data: Mapping[str, Any], tok: str, codes: int, prior: dict[str, Any] | None,
           tok_steps: int, prior_steps: int = 2) -> Any:
    spec: dict[str, Any] = {
        "data": {"name": "shapes", "params": dict(data)},
        "tokenizer": {"name": tok, "params": quantizer_params(tok, codes)},
        "conditioner": {"name": "class", "params": {"n_classes": N_CLASSES, "null_token": True}},
        "ordering": {"name": "row_major"},
        "sampler": SAMPLER,
        "train": {"tokenizer": {**TOKENIZER_TRAIN, "steps": tok_steps},
                  "prior": {**PRIOR_TRAIN, "steps": prior_steps, "log_every": prior_steps}},
    }
    if prior is not None:
        spec["prior"] = prior
    return parse_config(spec)


def cpu() -> float:
    return time.process_time()


@torch.no_grad()
def tokenizer_quality(tok: Any, held: Mapping[str, torch.Tensor], judge: Any
                      ) -> dict[str, Any]:
    x = held["image"]
    codes = torch.cat([tok.encode(x[i:i + 128]) for i in range(0, len(x), 128)])
    recon = torch.cat([tok.decode(codes[i:i + 128]) for i in range(0, len(x), 128)])
    counts = torch.bincount(codes.reshape(-1), minlength=tok.vocab_size).double()
    p = counts[counts > 0] / counts.sum()
    acc = accuracy(judge, recon.clamp(-1, 1), held["label"])
    return {"vocab_size": tok.vocab_size,
            "psnr_db": psnr((recon.clamp(-1, 1) + 1) / 2, (x + 1) / 2),
            "usage": float((counts > 0).float().mean()),
            "perplexity": float(torch.exp(-(p * p.log()).sum())),
            "recon_class_accuracy": acc}


def train_calibrated(cfg_of: Any, tok: Any, cond: Any, root: Path, budget_s: float
                     ) -> tuple[Any, dict[str, Any]]:
    """Train a prior for as many steps as fit ``budget_s`` CPU seconds."""
    times = {}
    for n in (10, 30):
        t = cpu()
        train_prior(cfg_of(n), tok, cond, None, progress=False, cache_root=root)
        times[n] = cpu() - t
    # the difference cancels fixed costs (cache, held-out loss); noise can make it tiny or
    # negative, so it is bounded below by a quarter of the 30-step run's mean step
    per_step = max((times[30] - times[10]) / 20, times[30] / 30 / 4)
    steps = max(10, int(budget_s / per_step))
    with tempfile.TemporaryDirectory() as run:
        t = cpu()
        pipe = train_prior(cfg_of(steps), tok, cond, run, progress=False, cache_root=root)
        spent = cpu() - t
        last = [json.loads(line) for line in
                (Path(run) / "metrics.jsonl").read_text().splitlines()][-1]
    name = pipe.prior.loss_name
    return pipe.eval(), {
        "steps": steps, "cpu_s_per_step": per_step, "cpu_s": spent,
        "params": sum(p.numel() for p in pipe.prior.parameters()),
        "loss_name": name, f"val_{name}_bits": last.get(f"val_{name}_bits"),
    }


@torch.no_grad()
def sample_scores(pipe: Any, judge: Any, guidance: float) -> tuple[dict[str, Any], Any]:
    labels = torch.arange(N_CLASSES).repeat_interleave(PER_CLASS)  # (n,)
    g = pipe.generate(len(labels), labels, seed=SEED, guidance=guidance, batch_size=32)
    images = g.images.clamp(-1, 1)
    per_class = [accuracy(judge, images[labels == c], labels[labels == c])
                 for c in range(N_CLASSES)]
    return {"accuracy": sum(per_class) / N_CLASSES, "worst_class": min(per_class),
            "per_class": per_class}, images


@torch.no_grad()
def sampling_ms(prior_name: str, side: int, vocab: int, pixelsnail_channels: int,
                b: int) -> float:
    """ms per image to decode a ``side × side`` grid in batches of ``b``, class-conditional
    (median of 3 after a warm-up)."""
    reg = default_registry()
    spec = prior_spec(prior_name, pixelsnail_channels)
    params = {**spec["params"], "vocab_size": vocab, "cond_vocab_size": N_CLASSES + 1}
    if prior_name == "gpt":
        params["block_size"] = side * side
    else:
        params.update(height=side, width=side)
    if prior_name == "pixelsnail":
        params["cond_spatial"] = False
    torch.manual_seed(SEED)
    prior = reg.create("prior", prior_name, params).eval()
    sampler = reg.create("sampler", SAMPLER["name"], SAMPLER["params"])
    cond = torch.full((b, 1), vocab, dtype=torch.long)  # class 0, offset
    request = Decoding(batch_size=b, length=side * side, sampler=sampler, cond=cond,
                       generator=torch.Generator().manual_seed(SEED))
    prior.decode(request)  # warm-up
    times = []
    for _ in range(3):
        t = time.perf_counter()
        prior.decode(request)
        times.append(time.perf_counter() - t)
    return 1000 * sorted(times)[1] / b


def run_setting(setting: str, scale: float, pictures: Path) -> dict[str, Any]:
    extra, tok_setting = data_settings()[setting]
    codes = int(tok_setting.get("n_embed", 512))
    data = {"resolution": RESOLUTION, "length": scaled(TRAIN_IMAGES, min(scale, 1.0), 256),
            "seed": SEED, **extra}
    tok_steps = scaled(TOKENIZER_TRAIN["steps"], scale, minimum=4)
    budget = BUDGET["prior_cpu_s"] * scale
    base = config(data, "vqgan", codes, None, tok_steps)
    registry = default_registry()
    train_set = stacked(registry.create("dataset", "shapes", base.data.params))
    held_ds = held_out_dataset(base, registry, scaled(HELD, min(scale * 4, 1.0), 64))
    held = stacked(held_ds)
    t = cpu()
    judge = train_classifier(InMemory(train_set), steps=scaled(CLASSIFIER_STEPS, scale, 20),
                             seed=SEED, progress=False, augment=True)
    judge_cpu = cpu() - t
    out: dict[str, Any] = {"data": data, "codes": codes, "judge_cpu_s": judge_cpu,
                           "judge_real_accuracy": accuracy(judge, held["image"],
                                                           held["label"]),
                           "tokenizers": {}, "cells": {}}
    rows = []
    with tempfile.TemporaryDirectory() as work:
        work_p = Path(work)
        from _common import match_pixelsnail

        gpt_params = sum(p.numel() for p in registry.create(
            "prior", "gpt", {**GPT, "vocab_size": codes, "cond_vocab_size": N_CLASSES + 1,
                             "block_size": 64}).parameters())
        channels, _ = match_pixelsnail(gpt_params, 8, 8, codes, 4)
        out["pixelsnail_channels"] = channels
        for tok_name in TOKENIZERS:
            log(f"[{setting}] tokenizer {tok_name}")
            cfg = config(data, tok_name, codes, None, tok_steps)
            t = cpu()
            tok = train_tokenizer(cfg, work_p / f"tok_{tok_name}", progress=False).eval()
            quality = tokenizer_quality(tok, held, judge)
            quality["cpu_s"] = cpu() - t
            out["tokenizers"][tok_name] = quality
            for prior_name in PRIORS:
                log(f"[{setting}] {tok_name} × {prior_name}")
                cond = registry.create("conditioner", "class",
                                       {"n_classes": N_CLASSES, "null_token": True})
                spec = prior_spec(prior_name, channels)

                def cfg_of(n: int, _spec: dict[str, Any] = spec,
                           _tok: str = tok_name) -> Any:
                    return config(data, _tok, codes, _spec, tok_steps, n)

                pipe, info = train_calibrated(cfg_of, tok, cond, work_p / "cache", budget)
                cell: dict[str, Any] = {"prior": info}
                for guidance in (1.0, 2.0):
                    scores, images = sample_scores(pipe, judge, guidance)
                    ceiling = quality["recon_class_accuracy"] - CHANCE
                    scores["closure"] = (scores["accuracy"] - CHANCE) / ceiling \
                        if ceiling > 0 else None
                    cell[f"guidance_{guidance:g}"] = scores
                    if guidance == 2.0:
                        pick = torch.cat([images[c * PER_CLASS: c * PER_CLASS + 2]
                                          for c in range(N_CLASSES)])
                        rows.append(pick)
                out["cells"][f"{tok_name}+{prior_name}"] = cell
    save_image_grid(torch.cat(rows), pictures / f"{NAME}_{setting}.png", nrow=8)
    out["picture"] = f"{NAME}_{setting}.png"
    out["rows"] = list(out["cells"])
    return out


def main() -> None:
    ap = parser(__doc__, NAME)
    ap.add_argument("--data", choices=["demo", "default", "both"], default="both")
    ap.add_argument("--prior-cpu-s", type=float, default=BUDGET["prior_cpu_s"],
                    help="CPU seconds of training per prior at --scale 1")
    args = ap.parse_args()
    setup(args)
    BUDGET["prior_cpu_s"] = args.prior_cpu_s
    t0, c0 = time.perf_counter(), cpu()
    settings = ["demo", "default"] if args.data == "both" else [args.data]
    result: dict[str, Any] = {"benchmark": NAME, "scale": args.scale, "env": env(),
                              "prior_cpu_s": args.prior_cpu_s * args.scale, "settings": {}}
    pictures = args.out.parent
    pictures.mkdir(parents=True, exist_ok=True)
    for setting in settings:
        result["settings"][setting] = run_setting(setting, args.scale, pictures)
    speed = {}
    ch = result["settings"][settings[0]]["pixelsnail_channels"]
    for b in (1, 16):
        for side in (8, 16):
            for prior_name in PRIORS:
                speed[f"{prior_name}_{side}x{side}_batch{b}"] = sampling_ms(
                    prior_name, side, 512, ch, b)
    result["sampling_ms_per_image"] = speed
    result["wall_s"], result["cpu_s"] = time.perf_counter() - t0, cpu() - c0
    result["notes"] = {
        "loss": "val_nll_bits: exact NLL of an AR prior; val_masked_ce_bits: maskgit's "
                "cross-entropy on masked cells under a fixed mask stream, not a likelihood",
        "closure": "(accuracy - 1/4) / (reconstruction accuracy - 1/4), guidance as named",
        "bits": f"log2 units; 1 nat = {1 / LN2:.4f} bits",
    }
    emit(rounded(result), args.out)


if __name__ == "__main__":
    main()
