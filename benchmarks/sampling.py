#!/usr/bin/env python
"""Sliding-window generation cost per token as the canvas grows (Fig. 3 synthesis).

A GPT prior for a 16×16 latent grid (2 layers × 128 wide, 4 heads, 512 codes,
``block_size`` 256) samples canvases of 16×16, 32×32 and 32×64 latents through
``Pipeline.generate(size=...)`` with a top-k (k = 100) sampler, batch 2, fixed seed.
Beyond the training grid every token is predicted by one forward pass over a 16×16
window that contains it (clamped at the borders), so the cost per token should stay
flat and the total cost grow linearly with the number of tokens.

* ``sliding``: ms per token position (one position of all samples in the batch) on
  each canvas. The 16×16 canvas equals the training grid, where ``generate`` takes the
  KV-cached path instead; to measure the window cost there too, the 16×16 entry calls
  the pipeline's sliding sampler directly (``Pipeline._sample_sliding``, the code path
  ``generate`` uses for the larger canvases). ``ratio_max_min`` is the flatness figure;
  the target is <= 1.25.
* ``generate``: ms per token of the public ``Pipeline.generate`` on each canvas (16×16:
  the KV-cached path, shown for scale; the larger ones: the sliding window).

The prior is only initialised, not trained: the cost of a forward pass does not depend
on the weights. The tokenizer is the f = 1 k-means one (unfitted), so that decoding the
codes (a palette lookup) adds next to nothing and canvases in pixels equal latents.

Run: ``.venv/bin/python benchmarks/sampling.py`` (2-4 minutes on one core; ``--scale
0.1`` for a smoke run). Prints one JSON object and writes
``benchmarks/results/sampling.json``.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from _common import emit, env, log, parser, rounded, scaled, setup

from vqgen.core.pipeline import Pipeline
from vqgen.plugins.gpt import GPT
from vqgen.plugins.kmeans import KMeansTokenizer
from vqgen.samplers.top_k import TopK

NAME = "sampling"
SEED = 0
GRID = (16, 16)
CANVASES = [(16, 16), (32, 32), (32, 64)]
BATCH = 2
VOCAB = 512
GPT_PARAMS: dict[str, Any] = {
    "vocab_size": VOCAB, "block_size": GRID[0] * GRID[1], "n_layer": 2, "n_head": 4,
    "n_embd": 128,
}
TARGET_RATIO = 1.25


def main() -> None:
    args = parser(__doc__, NAME).parse_args()
    setup(args)
    t0 = time.perf_counter()
    repeats = scaled(3, args.scale)
    torch.manual_seed(SEED)
    tokenizer = KMeansTokenizer(n_embed=VOCAB).eval()
    prior = GPT(**GPT_PARAMS).eval()
    sampler = TopK(k=100)
    pipe = Pipeline(tokenizer, prior, grid=GRID, sampler=sampler).eval()
    pipe.generate(BATCH, seed=SEED)  # warm-up: the cached path and the window forward
    with torch.no_grad():
        for _ in range(3):
            prior.logits(torch.zeros(BATCH, GRID[0] * GRID[1], dtype=torch.long))

    # --scale shrinks the wider canvases (never below the window) for smoke runs
    canvases = [(h, w if w <= GRID[1] else max(GRID[1], round(w * min(1.0, 4 * args.scale))))
                for h, w in CANVASES]

    def run_generate(h: int, w: int) -> None:
        out = pipe.generate(BATCH, size=(h, w), seed=SEED)
        assert out.codes.shape == (BATCH, h, w)

    def run_sliding(h: int, w: int) -> None:
        g = torch.Generator().manual_seed(SEED)
        # the sliding-window sampler that generate() uses beyond the training grid
        codes = pipe._sample_sliding(prior, BATCH, h, w, None, sampler, g, None)
        assert codes.shape == (BATCH, h, w)

    # (name, canvas, fn); repeats are interleaved so that load changes hit every canvas
    canvases = list(dict.fromkeys(canvases))
    jobs = [("generate", (h, w), run_generate) for h, w in canvases]
    jobs.insert(1, ("sliding", GRID, run_sliding))
    times: dict[tuple[str, tuple[int, int]], list[float]] = {(n, c): [] for n, c, _ in jobs}
    for r in range(repeats):
        for name, (h, w), fn in jobs:
            t = time.perf_counter()
            fn(h, w)
            times[(name, (h, w))].append(time.perf_counter() - t)
        log(f"repeat {r + 1}/{repeats}: "
            + ", ".join(f"{n} {h}x{w} {v[-1]:.1f}s" for (n, (h, w)), v in times.items()))

    def entry(name: str, h: int, w: int) -> dict[str, Any]:
        ts = times[(name, (h, w))]
        med = statistics.median(ts)
        return {"tokens": h * w, "ms_per_token": 1000 * med / (h * w), "total_s": med,
                "times_s": [round(t, 3) for t in ts]}

    generate = {f"{h}x{w}": {**entry("generate", h, w),
                             "path": "kv_cache" if (h, w) == GRID else "sliding_window"}
                for h, w in canvases}
    sliding = {f"{h}x{w}": entry("sliding" if (h, w) == GRID else "generate", h, w)
               for h, w in canvases}
    per_token = [v["ms_per_token"] for v in sliding.values()]
    ratio = max(per_token) / min(per_token)
    result = {
        "benchmark": NAME,
        "scale": args.scale,
        "prior": {"name": "gpt", **GPT_PARAMS, "trained": False,
                  "params": sum(p.numel() for p in prior.parameters())},
        "training_grid": list(GRID),
        "batch": BATCH,
        "sampler": {"name": "top_k", "k": 100},
        "repeats": repeats,
        "sliding": sliding,
        "generate": generate,
        "ratio_max_min": ratio,
        "kv_cache_vs_sliding_at_16x16": (
            sliding[f"{GRID[0]}x{GRID[1]}"]["ms_per_token"]
            / generate[f"{GRID[0]}x{GRID[1]}"]["ms_per_token"]
        ),
        "targets": {"per_token_flat_ratio_le_1.25": ratio <= TARGET_RATIO},
        "notes": {
            "budget": "default run: about 2-4 minutes on one core (--threads 1)",
            "untrained": "the prior is initialised, not trained: cost does not depend on the "
                         "weights",
            "per_token": "ms per token position; each position draws one token for each of "
                         f"the {BATCH} samples",
        },
        "total_s": time.perf_counter() - t0,
        "env": env(),
    }
    result["all_targets_met"] = all(result["targets"].values())
    emit(rounded(result), args.out)


if __name__ == "__main__":
    main()
