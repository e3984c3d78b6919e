#!/usr/bin/env python
"""Held-out NLL of the same GPT trained with each of the six orderings (Appendix F, small).

The paper (Appendix F, Fig. 47) trains one transformer per sequence ordering of the
16×16 code grid and compares their NLL; row-major comes out best. Here, at CPU scale:

* tokens: the small f = 4 VQGAN of ``benchmarks/_common.py``, trained briefly on
  ``shapes`` 32×32 → 8×8 grids of 512 codes; training images and 512 held-out images
  (the ``val`` split) are encoded once into a token cache that every run shares (the
  cache stores grids before the ordering, so one cache serves all six);
* prior: the same GPT for every ordering (2 layers × 128 wide, 4 heads, no dropout,
  unconditional), trained with vqgen's stage-2 trainer for the same fixed budget of
  steps, with the same seed (so the same initial weights and the same batches: only
  the ordering differs): AdamW (0.9, 0.95), lr 1e-3, 5 % warm-up then cosine, batch 32.

Reported per ordering: held-out NLL (nats and bits per token) and the difference to
row-major, with the paper's NLL printed beside for reference. The paper's numbers come
from a large model on large data, so only the ranking is comparable, loosely: with a
short budget, differences of a few hundredths of a nat are within run-to-run noise.

Run: ``.venv/bin/python benchmarks/orderings.py`` (a few minutes of CPU; ``--scale
0.1`` for a smoke run). Prints one JSON object and writes
``benchmarks/results/orderings.json``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (
    TRAIN_IMAGES,
    emit,
    env,
    log,
    parser,
    rounded,
    scaled,
    setup,
    shapes_tokenizer,
    train_prior_run,
    unigram_entropy,
)

NAME = "orderings"
GRID = 8
VOCAB = 512
STEPS = 150
TOKENIZER_STEPS = 300
#: Appendix F's NLL per ordering, in the order the paper lists them.
PAPER_NLL: dict[str, float] = {
    "row_major": 4.767,
    "spiral_out": 4.889,
    "z_curve": 4.810,
    "subsample": 5.015,
    "alternate": 4.812,
    "spiral_in": 4.901,
}
GPT_PARAMS: dict[str, Any] = {
    "vocab_size": VOCAB, "block_size": GRID * GRID, "n_layer": 2, "n_head": 4, "n_embd": 128,
}
TRAIN: dict[str, Any] = {"batch_size": 32, "lr": 1e-3, "seed": 0, "device": "cpu"}


def main() -> None:
    args = parser(__doc__, NAME).parse_args()
    setup(args)
    t0 = time.perf_counter()
    steps = scaled(STEPS, args.scale, minimum=2)
    train = {**TRAIN, "steps": steps, "warmup_steps": max(1, steps // 20), "log_every": steps}
    runs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tok, tok_info = shapes_tokenizer(scaled(TOKENIZER_STEPS, args.scale), work)
        log(f"tokenizer: {tok_info}")
        cache = work / "tokens"
        for ordering in PAPER_NLL:
            runs[ordering] = train_prior_run(
                tok, {"name": "gpt", "params": GPT_PARAMS}, train, cache, ordering=ordering
            )
            log(f"{ordering}: {runs[ordering]}")
        entropy = unigram_entropy(cache)
    base = runs["row_major"]["val_nll_nats"]
    table = {
        o: {
            "val_nll_nats": r["val_nll_nats"],
            "val_nll_bits": r["val_nll_bits"],
            "delta_vs_row_major": r["val_nll_nats"] - base,
            "paper_nll": PAPER_NLL[o],
            "paper_delta_vs_row_major": PAPER_NLL[o] - PAPER_NLL["row_major"],
            "train_s": r["train_s"],
        }
        for o, r in runs.items()
    }
    ours_rank = sorted(runs, key=lambda o: runs[o]["val_nll_nats"])
    paper_rank = sorted(PAPER_NLL, key=PAPER_NLL.__getitem__)
    result = {
        "benchmark": NAME,
        "scale": args.scale,
        "data": f"shapes 32x32 -> 8x8 codes; train: {TRAIN_IMAGES} images, held-out: 512 "
                "val images",
        "tokenizer": tok_info,
        "unigram_entropy": entropy,
        "prior": {"name": "gpt", **GPT_PARAMS, "params": runs["row_major"]["params"]},
        "train": train,
        "orderings": table,
        "rank_ours": ours_rank,
        "rank_paper": paper_rank,
        "row_major_best": ours_rank[0] == "row_major",
        "notes": {
            "budget": "default run: about 3-5 minutes on one core (--threads 1)",
            "paper": "paper values: Appendix F, large transformer on 16x16 codes; only the "
                     "ranking is loosely comparable",
        },
        "total_s": time.perf_counter() - t0,
        "env": env(),
    }
    emit(rounded(result), args.out)


if __name__ == "__main__":
    main()
