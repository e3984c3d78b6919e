"""Stage 2: the prior, trained on cached tokens; and held-out NLL.

The dataset is encoded once by the trained tokenizer (and conditioner) into a
:class:`~vqgen.core.data.TokenCache` (``run_dir/tokens/<key>/``); the prior trains
on those grids, flattened by the ordering. AdamW (betas 0.9 / 0.95, weight decay
on Linear and conv weights only), linear warm-up then cosine decay to 10 %,
gradient clipping and accumulation, condition dropout (for classifier-free
guidance), bf16 autocast on CUDA. A run directory gets::

    prior/weights.safetensors   prior/meta.json   prior/train_state.pt
    metrics.jsonl               (records with "stage": "prior")
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from vqgen.core.config import PipelineConfig
from vqgen.core.data import TokenCache
from vqgen.core.errors import VqgenError
from vqgen.core.pipeline import Pipeline, RasterOrder
from vqgen.core.registry import Registry, default_registry
from vqgen.core.training import (
    MetricsLogger,
    _rng_state,
    _set_rng_state,
    batch_stream,
    check_finite,
    progress_bar,
    resolve_device,
    resolve_lr,
    save_component,
    save_state,
    seed_everything,
)

__all__ = ["held_out_dataset", "lr_at", "optimizer_groups", "token_nll", "train_prior"]

PRIOR_DIR = "prior"
TOKENS_DIR = "tokens"
LN2 = math.log(2.0)


def optimizer_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Parameter groups: decay on Linear/conv weights, none on biases, norms, embeddings."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            wd = name == "weight" and isinstance(module, nn.Linear | nn.Conv2d | nn.Conv1d)
            (decay if wd else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_at(step: int, base: float, warmup: int, total: int, floor: float = 0.1) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``floor × base``."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def held_out_dataset(config: PipelineConfig, registry: Registry, n: int = 512) -> Any | None:
    """The config's data with ``split: val`` (at most ``n`` samples), where it has splits."""
    entry = registry.get("dataset", config.data.name)
    fields = entry.params_model.model_fields
    if "split" not in fields:
        return None
    params = {**config.data.params, "split": "val"}
    if "length" in fields:
        params["length"] = min(n, int(params.get("length") or n))
    return registry.create("dataset", config.data.name, params)


class _Tokens(torch.utils.data.Dataset):
    """A token cache as ``{"seq": [L], "cond": [Lc]}`` items in the prior's order."""

    def __init__(self, cache: TokenCache, ordering: Any) -> None:
        self.cache, self.ordering = cache, ordering

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = self.cache[i]
        out = {"seq": self.ordering.flatten(item["codes"][None])[0]}  # (L,)
        if "cond" in item:
            out["cond"] = item["cond"]
        return out


def _cond_input(pipe: Pipeline, raw: torch.Tensor | None, dropout: float,
                gen: torch.Generator | None = None) -> torch.Tensor | None:
    """Conditioner ids ``[B, Lc]`` → the prior's ids, with condition dropout applied."""
    if raw is None:
        return None
    if dropout > 0:
        assert pipe.conditioner is not None
        drop = torch.rand(raw.shape[0], generator=gen, device=raw.device) < dropout  # (B,)
        raw = torch.where(drop[:, None], pipe.conditioner.null_like(raw), raw)
    return raw + pipe.cond_offset


@torch.no_grad()
def token_nll(pipe: Pipeline, cache: TokenCache, batch_size: int = 64) -> dict[str, float]:
    """Mean NLL of the cached tokens under ``pipe.prior``: nats and bits per token."""
    prior = pipe._require_prior()
    was = prior.training
    prior.eval()
    device = pipe.device
    total, count = 0.0, 0
    data = _Tokens(cache, pipe.ordering)
    for i in range(0, len(data), batch_size):
        items = [data[j] for j in range(i, min(i + batch_size, len(data)))]
        seq = torch.stack([it["seq"] for it in items]).to(device)  # (B, L)
        raw = torch.stack([it["cond"] for it in items]).to(device) if "cond" in items[0] else None
        nll = prior.nll(seq, _cond_input(pipe, raw, 0.0))  # (B,)
        total += float(nll.sum())
        count += len(items)
    prior.train(was)
    nats = total / max(count, 1)
    return {"nll_nats": nats, "nll_bits": nats / LN2}


def build_pipeline(
    config: PipelineConfig,
    tokenizer: Any,
    conditioner: Any,
    grid: tuple[int, int],
    registry: Registry,
) -> Pipeline:
    """The Pipeline of ``config`` around an existing tokenizer and conditioner."""
    if config.prior is None:
        raise VqgenError("the config has no prior section: nothing to train in stage 2")
    prior = registry.create("prior", config.prior.name, config.prior.params)
    ordering = (
        registry.create("ordering", config.ordering.name, config.ordering.params)
        if config.ordering else RasterOrder()
    )
    sampler = (
        registry.create("sampler", config.sampler.name, config.sampler.params)
        if config.sampler else None
    )
    return Pipeline(tokenizer, prior, grid=grid, ordering=ordering, sampler=sampler,
                    conditioner=conditioner)


