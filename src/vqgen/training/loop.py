"""The one training loop: :func:`fit` runs any :class:`~vqgen.training.objective.Objective`.

It is the only code that runs micro-batches, accumulates gradients, calls backward,
clips, steps optimizers, agrees with the other ranks (one collective per step: stop
requested, a non-finite loss, the objective's flags and global logs), decides when to
log, preview, evaluate and checkpoint (``log_every``, ``image_every``,
``checkpoint_every`` and the last step), and handles SIGINT / SIGTERM
(:class:`StopSignals`: finish the step, checkpoint, raise :class:`TrainingInterrupted`).
"""

from __future__ import annotations

import logging
import math
import shlex
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vqgen.core.errors import InterruptedAgain, VqgenError
from vqgen.core.progress import progress_bar
from vqgen.training.checkpointer import Checkpointer
from vqgen.training.loggers import Logger
from vqgen.training.objective import Objective, Optim, check_finite
from vqgen.training.runtime import Runtime

__all__ = ["StopSignals", "TrainingInterrupted", "fit", "progress_bar", "resume_command"]

log = logging.getLogger(__name__)


class TrainingInterrupted(VqgenError):
    """Training stopped by SIGINT / SIGTERM after writing a checkpoint."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


def resume_command(run: Path) -> str:
    """The command that continues training the run directory ``run`` with its own config."""
    return (f"vqgen train {shlex.quote(str(run / 'config.yaml'))} --run-dir "
            f"{shlex.quote(str(run))} --resume")


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


def _finite(logs: Mapping[str, Any]) -> bool:
    return all(math.isfinite(float(v)) for v in logs.values())


@dataclass
class _Step:
    """What one optimisation step left: its mean logs (global ones averaged over ranks),
    the agreed flags (and ``grad_norm`` where an optimizer clipped), the learning rate and
    whether any rank was asked to stop."""

    logs: dict[str, float]
    flags: dict[str, float]
    lr: float | None
    stopping: bool


def _optimisation_step(obj: Objective, rt: Runtime, optims: Sequence[Optim], stream: Any,
                       step: int, stop: StopSignals) -> _Step:
    """Micro-batches with accumulation, the step's one collective, then the updates."""
    lr = obj.lr(step)
    for o in optims:
        o.optimizer.zero_grad(set_to_none=True)
        if lr is not None:
            for group in o.optimizer.param_groups:
                group["lr"] = lr
    n_micro = obj.micro_batches
    step_logs, flags = _Averager(), {}
    bad: Mapping[str, Any] | None = None
    for micro in range(n_micro):
        batch = next(stream)
        with rt.accumulate(obj.model, micro == n_micro - 1), rt.autocast():
            out = obj.step(batch, step)
        if bad is None and not _finite(out.logs):
            bad = out.logs
        for loss in out.losses:
            rt.backward(loss / n_micro)
        step_logs.add(out.logs)
        for k, v in out.flags.items():
            flags[k] = flags.get(k, 0.0) + float(v)
    logs = step_logs.pop()
    keys, gkeys = list(flags), [k for k in obj.global_logs if k in logs]
    agreed = rt.agree([float(stop.requested), float(bad is not None),
                       *(flags[k] for k in keys), *(logs[k] for k in gkeys)])
    if agreed[1] > 0:  # no rank steps on a non-finite loss
        if bad is not None:
            check_finite(step, bad)
        raise VqgenError(f"non-finite loss at step {step} on another rank")
    flags = dict(zip(keys, agreed[2:2 + len(keys)], strict=True))
    logs.update({k: v / rt.info.world
                 for k, v in zip(gkeys, agreed[2 + len(keys):], strict=True)})
    for o in optims:
        if not o.active(step):
            continue
        if o.average is not None:
            rt.average_grads(o.average)
        norm = rt.step(o.optimizer, o.clip, o.params)
        if norm is not None:
            flags["grad_norm"] = norm
    if optims:
        rt.update()
    obj.after_update(step, flags)
    return _Step(logs, flags, lr, agreed[0] > 0)


