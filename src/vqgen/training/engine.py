"""The training engine: one loop (:func:`run_loop`) and the stage objectives.

:func:`run_loop` owns the steps, the progress bar, when metrics are logged, previews
drawn and checkpoints written (``log_every``, ``image_every``, ``checkpoint_every``),
SIGINT / SIGTERM (:class:`StopSignals`: finish the step, checkpoint, raise
:class:`TrainingInterrupted`) and the checkpoint of a run with nothing left to do.
An :class:`Objective` says what one step computes and what is logged and saved:

* :class:`_Fitted` — a tokenizer fitted without gradients (the
  :class:`~vqgen.core.interfaces.Fitted` protocol: ``fit_step(x, generator)``,
  k-means), one step per global batch.
* :class:`_Adversarial` — a tokenizer with a loss of its own and a discriminator
  (:class:`~vqgen.core.interfaces.Adversarial`: ``build_loss()``, VQGAN); generator
  and discriminator get an Adam optimizer each, AMP and channels-last on CUDA.
* :class:`_Prior` — the autoregressive prior on cached tokens (below).
* the judges' objective lives in :mod:`vqgen.training.judges`.

Shared helpers: the learning-rate rule (:func:`resolve_lr`), seeding, an endless,
resumable and rank-sharded batch stream (:func:`batch_stream`), ``metrics.jsonl``
logging (:class:`MetricsLogger`), non-finite loss detection (:func:`check_finite`)
and distributed training through ``torchrun`` (:func:`setup_distributed`).
Checkpoint files are written by :mod:`vqgen.core.checkpoint`.

Optional for stage-1 tokenizers: ``input_key`` (the batch key trained on, default
``"image"``), ``prepare_input(value) -> tensor`` and ``to_rgb(x) -> images`` for
preview grids. The same objectives train a spatial conditioner's own tokenizer (the
"cond" stage) on ``conditioner.condition_input(batch)``.

**Stage 2** (:func:`train_prior`): the dataset is encoded once by the trained
tokenizer (and conditioner) into a :class:`~vqgen.training.tokens.TokenCache`
(``run_dir/tokens/<key>/``); the prior trains on those grids, flattened by the
ordering. AdamW (betas 0.9 / 0.95, weight decay on Linear and conv weights only),
linear warm-up then cosine decay to 10 %, gradient clipping and accumulation,
condition dropout (for classifier-free guidance), bf16 autocast on CUDA,
optional ``torch.compile``.

A run directory gets::

    metrics.jsonl                 one JSON record per log_every steps ("stage" names it)
    images/<stage>_<step>.png     inputs (top row) above reconstructions
    tokenizer/  cond/  prior/     checkpoints (layout: vqgen.core.checkpoint)
    tokens/<key>/                 the token cache

**Distributed**: under ``torchrun`` every process trains on its slice of each
global batch (``batch_size`` is per process), gradients are averaged by
DistributedDataParallel (the discriminator's by an explicit all-reduce, since it
is called three times per step), and rank 0 alone logs, previews and checkpoints.
With the same global batch the result equals one process, for models without
dropout and without data-dependent codebook updates (k-means init and code
restarts are computed on each rank's batch, then rank 0's codebook is broadcast).
Fitted tokenizers see the whole global batch on every rank.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shlex
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from vqgen.conditioners.base import drop_condition
from vqgen.core.checkpoint import (
    CheckpointError,
    checkpoint_commit,
    checkpoint_dir,
    extra_buffers,
    keep_checkpoint,
    load_component,
    load_train_state,
    load_weights,
    read_meta,
    restore_buffers,
    rng_state,
    save_component,
    save_state,
    save_tensors,
    set_rng_state,
)
from vqgen.core.config import PipelineConfig, StageTrainConfig
from vqgen.core.data import ConditionInputs
from vqgen.core.errors import InterruptedAgain, VqgenError
from vqgen.core.interfaces import (
    Adversarial,
    Fitted,
    InitFromCodeVectors,
    cond_stage_tokenizer,
)
from vqgen.core.layout import IMAGES_DIR, METRICS_FILE, TOKENS_DIR
from vqgen.core.pipeline import Pipeline, align_condition, assemble
from vqgen.core.registry import Registry, default_registry
from vqgen.training.tokens import TokenCache

__all__ = [
    "DistInfo",
    "MetricsLogger",
    "StopSignals",
    "TrainingInterrupted",
    "batch_stream",
    "check_finite",
    "condition_gain",
    "held_out_dataset",
    "load_component",
    "lr_at",
    "make_adam",
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

log = logging.getLogger(__name__)

PREVIEW_IMAGES = 8  # samples in a preview grid
VAL_IMAGES = 64  # held-out samples behind a stage-1 validation loss
LN2 = math.log(2.0)


# =============================================================================
# shared helpers


def world_size() -> int:
    """Processes in the torch.distributed group (1 when not distributed)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def resolve_lr(cfg: StageTrainConfig, world: int | None = None) -> float:
    """The paper's rule ``base_lr × batch_size × grad_accum × world_size``, or ``cfg.lr``."""
    if cfg.lr is not None:
        return cfg.lr
    return cfg.base_lr * cfg.batch_size * cfg.grad_accum * (world or world_size())


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; anything else as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise VqgenError(f"invalid device {name!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise VqgenError(f"device {name!r} was requested but CUDA is not available")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _EpochBatches:
    """Index batches, a fresh permutation per epoch, starting at batch ``start``.

    Each global batch holds ``batch_size × world`` indices; rank ``r`` gets the
    ``r``-th slice, so the ranks together see what one process with the global
    batch would.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int = 0,
                 rank: int = 0, world: int = 1) -> None:
        self.n, self.batch_size, self.seed, self.start = n, batch_size, seed, start
        self.rank, self.world = rank, world
        self.global_batch = batch_size * world
        self.drop_last = n >= self.global_batch
        self.per_epoch = n // self.global_batch if self.drop_last else 1

    def __iter__(self) -> Iterator[list[int]]:
        epoch, offset = divmod(self.start, self.per_epoch)
        g0, bs = self.rank * self.batch_size, self.batch_size
        while True:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
            for b in range(offset, self.per_epoch):
                batch = perm[b * self.global_batch : (b + 1) * self.global_batch]
                yield batch[g0 : g0 + bs] if self.world > 1 else batch
            epoch, offset = epoch + 1, 0


def batch_stream(
    dataset: Dataset,
    batch_size: int,
    *,
    seed: int = 0,
    start: int = 0,
    num_workers: int = 0,
    rank: int = 0,
    world: int = 1,
) -> Iterator[Any]:
    """Endless collated batches; reshuffled every epoch, a function of ``(seed, position)``.

    ``start`` skips that many batches (without loading them), so a resumed run sees
    the data an uninterrupted one would have seen. With ``world > 1`` this process
    gets slice ``rank`` of each global batch of ``batch_size × world`` samples.
    """
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise VqgenError("the dataset is empty")
    if world > 1 and n < batch_size * world:
        raise VqgenError(
            f"the dataset has {n} samples, fewer than one global batch of {batch_size} × "
            f"{world} processes; lower batch_size"
        )
    sampler = _EpochBatches(n, batch_size, seed, start, rank, world)
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,  # type: ignore[arg-type]
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),  # leaves the global RNG alone
    )
    yield from loader


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


def progress_bar(total: int, *, initial: int = 0, desc: str = "", enabled: bool = True) -> tqdm:
    """A tqdm bar over steps (shows step, rate and ETA; losses go in its postfix)."""
    return tqdm(
        total=total, initial=initial, desc=desc, unit="step", disable=not enabled,
        dynamic_ncols=True, leave=True,
    )


class _Averager:
    """Running means of scalar logs between two metrics records."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, logs: Mapping[str, Any]) -> None:
        for k, v in logs.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
            self.counts[k] = self.counts.get(k, 0) + 1

    def pop(self) -> dict[str, float]:
        out = {k: self.sums[k] / self.counts[k] for k in self.sums}
        self.sums, self.counts = {}, {}
        return out


class MetricsLogger:
    """Appends one JSON object per line to ``path`` (nothing when ``path`` is None)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: Mapping[str, Any]) -> None:
        if self.path is None:
            return
        try:
            _append_line(self.path, json.dumps(dict(record), allow_nan=True))
        except OSError as exc:  # a full disk: stop before the next checkpoint is due
            raise VqgenError(
                f"cannot append to {self.path}: {exc.strerror or exc}. Checkpoints already "
                "written are whole; free some space and run the same `vqgen train` command "
                "with --resume to go on"
            ) from None


def _append_line(path: Path, line: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")




# =============================================================================
# distributed training and graceful stops


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a torchrun job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this process logs and writes checkpoints."""
        return self.rank == 0


def setup_distributed(device_name: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the torchrun job described by the environment (once), pick this rank's device.

    Without ``WORLD_SIZE`` > 1 in the environment: rank 0 of 1, :func:`resolve_device`.
    NCCL on CUDA devices, gloo on the CPU; on CUDA, rank ``r`` uses ``cuda:LOCAL_RANK``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world <= 1:
        return DistInfo(), device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    info = DistInfo(dist.get_rank(), dist.get_world_size(), local)
    return info, device


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op for one process)."""
    if info.world > 1:
        dist.barrier()


def _all_max(info: DistInfo, values: list[float], device: torch.device) -> list[float]:
    """Elementwise maximum of ``values`` over ranks (unchanged for one process)."""
    if info.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)  # (n,)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _average_grads(info: DistInfo, module: nn.Module) -> None:
    """Average the gradients of ``module`` over ranks (what DDP does for wrapped modules)."""
    if info.world == 1:
        return
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= info.world


def _broadcast_params(info: DistInfo, module: nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers of ``module``."""
    if info.world == 1:
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, 0)


