"""The VQGAN tokenizers: ``vqgan`` (images) and ``vqgan_segmentation`` (label maps).

Params are the single source of configuration, including the training loss's
hyper-parameters (``perceptual_weight``, ``disc_start``, …): the stage-1 trainer
builds the loss module with :meth:`VQGAN.build_loss`, so one tokenizer config
says how the tokenizer is built *and* trained. The loss module (LPIPS,
discriminator) is never part of the tokenizer's weights.

Quantizer defaults are the settings that use the codebook best on small data
(see ``benchmarks/tokenizer_quality.py``): 8-dimensional l2-normalised codes,
k-means initialisation and dead-code restarts. The plain taming-style quantizer
(and the configuration taming checkpoints import into) is ``codebook_dim: 0,
l2_normalize: false, kmeans_init: false, restart_after: 0`` (plus
``legacy_beta: true`` for taming's β placement).

Architecture defaults are a small f = 4 model for 32×32 images that trains on
CPU in minutes; the paper's f = 16 ImageNet model is ``ch: 128, ch_mult: [1, 1,
2, 2, 4], num_res_blocks: 2, attn_resolutions: [16], resolution: 256,
z_channels: 256, embed_dim: 256, n_embed: 1024``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from vqgen.core.interfaces import ParamsModel, Tokenizer
from vqgen.plugins.vqgan.model import Arch, Decoder, Encoder, QuantizerOutput, VectorQuantizer

__all__ = ["VQGAN", "VQGANOutput", "VQGANSegmentation"]


class VQGANOutput(NamedTuple):
    """What ``VQGAN.forward`` returns."""

    recon: torch.Tensor  # (B, out_channels, H, W) reconstruction (logits for segmentation)
    qloss: torch.Tensor  # () quantizer loss (codebook + β · commitment)
    codes: torch.Tensor  # (B, h, w) int64
    usage: torch.Tensor  # () fraction of codes hit by the batch
    perplexity: torch.Tensor  # () of the batch's code histogram
    restarted: int  # codes initialised or restarted by this forward pass


class _ArchParams(ParamsModel):
    """Encoder / decoder fields shared by every VQGAN variant (Gumbel, FSQ and LFQ too)."""

    ch: int = Field(32, ge=1, le=4096, description="base channel count")
    ch_mult: tuple[int, ...] = Field(
        (1, 2, 2),
        min_length=1,
        description="channel multiplier per level; f = 2^(len - 1)",
    )
    num_res_blocks: int = Field(1, ge=1, le=64)
    attn_resolutions: tuple[int, ...] = Field(
        (),
        description="feature-map sizes (at input size `resolution`) with self-attention, "
        "besides the middle block's",
    )
    resolution: int = Field(32, ge=1, description="input size that attn_resolutions refer to")
    z_channels: int = Field(32, ge=1, le=4096)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    norm_groups: int = Field(
        8, ge=1, description="GroupNorm groups (taming: 32; small models want few)"
    )
    attention: Literal["auto", "sdpa", "math", "xformers"] = "auto"

    @model_validator(mode="after")
    def _check_groups(self) -> _ArchParams:
        widths = sorted({self.ch} | {self.ch * m for m in self.ch_mult})
        bad = [w for w in widths if w % self.norm_groups]
        if bad:
            raise ValueError(
                f"norm_groups={self.norm_groups} must divide every channel width "
                f"(ch × ch_mult = {widths}); {bad} are not divisible"
            )
        if any(m < 1 for m in self.ch_mult):
            raise ValueError(f"ch_mult entries must be >= 1, got {self.ch_mult}")
        return self

    def arch(self) -> Arch:
        """The shape :class:`Encoder` and :class:`Decoder` share."""
        return Arch(ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
                    attn_resolutions=tuple(self.attn_resolutions), resolution=self.resolution,
                    z_channels=self.z_channels, dropout=self.dropout, groups=self.norm_groups,
                    attention=self.attention)


class _NetParams(_ArchParams):
    """The architecture plus a codebook (``n_embed`` codes of ``embed_dim``): the vector
    and Gumbel quantizers' variants."""

    n_embed: int = Field(512, ge=2, le=1 << 20, description="codebook size (the vocabulary)")
    embed_dim: int = Field(32, ge=1, le=4096, description="latent channels around the quantizer")
    codebook_weight: float = Field(1.0, ge=0.0, description="weight of the quantizer loss")


