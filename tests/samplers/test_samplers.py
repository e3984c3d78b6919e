"""Built-in samplers: temperature, top_k (incl. mixed k), top_p (nucleus), chain."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import vqgen
from vqgen.core.interfaces import signature_problems
from vqgen.core.registry import ComponentError
from vqgen.samplers import Chain, Temperature, TopK, TopP, k_per_row
from vqgen.samplers.top_p import TOP_P_TOLERANCE

NAMES = ["chain", "temperature", "top_k", "top_p"]


def make(name: str, **params):
    return vqgen.default_registry().create("sampler", name, params)


def finite_count(warped: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(warped).sum(dim=-1)  # (B,)


def chi2_sf(stat: float, df: int) -> float:
    """P(X >= stat) for X ~ chi-square(df).

    scipy happens to be importable here (lpips pulls it in) but vqgen does not declare
    it, so the p-value is computed with torch: chi2.sf(x, df) = Q(df / 2, x / 2), the
    regularised upper incomplete gamma function, torch.special.gammaincc.
    """
    a = torch.tensor(df / 2, dtype=torch.float64)
    x = torch.tensor(stat / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(a, x))


def test_chi2_sf_matches_known_values():
    # chi-square critical values at alpha = 0.001 (standard tables)
    for df, crit in [(1, 10.828), (3, 16.266), (5, 20.515), (9, 27.877)]:
        assert chi2_sf(crit, df) == pytest.approx(0.001, rel=1e-3)
    scipy_stats = pytest.importorskip("scipy.stats")
    assert chi2_sf(7.3, 4) == pytest.approx(scipy_stats.chi2.sf(7.3, 4), rel=1e-9)


# -- registration ---------------------------------------------------------------


def test_registered_and_constructor_matches_params():
    reg = vqgen.default_registry()
    assert set(NAMES) <= set(reg.list("sampler"))
    for name in NAMES:
        cls = reg.get("sampler", name).cls
        assert signature_problems(cls) == []
        sampler = reg.create("sampler", name)  # every field has a default
        assert isinstance(sampler, vqgen.Sampler)
        assert reg.name_of(sampler) == ("sampler", name)


# -- temperature ----------------------------------------------------------------


@pytest.mark.parametrize("t", [0.3, 1.0, 2.5])
def test_temperature_divides_exactly(t):
    logits = torch.randn(4, 33, generator=torch.Generator().manual_seed(0))
    warped = make("temperature", temperature=t).warp(logits)
    assert torch.equal(warped, logits / t)


def test_half_precision_logits_are_upcast():
    logits = torch.randn(3, 50).to(torch.bfloat16)
    for sampler in (Temperature(0.7), TopK(k=5), TopP(p=0.5, top_k=10)):
        warped = sampler.warp(logits)
        assert warped.dtype == torch.float32 and warped.shape == (3, 50)
        assert sampler.sample(logits, torch.Generator().manual_seed(0)).dtype == torch.int64


# -- top-k ----------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 5),
    vocab=st.integers(1, 40),
    k=st.integers(1, 50),
    levels=st.integers(1, 4),  # few distinct values: many ties, also at the boundary
    seed=st.integers(0, 2**16),
    temperature=st.sampled_from([0.5, 1.0, 3.0]),
)
def test_top_k_keeps_exactly_the_k_largest(rows, vocab, k, levels, seed, temperature):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(0, levels, (rows, vocab), generator=g).float()  # (B, V)
    warped = make("top_k", k=k, temperature=temperature).warp(logits)
    kept = torch.isfinite(warped)  # (B, V)
    assert (kept.sum(dim=-1) == min(k, vocab)).all()
    assert torch.equal(warped[kept], (logits / temperature)[kept])
    for b in range(rows):
        lo = logits[b][kept[b]].min()
        dropped = logits[b][~kept[b]]
        assert (dropped <= lo).all()  # no dropped logit beats a kept one


def test_top_k_all_ties():
    warped = make("top_k", k=3).warp(torch.zeros(2, 10))
    assert finite_count(warped).tolist() == [3, 3]


def test_top_k_larger_than_vocab_keeps_everything():
    logits = torch.randn(2, 7)
    assert torch.equal(make("top_k", k=100).warp(logits), logits)


@pytest.mark.parametrize(
    ("ks", "batch", "expected"),
    [
        ([1, 2, 3], 6, [1, 1, 2, 2, 3, 3]),
        ([1, 2, 3], 4, [1, 1, 2, 3]),  # b * 3 // 4 = 0, 0, 1, 2
        ([1, 2, 3], 1, [1]),
        ([4, 2], 5, [4, 4, 4, 2, 2]),  # b * 2 // 5 = 0, 0, 0, 1, 1
        ([7], 3, [7, 7, 7]),
    ],
)
def test_mixed_k_assigns_documented_k_per_row(ks, batch, expected):
    assert k_per_row(ks, batch) == expected
    logits = torch.randn(batch, 20, generator=torch.Generator().manual_seed(1))
    warped = make("top_k", k=ks).warp(logits)
    assert finite_count(warped).tolist() == expected
    for b, kb in enumerate(expected):
        top = torch.topk(logits[b], kb).indices
        assert torch.isfinite(warped[b, top]).all()


def test_mixed_k_with_ties():
    warped = make("top_k", k=[2, 5]).warp(torch.zeros(4, 8))
    assert finite_count(warped).tolist() == [2, 2, 5, 5]


# -- top-p ----------------------------------------------------------------------

PROBS = torch.tensor([[0.5, 0.3, 0.15, 0.05]])


@pytest.mark.parametrize(
    ("p", "n_kept"),
    [(1e-9, 1), (0.3, 1), (0.5, 1), (0.51, 2), (0.8, 2), (0.81, 3), (0.95, 3), (0.96, 4), (1.0, 4)],
)
def test_nucleus_hand_computed(p, n_kept):
    order = [2, 0, 3, 1]  # the same distribution shuffled: the set is by probability
    logits = PROBS.log()[:, order]  # (1, 4)
    warped = make("top_p", p=p).warp(logits)
    kept = torch.isfinite(warped)[0]
    expected = torch.zeros(4, dtype=torch.bool)
    expected[torch.argsort(PROBS[0, order], descending=True)[:n_kept]] = True
    assert torch.equal(kept, expected)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 4),
    vocab=st.integers(1, 30),
    p=st.floats(1e-6, 1.0),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([0.1, 1.0, 5.0]),
)
def test_nucleus_is_minimal_and_never_empty(rows, vocab, p, seed, scale):
    logits = scale * torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed))
    warped = make("top_p", p=p).warp(logits)
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    for b in range(rows):
        kept = torch.isfinite(warped[b])
        assert kept.any()
        if kept.all() and p == 1.0:
            continue
        mass = probs[b][kept].sum()
        smallest = probs[b][kept].min()
        # reaches p (up to the documented rounding tolerance and float32 sums) ...
        assert mass >= p - TOP_P_TOLERANCE - 1e-5 or kept.all()
        # ... and is minimal: without its least likely id it falls short of p
        assert mass - smallest < p + 1e-5
        # ... and holds the most likely ids
        if not kept.all():
            assert smallest >= probs[b][~kept].max()


def test_nucleus_uses_temperature_first():
    logits = PROBS.log()  # (1, 4)
    # at T = 1, p = 0.8 keeps two ids; a hot temperature flattens the distribution
    assert finite_count(make("top_p", p=0.8).warp(logits)).item() == 2
    assert finite_count(make("top_p", p=0.8, temperature=10.0).warp(logits)).item() == 4
    warped = make("top_p", p=0.8, temperature=10.0).warp(logits)
    assert torch.equal(warped, logits / 10.0)


def test_top_k_then_top_p():
    logits = PROBS.log()  # (1, 4)
    # with top_k=2 the nucleus is computed over [0.625, 0.375]: p = 0.6 keeps one id
    warped = make("top_p", p=0.6, top_k=2).warp(logits)
    assert torch.isfinite(warped).tolist() == [[True, False, False, False]]
    # p = 0.9 keeps both, never more than top_k
    assert finite_count(make("top_p", p=0.9, top_k=2).warp(logits)).item() == 2
    assert finite_count(make("top_p", p=1.0, top_k=3).warp(logits)).item() == 3


# -- chain ----------------------------------------------------------------------


@pytest.mark.parametrize(("k", "p", "t"), [(5, 0.7, 1.0), (2, 0.95, 0.8), (50, 0.3, 1.7)])
def test_chain_top_k_then_top_p_equals_top_p_with_top_k(k, p, t):
    logits = 2 * torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    chain = make(
        "chain",
        steps=[
            {"name": "top_k", "params": {"k": k, "temperature": t}},
            {"name": "top_p", "params": {"p": p}},
        ],
    )
    assert [type(s) for s in chain.steps] == [TopK, TopP]
    assert torch.equal(chain.warp(logits), make("top_p", p=p, top_k=k, temperature=t).warp(logits))


def test_empty_chain_is_identity_and_params_round_trip():
    logits = torch.randn(2, 9)
    assert torch.equal(make("chain").warp(logits), logits)
    spec = {"steps": [{"name": "temperature", "params": {"temperature": 0.5}}]}
    chain = make("chain", **spec)
    assert chain.params.model_dump() == spec
    assert isinstance(Chain(**chain.params.model_dump()).steps[0], Temperature)


@pytest.mark.parametrize(
    ("steps", "match"),
    [
        ([{"name": "chain"}], "chains do not nest"),
        ([{"name": "rejection", "params": {}}], "rejection"),
        ([{"name": "top_q"}], r"params\.steps\.0 \('top_q'\).*did you mean"),
        ([{"name": "top_k"}, {"name": "top_k", "params": {"k": 0}}], r"params\.steps\.1"),
        ([{"name": "top_k", "extra": 1}], "extra"),
        ([{"params": {}}], "name"),
    ],
)
def test_chain_rejects_bad_steps(steps, match):
    with pytest.raises(ComponentError, match=match):
        make("chain", steps=steps)


# -- validation -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("top_k", {"k": 0}),
        ("top_k", {"k": -3}),
        ("top_k", {"k": []}),
        ("top_k", {"k": [3, 0]}),
        ("top_k", {"k": 2.5}),
        ("top_k", {"temperature": 0}),
        ("top_p", {"p": 0}),
        ("top_p", {"p": 1.5}),
        ("top_p", {"p": -0.1}),
        ("top_p", {"top_k": 0}),
        ("temperature", {"temperature": 0}),
        ("temperature", {"temperature": -1.0}),
        ("temperature", {"temperature": math.inf}),
        ("temperature", {"temp": 1.0}),
        ("top_k", {"k": 5, "p": 0.9}),
        ("chain", {"samplers": []}),
    ],
)
def test_bad_params_raise(name, params):
    with pytest.raises(ComponentError, match=f"invalid params for sampler '{name}'"):
        make(name, **params)
    cls = vqgen.default_registry().get("sampler", name).cls
    # direct construction: pydantic rejects the value; Python itself an unknown keyword
    with pytest.raises((ValidationError, TypeError)):
        cls(**params)


# -- drawing --------------------------------------------------------------------

N_DRAWS = 20_000


def draw_counts(sampler, logits: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Counts per id of N_DRAWS draws from one row of logits ``[V]``."""
    batch = logits.expand(N_DRAWS, -1)  # (N, V)
    draws = sampler.sample(batch, torch.Generator().manual_seed(seed))  # (N,)
    assert draws.shape == (N_DRAWS,) and draws.dtype == torch.int64
    return torch.bincount(draws, minlength=logits.numel()).double()  # (V,)


