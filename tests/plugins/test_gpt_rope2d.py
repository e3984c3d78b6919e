"""GPT with 2-D rotary positions (``pos_emb="rope2d"``), and the learned default unchanged."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
from einops import rearrange

import vqgen
from vqgen.core.attention import xformers_available
from vqgen.core.config import parse_config
from vqgen.core.interfaces import Sizes
from vqgen.core.pipeline import align_condition
from vqgen.core.positions import (
    GridPositions,
    check_permutation,
    raster_cells,
    rope2d,
    rope2d_angles,
    rope_frequencies,
)
from vqgen.core.registry import ComponentError
from vqgen.plugins.gpt import GPT, CausalSelfAttention

from .test_gpt import decode_all

pytestmark = pytest.mark.usefixtures("one_thread")

V, CV, B, H, W = 16, 5, 2, 3, 4
L = H * W


def rope_gpt(**kw: Any) -> GPT:
    torch.manual_seed(0)
    args: dict[str, Any] = dict(vocab_size=V, cond_vocab_size=CV, block_size=2 * L,
                                n_layer=2, n_head=2, n_embd=32, pos_emb="rope2d",
                                height=H, width=W)
    return GPT(**{**args, **kw}).eval()


def orders() -> dict[str, torch.Tensor]:
    """Cell orders of the 3×4 grid: raster, a spiral from the centre, a random one."""
    return {
        "row_major": torch.arange(L),
        "spiral_out": vqgen.create("ordering", "spiral_out").permutation(H, W),
        "random": torch.randperm(L, generator=torch.Generator().manual_seed(3)),
    }


# -----------------------------------------------------------------------------
# (1) the score depends on the offset between the cells only


def _score(attn: CausalSelfAttention, x: torch.Tensor, q_cell: tuple[int, int],
           k_cell: tuple[int, int]) -> torch.Tensor:
    """``q·k`` per head of the layer's query of token 1 at ``q_cell`` and key of token 0
    at ``k_cell`` (``x [1, 2, C]``), rotated as the layer rotates them."""
    q = rearrange(attn.query(x), "b t (nh hs) -> b nh t hs", nh=attn.n_head)  # (1, nh, 2, hs)
    k = rearrange(attn.key(x), "b t (nh hs) -> b nh t hs", nh=attn.n_head)  # (1, nh, 2, hs)
    cells = torch.tensor([k_cell, q_cell])  # (2, 2): token 0, token 1
    q, k = rope2d(q, cells), rope2d(k, cells)  # (1, nh, 2, hs) each
    return (q[:, :, 1] * k[:, :, 0]).sum(-1)  # (1, nh)


def test_rope2d_attention_sees_only_the_offset_between_cells() -> None:
    torch.manual_seed(0)
    attn = CausalSelfAttention(32, 2, 0.0, 0.0, "math").double().eval()
    x = torch.randn(1, 2, 32, dtype=torch.float64)  # (1, 2, C)
    base = _score(attn, x, (2, 5), (0, 1))
    for dr, dc in [(1, 0), (0, 1), (3, -2), (-7, 11), (40, 25)]:
        both = _score(attn, x, (2 + dr, 5 + dc), (0 + dr, 1 + dc))
        torch.testing.assert_close(both, base, atol=1e-12, rtol=1e-12)
        only_q = _score(attn, x, (2 + dr, 5 + dc), (0, 1))  # one cell moves: it changes
        only_k = _score(attn, x, (2, 5), (0 + dr, 1 + dc))
        assert (only_q - base).abs().max() > 1e-4 and (only_k - base).abs().max() > 1e-4
    # each axis counts on its own: a row offset is not a column offset
    assert (_score(attn, x, (3, 5), (0, 1)) - _score(attn, x, (2, 6), (0, 1))).abs().max() > 1e-4


def test_rope2d_layer_output_is_invariant_to_a_common_shift() -> None:
    """The whole causal layer (rotation of queries and keys inside forward): moving every
    token by the same (dr, dc) changes nothing; moving one token does."""
    torch.manual_seed(0)
    attn = CausalSelfAttention(32, 4, 0.0, 0.0, "math").double().eval()
    x = torch.randn(2, 6, 32, dtype=torch.float64)  # (B, T, C)
    cells = torch.tensor([[-1, -1], [0, 0], [0, 1], [2, 3], [1, 0], [2, 1]])  # (T, 2)

    def out(c: torch.Tensor) -> torch.Tensor:
        return attn(x, rope=rope2d_angles(c, 8, dtype=torch.float64))  # (B, T, C)

    ref = out(cells)
    torch.testing.assert_close(out(cells + torch.tensor([5, -3])), ref, atol=1e-12, rtol=1e-12)
    one = cells.clone()
    one[0] = torch.tensor([-1, 0])  # the first key moves: every later query sees it differently
    assert (out(one)[:, 1:] - ref[:, 1:]).abs().min(dim=-1).values.min() > 0
    assert not torch.allclose(out(cells.flip(0)), ref)


def test_rope_frequencies_and_angles() -> None:
    theta = rope_frequencies(8)  # (4,)
    torch.testing.assert_close(theta, torch.tensor([1.0, 10000 ** -0.25, 10000 ** -0.5,
                                                    10000 ** -0.75]))
    cos, sin = rope2d_angles(torch.tensor([[2, 3]]), 16)  # (1, 2, 4)
    torch.testing.assert_close(torch.atan2(sin[0, 0, 0], cos[0, 0, 0]), torch.tensor(2.0))
    torch.testing.assert_close(torch.atan2(sin[0, 1, 0], cos[0, 1, 0]), torch.tensor(3.0))
    x = torch.randn(1, 1, 3, 16)
    torch.testing.assert_close(rope2d(x, torch.zeros(3, 2, dtype=torch.long)), x)  # (0, 0)
    torch.testing.assert_close(rope2d(x, torch.tensor([[1, 2], [3, 4], [-5, 6]])).norm(dim=-1),
                               x.norm(dim=-1))  # a rotation
    with pytest.raises(ValueError, match="divisible by 4"):
        rope2d_angles(torch.zeros(1, 2), 6)


# -----------------------------------------------------------------------------
# (2) KV-cached decoding equals the full forward, in any cell order


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("order", ["row_major", "spiral_out", "random"])
@pytest.mark.parametrize(("fusion", "lc"), [("prefix", None), ("prefix", 1), ("prefix", L),
                                            ("both", L), ("add", L), ("prefix", 3)])
def test_kv_cache_equals_full_forward(backend: str, order: str, fusion: str,
                                      lc: int | None) -> None:
    m = rope_gpt(attention=backend, cond_fusion=fusion)
    m.set_cell_order(orders()[order])
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(0, V, (B, L), generator=g)  # (B, L)
    cond = None if lc is None else torch.randint(V, V + CV, (B, lc), generator=g)  # (B, Lc)
    full = m.logits(seq, cond)  # (B, L, V)
    torch.testing.assert_close(decode_all(m, seq, cond), full, atol=1e-5, rtol=1e-5)
    # a prefix of the sequence keeps its cells (the sliding window feeds prefixes)
    torch.testing.assert_close(m.logits(seq[:, :5], cond), full[:, :5], atol=1e-6, rtol=0)
    if order != "row_major":  # the order is used: the same tokens elsewhere predict otherwise
        m.set_cell_order(torch.arange(L))
        assert not torch.allclose(m.logits(seq, cond), full, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["sdpa", "xformers"])
def test_kv_cache_equals_full_forward_on_cuda_in_bf16(backend: str) -> None:
    """On the GPU, under bf16 autocast (rotations computed in float32), xformers included."""
    if backend == "xformers" and not xformers_available():
        pytest.skip("xformers is not installed or does not run on this GPU")
    m = rope_gpt(attention=backend, cond_fusion="both").cuda()
    m.set_cell_order(orders()["spiral_out"])
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(0, V, (B, L), generator=g).cuda()  # (B, L)
    cond = torch.randint(V, V + CV, (B, L), generator=g).cuda()  # (B, Lc)
    ref = m.logits(seq, cond)  # (B, L, V) float32
    with torch.autocast("cuda", dtype=torch.bfloat16):
        full = m.logits(seq, cond).float()  # (B, L, V)
        torch.testing.assert_close(decode_all(m, seq, cond).float(), full, atol=2e-2, rtol=0)
    torch.testing.assert_close(full, ref, atol=5e-2, rtol=0)


def test_decoding_stops_at_the_grid_and_generate_runs() -> None:
    m = rope_gpt()
    m.set_cell_order(orders()["random"])
    drawn = m.generate(torch.full((B, 1), V), L, generator=torch.Generator().manual_seed(0))
    assert drawn.shape == (B, L) and int(drawn.max()) < V
    state = m.start(None, B)
    m.step(state, None)
    for _ in range(L - 1):
        m.step(state, torch.zeros(B, dtype=torch.long))
    with pytest.raises(ValueError, match="3x4 grid has 12 cells"):
        m.step(state, torch.zeros(B, dtype=torch.long))
    with pytest.raises(ValueError, match="3x4 grid, which has 12 cells"):
        m.logits(torch.zeros(1, L + 1, dtype=torch.long))


# -----------------------------------------------------------------------------
# (3) positions of the inputs


def test_aligned_condition_tokens_sit_on_the_cells_they_describe() -> None:
    """``cond_fusion="both"``: the pipeline hands the spatial condition over in the prior's
    order; the prefix token that describes cell (i, j) is rotated exactly as that cell,
    and as the image token of that cell."""
    ordering = vqgen.create("ordering", "spiral_out")
    perm = ordering.permutation(H, W)  # (L,)
    m = rope_gpt(cond_fusion="both")
    assert isinstance(m, GridPositions)
    m.set_cell_order(perm)
    where = torch.arange(L).reshape(1, H, W)  # (1, H, W): each cell's raster index
    described = align_condition(where.reshape(1, L), ordering, (H, W))[0]  # (L,): prefix order
    cells = m.input_cells(L, L - 1)  # (L + L - 1, 2)
    assert cells.shape == (2 * L - 1, 2)
    torch.testing.assert_close(cells[:L], raster_cells(described, W))  # prefix token t
    torch.testing.assert_close(cells[L:], raster_cells(perm[: L - 1], W))  # holds seq[k]
    # the rotations the decoder uses (state.rope) agree cell by cell
    state = m.start(torch.full((1, L), V), 1)
    assert state.cells is not None and state.rope is not None
    torch.testing.assert_close(state.cells, cells)
    cos, sin = state.rope  # (2L - 1, 2, hs/4) each
    ref_cos, ref_sin = rope2d_angles(cells, 16)
    torch.testing.assert_close(cos, ref_cos)
    torch.testing.assert_close(sin, ref_sin)
    for k in range(L - 1):  # image input holding seq[k] vs the prefix token of its cell
        t = int((described == perm[k]).nonzero())
        assert torch.equal(cos[L + k], cos[t]) and torch.equal(sin[L + k], sin[t]), k
    # prefix fusion: the condition comes row-major from the conditioner
    m = rope_gpt(cond_fusion="prefix")
    m.set_cell_order(perm)
    torch.testing.assert_close(m.input_cells(L, 0), raster_cells(torch.arange(L), W))


def test_start_and_class_tokens_sit_off_the_grid() -> None:
    m = rope_gpt()
    m.set_cell_order(orders()["random"])
    grid = raster_cells(torch.arange(L), W)  # (L, 2)
    for lc in (0, 1):  # the start token, a class token
        cells = m.input_cells(lc, L - 1)  # (L, 2)
        assert cells[0].tolist() == [-1, -1]
        assert not (grid == cells[0]).all(-1).any()  # no image cell shares it
    # any other prefix lies along row -1, the token predicting seq[0] at (-1, -1)
    assert m.input_cells(3, 0).tolist() == [[-1, -3], [-1, -2], [-1, -1]]
    # taming's shared table: feeding the start id as a class id is the unconditional input
    m = rope_gpt(cond_vocab_size=0, start_token=3)
    seq = torch.randint(0, V, (B, L))
    torch.testing.assert_close(m.logits(seq), m.logits(seq, torch.full((B, 1), 3)),
                               atol=0, rtol=0)


# -----------------------------------------------------------------------------
# (4) the learned default is what it was (golden values computed before rope2d existed)

GOLDEN_KEYS = ["pos_emb", "tok_emb.weight"] + [
    f"blocks.{i}.{name}" for i in range(2) for name in (
        "ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias", "attn.key.weight", "attn.key.bias",
        "attn.query.weight", "attn.query.bias", "attn.value.weight", "attn.value.bias",
        "attn.proj.weight", "attn.proj.bias", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight",
        "mlp.2.bias")
] + ["ln_f.weight", "ln_f.bias", "head.weight"]
# (sum, sum of squares, logits[0, -1, 0]) of the logits: no condition, a class, 10 map tokens
GOLDEN_LOGITS = {
    "prefix": [(-3.9689920735545456, 4.760776715122418, -0.050087641924619675),
               (-4.136302000479191, 4.72092352217984, -0.05029325187206268),
               (-2.4150003752001794, 4.28875322782198, -0.012276102788746357)],
    "both": [(-3.9689920735545456, 4.760776715122418, -0.050087641924619675),
             (-4.204236824050895, 4.655562395124891, -0.04708893224596977),
             (-2.5868355294223875, 4.283942667628165, 0.0156160369515419)],
}


@pytest.mark.parametrize("fusion", ["prefix", "both"])
def test_learned_default_is_unchanged(fusion: str) -> None:
    torch.manual_seed(0)
    m = GPT(vocab_size=16, cond_vocab_size=5, block_size=32, n_layer=2, n_head=2, n_embd=32,
            cond_fusion=fusion).eval()  # type: ignore[arg-type]
    assert torch.rand(1).item() == 0.9484032392501831  # the same draws at construction
    assert m.params.pos_emb == "learned"
    assert isinstance(m.pos_emb, torch.nn.Parameter) and m.pos_emb.shape == (1, 32, 32)
    sd = m.state_dict()
    assert list(sd) == GOLDEN_KEYS
    assert list(dict(m.named_buffers())) == []
    total = sum(float(v.double().sum()) for v in sd.values())
    squares = sum(float((v.double() ** 2).sum()) for v in sd.values())
    assert (total, squares) == pytest.approx((157.1304092803437, 170.25684995587886), abs=1e-9)
    with torch.no_grad():  # a non-zero table, so that a lost position term shows
        m.pos_emb.copy_(0.1 * torch.randn(1, 32, 32, generator=torch.Generator().manual_seed(2)))
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(0, 16, (2, 10), generator=g)
    cls = torch.randint(16, 21, (2, 1), generator=g)
    spatial = torch.randint(16, 21, (2, 10), generator=g)
    m.set_cell_order(torch.randperm(10))  # learned positions ignore the cell order
    for cond, (s, s2, first) in zip((None, cls, spatial), GOLDEN_LOGITS[fusion], strict=True):
        with torch.no_grad():
            lg = m.logits(seq, cond).double()  # (2, 10, 16)
        assert (float(lg.sum()), float((lg**2).sum()), float(lg[0, -1, 0])) == pytest.approx(
            (s, s2, first), abs=1e-6)


def test_rope2d_has_no_table_and_the_learned_keys_otherwise() -> None:
    m = rope_gpt(n_layer=2, block_size=32, cond_fusion="prefix")
    assert m.pos_emb is None
    assert list(m.state_dict()) == [k for k in GOLDEN_KEYS if k != "pos_emb"]
    assert m.num_params() == m.num_params(non_embedding=False) - m.tok_emb.weight.numel()
    m.load_state_dict(rope_gpt(n_layer=2, block_size=32).state_dict())  # strict


# -----------------------------------------------------------------------------
# params and wiring


def test_params_refuse_a_head_size_not_divisible_by_4() -> None:
    with pytest.raises(ComponentError, match=r"n_embd / n_head = 36 / 6 = 6 divisible by 4"):
        vqgen.create("prior", "gpt", {"n_embd": 36, "n_head": 6, "pos_emb": "rope2d"})
    vqgen.create("prior", "gpt", {"n_embd": 36, "n_head": 6, "vocab_size": 8, "block_size": 8})
    with pytest.raises(vqgen.VqgenError, match="height, width are 'auto'"):
        GPT(vocab_size=V, block_size=L, n_embd=32, n_head=2, pos_emb="rope2d")
    with pytest.raises(ComponentError, match="rope_base"):
        vqgen.create("prior", "gpt", {"rope_base": 1.0})
    m = rope_gpt()
    with pytest.raises(ValueError, match="must have 12 entries"):
        m.set_cell_order(torch.arange(11))
    with pytest.raises(ValueError, match="not a permutation"):
        m.set_cell_order(torch.zeros(L, dtype=torch.long))
    assert torch.equal(check_permutation(torch.tensor([1, 0, 2], dtype=torch.int32)),
                       torch.tensor([1, 0, 2]))


def test_the_grid_is_wired_from_the_data(test_registry: vqgen.Registry) -> None:
    def config(**prior: Any) -> Any:
        return parse_config({
            "data": {"name": "shapes", "params": {"resolution": 32}},
            "tokenizer": {"name": "stub_tokenizer"},  # f = 4: an 8×8 grid
            "prior": {"name": "gpt", "params": {"n_layer": 1, "n_head": 2, "n_embd": 16,
                                                **prior}},
        }, registry=test_registry)

    params = config(pos_emb="rope2d").prior.params
    assert (params["height"], params["width"], params["block_size"]) == (8, 8, 64)
    assert config().prior.params["height"] == 8  # learned: filled in too, and unused
    with pytest.raises(Exception, match=r"prior.params.width.*data's latent grid is 8x8"):
        config(pos_emb="rope2d", width=7)
    fields = GPT.Params(vocab_size=V, block_size=L).model_dump()
    unknown = Sizes(vocab_size=V)  # the data names no resolution
    assert GPT.wire(fields, unknown)["height"] == "auto"  # learned needs no grid
    with pytest.raises(ValueError, match="height: 'auto' needs the latent grid"):
        GPT.wire({**fields, "pos_emb": "rope2d"}, unknown)
    given = GPT.wire({**fields, "pos_emb": "rope2d", "height": 3, "width": 4}, unknown)
    assert (given["height"], given["width"]) == (3, 4)


# -----------------------------------------------------------------------------
# (5) it learns


def test_a_tiny_rope2d_gpt_learns_to_copy_the_row_above() -> None:
    """Row 0 of a 4×4 grid is random, every other row copies the one above: a relative
    offset of (-1, 0), which rotary positions give directly. Chance is ln 16 = 2.77
    nats; the best possible is 4/16 · ln 16 = 0.69 (row 0 cannot be predicted)."""
    torch.manual_seed(0)
    m = GPT(vocab_size=V, block_size=16, n_layer=2, n_head=2, n_embd=32, pos_emb="rope2d",
            height=4, width=4)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    t0, losses = time.perf_counter(), []
    for _ in range(120):
        row = torch.randint(0, V, (32, 1, 4), generator=g)  # (32, 1, 4)
        seq = row.expand(-1, 4, -1).reshape(32, 16)  # (32, 16)
        loss = m(seq)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert first > 2.5 and last < 1.2, (first, last, time.perf_counter() - t0)
