"""Run directories: train every stage a config needs, in order; load a trained run.

The layout of a run directory is :mod:`vqgen.core.layout`.

Stages run in order: tokenizer → cond (only for a conditioner with a tokenizer
of its own) → token cache → prior. A stage whose ``meta.json`` records the
configured number of steps is finished and skipped; ``resume=True`` continues
an unfinished one from its checkpoint. A run directory only ever holds one
config: training it with a different one is refused, with the differing fields
named.

Why one file of this size: a run directory's life cycle (claim, lock, stages in order,
reuse of another run's stages, load) in short functions, read top to bottom.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import filelock
import yaml
from pydantic import ValidationError

from vqgen.core.config import PipelineConfig, dumps_config, load_config, parse_config
from vqgen.core.errors import VqgenError
from vqgen.core.interfaces import cond_stage_tokenizer
from vqgen.core.io import atomic_write_text
from vqgen.core.layout import (
    BEST_DIR,
    CONFIG_FILE,
    HISTORY_DIR,
    LOCK_FILE,
    LOCK_OWNER_FILE,
    META_FILE,
    PIPELINE_FILE,
    STAGES,
    WEIGHTS_FILE,
    check_run_links,
    read_pipeline_layout,
    write_pipeline_layout,
)
from vqgen.core.pipeline import Pipeline, assemble, cond_offset_problem
from vqgen.core.registry import Registry, default_registry

__all__ = ["STAGES", "config_diff", "load_run", "reuse_config", "stage_step", "train"]



def config_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two nested dicts differ, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += config_diff(a.get(k, "<unset>"), b.get(k, "<unset>"), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} → {b!r}"]


def stage_step(run_dir: Path, stage: str) -> int | None:
    """The step of the stage's last complete checkpoint, or None (nothing trained yet).

    A stage directory that holds checkpoint files without ``meta.json`` is damaged, and
    an error: training over it would throw trained weights away.
    """
    from vqgen.core.checkpoint import checkpoint_dir

    d = checkpoint_dir(run_dir / stage)
    meta = d / META_FILE
    if not meta.is_file():
        # history/ and best/ alone are no checkpoint (a first commit killed before its
        # pointer switch leaves only history/), nor are temporary files (.name)
        left = sorted(p.name for p in d.iterdir() if not p.name.startswith(".")
                      and p.name not in (HISTORY_DIR, BEST_DIR)) if d.is_dir() else []
        if left:
            raise VqgenError(
                f"{d} holds {', '.join(left[:5])}{' …' if len(left) > 5 else ''} but no "
                "meta.json, so the stage's files disagree; nothing was changed. Restore "
                f"meta.json from a whole checkpoint in {run_dir / stage / HISTORY_DIR} (or "
                f"best/), or move {run_dir / stage} away to train the stage afresh"
            )
        return None
    try:
        step = json.loads(meta.read_text(encoding="utf-8"))["step"]
    except (OSError, ValueError, KeyError, TypeError):
        raise VqgenError(f"{meta} is not a vqgen checkpoint (unreadable or truncated)") from None
    if type(step) is not int or not 0 <= step < 2**63:
        raise VqgenError(f"{meta}: step is {step!r}, not a step count (an integer >= 0); the "
                         "checkpoint is damaged or not vqgen's")
    return step


def _claim(run_dir: Path, config: PipelineConfig, registry: Registry) -> None:
    """Write the resolved config, or check it equals the one already there."""
    path = run_dir / CONFIG_FILE
    text = dumps_config(config, "yaml", registry)
    if path.is_file():
        old = _comparable(yaml.safe_load(path.read_text(encoding="utf-8")), registry)
        diff = config_diff(old, _comparable(config.to_dict(), registry))
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


def _comparable(data: Any, registry: Registry) -> Any:
    """A config as the current version resolves it (a run written before a field or a
    stage default existed compares equal to today's resolution of the same config),
    without what does not touch training: ``sampling``, ``train.loggers`` and
    ``train.threads``."""
    if not isinstance(data, dict):
        return data
    try:
        data = parse_config(data, registry=registry).to_dict()
    except VqgenError:
        pass  # compared as written: the difference names what changed
    data.pop("sampling", None)
    if isinstance(data.get("train"), dict):
        data["train"].pop("loggers", None)
        data["train"].pop("threads", None)
    return data


def _conditioner(config: PipelineConfig, registry: Registry) -> Any:
    if config.conditioner is None:
        return None
    return registry.create("conditioner", config.conditioner.name, config.conditioner.params)


def _has_cond_stage(conditioner: Any) -> bool:
    return cond_stage_tokenizer(conditioner) is not None


def _load_cond_tokenizer(run: Path, conditioner: Any, map_location: str = "cpu") -> None:
    """Trained weights of the conditioner's own tokenizer, from ``run/cond``."""
    from vqgen.core.checkpoint import load_weights

    load_weights(conditioner.tokenizer, run / "cond" / WEIGHTS_FILE, map_location)
    conditioner.tokenizer.eval()


def _stage1(run: Path, config: PipelineConfig, stage: str, stages: tuple[str, ...],
            resume: bool, registry: Registry, progress: bool, conditioner: Any = None) -> None:
    """Train a stage-1 stage unless it is finished or not asked for."""
    from vqgen.training.stages import train_tokenizer

    steps = getattr(config.train, stage).steps
    if stage not in stages or stage_step(run, stage) == steps:
        return
    if stage_step(run, stage) is not None and not resume:
        raise VqgenError(
            f"{run / stage} holds an unfinished checkpoint; pass --resume to continue it "
            "(or use a new --run-dir)"
        )
    train_tokenizer(config, run, registry=registry, progress=progress, resume=resume,
                    stage=stage, conditioner=conditioner)


def train(
    config: PipelineConfig | str | os.PathLike[str],
    run_dir: str | os.PathLike[str],
    *,
    stages: tuple[str, ...] = STAGES,
    resume: bool = False,
    registry: Registry | None = None,
    progress: bool = True,
    from_run: str | os.PathLike[str] | None = None,
) -> Pipeline | None:
    """Train the stages of ``config`` into ``run_dir`` (see the module docstring).

    ``from_run``: take the trained tokenizer (and a spatial conditioner's cond stage,
    where both runs configure the same one) from that run instead of training them
    (:func:`reuse_stages`); the new run holds copies and loads on its own.

    Under ``torchrun`` every process calls this; rank 0 writes the run directory, and
    holds its lock (:func:`run_lock`) throughout, so a second ``vqgen train`` on the
    same directory stops at once with an error naming the holder.
    Returns the trained Pipeline, or ``None`` for a config without a prior.
    """
    from vqgen.training.runtime import barrier, configure_threads, setup_distributed

    registry = registry or default_registry()
    if not isinstance(config, PipelineConfig):
        config = load_config(config, registry)
    if from_run is not None:
        config = reuse_config(config, Path(from_run), registry)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise VqgenError(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(STAGES)}")
    configure_threads(config.train.threads)
    check_run_links(run_dir)  # before the lock: its files must not lead outside the run
    lock = run_lock(run_dir) if int(os.environ.get("RANK", "0")) == 0 else None
    with lock or contextlib.nullcontext():  # the config is valid: now the run is ours
        info, _ = setup_distributed(config.train.tokenizer.device)
        run = Path(run_dir)
        if info.main:
            _claim(run, config, registry)
            if from_run is not None:
                reuse_stages(Path(from_run), run, config, registry)
        barrier(info)
        _stage1(run, config, "tokenizer", stages, resume, registry, progress)
        conditioner = _conditioner(config, registry)
        if _has_cond_stage(conditioner):
            _stage1(run, config, "cond", stages, resume, registry, progress, conditioner)
        barrier(info)
        if config.prior is None or "prior" not in stages:
            return None
        return _prior_stage(run, config, conditioner, info, resume, registry, progress)


def _prior_stage(run: Path, config: PipelineConfig, conditioner: Any, info: Any, resume: bool,
                 registry: Registry, progress: bool) -> Pipeline:
    """Train the prior on the trained first stages (or load the finished run)."""
    from vqgen.core.checkpoint import load_component
    from vqgen.training.runtime import barrier
    from vqgen.training.stages import train_prior

    for stage in ("tokenizer", "cond") if _has_cond_stage(conditioner) else ("tokenizer",):
        if stage_step(run, stage) is None:
            raise VqgenError(f"{run} has no trained {stage} stage; train it first "
                             f"(--stages {stage})")
    tokenizer = load_component(run / "tokenizer", registry)
    if _has_cond_stage(conditioner):
        _load_cond_tokenizer(run, conditioner)
    if stage_step(run, "prior") == config.train.prior.steps:  # finished
        if info.main:
            prior = _saved_params(run / "prior", registry)  # its sizes; load_run reads weights
            _restore_layout(run, config, tokenizer, prior, conditioner)
        return load_run(run, registry)
    if stage_step(run, "prior") is not None and not resume:
        raise VqgenError(
            f"{run / 'prior'} holds an unfinished checkpoint; pass --resume to continue it"
        )
    pipe = train_prior(config, tokenizer, conditioner, run, registry=registry,
                       progress=progress, resume=resume)
    if info.main:
        write_pipeline_layout(run, pipe.grid)
    barrier(info)
    return pipe


def _reused(config: PipelineConfig, source: PipelineConfig, registry: Registry) -> list[str]:
    """The stages of ``source`` that ``config`` can take over: the tokenizer always (its
    fit is checked by :func:`reuse_config`), the cond stage where both conditioners have
    the same own tokenizer."""
    stages = ["tokenizer"]
    mine, theirs = _conditioner(config, registry), _conditioner(source, registry)
    if (_has_cond_stage(mine) and _has_cond_stage(theirs)
            and mine.params.tokenizer == theirs.params.tokenizer
            and config.train.cond.input_key == source.train.cond.input_key):
        stages.append("cond")
    return stages


def reuse_config(config: PipelineConfig, source: Path, registry: Registry) -> PipelineConfig:
    """``config`` with the tokenizer (and cond stage, see :func:`_reused`) of the run
    ``source``: their sections and training settings copied, after checking that the
    trained tokenizer fits what ``config`` wires from it (codes, f, channels)."""
    if not (source / CONFIG_FILE).is_file():
        raise VqgenError(f"--from-run {source}: not a vqgen run directory (no {CONFIG_FILE})")
    theirs = load_config(source / CONFIG_FILE, registry)
    mine_tok = registry.create("tokenizer", config.tokenizer.name, config.tokenizer.params)
    their_tok = registry.create("tokenizer", theirs.tokenizer.name, theirs.tokenizer.params)
    sizes = ("vocab_size", "downsample", "in_channels")
    differ = [f"{n} {getattr(their_tok, n)} there, {getattr(mine_tok, n)} here" for n in sizes
              if getattr(their_tok, n, None) != getattr(mine_tok, n, None)]
    if differ:
        raise VqgenError(
            f"--from-run {source}: its tokenizer ({theirs.tokenizer.name}) does not fit this "
            f"config's ({config.tokenizer.name}): {'; '.join(differ)}. Copy the tokenizer "
            f"section of {source / CONFIG_FILE} into this config, or train a tokenizer")
    data = config.to_dict()
    for stage in _reused(config, theirs, registry):
        if stage == "tokenizer":
            data["tokenizer"] = theirs.to_dict()["tokenizer"]
        data["train"][stage] = theirs.to_dict()["train"][stage]
        if stage_step(source, stage) != getattr(theirs.train, stage).steps:
            raise VqgenError(f"--from-run {source}: its {stage} stage is not finished "
                             f"(step {stage_step(source, stage)} of "
                             f"{getattr(theirs.train, stage).steps}); finish it first")
    return parse_config(data, f"<the config with the tokenizer of {source}>", registry)


def reuse_stages(source: Path, run: Path, config: PipelineConfig, registry: Registry) -> None:
    """Copy the trained tokenizer (and cond stage) of ``source`` into ``run`` as finished
    checkpoints (weights and meta through the checkpointer, no training state), unless
    ``run`` has them already. ``meta.json`` records where they came from."""
    from vqgen.core.checkpoint import load_component, read_meta
    from vqgen.training.checkpointer import Checkpointer

    theirs = load_config(source / CONFIG_FILE, registry)
    for stage in _reused(config, theirs, registry):
        if stage_step(run, stage) is not None:
            continue
        meta = read_meta(source / stage)
        if stage == "tokenizer":
            module = load_component(source / stage, registry)
        else:
            conditioner = _conditioner(theirs, registry)
            _load_cond_tokenizer(source, conditioner)
            module = conditioner.tokenizer
        metrics = {**meta.get("metrics", {}), "from_run": str(source.resolve())}
        Checkpointer(run / stage, module, kind=meta["kind"], name=meta["name"],
                     keep_last=1, keep_best=False).save(int(meta["step"]), None, metrics)


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike[str]) -> Iterator[None]:
    """Hold ``run_dir/.lock`` (an OS file lock, released when the process dies, through
    ``filelock``); raise a :class:`VqgenError` naming the holder when another process
    has it. The holder's pid and command line are in ``run_dir/.lock.owner``."""
    run = Path(run_dir)
    try:
        run.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VqgenError(f"cannot create the run directory {run}: {exc.strerror}") from None
    lock = filelock.FileLock(str(run / LOCK_FILE), timeout=0)
    owner = run / LOCK_OWNER_FILE
    try:
        lock.acquire()
    except filelock.Timeout:
        try:
            holder = owner.read_text(encoding="utf-8", errors="replace").strip()[:300]
        except OSError:
            holder = "unknown"
        raise VqgenError(
            f"{run} is in use by another vqgen process ({holder}); wait for it to finish or "
            "stop it, or use another --run-dir"
        ) from None
    except OSError as exc:  # a folder or unwritable file where the lock goes, a read-only run
        raise VqgenError(
            f"cannot lock {run / LOCK_FILE} ({exc.strerror or exc}): training needs a "
            f"writable run directory with {LOCK_FILE} a plain file (or absent); fix the "
            "permissions, remove what stands there, or use another --run-dir") from None
    try:
        atomic_write_text(owner, f"pid {os.getpid()}: {' '.join(sys.argv)[:200]}\n")
        yield
    finally:
        owner.unlink(missing_ok=True)
        lock.release()


