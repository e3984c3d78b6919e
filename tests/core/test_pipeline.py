"""Pipeline: id offsets, ordering, cached and sliding-window generation, completion."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import vqgen
from vqgen.core.pipeline import Pipeline, _Draw, window_origin
from vqgen_test_stubs import StubConditioner, StubTokenizer

V = 16  # image codes of the stub tokenizer


class RecordingPrior(vqgen.AutoregressivePrior):
    """Deterministic prior: position ``p`` of a sequence predicts
    ``(sum(seq[:p]) + 3 p + sum(cond)) % V`` with certainty. Records every call."""

    class Params(vqgen.ParamsModel):
        vocab_size: int = V
        cond_vocab_size: int = 0

    def __init__(self, vocab_size: int = V, cond_vocab_size: int = 0) -> None:
        super().__init__(vocab_size=vocab_size, cond_vocab_size=cond_vocab_size)
        self.vocab_size, self.cond_vocab_size = vocab_size, cond_vocab_size
        self.calls: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the module a device

    @staticmethod
    def rule(seq: torch.Tensor, cond: torch.Tensor | None, p: int, v: int) -> torch.Tensor:
        c = cond.sum(1) if cond is not None else 0
        return (seq[:, :p].sum(1) + 3 * p + c) % v  # (B,)

    def logits(self, seq: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        self.calls.append((seq.clone(), None if cond is None else cond.clone()))
        b, n = seq.shape
        out = torch.full((b, n, self.vocab_size), -30.0)
        for p in range(n):
            out[torch.arange(b), p, self.rule(seq, cond, p, self.vocab_size)] = 30.0
        return out  # (B, L, V)

    def start(self, cond: torch.Tensor | None, batch_size: int) -> Any:
        return {"cond": cond, "seq": torch.zeros(batch_size, 0, dtype=torch.long)}

    def step(self, state: Any, token: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
        if token is not None:
            state["seq"] = torch.cat([state["seq"], token[:, None]], 1)
        seq = state["seq"]
        padded = torch.cat([seq, seq.new_zeros(seq.shape[0], 1)], 1)
        return self.logits(padded, state["cond"])[:, -1], state


def greedy() -> vqgen.Sampler:
    return vqgen.create("sampler", "top_k", {"k": 1})


def make(grid: tuple[int, int] = (4, 4), **kw: Any) -> Pipeline:
    prior = kw.pop("prior", None) or RecordingPrior()
    return Pipeline(StubTokenizer(), prior, grid=grid, sampler=greedy(), **kw)


def test_window_origin_follows_taming_rule() -> None:
    # taming: local = i if i <= k//2; k - (n - i) if n - i < k//2; else k//2 (even k;
    # for odd k that rule can run past the border, which the clamp prevents)
    for n, k in [(10, 4), (9, 4), (16, 16), (24, 16), (40, 16), (7, 2)]:
        for i in range(n):
            if i <= k // 2:
                local = i
            elif n - i < k // 2:
                local = k - (n - i)
            else:
                local = k // 2
            assert window_origin(i, n, k) == i - local, (n, k, i)
    for n in range(1, 30):
        for k in range(1, n + 1):
            for i in range(n):
                top = window_origin(i, n, k)
                assert 0 <= top <= i < top + k <= n, (n, k, i)


def test_cached_generation_follows_ordering_and_prior() -> None:
    pipe = make(ordering=vqgen.create("ordering", "spiral_out"))
    out = pipe.generate(2, seed=0)
    assert out.codes.shape == (2, 4, 4) and out.images.shape == (2, 3, 16, 16)
    seq = pipe.ordering.flatten(out.codes)  # (2, 16) in generation order
    for p in range(16):
        assert torch.equal(seq[:, p], RecordingPrior.rule(seq, None, p, V))


def test_sliding_window_sees_only_its_window() -> None:
    prior = RecordingPrior()
    pipe = make(grid=(4, 4), prior=prior)
    h, w = 6, 9
    out = pipe.generate(2, size=(4 * h, 4 * w), seed=0)
    codes = out.codes
    assert codes.shape == (2, h, w) and out.images.shape == (2, 3, 4 * h, 4 * w)
    assert len(prior.calls) == h * w
    for k, (window, cond) in enumerate(prior.calls):
        i, j = divmod(k, w)
        top, left = window_origin(i, h, 4), window_origin(j, w, 4)
        pos = (i - top) * 4 + (j - left)
        expected = codes[:, top : top + 4, left : left + 4].reshape(2, -1).clone()
        rows, cols = torch.arange(top, top + 4)[:, None], torch.arange(left, left + 4)
        raster = (rows * w + cols).reshape(-1)
        expected[:, raster >= i * w + j] = 0  # not generated yet when predicting (i, j)
        assert torch.equal(window, expected), (i, j)
        assert cond is None
        assert torch.equal(codes[:, i, j], RecordingPrior.rule(window, None, pos, V))


def test_sliding_and_cached_paths_agree_on_the_training_grid() -> None:
    torch.manual_seed(0)
    gpt = vqgen.create(
        "prior", "gpt", {"vocab_size": V, "block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 16}
    ).eval()
    pipe = Pipeline(StubTokenizer(), gpt, grid=(4, 4), sampler=vqgen.create("sampler", "top_k"))
    cached = pipe.generate(3, seed=7).codes
    draw = _Draw(gpt, 3, None, pipe.sampler, torch.Generator().manual_seed(7), None)
    sliding = pipe._sample_sliding(draw, 4, 4)
    assert torch.equal(cached, sliding)


def test_sliding_window_prefix_feeding_equals_the_full_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(0)
    gpt = vqgen.create(
        "prior", "gpt", {"vocab_size": V, "block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 16}
    ).eval()
    pipe = Pipeline(StubTokenizer(), gpt, grid=(4, 4), sampler=vqgen.create("sampler", "top_k"))
    assert type(gpt).prefix_logits
    short = pipe.generate(2, size=(24, 20), seed=3).codes  # 6x5 latents: sliding window
    monkeypatch.setattr(type(gpt), "prefix_logits", False)
    full = pipe.generate(2, size=(24, 20), seed=3).codes
    assert short.shape == (2, 6, 5) and torch.equal(short, full)


def test_same_seed_same_canvas() -> None:
    torch.manual_seed(0)
    gpt = vqgen.create(
        "prior", "gpt", {"vocab_size": V, "block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 16}
    ).eval()
    pipe = Pipeline(StubTokenizer(), gpt, grid=(4, 4), sampler=vqgen.create("sampler", "top_k"))
    a = pipe.generate(2, size=(20, 28), seed=3).codes
    b = pipe.generate(2, size=(20, 28), seed=3).codes
    c = pipe.generate(2, size=(20, 28), seed=4).codes
    assert a.shape == (2, 5, 7)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_condition_tokens_are_offset_into_their_own_range() -> None:
    prior = RecordingPrior(cond_vocab_size=4)
    pipe = make(prior=prior, conditioner=StubConditioner(n_classes=4))
    pipe.generate(3, condition=torch.tensor([0, 2, 3]), seed=0)
    _, cond = prior.calls[0]
    assert cond is not None and cond.tolist() == [[V + 0], [V + 2], [V + 3]]
    prior.calls.clear()
    pipe.generate(2, condition=1)  # one class for every sample
    assert prior.calls[0][1].tolist() == [[V + 1], [V + 1]]
    taming = make(prior=RecordingPrior(), conditioner=StubConditioner(), cond_offset=0)
    taming.generate(1, condition=2)
    assert taming.prior.calls[0][1].tolist() == [[2]]


def test_completion_keeps_the_given_rows() -> None:
    pipe = make()
    prefix = torch.tensor([[[1, 2, 3, 4]]])  # (1, r=1, w=4)
    out = pipe.generate(2, prefix=prefix, seed=0)
    assert torch.equal(out.codes[:, :1], prefix.expand(2, -1, -1))
    seq = out.codes.reshape(2, -1)
    for p in range(4, 16):
        assert torch.equal(seq[:, p], RecordingPrior.rule(seq, None, p, V))
    big = pipe.generate(1, size=(24, 24), prefix=torch.ones(1, 2, 6, dtype=torch.long))
    assert (big.codes[:, :2] == 1).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ordering": "z_curve", "size": (32, 32)}, "needs row-major order"),
        ({"size": (8, 32)}, "smaller than the training grid"),
        ({"size": (30, 32)}, "not divisible by the downsampling factor"),
        ({"ordering": "spiral_in", "prefix": torch.zeros(1, 1, 4, dtype=torch.long)},
         "does not visit the top 1 rows first"),
        ({"prefix": torch.zeros(1, 1, 5, dtype=torch.long)}, "top rows of the code grid"),
        ({"condition": 1}, "has no conditioner"),
    ],
)
def test_bad_requests_raise_clear_errors(kwargs: dict[str, Any], message: str) -> None:
    order = kwargs.pop("ordering", None)
    pipe = make(ordering=vqgen.create("ordering", order) if order else None)
    with pytest.raises(vqgen.VqgenError, match=message):
        pipe.generate(1, **kwargs)


def test_mismatched_vocabularies_are_refused() -> None:
    with pytest.raises(vqgen.VqgenError, match=r"set prior.params.vocab_size: 16"):
        make(prior=RecordingPrior(vocab_size=8))
    with pytest.raises(vqgen.VqgenError, match=r"set prior.params.cond_vocab_size: 4"):
        make(prior=RecordingPrior(cond_vocab_size=2), conditioner=StubConditioner(n_classes=4))
    pipe = make(prior=RecordingPrior(cond_vocab_size=4), conditioner=StubConditioner())
    with pytest.raises(vqgen.VqgenError, match="pass a condition"):
        pipe.generate(1)


def test_tokens_and_nll_for_training() -> None:
    pipe = make(ordering=vqgen.create("ordering", "alternate"))
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    seq, cond = pipe.tokens({"image": images})
    codes = pipe.tokenizer.encode(images)
    assert torch.equal(seq, pipe.ordering.flatten(codes)) and cond is None
    assert pipe.nll({"image": images}).shape == (2,)


class NullableConditioner(StubConditioner):
    """The stub class conditioner with a null id after the classes."""

    def __init__(self, n_classes: int = 4) -> None:
        super().__init__(n_classes=n_classes)
        self.vocab_size, self.null_id = n_classes + 1, n_classes


class RecordingSampler(vqgen.Sampler):
    """Greedy, remembering the logits it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def warp(self, logits: torch.Tensor) -> torch.Tensor:
        self.seen.append(logits.clone())
        top = logits.argmax(-1, keepdim=True)  # (B, 1)
        return torch.full_like(logits, float("-inf")).scatter(1, top, 0.0)


