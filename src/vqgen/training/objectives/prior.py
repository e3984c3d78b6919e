"""Stage 2: the prior on cached tokens.

The dataset is encoded once by the trained tokenizer (and conditioner) into a
:class:`~vqgen.training.tokens.TokenCache` (``run_dir/tokens/<key>/``); the prior trains
on those grids, flattened by the ordering. The optimizer and schedule come from
``train.prior`` (AdamW 0.9 / 0.95, weight decay on Linear and conv weights only, linear
warm-up then cosine decay to 10 %, gradient clipping), with condition dropout for
classifier-free guidance and optional ``torch.compile`` on CUDA. The prior's training
loss is what it says it is (``Prior.nll`` of an autoregressive prior); held-out values
are computed at checkpoints and at the end.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from vqgen.core.attention import resolve_backend
from vqgen.core.config import PipelineConfig
from vqgen.core.data import held_out_dataset
from vqgen.core.interfaces import Autoregressive
from vqgen.core.pipeline import Pipeline
from vqgen.core.registry import Registry
from vqgen.training.batches import batch_stream
from vqgen.training.objective import Objective, Optim, StepOutput, lr_at
from vqgen.training.optim import (
    load_generator,
    load_optimizer,
    make_optimizer,
    optimizer_groups,
    resolve_lr,
)
from vqgen.training.runtime import Runtime, checkpoint_activations
from vqgen.training.tokens import TokenCache

__all__ = ["PriorObjective", "condition_gain", "token_caches", "token_nll"]

LN2 = math.log(2.0)


class _Tokens(Dataset):
    """A token cache as ``{"seq": [L], "cond": [Lc]}`` items: the codes in the prior's
    order, the conditioner's ids as it made them (:meth:`Pipeline.prior_cond` turns them
    into the prior's)."""

    def __init__(self, cache: TokenCache, pipe: Pipeline) -> None:
        self.cache, self.ordering = cache, pipe.ordering  # not the pipe: workers copy this

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = self.cache[i]
        out = {"seq": self.ordering.flatten(item["codes"][None])[0]}  # (L,)
        if "cond" in item:
            out["cond"] = item["cond"]  # (Lc,)
        return out


