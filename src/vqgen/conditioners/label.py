"""``class``: one condition token per image, its class label.

Reads ``batch["label"]``: int64 ``[B]`` class ids in ``[0, n_classes)``. A label of
``-1`` (or ``None`` in a list) asks for no condition: the null token, so one model
trained with condition dropout samples both class-conditionally and
unconditionally (and with classifier-free guidance).

Ids: ``0 .. n_classes - 1`` the classes, ``n_classes`` the null token
(``null_token: false`` leaves it out: taming's layout).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import torch
from pydantic import Field

from vqgen.conditioners.base import first_bad, require
from vqgen.core.errors import SampleError, VqgenError
from vqgen.core.interfaces import AUTO, Auto, Conditioner, ParamsModel, Sizes, require_wired

__all__ = ["NULL_LABEL", "ClassConditioner"]

#: A label value that means "unconditional" (mapped to the null token).
NULL_LABEL = -1


class ClassConditioner(Conditioner):
    """One token per image from its class label (``-1``: the null token)."""

    #: the batch key a condition file given to `vqgen sample --cond FILE` fills
    condition_key = "label"

    class Params(ParamsModel):
        n_classes: Annotated[int, Field(ge=1, le=1 << 20)] | Auto = Field(
            AUTO, description="classes of the data (auto: the data set's, e.g. its class "
            "folders); an explicit number must equal it"
        )
        null_token: bool = Field(
            True, description="reserve id n_classes for 'no class' (dropout, guidance)"
        )

    def __init__(self, n_classes: int | Auto = AUTO, null_token: bool = True) -> None:
        super().__init__(n_classes=n_classes, null_token=null_token)
        require_wired(self, ("n_classes",))
        n = int(n_classes)
        self.n_classes = n
        self.vocab_size = n + int(null_token)
        self.null_id = n if null_token else None

    @classmethod
    def wire(cls, params: dict[str, Any], sizes: Sizes) -> dict[str, Any]:
        """``n_classes`` from the data set; an explicit one must equal the data's."""
        given = params.get("n_classes")
        if given not in (AUTO, None) and sizes.n_classes is not None \
                and given != sizes.n_classes:
            raise ValueError(f"n_classes: {given}, but {sizes.data} has {sizes.n_classes} "
                             "classes; leave it out (auto) or fix the data")
        return super().wire(params, sizes)

    def labels(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """``batch["label"]`` as int64 ``[B]``, checked; ``-1`` / ``None`` → null id."""
        raw = require(batch, "label", "class", "(int64 [B] class ids)")
        if isinstance(raw, list | tuple):
            raw = [NULL_LABEL if v is None else v for v in raw]
        labels = torch.as_tensor(raw)
        if labels.ndim == 0:
            labels = labels[None]
        if labels.ndim != 1:
            raise VqgenError(
                f"label must be [B] class ids, one per sample; got shape {tuple(labels.shape)}"
            )
        if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
            raise VqgenError(f"label must hold integer class ids, got dtype {labels.dtype}")
        labels = labels.long()
        null = labels == NULL_LABEL
        i = first_bad(((labels < 0) | (labels >= self.n_classes)) & ~null)
        if i is not None:
            raise SampleError(
                "label", i, f"is {int(labels[i])}, outside [0, {self.n_classes}) "
                f"(n_classes={self.n_classes}; -1 means unconditional)"
            )
        if bool(null.any()):
            if self.null_id is None:
                i = first_bad(null)
                raise SampleError(
                    "label", int(i or 0), "is -1 (unconditional), but this class conditioner "
                    "has no null token; set null_token: true"
                )
            labels = torch.where(null, torch.full_like(labels, self.null_id), labels)
        return labels  # (B,)

    def tokens(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """``[B, 1]`` int64: the class id, or ``null_id`` for ``-1``."""
        return self.labels(batch)[:, None]  # (B, 1)