def _saved_params(stage_dir: Path, registry: Registry) -> Any:
    """The validated params a stage's checkpoint was saved with (its wired sizes), read
    from ``meta.json`` without the weights; None where they cannot be read (loading the
    run names the problem)."""
    from vqgen.core.checkpoint import read_meta

    try:
        meta = read_meta(stage_dir)
        return registry.validate_params(meta["kind"], meta["name"], meta["params"])
    except VqgenError:
        return None


def _restore_layout(run: Path, config: PipelineConfig, tokenizer: Any, prior: Any,
                    conditioner: Any) -> None:
    """Write ``pipeline.json`` of a finished run again where it is missing, damaged,
    holds a grid that the data's resolution and the tokenizer's f cannot give, or a
    ``cond_offset`` outside the condition ids of ``prior`` (its module or saved params;
    then the default); a good ``cond_offset`` (taming's 0) is kept."""
    expected = _data_grid(config, tokenizer)
    if expected is None:
        return
    try:
        layout = read_pipeline_layout(run)
    except (OSError, ValueError):
        write_pipeline_layout(run, expected)
        return
    offset = layout.cond_offset
    if cond_offset_problem(prior, conditioner, offset) is not None:
        offset = None
    if tuple(layout.grid) != expected or offset != layout.cond_offset:
        write_pipeline_layout(run, expected, offset)