def assert_matches(counts: torch.Tensor, kept: torch.Tensor, logits: torch.Tensor):
    """Zero draws outside ``kept``; chi-square goodness of fit on it at p > 0.001."""
    assert counts[~kept].sum() == 0
    expected = torch.softmax(logits.double()[kept], dim=-1) * N_DRAWS  # truncated, renormalised
    stat = float(((counts[kept] - expected) ** 2 / expected).sum())
    df = int(kept.sum()) - 1
    if df == 0:
        assert counts[kept].sum() == N_DRAWS
        return
    assert chi2_sf(stat, df) > 0.001, (stat, df)


LOGITS = torch.tensor([1.2, -0.3, 0.5, 2.0, 0.0, -1.5, 1.0, 0.8, -0.7, 0.3])  # (V,)


@pytest.mark.parametrize("t", [0.7, 1.0, 1.6])
def test_temperature_draws_match_distribution(t):
    counts = draw_counts(make("temperature", temperature=t), LOGITS)
    assert_matches(counts, torch.ones(10, dtype=torch.bool), LOGITS / t)


@pytest.mark.parametrize(("k", "t"), [(1, 1.0), (4, 1.0), (6, 0.5)])
def test_top_k_draws_match_truncated_distribution(k, t):
    counts = draw_counts(make("top_k", k=k, temperature=t), LOGITS)
    kept = torch.zeros(10, dtype=torch.bool)
    kept[torch.topk(LOGITS, k).indices] = True
    assert_matches(counts, kept, LOGITS / t)


