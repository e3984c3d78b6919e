"""VQGAN encoder, decoder and vector quantizer (Esser et al. 2021, Tab. 7).

Encoder: conv in; for each of the m + 1 levels ``num_res_blocks`` residual blocks
(plus self-attention where the feature map's size is in ``attn_resolutions``)
and, except at the last level, a stride-2 downsample; then residual,
non-local and residual block at the lowest resolution; GroupNorm, swish, conv
out. The decoder mirrors it with ``num_res_blocks + 1`` residual blocks per level
and nearest-neighbour ×2 upsampling. No skip connections: f = 2^m.

Module and parameter names map 1:1 onto taming-transformers' state_dict
(``encoder.down.{i}.block.{j}.norm1``, ``encoder.mid.attn_1.q``,
``decoder.up.{i}.upsample.conv``, ``quantize.embedding.weight``…), and with the
plain quantizer (``codebook_dim = 0``, no l2 normalisation, no k-means init, no
restarts) the computation is the one of taming's ``Encoder``, ``Decoder`` and
``VectorQuantizer2`` (``legacy_beta`` selects its ``legacy`` β placement), so
taming checkpoints load and give the same outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vqgen.core.attention import attention
from vqgen.plugins.kmeans import codebook_stats, kmeans_plusplus, lloyd

__all__ = [
    "Arch",
    "AttnBlock",
    "Decoder",
    "Downsample",
    "Encoder",
    "QuantizerOutput",
    "ResnetBlock",
    "Upsample",
    "VectorQuantizer",
]


def swish(x: torch.Tensor) -> torch.Tensor:
    """``x · sigmoid(x)`` (taming's ``nonlinearity``), as one fused op: ~30 % faster
    training steps on the CPU than the two-op form."""
    return F.silu(x)


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """taming's ``Normalize``: GroupNorm with eps 1e-6 and affine parameters."""
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm → swish → conv → norm → swish → dropout → conv, plus a (1×1) shortcut."""

    def __init__(self, in_ch: int, out_ch: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.norm1 = group_norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = group_norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))  # (B, out, H, W)
        h = self.conv2(self.dropout(swish(self.norm2(h))))  # (B, out, H, W)
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions (the non-local block), residual."""

    def __init__(self, ch: int, groups: int, backend: str = "auto") -> None:
        super().__init__()
        self.backend = backend
        self.norm = group_norm(ch, groups)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        hn = self.norm(x)
        q, k, v = (
            rearrange(m(hn), "b c h w -> b 1 (h w) c") for m in (self.q, self.k, self.v)
        )  # (B, 1, HW, C) each
        out = attention(q, k, v, backend=self.backend)  # (B, 1, HW, C), scale C^-0.5
        out = rearrange(out, "b 1 (h w) c -> b c h w", h=h, w=w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3×3 conv after zero-padding one pixel at the right and bottom."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 conv."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class _Level(nn.Module):
    """One resolution level: ``block`` (residual blocks) and ``attn`` (may be empty)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class _Mid(nn.Module):
    """residual → attention → residual at the lowest resolution."""

    def __init__(self, ch: int, dropout: float, groups: int, backend: str) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch, dropout, groups)
        self.attn_1 = AttnBlock(ch, groups, backend)
        self.block_2 = ResnetBlock(ch, ch, dropout, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


@dataclass(frozen=True)
class Arch:
    """The shape :class:`Encoder` and :class:`Decoder` share (taming's ``ddconfig``)."""

    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    resolution: int  # the input size at which attn_resolutions are read
    z_channels: int
    dropout: float = 0.0
    groups: int = 32  # GroupNorm groups
    attention: str = "auto"


class Encoder(nn.Module):
    """``[B, in_channels, H, W] → [B, z_channels, H/f, W/f]`` with f = 2^(len(ch_mult) − 1).

    ``resolution`` is the input size at which ``attn_resolutions`` (feature-map
    sizes) are read; inputs of any size divisible by f work.
    """

    def __init__(self, *, in_channels: int, arch: Arch) -> None:
        ch, ch_mult, groups, dropout = arch.ch, arch.ch_mult, arch.groups, arch.dropout
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        in_mult = (1, *ch_mult)
        res = arch.resolution
        block_in = ch
        for i, mult in enumerate(ch_mult):
            level = _Level()
            block_in, block_out = ch * in_mult[i], ch * mult
            for _ in range(arch.num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, dropout, groups))
                block_in = block_out
                if res in arch.attn_resolutions:
                    level.attn.append(AttnBlock(block_in, groups, arch.attention))
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(block_in)
                res //= 2
            self.down.append(level)
        self.mid = _Mid(block_in, dropout, groups, arch.attention)
        self.norm_out = group_norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, arch.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)  # (B, C, H/2, W/2)
        h = self.mid(h)  # (B, C, h, w)
        return self.conv_out(swish(self.norm_out(h)))  # (B, z_channels, h, w)


class Decoder(nn.Module):
    """``[B, z_channels, h, w] → [B, out_channels, h·f, w·f]``, the encoder's mirror."""

    def __init__(self, *, out_channels: int, arch: Arch) -> None:
        ch, ch_mult, groups, dropout = arch.ch, arch.ch_mult, arch.groups, arch.dropout
        super().__init__()
        n = len(ch_mult)
        block_in = ch * ch_mult[-1]
        res = arch.resolution // 2 ** (n - 1)
        self.conv_in = nn.Conv2d(arch.z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in, dropout, groups, arch.attention)
        levels: list[_Level] = []
        for i in reversed(range(n)):
            level = _Level()
            block_out = ch * ch_mult[i]
            for _ in range(arch.num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, block_out, dropout, groups))
                block_in = block_out
                if res in arch.attn_resolutions:
                    level.attn.append(AttnBlock(block_in, groups, arch.attention))
            if i != 0:
                level.upsample = Upsample(block_in)
                res *= 2
            levels.insert(0, level)  # up[0] is the full-resolution level, as in taming
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # (B, C, h, w)
        for level in reversed(self.up):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)  # (B, C, 2h, 2w)
        return self.conv_out(swish(self.norm_out(h)))  # (B, out_channels, H, W)


