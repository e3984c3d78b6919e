"""VQGAN with Lookup-Free Quantization (MAGVIT-v2: Yu et al. 2023, "Language Model
Beats Diffusion — Tokenizer is Key to Visual Generation"), registered as ``lfq``.

The encoder's latent is projected (``quant_conv``, 1×1) to ``codebook_bits``
channels and each channel is quantized to its sign, ±1: the code is the binary
number of the signs, ``vocab_size = 2^codebook_bits``, and no code vector is
looked up (the implied codebook is ``{-1, 1}^bits``). An entropy loss keeps each
position's assignment confident and the batch's codes diverse; a commitment loss
keeps the latents near ±1. Encoder, decoder, discriminator and losses are the
``vqgan`` ones.

``inv_temperature`` defaults to 10, not the 100 of vector-quantize-pytorch and
Open-MAGVIT2: a latent's share of the entropies' gradient is ``σ'(4 ·
inv_temperature · z)``, which vanishes once ``|z|`` exceeds a few ``1 / (4 ·
inv_temperature)``; at 100 a bit whose latents have all drifted to one side
(a bit every code shares) stops being pushed back ten times sooner. On a tiny CPU fit
(6 bits, 16×16 images, 200 Adam steps, 9 runs over seeds and learning rates) 10
ended at 100 % of the 64 codes in every run; 100 ended at 98–100 % in eight and
stalled at 47 % in one (the tokenizer defaults here are the settings that use
the codebook best on small data).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import Field
from torch import nn
from torch.utils.checkpoint import checkpoint

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

__all__ = ["LFQuantizer", "VQGANLFQ", "lfq_entropies"]

#: probabilities held at once by the batch-entropy term (N positions × a chunk of codes)
CHUNK_ELEMENTS = 1 << 22


def _bit_logits(z: torch.Tensor, inv_temperature: float) -> torch.Tensor:
    """``[N, bits]`` latents → ``[N, bits]`` per-bit logits ``a`` with
    ``log p(c | z) = a · c − Σ_i log(2 cosh a_i)`` for ``c`` in ``{-1, 1}^bits``."""
    # softmax_c(−inv_temperature · ‖z − c‖²) as MAGVIT-v2's implementations take it; with
    # ‖z − c‖² = ‖z‖² + ‖c‖² − 2 z · c and ‖c‖² = bits for every c, its logits are 2 τ z · c
    return 2 * inv_temperature * z


def _log_normalizer(a: torch.Tensor) -> torch.Tensor:
    """``[N, bits]`` → ``[N]``: ``Σ_i log(e^{a_i} + e^{-a_i})``, the softmax's log-partition."""
    return torch.logaddexp(a, -a).sum(1)