@pytest.mark.parametrize("size", [None, (24, 24)])
def test_classifier_free_guidance_mixes_cond_and_null_logits(
    size: tuple[int, int] | None,
) -> None:
    prior = RecordingPrior(cond_vocab_size=5)
    sampler = RecordingSampler()
    pipe = Pipeline(StubTokenizer(), prior, grid=(4, 4), sampler=sampler,
                    conditioner=NullableConditioner())
    out = pipe.generate(2, condition=torch.tensor([1, 3]), guidance=3.0, size=size, seed=0)
    assert out.codes.shape == ((2, 4, 4) if size is None else (2, 6, 6))
    calls = list(prior.calls)
    assert calls[0][1].tolist() == [[V + 1], [V + 3], [V + 4], [V + 4]]  # cond rows, null rows
    assert len(calls) == len(sampler.seen) == out.codes[0].numel()
    h, w = out.codes.shape[1:]
    for k, ((seq, cond), seen) in enumerate(zip(calls, sampler.seen, strict=True)):
        i, j = divmod(k, w)
        pos = -1 if size is None else (i - window_origin(i, h, 4)) * 4 + j - window_origin(j, w, 4)
        both = prior.logits(seq, cond)[:, pos]  # (4, V)
        c_logits, u_logits = both.chunk(2)
        assert torch.equal(seen, u_logits + 3 * (c_logits - u_logits)), k


def test_guidance_needs_a_null_token() -> None:
    pipe = make(prior=RecordingPrior(cond_vocab_size=4), conditioner=StubConditioner())
    with pytest.raises(vqgen.VqgenError, match="null token"):
        pipe.generate(1, condition=1, guidance=2.0)
    plain = Pipeline(StubTokenizer(), RecordingPrior(cond_vocab_size=5), grid=(4, 4),
                     sampler=greedy(), conditioner=NullableConditioner())
    a = plain.generate(2, condition=torch.tensor([0, 2]), seed=1).codes
    b = plain.generate(2, condition=torch.tensor([0, 2]), seed=1, guidance=1.0).codes
    assert torch.equal(a, b)