class _Cadence:
    """When to log, preview, evaluate and checkpoint; what the records and checkpoints
    hold. Held-out evaluation runs at most once per step (on rank 0; on every rank alike
    under FSDP, where checkpoints and previews take every rank too)."""

    def __init__(self, obj: Objective, rt: Runtime, checkpointer: Checkpointer | None,
                 loggers: Sequence[Logger]) -> None:
        self.obj, self.rt, self.checkpointer, self.loggers = obj, rt, checkpointer, loggers
        self.avg, self.t0 = _Averager(), time.time()
        self.record: dict[str, Any] = {}
        self.val: tuple[int, dict[str, float]] = (-1, {})

    def evaluate(self, done: int) -> dict[str, float]:
        """Held-out figures after ``done`` steps (rank 0; every rank alike under FSDP)."""
        if self.val[0] != done:
            val = {}
            if self.rt.main or self.rt.sharded:
                with self.rt.gathered():
                    val = self.obj.evaluate(done)
            self.val = (done, val if self.rt.main else {})
        return self.val[1]

    def save(self, done: int) -> None:
        """A checkpoint after ``done`` steps, written by rank 0 (under FSDP every rank
        gathers the sharded weights and optimizer state first)."""
        ckpt = self.checkpointer
        if ckpt is None or (ckpt.root is None and not self.rt.sharded):
            return
        val = self.evaluate(done)
        state, weights = self.obj.state_dict(), self.rt.full_state(ckpt.module)
        if ckpt.root is None:
            return
        key = self.obj.val_key
        ckpt.save(done, state, {**self.record, **val}, val.get(key) if key else None,
                  weights=weights)

    def after(self, done: int, s: _Step) -> None:
        """The logs, previews and checkpoints due after ``done`` steps."""
        obj, cfg, total = self.obj, self.obj.cfg, self.obj.cfg.steps
        self.avg.add(s.logs)
        if _every(cfg.log_every, done, total):
            record = {"step": done, "stage": obj.stage, **obj.record(self.avg.pop())}
            if s.lr is not None:
                record["lr"] = s.lr
            if "grad_norm" in s.flags:
                record["grad_norm"] = s.flags["grad_norm"]
            record["elapsed_s"] = round(time.time() - self.t0, 3)
            if done == total:
                record.update(self.evaluate(done))
            self.record = record
            for lg in self.loggers:
                lg.scalars(record)
        if cfg.image_every > 0 and _every(cfg.image_every, done, total) and (
                self.loggers or self.rt.sharded):
            with self.rt.gathered():  # every rank draws it under FSDP; rank 0 logs
                shot = obj.preview(done)
            if shot is not None:
                for lg in self.loggers:
                    lg.images(obj.stage, done, *shot)
        if _every(cfg.checkpoint_every, done, total) or s.stopping:
            self.save(done)


def fit(obj: Objective, rt: Runtime, start: int, *, checkpointer: Checkpointer | None = None,
        loggers: Sequence[Logger] = (), progress: bool = True) -> None:
    """Train ``obj`` from step ``start`` to ``obj.cfg.steps``: the only training loop."""
    total = obj.cfg.steps
    ckpt_dir = checkpointer.root if checkpointer is not None else None
    bar = progress_bar(total, initial=start, desc=obj.desc, enabled=progress)
    stream, optims = obj.batches(start), obj.optimizers()
    cadence = _Cadence(obj, rt, checkpointer, loggers)
    with StopSignals(ckpt_dir) as stop:
        try:
            for step in range(start, total):
                s = _optimisation_step(obj, rt, optims, stream, step, stop)
                shown = {k: f"{float(s.logs[k]):.4g}" for k in obj.shown if k in s.logs}
                if s.lr is not None:
                    shown["lr"] = f"{s.lr:.2e}"
                bar.set_postfix(shown, refresh=False)
                bar.update(1)
                cadence.after(step + 1, s)
                if s.stopping and step + 1 < total:
                    raise _interrupted(obj.stage, step + 1, stop.signum or signal.SIGTERM,
                                       ckpt_dir)
        finally:
            bar.close()
    if total == start and obj.save_if_idle:
        cadence.save(start)
