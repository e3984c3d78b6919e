"""GPT training throughput, model-FLOPs utilisation and peak memory per attention backend.

Runs a GPT-2-medium-like prior (24 layers, 1024 wide, 16 heads) on one CUDA device in
bf16 autocast (fp32 master weights, fused AdamW), for each attention backend
(``xformers`` where it imports and runs, ``sdpa``, ``math``) and each sequence length
(256 and 1,024 tokens), and for SDPA also ``compiled`` (``torch.compile`` of the model,
as ``train.prior.compile`` does) and ``checkpointed`` (activation checkpointing of every
block, ``train.prior.activation_checkpointing``). Beside training: KV-cached sampling
tokens/s of the same GPT through ``Pipeline.generate`` (bf16 autocast, batch
``--sample-batch``, a 16×16 grid), and VQGAN training images/s at 256×256 in bf16
(taming's f = 16 ImageNet sizes, reconstruction and codebook loss). FSDP against DDP
needs two devices; on one it reports why not (``benchmarks/fsdp.py`` measures the
per-rank training state on the CPU). Prints one JSON object::

    python benchmarks/cuda.py                       # the defaults above
    python benchmarks/cuda.py --seqs 256 --steps 20 # fewer configs, more timed steps

Each configuration is warmed up, then the median of several timed optimizer steps is
reported as ``tokens_per_s``. The batch size starts at ``--tokens`` tokens per step and
halves until it fits. Model FLOPs per token follow PaLM (appendix B):
``6 * N + 12 * n_layer * n_embd * T``, with ``N`` the parameters outside the embedding
tables (the head included) and the attention term counted without the causal saving;
MFU divides ``flops_per_token * tokens_per_s`` by the device's dense bf16 peak
(H100 / H200 SXM: 989 TFLOP/s, A100: 312 TFLOP/s; other devices report ``null``).
Peak memory is ``torch.cuda.max_memory_allocated`` over the configuration.

Without CUDA it prints ``{"skipped": true, ...}`` and exits 0. ``--device cpu`` with a
tiny ``--n-layer``/``--n-embd`` runs the same code path as a smoke test.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from typing import Any

import torch

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak of a known device (by name), else None."""
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in device_name.upper():
            return flops
    return None


def xformers_status() -> str | None:
    """None when xformers runs here, else why not."""
    from vqgen.core.attention import xformers_available

    if xformers_available():
        return None
    try:
        import xformers.ops  # noqa: F401
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "installed but its kernels did not run on this device"


def flops_per_token(n_params: int, n_layer: int, n_embd: int, seq_len: int) -> float:
    """Training FLOPs per token: ``6 N`` for the weights, ``12 n_layer n_embd T`` attention."""
    return 6.0 * n_params + 12.0 * n_layer * n_embd * seq_len


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_steps(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    seq: torch.Tensor,
    warmup: int,
    steps: int,
    device: torch.device,
) -> tuple[list[float], float]:
    """Seconds of each timed training step (bf16 autocast), and the last loss."""
    times: list[float] = []
    loss = torch.zeros(())
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(seq)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times, float(loss.detach())


def run_config(
    args: argparse.Namespace, backend: str, seq_len: int, batch: int, device: torch.device,
    mode: str = "eager",
) -> dict[str, Any]:
    """Time ``args.steps`` training steps (after ``args.warmup``) at one batch size;
    ``mode``: ``eager``, ``compiled`` (torch.compile) or ``checkpointed`` (activation
    checkpointing of every block)."""
    from vqgen.plugins.gpt import GPT
    from vqgen.training.runtime import checkpoint_activations

    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with device:  # initialise on the device
        model = GPT(
            vocab_size=args.vocab_size,
            block_size=seq_len,  # unconditional: start token + seq_len - 1 codes
            n_layer=args.n_layer,
            n_head=args.n_head,
            n_embd=args.n_embd,
            attention=backend,
        )
    model.train()
    if mode == "checkpointed":
        checkpoint_activations(list(model.blocks))
    fused = device.type == "cuda"
    if mode == "compiled":
        model = torch.compile(model)  # type: ignore[assignment]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=fused)
    g = torch.Generator(device=device).manual_seed(0)
    seq = torch.randint(0, args.vocab_size, (batch, seq_len), device=device, generator=g)
    try:
        times, final_loss = time_steps(model, opt, seq, args.warmup, args.steps, device)
    finally:
        del model, opt, seq
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        free(device)
    median = statistics.median(times)
    tokens = batch * seq_len
    return {
        "step_time_s": median,
        "step_time_s_all": times,
        "tokens_per_s": tokens / median,
        "peak_memory_gib": None if peak is None else peak / 2**30,
        "loss": final_loss,
    }