def _wrap_ddp(module: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    if info.world == 1:
        return module
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


class TrainingInterrupted(VqgenError):
    """Training stopped by SIGINT / SIGTERM after writing a checkpoint."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


class StopSignals:
    """Within ``with``: SIGINT / SIGTERM ask the loop to stop after the current step.

    The loop checks :attr:`requested` once a step, writes a checkpoint and raises
    :class:`TrainingInterrupted`. A second signal interrupts at once. Outside the
    main thread (where handlers cannot be installed) it never requests a stop.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, ckpt_dir: Path | None = None) -> None:
        self.signum: int | None = None
        self.ckpt_dir = ckpt_dir  # the stage's checkpoint folder, for the message
        self._old: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # a second signal: give up on the graceful stop
            if self.ckpt_dir is None:
                raise InterruptedAgain("interrupted again: stopped at once", signum)
            raise InterruptedAgain(
                f"interrupted again while stopping: the step or checkpoint in progress was "
                f"abandoned; every checkpoint in {self.ckpt_dir} is whole (the last one is "
                f"current); continue with `{resume_command(self.ckpt_dir.parent)}`", signum)
        self.signum = signum
        log.warning("received %s: stopping after this step", signal.Signals(signum).name)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}


def resume_command(run: Path) -> str:
    """The command that continues training the run directory ``run`` with its own config."""
    return (f"vqgen train {shlex.quote(str(run / 'config.yaml'))} --run-dir "
            f"{shlex.quote(str(run))} --resume")


