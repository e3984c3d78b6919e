"""GPT prior: a GPT-2-style decoder over image codes, with a KV cache (registered as ``gpt``).

The architecture is the one of Taming Transformers (their ``mingpt.py``, after minGPT):
pre-LayerNorm blocks, a GELU MLP four times as wide, learned position embeddings,
and a linear head without bias. Module and parameter names match taming's, one to one:
``tok_emb``, ``pos_emb`` (an ``nn.Parameter`` ``[1, block_size, n_embd]``), ``drop``,
``blocks.N.{ln1, attn.{key, query, value, proj}, ln2, mlp.{0, 2}}``, ``ln_f``, ``head``.

Token ids (one embedding table, ``tok_emb``)::

    [0, vocab_size)                               image codes; the head predicts these only
    [vocab_size, vocab_size + cond_vocab_size)    condition tokens, offset by the pipeline
    vocab_size + cond_vocab_size                  the start token (start_token="learned")

With ``start_token="learned"`` (the default) the table has a last row of its own, fed as
the start token of an unconditional sequence. With ``start_token=<id>`` there is no extra
row and that id of the table is fed instead. Taming's layout, where condition ids share
the image-code table with no offset and an SOS id is fed through that same table, is
``cond_vocab_size=0`` (condition ids then lie in ``[0, vocab_size)``) with ``start_token``
set to taming's SOS id (any id, e.g. 0, for a conditional model, which never uses it).

Sequence layout and ``block_size``: ``logits(seq [B, L], cond [B, Lc])`` runs the
transformer on ``[cond..., seq[:, :-1]]``, or on ``[start, seq[:, :-1]]`` without a
condition, so the position holding the last condition token (or the start token) predicts
``seq[:, 0]`` and every later position predicts the next image token. The causal mask
covers the whole input, condition positions included (as in taming). ``block_size`` is the
number of transformer positions, ``max(Lc, 1) + L - 1``: 256 for a 16×16 grid with a class
or no condition, 511 (taming uses 512) with a 16×16 spatial condition. A longer input
raises a ``ValueError`` that says how large ``block_size`` must be.

The training loss (``forward``) and ``nll`` cover the ``L`` image tokens only: no output is
computed, let alone scored, for the positions whose next token is a condition token.

Condition fusion (``cond_fusion``): ``"prefix"`` (taming's layout, above) spends ``Lc``
positions on the condition, which the transformer must learn to look up by attention.
``"add"`` spends none: the condition's embedding is added to the input of the position that
predicts each image token, so the input is ``[start, seq[:, :-1]]`` and ``block_size = L``.
A condition of ``Lc = 1`` (a class) is added at every position; one of ``Lc = L`` (a spatial
map, which the pipeline hands over in the prior's ordering) is aligned cell by cell: the
position that predicts the token of cell ``(i, j)`` sees the condition token of that cell
(the "aligned fusion" of ControlAR-style models). ``"both"`` keeps taming's prefix, so
every position can attend to the whole map, and adds each cell's condition at the
position that predicts it too (``block_size = Lc + L - 1``). All use the one table.

Position embeddings (``pos_emb``): ``"learned"`` (taming's) is a table ``[1, block_size,
n_embd]`` added to the inputs by sequence position. ``"rope2d"`` has no table: queries and
keys of every layer are rotated by the 2-D cell of their token (2-D RoPE, as LlamaGen does
for image tokens; :mod:`vqgen.core.positions`), so attention sees offsets on the grid, in
whatever order the cells are visited. It needs the grid (``height``, ``width``) and the
order of its cells (:meth:`GPT.set_cell_order`, which the pipeline calls with the
ordering's permutation; row-major until then). The input position holding image token
``seq[k]`` sits at the cell of sequence position ``k``. Tokens that describe no cell, the
start token and a class token, sit at ``(-1, -1)``, one step up and left of the grid's
corner, where no image token is; a spatial condition's prefix (``Lc = h * w``, row-major,
or in the sequence order with ``cond_fusion="both"``) sits on the cells it describes, so
it is aligned with the image without a learned table; any other multi-token prefix lies
along row ``-1``, ending at ``(-1, -1)``.

Why one file of this size: one readable file per architecture, as nanoGPT's ``model.py``
(params, attention block, the two position schemes, KV-cached decoding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
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
    transformer_activation_bytes,
)
from vqgen.core.positions import apply_rope2d, check_permutation, raster_cells, rope2d_angles

__all__ = ["GPT", "GPTState", "KVCache", "TransformerMemory", "init_transformer_weights"]

class TransformerMemory:
    """:class:`vqgen.core.interfaces.ActivationEstimate` for a transformer prior with
    ``params.n_embd``, ``params.n_layer``, ``vocab_size`` and ``n_positions``."""

    params: Any
    vocab_size: int
    n_positions: int

    def activation_bytes(self, batch_size: int,
                         image_size: tuple[int, int] | None = None) -> int:
        """Activations one training micro-batch keeps (fp32, a lower bound; see
        :func:`vqgen.core.interfaces.transformer_activation_bytes`)."""
        p = self.params
        return transformer_activation_bytes(batch_size, self.n_positions, p.n_embd,
                                            p.n_layer, self.vocab_size)


class GPTParams(ParamsModel):
    """Config of :class:`GPT`; Tab. 8 of the paper gives the sizes it used."""

    vocab_size: Annotated[int, Field(ge=1, le=1 << 20)] | Auto = Field(
        AUTO, description="image codes: ids [0, vocab_size) (auto: the tokenizer's)"
    )
    cond_vocab_size: Annotated[int, Field(ge=0, le=1 << 20)] | Auto = Field(
        AUTO, description="condition ids [vocab_size, vocab_size + cond_vocab_size) "
        "(auto: the conditioner's; 0 without one)",
    )
    block_size: Annotated[int, Field(ge=1, le=1 << 16)] | Auto = Field(
        AUTO, description="transformer positions: max(Lc, 1) + L - 1 (cond_fusion add: L); "
        "auto: exactly that, for the data's latent grid",
    )
    n_layer: int = Field(12, ge=1, le=256)
    n_head: int = Field(8, ge=1, le=256)
    n_embd: int = Field(256, ge=1, le=16384)
    embd_pdrop: float = Field(0.0, ge=0.0, lt=1.0)
    resid_pdrop: float = Field(0.0, ge=0.0, lt=1.0)
    attn_pdrop: float = Field(0.0, ge=0.0, lt=1.0)
    attention: Literal["auto", "xformers", "sdpa", "math"] = "auto"
    start_token: Annotated[int, Field(ge=0)] | Literal["learned"] = Field(
        "learned", description="table id fed as start token, or 'learned': a row of its own"
    )
    tok_emb_init: Literal["normal", "code_vectors"] = Field(
        "normal",
        description="normal: N(0, 0.02) (minGPT); code_vectors: image-code rows from the "
        "tokenizer's code vectors (randomly projected, same scale): alike codes start alike",
    )
    cond_emb_init: Literal["normal", "zeros"] = Field(
        "normal",
        description="condition rows of the embedding table: normal N(0, 0.02) (minGPT), or "
        "zeros: a conditional prior starts as its unconditional twin and learns to use the "
        "condition (the zero-initialised condition path of ControlNet and adaLN-Zero)",
    )
    cond_fusion: Literal["prefix", "add", "both"] = Field(
        "prefix",
        description="prefix: condition tokens lead the sequence (taming); add: the "
        "condition embedding is added at every position (a class) or cell by cell (a map); "
        "both: a prefix, and added cell by cell too",
    )
    pos_emb: Literal["learned", "rope2d"] = Field(
        "learned",
        description="learned: a table added by sequence position (taming); rope2d: queries "
        "and keys rotated by their token's grid cell (2-D RoPE, LlamaGen); needs the grid",
    )
    rope_base: float = Field(
        10000.0, gt=1.0, le=1e9, description="rope2d: base of the rotary frequencies"
    )
    height: Annotated[int, Field(ge=1, le=1024)] | Auto = Field(
        AUTO, description="rows of the latent grid (auto: the data's); rope2d needs it"
    )
    width: Annotated[int, Field(ge=1, le=1024)] | Auto = Field(
        AUTO, description="columns of the latent grid (auto: the data's); rope2d needs it"
    )

    @model_validator(mode="after")
    def _check(self) -> GPTParams:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.pos_emb == "rope2d" and (self.n_embd // self.n_head) % 4:
            raise ValueError(
                f"pos_emb='rope2d' needs a head size n_embd / n_head = {self.n_embd} / "
                f"{self.n_head} = {self.n_embd // self.n_head} divisible by 4 (a pair of "
                "dimensions per frequency, on each of the two axes); change n_embd or n_head"
            )
        if self.vocab_size == AUTO:
            return self  # checked once assembly has resolved it
        rows = self.vocab_size + (0 if self.cond_vocab_size == AUTO else self.cond_vocab_size)
        if self.start_token != "learned" and self.start_token >= rows:
            raise ValueError(
                f"start_token={self.start_token} is not an id of the embedding table "
                f"[0, vocab_size + cond_vocab_size = {rows})"
            )
        return self


def _at_inputs(cells: torch.Tensor | None, n_prefix: int) -> torch.Tensor | None:
    """Per-cell embeddings ``[B, L, C]`` placed at the input positions that predict their
    cells, ``n_prefix - 1`` onwards (zeros before); one embedding ``[B, 1, C]`` (a class)
    is added at every position as it is."""
    if cells is None or cells.shape[1] == 1 or n_prefix == 1:
        return cells
    pad = cells.new_zeros(cells.shape[0], n_prefix - 1, cells.shape[2])  # (B, P - 1, C)
    return torch.cat([pad, cells], dim=1)  # (B, P - 1 + L, C)


def init_transformer_weights(module: nn.Module) -> None:
    """minGPT's init (``model.apply`` it): N(0, 0.02) Linear / Embedding weights, zero
    biases, LayerNorm ones / zeros."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class KVCache:
    """Keys and values of one layer for positions ``0 .. length - 1``.

    Preallocated to ``capacity`` (= block_size) positions on first use and written in
    place, so decoding ``L`` tokens costs ``O(L)`` copies, not ``O(L²)``.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.length = 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v [B, nh, T, hs]``; return all keys and values so far."""
        t0, t1 = self.length, self.length + k.shape[2]
        if t1 > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions (block_size), needs {t1}")
        if self.k is None or self.v is None:
            b, nh, _, hs = k.shape
            self.k = k.new_empty(b, nh, self.capacity, hs)  # (B, nh, block_size, hs)
            self.v = v.new_empty(b, nh, self.capacity, hs)  # (B, nh, block_size, hs)
        self.k[:, :, t0:t1] = k
        self.v[:, :, t0:t1] = v
        self.length = t1
        return self.k[:, :, :t1], self.v[:, :, :t1]  # (B, nh, t1, hs)