def train_prior(
    config: PipelineConfig,
    tokenizer: Any,
    conditioner: Any = None,
    run_dir: str | os.PathLike[str] | None = None,
    *,
    registry: Registry | None = None,
    progress: bool = True,
    resume: bool = False,
    cache_root: str | os.PathLike[str] | None = None,
) -> Pipeline:
    """Train the prior of ``config`` on tokens of ``tokenizer`` (and ``conditioner``).

    Returns the Pipeline in eval mode. With ``run_dir`` it logs to
    ``metrics.jsonl``, keeps the token cache in ``run_dir/tokens`` and checkpoints
    to ``run_dir/prior``; ``resume`` continues from that checkpoint.
    """
    registry = registry or default_registry()
    cfg = config.train.prior
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    run = Path(run_dir) if run_dir else None
    tokenizer = tokenizer.to(device).eval()
    if conditioner is not None:
        conditioner = conditioner.to(device).eval()
    dataset = registry.create("dataset", config.data.name, config.data.params)
    root = Path(cache_root) if cache_root else (run / TOKENS_DIR if run else None)
    if root is None:
        import tempfile

        root = Path(tempfile.mkdtemp(prefix="vqgen-tokens-"))
    data_key = {"data": config.data.model_dump(mode="json")}
    cache = TokenCache.build(root, dataset, tokenizer, conditioner, data=data_key,
                             batch_size=cfg.batch_size, progress=progress)
    grid = (int(cache.codes.shape[1]), int(cache.codes.shape[2]))
    pipe = build_pipeline(config, tokenizer, conditioner, grid, registry).to(device)
    prior = pipe._require_prior()
    if cfg.cond_dropout > 0 and (conditioner is None or conditioner.null_id is None):
        raise VqgenError(
            "train.prior.cond_dropout > 0 needs a conditioner with a null token "
            "(conditioner.params.null_token: true)"
        )
    held = held_out_dataset(config, registry)
    held_cache = (
        TokenCache.build(root, held, tokenizer, conditioner,
                         data={**data_key, "split": "val", "n": len(held)},
                         batch_size=cfg.batch_size, progress=progress)
        if held is not None else None
    )

    base_lr = resolve_lr(cfg)
    betas = cfg.betas or (0.9, 0.95)
    opt = torch.optim.AdamW(optimizer_groups(prior, cfg.weight_decay), lr=base_lr, betas=betas)
    start = 0
    ckpt = run / PRIOR_DIR if run else None
    if resume and ckpt is not None and (ckpt / "train_state.pt").is_file():
        start = _load(ckpt, prior, opt, device)
    metrics = MetricsLogger(run / "metrics.jsonl" if run else None)
    tokens = _Tokens(cache, pipe.ordering)
    stream: Iterator[Mapping[str, torch.Tensor]] = batch_stream(
        tokens, cfg.batch_size, seed=cfg.seed, start=start * cfg.grad_accum,
        num_workers=cfg.num_workers,
    )
    amp = device.type == "cuda" and cfg.amp != "none"
    amp_dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=amp and cfg.amp == "fp16")
    gen = torch.Generator(device=device).manual_seed(cfg.seed + start)
    prior.train()
    bar = progress_bar(cfg.steps, initial=start, desc="prior", enabled=progress)
    t0, sums, n_logs, last = time.time(), 0.0, 0, {}
    try:
        for step in range(start, cfg.steps):
            lr = lr_at(step, base_lr, cfg.warmup_steps, cfg.steps)
            for group in opt.param_groups:
                group["lr"] = lr
            loss_sum = 0.0
            for _ in range(cfg.grad_accum):
                batch = next(stream)
                seq = batch["seq"].to(device)  # (B, L)
                raw = batch["cond"].to(device) if "cond" in batch else None  # (B, Lc)
                c = _cond_input(pipe, raw, cfg.cond_dropout, gen)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                    loss = prior.nll(seq, c).mean() / cfg.grad_accum
                scaler.scale(loss).backward()
                loss_sum += float(loss.detach())
            check_finite(step, {"prior_nll": loss_sum})
            scaler.unscale_(opt)
            grad_norm = float(nn.utils.clip_grad_norm_(prior.parameters(), cfg.grad_clip))
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            sums += loss_sum
            n_logs += 1
            done = step + 1
            bar.update(1)
            bar.set_postfix(nll=f"{loss_sum:.3f}", lr=f"{lr:.2e}")
            if done % cfg.log_every == 0 or done == cfg.steps:
                last = {"step": done, "stage": "prior", "nll_nats": sums / n_logs,
                        "lr": lr, "grad_norm": grad_norm, "elapsed_s": round(time.time() - t0, 2)}
                if held_cache is not None and done == cfg.steps:
                    last.update({f"val_{k}": v for k, v in token_nll(pipe, held_cache).items()})
                metrics.log(last)
                sums, n_logs = 0.0, 0
            if ckpt is not None and (
                done == cfg.steps or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0)
            ):
                _save(ckpt, config, prior, opt, done, last)
    finally:
        bar.close()
    return pipe.eval()


def _save(d: Path, config: PipelineConfig, prior: nn.Module, opt: torch.optim.Optimizer,
          step: int, metrics: Mapping[str, Any]) -> None:
    save_state({"step": step, "optimizer": opt.state_dict(), "rng": _rng_state()},
               d / "train_state.pt")
    assert config.prior is not None
    save_component(d, prior, kind="prior", name=config.prior.name, step=step, metrics=metrics)


def _load(d: Path, prior: nn.Module, opt: torch.optim.Optimizer, device: torch.device) -> int:
    meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
    state = torch.load(d / "train_state.pt", map_location="cpu", weights_only=True)
    if meta.get("step") != state.get("step"):
        raise VqgenError(f"{d}: meta.json and train_state.pt disagree on the step; the "
                         "checkpoint is incomplete")
    prior.load_state_dict(load_file(str(d / "weights.safetensors"), device=str(device)))
    opt.load_state_dict(state["optimizer"])
    _set_rng_state(state["rng"])
    return int(state["step"])
