"""VQGAN with Finite Scalar Quantization (Mentzer et al. 2023, "Finite Scalar
Quantization: VQ-VAE Made Simple"), registered as ``fsq``.

The encoder's latent is projected (``quant_conv``, 1×1) to ``d = len(levels)``
channels; channel ``i`` is bounded to ``levels[i]`` values and rounded, so the
code grid is the product of the per-channel levels: ``vocab_size = prod(levels)``.
There is no codebook and no codebook loss, so nothing can collapse or die;
``post_quant_conv`` projects the grid point back for the decoder. Encoder,
decoder, discriminator and losses are the ``vqgan`` ones.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from einops import rearrange
from pydantic import Field, field_validator
from torch import nn

from vqgen.plugins.kmeans import codebook_stats
from vqgen.plugins.vqgan.model import QuantizerOutput
from vqgen.plugins.vqgan.tokenizer import (
    VQGAN,
    _ArchParams,
    _build,
    _ImageParams,
    _VQModel,
    image_loss,
)

__all__ = ["FSQuantizer", "VQGANFSQ"]

#: the largest vocabulary (as ``n_embed`` of the codebook quantizers)
MAX_CODES = 1 << 20


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` whose gradient is the identity (straight-through); the value is
    exactly ``round(x)`` (``x − sg(x)`` is exactly 0)."""
    return torch.round(x).detach() + (x - x.detach())