# -----------------------------------------------------------------------------
# quantizer


class QuantizerOutput(NamedTuple):
    """What :meth:`VectorQuantizer.forward` returns."""

    z_q: torch.Tensor  # (B, embed_dim, h, w) quantized latents, straight-through gradient
    loss: torch.Tensor  # () codebook + commitment loss
    codes: torch.Tensor  # (B, h, w) int64
    usage: torch.Tensor  # () fraction of the codebook hit by this batch
    perplexity: torch.Tensor  # () exp(entropy) of the batch's code histogram
    restarted: int  # codes restarted (or initialised) by this call


class VectorQuantizer(nn.Module):
    """Nearest-code vector quantizer with a straight-through gradient.

    ``z`` ``[B, embed_dim, h, w]`` → codes ``[B, h, w]`` and their vectors. Loss:
    ``‖sg(z) − e‖² + β‖z − sg(e)‖²`` (codebook + commitment); ``legacy_beta``
    puts β on the codebook term instead, as taming's ``VectorQuantizer2`` with
    ``legacy=True`` does. Options against codebook collapse, all off in the
    plain (taming) configuration:

    * ``codebook_dim > 0``: codes live in a ``codebook_dim``-dimensional space,
      reached by ``proj_in`` (Linear) and left by ``proj_out`` (Linear).
    * ``l2_normalize``: inputs and codes are unit vectors (cosine similarity).
    * ``kmeans_init``: the codebook is set by k-means (k-means++ seeding and
      ``kmeans_iters`` Lloyd iterations) on the code-space vectors of the first
      training batches (at least ``4 × n_embed`` vectors).
    * ``restart_after > 0``: a code that none of the last ``restart_after`` training
      forward passes used is moved onto a random vector of the current batch.

    The statistics (``usage``, ``perplexity``) are computed on every call;
    initialisation and restarts happen only in training mode with gradients on.
    """

    def __init__(
        self,
        n_embed: int,
        embed_dim: int,
        *,
        codebook_dim: int = 0,
        beta: float = 1.0,
        legacy_beta: bool = False,
        l2_normalize: bool = False,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        restart_after: int = 0,
    ) -> None:
        super().__init__()
        self.n_embed, self.embed_dim = n_embed, embed_dim
        self.beta, self.legacy_beta = beta, legacy_beta
        self.l2_normalize, self.kmeans_init = l2_normalize, kmeans_init
        self.kmeans_iters, self.restart_after = kmeans_iters, restart_after
        self.code_dim = codebook_dim if codebook_dim > 0 else embed_dim
        self.embedding = nn.Embedding(n_embed, self.code_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)  # as taming
        if codebook_dim > 0:
            self.proj_in = nn.Linear(embed_dim, self.code_dim)
            self.proj_out = nn.Linear(self.code_dim, embed_dim)
        else:
            self.proj_in = self.proj_out = None
        # training-time bookkeeping: not part of the weights (a loaded codebook counts as
        # initialised, see _load_from_state_dict); the trainer checkpoints it separately
        self.register_buffer("initialized", torch.tensor(not kmeans_init), persistent=False)
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64), persistent=False)
        self.register_buffer(
            "last_used", torch.zeros(n_embed, dtype=torch.int64), persistent=False
        )  # (n_embed,) training step at which each code was last chosen
        self._init_pool: list[torch.Tensor] = []

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "embedding.weight" in state_dict:
            self.initialized.fill_(True)  # a trained codebook must not be k-means re-initialised

    # -- code space -------------------------------------------------------------
    def codebook(self) -> torch.Tensor:
        """``[n_embed, code_dim]``: the code vectors (unit length with ``l2_normalize``)."""
        w = self.embedding.weight
        return F.normalize(w, dim=1) if self.l2_normalize else w

    def to_code_space(self, z: torch.Tensor) -> torch.Tensor:
        """``[N, embed_dim] → [N, code_dim]``: project (and l2-normalise) latents."""
        if self.proj_in is not None:
            z = self.proj_in(z)
        return F.normalize(z, dim=1) if self.l2_normalize else z

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """``[B, h, w]`` int64 → ``[B, embed_dim, h, w]``: the quantized latents of codes."""
        e = self.codebook()[codes]  # (B, h, w, code_dim)
        if self.proj_out is not None:
            e = self.proj_out(e)  # (B, h, w, embed_dim)
        return rearrange(e, "b h w c -> b c h w")

    @staticmethod
    def _nearest(z: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        # ‖z − e‖² = ‖z‖² + ‖e‖² − 2 z·e, evaluated as taming does (same ties)
        d = z.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * (z @ e.t())  # (N, n_embed)
        return d.argmin(1)

    # -- codebook maintenance -----------------------------------------------------
    @torch.no_grad()
    def _maintain(self, zc: torch.Tensor) -> int:
        """k-means initialisation and dead-code restarts from code-space vectors ``zc``."""
        step = int(self.steps)
        if not bool(self.initialized):
            self._init_pool.append(zc.detach().float())
            pool = torch.cat(self._init_pool)
            if pool.shape[0] < 4 * self.n_embed:
                return 0
            self._init_pool = []
            g = torch.Generator().manual_seed(int(torch.randint(2**31 - 1, (1,))))
            centers = kmeans_plusplus(pool, self.n_embed, g)  # (n_embed, code_dim)
            centers = lloyd(pool, centers, self.kmeans_iters, spherical=self.l2_normalize)
            self.embedding.weight.copy_(centers)
            self.initialized.fill_(True)
            self.last_used.fill_(step)
            return self.n_embed
        if self.restart_after <= 0:
            return 0
        dead = (step - self.last_used) > self.restart_after  # (n_embed,) none of the last N
        n_dead = int(dead.sum())
        if n_dead:
            pick = torch.randint(zc.shape[0], (n_dead,), device=zc.device)
            self.embedding.weight[dead] = zc[pick].to(self.embedding.weight.dtype)
            self.last_used[dead] = step
        return n_dead

    # -- forward ----------------------------------------------------------------
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize ``z`` ``[B, embed_dim, h, w]`` (see the class docstring)."""
        b, _, h, w = z.shape
        z_flat = rearrange(z, "b c h w -> (b h w) c")
        zc = self.to_code_space(z_flat)  # (N, code_dim)
        updating = self.training and torch.is_grad_enabled()
        restarted = self._maintain(zc) if updating else 0
        e = self.codebook()  # (n_embed, code_dim)
        idx = self._nearest(zc, e)  # (N,)
        e_q = e[idx]  # (N, code_dim)
        codebook_term = F.mse_loss(e_q, zc.detach())
        commit_term = F.mse_loss(zc, e_q.detach())
        if self.legacy_beta:
            loss = commit_term + self.beta * codebook_term
        else:
            loss = codebook_term + self.beta * commit_term
        # straight-through: the value is exactly e_q, the gradient w.r.t. zc is the identity
        # (and none reaches the codebook, which learns from the codebook term only)
        zq = e_q.detach() + (zc - zc.detach())  # (N, code_dim)
        if self.proj_out is not None:
            zq = self.proj_out(zq)  # (N, embed_dim)
        z_q = rearrange(zq, "(b h w) c -> b c h w", b=b, h=h, w=w)
        usage, perplexity = codebook_stats(idx.detach(), self.n_embed)
        if updating:
            self.last_used[idx] = self.steps
            self.steps += 1
        codes = rearrange(idx, "(b h w) -> b h w", b=b, h=h, w=w)
        return QuantizerOutput(z_q, loss, codes, usage, perplexity, restarted)
