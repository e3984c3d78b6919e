"""Built-in samplers (a plugin registered through the `vqgen_register` hook).

=============  ====================================================================
name           what it does to one step's logits ``[B, V]``
=============  ====================================================================
temperature    ``logits / temperature``; nothing excluded
top_k          keep the ``k`` largest per row (``k`` may be a list: mixed k)
top_p          nucleus: the smallest set of ids whose probability reaches ``p``
chain          apply several samplers' warps in order
rejection      the inner sampler's warp; judges finished samples with a classifier
               and keeps the best ``acceptance_rate`` of them (see ``rejection.py``)
=============  ====================================================================

Every sampler draws with the base :meth:`vqgen.Sampler.sample`: softmax of the
warped logits in float32, then ``torch.multinomial`` with the caller's generator.
"""

from __future__ import annotations

from typing import Any

from vqgen.core.hookspecs import hookimpl
from vqgen.samplers.chain import Chain, SamplerStep
from vqgen.samplers.rejection import Rejection, rejection_sample
from vqgen.samplers.temperature import Temperature, apply_temperature
from vqgen.samplers.top_k import TopK, k_per_row, top_k_filter
from vqgen.samplers.top_p import TopP, top_p_filter

__all__ = [
    "Chain",
    "Rejection",
    "SamplerStep",
    "Temperature",
    "TopK",
    "TopP",
    "apply_temperature",
    "k_per_row",
    "rejection_sample",
    "top_k_filter",
    "top_p_filter",
    "vqgen_register",
]


@hookimpl
def vqgen_register(registry: Any) -> None:
    """Register the built-in samplers."""
    registry.add("sampler", "temperature", Temperature)
    registry.add("sampler", "top_k", TopK)
    registry.add("sampler", "top_p", TopP)
    registry.add("sampler", "chain", Chain)
    registry.add("sampler", "rejection", Rejection)
