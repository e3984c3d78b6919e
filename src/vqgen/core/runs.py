"""Run directories: train every stage a config needs, in order; load a trained run.

Layout of a run directory::

    config.yaml          the resolved config (every default filled in)
    metrics.jsonl        one record per log interval, every stage
    images/              preview grids
    tokenizer/           stage 1: weights.safetensors, meta.json, train_state.pt, ...
    tokens/<key>/        the token cache of the trained tokenizer
    prior/               stage 2: weights.safetensors, meta.json, train_state.pt
    pipeline.json        what `Pipeline.from_run` needs beyond the config (the grid)

A stage whose ``meta.json`` records the configured number of steps is finished
and skipped; ``resume=True`` continues an unfinished one from its checkpoint. A
run directory only ever holds one config: training it with a different one is
refused, with the differing fields named.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from vqgen.core.config import PipelineConfig, dumps_config, load_config
from vqgen.core.errors import VqgenError
from vqgen.core.io import atomic_write_text
from vqgen.core.pipeline import Pipeline, RasterOrder
from vqgen.core.registry import Registry, default_registry

__all__ = ["STAGES", "config_diff", "load_run", "stage_step", "train"]

STAGES = ("tokenizer", "prior")
CONFIG_FILE = "config.yaml"
PIPELINE_FILE = "pipeline.json"


def config_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two nested dicts differ, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += config_diff(a.get(k, "<unset>"), b.get(k, "<unset>"), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} → {b!r}"]


def stage_step(run_dir: Path, stage: str) -> int | None:
    """The step of the stage's last complete checkpoint, or None."""
    meta = run_dir / stage / "meta.json"
    if not meta.is_file():
        return None
    try:
        return int(json.loads(meta.read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        raise VqgenError(f"{meta} is not a vqgen checkpoint (unreadable or truncated)") from None


def _claim(run_dir: Path, config: PipelineConfig, registry: Registry) -> None:
    """Write the resolved config, or check it equals the one already there."""
    path = run_dir / CONFIG_FILE
    text = dumps_config(config, "yaml", registry)
    if path.is_file():
        old = yaml.safe_load(path.read_text(encoding="utf-8"))
        diff = config_diff(old, config.to_dict())
        if diff:
            raise VqgenError(
                f"{run_dir} was trained with a different config; it differs in "
                + "; ".join(diff[:10])
                + (" …" if len(diff) > 10 else "")
                + ". Use a new --run-dir, or the config saved in "
                f"{path} to continue this run"
            )
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def _conditioner(config: PipelineConfig, registry: Registry) -> Any:
    if config.conditioner is None:
        return None
    cond = registry.create("conditioner", config.conditioner.name, config.conditioner.params)
    if getattr(cond, "tokenizer", None) is not None:
        raise VqgenError(
            f"conditioner {config.conditioner.name!r} has a tokenizer of its own (a cond "
            "stage); training cond stages from a config is not supported yet — train it in "
            "Python (vqgen.conditioners.base.ConditionInputs) and pass the conditioner"
        )
    return cond


def train(
    config: PipelineConfig | str | os.PathLike[str],
    run_dir: str | os.PathLike[str],
    *,
    stages: tuple[str, ...] = STAGES,
    resume: bool = False,
    registry: Registry | None = None,
    progress: bool = True,
) -> Pipeline | None:
    """Train the stages of ``config`` into ``run_dir`` (see the module docstring).

    Returns the trained Pipeline, or ``None`` for a config without a prior.
    """
    from vqgen.core.stage2 import train_prior
    from vqgen.core.training import load_component, train_tokenizer

    registry = registry or default_registry()
    if not isinstance(config, PipelineConfig):
        config = load_config(config, registry)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise VqgenError(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(STAGES)}")
    run = Path(run_dir)
    _claim(run, config, registry)
    tok_done = stage_step(run, "tokenizer") == config.train.tokenizer.steps
    if "tokenizer" in stages and not tok_done:
        if stage_step(run, "tokenizer") is not None and not resume:
            raise VqgenError(
                f"{run / 'tokenizer'} holds an unfinished checkpoint; pass --resume to "
                "continue it (or use a new --run-dir)"
            )
        train_tokenizer(config, run, registry=registry, progress=progress, resume=resume)
    if config.prior is None or "prior" not in stages:
        return None
    if stage_step(run, "tokenizer") is None:
        raise VqgenError(f"{run} has no trained tokenizer; train the tokenizer stage first")
    tokenizer = load_component(run / "tokenizer", registry)
    conditioner = _conditioner(config, registry)
    done = stage_step(run, "prior") == config.train.prior.steps
    if done:
        return load_run(run, registry)
    if stage_step(run, "prior") is not None and not resume:
        raise VqgenError(
            f"{run / 'prior'} holds an unfinished checkpoint; pass --resume to continue it"
        )
    pipe = train_prior(config, tokenizer, conditioner, run, registry=registry,
                       progress=progress, resume=resume)
    atomic_write_text(run / PIPELINE_FILE, json.dumps({"grid": list(pipe.grid)}) + "\n")
    return pipe


def load_run(run_dir: str | os.PathLike[str], registry: Registry | None = None,
             map_location: str = "cpu") -> Pipeline:
    """The trained Pipeline of a run directory, in eval mode."""
    from vqgen.core.training import load_component

    registry = registry or default_registry()
    run = Path(run_dir)
    if not (run / CONFIG_FILE).is_file():
        raise VqgenError(f"{run} is not a vqgen run directory (no {CONFIG_FILE})")
    config = load_config(run / CONFIG_FILE, registry)
    for stage in STAGES:
        if stage_step(run, stage) is None and (stage != "prior" or config.prior is not None):
            raise VqgenError(f"{run} has no trained {stage} yet; run `vqgen train` first")
    try:
        grid = tuple(json.loads((run / PIPELINE_FILE).read_text())["grid"])
    except (OSError, ValueError, KeyError):
        raise VqgenError(f"{run / PIPELINE_FILE} is missing or unreadable") from None
    tokenizer = load_component(run / "tokenizer", registry, map_location)
    prior = load_component(run / "prior", registry, map_location) if config.prior else None
    ordering = (registry.create("ordering", config.ordering.name, config.ordering.params)
                if config.ordering else RasterOrder())
    sampler = (registry.create("sampler", config.sampler.name, config.sampler.params)
               if config.sampler else None)
    pipe = Pipeline(tokenizer, prior, grid=(int(grid[0]), int(grid[1])), ordering=ordering,
                    sampler=sampler, conditioner=_conditioner(config, registry))
    pipe.config = config  # type: ignore[attr-defined]
    return pipe.to(map_location).eval()