def _interrupted(stage: str, step: int, signum: int, ckpt: Path | None) -> TrainingInterrupted:
    if ckpt is None:
        how = "nothing was saved (no run directory); train again"
    else:
        how = (f"a checkpoint is in {ckpt}; continue with `{resume_command(ckpt.parent)}` "
               "(or resume=True in Python)")
    return TrainingInterrupted(
        f"{signal.Signals(signum).name} received: the {stage} stage stopped after step "
        f"{step}; {how}",
        signum,
    )


def _every(every: int, done: int, total: int) -> bool:
    """Whether something done every ``every`` steps (and at the end) is due after ``done``."""
    return done == total or (every > 0 and done % every == 0)


# =============================================================================
# stage 1: the tokenizer (and the cond stage's tokenizer)


def _to_device(value: Any, device: torch.device) -> Any:
    return value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value


def held_out_dataset(config: PipelineConfig, registry: Registry, n: int = 512) -> Any | None:
    """The config's data with ``split: val`` (at most ``n`` samples), where it has splits."""
    entry = registry.get("dataset", config.data.name)
    fields = entry.params_model.model_fields
    if "split" not in fields:
        return None
    params = {**config.data.params, "split": "val"}
    if "length" in fields:
        params["length"] = min(n, int(params.get("length") or n))
    return registry.create("dataset", config.data.name, params)


class Objective:
    """One stage's training: what a step computes, what is logged, previewed and saved.

    :func:`run_loop` owns the loop around it: steps from ``start`` to ``cfg.steps``, the
    progress bar, when to log, preview and checkpoint (``log_every``, ``image_every``,
    ``checkpoint_every``), SIGINT / SIGTERM (finish the step, checkpoint, raise
    :class:`TrainingInterrupted`) and the checkpoint of a run with nothing left to do.
    An objective sets ``stage``, ``desc`` (the bar's label), ``cfg``, ``ckpt_dir`` (None:
    no checkpoints, e.g. a rank other than 0) and ``progress``.
    """

    stage: str
    desc: str
    cfg: StageTrainConfig
    ckpt_dir: Path | None
    progress: bool
    save_if_idle = True  # a run resumed at its last step still leaves a checkpoint

    def step(self, step: int, stop: StopSignals) -> tuple[dict[str, str], bool]:
        """One optimisation step (its micro-batches, backward passes and updates);
        returns the progress-bar fields and whether any rank was asked to stop
        (``stop.requested``, read after the step's updates, agreed between ranks)."""
        raise NotImplementedError

    def log(self, done: int) -> None:
        """Append the metrics of the steps since the last record."""

    def preview(self, done: int) -> None:
        """Write a preview picture (stage 1: inputs above reconstructions)."""

    def save(self, done: int) -> None:
        """Write a checkpoint after ``done`` steps (as one unit)."""
        raise NotImplementedError


def run_loop(obj: Objective, start: int) -> None:
    """Train ``obj`` from step ``start`` to ``obj.cfg.steps``: the only training loop."""
    cfg = obj.cfg
    bar = progress_bar(cfg.steps, initial=start, desc=obj.desc, enabled=obj.progress)
    with StopSignals(obj.ckpt_dir) as stop:
        try:
            for step in range(start, cfg.steps):
                postfix, stopping = obj.step(step, stop)
                done = step + 1
                bar.update(1)
                bar.set_postfix(postfix, refresh=False)
                if _every(cfg.log_every, done, cfg.steps):
                    obj.log(done)
                if cfg.image_every > 0 and _every(cfg.image_every, done, cfg.steps):
                    obj.preview(done)
                if _every(cfg.checkpoint_every, done, cfg.steps) or stopping:
                    obj.save(done)
                if stopping and done < cfg.steps:
                    raise _interrupted(obj.stage, done, stop.signum or signal.SIGTERM,
                                       obj.ckpt_dir)
        finally:
            bar.close()
    if cfg.steps == start and obj.save_if_idle:
        obj.save(start)


