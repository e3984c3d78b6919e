"""Which device a setting names: one meaning of ``device: auto`` for validation (will a
stage train on this machine's CPU?) and for the runtime (where it trains)."""

from __future__ import annotations

import torch

from vqgen.core.errors import VqgenError

__all__ = ["resolve_device"]


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
