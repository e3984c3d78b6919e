"""Training memory per process under DDP and under FSDP (``train.prior.strategy``), and
with activation checkpointing (``train.prior.activation_checkpointing``) on top of FSDP.

Launches itself under ``torch.distributed.run`` with ``--procs`` processes (gloo on the
CPU; NCCL with one GPU per process where CUDA has enough of them), once per strategy,
and has each rank train a GPT prior a few steps on random codes through vqgen's own
:class:`~vqgen.training.runtime.Runtime` (``wrap`` with one FSDP unit per block; the
optimizer built over what it returns, as the prior objective does). Per rank it reports
the bytes this process holds of the weights, gradients and AdamW moments (exact: the
local shards' sizes), its peak resident memory (CPU) or peak CUDA memory, and the step
time. On the CPU the step times are those of ``--procs`` processes sharing the cores: a
memory benchmark, not a speed one.

    python benchmarks/fsdp.py                 # 2 processes, GPT 8 x 512 (26 M parameters)
    python benchmarks/fsdp.py --scale 0.25    # smoke run: a smaller GPT
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, env, log, parser, rounded, setup  # noqa: E402

VOCAB, GRID, BATCH, STEPS = 1024, 16, 4, 4


def _local_bytes(tensors: Any) -> int:
    """Bytes this rank holds of ``tensors`` (a sharded tensor's local shard only)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        if isinstance(t, torch.Tensor):
            local = t.to_local() if isinstance(t, DTensor) else t
            total += local.numel() * local.element_size()
    return total


def worker(setting: str, n_layer: int, n_embd: int, out: Path) -> None:
    """One rank: train a GPT prior ``STEPS`` steps in ``setting`` (``ddp``, ``fsdp``,
    ``fsdp+ac``); write its figures."""
    import vqgen
    from vqgen.training.optim import make_optimizer, optimizer_groups
    from vqgen.training.runtime import Runtime, checkpoint_activations

    strategy = setting.split("+")[0]

    torch.set_num_threads(1)
    rt = Runtime("auto", strategy=strategy)
    torch.manual_seed(0)
    prior = vqgen.create("prior", "gpt", {
        "vocab_size": VOCAB, "cond_vocab_size": 0, "block_size": GRID * GRID,
        "n_layer": n_layer, "n_head": 8, "n_embd": n_embd}).to(rt.device)
    n_params = sum(p.numel() for p in prior.parameters())

    class Loss(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.prior = prior

        def forward(self, seq: torch.Tensor) -> torch.Tensor:
            return self.prior.loss(seq, None).mean()

    if setting.endswith("+ac"):
        checkpoint_activations(list(prior.blocks))
    model = rt.wrap(Loss(), list(prior.blocks))
    cfg = vqgen.load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
    opt = make_optimizer(cfg.train.prior, optimizer_groups(prior, 0.01), 1e-4)
    gen = torch.Generator().manual_seed(rt.info.rank)
    times = []
    for _ in range(STEPS):
        seq = torch.randint(0, VOCAB, (BATCH, GRID * GRID), generator=gen).to(rt.device)
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model(seq).backward()
        rt.step(opt, 1.0, list(prior.parameters()))
        times.append(time.perf_counter() - t)
    params = list(prior.parameters())
    moments = [v for s in opt.state.values() for v in s.values()]
    held = {"weights": _local_bytes(params), "grads": _local_bytes(p.grad for p in params),
            "adam_moments": _local_bytes(moments)}
    peak = (torch.cuda.max_memory_allocated(rt.device) if rt.cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    result = {"rank": rt.info.rank, "parameters": n_params,
              "held_mib": {k: v / 2**20 for k, v in held.items()},
              "training_state_mib": sum(held.values()) / 2**20,
              ("peak_cuda_mib" if rt.cuda else "peak_rss_mib"): peak / 2**20,
              "step_s": sorted(times)[len(times) // 2]}
    out.with_name(f"{out.name}.{rt.info.rank}").write_text(json.dumps(result))


def launch(setting: str, procs: int, n_layer: int, n_embd: int, tmp: Path) -> list[dict]:
    """Run :func:`worker` on ``procs`` ranks under torchrun; their figures, by rank."""
    out = tmp / setting
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={procs}", __file__, "--worker", setting, str(n_layer),
           str(n_embd), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        raise SystemExit(f"{setting} run failed:\n{proc.stderr[-3000:]}")
    return [json.loads(out.with_name(f"{out.name}.{r}").read_text()) for r in range(procs)]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]))
        return
    ap = parser(__doc__, "fsdp")
    ap.add_argument("--procs", type=int, default=2, help="processes per strategy")
    args = ap.parse_args()
    setup(args)
    n_layer, n_embd = (8, 512) if args.scale >= 1 else (2, 128)
    result: dict[str, Any] = {"benchmark": "fsdp", "env": env(), "procs": args.procs,
                              "model": {"prior": "gpt", "n_layer": n_layer, "n_embd": n_embd,
                                        "vocab": VOCAB, "tokens": GRID * GRID,
                                        "batch_per_rank": BATCH, "optimizer": "adamw"}}
    with tempfile.TemporaryDirectory() as tmp:
        for setting in ("ddp", "fsdp", "fsdp+ac"):
            log(f"{setting}: {args.procs} processes")
            result[setting] = launch(setting, args.procs, n_layer, n_embd, Path(tmp))
    ddp = result["ddp"][0]["training_state_mib"]
    fsdp = max(r["training_state_mib"] for r in result["fsdp"])
    result["training_state_ratio_fsdp_over_ddp"] = fsdp / ddp
    emit(rounded(result), args.out)


if __name__ == "__main__":
    main()
