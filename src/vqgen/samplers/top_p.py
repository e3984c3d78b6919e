"""Nucleus (top-p) sampling: keep the smallest set of likely ids that holds mass ``p``.

Per row, ids are sorted by probability, most likely first, and kept up to and
including the first one at which the cumulative probability reaches ``p``
(``>= p``). The most likely id is always kept, so a row is never empty, and
``p = 1`` keeps every id. A cumulative sum that falls short of ``p`` by less than
``1e-6`` counts as reaching it: float32 rounding otherwise decides boundary
cases such as probabilities ``[0.5, 0.3, 0.15, 0.05]`` with ``p = 0.8`` (which keep
exactly the first two).

Order of operations, as in taming-transformers' fast sampler: temperature, then
the optional top-k cut, then the nucleus of the renormalised distribution that
remains. The softmax is computed in float32 (or float64 for float64 logits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt

from vqgen.core.interfaces import ParamsModel, Sampler
from vqgen.samplers.temperature import apply_temperature, as_float
from vqgen.samplers.top_k import top_k_filter

__all__ = ["TOP_P_TOLERANCE", "TopP", "top_p_filter"]

#: A cumulative probability within this of ``p`` counts as having reached it.
TOP_P_TOLERANCE = 1e-6


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """``[B, V]`` logits with every id outside each row's nucleus set to ``-inf``.

    Ids already at ``-inf`` have probability zero and stay excluded.
    """
    if p >= 1.0:
        return logits  # the nucleus of mass 1 is every id with nonzero probability
    probs = torch.softmax(as_float(logits), dim=-1)  # (B, V)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)  # (B, V), (B, V)
    mass_before = F.pad(torch.cumsum(sorted_probs, dim=-1)[:, :-1], (1, 0))  # (B, V)
    keep_sorted = mass_before < p - TOP_P_TOLERANCE  # (B, V) not yet reached p
    keep_sorted[:, 0] = True  # the most likely id, whatever p
    keep = torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)  # (B, V)
    return logits.masked_fill(~keep, float("-inf"))  # (B, V)


class TopP(Sampler):
    """Nucleus sampling: the smallest set of ids whose probability reaches p."""

    class Params(ParamsModel):
        p: float = Field(0.9, gt=0, le=1, description="probability mass of the nucleus, in (0, 1]")
        temperature: float = Field(
            1.0, ge=1e-3, le=1e3, allow_inf_nan=False,
            description="divide the logits by this, in [0.001, 1000]"
        )
        top_k: PositiveInt | None = Field(
            None, description="if set, keep only the top_k most likely ids before the nucleus"
        )

    def __init__(self, p: float = 0.9, temperature: float = 1.0, top_k: int | None = None) -> None:
        super().__init__(p=p, temperature=temperature, top_k=top_k)

    def warp(self, logits: torch.Tensor) -> torch.Tensor:
        logits = apply_temperature(logits, self.params.temperature)  # (B, V)
        if self.params.top_k is not None:
            logits = top_k_filter(logits, self.params.top_k)  # (B, V)
        return top_p_filter(logits, self.params.p)  # (B, V)