class _Stage1(Objective):
    """State shared by the fitted and the adversarial stage-1 objectives."""

    def __init__(
        self,
        config: PipelineConfig,
        run_dir: Path | None,
        registry: Registry,
        progress: bool,
        stage: str,
        conditioner: Any,
    ) -> None:
        self.config, self.run_dir, self.stage = config, run_dir, stage
        self.cfg: StageTrainConfig = getattr(config.train, stage)
        self.dist, self.device = setup_distributed(self.cfg.device)
        self.progress = progress and self.dist.main
        seed_everything(self.cfg.seed)
        data = registry.create("dataset", config.data.name, config.data.params)
        held = held_out_dataset(config, registry, VAL_IMAGES)
        if stage == "cond":
            tok = cond_stage_tokenizer(conditioner)
            if tok is None:
                raise VqgenError(
                    "the cond stage trains a spatial conditioner's own tokenizer, but "
                    f"{type(conditioner).__name__} has none"
                )
            self.tok = tok
            self.name = registry.name_of(tok)[1]
            self.key = getattr(tok, "input_key", "image")
            self.dataset: Any = ConditionInputs(data, conditioner, self.key)
            self.held = ConditionInputs(held, conditioner, self.key) if held else None
        else:
            self.tok = registry.create("tokenizer", config.tokenizer.name,
                                       config.tokenizer.params)
            self.name = config.tokenizer.name
            self.key = self.cfg.input_key or getattr(self.tok, "input_key", "image")
            self.dataset, self.held = data, held
        self.tok.to(self.device)
        sample = self.dataset[0]
        if self.key not in sample:
            raise VqgenError(
                f"dataset {config.data.name!r} has no {self.key!r} in its samples (it has "
                f"{', '.join(sorted(sample))}); set train.{stage}.input_key"
            )
        self.ckpt_dir = run_dir / stage if run_dir and self.dist.main else None
        self.desc = stage
        self.metrics = MetricsLogger(run_dir / METRICS_FILE if run_dir and self.dist.main
                                     else None)
        self.last_metrics: dict[str, float] = {}
        n = min(PREVIEW_IMAGES, len(self.dataset))
        self.preview_inputs = torch.stack([self.dataset[i][self.key] for i in range(n)])
        self.t0 = time.time()

    def prepare(self, resume: bool) -> int:
        """Optimizers, a restored checkpoint where resuming; returns the first step."""
        raise NotImplementedError

    def input_of(self, batch: Mapping[str, Any]) -> torch.Tensor:
        x = _to_device(batch[self.key], self.device)
        prepare = getattr(self.tok, "prepare_input", None)
        return prepare(x) if prepare is not None else x

    def stream(self, start_step: int, sharded: bool = True) -> Iterator[Any]:
        cfg = self.cfg
        rank, world = (self.dist.rank, self.dist.world) if sharded else (0, 1)
        return batch_stream(
            self.dataset, cfg.batch_size * (1 if sharded else self.dist.world),
            seed=cfg.seed, start=start_step * cfg.grad_accum, num_workers=cfg.num_workers,
            rank=rank, world=world,
        )

    def record(self, step: int, averager: _Averager, extra: Mapping[str, Any]) -> None:
        values = averager.pop()
        self.last_metrics = values
        rec = {"step": step, "stage": self.stage, **extra,
               "elapsed_s": round(time.time() - self.t0, 3), **values}
        self.metrics.log(rec)

    @torch.no_grad()
    def preview(self, step: int) -> None:
        if self.ckpt_dir is None or self.run_dir is None:
            return
        from vqgen.core.images import save_image_grid

        was_training = self.tok.training
        self.tok.eval()
        x = self.input_of({self.key: self.preview_inputs})
        if isinstance(self.tok, Fitted):
            recon = self.tok.decode(self.tok.encode(x))
        else:
            recon = self.tok(x).recon
        to_rgb = getattr(self.tok, "to_rgb", lambda t: t)
        grid = torch.cat([to_rgb(x), to_rgb(recon)]).float().cpu()  # (2n, C, H, W)
        save_image_grid(grid, self.run_dir / IMAGES_DIR / f"{self.stage}_{step:06d}.png",
                        nrow=x.shape[0])
        self.tok.train(was_training)

    def due(self, every: int, done: int) -> bool:
        return _every(every, done, self.cfg.steps)

    @torch.no_grad()
    def val_loss(self, loss_fn: Any = None) -> float | None:
        """The stage's loss without its GAN term on up to 64 held-out samples, or None."""
        if self.held is None:
            return None
        was_training = self.tok.training
        self.tok.eval()
        batch = [self.held[i][self.key] for i in range(min(VAL_IMAGES, len(self.held)))]
        x = self.input_of({self.key: torch.stack(batch)})
        if loss_fn is None:
            value = float((self.tok.decode(self.tok.encode(x)) - x).abs().mean())
        else:
            _, logs = loss_fn.generator_loss(x, self.tok(x), -1, self.tok.last_layer)
            value = float(logs.get("nll", logs["loss"]))
        self.tok.train(was_training)
        return value

    def _commit(self, step: int, state: dict[str, Any], discriminator: nn.Module | None,
                loss_fn: Any = None) -> None:
        if self.ckpt_dir is None:
            return
        d = self.ckpt_dir
        val = self.val_loss(loss_fn) if self.cfg.keep_best else None
        metrics = {**self.last_metrics, **({"val_loss": val} if val is not None else {})}
        state = {**state, "step": step, "rng": rng_state(), "buffers": extra_buffers(self.tok)}
        with checkpoint_commit(d, step) as unit:  # every file, then one pointer switch
            if discriminator is not None:
                save_tensors(discriminator.state_dict(), unit / "discriminator.safetensors")
            save_state(state, unit / "train_state.pt")
            save_component(unit, self.tok, kind="tokenizer", name=self.name, step=step,
                           metrics=metrics)
        keep_checkpoint(d, step, keep_last=self.cfg.keep_last, val_loss=val,
                        keep_best=self.cfg.keep_best)

    def load(self, discriminator: nn.Module | None) -> dict[str, Any] | None:
        """The saved train state (weights restored into the models), or None."""
        d = checkpoint_dir(self.run_dir / self.stage) if self.run_dir else None
        if d is None or not (d / "meta.json").is_file():
            return None
        meta = read_meta(d)
        state = load_train_state(d / "train_state.pt")
        if meta.get("step") != state.get("step"):
            raise CheckpointError(f"{d}: meta.json and train_state.pt disagree on the step; "
                                  "the checkpoint is incomplete")
        load_weights(self.tok, d / "weights.safetensors", self.device)
        if discriminator is not None:
            load_weights(discriminator, d / "discriminator.safetensors", self.device)
        restore_buffers(self.tok, state["buffers"])
        set_rng_state(state["rng"])
        return state


