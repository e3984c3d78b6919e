"""The Objective contract: what one training stage computes, and nothing of the loop.

An objective says what one micro-batch computes (:meth:`Objective.step`: losses and
logs), which optimizers update which parameters (:meth:`Objective.optimizers`), its
learning-rate schedule, its batches, what it evaluates, previews and keeps in a
checkpoint. It never calls ``backward``, steps an optimizer, scales, talks to other
ranks or writes a file: the loop (:func:`vqgen.training.loop.fit`) does, through the
:class:`~vqgen.training.runtime.Runtime` and the
:class:`~vqgen.training.checkpointer.Checkpointer`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vqgen.core.config import StageTrainConfig
from vqgen.core.errors import VqgenError

__all__ = ["Objective", "Optim", "StepOutput", "check_finite", "lr_at"]


@dataclass
class StepOutput:
    """What one micro-batch computed.

    ``losses`` are backwarded in order, each divided by the number of micro-batches
    (objectives with disjoint parameter sets, such as generator and discriminator,
    give one loss each); ``logs`` are scalars for the progress bar and metrics
    (checked for NaN / inf); ``flags`` are summed over micro-batches and ranks and
    handed to :meth:`Objective.after_update` (e.g. "a code was restarted").
    """

    losses: Sequence[torch.Tensor] = ()
    logs: Mapping[str, Any] = field(default_factory=dict)
    flags: Mapping[str, float] = field(default_factory=dict)


@dataclass
class Optim:
    """An optimizer and how the loop steps it.

    ``clip``: clip the gradient norm of ``params`` to it first; ``active(step)``: whether
    it steps at all (a discriminator switched on later); ``average``: a module whose
    gradients the runtime averages over ranks itself (it is not wrapped by DDP).
    """

    optimizer: torch.optim.Optimizer
    params: Sequence[torch.Tensor] = ()
    clip: float | None = None
    active: Callable[[int], bool] = lambda step: True
    average: nn.Module | None = None


def lr_at(step: int, base: float, warmup: int, total: int, floor: float = 0.1,
          schedule: str = "cosine") -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``floor × base``
    (or ``base`` throughout with ``schedule="constant"``)."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant":
        return base
    progress = (step - warmup) / max(1, total - warmup)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def check_finite(step: int, terms: Mapping[str, Any]) -> None:
    """Raise a :class:`VqgenError` naming the step and the non-finite loss terms: the
    terms that blew up first, then the total ``loss`` that they make non-finite too."""
    bad = [(name, float(v)) for name, v in terms.items() if not math.isfinite(float(v))]
    if not bad:
        return
    bad.sort(key=lambda item: item[0] == "loss")  # the parts before their sum
    named = ", ".join(f"{name} = {v}" for name, v in bad)
    raise VqgenError(
        f"non-finite loss at step {step}: {named}. Lower the learning rate, check the data "
        "for NaN/inf values, or resume from an earlier checkpoint"
    )


class Objective:
    """One stage's training, as the loop sees it (see the module docstring).

    Attributes set by a subclass: ``stage`` (the name in metrics and messages),
    ``desc`` (the progress bar's label), ``cfg`` (its :class:`StageTrainConfig`),
    ``shown`` (log keys in the progress bar), ``micro_batches`` (per step; default
    ``cfg.grad_accum``), ``val_key`` (the :meth:`evaluate` value that picks ``best/``),
    ``global_logs`` (log keys averaged over ranks in the step's one collective, rather
    than rank 0's own), ``model`` (the module the runtime wrapped, whose gradient sync
    waits for the last micro-batch; None for none).
    """

    stage: str
    desc: str
    cfg: StageTrainConfig
    shown: tuple[str, ...] = ("loss",)
    val_key: str | None = None
    global_logs: tuple[str, ...] = ()
    model: nn.Module | None = None
    save_if_idle = True  # a run resumed at its last step still leaves a checkpoint

    @property
    def micro_batches(self) -> int:
        """Micro-batches per optimisation step."""
        return self.cfg.grad_accum

    def start(self, start: int) -> None:
        """Before the first step (after a checkpoint was restored): training mode,
        per-rank random streams, the wrapped ``model``."""

    def batches(self, start: int) -> Iterator[Any]:
        """Endless micro-batches, positioned as an uninterrupted run at step ``start``."""
        raise NotImplementedError

    def optimizers(self) -> list[Optim]:
        """The optimizers the loop steps, in order (none for a fitted stage)."""
        return []

    def lr(self, step: int) -> float | None:
        """The learning rate of every optimizer at ``step`` (None: the optimizer's own)."""
        return None

    def step(self, batch: Any, step: int) -> StepOutput:
        """What one micro-batch computes (inside the runtime's autocast)."""
        raise NotImplementedError

    def after_update(self, step: int, flags: Mapping[str, float]) -> None:
        """After the step's updates; ``flags`` summed over micro-batches and ranks."""

    def record(self, logs: Mapping[str, float]) -> dict[str, Any]:
        """The metrics record of the steps since the last one, from their mean ``logs``."""
        return dict(logs)

    def evaluate(self, done: int) -> dict[str, float]:
        """Held-out metrics after ``done`` steps (on rank 0; empty where there are none)."""
        return {}

    def preview(self, done: int) -> torch.Tensor | None:
        """A picture of the model after ``done`` steps ``[C, H, W]`` in [0, 1], or None."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """Training state beyond the weights (optimizers, generators)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