@pytest.mark.parametrize(("p", "t", "top_k"), [(0.5, 1.0, None), (0.8, 1.3, None), (0.9, 1.0, 3)])
def test_top_p_draws_match_truncated_distribution(p, t, top_k):
    logits = LOGITS / t
    if top_k is not None:
        logits = torch.where(
            torch.isin(torch.arange(10), torch.topk(logits, top_k).indices), logits, -math.inf
        )
    # the nucleus by hand, in float64
    probs = torch.softmax(logits.double(), dim=-1)
    order = torch.argsort(probs, descending=True)
    n = int((torch.cumsum(probs[order], 0) < p).sum()) + 1
    kept = torch.zeros(10, dtype=torch.bool)
    kept[order[:n]] = True
    assert 1 < n < 10
    counts = draw_counts(make("top_p", p=p, temperature=t, top_k=top_k), LOGITS)
    assert_matches(counts, kept, logits)


def test_draws_are_reproducible():
    sampler = make("top_p", p=0.95, temperature=1.2)
    logits = torch.randn(1000, 32, generator=torch.Generator().manual_seed(5))

    def draw(seed):
        return sampler.sample(logits, torch.Generator().manual_seed(seed))

    assert torch.equal(draw(0), draw(0))
    assert not torch.equal(draw(0), draw(1))