def train_tokenizer(
    config: PipelineConfig,
    run_dir: str | os.PathLike[str] | None = None,
    *,
    registry: Registry | None = None,
    progress: bool = True,
    resume: bool = False,
    stage: str = "tokenizer",
    conditioner: Any = None,
) -> Any:
    """Train a first stage of ``config``; return the tokenizer in eval mode.

    ``stage="tokenizer"``: the config's tokenizer on its data, settings from
    ``config.train.tokenizer``. ``stage="cond"``: ``conditioner``'s own tokenizer
    on ``conditioner.condition_input`` of the data, settings from
    ``config.train.cond``. With ``run_dir`` it writes metrics, preview grids and
    checkpoints to ``run_dir/<stage>``; ``resume`` continues from that checkpoint.
    k-means-like tokenizers are fitted (``fit_step``), VQGAN-like ones trained with
    their GAN objective (see the module docstring for both protocols). SIGINT /
    SIGTERM write a checkpoint and raise :class:`TrainingInterrupted`.
    """
    if stage not in ("tokenizer", "cond"):
        raise VqgenError(f"unknown stage-1 stage {stage!r}; valid: tokenizer, cond")
    registry = registry or default_registry()
    if stage == "tokenizer":  # built by the objective, after seeding: its initial weights
        cls: type = registry.get("tokenizer", config.tokenizer.name).cls
    else:
        cls = type(cond_stage_tokenizer(conditioner))
    kind: type[_Stage1]
    if cls is type(None):
        kind = _Stage1  # the cond stage without a tokenizer: its __init__ says so
    elif issubclass(cls, Fitted):
        kind = _Fitted
    elif issubclass(cls, Adversarial):
        kind = _Adversarial
    else:
        name = config.tokenizer.name if stage == "tokenizer" else cls.__name__
        raise VqgenError(
            f"tokenizer {name!r} ({cls.__name__}) cannot be trained by vqgen's stage-1 "
            "engine: it has neither fit_step() nor build_loss() (the Fitted and Adversarial "
            "protocols of vqgen.core.interfaces)"
        )
    run = kind(config, Path(run_dir) if run_dir else None, registry, progress, stage,
               conditioner)
    run_loop(run, run.prepare(resume))
    return run.tok.eval()


class _Fitted(_Stage1):
    """Fitted tokenizers (k-means): one ``fit_step`` per global batch, no optimizer."""

    def prepare(self, resume: bool) -> int:
        """Restore a checkpoint where resuming; the first step."""
        self.desc = f"{self.stage} (fit)"
        self.generator = torch.Generator().manual_seed(self.cfg.seed)
        start = 0
        if resume and (state := self.load(None)) is not None:
            start = int(state["step"])
            self.generator.set_state(state["generator"])
        self.avg = _Averager()
        self.batches = self.stream(start, sharded=False)  # every rank fits the global batch
        return start

    def step(self, step: int, stop: StopSignals) -> tuple[dict[str, str], bool]:
        stats = self.tok.fit_step(self.input_of(next(self.batches)), self.generator)
        check_finite(step, stats)
        self.avg.add(stats)
        stopping = _all_max(self.dist, [float(stop.requested)], self.device)[0] > 0
        return {k: f"{v:.4g}" for k, v in stats.items()}, stopping

    def log(self, done: int) -> None:
        self.record(done, self.avg, {})

    def save(self, done: int) -> None:
        self._commit(done, {"generator": self.generator.get_state()}, None)


