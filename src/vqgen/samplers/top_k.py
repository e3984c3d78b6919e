"""Top-k sampling: keep the ``k`` most likely ids of each row, renormalise, draw.

``k`` is clipped to the vocabulary size ``V``. Exactly ``min(k, V)`` ids stay
finite per row even when several logits tie at the boundary: the kept set comes
from ``torch.topk``'s indices (ties broken arbitrarily, as ``topk`` does), not
from comparing against the k-th value, which would keep every tied id.

Mixed k (Tab. 4 of Taming Transformers, "mixed k"): ``k`` may be a list of
values spread over the rows of a batch, so one call produces samples at several
diversity levels. Row ``b`` of a batch of ``B`` rows uses ``k[b * len(k) // B]``:
the batch is cut into ``len(k)`` contiguous, nearly equal blocks, the first
block using ``k[0]``, the next ``k[1]``, and so on. With ``B = 6`` and
``k = [10, 50, 100]`` the rows use ``10, 10, 50, 50, 100, 100``; with
``B < len(k)`` some values go unused (``B = 1`` always uses ``k[0]``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field, field_validator

from vqgen.core.interfaces import ParamsModel, Sampler
from vqgen.samplers.temperature import apply_temperature

__all__ = ["TopK", "k_per_row", "top_k_filter"]


def k_per_row(k: int | Sequence[int], batch_size: int) -> list[int]:
    """The ``k`` of each of ``batch_size`` rows: ``k[b * len(k) // B]`` for a list."""
    if isinstance(k, int):
        return [k] * batch_size
    n = len(k)
    return [k[b * n // batch_size] for b in range(batch_size)]


def top_k_filter(logits: torch.Tensor, k: int | Sequence[int]) -> torch.Tensor:
    """``[B, V]`` logits with all but the ``k`` largest of each row set to ``-inf``.

    ``k`` is an int or a list spread over the rows (see :func:`k_per_row`); each
    row's ``k`` is clipped to ``V``.
    """
    B, V = logits.shape
    ks = [min(kb, V) for kb in k_per_row(k, B)]
    kmax = max(ks)
    if min(ks) == V:
        return logits  # nothing to exclude
    # topk's indices keep exactly kmax ids per row even with ties; sorted so that the
    # first ks[b] of them are row b's ks[b] largest when k differs between rows
    idx = torch.topk(logits, kmax, dim=-1, sorted=len(set(ks)) > 1).indices  # (B, kmax)
    ks_t = torch.tensor(ks, device=logits.device)  # (B,)
    keep_idx = torch.arange(kmax, device=logits.device) < ks_t[:, None]  # (B, kmax)
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, idx, keep_idx)  # (B, V)
    return logits.masked_fill(~keep, float("-inf"))  # (B, V)


class TopK(Sampler):
    """Top-k sampling: only the k most likely ids (k may be a list: mixed k)."""

    class Params(ParamsModel):
        k: int | list[int] = Field(
            100,
            description="keep this many ids per row (clipped to the vocabulary size); "
            "a list spreads several k over a batch: row b of B uses k[b * len(k) // B]",
        )
        temperature: float = Field(
            1.0, ge=1e-3, le=1e3, allow_inf_nan=False,
            description="divide the logits by this, in [0.001, 1000]"
        )

        @field_validator("k")
        @classmethod
        def _positive(cls, k: int | list[int]) -> int | list[int]:
            if isinstance(k, list) and not k:
                raise ValueError("a mixed-k list needs at least one value")
            if min(k if isinstance(k, list) else [k]) < 1:
                raise ValueError("k must be at least 1 (every value, for a mixed-k list)")
            return k

    def __init__(self, k: int | list[int] = 100, temperature: float = 1.0) -> None:
        super().__init__(k=k, temperature=temperature)

    def warp(self, logits: torch.Tensor) -> torch.Tensor:
        logits = apply_temperature(logits, self.params.temperature)  # (B, V)
        return top_k_filter(logits, self.params.k)  # (B, V)