class FSQuantizer(nn.Module):
    """Finite scalar quantizer: ``z`` ``[B, d, h, w]`` → grid points, codes ``[B, h, w]``.

    Channel ``i`` is bounded by ``tanh`` to an interval that rounds to exactly
    ``levels[i]`` integers (even levels are offset by half a step, as in the paper:
    ``{-L/2, …, L/2 - 1}``; odd ones are ``{-(L-1)/2, …, (L-1)/2}``), rounded with a
    straight-through gradient and divided by ``L // 2``, so grid values lie in
    ``[-1, 1]``. A code is the mixed-radix number of the per-channel digits
    (``value + L // 2`` in ``[0, L)``), channel 0 the least significant. No
    parameters; the loss is 0.

    The bins are symmetric about ``z = 0`` (for even ``L``, 0 is the boundary between
    the two middle values). The paper's code also shifts ``z`` by
    ``tan(offset / half_l)`` (vector-quantize-pytorch: ``atanh``, with ``1 + eps``) to
    move even levels' value 0 onto ``z ≈ 0``; for ``L = 2`` that moves the only
    boundary to ``z ≈ −1.6`` (``−3.8``), into tanh's saturation as seen from latents
    that start near 0: with the ``atanh`` shift, uniform latents in ``[−2, 2]`` left 60
    of the 120 codes of ``levels [2, 3, 4, 5]`` unused; symmetric bins use all 120.
    """

    def __init__(self, levels: list[int] | tuple[int, ...], eps: float = 1e-3) -> None:
        super().__init__()
        self.levels_list = [int(v) for v in levels]
        self.dim = len(self.levels_list)
        self.n_embed = math.prod(self.levels_list)
        self.eps = eps
        basis = [math.prod(self.levels_list[:i]) for i in range(self.dim)]
        # derived from the params, so not part of the weights
        self.register_buffer("levels", torch.tensor(self.levels_list), persistent=False)  # (d,)
        self.register_buffer("basis", torch.tensor(basis), persistent=False)  # (d,)

    def _per_channel(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(half_l, offset, half_width)``, each ``[1, d, 1, 1]`` float."""
        levels = rearrange(self.levels, "d -> 1 d 1 1").float()  # (1, d, 1, 1)
        # the paper's (1 − eps): the bound stays strictly inside (min − ½, max + ½), so
        # rounding yields exactly the L values min … max, the outermost ones included
        half_l = (levels - 1) * (1 - self.eps) / 2
        offset = (levels % 2 == 0).float() * 0.5  # even levels: half a step down
        return half_l, offset, torch.div(levels, 2, rounding_mode="floor")

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """``[B, d, h, w]`` → per channel, values in ``(min − ½, max + ½)`` that round to the
        channel's ``L`` integers ``min … max``; the bins are symmetric about ``z = 0``."""
        half_l, offset, _ = self._per_channel()
        return torch.tanh(z) * half_l - offset  # (B, d, h, w)

    def digits_to_codes(self, digits: torch.Tensor) -> torch.Tensor:
        """``[..., d]`` int64 digits (``0 ≤ digit_i < levels[i]``) → ``[...]`` int64 codes."""
        return (digits * self.basis).sum(-1)

    def codes_to_digits(self, codes: torch.Tensor) -> torch.Tensor:
        """``[...]`` int64 codes → ``[..., d]`` int64 digits (the inverse of
        :meth:`digits_to_codes`)."""
        return torch.div(codes[..., None], self.basis, rounding_mode="floor") % self.levels

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """``[B, h, w]`` int64 → ``[B, d, h, w]``: the grid value of each code."""
        digits = rearrange(self.codes_to_digits(codes), "b h w d -> b d h w")  # (B, d, h, w)
        _, _, half_width = self._per_channel()
        return (digits.float() - half_width) / half_width  # (B, d, h, w)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize ``z`` ``[B, d, h, w]`` (see the class docstring); computed in float32."""
        _, _, half_width = self._per_channel()
        q = round_ste(self.bound(z.float()))  # (B, d, h, w) integers, identity gradient
        z_q = (q / half_width).to(z.dtype)  # (B, d, h, w) in [-1, 1]
        digits = rearrange((q.detach() + half_width).round().long(), "b d h w -> b h w d")
        codes = self.digits_to_codes(digits)  # (B, h, w)
        usage, perplexity = codebook_stats(codes, self.n_embed)
        loss = z.new_zeros((), dtype=torch.float32)
        return QuantizerOutput(z_q, loss, codes, usage, perplexity, 0)


class VQGANFSQ(_VQModel):
    """VQGAN with Finite Scalar Quantization (FSQ): no codebook, a fixed grid of codes.

    Same encoder, decoder and training objective (L1/L2 + LPIPS + PatchGAN) as
    ``vqgan``; the quantizer (:class:`FSQuantizer`) rounds each of ``len(levels)``
    latent channels to ``levels[i]`` values, so ``vocab_size = prod(levels)`` and
    every code is reachable by construction (no collapse, no restarts, no codebook
    loss). ``code_vectors()`` are the grid points ``[vocab_size, len(levels)]``.

    There is no ``embed_dim``: the latent around the quantizer has ``len(levels)``
    channels; ``quant_conv`` (1×1, ``z_channels`` → ``len(levels)``) projects into it and
    ``post_quant_conv`` back out (a further 1×1 projection in between would compose
    with them into the same linear map).
    """

    input_key = "image"

    class Params(_ImageParams, _ArchParams):
        """Encoder / decoder, the FSQ levels, channels and training loss."""

        levels: list[int] = Field(
            default_factory=lambda: [8, 5, 5, 5],
            min_length=1,
            description="values per latent channel; vocab_size = their product "
            "(the paper's [8, 5, 5, 5] = 1000 codes; [8, 8, 8] = 512, [8, 5, 5, 5, 5] ≈ 2^12)",
        )

        @field_validator("levels")
        @classmethod
        def _check_levels(cls, levels: list[int]) -> list[int]:
            if any(v < 2 for v in levels):
                raise ValueError("every level must be >= 2 (a level of 1 is a constant channel)")
            n = math.prod(levels)
            if n > MAX_CODES:
                raise ValueError(
                    f"their product (the vocabulary) must be <= 2^20 = {MAX_CODES}, "
                    f"got {n}"
                )
            return levels

    def __init__(self, **fields: Any) -> None:
        super().__init__(**fields)
        p = self.params
        _build(self, p.in_channels, p.out_channels or p.in_channels,
               lambda: FSQuantizer(p.levels), embed_dim=len(p.levels))

    def build_loss(self) -> nn.Module:
        """The training objective (L1/L2 + LPIPS + PatchGAN); the quantizer adds nothing."""
        return image_loss(self.params, 1.0)

    to_rgb = VQGAN.to_rgb
