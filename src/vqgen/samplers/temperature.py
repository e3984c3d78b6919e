"""Temperature: the sampler every other sampler builds on.

``logits / T`` sharpens (``T < 1``) or flattens (``T > 1``) the distribution;
``T = 1`` leaves it as the prior predicted it. Nothing is excluded.

Processed logits are at least float32: half-precision (bf16 / fp16) logits are
upcast before dividing so that the softmax downstream sees full precision;
float32 and float64 logits keep their dtype.
"""

from __future__ import annotations

import torch
from pydantic import Field

from vqgen.core.interfaces import ParamsModel, Sampler

__all__ = ["Temperature", "apply_temperature", "as_float"]


def as_float(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` as float32 or wider (half precision is upcast, float64 kept)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``[B, V]`` logits divided by ``temperature`` (> 0), in float32 or wider."""
    return as_float(logits) / temperature  # (B, V)


class Temperature(Sampler):
    """Sample from softmax(logits / temperature), excluding nothing."""

    class Params(ParamsModel):
        temperature: float = Field(
            1.0, ge=1e-3, le=1e3, allow_inf_nan=False,
            description="divide the logits by this, in [0.001, 1000]"
        )

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__(temperature=temperature)

    def warp(self, logits: torch.Tensor) -> torch.Tensor:
        return apply_temperature(logits, self.params.temperature)  # (B, V)
