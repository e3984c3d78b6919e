"""What the built-in conditioners share: the null token, the owned tokenizer, checks.

* Every built-in conditioner reserves one id at the end of its vocabulary for "no
  condition" (``null_id = vocab_size - 1``), unless ``null_token: false``, so any
  of them can be trained with condition dropout (:func:`drop_condition`) and
  sampled with classifier-free guidance.
* A spatial conditioner (:class:`SpatialConditioner`) turns a batch into a map,
  ``condition_input(batch) -> [B, C, H, W]`` in ``[-1, 1]`` (one-hot for label
  maps), and encodes it with a tokenizer of its own (the paper's "cond stage"),
  built from its ``tokenizer: {name, params}`` param through the registry and
  kept as ``self.tokenizer``. That tokenizer is trained as its own stage 1 on
  ``condition_input`` (:class:`ConditionInputs` wraps a dataset to yield it).
* Bad conditions raise :class:`~vqgen.core.errors.VqgenError` naming the batch
  key, the offending sample and what was expected.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import Any

import torch
from einops import rearrange
from pydantic import Field

from vqgen.core.data import ConditionInputs
from vqgen.core.errors import SampleError, VqgenError
from vqgen.core.interfaces import Conditioner, ParamsModel, Sizes, Tokenizer
from vqgen.core.registry import current_registry

__all__ = [
    "ConditionInputs",
    "SpatialConditioner",
    "TokenizerSpec",
    "drop_condition",
    "first_bad",
    "require",
]


class TokenizerSpec(ParamsModel):
    """A spatial conditioner's own tokenizer, by registry name, with its params."""

    name: str = Field(description="registry name of a tokenizer, e.g. vqgan")
    params: dict[str, Any] = Field(default_factory=dict)


def drop_condition(
    conditioner: Conditioner,
    tokens: torch.Tensor,
    p: float,
    generator: torch.Generator | None = None,
    *,
    rank: int = 0,
    world: int = 1,
) -> torch.Tensor:
    """Condition dropout (:meth:`Conditioner.drop`): each sample's ``[B, Lc]`` tokens
    become null with probability ``p``, drawn for the global batch."""
    return conditioner.drop(tokens, p, generator, rank=rank, world=world)


def require(batch: Mapping[str, Any], key: str, who: str, what: str) -> Any:
    """``batch[key]``, or a VqgenError saying who needs it and in what form."""
    if key not in batch or batch[key] is None:
        have = ", ".join(sorted(map(str, batch))) or "nothing"
        raise VqgenError(
            f"missing {key}: the {who} conditioner needs batch[{key!r}] {what}; "
            f"the batch has {have}"
        )
    return batch[key]


def first_bad(mask: torch.Tensor) -> int | None:
    """Index of the first sample (leading dim) with any ``True`` in ``mask``, or None."""
    rows = mask.reshape(mask.shape[0], -1).any(1)  # (B,)
    return int(rows.nonzero()[0, 0]) if bool(rows.any()) else None


def check_finite(x: torch.Tensor, key: str) -> None:
    """Raise naming the first sample of ``x`` with a NaN or infinite value."""
    i = first_bad(~torch.isfinite(x))
    if i is not None:
        raise SampleError(key, i, "contains NaN or infinite values")


def check_image_size(batch: Mapping[str, Any], key: str, hw: tuple[int, int]) -> None:
    """A condition map of ``hw`` pixels must match ``batch["image"]`` where there is one."""
    image = batch.get("image")
    if isinstance(image, torch.Tensor) and image.ndim == 4 and tuple(image.shape[-2:]) != hw:
        raise VqgenError(
            f"{key} is {hw[0]}x{hw[1]} pixels but the image is "
            f"{image.shape[-2]}x{image.shape[-1]}; give a {key} of the image's size"
        )


