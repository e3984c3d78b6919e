"""MaskGIT prior: a bidirectional transformer that fills masked cells in parallel (``maskgit``).

After Chang et al., "MaskGIT: Masked Generative Image Transformer" (CVPR 2022): a
BERT-style transformer over the ``L = height * width`` cells of the code grid, trained to
predict randomly masked cells from the visible ones, and decoded in a few parallel rounds
instead of ``L`` autoregressive steps. It is a *masked* prior (:class:`vqgen.MaskedPrior`):
it has no likelihood and no sequence order.

Token ids (one embedding table, ``tok_emb``)::

    [0, vocab_size)                               image codes; the head predicts these only
    [vocab_size, vocab_size + cond_vocab_size)    condition tokens, offset by the pipeline
    vocab_size + cond_vocab_size                  [MASK]

``cond_vocab_size = 0`` is taming's layout (condition ids share the image-code table).
The input of cell ``i`` is ``tok_emb(seq[i] or [MASK]) + pos_emb[i]`` plus the condition:
a class (``Lc = 1``) is added at every cell (``class_token: add``, the default) or fed as
a token of its own before the cells (``class_token: prefix``, with its own learned
position, as MaskGIT's code does; its output row is dropped), a spatial map (``Lc = L``)
cell by cell (``aligned_condition = True``: the pipeline hands it over in the same order
as ``seq``).
A conditioner's null token is just another condition id, so condition dropout and
classifier-free guidance (``uncond + s · (cond − uncond)`` from one doubled batch) work
as for GPT.

Training (:meth:`MaskGIT.loss`, ``loss_name = "masked_ce"``): per sample draw ``u ~ U(0,
1)``, mask ratio ``r = γ(u)`` (``mask_schedule``; cosine: ``cos(π/2 · u)``), replace
``ceil(r · L)`` (at least 1) cells chosen uniformly at random by [MASK], and score the
cross-entropy of the true codes at the masked cells only, averaged per sample: ``[B]``
nats per masked cell. This is *not* a negative log-likelihood and is never reported as
one. The draws come from the ``generator`` argument, else torch's global RNG (which the
trainer seeds per rank).

Decoding (:meth:`MaskGIT.decode`, ``steps = T`` rounds): start with every unknown cell
masked (known cells of a completion stay as given). Round ``t = 0 .. T-1`` computes the
(guided) logits of every cell; each masked cell draws a token with the sampler (its warp:
temperature, top-k, nucleus) and gets the confidence ``log p(token) + τ_t · g``: ``p`` the
model's (guided) distribution before the sampler's warp, as in MaskGIT (a warped one would
tie every cell at ``log 1`` under greedy top-1), ``g`` Gumbel noise and ``τ_t =
choice_temperature · (1 − (t+1)/T)`` (annealed linearly to 0 at the last round, as
MaskGIT's code does); known and already fixed cells have confidence ``+inf``. The
``n_t = floor(U · γ((t+1)/T))`` least confident cells stay masked (``U``: the cells
unknown at the start; at least one new cell is fixed per round while any is masked;
``n_{T-1} = 0``), the rest are fixed for good. Every draw comes from the request's
generator.

Decisions:

* **Ordering.** The transformer sees all cells at once, so an ordering does not change
  what it can model: it only relabels the positions that ``pos_emb`` indexes (and the
  pipeline permutes a spatial condition the same way). Any ordering is accepted; the
  decoding order is the confidence order, never the ordering's. ``row_major`` is the
  natural choice.
* **Canvas.** The training grid only: the pipeline refuses a larger canvas (no sliding
  window for a masked prior).
* **Completion.** The pipeline's ``prefix`` (top rows) is any set of known cells here:
  they are fed unmasked and returned untouched.
* **Samplers.** temperature, top_k, top_p, chain act on each masked cell's logits;
  rejection judges finished samples as for any prior.
"""

from __future__ import annotations

import math
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
    Decoding,
    MaskedPrior,
    ParamsModel,
    Sizes,
    check_grid,
    require_wired,
)
from vqgen.plugins.gpt import TransformerMemory, init_transformer_weights

__all__ = ["MaskGIT", "MaskGITParams", "mask_ratio", "masking_schedule"]


