"""The run directory: every name in it, in one place.

::

    config.yaml          the resolved config (every default filled in, sizes wired)
    metrics.jsonl        one record per log interval, every stage
    images/              preview grids: <stage>_<step>.png
    tensorboard/         event files of the tensorboard logger (train.loggers)
    tokenizer/           stage 1 (a checkpointed stage: see vqgen.core.checkpoint)
    cond/                a spatial conditioner's own tokenizer (the paper's cond stage)
    tokens/<key>/        the token cache of the trained tokenizer (and conditioner)
    prior/               stage 2
    pipeline.json        what loading needs beyond the config: the grid, and
                         optionally cond_offset (0 for taming imports: shared id range)
    .lock, .lock.owner   held by the process training the run (an OS lock that dies
                         with it); the owner file names its pid and command line

A stage directory holds ``current`` → ``history/step_NNNNNN`` (one whole checkpoint),
top-level links through it, and ``best/``; :mod:`vqgen.core.checkpoint` writes it.
Training (:mod:`vqgen.training`), run directories (:mod:`vqgen.runs`) and importers
(:mod:`vqgen.importers`) take every name from here.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, NonNegativeInt, PositiveInt

from vqgen.core.io import atomic_write_text

__all__ = [
    "BEST_DIR",
    "BEST_FILE",
    "CONFIG_FILE",
    "CURRENT",
    "HISTORY_DIR",
    "IMAGES_DIR",
    "LOCK_FILE",
    "META_FILE",
    "METRICS_FILE",
    "PIPELINE_FILE",
    "STAGES",
    "STATE_FILE",
    "TENSORBOARD_DIR",
    "TOKENS_DIR",
    "WEIGHTS_FILE",
    "PipelineLayout",
    "read_pipeline_layout",
    "write_pipeline_layout",
]

STAGES = ("tokenizer", "cond", "prior")  # checkpointed stages, in training order
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
IMAGES_DIR = "images"
TENSORBOARD_DIR = "tensorboard"
TOKENS_DIR = "tokens"
PIPELINE_FILE = "pipeline.json"
LOCK_FILE = ".lock"
# inside a stage directory (vqgen.core.checkpoint) and a token cache folder
META_FILE = "meta.json"  # a checkpoint's (and a token cache's) description
WEIGHTS_FILE = "weights.safetensors"
STATE_FILE = "train_state.pt"
HISTORY_DIR = "history"
BEST_DIR = "best"
BEST_FILE = "best.json"
CURRENT = "current"


class PipelineLayout(BaseModel):
    """``pipeline.json``: the code grid the prior was trained on and, where the
    condition tokens are offset into a shared vocabulary (taming imports), the offset."""

    grid: tuple[PositiveInt, PositiveInt]
    cond_offset: NonNegativeInt | None = None


def read_pipeline_layout(run: str | os.PathLike[str]) -> PipelineLayout:
    """``run/pipeline.json``; raises OSError (missing, unreadable) or ValueError
    (pydantic's ValidationError: damaged)."""
    return PipelineLayout.model_validate_json((Path(run) / PIPELINE_FILE).read_bytes())


def write_pipeline_layout(run: str | os.PathLike[str], grid: tuple[int, int],
                          cond_offset: int | None = None) -> Path:
    """Write ``run/pipeline.json`` atomically."""
    layout = PipelineLayout(grid=grid, cond_offset=cond_offset)
    return atomic_write_text(Path(run) / PIPELINE_FILE,
                             layout.model_dump_json(exclude_none=True) + "\n")