class _Adversarial(_Stage1):
    """GAN-trained tokenizers (VQGAN): alternating generator / discriminator Adam steps."""

    def prepare(self, resume: bool) -> int:
        """Loss, optimizers, a checkpoint where resuming, AMP; the first step."""
        cfg, tok, info = self.cfg, self.tok, self.dist
        self.loss_fn = loss_fn = tok.build_loss().to(self.device)
        self.disc = disc = loss_fn.discriminator
        self.base_lr = self.lr = resolve_lr(cfg, info.world)
        self.schedule = cfg.lr_schedule or "constant"
        betas = cfg.betas or (0.5, 0.9)
        self.opt_g = make_adam([p for p in tok.parameters() if p.requires_grad], self.lr, betas)
        self.opt_d = make_adam(list(disc.parameters()), self.lr, betas) if disc is not None \
            else None
        start = 0
        if resume and (state := self.load(disc)) is not None:
            start = int(state["step"])
            self.opt_g.load_state_dict(state["opt_g"])
            if self.opt_d is not None:
                self.opt_d.load_state_dict(state["opt_d"])
        if info.world > 1:  # per-rank dropout / restarts draw from different streams
            torch.manual_seed(cfg.seed * 1_000_003 + info.rank + start)
        tok.train()
        loss_fn.train()
        self.cuda = self.device.type == "cuda"
        self.amp = self.cuda and cfg.amp != "none"
        self.amp_dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and cfg.amp == "fp16")
        if self.cuda:  # convolutions run faster channels-last
            tok.to(memory_format=torch.channels_last)
            if disc is not None:
                disc.to(memory_format=torch.channels_last)
        self.model = _wrap_ddp(tok, info, self.device)
        log.info("training %s at lr %.3g (%s, betas %s) for %d steps", self.stage,
                 self.base_lr, self.schedule, betas, cfg.steps)
        self.avg = _Averager()
        self.batches = self.stream(start)
        return start

    def step(self, step: int, stop: StopSignals) -> tuple[dict[str, str], bool]:
        cfg, tok, info, loss_fn = self.cfg, self.tok, self.dist, self.loss_fn
        optimizers = [o for o in (self.opt_g, self.opt_d) if o is not None]
        self.lr = lr = lr_at(step, self.base_lr, cfg.warmup_steps, cfg.steps,
                             schedule=self.schedule)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
            for group in opt.param_groups:
                group["lr"] = lr
        d_on = loss_fn.disc_active(step)
        restarted = 0.0
        for micro in range(cfg.grad_accum):
            x = self.input_of(next(self.batches))
            if self.cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            last = micro == cfg.grad_accum - 1
            sync = self.model.no_sync() if info.world > 1 and not last \
                else contextlib.nullcontext()
            autocast = torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp)
            with sync, autocast:  # type: ignore[attr-defined]
                out = self.model(x)
                g_loss, logs = loss_fn.generator_loss(x, out, step, tok.last_layer)
                check_finite(step, logs)
            self.scaler.scale(g_loss / cfg.grad_accum).backward()
            if d_on:
                with autocast:
                    d_loss, d_logs = loss_fn.discriminator_loss(x, out.recon, step)
                check_finite(step, d_logs)
                self.scaler.scale(d_loss / cfg.grad_accum).backward()
                logs.update(d_logs)
            restarted += float(out.restarted)
            logs.update(usage=out.usage, perplexity=out.perplexity, restarted=out.restarted)
            self.avg.add(logs)
        self.scaler.step(self.opt_g)
        if d_on and self.opt_d is not None and self.disc is not None:
            _average_grads(info, self.disc)
            self.scaler.step(self.opt_d)
        self.scaler.update()
        stopping, restarted = _all_max(info, [float(stop.requested), restarted], self.device)
        if restarted > 0:  # the codebook was re-seeded from each rank's own batch
            _broadcast_params(info, tok)
        shown = {k: f"{float(logs[k]):.4g}" for k in ("loss", "rec", "ce", "usage") if k in logs}
        return shown, bool(stopping > 0)

    def log(self, done: int) -> None:
        self.record(done, self.avg, {"lr": self.lr})

    def save(self, done: int) -> None:
        state = {"opt_g": self.opt_g.state_dict(),
                 "opt_d": self.opt_d.state_dict() if self.opt_d is not None else {},
                 "lr": self.lr}
        self._commit(done, state, self.disc, self.loss_fn)


# =============================================================================
# stage 2: the prior on cached tokens


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


class _Tokens(Dataset):
    """A token cache as ``{"seq": [L], "cond": [Lc]}`` items in the prior's order (a
    spatial condition too, where the prior takes it aligned)."""

    def __init__(self, cache: TokenCache, pipe: Pipeline) -> None:
        self.cache, self.ordering = cache, pipe.ordering  # not the pipe: workers copy this
        self.align = bool(getattr(pipe.prior, "aligned_condition", False))

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = self.cache[i]
        out = {"seq": self.ordering.flatten(item["codes"][None])[0]}  # (L,)
        if "cond" in item:
            cond = item["cond"]  # (Lc,)
            if self.align:
                cond = align_condition(cond[None], self.ordering, item["codes"].shape)[0]
            out["cond"] = cond
        return out


