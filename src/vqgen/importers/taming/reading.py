"""Reading a taming checkpoint and config safely, and strict bookkeeping of its tensors.

The checkpoint is read with ``torch.load(weights_only=True)``: nothing in it is ever
unpickled. :class:`Tensors` records which tensors were loaded into a vqgen module and
which were dropped on purpose (and why), so that nothing is left over unnoticed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from vqgen.core.errors import VqgenError

__all__ = ["Tensors", "class_name", "read_taming_checkpoint", "read_taming_config"]

_RESAVE = (
    "python -c \"import torch; c = torch.load('IN.ckpt', map_location='cpu', "
    "weights_only=False); torch.save({'state_dict': c['state_dict'], 'global_step': "
    "c.get('global_step', 0)}, 'OUT.ckpt')\""
)


def read_taming_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], int]:
    """``(state_dict, global_step)`` of a taming ``.ckpt``, read with ``weights_only=True``.

    Also accepts a file holding just ``{"state_dict": ...}`` or a bare state_dict.
    """
    path = Path(path)
    if not path.is_file():
        raise VqgenError(f"taming checkpoint {path} not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for these files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VqgenError(
            f"{path} cannot be read with torch.load(weights_only=True) ({first[:300]}). vqgen "
            "never unpickles arbitrary objects, and Lightning checkpoints often hold pickled "
            "callbacks or hyper-parameters. If you trust the file, re-save just its weights "
            f"with: {_RESAVE} and import OUT.ckpt"
        ) from None
    step = 0
    if isinstance(obj, Mapping) and "state_dict" in obj:
        raw_step = obj.get("global_step", 0)
        step = int(raw_step) if isinstance(raw_step, int | float) else 0
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise VqgenError(
            f"{path} is not a taming checkpoint: expected a dict with a 'state_dict' of named "
            "tensors (a Lightning .ckpt), or such a state_dict itself"
        )
    return dict(obj), max(step, 0)


def read_taming_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``model`` section (``{target, params}``) of a taming YAML config."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VqgenError(f"taming config {path} not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        reason = " ".join(str(exc).split())
        raise VqgenError(f"taming config {path} is not readable YAML: {reason}") from None
    model = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("target"), str):
        raise VqgenError(
            f"{path} is not a taming-transformers config: expected a 'model' section with "
            "'target' (e.g. taming.models.vqgan.VQModel) and 'params'"
        )
    if not isinstance(model.get("params", {}), dict):
        raise VqgenError(f"{path}: model.params must be a mapping")
    return model


def class_name(target: Any) -> str:
    """The class name at the end of a taming ``target`` string."""
    return str(target).rsplit(".", 1)[-1]


_CHECK_CONFIG = "Check that the config is the one this checkpoint was trained with"


class Tensors:
    """A checkpoint's tensors, and which of them were loaded or dropped (and why)."""

    def __init__(self, tensors: dict[str, torch.Tensor], source: Path, config: Path) -> None:
        self.tensors, self.source, self.config = tensors, source, config
        self.used: set[str] = set()
        self.dropped: dict[str, list[str]] = {}  # reason → keys

    def under(self, prefix: str) -> list[str]:
        """Keys starting with ``prefix`` that are neither loaded nor dropped yet."""
        return sorted(
            k for k in self.tensors
            if k.startswith(prefix) and k not in self.used and not self._is_dropped(k)
        )

    def _is_dropped(self, key: str) -> bool:
        return any(key in keys for keys in self.dropped.values())

    def drop(self, key: str, reason: str) -> None:
        """Mark ``key`` as dropped on purpose, for ``reason``."""
        self.dropped.setdefault(reason, []).append(key)

    def error(self, what: str) -> VqgenError:
        """A :class:`VqgenError` naming the checkpoint and config, saying ``what``."""
        return VqgenError(
            f"cannot import taming checkpoint {self.source} (config {self.config}): {what}"
        )

    def load(self, module: nn.Module, prefix: str, what: str) -> None:
        """Load every unclaimed tensor under ``prefix`` into ``module``, strictly."""
        expected = module.state_dict()
        mapped: dict[str, torch.Tensor] = {}
        for key in self.under(prefix):
            name = key[len(prefix):]
            if name not in expected:
                raise self.error(
                    f"unexpected tensor {key!r} {tuple(self.tensors[key].shape)}: the {what} "
                    "this config describes has no such weight, and it is not one vqgen drops "
                    "on purpose (loss.*, colorize, attention masks, permuter indices, EMA "
                    f"statistics). {_CHECK_CONFIG}"
                )
            t, want = self.tensors[key], expected[name]
            if tuple(t.shape) != tuple(want.shape):
                raise self.error(
                    f"tensor {key!r} has shape {tuple(t.shape)} but the {what} this config "
                    f"describes needs {tuple(want.shape)}. {_CHECK_CONFIG}"
                )
            mapped[name] = t
        missing = [k for k in expected if k not in mapped]
        if missing:
            raise self.error(
                f"missing tensor {prefix + missing[0]!r} {tuple(expected[missing[0]].shape)}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + f": the {what} this config describes has it, the checkpoint does not. "
                + _CHECK_CONFIG
            )
        module.load_state_dict(mapped, strict=True)
        self.used.update(prefix + k for k in mapped)

    def check_all_claimed(self, valid: str) -> None:
        """Raise for the first tensor that was neither loaded nor dropped."""
        left = self.under("")
        if left:
            raise self.error(
                f"unexpected tensor {left[0]!r} {tuple(self.tensors[left[0]].shape)}"
                + (f" (and {len(left) - 1} more)" if len(left) > 1 else "")
                + f": no part of the model this config describes takes it (it has {valid}), "
                f"and it is not one vqgen drops on purpose. {_CHECK_CONFIG}"
            )

    def record(self) -> dict[str, Any]:
        """What was loaded (a count) and dropped (reason → sorted keys), for the run."""
        return {"loaded": len(self.used),
                "dropped": {reason: sorted(keys) for reason, keys in self.dropped.items()}}
