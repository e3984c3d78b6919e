"""PixelSNAIL prior over a grid of image codes (registered as ``pixelsnail``).

After Chen et al., "PixelSNAIL: An Improved Autoregressive Generative Model" (2018), the
convolutional baseline of Tab. 1 in Taming Transformers: causal convolutions, gated
residual blocks and causal self-attention blocks. Plain convolutions stand in for the
weight-normalised ones of the original.

The ordered sequence ``seq [B, L]``, ``L = height * width``, is laid row-major on the
``height × width`` grid: sequence position ``i`` sits at cell ``(i // width, i % width)``.
Causal means: the logits at position ``i`` depend on ``seq[:, :i]`` (and the condition)
only. Three pieces keep it so:

* ``CausalConv2d``, the sum of a *down-shifted* convolution over the ``k // 2`` rows above
  (``k`` columns wide) and a *right-shifted* one over the current row up to the current
  column (``strict``: up to the column before, for the input layer, which sees raw tokens);
* 1×1 convolutions and elementwise gates, which mix nothing across cells;
* attention in which position ``i`` attends to positions ``< i``: keys and values are
  shifted one position later behind an empty (zero) slot, then attended causally.

Conditioning (``cond_vocab_size > 0``; ids arrive offset by the pipeline into
``[vocab_size, vocab_size + cond_vocab_size)``):

* ``cond_spatial=False``: one token (a class), ``Lc = 1``, embedded and added as a learned
  bias to the gates of every residual block;
* ``cond_spatial=True``: a token map, ``Lc = height * width``, laid on the grid like the
  image tokens (token ``j`` at cell ``(j // width, j % width)``), embedded and run through
  a small non-causal conditioning network whose features enter the gates of every block.

Incremental decoding recomputes the forward pass over the rows up to the current one
(rows below never influence it) with the condition features cached, so ``step`` gives the
full forward's logits at that position.

Why one file of this size: one readable file per architecture, as :mod:`vqgen.plugins.gpt`
(params, causal convolutions, gated blocks, attention, decoding state).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import Field, model_validator
from torch import nn

from vqgen.core.attention import attention
from vqgen.core.interfaces import (
    AUTO,
    Auto,
    AutoregressivePrior,
    ParamsModel,
    Sizes,
    check_grid,
    require_wired,
)

__all__ = ["PixelSNAIL", "PixelSNAILState"]

class PixelSNAILParams(ParamsModel):
    """Config of :class:`PixelSNAIL`."""

    height: Annotated[int, Field(ge=1, le=1024)] | Auto = Field(
        AUTO, description="rows of the latent grid (auto: the data's)")
    width: Annotated[int, Field(ge=1, le=1024)] | Auto = Field(
        AUTO, description="columns of the latent grid (auto: the data's)")
    vocab_size: Annotated[int, Field(ge=1, le=1 << 20)] | Auto = Field(
        AUTO, description="image codes: ids [0, vocab_size) (auto: the tokenizer's)")
    cond_vocab_size: Annotated[int, Field(ge=0, le=1 << 20)] | Auto = Field(
        AUTO, description="condition ids [vocab_size, vocab_size + cond_vocab_size) "
        "(auto: the conditioner's; 0 without one)")
    cond_spatial: bool | Auto = Field(
        AUTO, description="condition is a token map (else one token); auto: the conditioner's")
    channels: int = Field(128, ge=1, le=4096)
    n_blocks: int = Field(2, ge=1, le=64, description="blocks of residual layers (+ attention)")
    n_res_blocks: int = Field(2, ge=1, le=64, description="gated residual blocks per block")
    n_cond_res_blocks: int = Field(
        2, ge=0, le=64, description="residual blocks of the cond network"
    )
    kernel_size: int = Field(3, ge=3, description="odd; causal window is k//2 rows up")
    use_attention: bool = True
    n_head: int = Field(4, ge=1, le=256)
    attention: Literal["auto", "xformers", "sdpa", "math"] = "auto"
    dropout: float = Field(0.1, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _check(self) -> PixelSNAILParams:
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {self.kernel_size}")
        if self.use_attention and self.channels % self.n_head:
            raise ValueError(f"channels={self.channels} is not divisible by n_head={self.n_head}")
        if self.cond_spatial is True and self.cond_vocab_size == 0:
            raise ValueError("cond_spatial=True needs cond_vocab_size > 0")
        return self


@dataclass
class PixelSNAILState:
    """Decoding state: tokens so far (zeros beyond), their count, the condition features."""

    tokens: torch.Tensor  # (B, L)
    n: int  # tokens fed so far; the next position to predict
    cond: torch.Tensor | None  # (B, C, 1, 1) or (B, C, h, w)
    started: bool = False


class CausalConv2d(nn.Module):
    """``k × k`` raster-causal convolution from a down-shifted and a right-shifted part.

    The output at ``(r, c)`` sees rows ``r - k//2 .. r - 1`` at columns ``c - k//2 .. c + k//2``
    and row ``r`` at columns ``c - k//2 .. c`` (``c - 1`` when ``strict``).
    """

    def __init__(self, c_in: int, c_out: int, kernel_size: int, *, strict: bool) -> None:
        super().__init__()
        n = kernel_size // 2
        self.n, self.strict = n, strict
        self.down = nn.Conv2d(c_in, c_out, (n, kernel_size))  # the n rows above
        self.right = nn.Conv2d(c_in, c_out, (1, n if strict else n + 1), bias=False)  # this row

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.n
        up = F.pad(x, (n, n, n, 0))[:, :, :-1]  # (B, Cin, H + n - 1, W + 2n): rows shift down
        left = F.pad(x, (n, 0, 0, 0))  # (B, Cin, H, W + n)
        if self.strict:
            left = left[..., :-1]  # (B, Cin, H, W + n - 1): columns shift right
        return self.down(up) + self.right(left)  # (B, Cout, H, W)


class GatedResBlock(nn.Module):
    """``x + a * sigmoid(g)``, with ``[a, g]`` from a conv stack plus aux and condition inputs."""

    def __init__(
        self,
        channels: int,
        kernel_size: int,
        dropout: float,
        *,
        causal: bool = True,
        aux_channels: int = 0,
        cond_channels: int = 0,
    ) -> None:
        super().__init__()
        if kernel_size == 1:
            self.conv1: nn.Module = nn.Conv2d(channels, channels, 1)
        elif causal:
            self.conv1 = CausalConv2d(channels, channels, kernel_size, strict=False)
        else:
            self.conv1 = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 1)
        self.aux = nn.Conv2d(aux_channels, 2 * channels, 1) if aux_channels else None
        self.cond = nn.Conv2d(cond_channels, 2 * channels, 1) if cond_channels else None

    def forward(
        self,
        x: torch.Tensor,
        aux: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = self.conv1(F.elu(x))  # (B, C, H, W)
        h = self.conv2(self.drop(F.elu(h)))  # (B, 2C, H, W)
        if self.aux is not None and aux is not None:
            h = h + self.aux(F.elu(aux))  # (B, 2C, H, W)
        if self.cond is not None and cond is not None:
            h = h + self.cond(cond)  # (B, 2C, H | 1, W | 1), broadcast
        a, g = h.chunk(2, dim=1)  # (B, C, H, W) each
        return x + a * torch.sigmoid(g)


class CausalAttention(nn.Module):
    """Multi-head attention over the raster sequence in which position ``i`` sees ``< i``."""

    def __init__(
        self,
        q_channels: int,
        kv_channels: int,
        channels: int,
        n_head: int,
        backend: str,
        dropout: float,
    ) -> None:
        super().__init__()
        self.query = nn.Linear(q_channels, channels)
        self.key = nn.Linear(kv_channels, channels)
        self.value = nn.Linear(kv_channels, channels)
        self.n_head, self.backend, self.dropout = n_head, backend, dropout

    def forward(self, q_in: torch.Tensor, kv_in: torch.Tensor) -> torch.Tensor:
        height = q_in.shape[2]
        q_seq = rearrange(q_in, "b c h w -> b (h w) c")  # (B, T, Cq)
        kv_seq = rearrange(kv_in, "b c h w -> b (h w) c")  # (B, T, Ckv)
        heads = "b t (nh hs) -> b nh t hs"
        q = rearrange(self.query(q_seq), heads, nh=self.n_head)  # (B, nh, T, hs)
        k = rearrange(self.key(kv_seq), heads, nh=self.n_head)  # (B, nh, T, hs)
        v = rearrange(self.value(kv_seq), heads, nh=self.n_head)  # (B, nh, T, hs)
        # keys/values move one position later behind an empty slot: causal over the shifted
        # sequence is strictly-before over the original one; position 0 sees the empty slot.
        k = F.pad(k, (0, 0, 1, 0))[:, :, :-1]  # (B, nh, T, hs)
        v = F.pad(v, (0, 0, 1, 0))[:, :, :-1]  # (B, nh, T, hs)
        p = self.dropout if self.training else 0.0
        y = attention(q, k, v, causal=True, backend=self.backend, dropout_p=p)  # (B, nh, T, hs)
        return rearrange(y, "b nh (h w) hs -> b (nh hs) h w", h=height)  # (B, C, H, W)


class PixelBlock(nn.Module):
    """Gated residual blocks, then (optionally) causal attention fed back through a gate."""

    def __init__(
        self,
        channels: int,
        kernel_size: int,
        n_res_blocks: int,
        use_attention: bool,
        n_head: int,
        backend: str,
        dropout: float,
        cond_channels: int,
    ) -> None:
        super().__init__()
        c = channels
        self.res = nn.ModuleList(
            GatedResBlock(c, kernel_size, dropout, cond_channels=cond_channels)
            for _ in range(n_res_blocks)
        )
        self.use_attention = use_attention
        if use_attention:
            self.key_res = GatedResBlock(2 * c + 2, 1, dropout)  # on [tokens, h, coords]
            self.query_res = GatedResBlock(c + 2, 1, dropout)  # on [h, coords]
            self.attn = CausalAttention(c + 2, 2 * c + 2, c, n_head, backend, dropout)
            self.out_res = GatedResBlock(c, 1, dropout, aux_channels=c, cond_channels=cond_channels)

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor, coords: torch.Tensor, cond: torch.Tensor | None
    ) -> torch.Tensor:
        h = x
        for res in self.res:
            h = res(h, cond=cond)  # (B, C, H, W)
        if self.use_attention:
            kv = self.key_res(torch.cat([emb, h, coords], dim=1))  # (B, 2C + 2, H, W)
            q = self.query_res(torch.cat([h, coords], dim=1))  # (B, C + 2, H, W)
            h = self.out_res(h, aux=self.attn(q, kv), cond=cond)  # (B, C, H, W)
        return h


class PixelSNAIL(AutoregressivePrior):
    """PixelSNAIL prior: causal convolutions, gated residual blocks and causal attention.

    See the module docstring for the grid layout, causality and conditioning.
    ``forward(seq, cond)`` returns the training loss; ``start``/``step`` decode (by
    recomputation, with the condition features cached); ``generate`` samples sequences.
    Call ``.eval()`` before decoding.
    """

    Params = PixelSNAILParams

    def activation_bytes(self, batch_size: int,
                         image_size: tuple[int, int] | None = None) -> int:
        """Activations one training micro-batch keeps (fp32, a lower bound): per cell and
        block about six ``channels``-sized maps per gated residual block (two causal
        convolutions, the gate's halves, the sum) and eight for the attention, plus the
        logits and their softmax."""
        p = self.params
        maps = p.n_blocks * (6 * p.n_res_blocks + 8) * p.channels
        return 4 * batch_size * p.height * p.width * (maps + 2 * p.vocab_size)

    @classmethod
    def wire(cls, params: dict[str, Any], sizes: Sizes) -> dict[str, Any]:
        """Grid, vocabularies and condition kind from the other stages; an explicit grid
        must be the data's."""
        out = super().wire(params, sizes)
        check_grid(out, sizes)
        if out["cond_spatial"] and sizes.height is not None and (
                sizes.cond_length != sizes.height * sizes.width):
            raise ValueError(
                f"cond_spatial: the condition has {sizes.cond_length} tokens, not one per "
                f"cell of the {sizes.height}x{sizes.width} grid: give the conditioner's "
                "tokenizer the image tokenizer's f (leave its ch_mult out)")
        return out

    def __init__(self, **fields: Any) -> None:
        super().__init__(**fields)
        require_wired(self, ("height", "width", "vocab_size"),
                      alone={"cond_vocab_size": 0, "cond_spatial": False})
        p = self.params
        assert isinstance(p, PixelSNAILParams)
        self.height, self.width = p.height, p.width
        self.vocab_size, self.cond_vocab_size = p.vocab_size, p.cond_vocab_size
        self.cond_spatial = p.cond_spatial
        c, k = p.channels, p.kernel_size
        self.tok_emb = nn.Embedding(p.vocab_size, c)
        self.input_conv = CausalConv2d(c, c, k, strict=True)
        cond_channels = c if p.cond_vocab_size else 0
        self.blocks = nn.ModuleList(
            PixelBlock(
                c,
                k,
                p.n_res_blocks,
                p.use_attention,
                p.n_head,
                p.attention,
                p.dropout,
                cond_channels,
            )
            for _ in range(p.n_blocks)
        )
        self.out = nn.Conv2d(c, p.vocab_size, 1)
        if p.cond_vocab_size:
            self.cond_emb = nn.Embedding(p.cond_vocab_size, c)
            if p.cond_spatial:
                self.cond_net = nn.ModuleList(
                    GatedResBlock(c, k, p.dropout, causal=False) for _ in range(p.n_cond_res_blocks)
                )
        rows = (torch.arange(p.height, dtype=torch.float32) - p.height / 2) / p.height
        cols = (torch.arange(p.width, dtype=torch.float32) - p.width / 2) / p.width
        coords = torch.stack(torch.meshgrid(rows, cols, indexing="ij"))  # (2, H, W)
        self.register_buffer("coords", coords[None], persistent=False)  # (1, 2, H, W)

    # -- pieces ---------------------------------------------------------------
    def condition(self, cond: torch.Tensor | None, batch_size: int) -> torch.Tensor | None:
        """Condition features: ``[B, C, 1, 1]`` (class), ``[B, C, H, W]`` (map) or None."""
        if self.cond_vocab_size == 0:
            if cond is not None and cond.shape[-1] > 0:
                raise ValueError(
                    "this PixelSNAIL is unconditional (cond_vocab_size=0) but got "
                    f"condition tokens of shape {tuple(cond.shape)}"
                )
            return None
        want = self.height * self.width if self.cond_spatial else 1
        kind = f"a {self.height}x{self.width} token map" if self.cond_spatial else "one token"
        if cond is None or cond.shape != (batch_size, want):
            got = None if cond is None else tuple(cond.shape)
            raise ValueError(
                f"this PixelSNAIL is conditioned on {kind}: cond must be [B={batch_size}, "
                f"{want}] int64, got {got}"
            )
        ids = cond - self.vocab_size  # (B, Lc): into the condition table
        if bool(((ids < 0) | (ids >= self.cond_vocab_size)).any()):
            raise ValueError(
                f"condition tokens must lie in [{self.vocab_size}, "
                f"{self.vocab_size + self.cond_vocab_size}) (offset by vocab_size), got "
                f"[{int(cond.min())}, {int(cond.max())}]"
            )
        e = self.cond_emb(ids)  # (B, Lc, C)
        if not self.cond_spatial:
            return rearrange(e, "b 1 c -> b c 1 1")  # (B, C, 1, 1): a learned bias
        x = rearrange(e, "b (h w) c -> b c h w", h=self.height)  # (B, C, H, W)
        for res in self.cond_net:
            x = res(x)  # (B, C, H, W)
        return x

    def grid_logits(self, grid: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """Logits ``[B, V, h, W]`` of a token grid ``[B, h, W]`` (the top ``h <= H`` rows).

        ``cond`` is the output of :meth:`condition` (for the full grid).
        """
        rows = grid.shape[1]
        emb = rearrange(self.tok_emb(grid), "b h w c -> b c h w")  # (B, C, h, W)
        coords = self.coords[:, :, :rows].expand(grid.shape[0], -1, -1, -1)  # (B, 2, h, W)
        if cond is not None and self.cond_spatial:
            cond = cond[:, :, :rows]  # (B, C, h, W)
        x = self.input_conv(emb)  # (B, C, h, W)
        for block in self.blocks:
            x = block(x, emb, coords.to(x.dtype), cond)  # (B, C, h, W)
        return self.out(F.elu(x))  # (B, V, h, W)

    def _grid(self, seq: torch.Tensor) -> torch.Tensor:
        if seq.ndim != 2 or seq.dtype != torch.long or seq.shape[1] != self.height * self.width:
            raise ValueError(
                f"seq must be [B, {self.height * self.width}] int64 (a {self.height}x"
                f"{self.width} grid), got {tuple(seq.shape)} {seq.dtype}"
            )
        if bool(((seq < 0) | (seq >= self.vocab_size)).any()):
            raise ValueError(
                f"image codes must lie in [0, {self.vocab_size}), got "
                f"[{int(seq.min())}, {int(seq.max())}]"
            )
        return rearrange(seq, "b (h w) -> b h w", h=self.height)  # (B, H, W)

    # -- the Prior interface ----------------------------------------------------
    def logits(self, seq: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, L, vocab_size]``: logits ``i`` predict ``seq[:, i]`` from cond, ``seq[:, :i]``."""
        grid = self._grid(seq)  # (B, H, W)
        out = self.grid_logits(grid, self.condition(cond, seq.shape[0]))  # (B, V, H, W)
        return rearrange(out, "b v h w -> b (h w) v")  # (B, L, V)

    @torch.no_grad()
    def start(self, cond: torch.Tensor | None, batch_size: int) -> PixelSNAILState:
        """Compute the condition features once; no token fed yet."""
        feats = self.condition(cond, batch_size)
        tokens = torch.zeros(
            batch_size, self.height * self.width, dtype=torch.long, device=self.coords.device
        )
        return PixelSNAILState(tokens, 0, feats)

    @torch.no_grad()
    def step(
        self, state: PixelSNAILState, token: torch.Tensor | None
    ) -> tuple[torch.Tensor, PixelSNAILState]:
        """Feed the previous image token ``[B]`` (``None`` first); next logits ``[B, V]``.

        Recomputes the rows up to the next position's; the state is updated in place.
        """
        if token is None:
            if state.started:
                raise ValueError("step(state, None) is only for the first call after start()")
        else:
            if not state.started:
                raise ValueError("the first step() after start() takes token=None")
            if state.n + 1 >= self.height * self.width:
                raise ValueError(f"all {self.height * self.width} positions are already decoded")
            state.tokens[:, state.n] = token.reshape(-1)
            state.n += 1
        state.started = True
        r, c = divmod(state.n, self.width)
        grid = rearrange(state.tokens, "b (h w) -> b h w", h=self.height)[:, : r + 1]
        out = self.grid_logits(grid, state.cond)  # (B, V, r + 1, W)
        return out[:, :, r, c], state  # (B, V)

    @torch.no_grad()
    def generate(
        self,
        cond: torch.Tensor | None,
        length: int | None = None,
        batch_size: int | None = None,
        sample_fn: Callable[[torch.Tensor, torch.Generator | None], torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample ``[B, length]`` image codes (default: the whole grid); see the base class."""
        n = self.height * self.width if length is None else length
        return super().generate(cond, n, batch_size, sample_fn, generator)