class _PriorNLL(nn.Module):
    """``forward(seq, cond) = prior.nll(seq, cond)``: what DistributedDataParallel wraps."""

    def __init__(self, prior: nn.Module) -> None:
        super().__init__()
        self.prior = prior

    def forward(self, seq: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        return self.prior.nll(seq, cond)  # type: ignore[operator,no-any-return]


def _cond_input(pipe: Pipeline, raw: torch.Tensor | None, dropout: float,
                gen: torch.Generator | None = None, info: DistInfo = DistInfo()
                ) -> torch.Tensor | None:
    """Conditioner ids ``[B, Lc]`` → the prior's ids, with condition dropout applied.

    The dropout draws cover the global batch, so ranks drop what one process would.
    """
    if raw is None:
        return None
    if dropout > 0:
        assert pipe.conditioner is not None
        raw = drop_condition(pipe.conditioner, raw, dropout, gen, rank=info.rank,
                             world=info.world)
    return raw + pipe.cond_offset


@torch.no_grad()
def token_nll(pipe: Pipeline, cache: TokenCache, batch_size: int = 64, *,
              cond_shift: int = 0) -> dict[str, float]:
    """Mean NLL of the cached tokens under ``pipe.prior``: nats and bits per token.

    ``cond_shift = s`` pairs sample ``j`` with the condition of sample ``(j + s) mod N``:
    a mismatched condition, whose NLL minus the matched one measures how much the
    prior uses its condition (see :func:`condition_gain`).
    """
    prior = pipe._require_prior()
    was = prior.training
    prior.eval()
    device = pipe.device
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
        nll = prior.nll(seq, _cond_input(pipe, raw, 0.0))  # (B,)
        total += float(nll.sum())
        count += len(items)
    prior.train(was)
    nats = total / max(count, 1)
    return {"nll_nats": nats, "nll_bits": nats / LN2}


def condition_gain(pipe: Pipeline, cache: TokenCache, batch_size: int = 64) -> dict[str, float]:
    """Held-out bits/token with each sample's own condition and with the next sample's.

    ``cond_gain_bits`` = mismatched − matched: near 0 when the prior ignores its
    condition, positive when the condition carries information it uses. A paired
    check of one trained model, so free of run-to-run noise.
    """
    matched = token_nll(pipe, cache, batch_size)["nll_bits"]
    other = token_nll(pipe, cache, batch_size, cond_shift=1)["nll_bits"]
    return {"val_nll_bits": matched, "val_nll_bits_other_cond": other,
            "cond_gain_bits": other - matched}


def _token_caches(config: PipelineConfig, registry: Registry, tokenizer: Any, conditioner: Any,
                  root: Path, cfg: StageTrainConfig, progress: bool,
                  info: DistInfo) -> tuple[TokenCache, TokenCache | None]:
    """The training and held-out token caches; rank 0 encodes, the others then open."""
    dataset = registry.create("dataset", config.data.name, config.data.params)
    held = held_out_dataset(config, registry)
    data_key = {"data": config.data.model_dump(mode="json")}

    def build() -> tuple[TokenCache, TokenCache | None]:
        cache = TokenCache.build(root, dataset, tokenizer, conditioner, data=data_key,
                                 batch_size=cfg.batch_size, progress=progress)
        held_cache = (
            TokenCache.build(root, held, tokenizer, conditioner,
                             data={**data_key, "split": "val", "n": len(held)},
                             batch_size=cfg.batch_size, progress=progress)
            if held is not None else None
        )
        return cache, held_cache

    if info.main:
        out = build()
    barrier(info)
    if not info.main:
        out = build()
    return out


def train_prior(
    config: PipelineConfig,
    tokenizer: Any,
    conditioner: Any = None,
    run_dir: str | os.PathLike[str] | None = None,
    *,
    registry: Registry | None = None,
    progress: bool = True,
    resume: bool = False,
    cache_root: str | os.PathLike[str] | None = None,
) -> Pipeline:
    """Train the prior of ``config`` on tokens of ``tokenizer`` (and ``conditioner``).

    Returns the Pipeline in eval mode. With ``run_dir`` it logs to
    ``metrics.jsonl``, keeps the token cache in ``run_dir/tokens`` and checkpoints
    to ``run_dir/prior``; ``resume`` continues from that checkpoint. SIGINT /
    SIGTERM write a checkpoint and raise :class:`TrainingInterrupted`.
    """
    registry = registry or default_registry()
    cfg = config.train.prior
    info, device = setup_distributed(cfg.device)
    progress = progress and info.main
    seed_everything(cfg.seed)
    run = Path(run_dir) if run_dir else None
    tokenizer = tokenizer.to(device).eval()
    if conditioner is not None:
        conditioner = conditioner.to(device).eval()
    root = Path(cache_root) if cache_root else (run / TOKENS_DIR if run else None)
    if root is None:
        import tempfile

        root = Path(tempfile.mkdtemp(prefix="vqgen-tokens-"))
    cache, held_cache = _token_caches(config, registry, tokenizer, conditioner, root, cfg,
                                      progress, info)
    grid = (int(cache.codes.shape[1]), int(cache.codes.shape[2]))
    if config.prior is None:
        raise VqgenError("the config has no prior section: nothing to train in stage 2")
    pipe = assemble(config, tokenizer, conditioner, grid, registry).to(device)
    prior = pipe._require_prior()
    if isinstance(prior, InitFromCodeVectors) and prior.wants_code_vectors:
        vectors = tokenizer.code_vectors()
        if vectors is None:
            raise VqgenError(
                f"prior.params.tok_emb_init: code_vectors needs a tokenizer with code vectors; "
                f"{type(tokenizer).__name__} has none (use tok_emb_init: normal)"
            )
        prior.init_from_code_vectors(vectors)  # a resumed run then loads its own weights
    if cfg.cond_dropout > 0 and (conditioner is None or conditioner.null_id is None):
        raise VqgenError(
            "train.prior.cond_dropout > 0 needs a conditioner with a null token "
            "(conditioner.params.null_token: true)"
        )
    base_lr = resolve_lr(cfg, info.world)
    betas = cfg.betas or (0.9, 0.95)
    opt = make_adam(optimizer_groups(prior, cfg.weight_decay), base_lr, betas, decoupled=True)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    start = 0
    ckpt = run / "prior" if run else None
    if resume and ckpt is not None and (ckpt / "meta.json").is_file():
        start = _load_prior(ckpt, prior, opt, gen, device)
    if info.world > 1:  # per-rank dropout masks from different streams
        torch.manual_seed(cfg.seed * 1_000_003 + info.rank + start)
    stream: Iterator[Mapping[str, torch.Tensor]] = batch_stream(
        _Tokens(cache, pipe), cfg.batch_size, seed=cfg.seed,
        start=start * cfg.grad_accum, num_workers=cfg.num_workers,
        rank=info.rank, world=info.world,
    )
    prior.train()
    objective = _Prior(config, pipe, opt, gen, stream, held_cache, info, device,
                       ckpt if info.main else None, base_lr,
                       MetricsLogger(run / METRICS_FILE if run and info.main else None),
                       progress)
    run_loop(objective, start)
    return pipe.eval()


class _Prior(Objective):
    """The autoregressive prior on cached tokens: AdamW with warm-up and cosine decay,
    accumulation, clipping, condition dropout, AMP; held-out NLL when it checkpoints."""

    save_if_idle = False

    def __init__(self, config: PipelineConfig, pipe: Pipeline, opt: torch.optim.Optimizer,
                 gen: torch.Generator, stream: Iterator[Mapping[str, torch.Tensor]],
                 held_cache: TokenCache | None, info: DistInfo, device: torch.device,
                 ckpt_dir: Path | None, base_lr: float, metrics: MetricsLogger,
                 progress: bool) -> None:
        self.config, self.pipe, self.opt, self.gen, self.stream = config, pipe, opt, gen, stream
        self.held_cache, self.info, self.device, self.ckpt_dir = held_cache, info, device, ckpt_dir
        self.base_lr, self.metrics, self.progress = base_lr, metrics, progress
        self.stage = self.desc = "prior"
        self.cfg = cfg = config.train.prior
        self.prior = pipe._require_prior()
        self.amp = device.type == "cuda" and cfg.amp != "none"
        self.amp_dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and cfg.amp == "fp16")
        self.model: nn.Module = _wrap_ddp(_PriorNLL(self.prior), info, device)
        if cfg.compile and device.type == "cuda":
            self.model = torch.compile(self.model)  # type: ignore[assignment]
        self.t0, self.sums, self.n_logs = time.time(), 0.0, 0
        self.last: dict[str, Any] = {}
        self.lr = base_lr
        self.grad_norm = 0.0
        self._val: tuple[int, dict[str, float]] = (-1, {})

    def step(self, step: int, stop: StopSignals) -> tuple[dict[str, str], bool]:
        cfg, info, device, opt = self.cfg, self.info, self.device, self.opt
        self.lr = lr_at(step, self.base_lr, cfg.warmup_steps, cfg.steps,
                        schedule=cfg.lr_schedule or "cosine")
        for group in opt.param_groups:
            group["lr"] = self.lr
        loss_sum = 0.0
        for micro in range(cfg.grad_accum):
            batch = next(self.stream)
            seq = batch["seq"].to(device)  # (B, L)
            raw = batch["cond"].to(device) if "cond" in batch else None  # (B, Lc)
            c = _cond_input(self.pipe, raw, cfg.cond_dropout, self.gen, info)
            last_micro = micro == cfg.grad_accum - 1
            sync = (self.model.no_sync() if info.world > 1 and not last_micro  # type: ignore
                    else contextlib.nullcontext())
            with sync, torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.amp):
                loss = self.model(seq, c).mean() / cfg.grad_accum
            self.scaler.scale(loss).backward()
            loss_sum += float(loss.detach())
        loss_sum, stopping = _global_loss(info, loss_sum, stop, device)
        check_finite(step, {"prior_nll": loss_sum})
        self.scaler.unscale_(opt)
        self.grad_norm = float(nn.utils.clip_grad_norm_(self.prior.parameters(), cfg.grad_clip))
        self.scaler.step(opt)
        self.scaler.update()
        opt.zero_grad(set_to_none=True)
        self.sums += loss_sum
        self.n_logs += 1
        return {"nll": f"{loss_sum:.3f}", "lr": f"{self.lr:.2e}"}, stopping

    def val(self, done: int) -> dict[str, float]:
        """Held-out NLL after ``done`` steps (computed once per step, on rank 0)."""
        if self._val[0] != done:
            value = ({f"val_{k}": v for k, v in token_nll(self.pipe, self.held_cache).items()}
                     if self.held_cache is not None and self.info.main else {})
            self._val = (done, value)
        return self._val[1]

    def log(self, done: int) -> None:
        self.last = {"step": done, "stage": "prior", "nll_nats": self.sums / self.n_logs,
                     "lr": self.lr, "grad_norm": self.grad_norm,
                     "elapsed_s": round(time.time() - self.t0, 2)}
        if done == self.cfg.steps:
            self.last.update(self.val(done))
        self.metrics.log(self.last)
        self.sums, self.n_logs = 0.0, 0

    def save(self, done: int) -> None:
        if self.ckpt_dir is None:
            return
        val = self.val(done)
        _save_prior(self.ckpt_dir, self.config, self.prior, self.opt, self.gen, done,
                    {**self.last, **val}, val.get("val_nll_nats"))


