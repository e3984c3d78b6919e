"""GPT training throughput, model-FLOPs utilisation and peak memory per attention backend.

Runs a GPT-2-medium-like prior (24 layers, 1024 wide, 16 heads) on one CUDA device in
bf16 autocast (fp32 master weights, fused AdamW), for each attention backend
(``xformers`` where it imports and runs, ``sdpa``, ``math``) and each sequence length
(256 and 512 tokens), and prints one JSON object::

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
    args: argparse.Namespace, backend: str, seq_len: int, batch: int, device: torch.device
) -> dict[str, Any]:
    """Time ``args.steps`` training steps (after ``args.warmup``) at one batch size."""
    from vqgen.plugins.gpt import GPT

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
    fused = device.type == "cuda"
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
    for seq_len in args.seqs:
        for backend in backends:
            batch = args.batch or max(1, args.tokens // seq_len)
            entry: dict[str, Any] = {"backend": backend, "seq_len": seq_len}
            while True:
                out = None
                try:
                    out = run_config(args, backend, seq_len, batch, device)
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
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backends", nargs="+", default=["xformers", "sdpa", "math"])
    ap.add_argument("--seqs", nargs="+", type=int, default=[256, 512])
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
