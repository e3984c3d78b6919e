"""Training: the stage loops (:mod:`vqgen.training.engine`) and what they share.

A floor above the components: it trains any tokenizer, conditioner and prior through
their interfaces, and is used by :mod:`vqgen.runs` (the run directory) and the CLI.
"""

from vqgen.training.engine import (
    DistInfo,
    MetricsLogger,
    StopSignals,
    TrainingInterrupted,
    batch_stream,
    build_pipeline,
    check_finite,
    condition_gain,
    held_out_dataset,
    lr_at,
    make_adam,
    optimizer_groups,
    progress_bar,
    resolve_device,
    resolve_lr,
    resume_command,
    seed_everything,
    setup_distributed,
    token_nll,
    train_prior,
    train_tokenizer,
    world_size,
)

__all__ = [
    "DistInfo",
    "MetricsLogger",
    "StopSignals",
    "TrainingInterrupted",
    "batch_stream",
    "build_pipeline",
    "check_finite",
    "condition_gain",
    "held_out_dataset",
    "lr_at",
    "make_adam",
    "optimizer_groups",
    "progress_bar",
    "resolve_device",
    "resolve_lr",
    "resume_command",
    "seed_everything",
    "setup_distributed",
    "token_nll",
    "train_prior",
    "train_tokenizer",
    "world_size",
]