def _global_loss(info: DistInfo, loss: float, stop: StopSignals, device: torch.device
                 ) -> tuple[float, bool]:
    """The loss averaged over ranks, and whether any rank was asked to stop."""
    if info.world == 1:
        return loss, stop.requested
    t = torch.tensor([loss, float(stop.requested)], dtype=torch.float64, device=device)
    dist.all_reduce(t)  # sum: a NaN anywhere reaches every rank
    return float(t[0]) / info.world, bool(t[1] > 0)


def _save_prior(d: Path, config: PipelineConfig, prior: nn.Module, opt: torch.optim.Optimizer,
                gen: torch.Generator, step: int, metrics: Mapping[str, Any],
                val_loss: float | None) -> None:
    assert config.prior is not None
    with checkpoint_commit(d, step) as unit:  # every file, then one pointer switch
        save_state({"step": step, "optimizer": opt.state_dict(), "rng": rng_state(),
                    "generator": gen.get_state()}, unit / "train_state.pt")
        save_component(unit, prior, kind="prior", name=config.prior.name, step=step,
                       metrics=metrics)
    cfg = config.train.prior
    keep_checkpoint(d, step, keep_last=cfg.keep_last, val_loss=val_loss,
                    keep_best=cfg.keep_best)


def _load_prior(d: Path, prior: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
                device: torch.device) -> int:
    d = checkpoint_dir(d)
    meta = read_meta(d)
    state = load_train_state(d / "train_state.pt")
    if meta.get("step") != state.get("step"):
        raise CheckpointError(f"{d}: meta.json and train_state.pt disagree on the step; the "
                              "checkpoint is incomplete")
    load_weights(prior, d / "weights.safetensors", device)
    opt.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    if "generator" in state:
        gen.set_state(state["generator"])
    return int(state["step"])
