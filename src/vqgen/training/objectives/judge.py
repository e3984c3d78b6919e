"""The judges' objective: a classifier or segmenter trained with cross-entropy on random
batches (see :mod:`vqgen.training.judges` for the training functions and the CLI)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from vqgen.core.config import StageTrainConfig
from vqgen.core.errors import VqgenError
from vqgen.training.objective import Objective, Optim, StepOutput

__all__ = ["JudgeObjective"]


class JudgeObjective(Objective):
    """One AdamW step of a judge on a random batch; the losses kept in ``history``."""

    save_if_idle = False

    def __init__(self, model: nn.Module, batches: Any,
                 loss_fn: Callable[[torch.Tensor, tuple[torch.Tensor, ...]], torch.Tensor], *,
                 steps: int, batch_size: int, lr: float, device: torch.device,
                 desc: str) -> None:
        if steps < 1 or batch_size < 1 or lr <= 0:
            raise VqgenError(
                f"{desc}: steps and batch_size must be at least 1 and lr > 0, "
                f"got steps={steps}, batch_size={batch_size}, lr={lr}"
            )
        self.stage, self.desc = "judge", desc
        self.cfg = StageTrainConfig(steps=steps, batch_size=batch_size, log_every=steps,
                                    image_every=0)
        self.model_, self.data, self.loss_fn, self.device = model, batches, loss_fn, device
        model.to(device).train()
        self.base_lr = lr
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        self.warmup = max(1, steps // 20)
        self.history: list[float] = []

    def lr(self, step: int) -> float:
        """Linear warm-up over 5 % of the steps, then cosine decay to 0."""
        steps, warmup = self.cfg.steps, self.warmup
        scale = min((step + 1) / warmup,
                    0.5 * (1 + math.cos(math.pi * min(step / steps, 1.0))))
        return self.base_lr * scale

    def optimizers(self) -> list[Optim]:
        return [Optim(self.opt)]

    def batches(self, start: int) -> Iterator[tuple[torch.Tensor, ...]]:
        while True:
            yield tuple(t.to(self.device) for t in self.data.next(self.cfg.batch_size))

    def step(self, batch: tuple[torch.Tensor, ...], step: int) -> StepOutput:
        loss = self.loss_fn(self.model_(batch[0]), batch)
        self.history.append(loss.item())
        return StepOutput([loss], {"loss": loss.detach()})