#: ``cos, sin [T, 2, hs // 4]`` of 2-D RoPE (:func:`vqgen.core.positions.rope2d_angles`)
Rope = tuple[torch.Tensor, torch.Tensor]


def _rows(rope: Rope | None, t0: int, t1: int) -> Rope | None:
    """The rotations of inputs ``t0 .. t1 - 1`` (None stays None)."""
    return None if rope is None else (rope[0][t0:t1], rope[1][t0:t1])  # (t1 - t0, 2, n) each


@dataclass
class GPTState:
    """Decoding state: one KV cache per layer, and the logits not yet handed out."""

    caches: list[KVCache]
    pending: torch.Tensor | None  # (B, V): logits for the first image token, until taken
    batch_size: int
    added: torch.Tensor | None = None  # (B, 1 or L, C): cond_fusion="add"/"both" embeddings
    offset: int = 0  # input position of image cell 0 (P - 1)
    cells: torch.Tensor | None = None  # (P + h*w - 1, 2): rope2d (row, col) of every input
    rope: Rope | None = None  # (P + h*w - 1, 2, hs/4) each: their cos, sin


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with an output projection (taming's names)."""

    def __init__(
        self, n_embd: int, n_head: int, attn_pdrop: float, resid_pdrop: float, backend: str
    ) -> None:
        super().__init__()
        self.key = nn.Linear(n_embd, n_embd)
        self.query = nn.Linear(n_embd, n_embd)
        self.value = nn.Linear(n_embd, n_embd)
        self.resid_drop = nn.Dropout(resid_pdrop)
        self.proj = nn.Linear(n_embd, n_embd)
        self.n_head, self.attn_pdrop, self.backend = n_head, attn_pdrop, backend

    def forward(self, x: torch.Tensor, cache: KVCache | None = None,
                rope: Rope | None = None) -> torch.Tensor:
        """``x [B, T, C]`` → ``[B, T, C]``; ``rope`` rotates queries and keys (before the
        keys are cached) by their positions."""
        heads = "b t (nh hs) -> b nh t hs"
        k = rearrange(self.key(x), heads, nh=self.n_head)  # (B, nh, T, hs)
        q = rearrange(self.query(x), heads, nh=self.n_head)  # (B, nh, T, hs)
        v = rearrange(self.value(x), heads, nh=self.n_head)  # (B, nh, T, hs)
        if rope is not None:
            q = apply_rope2d(q, *rope)  # (B, nh, T, hs)
            k = apply_rope2d(k, *rope)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, nh, T_past + T, hs)
        p = self.attn_pdrop if self.training else 0.0
        y = attention(q, k, v, causal=True, backend=self.backend, dropout_p=p)  # (B, nh, T, hs)
        y = rearrange(y, "b nh t hs -> b t (nh hs)")  # (B, T, C)
        return self.resid_drop(self.proj(y))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(
        self, n_embd: int, n_head: int, attn_pdrop: float, resid_pdrop: float, backend: str
    ) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.ln2 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, attn_pdrop, resid_pdrop, backend)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd),
            nn.GELU(),
            nn.Linear(4 * n_embd, n_embd),
            nn.Dropout(resid_pdrop),
        )

    def forward(self, x: torch.Tensor, cache: KVCache | None = None,
                rope: Rope | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache, rope)  # (B, T, C)
        return x + self.mlp(self.ln2(x))  # (B, T, C)