def bench(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from vqgen.plugins.gpt import GPT

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_flops(name) if device.type == "cuda" else None
    backends: list[str] = []
    skipped: dict[str, str] = {}
    for b in args.backends:
        why = xformers_status() if b == "xformers" and device.type == "cuda" else None
        if b == "xformers" and device.type != "cuda":
            why = "needs CUDA"
        if why:
            skipped[b] = why
        else:
            backends.append(b)
    with torch.device("meta"):  # shapes only
        probe = GPT(
            vocab_size=args.vocab_size, block_size=max(args.seqs), n_layer=args.n_layer,
            n_head=args.n_head, n_embd=args.n_embd,
        )  # fmt: skip
    n_params = probe.num_params(non_embedding=True)
    n_total = probe.num_params(non_embedding=False)
    del probe
    results = []
    runs = [(b, "eager") for b in backends] + [
        ("sdpa", m) for m in args.modes if m != "eager" and "sdpa" in backends]
    if device.type != "cuda" and "compiled" in args.modes:
        skipped["compiled"] = "torch.compile is measured on CUDA only"
        runs = [r for r in runs if r[1] != "compiled"]
    for seq_len in args.seqs:
        for backend, mode in runs:
            batch = args.batch or max(1, args.tokens // seq_len)
            entry: dict[str, Any] = {"backend": backend, "mode": mode, "seq_len": seq_len}
            while True:
                out = None
                try:
                    out = run_config(args, backend, seq_len, batch, device, mode)
                except torch.cuda.OutOfMemoryError:
                    pass
                if out is not None:
                    break
                free(device)  # outside the except block: the traceback no longer pins memory
                if batch == 1 or args.batch:
                    out = {"error": "out of memory"}
                    break
                batch //= 2
            entry["batch_size"] = batch
            entry.update(out)
            if "tokens_per_s" in out:
                fpt = flops_per_token(n_params, args.n_layer, args.n_embd, seq_len)
                entry["flops_per_token"] = fpt
                entry["mfu"] = None if peak is None else fpt * out["tokens_per_s"] / peak
            results.append(entry)
            print(json.dumps({k: v for k, v in entry.items() if k != "step_time_s_all"}),
                  file=sys.stderr, flush=True)  # fmt: skip
    return {
        "benchmark": "gpt_training_bf16",
        "device": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "peak_bf16_flops": peak,
        "model": {
            "n_layer": args.n_layer,
            "n_head": args.n_head,
            "n_embd": args.n_embd,
            "vocab_size": args.vocab_size,
            "params_non_embedding": n_params,
            "params_total": n_total,
        },
        "timing": {"warmup_steps": args.warmup, "timed_steps": args.steps, "stat": "median"},
        "flops_formula": "6*N + 12*n_layer*n_embd*T per token (PaLM, no causal discount)",
        "skipped_backends": skipped,
        "results": results,
        "sampling": sampling_speed(args, device),
        "vqgan": vqgan_speed(args, device),
        "fsdp": ({"skipped": True, "reason": f"FSDP against DDP needs two devices; this "
                  f"machine has {torch.cuda.device_count()} (benchmarks/fsdp.py measures the "
                  "per-rank training state on the CPU)"}
                 if device.type != "cuda" or torch.cuda.device_count() < 2 else
                 {"note": "run: python benchmarks/fsdp.py --procs 2 on this machine"}),
    }


def sampling_speed(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """KV-cached sampling tokens/s of the benchmark's GPT over a 16x16 grid (bf16
    autocast on CUDA), through Pipeline.generate with a k-means tokenizer (decoding the
    codes is a palette lookup, so the prior's decoding is what is timed)."""
    from vqgen.core.pipeline import Pipeline
    from vqgen.plugins.gpt import GPT
    from vqgen.plugins.kmeans import KMeansTokenizer
    from vqgen.samplers.top_k import TopK

    grid = (16, 16)
    torch.manual_seed(0)
    with device:
        prior = GPT(vocab_size=args.vocab_size, block_size=grid[0] * grid[1],
                    n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    tok = KMeansTokenizer(n_embed=args.vocab_size)
    pipe = Pipeline(tok, prior, grid=grid, sampler=TopK(k=100)).to(device).eval()
    batch = args.sample_batch

    def draw() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            pipe.generate(batch, seed=0)

    draw()  # warm-up
    times = []
    for _ in range(3):
        sync(device)
        t0 = time.perf_counter()
        draw()
        sync(device)
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    pipe.cpu()  # let the device's memory go before the next measurement
    free(device)
    return {"grid": list(grid), "batch": batch, "seconds": median,
            "tokens_per_s": batch * grid[0] * grid[1] / median}


def vqgan_speed(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """VQGAN training images/s at ``--vqgan-size`` pixels in bf16 autocast: taming's f = 16
    ImageNet sizes (``--vqgan-ch`` wide), L1 reconstruction + codebook loss, fused Adam
    (no discriminator or LPIPS: the autoencoder's own cost)."""
    import vqgen

    size, batch = args.vqgan_size, args.vqgan_batch
    params = {"ch": args.vqgan_ch, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2,
              "attn_resolutions": [16], "resolution": size, "z_channels": 256,
              "embed_dim": 256, "n_embed": 1024, "perceptual_weight": 0.0,
              "kmeans_init": False}
    torch.manual_seed(0)
    tok = vqgen.create("tokenizer", "vqgan", params).to(device).train()
    opt = torch.optim.Adam(tok.parameters(), lr=1e-4, fused=device.type == "cuda")
    x = torch.rand(batch, 3, size, size, device=device)  # (B, 3, H, W)
    times = []
    for i in range(args.warmup + args.steps):
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = tok(x)
            loss = (out.recon.float() - x).abs().mean() + out.qloss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del tok, opt, x
    free(device)
    return {"size": size, "batch": batch, "ch": args.vqgan_ch, "step_time_s": median,
            "images_per_s": batch / median, "peak_memory_gib": peak}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backends", nargs="+", default=["xformers", "sdpa", "math"])
    ap.add_argument("--seqs", nargs="+", type=int, default=[256, 1024])
    ap.add_argument("--modes", nargs="+", default=["eager", "compiled", "checkpointed"],
                    help="eager for every backend; compiled / checkpointed with sdpa")
    ap.add_argument("--sample-batch", type=int, default=64)
    ap.add_argument("--vqgan-size", type=int, default=256)
    ap.add_argument("--vqgan-batch", type=int, default=16)
    ap.add_argument("--vqgan-ch", type=int, default=128)
    ap.add_argument("--n-layer", type=int, default=24)
    ap.add_argument("--n-head", type=int, default=16)
    ap.add_argument("--n-embd", type=int, default=1024)
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per step to start from")
    ap.add_argument("--batch", type=int, default=0, help="fixed batch size (0: auto)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(json.dumps({
            "benchmark": "gpt_training_bf16", "skipped": True,
            "reason": "CUDA is not available", "torch": torch.__version__,
        }))  # fmt: skip
        return 0
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    print(json.dumps(bench(args, device), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
