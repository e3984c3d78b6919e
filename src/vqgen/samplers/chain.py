"""Chain: compose samplers by applying their ``warp`` steps in order.

.. code-block:: yaml

    sampler:
      name: chain
      params:
        steps:
          - {name: top_k, params: {k: 100}}
          - {name: top_p, params: {p: 0.9}}

Each step is a ``{name, params}`` spec naming a registered sampler. The steps
are built when the chain is constructed, from the registry that builds the chain
(:func:`vqgen.core.registry.current_registry`; the process-wide one when the chain is
made by hand), so a misspelt name or a bad parameter fails at once and names the step. Only
the steps' ``warp`` is used; drawing is the base :meth:`Sampler.sample`.
An empty chain warps nothing (it samples ``softmax(logits)``).

Two names are refused as steps: ``chain`` (list the inner steps directly; a
flat list says the same thing) and ``rejection`` (it judges finished samples,
not one step's logits; wrap the chain in the rejection sampler instead).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, field_validator

from vqgen.core.interfaces import ParamsModel, Sampler
from vqgen.core.registry import ComponentError, current_registry

__all__ = ["Chain", "SamplerStep"]

#: Step names a chain refuses, with the reason given to the user.
_REFUSED = {
    "chain": "chains do not nest; list the inner chain's steps directly",
    "rejection": "the rejection sampler judges finished samples, not one step's logits; "
    "wrap the chain in the rejection sampler instead",
}


class SamplerStep(ParamsModel):
    """One step of a chain: a registered sampler name and its params."""

    name: str = Field(min_length=1)
    params: dict[str, Any] = {}

    @field_validator("name")
    @classmethod
    def _not_refused(cls, name: str) -> str:
        if name in _REFUSED:
            raise ValueError(f"{name!r} cannot be a chain step: {_REFUSED[name]}")
        return name


class Chain(Sampler):
    """Compose samplers: apply each step's warp in order (e.g. top_k then top_p)."""

    class Params(ParamsModel):
        steps: list[SamplerStep] = Field(
            [], description="samplers applied in order, each {name, params}"
        )

    def __init__(self, steps: list[SamplerStep | dict[str, Any]] = []) -> None:  # noqa: B006
        # (the default must equal Params' default; it is validated into a new list, never mutated)
        super().__init__(steps=steps)
        built = []
        for i, step in enumerate(self.params.steps):
            where = f"invalid params for sampler 'chain': params.steps.{i} ({step.name!r})"
            try:
                sampler = current_registry().create("sampler", step.name, step.params)
            except ComponentError as err:
                raise ComponentError(f"{where}: {err}") from None
            if isinstance(sampler, Chain):  # a chain registered under another name
                raise ComponentError(f"{where}: {_REFUSED['chain']}")
            built.append(sampler)
        #: The built step samplers, in order.
        self.steps: tuple[Sampler, ...] = tuple(built)

    def warp(self, logits: torch.Tensor) -> torch.Tensor:
        for step in self.steps:
            logits = step.warp(logits)  # (B, V)
        return logits