class MaskGITParams(ParamsModel):
    """Config of :class:`MaskGIT`."""

    vocab_size: Annotated[int, Field(ge=1, le=1 << 20)] | Auto = Field(
        AUTO, description="image codes: ids [0, vocab_size) (auto: the tokenizer's)")
    cond_vocab_size: Annotated[int, Field(ge=0, le=1 << 20)] | Auto = Field(
        AUTO, description="condition ids [vocab_size, vocab_size + cond_vocab_size) "
        "(auto: the conditioner's; 0 without one)")
    height: Annotated[int, Field(ge=1, le=1024)] | Auto = Field(
        AUTO, description="rows of the latent grid (auto: the data's)")
    width: Annotated[int, Field(ge=1, le=1024)] | Auto = Field(
        AUTO, description="columns of the latent grid (auto: the data's)")
    n_layer: int = Field(12, ge=1, le=256, description="transformer blocks")
    n_head: int = Field(8, ge=1, le=256, description="attention heads")
    n_embd: int = Field(256, ge=1, le=16384, description="width of the transformer")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="embedding, attention and "
                           "residual dropout in training")
    attention: Literal["auto", "xformers", "sdpa", "math"] = Field(
        "auto", description="attention backend (vqgen.core.attention)")
    steps: int = Field(8, ge=1, le=1024, description="parallel decoding rounds T")
    mask_schedule: Literal["cosine", "linear", "square"] = Field(
        "cosine", description="mask ratio γ(u): cosine cos(π/2·u) (MaskGIT), linear 1 − u, "
        "square 1 − u²; used in training and decoding")
    choice_temperature: float = Field(
        4.5, ge=0.0, le=100.0, description="scale of the Gumbel noise on the confidence "
        "that picks the cells to fix, annealed linearly to 0 over the rounds (MaskGIT: 4.5)")
    class_token: Literal["add", "prefix"] = Field(
        "add", description="how a class condition (one token) enters: add (its embedding "
        "added at every cell) or prefix (a token of its own before the cells, with its own "
        "position, as MaskGIT's code feeds it); a spatial map is always added cell by cell")

    @model_validator(mode="after")
    def _check(self) -> MaskGITParams:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        return self


def mask_ratio(u: torch.Tensor | float, schedule: str = "cosine") -> Any:
    """``γ(u)``: the fraction of cells masked at ``u ∈ [0, 1]`` (1 at 0, 0 at 1)."""
    if schedule == "cosine":
        return torch.cos(math.pi / 2 * u) if isinstance(u, torch.Tensor) else \
            math.cos(math.pi / 2 * u)
    if schedule == "linear":
        return 1 - u
    if schedule == "square":
        return 1 - u * u
    raise ValueError(f"unknown mask_schedule {schedule!r}; valid: cosine, linear, square")


def masking_schedule(unknown: int, steps: int, schedule: str = "cosine") -> list[int]:
    """Cells still masked after each of ``steps`` rounds, from ``unknown`` masked cells:
    ``floor(unknown · γ((t+1)/steps))``, at least one fewer each round while any is left,
    0 after the last (e.g. 16 cells, 8 rounds, cosine: 15 14 13 11 8 6 3 0)."""
    out, left = [], unknown
    for t in range(steps):
        n = math.floor(unknown * mask_ratio((t + 1) / steps, schedule) + 1e-9)
        left = 0 if t == steps - 1 else max(min(n, left - 1), 0)
        out.append(left)
    return out


