"""PixelSNAIL prior: exact causality, step equals the full forward, conditioning."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import vqgen
from vqgen.core.interfaces import signature_problems
from vqgen.core.registry import ComponentError
from vqgen.plugins.pixelsnail import CausalConv2d, PixelSNAIL

H, W, V, CV, B = 3, 4, 8, 3, 2
L = H * W

VARIANTS = {
    "uncond": {},
    "class": {"cond_vocab_size": CV},
    "spatial": {"cond_vocab_size": CV, "cond_spatial": True},
    "no_attention": {"use_attention": False},
    "kernel5": {"kernel_size": 5, "cond_vocab_size": CV, "cond_spatial": True},
}


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    """Tiny models run faster, and steadier on a busy machine, on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(**kw: Any) -> PixelSNAIL:
    torch.manual_seed(0)
    args: dict[str, Any] = dict(
        height=H, width=W, vocab_size=V, channels=16, n_blocks=2, n_res_blocks=1, n_head=2,
        n_cond_res_blocks=1, dropout=0.0,
    )  # fmt: skip
    return PixelSNAIL(**{**args, **kw}).eval()


def data(m: PixelSNAIL, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, V, (B, L), generator=g)  # (B, L)
    if not m.cond_vocab_size:
        return seq, None
    lc = L if m.cond_spatial else 1
    return seq, torch.randint(V, V + CV, (B, lc), generator=g)  # (B, Lc)


def decode_all(m: PixelSNAIL, seq: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
    state, token, out = m.start(cond, seq.shape[0]), None, []
    for i in range(seq.shape[1]):
        logits, state = m.step(state, token)  # (B, V)
        out.append(logits)
        token = seq[:, i]
    return torch.stack(out, dim=1)  # (B, L, V)


def test_constructor_and_registry() -> None:
    assert signature_problems(PixelSNAIL) == []
    assert PixelSNAIL.__doc__
    reg = vqgen.default_registry().copy()
    if "pixelsnail" not in reg.list("prior"):
        reg.add("prior", "pixelsnail", PixelSNAIL)
    m = reg.create("prior", "pixelsnail", {"height": 4, "width": 4, "vocab_size": 8,
                                           "channels": 32})
    assert isinstance(m, PixelSNAIL) and m.params.channels == 32
    assert (m.params.cond_vocab_size, m.params.cond_spatial) == (0, False)  # built alone
    with pytest.raises(ComponentError, match="kernel_size must be odd"):
        reg.create("prior", "pixelsnail", {"kernel_size": 4})
    with pytest.raises(ComponentError, match="cond_spatial=True needs cond_vocab_size"):
        reg.create("prior", "pixelsnail", {"cond_spatial": True, "cond_vocab_size": 0})
    with pytest.raises(vqgen.VqgenError, match="height, width, vocab_size are 'auto'"):
        reg.create("prior", "pixelsnail", {})  # sizes that a config would wire


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("k", [3, 5])
def test_causal_conv_receptive_field(strict: bool, k: int) -> None:
    torch.manual_seed(0)
    conv = CausalConv2d(1, 1, k, strict=strict)
    x = torch.zeros(1, 1, 7, 7, requires_grad=True)
    conv(x)[0, 0, 3, 3].backward()
    seen = x.grad[0, 0] != 0  # type: ignore[index]
    n = k // 2
    want = torch.zeros(7, 7, dtype=torch.bool)
    want[3 - n : 3, 3 - n : 3 + n + 1] = True  # rows above
    want[3, 3 - n : 3 if strict else 4] = True  # this row
    assert torch.equal(seen, want)


@pytest.mark.parametrize("variant", VARIANTS)
def test_causal(variant: str) -> None:
    """Changing seq[:, j] leaves the logits at positions <= j exactly unchanged."""
    m = tiny(**VARIANTS[variant])
    seq, cond = data(m)
    full = m.logits(seq, cond)
    assert full.shape == (B, L, V)
    for j in range(L):
        changed = seq.clone()
        changed[:, j] = (changed[:, j] + 1) % V
        out = m.logits(changed, cond)
        assert torch.equal(out[:, : j + 1], full[:, : j + 1]), j
        if j < L - 1 and m.params.use_attention:  # attention sees every earlier position
            assert not torch.allclose(out[:, j + 1 :], full[:, j + 1 :]), j


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_step_equals_full_forward(variant: str, backend: str) -> None:
    m = tiny(attention=backend, **VARIANTS[variant])
    seq, cond = data(m)
    full = m.logits(seq, cond)  # (B, L, V)
    steps = decode_all(m, seq, cond)  # (B, L, V)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(steps.softmax(-1), full.softmax(-1), atol=1e-6, rtol=0)


def test_conditioning_changes_outputs() -> None:
    for variant in ("class", "spatial"):
        m = tiny(**VARIANTS[variant])
        seq, cond = data(m)
        assert cond is not None
        other = V + (cond - V + 1) % CV
        a, b = m.logits(seq, cond), m.logits(seq, other)
        assert not torch.allclose(a[:, 0], b[:, 0]), variant  # even the first position
    # a spatial condition is local: a change at one cell changes nearby predictions
    m = tiny(**VARIANTS["spatial"])
    seq, cond = data(m)
    assert cond is not None
    changed = cond.clone()
    changed[:, -1] = V + (changed[:, -1] - V + 1) % CV
    a, b = m.logits(seq, cond), m.logits(seq, changed)
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_bad_inputs_are_clear_errors() -> None:
    m = tiny(**VARIANTS["class"])
    seq, cond = data(m)
    with pytest.raises(ValueError, match=r"seq must be \[B, 12\]"):
        m.logits(seq[:, :-1], cond)
    with pytest.raises(ValueError, match=r"conditioned on one token.*\[B=2, 1\]"):
        m.logits(seq, None)
    with pytest.raises(ValueError, match=r"conditioned on one token"):
        m.logits(seq, torch.full((B, L), V))
    with pytest.raises(ValueError, match=r"condition tokens must lie in \[8, 11\)"):
        m.logits(seq, torch.zeros(B, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"image codes must lie in \[0, 8\)"):
        m.logits(seq + V, cond)
    with pytest.raises(ValueError, match="unconditional"):
        tiny().logits(seq, cond)
    with pytest.raises(ValueError, match=r"a 3x4 token map"):
        tiny(**VARIANTS["spatial"]).logits(seq, cond)
    state = m.start(cond, B)
    with pytest.raises(ValueError, match="first step"):
        m.step(state, seq[:, 0])


def test_generate() -> None:
    m = tiny(**VARIANTS["class"]).train()
    _, cond = data(m)
    a = m.generate(cond, generator=torch.Generator().manual_seed(0))
    b = m.generate(cond, generator=torch.Generator().manual_seed(0))
    assert a.shape == (B, L) and a.dtype == torch.long and torch.equal(a, b)
    assert int(a.min()) >= 0 and int(a.max()) < V
    assert m.training


def test_overfits_a_tiny_batch() -> None:
    m = tiny(**VARIANTS["class"]).train()
    seq, _ = data(m, seed=2)
    cond = torch.arange(V, V + B)[:, None]  # one class per sequence
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = float(m(seq, cond).detach())
    for _ in range(50):
        loss = m(seq, cond)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.2 * first, (first, float(loss.detach()))