def _mean_prob_entropy(a: torch.Tensor, log_z: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``-Σ_c p̄_c log p̄_c`` over the codes ``codes`` ``[K, bits]`` (±1) of the batch-mean
    distribution ``p̄_c = mean_n p(c | z_n)``; ``a`` ``[N, bits]``, ``log_z`` ``[N]``."""
    log_p = a @ codes.t() - log_z[:, None]  # (N, K)
    mean_p = log_p.exp().mean(0)  # (K,)
    return -(mean_p * torch.log(mean_p.clamp_min(1e-30))).sum()


def lfq_entropies(z: torch.Tensor, inv_temperature: float,
                  chunk_elements: int = CHUNK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean per-sample entropy, entropy of the batch-mean distribution)`` (nats) of
    ``p(c | z_n) = softmax_c(2 · inv_temperature · z_n · c)`` over the ``2^bits`` codes
    ``c ∈ {-1, 1}^bits``, for latents ``z`` ``[N, bits]``.

    The softmax factorises over bits (``p(c | z) = Π_i σ(2 a_i c_i)``), so the
    per-sample entropy is a sum of per-bit binary entropies, O(N · bits). The
    batch-mean distribution does not factorise: it is summed over the codes in
    chunks of ``chunk_elements / N`` (each under activation checkpointing when there
    is more than one, so at most one ``[N, chunk]`` block is held, backward too).
    Compute is O(N · 2^bits · bits): cheap at 10 bits, slow beyond ~16.
    """
    with torch.autocast(z.device.type, enabled=False):  # float32 matmuls under AMP too
        return _entropies(z.float(), inv_temperature, chunk_elements)


def _entropies(z: torch.Tensor, inv_temperature: float,
               chunk_elements: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`lfq_entropies` for float32 ``z`` ``[N, bits]``, autocast off."""
    bits = z.shape[1]
    a = _bit_logits(z, inv_temperature)  # (N, bits)
    p_pos = torch.sigmoid(2 * a)  # (N, bits) p(c_i = +1 | z)
    # binary entropy −p log p − (1−p) log(1−p) in a stable form from the logit 2a
    binary = F.softplus(-2 * a) + 2 * a * (1 - p_pos)  # (N, bits) = H(σ(2a))
    per_sample = binary.sum(1).mean()
    log_z = _log_normalizer(a)  # (N,)
    weights = 2 ** torch.arange(bits, device=z.device)  # (bits,) bit i of code k is (k >> i) & 1
    n_codes = 1 << bits
    chunk = max(1, min(n_codes, chunk_elements // max(1, a.shape[0])))
    batch = a.new_zeros(())
    for start in range(0, n_codes, chunk):
        k = torch.arange(start, min(start + chunk, n_codes), device=z.device)  # (K,)
        codes = ((k[:, None] // weights) % 2).float() * 2 - 1  # (K, bits) ±1
        if chunk < n_codes and torch.is_grad_enabled():
            batch = batch + checkpoint(_mean_prob_entropy, a, log_z, codes, use_reentrant=False)
        else:
            batch = batch + _mean_prob_entropy(a, log_z, codes)
    return per_sample, batch


class LFQuantizer(nn.Module):
    """Lookup-free quantizer: ``z`` ``[B, bits, h, w]`` → signs ±1, codes ``[B, h, w]``.

    ``z_q = sign(z)`` (0 counts as −1) with a straight-through gradient; the code is
    ``Σ_i [z_i > 0] · 2^i`` (channel 0 the least significant bit). Loss (with
    gradients on; without, e.g. in ``encode``, the entropy term is skipped):
    ``entropy_weight × (mean_n H(p(·|z_n)) − diversity_gamma × H(mean_n p(·|z_n)))
    + commitment_weight × MSE(z, sg(z_q))``, where ``p(c | z) = softmax_c(2 ·
    inv_temperature · z · c)`` over the ``2^bits`` implied codes (see
    :func:`lfq_entropies` for its cost). No parameters.
    """

    def __init__(self, bits: int, *, entropy_weight: float = 0.1,
                 commitment_weight: float = 0.25, diversity_gamma: float = 1.0,
                 inv_temperature: float = 10.0) -> None:
        super().__init__()
        self.bits, self.n_embed = bits, 1 << bits
        self.entropy_weight, self.commitment_weight = entropy_weight, commitment_weight
        self.diversity_gamma, self.inv_temperature = diversity_gamma, inv_temperature
        # derived from the params, so not part of the weights
        self.register_buffer("weights", 2 ** torch.arange(bits), persistent=False)  # (bits,)

    def signs_to_codes(self, signs: torch.Tensor) -> torch.Tensor:
        """``[..., bits]`` (positive: bit set) → ``[...]`` int64 codes."""
        return ((signs > 0).long() * self.weights).sum(-1)

    def codes_to_signs(self, codes: torch.Tensor) -> torch.Tensor:
        """``[...]`` int64 codes → ``[..., bits]`` float ±1 (inverse of :meth:`signs_to_codes`)."""
        bit = torch.div(codes[..., None], self.weights, rounding_mode="floor") % 2
        return bit.float() * 2 - 1

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """``[B, h, w]`` int64 → ``[B, bits, h, w]``: the ±1 vector of each code."""
        return rearrange(self.codes_to_signs(codes), "b h w d -> b d h w")

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize ``z`` ``[B, bits, h, w]`` (see the class docstring); computed in float32."""
        dtype, z = z.dtype, z.float()
        q = torch.where(z > 0, 1.0, -1.0)  # (B, bits, h, w)
        z_q = (q + (z - z.detach())).to(dtype)  # (B, bits, h, w) value q, identity gradient
        codes = self.signs_to_codes(rearrange(q, "b d h w -> b h w d"))  # (B, h, w)
        loss = self.commitment_weight * F.mse_loss(z, q)
        if torch.is_grad_enabled() and self.entropy_weight > 0:
            flat = rearrange(z, "b d h w -> (b h w) d")  # (N, bits)
            per_sample, batch = lfq_entropies(flat, self.inv_temperature)
            loss = loss + self.entropy_weight * (per_sample - self.diversity_gamma * batch)
        usage, perplexity = codebook_stats(codes, self.n_embed)
        return QuantizerOutput(z_q, loss, codes, usage, perplexity, 0)


class VQGANLFQ(_VQModel):
    """VQGAN with Lookup-Free Quantization (LFQ, MAGVIT-v2): binary latents, no codebook.

    Same encoder, decoder and training objective (L1/L2 + LPIPS + PatchGAN) as
    ``vqgan``; the quantizer (:class:`LFQuantizer`) takes the sign of each of
    ``codebook_bits`` latent channels, so ``vocab_size = 2^codebook_bits`` (6, 9, 10
    bits: 64, 512, 1024 codes), with an entropy loss for confident, diverse codes
    and a commitment loss. ``code_vectors()`` are the ±1 vectors
    ``[vocab_size, codebook_bits]``.

    There is no ``embed_dim``: the latent around the quantizer has ``codebook_bits``
    channels; ``quant_conv`` (1×1, ``z_channels`` → ``codebook_bits``) projects into it and
    ``post_quant_conv`` back out (a further 1×1 projection in between would compose
    with them into the same linear map).
    """

    input_key = "image"

    class Params(_ImageParams, _ArchParams):
        """Encoder / decoder, the LFQ bits and losses, channels and training loss."""

        codebook_bits: int = Field(
            9, ge=1, le=20,
            description="latent channels quantized to ±1; vocab_size = 2^codebook_bits "
            "(6, 9, 10: 64, 512, 1024 codes; above ~16 the entropy loss gets slow)",
        )
        entropy_weight: float = Field(
            0.1, ge=0.0, description="weight of (per-sample entropy − γ × batch entropy)"
        )
        commitment_weight: float = Field(
            0.25, ge=0.0, description="weight of MSE(latent, its signs)"
        )
        diversity_gamma: float = Field(
            1.0, ge=0.0, description="γ: weight of the batch (codebook-use) entropy"
        )
        inv_temperature: float = Field(
            10.0, gt=0.0,
            description="sharpness of the code distribution the entropies are taken of "
            "(softmax of 2 · inv_temperature · z · c); vector-quantize-pytorch uses 100, "
            "10 fills small codebooks faster and more reliably (see the module docstring)",
        )

    def __init__(self, **fields: Any) -> None:
        super().__init__(**fields)
        p = self.params
        _build(self, p.in_channels, p.out_channels or p.in_channels,
               lambda: LFQuantizer(p.codebook_bits, entropy_weight=p.entropy_weight,
                                   commitment_weight=p.commitment_weight,
                                   diversity_gamma=p.diversity_gamma,
                                   inv_temperature=p.inv_temperature),
               embed_dim=p.codebook_bits)

    def build_loss(self) -> nn.Module:
        """The training objective (L1/L2 + LPIPS + PatchGAN) plus the quantizer's own
        (already weighted) loss."""
        return image_loss(self.params, 1.0)

    to_rgb = VQGAN.to_rgb