def _data_grid(config: PipelineConfig, tokenizer: Any) -> tuple[int, int] | None:
    """The latent grid the data's resolution gives over the tokenizer's f; None where
    the data set names no resolution."""
    res = config.data.params.get("resolution")
    return tuple(tokenizer.latent_shape(res, res)) if isinstance(res, int) else None


def _stage1_grid(config: PipelineConfig, tokenizer: Any) -> tuple[int, int]:
    """The latent grid of a stage-1-only run: :func:`_data_grid` (1×1 where the data set
    names no resolution)."""
    return _data_grid(config, tokenizer) or (1, 1)


def load_run(run_dir: str | os.PathLike[str], registry: Registry | None = None,
             map_location: str = "cpu") -> Pipeline:
    """The trained Pipeline of a run directory, in eval mode."""
    from vqgen.core.checkpoint import load_component

    registry = registry or default_registry()
    run = Path(run_dir)
    check_run_links(run)
    if not (run / CONFIG_FILE).is_file():
        raise VqgenError(f"{run} is not a vqgen run directory (no {CONFIG_FILE})")
    config = load_config(run / CONFIG_FILE, registry)
    conditioner = _conditioner(config, registry)
    needed = ["tokenizer"] + ["cond"] * _has_cond_stage(conditioner) + ["prior"] * bool(
        config.prior)
    from vqgen.training.loop import resume_command

    resume = f"`{resume_command(run)}`"
    for stage in needed:
        step = stage_step(run, stage)
        if step is None:
            raise VqgenError(f"{run} has no trained {stage} stage yet; train it with {resume}")
        total = getattr(config.train, stage).steps
        if step < total and not (run / PIPELINE_FILE).is_file():
            raise VqgenError(f"the {stage} stage of {run} is unfinished (step {step} of "
                             f"{total}); finish it with {resume}")
    tokenizer = load_component(run / "tokenizer", registry, map_location)
    try:
        layout = read_pipeline_layout(run)
        grid, cond_offset = layout.grid, layout.cond_offset
    except FileNotFoundError:
        if config.prior is not None:
            raise VqgenError(f"{run / PIPELINE_FILE} is missing: the run's prior finished "
                             f"without it; write it again with {resume}") from None
        grid, cond_offset = _stage1_grid(config, tokenizer), None  # stage 1 only: no prior
    except (OSError, ValueError) as err:  # pydantic's ValidationError is a ValueError
        why = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'the file'}: {e['msg']}"
                        for e in err.errors()) if isinstance(err, ValidationError) else err
        raise VqgenError(f"{run / PIPELINE_FILE} is damaged ({why}); write it again "
                         f"with {resume}") from None
    expected = _data_grid(config, tokenizer)
    if config.prior is not None and expected is not None and tuple(grid) != expected:
        raise VqgenError(
            f"{run / PIPELINE_FILE} is damaged (grid {list(grid)}, but the data's resolution "
            f"over the tokenizer's f gives {list(expected)}); write it again with {resume}")
    prior = load_component(run / "prior", registry, map_location) if config.prior else None
    if (why := cond_offset_problem(prior, conditioner, cond_offset)) is not None:
        raise VqgenError(f"{run / PIPELINE_FILE} is damaged ({why}); write it again with "
                         f"{resume}")
    if _has_cond_stage(conditioner):
        _load_cond_tokenizer(run, conditioner, map_location)
    pipe = assemble(config, tokenizer, conditioner, grid, registry, prior=prior,
                    cond_offset=cond_offset)
    return pipe.to(map_location).eval()


def run_demo(config: str | os.PathLike[str], out: str | os.PathLike[str], *,
             per_class: int = 8, classifier_steps: int = 800) -> dict[str, Any]:
    """``make demo``: train ``config`` into ``out`` (resuming), then write its pictures
    and ``metrics.json`` (:func:`vqgen.evaluation.demo_report`)."""
    import time

    from vqgen.evaluation import demo_report

    started = time.time()
    train(config, out, resume=True)
    return demo_report(load_run(out), out, train_s=time.time() - started, started=started,
                       per_class=per_class, classifier_steps=classifier_steps)
