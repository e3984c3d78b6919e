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
    taming_import.json   an imported run's record of the tensors loaded and dropped
    eval.json, classifier.safetensors   `vqgen eval`'s report and the judge it uses

A stage directory holds ``current`` → ``history/step_NNNNNN`` (one whole checkpoint),
top-level links through it, and ``best/``; :mod:`vqgen.core.checkpoint` writes it.
Training (:mod:`vqgen.training`), run directories (:mod:`vqgen.runs`) and importers
(:mod:`vqgen.importers`) take every name from here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pydantic import BaseModel, NonNegativeInt, PositiveInt

from vqgen.core.errors import VqgenError
from vqgen.core.io import atomic_write_text

__all__ = [
    "BEST_DIR",
    "BEST_FILE",
    "CLASSIFIER_FILE",
    "CONFIG_FILE",
    "CURRENT",
    "DEMO_METRICS",
    "DEMO_RECONSTRUCTIONS",
    "DEMO_SAMPLES",
    "EVAL_FILE",
    "HISTORY_DIR",
    "IMPORT_FILE",
    "IMAGES_DIR",
    "LOCK_FILE",
    "LOCK_OWNER_FILE",
    "META_FILE",
    "METRICS_FILE",
    "PIPELINE_FILE",
    "STAGES",
    "STATE_FILE",
    "TENSORBOARD_DIR",
    "TOKENS_DIR",
    "WEIGHTS_FILE",
    "RUN_INPUTS",
    "PipelineLayout",
    "check_run_links",
    "read_pipeline_layout",
    "refuse_run_input",
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
LOCK_OWNER_FILE = ".lock.owner"
CLASSIFIER_FILE = "classifier.safetensors"  # the judge `vqgen eval` finds by itself
EVAL_FILE = "eval.json"  # what `vqgen eval` writes by default
IMPORT_FILE = "taming_import.json"  # an imported run's record of what was loaded
# what `make demo` (vqgen.evaluation.demo) writes beside the stages
DEMO_SAMPLES = "samples.png"
DEMO_RECONSTRUCTIONS = "reconstructions.png"
DEMO_METRICS = "metrics.json"
# inside a stage directory (vqgen.core.checkpoint) and a token cache folder
META_FILE = "meta.json"  # a checkpoint's (and a token cache's) description
WEIGHTS_FILE = "weights.safetensors"
STATE_FILE = "train_state.pt"
HISTORY_DIR = "history"
BEST_DIR = "best"
BEST_FILE = "best.json"
CURRENT = "current"
#: what vqgen reads back from a run: an output written over one of them is refused
RUN_INPUTS = (CONFIG_FILE, PIPELINE_FILE, METRICS_FILE, LOCK_FILE, LOCK_OWNER_FILE,
              CLASSIFIER_FILE, IMPORT_FILE, TOKENS_DIR, TENSORBOARD_DIR, IMAGES_DIR, *STAGES)


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


# -- a run directory is untrusted input ---------------------------------------------
_OWN_LINKS = (  # (name in a stage folder, its target) of the links the checkpointer makes
    (re.compile(r"\.?current(\.tmp)?"), re.compile(r"history/step_\d{6}")),
    (re.compile(r"\.?(?P<name>[^/]+?)(\.tmp)?"), re.compile(r"current/(?P<name>[^/]+)")),
)


def _own_link(rel: tuple[str, ...], target: str) -> bool:
    """Whether the link at ``rel`` (inside a run) pointing at ``target`` is one that the
    checkpointer writes: ``<stage>/current`` → ``history/step_NNNNNN`` or
    ``<stage>/<file>`` → ``current/<file>`` (or their ``.tmp`` of a commit cut short)."""
    if len(rel) != 2 or rel[0] not in STAGES:
        return False
    for name_re, target_re in _OWN_LINKS:
        name, aim = name_re.fullmatch(rel[1]), target_re.fullmatch(target)
        if name and aim and name.groupdict().get("name") == aim.groupdict().get("name"):
            return True
    return False


def check_run_links(run: str | os.PathLike[str]) -> None:
    """Refuse a run directory that holds a symbolic link vqgen did not make.

    A run directory may come from someone else (a download, a shared folder); a link
    in it could make vqgen read, write or delete outside it. Every link below ``run``
    (found with ``lstat``, never followed) must be one of the checkpointer's own
    (:func:`_own_link`); any other is a :class:`VqgenError` naming the link and its
    target. ``run`` itself may be a link (the user's choice of where it lives)."""
    root = Path(run)
    if not root.is_dir():
        return
    for top, dirs, files in os.walk(root):  # never descends through a linked folder
        for name in (*dirs, *files):
            path = Path(top) / name
            if not path.is_symlink():
                continue
            target = os.readlink(path)
            if not _own_link(path.relative_to(root).parts, target):
                raise VqgenError(
                    f"{path} is a symbolic link to {target}: a run directory must not hold "
                    f"links that vqgen did not make (through one, vqgen would read or write "
                    f"outside {root}); replace it with the file or folder itself, or remove it")


def _run_of(path: Path) -> Path | None:
    """The run directory that ``path`` lies in (a folder with a config.yaml and a stage
    folder), or None."""
    for folder in path.parents:
        if (folder / CONFIG_FILE).is_file() and any((folder / s).is_dir() for s in STAGES):
            return folder
    return None


def refuse_run_input(path: str | os.PathLike[str], flag: str) -> None:
    """Refuse an output ``path`` (given with ``flag``, e.g. ``-o``) that is, or lies in,
    something a run directory reads back (:data:`RUN_INPUTS`): writing it would destroy
    the run. Checked where the path resolves (an output written through a link lands at
    its target)."""
    real = Path(os.path.realpath(path))
    run = _run_of(real)
    if run is None:
        return
    rel = real.relative_to(run)
    if rel.parts and rel.parts[0] in RUN_INPUTS:
        raise VqgenError(
            f"{flag} {path}: refusing to write {rel} of the run directory {run}; vqgen "
            "reads it back, so the run would be lost; write somewhere else")