class _PriorLoss(nn.Module):
    """``forward(seq, cond) = prior.loss(seq, cond)`` (an AR prior's NLL, a masked prior's
    masked-token cross-entropy, per sample): what DistributedDataParallel wraps."""

    def __init__(self, prior: nn.Module) -> None:
        super().__init__()
        self.prior = prior

    def forward(self, seq: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        return self.prior.loss(seq, cond)  # type: ignore[operator,no-any-return]


#: The fixed stream of a masked prior's held-out masks: every checkpoint (and both halves
#: of a condition-gain pair) is scored on the same masks, so values compare.
HELD_OUT_MASK_SEED = 0


@torch.no_grad()
def token_nll(pipe: Pipeline, cache: TokenCache, batch_size: int = 64, *,
              cond_shift: int = 0) -> dict[str, float]:
    """Mean held-out loss of the cached tokens under ``pipe.prior``, nats and bits per
    token, keyed by what it is (``Prior.loss_name``): ``nll_nats`` / ``nll_bits`` for an
    autoregressive prior (its exact NLL), ``masked_ce_nats`` / ``masked_ce_bits`` for a
    masked prior (cross-entropy of masked cells under a fixed, seeded mask stream).

    ``cond_shift = s`` pairs sample ``j`` with the condition of sample ``(j + s) mod N``:
    a mismatched condition, whose loss minus the matched one measures how much the
    prior uses its condition (see :func:`condition_gain`).
    """
    prior = pipe._require_prior()
    was = prior.training
    prior.eval()
    device = pipe.device
    name = prior.loss_name
    gen = None if isinstance(prior, Autoregressive) else \
        torch.Generator(device=device).manual_seed(HELD_OUT_MASK_SEED)
    total, count = 0.0, 0
    data = _Tokens(cache, pipe)
    n = len(data)
    for i in range(0, n, batch_size):
        items = [data[j] for j in range(i, min(i + batch_size, n))]
        seq = torch.stack([it["seq"] for it in items]).to(device)  # (B, L)
        raw = None
        if "cond" in items[0]:
            conds = [data[(i + k + cond_shift) % n]["cond"] if cond_shift else it["cond"]
                     for k, it in enumerate(items)]
            raw = torch.stack(conds).to(device)  # (B, Lc)
        c = pipe.prior_cond(raw)
        loss = prior.nll(seq, c) if gen is None else prior.loss(seq, c, generator=gen)  # (B,)
        total += float(loss.sum())
        count += len(items)
    prior.train(was)
    nats = total / max(count, 1)
    return {f"{name}_nats": nats, f"{name}_bits": nats / LN2}


def condition_gain(pipe: Pipeline, cache: TokenCache, batch_size: int = 64) -> dict[str, float]:
    """Held-out bits/token with each sample's own condition and with the next sample's
    (the prior's :func:`token_nll` loss: its NLL, or a masked prior's masked CE).

    ``cond_gain_bits`` = mismatched − matched: near 0 when the prior ignores its
    condition, positive when the condition carries information it uses. A paired
    check of one trained model, so free of run-to-run noise.
    """
    name = pipe._require_prior().loss_name
    matched = token_nll(pipe, cache, batch_size)[f"{name}_bits"]
    other = token_nll(pipe, cache, batch_size, cond_shift=1)[f"{name}_bits"]
    return {f"val_{name}_bits": matched, f"val_{name}_bits_other_cond": other,
            "cond_gain_bits": other - matched}


def token_caches(config: PipelineConfig, registry: Registry, tokenizer: Any, conditioner: Any,
                  root: Path, batch_size: int, progress: bool,
                  rt: Runtime) -> tuple[TokenCache, TokenCache | None]:
    """The training and held-out token caches; rank 0 encodes, the others then open."""
    dataset = registry.create("dataset", config.data.name, config.data.params)
    held = held_out_dataset(config, registry)
    data_key = {"data": config.data.model_dump(mode="json")}

    def build() -> tuple[TokenCache, TokenCache | None]:
        cache = TokenCache.build(root, dataset, tokenizer, conditioner, data=data_key,
                                 batch_size=batch_size, progress=progress)
        held_cache = (
            TokenCache.build(root, held, tokenizer, conditioner,
                             data={**data_key, "split": "val", "n": len(held)},
                             batch_size=batch_size, progress=progress)
            if held is not None else None
        )
        return cache, held_cache

    if rt.main:
        out = build()
    rt.barrier()
    if not rt.main:
        out = build()
    return out


class PriorObjective(Objective):
    """The prior on cached tokens: its loss on a micro-batch, with condition dropout.

    Logged under the loss's own name (``Prior.loss_name``): ``nll`` → ``nll_nats``,
    ``val_nll_nats`` for an autoregressive prior; ``masked_ce`` → ``masked_ce_nats``,
    ``val_masked_ce_nats`` for a masked one (never called an NLL).
    """

    stage = desc = "prior"
    save_if_idle = False

    def __init__(self, config: PipelineConfig, pipe: Pipeline, cache: TokenCache,
                 held_cache: TokenCache | None, rt: Runtime) -> None:
        self.config, self.pipe, self.cache, self.held_cache, self.rt = (
            config, pipe, cache, held_cache, rt)
        self.cfg = cfg = config.train.prior
        self.prior = prior = pipe._require_prior()
        self.loss_name = name = prior.loss_name
        self.shown = self.global_logs = (name,)
        self.val_key = f"val_{name}_nats"
        self.base_lr = resolve_lr(cfg, rt.info.world)
        self.opt = self._optimizer()
        self.gen = torch.Generator(device=rt.device).manual_seed(cfg.seed)
        # the attention backend, resolved before training: an explicit one that cannot run
        # here is an error now, and the metrics say which one `auto` chose
        chosen = getattr(getattr(prior, "params", None), "attention", None)
        self.attention = resolve_backend(chosen, rt.device) if isinstance(chosen, str) else None

    def start(self, start: int) -> None:
        """After a restored checkpoint: per-rank streams, training mode, DDP or FSDP (one
        unit per block; the optimizer rebuilt over the shards, its state moved over),
        compile."""
        self.rt.reseed(self.cfg.seed, start)  # per-rank dropout masks
        self.prior.train()
        units = list(getattr(self.prior, "blocks", ()))
        if self.cfg.activation_checkpointing:
            checkpoint_activations(units)
        self.model = self.rt.wrap(_PriorLoss(self.prior), units)
        if self.rt.sharded:
            whole = self.opt.state_dict()  # restored, or fresh
            self.opt = self._optimizer()  # over the shards
            self.opt.load_state_dict(self.rt.shard_optimizer_state(whole, self.opt))
        if self.cfg.compile and self.rt.cuda:
            self.model = torch.compile(self.model)  # type: ignore[assignment]

    def _optimizer(self) -> torch.optim.Optimizer:
        """The configured optimizer over the prior's current parameters (decay groups)."""
        return make_optimizer(self.cfg, optimizer_groups(self.prior, self.cfg.weight_decay),
                              self.base_lr)

    def batches(self, start: int) -> Iterator[Mapping[str, torch.Tensor]]:
        cfg, info = self.cfg, self.rt.info
        return batch_stream(_Tokens(self.cache, self.pipe), cfg.batch_size, seed=cfg.seed,
                            start=start * cfg.grad_accum, num_workers=cfg.num_workers,
                            rank=info.rank, world=info.world)

    def optimizers(self) -> list[Optim]:
        return [Optim(self.opt, list(self.prior.parameters()), clip=self.cfg.grad_clip)]

    def lr(self, step: int) -> float:
        cfg = self.cfg
        return lr_at(step, self.base_lr, cfg.warmup_steps, cfg.steps, schedule=cfg.lr_schedule)

    def step(self, batch: Mapping[str, torch.Tensor], step: int) -> StepOutput:
        seq = self.rt.to_device(batch["seq"])  # (B, L)
        raw = self.rt.to_device(batch["cond"]) if "cond" in batch else None  # (B, Lc)
        info = self.rt.info
        c = self.pipe.prior_cond(raw, dropout=self.cfg.cond_dropout, generator=self.gen,
                                 rank=info.rank, world=info.world)
        loss = self.model(seq, c).mean()  # type: ignore[misc]
        return StepOutput([loss], {self.loss_name: loss.detach()})

    def record(self, logs: Mapping[str, float]) -> dict[str, Any]:
        out: dict[str, Any] = {f"{self.loss_name}_nats": logs[self.loss_name]}
        if self.attention is not None:
            out["attention"] = self.attention
        return out

    def evaluate(self, done: int) -> dict[str, float]:
        if self.held_cache is None:
            return {}
        return {f"val_{k}": v for k, v in token_nll(self.pipe, self.held_cache).items()}

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.rt.full_optimizer_state(self.opt),
                "generator": self.gen.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        load_optimizer(self.opt, state.get("optimizer"), "optimizer")
        if "generator" in state:
            load_generator(self.gen, state["generator"], "generator")