class GPT(TransformerMemory, AutoregressivePrior):
    """GPT-2-style transformer prior over image codes, with KV-cache decoding.

    See the module docstring for the id layout (image codes, offset condition tokens,
    start token), for ``block_size`` (``max(Lc, 1) + L - 1`` transformer positions) and
    for the positions (``pos_emb``: learned, or 2-D RoPE on the grid, whose cell order
    :meth:`set_cell_order` sets: a :class:`~vqgen.core.positions.GridPositions`).
    ``forward(seq, cond)`` returns the training loss; ``start``/``step`` decode with a KV
    cache; ``generate`` samples whole sequences. Call ``.eval()`` before decoding.
    """

    prefix_logits = True  # causal: logits of a prefix need no later positions

    Params = GPTParams

    def __init__(self, **fields: Any) -> None:
        super().__init__(**fields)
        rope = self.params.pos_emb == "rope2d"  # type: ignore[attr-defined]
        require_wired(self, ("vocab_size", "block_size") + (("height", "width") if rope else ()),
                      alone={"cond_vocab_size": 0})
        p = self.params
        assert isinstance(p, GPTParams)
        self.rope = rope
        self.vocab_size = p.vocab_size
        self.cond_vocab_size = p.cond_vocab_size
        self.block_size = self.n_positions = p.block_size
        self.cond_prefix = p.cond_fusion in ("prefix", "both")  # the condition leads the input
        self.aligned_condition = p.cond_fusion in ("add", "both")  # and/or is added per cell
        self.wants_code_vectors = p.tok_emb_init == "code_vectors"
        learned = p.start_token == "learned"
        rows = p.vocab_size + p.cond_vocab_size + learned
        self.start_id = rows - 1 if learned else int(p.start_token)
        # input embedding stem
        self.tok_emb = nn.Embedding(rows, p.n_embd)
        if not rope:  # taming's table (the name `pos_emb` is its checkpoint key)
            self.pos_emb = nn.Parameter(torch.zeros(1, p.block_size, p.n_embd))
        else:  # no table: the cells of the sequence positions, set by set_cell_order
            self.register_parameter("pos_emb", None)
            self.height, self.width = int(p.height), int(p.width)
            order = torch.arange(self.height * self.width)  # (h*w,): row-major until set
            self.register_buffer("cell_order", order, persistent=False)
        self.drop = nn.Dropout(p.embd_pdrop)
        # transformer
        self.blocks = nn.Sequential(
            *[
                Block(p.n_embd, p.n_head, p.attn_pdrop, p.resid_pdrop, p.attention)
                for _ in range(p.n_layer)
            ]
        )
        # decoder head: image codes only
        self.ln_f = nn.LayerNorm(p.n_embd)
        self.head = nn.Linear(p.n_embd, p.vocab_size, bias=False)
        self.apply(self._init_weights)
        if p.cond_emb_init == "zeros" and self.cond_vocab_size:  # after the normal draw,
            with torch.no_grad():  # so the random stream (and the other weights) are kept
                self.tok_emb.weight[self.vocab_size : self.vocab_size + self.cond_vocab_size] = 0

    @classmethod
    def wire(cls, params: dict[str, Any], sizes: Sizes) -> dict[str, Any]:
        """Vocabularies from the tokenizer and conditioner; ``block_size`` from the
        latent grid and the condition's length (an explicit one must be large enough);
        ``height``, ``width`` from the latent grid (an explicit one must be the data's;
        where the grid is unknown, only ``pos_emb="rope2d"`` needs them given)."""
        grid = ("height", "width")
        if sizes.height is None or sizes.width is None:
            out = super().wire({k: v for k, v in params.items() if k not in grid}, sizes)
            out.update({k: params[k] for k in grid if k in params})
            if out["block_size"] == AUTO:
                raise ValueError("block_size: 'auto' needs the latent grid, which needs the "
                                 "data's resolution (data.params.resolution); give block_size")
            for name in grid:
                if out.get("pos_emb") == "rope2d" and out.get(name, AUTO) == AUTO:
                    raise ValueError(f"{name}: 'auto' needs the latent grid, which needs the "
                                     "data's resolution (data.params.resolution); "
                                     "pos_emb: rope2d places tokens on it; give height and width")
            return out
        out = super().wire(params, sizes)
        check_grid(out, sizes)
        length = sizes.height * sizes.width
        fusion = out.get("cond_fusion", "prefix")
        if fusion != "prefix" and sizes.cond_spatial and sizes.cond_length != length:
            raise ValueError(
                f"cond_fusion: {fusion} adds the condition cell by cell, but the condition "
                f"has {sizes.cond_length} tokens and the image {length}: give the "
                "conditioner's tokenizer the image tokenizer's f (leave its ch_mult out)")
        need = length if fusion == "add" else max(sizes.cond_length, 1) + length - 1
        if out["block_size"] == AUTO:
            out["block_size"] = need
        elif out["block_size"] < need:
            raise ValueError(
                f"block_size: {out['block_size']} is too small: {sizes.cond_length} condition "
                f"+ {length} image tokens ({sizes.height}x{sizes.width}) need {need} "
                "positions; leave block_size out (auto) or raise it")
        return out

    _init_weights = staticmethod(init_transformer_weights)

    @torch.no_grad()
    def init_from_code_vectors(self, vectors: torch.Tensor) -> None:
        """Image-code rows of ``tok_emb`` from ``vectors [vocab_size, d]``: centred, mapped
        to ``n_embd`` by a fixed random Gaussian projection (seed 0, so every rank agrees),
        and scaled to the table's N(0, 0.02) size; nearby vectors give nearby rows."""
        if vectors.ndim != 2 or vectors.shape[0] != self.vocab_size:
            raise ValueError(f"code vectors must be [vocab_size={self.vocab_size}, d], got "
                             f"{tuple(vectors.shape)}")
        v = vectors.detach().float().cpu()
        v = v - v.mean(0)  # (V, d)
        g = torch.Generator().manual_seed(0)
        proj = torch.randn(v.shape[1], self.tok_emb.weight.shape[1], generator=g)  # (d, C)
        e = v @ proj  # (V, C)
        e = e * (0.02 / e.std().clamp_min(1e-12))
        self.tok_emb.weight[: self.vocab_size] = e.to(self.tok_emb.weight)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; without ``tok_emb`` and ``pos_emb`` by default."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            n -= self.pos_emb.numel() if self.pos_emb is not None else 0
        return n

    # -- grid positions (pos_emb="rope2d") ----------------------------------
    def set_cell_order(self, perm: torch.Tensor) -> None:
        """The cell of each sequence position: ``perm [h * w]``, raster indices (an
        ordering's ``permutation(h, w)``). Learned positions go by sequence position and
        take any permutation without using it."""
        if not self.rope:
            check_permutation(perm)
            return
        perm = check_permutation(perm, self.height * self.width)  # (h*w,)
        self.cell_order.copy_(perm.to(self.cell_order.device))

    def input_cells(self, lc: int, n_image: int) -> torch.Tensor:
        """``[P + n_image, 2]`` (row, col) of the transformer inputs ``[prefix..., seq[:,
        :n_image]]``, with ``P = max(lc, 1)`` prefix tokens (``lc = 0``: the start token).

        Image token ``seq[k]`` sits at the cell of sequence position ``k``; the start or a
        class token at ``(-1, -1)``; a spatial prefix (``lc = h * w > 1``) on the cells it
        describes (in the sequence order with ``cond_fusion="both"``, else row-major); any
        other prefix along row ``-1``, its last token at ``(-1, -1)``.
        """
        hw = self.height * self.width
        if n_image > hw:
            raise ValueError(f"pos_emb='rope2d' places image tokens on the {self.height}x"
                             f"{self.width} grid, which has {hw} cells; got {n_image} tokens")
        order = self.cell_order  # (h*w,)
        image = raster_cells(order[:n_image], self.width)  # (n_image, 2)
        if lc == hw and hw > 1:
            raster = torch.arange(hw, device=order.device)  # (Lc,): as conditioners make it
            described = order if self.aligned_condition else raster  # (Lc,): cell of token j
            prefix = raster_cells(described, self.width)  # (Lc, 2)
        else:
            cols = torch.arange(-max(lc, 1), 0, device=order.device)  # (P,): ..., -2, -1
            prefix = torch.stack([torch.full_like(cols, -1), cols], dim=-1)  # (P, 2)
        return torch.cat([prefix, image])  # (P + n_image, 2)

    def _rope(self, cells: torch.Tensor | None, t: int) -> Rope | None:
        """``cos, sin`` of the ``t`` inputs at ``cells [T, 2]`` (None: learned positions)."""
        if not self.rope:
            return None
        if cells is None or cells.shape[0] != t:
            raise ValueError(f"pos_emb='rope2d': hidden() needs the (row, col) of each of its "
                             f"{t} inputs (cells [T, 2], from input_cells)")
        p = self.params
        assert isinstance(p, GPTParams)
        return rope2d_angles(cells, p.n_embd // p.n_head, p.rope_base)  # (T, 2, hs/4) each

    # -- inputs -------------------------------------------------------------
    def _prefix(self, cond: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        """The condition tokens ``[B, Lc]``, or the start token ``[B, 1]`` (always, with
        ``cond_fusion="add"``, where the condition is not part of the sequence)."""
        if cond is not None and cond.shape[-1] > 0:
            if cond.ndim != 2 or cond.shape[0] != batch_size:
                raise ValueError(
                    f"cond must be [B={batch_size}, Lc] int64, got shape {tuple(cond.shape)}"
                )
            if cond.dtype != torch.long:
                raise TypeError(f"cond must be int64 token ids, got {cond.dtype}")
            if self.cond_prefix:
                return cond
        device = self.tok_emb.weight.device
        return torch.full((batch_size, 1), self.start_id, dtype=torch.long, device=device)

    def _added(self, cond: torch.Tensor | None, length: int) -> torch.Tensor | None:
        """``cond_fusion="add"/"both"``: the condition's embeddings ``[B, 1 or L, C]``, one
        per image cell (else None)."""
        if not self.aligned_condition or cond is None or cond.shape[-1] == 0:
            return None
        lc = cond.shape[1]
        if lc != 1 and not length <= lc <= self.block_size:
            raise ValueError(
                f"cond_fusion='{self.params.cond_fusion}' takes one condition token (added "
                f"at every position) or one per image token (L={length}, at most "
                f"block_size={self.block_size}), "
                f"got Lc={lc}; a spatial condition must have the image's latent grid"
            )
        return self.tok_emb(cond[:, : max(length, 1)])  # (B, 1 or L, C): a prefix's own cells

    def _check(self, seq: torch.Tensor, prefix: torch.Tensor, *, is_cond: bool) -> None:
        """Shapes, dtypes, id ranges (one device sync) and the block size.

        ``prefix`` is the condition when ``is_cond`` (``_prefix`` returns ``cond`` itself),
        else the start token.
        """
        if seq.ndim != 2 or seq.dtype != torch.long:
            raise ValueError(f"seq must be [B, L] int64, got {tuple(seq.shape)} {seq.dtype}")
        n = prefix.shape[1] + seq.shape[1] - 1
        if not self.cond_prefix:
            n = max(seq.shape[1], 1)
        if n > self.block_size:
            raise ValueError(
                f"sequence too long for GPT block_size={self.block_size}: "
                f"{prefix.shape[1] if is_cond else 0} condition + {seq.shape[1]} image tokens "
                f"need {'max(Lc, 1) + L - 1' if self.cond_prefix else 'L'} = {n} "
                f"positions; raise block_size to at least {n}"
            )
        if self.rope and seq.shape[1] > self.height * self.width:
            raise ValueError(
                f"pos_emb='rope2d' places image tokens on the {self.height}x{self.width} grid, "
                f"which has {self.height * self.width} cells; got {seq.shape[1]} image tokens"
            )
        lo, hi = self._cond_range()
        bad_seq = ((seq < 0) | (seq >= self.vocab_size)).any()
        bad_cond = ((prefix < lo) | (prefix >= hi)).any() if is_cond else torch.zeros_like(bad_seq)
        bad_seq, bad_cond = torch.stack([bad_seq, bad_cond]).tolist()  # one device sync
        if bad_cond:
            raise ValueError(
                f"condition tokens must lie in [{lo}, {hi}) (image codes come first; the "
                f"pipeline offsets condition ids by vocab_size={self.vocab_size}), got "
                f"[{int(prefix.min())}, {int(prefix.max())}]"
            )
        if bad_seq:
            raise ValueError(
                f"image codes must lie in [0, {self.vocab_size}), got "
                f"[{int(seq.min())}, {int(seq.max())}]"
            )

    def _lc(self, prefix: torch.Tensor, cond: torch.Tensor | None) -> int:
        """How many condition tokens lead the input (0: the start token does)."""
        return prefix.shape[1] if prefix is cond else 0

    def _check_ids(self, seq: torch.Tensor, prefix: torch.Tensor,
                   cond: torch.Tensor | None) -> None:
        """:meth:`_check` of the sequence and of the condition, wherever it enters."""
        if not self.cond_prefix and cond is not None and cond.shape[-1] > 0:
            self._check(seq, cond, is_cond=True)
        else:
            self._check(seq, prefix, is_cond=prefix is cond)

    def _cond_range(self) -> tuple[int, int]:
        """Valid condition ids: their own range, or the shared table (taming's layout)."""
        if self.cond_vocab_size == 0:
            return 0, self.vocab_size
        return self.vocab_size, self.vocab_size + self.cond_vocab_size

    # -- the transformer ----------------------------------------------------
    def hidden(
        self,
        idx: torch.Tensor,
        caches: list[KVCache] | None = None,
        added: torch.Tensor | None = None,
        cells: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Transformer features ``[B, T, n_embd]`` (after ``ln_f``) of input ids ``[B, T]``.

        With ``caches`` the ids continue the positions already cached. ``added [B, 1 or T,
        C]`` is added to the input embeddings (``cond_fusion="add"``). ``cells [T, 2]``:
        the grid positions of the inputs (``pos_emb="rope2d"`` only; :meth:`input_cells`).
        """
        return self._hidden(idx, caches, added, self._rope(cells, idx.shape[1]))

    def _hidden(self, idx: torch.Tensor, caches: list[KVCache] | None,
                added: torch.Tensor | None, rope: Rope | None) -> torch.Tensor:
        """:meth:`hidden` with the inputs' rotations ``cos, sin [T, 2, hs/4]`` computed."""
        t0 = caches[0].length if caches else 0
        t = idx.shape[1]
        if t0 + t > self.block_size:
            raise ValueError(
                f"GPT block_size={self.block_size} exhausted: {t0 + t} positions requested"
            )
        if self.pos_emb is not None:
            x = self.tok_emb(idx) + self.pos_emb[:, t0 : t0 + t]  # (B, T, C)
        else:
            x = self.tok_emb(idx)  # (B, T, C): positions enter as rotations
        if added is not None:
            x = x + added  # (B, T, C)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, caches[i] if caches else None, rope)  # (B, T, C)
        return self.ln_f(x)  # (B, T, C)

    def logits(self, seq: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, L, vocab_size]``: logits ``i`` predict ``seq[:, i]`` from cond, ``seq[:, :i]``.

        Only the image positions go through the head.
        """
        b, n = seq.shape[0], seq.shape[-1]
        prefix = self._prefix(cond, b)  # (B, P)
        self._check_ids(seq, prefix, cond)
        if n == 0:
            return seq.new_zeros(b, 0, self.vocab_size, dtype=self.head.weight.dtype)
        idx = torch.cat([prefix, seq[:, :-1]], dim=1)  # (B, P + L - 1)
        added = _at_inputs(self._added(cond, n), prefix.shape[1])  # (B, P + L - 1 or 1, C)
        cells = self.input_cells(self._lc(prefix, cond), n - 1) if self.rope else None
        h = self.hidden(idx, added=added, cells=cells)  # (B, P + L - 1, C)
        return self.head(h[:, prefix.shape[1] - 1 :])  # (B, L, V): image positions only

    # -- incremental decoding -------------------------------------------------
    @torch.no_grad()
    def start(self, cond: torch.Tensor | None, batch_size: int) -> GPTState:
        """Consume the condition (or the start token) into fresh KV caches."""
        prefix = self._prefix(cond, batch_size)  # (B, P)
        self._check_ids(prefix.new_zeros(batch_size, 1), prefix, cond)
        caches = [KVCache(self.block_size) for _ in self.blocks]
        added = None
        if self.aligned_condition and cond is not None and cond.shape[-1] > 0:
            added = self.tok_emb(cond)  # (B, 1 or L, C); L is checked as decoding goes
        p = prefix.shape[1]
        first = None if added is None else _at_inputs(added, p)[:, :p]  # (B, P or 1, C)
        state = GPTState(caches, None, batch_size, added)
        state.offset = p - 1  # the input position of image cell 0
        if self.rope:  # every input's (row, col) and rotation, image cells 0 .. h*w - 2 too
            state.cells = self.input_cells(self._lc(prefix, cond), self.height * self.width - 1)
            state.rope = self._rope(state.cells, state.cells.shape[0])  # (P + h*w - 1, 2, n)
        h = self._hidden(prefix, caches, first, _rows(state.rope, 0, p))  # (B, P, C)
        state.pending = self.head(h[:, -1])  # (B, V)
        return state

    @torch.no_grad()
    def step(self, state: GPTState, token: torch.Tensor | None) -> tuple[torch.Tensor, GPTState]:
        """Feed the previous image token ``[B]`` (``None`` first); next logits ``[B, V]``.

        The state is updated in place and returned.
        """
        if token is None:
            if state.pending is None:
                raise ValueError("step(state, None) is only for the first call after start()")
            logits, state.pending = state.pending, None
            return logits, state
        if state.pending is not None:
            raise ValueError("the first step() after start() takes token=None")
        token = token.reshape(state.batch_size, 1)  # (B, 1)
        added = state.added
        if added is not None and added.shape[1] > 1:
            cell = state.caches[0].length - state.offset  # the image cell this input predicts
            if cell >= added.shape[1]:
                raise ValueError(f"the aligned condition has {added.shape[1]} tokens; "
                                 f"cannot decode image token {cell}")
            added = added[:, cell : cell + 1]  # (B, 1, C)
        t0 = state.caches[0].length  # the input position of this token
        if state.cells is not None and t0 >= state.cells.shape[0]:
            raise ValueError(f"pos_emb='rope2d': the {self.height}x{self.width} grid has "
                             f"{self.height * self.width} cells, all decoded")
        h = self._hidden(token, state.caches, added, _rows(state.rope, t0, t0 + 1))  # (B, 1, C)
        return self.head(h[:, -1]), state  # (B, V)