class SelfAttention(nn.Module):
    """Multi-head bidirectional self-attention with an output projection."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, backend: str) -> None:
        super().__init__()
        self.key = nn.Linear(n_embd, n_embd)
        self.query = nn.Linear(n_embd, n_embd)
        self.value = nn.Linear(n_embd, n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.resid_drop = nn.Dropout(dropout)
        self.n_head, self.dropout, self.backend = n_head, dropout, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads = "b t (nh hs) -> b nh t hs"
        k = rearrange(self.key(x), heads, nh=self.n_head)  # (B, nh, L, hs)
        q = rearrange(self.query(x), heads, nh=self.n_head)  # (B, nh, L, hs)
        v = rearrange(self.value(x), heads, nh=self.n_head)  # (B, nh, L, hs)
        p = self.dropout if self.training else 0.0
        y = attention(q, k, v, causal=False, backend=self.backend, dropout_p=p)  # (B, nh, L, hs)
        y = rearrange(y, "b nh t hs -> b t (nh hs)")  # (B, L, C)
        return self.resid_drop(self.proj(y))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, backend: str) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = SelfAttention(n_embd, n_head, dropout, backend)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd),
            nn.GELU(),
            nn.Linear(4 * n_embd, n_embd),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))  # (B, L, C)
        return x + self.mlp(self.ln2(x))  # (B, L, C)


class MaskGIT(TransformerMemory, MaskedPrior):
    """MaskGIT masked prior: a bidirectional transformer over the grid's cells.

    See the module docstring for the id layout, the training loss (``masked_ce``, not a
    likelihood), the decoding rounds and the decisions on orderings (any is accepted: it
    only relabels positions), canvases (the training grid only) and completion (known
    cells stay fixed). ``masked_logits(seq, cond)`` takes ``-1`` for masked cells.
    """

    Params = MaskGITParams
    aligned_condition = True  # a spatial condition comes in seq's order, cell by cell

    def __init__(self, **fields: Any) -> None:
        super().__init__(**fields)
        require_wired(self, ("vocab_size", "height", "width"), alone={"cond_vocab_size": 0})
        p = self.params
        assert isinstance(p, MaskGITParams)
        self.vocab_size, self.cond_vocab_size = p.vocab_size, p.cond_vocab_size
        self.height, self.width, self.length = p.height, p.width, p.height * p.width
        self.n_positions = self.length
        self.steps = p.steps
        self.mask_id = p.vocab_size + p.cond_vocab_size  # the last row of the table
        self.tok_emb = nn.Embedding(self.mask_id + 1, p.n_embd)
        self.pos_emb = nn.Parameter(torch.zeros(1, self.length, p.n_embd))
        #: the class token's own position where it is a prefix (class_token: prefix)
        self.cond_pos = (nn.Parameter(torch.zeros(1, 1, p.n_embd))
                         if p.class_token == "prefix" else None)
        self.drop = nn.Dropout(p.dropout)
        self.blocks = nn.Sequential(
            *[Block(p.n_embd, p.n_head, p.dropout, p.attention) for _ in range(p.n_layer)])
        self.ln_f = nn.LayerNorm(p.n_embd)
        self.head = nn.Linear(p.n_embd, p.vocab_size)  # image codes only
        self.apply(self._init_weights)
        nn.init.normal_(self.pos_emb, mean=0.0, std=0.02)  # BERT's; zeros would tie cells
        if self.cond_pos is not None:
            nn.init.normal_(self.cond_pos, mean=0.0, std=0.02)

    @classmethod
    def wire(cls, params: dict[str, Any], sizes: Sizes) -> dict[str, Any]:
        """Grid and vocabularies from the other stages; an explicit grid must be the data's,
        and a spatial condition must have one token per cell."""
        out = super().wire(params, sizes)
        check_grid(out, sizes)
        if sizes.cond_spatial and sizes.height is not None and sizes.width is not None and (
                sizes.cond_length != sizes.height * sizes.width):
            raise ValueError(
                f"maskgit adds a spatial condition cell by cell, but it has "
                f"{sizes.cond_length} tokens for the {sizes.height}x{sizes.width} grid: give "
                "the conditioner's tokenizer the image tokenizer's f (leave its ch_mult out)")
        return out

    _init_weights = staticmethod(init_transformer_weights)

    # -- the network ----------------------------------------------------------
    def _check(self, seq: torch.Tensor, cond: torch.Tensor | None) -> None:
        """Shapes, dtypes and id ranges (one device sync)."""
        if seq.ndim != 2 or seq.dtype != torch.long or seq.shape[1] != self.length:
            raise ValueError(
                f"seq must be [B, {self.length}] int64 (a {self.height}x{self.width} grid, -1 "
                f"for masked cells), got {tuple(seq.shape)} {seq.dtype}")
        bad_seq = ((seq < -1) | (seq >= self.vocab_size)).any()
        bad_cond = torch.zeros_like(bad_seq)
        lo, hi = (self.vocab_size, self.mask_id) if self.cond_vocab_size else (0, self.vocab_size)
        if cond is not None:
            if cond.ndim != 2 or cond.dtype != torch.long or cond.shape[0] != seq.shape[0] \
                    or cond.shape[1] not in (1, self.length):
                raise ValueError(
                    f"cond must be [B={seq.shape[0]}, 1] (a class) or [B, {self.length}] (one "
                    f"token per cell) int64, got {tuple(cond.shape)} {cond.dtype}")
            bad_cond = ((cond < lo) | (cond >= hi)).any()
        bad_seq, bad_cond = torch.stack([bad_seq, bad_cond]).tolist()  # one device sync
        if bad_cond:
            assert cond is not None
            raise ValueError(
                f"condition tokens must lie in [{lo}, {hi}) (the pipeline offsets condition "
                f"ids by vocab_size={self.vocab_size}), got [{int(cond.min())}, "
                f"{int(cond.max())}]")
        if bad_seq:
            raise ValueError(f"image codes must lie in [0, {self.vocab_size}) (-1: masked), "
                             f"got [{int(seq.min())}, {int(seq.max())}]")

    def masked_logits(self, seq: torch.Tensor, cond: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """``[B, L, vocab_size]`` logits of every cell, given ``seq [B, L]`` with ``-1`` at the
        masked cells and ``cond [B, 1 or L]`` (offset) condition tokens or None."""
        if cond is not None and cond.shape[-1] == 0:
            cond = None
        self._check(seq, cond)
        ids = seq.masked_fill(seq < 0, self.mask_id)  # (B, L)
        x = self.tok_emb(ids) + self.pos_emb  # (B, L, C)
        prefix = cond is not None and self.cond_pos is not None and cond.shape[1] == 1
        if prefix:
            assert cond is not None and self.cond_pos is not None
            x = torch.cat([self.tok_emb(cond) + self.cond_pos, x], dim=1)  # (B, 1 + L, C)
        elif cond is not None:
            x = x + self.tok_emb(cond)  # (B, 1 or L, C): a class everywhere, a map per cell
        x = self.blocks(self.drop(x))  # (B, L or 1 + L, C)
        x = x[:, 1:] if prefix else x  # (B, L, C): the cells only
        return self.head(self.ln_f(x))  # (B, L, V)

    # -- training -------------------------------------------------------------
    def random_mask(self, batch_size: int, device: torch.device,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """``bool [B, L]``: per sample ``ceil(γ(u) · L)`` (at least 1) cells chosen uniformly
        at random, ``u ~ U(0, 1)``; the draws come from ``generator`` (else torch's RNG)."""
        u = torch.rand(batch_size, device=device, generator=generator)  # (B,)
        ratio = mask_ratio(u, self.params.mask_schedule)  # (B,)
        n = torch.ceil(ratio * self.length).long().clamp(1, self.length)  # (B,)
        scores = torch.rand(batch_size, self.length, device=device, generator=generator)
        rank = scores.argsort(dim=1).argsort(dim=1)  # (B, L): a random permutation per row
        return rank < n[:, None]  # (B, L)

    def loss(self, seq: torch.Tensor, cond: torch.Tensor | None = None, *,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """``[B]`` masked cross-entropy (``loss_name = "masked_ce"``): nats per masked cell,
        over a random mask per sample (see :meth:`random_mask`). Not a likelihood."""
        masked = self.random_mask(seq.shape[0], seq.device, generator)  # (B, L)
        logits = self.masked_logits(seq.masked_fill(masked, -1), cond)  # (B, L, V)
        ce = F.cross_entropy(rearrange(logits.float(), "b l v -> b v l"), seq,
                             reduction="none")  # (B, L)
        return (ce * masked).sum(dim=1) / masked.sum(dim=1)  # (B,)

    # -- decoding -------------------------------------------------------------
    def _step_logits(self, seq: torch.Tensor, d: Decoding) -> torch.Tensor:
        """``[b, L, V]`` logits of one round: guided from a doubled batch, or plain."""
        if d.guided:
            both = self.masked_logits(torch.cat([seq, seq]), d.doubled_cond())  # (2b, L, V)
            return d.guide(both)  # (b, L, V)
        return self.masked_logits(seq, d.cond)  # (b, L, V)

    @torch.no_grad()
    def decode(self, request: Decoding) -> torch.Tensor:
        """``[b, L]`` codes in ``steps`` parallel rounds (module docstring); known cells kept."""
        d, b, n_cells = request, request.batch_size, request.length
        if n_cells != self.length:
            raise ValueError(f"maskgit decodes its {self.height}x{self.width} grid "
                             f"({self.length} cells), not {n_cells}")
        device = self.pos_emb.device
        seq = torch.full((b, n_cells), -1, dtype=torch.long, device=device)  # (b, L)
        if d.known is not None:
            seq = d.known.to(device=device, dtype=torch.long).clone()  # (b, L), -1 unknown
        unknown = (seq < 0).sum(dim=1).tolist()  # masked cells per sample, one sync
        rounds = [masking_schedule(u, self.steps, self.params.mask_schedule) for u in unknown]
        plan = torch.tensor(rounds, dtype=torch.long, device=device)  # (b, T): masked after t
        left = max(unknown, default=0)
        was_training = self.training
        self.eval()
        try:
            for t in range(self.steps):
                if left == 0:
                    break
                masked = seq < 0  # (b, L)
                logits = self._step_logits(seq, d)[masked]  # (N, V): the masked cells' rows
                token = d.pick(logits)  # (N,)
                logp = torch.log_softmax(logits.float(), dim=-1)  # (N, V): the model's
                conf = logp.gather(1, token[:, None]).squeeze(1)  # (N,)
                u = torch.rand(conf.shape, device=device, generator=d.generator)  # (N,)
                gumbel = -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))  # (N,)
                tau = self.params.choice_temperature * (1.0 - (t + 1) / self.steps)
                confidence = torch.full((b, n_cells), math.inf, device=device)  # (b, L)
                confidence[masked] = conf + tau * gumbel
                filled = seq.masked_scatter(masked, token)  # (b, L)
                order = confidence.argsort(dim=1, stable=True).argsort(dim=1)  # (b, L)
                seq = filled.masked_fill(order < plan[:, t : t + 1], -1)  # (b, L)
                left = max(r[t] for r in rounds)
        finally:
            self.train(was_training)
        return seq
