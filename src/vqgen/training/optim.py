"""Optimizers and learning rates of the stages, chosen by config (``train.<stage>``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vqgen.core.config import StageTrainConfig
from vqgen.training.runtime import world_size

__all__ = ["make_adam", "make_optimizer", "optimizer_groups", "resolve_lr"]


def resolve_lr(cfg: StageTrainConfig, world: int | None = None) -> float:
    """The paper's rule ``base_lr × batch_size × grad_accum × world_size``, or ``cfg.lr``
    (``world`` defaults to the processes of the torch.distributed group)."""
    if cfg.lr is not None:
        return cfg.lr
    return cfg.base_lr * cfg.batch_size * cfg.grad_accum * (world or world_size())


def make_adam(params: list[Any], lr: float, betas: tuple[float, float], *,
              decoupled: bool = False) -> torch.optim.Optimizer:
    """Adam (AdamW with ``decoupled``) over a list of tensors or param groups, fused
    into one kernel where torch supports it (float tensors on the CPU or CUDA): on the
    CPU a step over the VQGAN's many small tensors is ~6× cheaper (1.2 vs 7.9 ms)."""
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    try:
        return cls(params, lr=lr, betas=betas, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
        return cls(params, lr=lr, betas=betas)


def make_optimizer(cfg: StageTrainConfig, params: list[Any], lr: float) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` names (``adam``, ``adamw``: fused where torch can;
    ``sgd``: plain, an update linear in the gradient) with ``cfg.betas``; param groups
    keep their own weight decay."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr)
    assert cfg.betas is not None  # filled by the stage's defaults
    return make_adam(params, lr, tuple(cfg.betas), decoupled=cfg.optimizer == "adamw")


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
