"""VQGAN with taming's Gumbel-softmax quantizer (its ``GumbelVQ``), registered as
``vqgan_gumbel``: what ``vqgen import taming`` turns GumbelVQ checkpoints into."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import Field, model_validator
from torch import nn

from vqgen.core.interfaces import ParamsModel
from vqgen.plugins.kmeans import codebook_stats
from vqgen.plugins.vqgan.model import Decoder, Encoder, QuantizerOutput
from vqgen.plugins.vqgan.tokenizer import VQGAN, _VQModel

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

    class Params(ParamsModel):
        ch: int = Field(32, ge=1, description="base channel count")
        ch_mult: tuple[int, ...] = Field((1, 2, 2), min_length=1)
        num_res_blocks: int = Field(1, ge=1)
        attn_resolutions: tuple[int, ...] = ()
        resolution: int = Field(32, ge=1)
        z_channels: int = Field(32, ge=1)
        dropout: float = Field(0.0, ge=0.0, lt=1.0)
        norm_groups: int = Field(8, ge=1, description="GroupNorm groups (taming: 32)")
        attention: Literal["auto", "sdpa", "math", "xformers"] = "auto"
        n_embed: int = Field(512, ge=2)
        embed_dim: int = Field(32, ge=1, description="latent channels (taming: = z_channels)")
        kl_weight: float = Field(1e-8, ge=0.0, description="weight of KL(q ‖ uniform)")
        temperature: float = Field(1.0, gt=0.0, description="Gumbel-softmax temperature")
        codebook_weight: float = Field(1.0, ge=0.0)
        in_channels: int = Field(3, ge=1)
        out_channels: int = Field(0, ge=0, description="0 = same as in_channels")
        rec_loss: Literal["l1", "l2"] = Field("l1", description="pixel loss: l1 or l2")
        perceptual_weight: float = Field(1.0, ge=0.0)
        pretrained_backbone: bool = True
        disc_start: int = Field(2000, ge=0)
        disc_weight: float = Field(0.8, ge=0.0)
        disc_loss: Literal["hinge", "vanilla"] = "hinge"
        disc_n_layers: int = Field(3, ge=1)
        disc_ch: int = Field(64, ge=1)

        @model_validator(mode="after")
        def _check_groups(self) -> VQGANGumbel.Params:
            widths = sorted({self.ch} | {self.ch * m for m in self.ch_mult})
            bad = [w for w in widths if w % self.norm_groups]
            if bad:
                raise ValueError(
                    f"norm_groups={self.norm_groups} must divide every channel width "
                    f"(ch × ch_mult = {widths}); {bad} are not divisible"
                )
            return self

    def __init__(
        self,
        ch: int = 32,
        ch_mult: tuple[int, ...] = (1, 2, 2),
        num_res_blocks: int = 1,
        attn_resolutions: tuple[int, ...] = (),
        resolution: int = 32,
        z_channels: int = 32,
        dropout: float = 0.0,
        norm_groups: int = 8,
        attention: Literal["auto", "sdpa", "math", "xformers"] = "auto",
        n_embed: int = 512,
        embed_dim: int = 32,
        kl_weight: float = 1e-8,
        temperature: float = 1.0,
        codebook_weight: float = 1.0,
        in_channels: int = 3,
        out_channels: int = 0,
        rec_loss: Literal["l1", "l2"] = "l1",
        perceptual_weight: float = 1.0,
        pretrained_backbone: bool = True,
        disc_start: int = 2000,
        disc_weight: float = 0.8,
        disc_loss: Literal["hinge", "vanilla"] = "hinge",
        disc_n_layers: int = 3,
        disc_ch: int = 64,
    ) -> None:
        super().__init__(
            ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
            attn_resolutions=attn_resolutions, resolution=resolution, z_channels=z_channels,
            dropout=dropout, norm_groups=norm_groups, attention=attention, n_embed=n_embed,
            embed_dim=embed_dim, kl_weight=kl_weight, temperature=temperature,
            codebook_weight=codebook_weight, in_channels=in_channels, out_channels=out_channels,
            rec_loss=rec_loss, perceptual_weight=perceptual_weight,
            pretrained_backbone=pretrained_backbone,
            disc_start=disc_start, disc_weight=disc_weight, disc_loss=disc_loss,
            disc_n_layers=disc_n_layers, disc_ch=disc_ch,
        )
        p = self.params
        arch = {
            "ch": p.ch, "ch_mult": tuple(p.ch_mult), "num_res_blocks": p.num_res_blocks,
            "attn_resolutions": tuple(p.attn_resolutions), "resolution": p.resolution,
            "z_channels": p.z_channels, "dropout": p.dropout, "groups": p.norm_groups,
            "attention": p.attention,
        }
        self.encoder = Encoder(in_channels=p.in_channels, **arch)
        self.quant_conv = nn.Conv2d(p.z_channels, p.embed_dim, 1)
        self.quantize = GumbelQuantizer(p.n_embed, p.embed_dim, p.kl_weight, p.temperature)  # type: ignore[assignment]
        self.post_quant_conv = nn.Conv2d(p.embed_dim, p.z_channels, 1)
        self.decoder = Decoder(out_channels=p.out_channels or p.in_channels, **arch)
        self.vocab_size = p.n_embed
        self.downsample = 2 ** (len(p.ch_mult) - 1)
        self.in_channels = p.in_channels

    build_loss = VQGAN.build_loss
    to_rgb = VQGAN.to_rgb


