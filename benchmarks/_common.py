"""Helpers shared by the prior and sampling benchmarks (not a benchmark itself).

``run_all.py`` runs every ``benchmarks/*.py`` but itself, this module included: run
as a script it prints ``{"skipped": true, ...}`` and exits 0.

What lives here:

* :func:`parser` / :func:`setup` — the ``--scale``, ``--out`` and ``--threads`` flags
  every script takes, and the thread setting;
* :func:`timed` — the median (and all values) of repeated wall-clock timings;
* :func:`env` — torch / Python / CPU / threads, for the output;
* :func:`emit` — write ``benchmarks/results/<name>.json`` (``results/smoke/`` for a
  ``--scale`` other than 1, see :func:`default_out`) and print the JSON;
* :func:`shapes_tokenizer` — a small f = 4 VQGAN for 32×32 ``shapes``, trained briefly
  with vqgen's own stage-1 trainer (the tokens the prior benchmarks train on);
* :func:`prior_config` / :func:`train_prior_run` — one stage-2 run with vqgen's own
  trainer on the cached tokens of that tokenizer, returning held-out NLL and time;
* :func:`match_pixelsnail` — PixelSNAIL channels that match a parameter count.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vqgen.training.engine import train_prior, train_tokenizer

RESULTS = Path(__file__).parent / "results"
LN2 = math.log(2.0)

# -----------------------------------------------------------------------------
# command line, environment, output


def parser(doc: str | None, name: str) -> argparse.ArgumentParser:
    """The flags every benchmark takes: ``--scale``, ``--out``, ``--threads``."""
    ap = argparse.ArgumentParser(description=(doc or name).strip().splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiply the step / token / repeat budgets (e.g. 0.1 for a smoke run)")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"where the JSON result is written (default: {default_out(name, 1.0)}; "
                    f"runs with --scale other than 1 go to {default_out(name, 0.5)})")
    ap.set_defaults(benchmark=name)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads (0: torch's default for this machine)")
    return ap


def default_out(name: str, scale: float) -> Path:
    """Where a result goes: ``results/<name>.json`` at full scale, else ``results/smoke/``.

    So a smoke run never overwrites the stored full-scale result.
    """
    return RESULTS / f"{name}.json" if scale == 1.0 else RESULTS / "smoke" / f"{name}.json"


def setup(args: argparse.Namespace) -> None:
    """Apply ``--threads``; resolve the default ``--out`` for this ``--scale``."""
    if args.out is None:
        args.out = default_out(args.benchmark, args.scale)
    if args.threads > 0:
        torch.set_num_threads(args.threads)


def scaled(n: int, scale: float, minimum: int = 1) -> int:
    return max(minimum, round(n * scale))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def env() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": "cpu",
    }


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> dict[str, Any]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times: median and all (s)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times), "times_s": [round(t, 4) for t in times]}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def emit(result: dict[str, Any], out: Path) -> None:
    """Write the result to ``out`` (atomically) and print it as one JSON line (run_all
    reads the last)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    tmp.replace(out)
    print(json.dumps(result))


def rounded(obj: Any, digits: int = 4) -> Any:
    """Floats rounded to ``digits`` significant-ish decimals, recursively."""
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list):
        return [rounded(v, digits) for v in obj]
    return obj


# -----------------------------------------------------------------------------
# tokens: a small VQGAN on shapes 32×32 (f = 4 → 8×8 grids)

RESOLUTION = 32
#: The f = 4 VQGAN of ``tokenizer_quality.py`` without its adversarial phase (a short
#: stage 1 never reaches it): 8×8 grids of 512 codes for 32×32 images.
TOKENIZER_PARAMS: dict[str, Any] = {
    "ch": 16, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "norm_groups": 2,
    "z_channels": 16, "embed_dim": 16, "n_embed": 512, "codebook_dim": 8,
    "perceptual_weight": 0.0, "pretrained_backbone": False, "disc_weight": 0.0,
}
TOKENIZER_TRAIN: dict[str, Any] = {
    "steps": 300, "batch_size": 16, "lr": 1e-3, "log_every": 100, "image_every": 0, "seed": 0,
}
#: Training images (the ``train`` split); held-out NLL uses 512 images of ``val``.
TRAIN_IMAGES = 5_000


def data_spec() -> dict[str, Any]:
    return {"name": "shapes", "params": {"resolution": RESOLUTION, "length": TRAIN_IMAGES}}


def shapes_tokenizer(steps: int, workdir: Path) -> tuple[Any, dict[str, Any]]:
    """A VQGAN trained ``steps`` steps on shapes (seeded); returns it and a summary."""
    from vqgen.core.config import parse_config

    cfg = parse_config({
        "data": data_spec(),
        "tokenizer": {"name": "vqgan", "params": TOKENIZER_PARAMS},
        "train": {"tokenizer": dict(TOKENIZER_TRAIN, steps=steps)},
    })
    run = workdir / "tokenizer_run"
    t = time.perf_counter()
    tok = train_tokenizer(cfg, run, progress=False)
    train_s = time.perf_counter() - t
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rec = last[-1] if last else {}
    return tok.eval(), {
        "name": "vqgan", "downsample": tok.downsample, "vocab_size": tok.vocab_size,
        "params": TOKENIZER_PARAMS, "train_steps": steps, "train_s": round(train_s, 1),
        "final_rec_loss": round(float(rec["rec"]), 4) if "rec" in rec else None,
        "final_usage": round(float(rec["usage"]), 4) if "usage" in rec else None,
    }