class SpatialConditioner(Conditioner):
    """A condition map encoded by a tokenizer of its own into a ``[B, hc, wc]`` grid.

    Subclasses implement ``condition_input(batch)`` and call :meth:`init_tokenizer`
    in ``__init__``; ``grid`` and ``tokens`` (row-major) come from here.
    """

    spatial = True
    tokenizer: Tokenizer | None

    def init_tokenizer(
        self,
        spec: TokenizerSpec,
        channels: int,
        null_token: bool,
        channel_param: str = "in_channels",
    ) -> None:
        """Build ``self.tokenizer`` from ``spec`` through the registry; set the vocabulary.

        The tokenizer must take ``channels``-channel maps (its ``channel_param``);
        ``vocab_size`` becomes its codes plus the null token (``null_token``).
        """
        self.tokenizer = self._build_tokenizer(spec, channels, channel_param)
        self.set_vocab(self.tokenizer.vocab_size, null_token)

    def set_vocab(self, n: int, null_token: bool) -> None:
        """``n`` condition ids, plus a last one for "no condition" when ``null_token``."""
        self.vocab_size = n + int(null_token)
        self.null_id = self.vocab_size - 1 if null_token else None

    @classmethod
    def wire(cls, params: dict[str, Any], sizes: Sizes) -> dict[str, Any]:
        """Besides the ``"auto"`` fields: the own tokenizer's downsampling factor, where
        its params leave it out, becomes the image tokenizer's f, so that the condition
        grid lies cell by cell on the image grid (its input channels are filled in when
        it is built: the conditioner knows what it feeds it)."""
        out = super().wire(params, sizes)
        spec = out.get("tokenizer")
        if isinstance(spec, dict) and "name" in spec and sizes.downsample is not None:
            tok_cls = current_registry().get("tokenizer", spec["name"]).cls
            nested = tok_cls.with_downsample(dict(spec.get("params") or {}), sizes.downsample)
            out["tokenizer"] = {**spec, "params": nested}
        return out

    def condition_shape(self, height: int, width: int) -> tuple[int, ...]:
        """``(hc, wc)``: the own tokenizer's grid for ``height × width`` pixel maps."""
        if self.tokenizer is None:
            raise TypeError(f"{type(self).__name__} has no tokenizer of its own")
        return tuple(self.tokenizer.latent_shape(height, width))

    def _build_tokenizer(self, spec: TokenizerSpec, channels: int, channel_param: str) -> Tokenizer:
        who = type(self).__name__
        registry = current_registry()  # the one building this conditioner
        try:
            fields = registry.get("tokenizer", spec.name).params_model.model_fields
            if channel_param not in fields:  # e.g. a plain VQGAN given one-hot label maps
                channel_param = "in_channels"
            if channel_param in fields and channel_param not in spec.params:
                spec.params = {channel_param: channels, **spec.params}  # what it is fed
            tok = registry.create("tokenizer", spec.name, spec.params)
        except VqgenError as exc:
            raise VqgenError(
                f"{who}: cannot build its tokenizer (params.tokenizer): {exc}"
            ) from None
        if tok.in_channels != channels:
            raise VqgenError(
                f"{who} feeds its tokenizer {channels}-channel maps, but tokenizer "
                f"{spec.name!r} takes {tok.in_channels} channels; set "
                f"params.tokenizer.params.{channel_param}: {channels}"
            )
        return tok

    @abstractmethod
    def condition_input(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """What the own tokenizer encodes: ``[B, C, H, W]`` float (``[-1, 1]`` or one-hot)."""

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``condition_input`` maps ``[B, C, H, W]`` → codes ``[B, hc, wc]`` (eval mode)."""
        tok = self.tokenizer
        if tok is None:
            raise TypeError(f"{type(self).__name__} has no tokenizer of its own")
        p = next(tok.parameters(), None)
        x = x.to(p.device) if p is not None else x
        was_training = tok.training
        tok.eval()
        try:
            return tok.encode(x)  # (B, hc, wc)
        finally:
            tok.train(was_training)

    def grid(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Condition tokens as a grid ``[B, hc, wc]`` int64."""
        return self.encode(self.condition_input(batch))

    def tokens(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Condition tokens ``[B, hc * wc]`` int64, row-major."""
        return rearrange(self.grid(batch), "b h w -> b (h w)")