class _ModelParams(_NetParams):
    """The vector quantizer's fields, shared by ``vqgan`` and ``vqgan_segmentation``."""

    codebook_dim: int = Field(
        8, ge=0, description="code-space dimension (projected in/out); 0 = embed_dim, no projection"
    )
    l2_normalize: bool = Field(True, description="cosine-similarity codes")
    kmeans_init: bool = Field(True, description="k-means codebook from the first batches")
    kmeans_iters: int = Field(10, ge=0)
    restart_after: int = Field(
        50, ge=0, description="restart codes unused for this many training steps; 0 = never"
    )
    beta: float = Field(1.0, ge=0.0, description="commitment weight")
    legacy_beta: bool = Field(
        False, description="β on the codebook term instead (taming's legacy=True)"
    )


class _ImageParams(ParamsModel):
    """The channels and training loss of an image VQGAN (``vqgan``, ``vqgan_gumbel``)."""

    in_channels: int = Field(3, ge=1, le=1024)
    out_channels: int = Field(0, ge=0, le=1024, description="0 = same as in_channels")
    rec_loss: Literal["l1", "l2"] = Field(
        "l1", description="pixel reconstruction loss: l1 (taming) or l2 (mean squared "
        "error, which optimises PSNR directly and learns faster on small CPU budgets)"
    )
    perceptual_weight: float = Field(1.0, ge=0.0, description="LPIPS weight; 0 = off")
    pretrained_backbone: bool = Field(
        True, description="ImageNet VGG16 for LPIPS (downloaded by torchvision); "
        "false: random backbone, offline"
    )
    disc_start: int = Field(2000, ge=0, description="optimizer step the GAN loss starts at")
    disc_weight: float = Field(0.8, ge=0.0, description="scale of λ; 0 = no discriminator")
    disc_loss: Literal["hinge", "vanilla"] = "hinge"
    disc_n_layers: int = Field(3, ge=1, le=16)
    disc_ch: int = Field(64, ge=1, le=4096, description="discriminator base channels (ndf)")


def _build(module: _VQModel, in_ch: int, out_ch: int,
           quantizer: Callable[[], nn.Module] | None = None,
           embed_dim: int | None = None) -> None:
    """Create the encoder, quantizer and decoder of a variant from its params; the
    quantizer is ``quantizer()`` (default: the vector quantizer of ``_ModelParams``),
    built between the convolutions, so the random initialisation keeps its order.
    ``embed_dim``: the latent channels around the quantizer (default: the params');
    the vocabulary is the quantizer's ``n_embed``."""
    p = module.params
    arch = p.arch()
    embed_dim = p.embed_dim if embed_dim is None else embed_dim
    module.encoder = Encoder(in_channels=in_ch, arch=arch)
    module.quant_conv = nn.Conv2d(p.z_channels, embed_dim, 1)
    module.quantize = quantizer() if quantizer is not None else VectorQuantizer(
        p.n_embed,
        p.embed_dim,
        codebook_dim=p.codebook_dim,
        beta=p.beta,
        legacy_beta=p.legacy_beta,
        l2_normalize=p.l2_normalize,
        kmeans_init=p.kmeans_init,
        kmeans_iters=p.kmeans_iters,
        restart_after=p.restart_after,
    )
    module.post_quant_conv = nn.Conv2d(embed_dim, p.z_channels, 1)
    module.decoder = Decoder(out_channels=out_ch, arch=arch)
    module.vocab_size = int(module.quantize.n_embed)
    module.downsample = 2 ** (len(p.ch_mult) - 1)
    module.in_channels = in_ch


