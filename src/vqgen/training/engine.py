"""The training floor's public names, in one import (kept for code written against it).

The pieces live by job: :mod:`~vqgen.training.loop` (``fit``, signals, progress),
:mod:`~vqgen.training.objective` (the contract), :mod:`~vqgen.training.runtime`
(devices, DDP, AMP, seeding), :mod:`~vqgen.training.checkpointer`,
:mod:`~vqgen.training.loggers`, :mod:`~vqgen.training.batches`,
:mod:`~vqgen.training.optim`, :mod:`~vqgen.training.objectives` and
:mod:`~vqgen.training.stages` (``train_tokenizer``, ``train_prior``).

**Distributed**: under ``torchrun`` every process trains on its slice of each global
batch (``batch_size`` is per process), gradients are averaged by DistributedDataParallel
(the discriminator's by the runtime, since it is called three times per step), and rank
0 alone logs, previews and checkpoints. With the same global batch the result equals one
process, for models without dropout and without data-dependent codebook updates
(k-means init and code restarts are computed on each rank's batch, then rank 0's
codebook is broadcast). Fitted tokenizers see the whole global batch on every rank.
"""

from __future__ import annotations

from vqgen.core.checkpoint import load_component, save_component
from vqgen.core.data import held_out_dataset
from vqgen.core.progress import progress_bar
from vqgen.training.batches import batch_stream
from vqgen.training.loggers import JsonlLogger, Logger
from vqgen.training.loop import StopSignals, TrainingInterrupted, fit, resume_command
from vqgen.training.objective import Objective, Optim, StepOutput, check_finite, lr_at
from vqgen.training.objectives.prior import condition_gain, token_nll
from vqgen.training.optim import make_adam, make_optimizer, optimizer_groups, resolve_lr
from vqgen.training.runtime import (
    DistInfo,
    Runtime,
    barrier,
    resolve_device,
    seed_everything,
    setup_distributed,
    world_size,
)
from vqgen.training.stages import train_prior, train_tokenizer

__all__ = [
    "DistInfo",
    "JsonlLogger",
    "Logger",
    "Objective",
    "Optim",
    "Runtime",
    "StepOutput",
    "StopSignals",
    "TrainingInterrupted",
    "barrier",
    "batch_stream",
    "check_finite",
    "condition_gain",
    "fit",
    "held_out_dataset",
    "load_component",
    "lr_at",
    "make_adam",
    "make_optimizer",
    "optimizer_groups",
    "progress_bar",
    "resolve_device",
    "resolve_lr",
    "resume_command",
    "save_component",
    "seed_everything",
    "setup_distributed",
    "token_nll",
    "train_prior",
    "train_tokenizer",
    "world_size",
]