def unigram_entropy(cache_root: Path) -> dict[str, float]:
    """Entropy (nats, bits) of the code frequencies in every cache under ``cache_root``
    whose meta marks it as the training split (the largest one)."""
    from vqgen.training.tokens import TokenCache

    caches = [TokenCache(p.parent) for p in cache_root.glob("*/meta.json")]
    train = max(caches, key=len)
    counts = np.bincount(np.asarray(train.codes).reshape(-1).astype(np.int64))
    p = counts[counts > 0] / counts.sum()
    h = float(-(p * np.log(p)).sum())
    return {"nats": h, "bits": h / LN2, "codes_used": int((counts > 0).sum())}


# -----------------------------------------------------------------------------
# stage 2 with vqgen's own trainer


def prior_config(
    prior: dict[str, Any],
    train: dict[str, Any],
    ordering: str = "row_major",
) -> Any:
    from vqgen.core.config import parse_config

    return parse_config({
        "data": data_spec(),
        "tokenizer": {"name": "vqgan", "params": TOKENIZER_PARAMS},
        "ordering": {"name": ordering},
        "prior": prior,
        "train": {"prior": train},
    })


def train_prior_run(
    tokenizer: Any,
    prior: dict[str, Any],
    train: dict[str, Any],
    cache_root: Path,
    ordering: str = "row_major",
) -> dict[str, Any]:
    """Train one prior with ``vqgen``'s stage-2 trainer; held-out NLL and training time.

    ``train_s`` is the trainer's own ``elapsed_s`` (the optimisation loop only: the
    token cache is built once per ``cache_root`` and the evaluation comes after).
    """
    cfg = prior_config(prior, train, ordering)
    with tempfile.TemporaryDirectory() as run_dir:
        t = time.perf_counter()
        pipe = train_prior(cfg, tokenizer, None, run_dir, progress=False, cache_root=cache_root)
        wall = time.perf_counter() - t
        records = [json.loads(line) for line in
                   (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    n_params = sum(p.numel() for p in pipe.prior.parameters())
    return {
        "steps": int(last["step"]),
        "params": n_params,
        "val_nll_nats": round(float(last["val_nll_nats"]), 4),
        "val_nll_bits": round(float(last["val_nll_bits"]), 4),
        "final_train_nll_nats": round(float(last["nll_nats"]), 4),
        "train_s": round(float(last["elapsed_s"]), 2),
        "ms_per_step": round(1000 * float(last["elapsed_s"]) / max(1, int(last["step"])), 1),
        "wall_s": round(wall, 2),
    }


def step_costs(
    priors: dict[str, dict[str, Any]], batch: int, length: int, vocab: int, rounds: int = 5,
) -> dict[str, float]:
    """Median seconds per training step (nll, backward, clip, AdamW) of each prior spec
    ``{"name", "params"}`` on random tokens, timed in interleaved rounds so that a
    change in machine load affects every prior alike."""
    from vqgen.core.registry import default_registry
    from vqgen.training.engine import optimizer_groups

    reg = default_registry()
    seq = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))
    steps = {}
    for name, spec in priors.items():
        torch.manual_seed(0)
        model = reg.create("prior", spec["name"], spec["params"]).train()
        opt = torch.optim.AdamW(optimizer_groups(model, 0.01), lr=1e-4, betas=(0.9, 0.95))

        def step(model: Any = model, opt: Any = opt) -> None:
            model.nll(seq).mean().backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()  # warm-up
        steps[name] = step
    times: dict[str, list[float]] = {n: [] for n in priors}
    for _ in range(rounds):
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t)
    return {n: statistics.median(v) for n, v in times.items()}


def match_pixelsnail(
    target: int, height: int, width: int, vocab_size: int, n_head: int = 4,
    **fixed: Any,
) -> tuple[int, int]:
    """The PixelSNAIL ``channels`` (a multiple of ``2 n_head``) whose total parameter
    count is closest to ``target``; returns ``(channels, params)``."""
    from vqgen.plugins.pixelsnail import PixelSNAIL

    best: tuple[int, int] | None = None
    step = 2 * n_head
    for c in range(step, 1025, step):
        m = PixelSNAIL(height=height, width=width, vocab_size=vocab_size, channels=c,
                       n_head=n_head, **fixed)
        n = sum(p.numel() for p in m.parameters())
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (c, n)
        if n > target:
            break
    assert best is not None
    return best


if __name__ == "__main__":
    print(json.dumps({"skipped": True, "reason": "helper module of the benchmarks, not one"}))
