"""VQGAN with taming's Gumbel-softmax quantizer (its ``GumbelVQ``), registered as
``vqgan_gumbel``: what ``vqgen import taming`` turns GumbelVQ checkpoints into."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import Field
from torch import nn

from vqgen.plugins.kmeans import codebook_stats
from vqgen.plugins.vqgan.model import QuantizerOutput
from vqgen.plugins.vqgan.tokenizer import VQGAN, _build, _ImageParams, _NetParams, _VQModel

__all__ = ["GumbelQuantizer", "VQGANGumbel"]


class GumbelQuantizer(nn.Module):
    """taming's ``GumbelQuantize``: a 1×1 conv gives code logits, codes are their arg-max.

    ``z`` ``[B, embed_dim, h, w]`` → logits ``[B, n_embed, h, w]`` (``proj``). In
    training (with gradients) the code vectors are a straight-through Gumbel-softmax
    mixture at ``temperature``; otherwise the arg-max code's vector of ``embed``
    (no noise: taming adds Gumbel noise even in eval mode). Loss: ``kl_weight`` ×
    KL(softmax(logits) ‖ uniform).
    """

    def __init__(
        self, n_embed: int, embed_dim: int, kl_weight: float, temperature: float
    ) -> None:
        super().__init__()
        self.n_embed, self.kl_weight, self.temperature = n_embed, kl_weight, temperature
        self.proj = nn.Conv2d(embed_dim, n_embed, 1)
        self.embed = nn.Embedding(n_embed, embed_dim)

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """``[B, h, w]`` int64 → ``[B, embed_dim, h, w]``."""
        return rearrange(self.embed.weight[codes], "b h w c -> b c h w")

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize ``z`` ``[B, embed_dim, h, w]`` (see the class docstring)."""
        logits = self.proj(z)  # (B, n_embed, h, w)
        if self.training and torch.is_grad_enabled():
            one_hot = F.gumbel_softmax(logits, tau=self.temperature, dim=1, hard=True)
        else:
            idx = logits.argmax(1)  # (B, h, w)
            one_hot = rearrange(F.one_hot(idx, self.n_embed), "b h w n -> b n h w")
            one_hot = one_hot.to(logits.dtype)  # (B, n_embed, h, w)
        z_q = torch.einsum("bnhw,nd->bdhw", one_hot, self.embed.weight)  # (B, embed_dim, h, w)
        qy = F.softmax(logits, dim=1)  # (B, n_embed, h, w)
        loss = self.kl_weight * (qy * torch.log(qy * self.n_embed + 1e-10)).sum(1).mean()
        codes = one_hot.argmax(1)  # (B, h, w)
        usage, perplexity = codebook_stats(codes.detach(), self.n_embed)
        return QuantizerOutput(z_q, loss, codes, usage, perplexity, 0)


class VQGANGumbel(_VQModel):
    """VQGAN with taming's Gumbel-softmax quantizer (its ``GumbelVQ``), for imports.

    Same encoder, decoder and training objective as ``vqgan``; the quantizer
    (:class:`GumbelQuantizer`) picks codes by the arg-max of learned logits.
    """

    input_key = "image"

    class Params(_ImageParams, _NetParams):
        kl_weight: float = Field(1e-8, ge=0.0, description="weight of KL(q ‖ uniform)")
        temperature: float = Field(1.0, gt=0.0, description="Gumbel-softmax temperature")

    def __init__(self, **fields: Any) -> None:
        super().__init__(**fields)
        p = self.params
        _build(self, p.in_channels, p.out_channels or p.in_channels,
               lambda: GumbelQuantizer(p.n_embed, p.embed_dim, p.kl_weight, p.temperature))

    build_loss = VQGAN.build_loss
    to_rgb = VQGAN.to_rgb


