"""The only code that writes or reads a training stage's checkpoint.

A stage directory (``tokenizer/``, ``cond/``, ``prior/``) gets, per checkpoint, the
component's weights and ``meta.json`` (:func:`vqgen.core.checkpoint.save_component`),
other trained modules as ``<name>.safetensors`` (the discriminator), and
``train_state.pt``: the step, the global RNG states, buffers kept outside the
state_dict, and what the objective adds (optimizers, generators). It commits as one
unit (:func:`vqgen.core.checkpoint.checkpoint_commit`) and keeps history and ``best/``
(:func:`vqgen.core.checkpoint.keep_checkpoint`). It still reads the earlier flat layout,
so runs written before resume.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vqgen.core.checkpoint import (
    CheckpointError,
    checkpoint_commit,
    checkpoint_dir,
    extra_buffers,
    keep_checkpoint,
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
from vqgen.core.layout import HISTORY_DIR, META_FILE, STATE_FILE, WEIGHTS_FILE

__all__ = ["Checkpointer"]


class Checkpointer:
    """Checkpoints of the component ``module`` (registered as ``kind`` / ``name``) in the
    stage directory ``root``; ``others`` are further trained modules saved beside it by
    name (e.g. ``{"discriminator": disc}``). ``root`` None: nothing is written or read
    (no run directory, or a rank other than 0 when writing)."""

    def __init__(self, root: Path | None, module: nn.Module, *, kind: str, name: str,
                 keep_last: int = 2, keep_best: bool = True,
                 others: Mapping[str, nn.Module | None] | None = None) -> None:
        self.root, self.module, self.kind, self.name = root, module, kind, name
        self.keep_last, self.keep_best = keep_last, keep_best
        self.others = {k: m for k, m in (others or {}).items() if m is not None}

    def exists(self) -> bool:
        """Whether ``root`` holds a checkpoint to resume from."""
        return self.root is not None and (checkpoint_dir(self.root) / META_FILE).is_file()

    def save(self, step: int, state: Mapping[str, Any] | None, metrics: Mapping[str, Any],
             val_loss: float | None = None, *,
             weights: Mapping[str, torch.Tensor] | None = None) -> None:
        """Commit the checkpoint after ``step`` steps (``state``: the objective's training
        state; None for a finished stage that will not resume, e.g. weights taken from
        another run) and keep it in history / as ``best`` on ``val_loss``. ``weights``:
        the module's state_dict where it is not ``module.state_dict()`` (gathered from
        shards under FSDP)."""
        if self.root is None:
            return
        with checkpoint_commit(self.root, step) as unit:  # every file, then one pointer switch
            for other_name, other in self.others.items():
                save_tensors(other.state_dict(), unit / f"{other_name}.safetensors")
            if state is not None:
                save_state({**state, "step": step, "rng": rng_state(),
                            "buffers": extra_buffers(self.module)}, unit / STATE_FILE)
            save_component(unit, self.module, kind=self.kind, name=self.name, step=step,
                           metrics=metrics, weights=weights)
        keep_checkpoint(self.root, step, keep_last=self.keep_last, val_loss=val_loss,
                        keep_best=self.keep_best)

    def load(self, device: torch.device) -> dict[str, Any] | None:
        """Restore the weights, buffers and global RNG of the last checkpoint; return its
        training state (``step`` and what the objective saved), or None without one."""
        if not self.exists():
            return None
        assert self.root is not None
        d = checkpoint_dir(self.root)
        meta = read_meta(d)
        state = load_train_state(d / STATE_FILE)
        if meta.get("step") != state.get("step"):
            raise CheckpointError(f"{d}: meta.json and train_state.pt disagree on the step; "
                                  "the checkpoint is incomplete")
        if type(state["step"]) is not int or state["step"] < 0:
            raise self.damaged(f"its step is {state['step']!r}")
        rng = state.get("rng")
        own = torch.get_rng_state()
        if not (isinstance(rng, Mapping) and isinstance(rng.get("torch"), torch.Tensor)
                and rng["torch"].dtype == own.dtype and rng["torch"].shape == own.shape):
            raise self.damaged("its random number generator state ('rng') is missing or "
                               "malformed")
        load_weights(self.module, d / WEIGHTS_FILE, device)
        for other_name, other in self.others.items():
            load_weights(other, d / f"{other_name}.safetensors", device)
        try:
            restore_buffers(self.module, state.get("buffers", {}))
            set_rng_state(rng)
        except (RuntimeError, TypeError, ValueError, AttributeError) as exc:
            raise self.damaged(str(exc)) from None
        return state

    def damaged(self, why: str) -> CheckpointError:
        """The error for a train state that cannot be resumed from, naming its file."""
        assert self.root is not None
        return CheckpointError(
            f"{checkpoint_dir(self.root) / STATE_FILE} cannot be resumed from: {why}. The "
            f"checkpoint is damaged; resume from a whole one in {self.root / HISTORY_DIR} "
            "(point current at it), or train the stage afresh in a new run directory")