def image_loss(p: _ImageParams, codebook_weight: float) -> nn.Module:
    """The image VQGANs' training objective (L1/L2 + LPIPS + PatchGAN) from their params,
    with ``codebook_weight`` on the quantizer's loss."""
    from vqgen.plugins.vqgan.losses import VQGANLoss

    return VQGANLoss(
        in_channels=p.out_channels or p.in_channels,
        codebook_weight=codebook_weight,
        rec_loss=p.rec_loss,
        perceptual_weight=p.perceptual_weight,
        pretrained_backbone=p.pretrained_backbone,
        disc_start=p.disc_start,
        disc_weight=p.disc_weight,
        disc_loss=p.disc_loss,
        disc_n_layers=p.disc_n_layers,
        disc_ch=p.disc_ch,
    )


class _VQModel(Tokenizer):
    """Shared forward / encode / decode of both variants."""

    encoder: Encoder
    quant_conv: nn.Conv2d
    quantize: VectorQuantizer
    post_quant_conv: nn.Conv2d
    decoder: Decoder

    @classmethod
    def with_downsample(cls, params: dict[str, Any], f: int) -> dict[str, Any]:
        """``ch_mult`` left out → one level per halving, ``(1, 2, 2, ...)``, for factor ``f``
        (the default ``(1, 2, 2)`` at f = 4); ``f`` must then be a power of two."""
        if "ch_mult" in params or f < 1 or f & (f - 1):
            return params
        return {**params, "ch_mult": [1] + [2] * (f.bit_length() - 1)}

    def quantize_latents(self, x: torch.Tensor) -> QuantizerOutput:
        """``[B, C, H, W]`` → the quantizer's output for the encoder's latents."""
        self.latent_shape(x.shape[-2], x.shape[-1])  # raises for sizes not divisible by f
        h = self.quant_conv(self.encoder(x))  # (B, embed_dim, h, w)
        return self.quantize(h)

    def decode_latents(self, z_q: torch.Tensor) -> torch.Tensor:
        """``[B, embed_dim, h, w]`` quantized latents → ``[B, out_channels, H, W]``."""
        return self.decoder(self.post_quant_conv(z_q))

    def forward(self, x: torch.Tensor) -> VQGANOutput:
        """Reconstruct ``x``; also returns the quantizer's loss, codes and statistics."""
        x = self.prepare_input(x)
        q = self.quantize_latents(x)
        recon = self.decode_latents(q.z_q)  # (B, out_channels, H, W)
        return VQGANOutput(recon, q.loss, q.codes, q.usage, q.perplexity, q.restarted)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` → ``[B, H/f, W/f]`` int64 codes."""
        with torch.no_grad():
            return self.quantize_latents(self.prepare_input(x)).codes

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``[B, h, w]`` int64 codes → ``[B, out_channels, h·f, w·f]``."""
        z_q = self.quantize.embed_codes(codes)  # (B, embed_dim, h, w)
        return self.decode_latents(z_q.to(self.post_quant_conv.weight.dtype))

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """The tensor the encoder takes, from what the data provides."""
        return x

    @torch.no_grad()
    def code_vectors(self) -> torch.Tensor:
        """``[n_embed, embed_dim]``: the quantized latent each code decodes from."""
        codes = torch.arange(self.vocab_size, device=self.post_quant_conv.weight.device)
        z = self.quantize.embed_codes(codes.reshape(1, -1, 1))  # (1, embed_dim, V, 1)
        return z[0, :, :, 0].t().float()  # (V, embed_dim)

    def activation_bytes(self, batch_size: int,
                         image_size: tuple[int, int] | None = None) -> int:
        """Activations one training micro-batch of ``image_size`` images (default: the
        ``resolution`` param) keeps in the encoder and decoder (fp32, a lower bound: per
        pixel of each level about six maps per residual block and direction, and the
        resampling; the discriminator and perceptual network come on top)."""
        p = self.params
        h, w = image_size or (p.resolution, p.resolution)
        maps = sum((h >> i) * (w >> i) * p.ch * m * (12 * p.num_res_blocks + 10)
                   for i, m in enumerate(p.ch_mult))
        return 4 * batch_size * maps

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's last weight (where the adaptive GAN weight is measured)."""
        return self.decoder.conv_out.weight


class VQGAN(_VQModel):
    """VQGAN (Esser et al. 2021): conv encoder → vector quantizer → conv decoder.

    ``encode``: ``[B, in_channels, H, W]`` in ``[-1, 1]`` → ``[B, H/f, W/f]`` int64,
    ``decode``: codes → ``[B, out_channels, H, W]`` (not clamped). Trained (stage 1)
    with L1 + LPIPS + PatchGAN losses whose hyper-parameters are params here too.
    ``in_channels: 1`` makes a tokenizer for depth or edge maps.
    """

    input_key = "image"

    class Params(_ImageParams, _ModelParams):
        """Encoder / decoder, vector quantizer, channels and training loss."""

    def __init__(self, **fields: Any) -> None:
        super().__init__(**fields)
        p = self.params
        _build(self, p.in_channels, p.out_channels or p.in_channels)

    def build_loss(self) -> nn.Module:
        """The training objective (LPIPS + PatchGAN), from this tokenizer's params."""
        return image_loss(self.params, self.params.codebook_weight)

    def to_rgb(self, x: torch.Tensor) -> torch.Tensor:
        """Images for preview grids: 1 or 3 channels kept, others reduced to 3 / 1."""
        c = x.shape[1]
        if c in (1, 3):
            return x
        return x[:, :3] if c > 3 else x.mean(1, keepdim=True)


class VQGANSegmentation(_VQModel):
    """VQGAN for semantic label maps: one-hot in, per-pixel label logits out.

    ``encode`` takes int64 label maps ``[B, H, W]`` (values in ``[0, n_labels)``) or
    one-hot float maps ``[B, n_labels, H, W]``; ``decode`` returns logits
    ``[B, n_labels, H, W]`` (``labels(codes)`` gives the argmax map). Trained with
    cross-entropy reconstruction and no discriminator, as the paper's first stage
    for semantic layouts. The default ``n_labels`` fits the built-in ``shapes``
    data (background + 4 classes).
    """

    input_key = "segmentation"

    class Params(_ModelParams):
        n_labels: int = Field(5, ge=2, description="label values, background included")

    def __init__(self, **fields: Any) -> None:
        super().__init__(**fields)
        n_labels = self.params.n_labels
        _build(self, n_labels, n_labels)
        g = torch.Generator().manual_seed(0)
        palette = torch.rand(n_labels, 3, generator=g) * 2 - 1  # (n_labels, 3)
        palette[0] = -1.0  # background black
        self.register_buffer("palette", palette, persistent=False)

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """int64 ``[B, H, W]`` label maps → one-hot float ``[B, n_labels, H, W]``."""
        if x.is_floating_point():
            return x
        n = self.params.n_labels
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= n):
            raise ValueError(
                f"label values must lie in [0, {n}), got [{int(x.min())}, {int(x.max())}]; "
                "raise n_labels"
            )
        return F.one_hot(x.long(), n).permute(0, 3, 1, 2).float()

    def labels(self, codes: torch.Tensor) -> torch.Tensor:
        """``[B, h, w]`` codes → ``[B, H, W]`` int64 label map (argmax of the logits)."""
        return self.decode(codes).argmax(1)

    def build_loss(self) -> nn.Module:
        """Cross-entropy + codebook loss (no discriminator)."""
        from vqgen.plugins.vqgan.losses import SegmentationLoss

        return SegmentationLoss(codebook_weight=self.params.codebook_weight)

    def to_rgb(self, x: torch.Tensor) -> torch.Tensor:
        """One-hot maps or logits ``[B, n_labels, H, W]`` → palette colours ``[B, 3, H, W]``."""
        return self.palette[x.argmax(1)].permute(0, 3, 1, 2)
