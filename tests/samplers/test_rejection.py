"""The rejection sampler: inner sampler per token, classifier judging, best fraction kept."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import vqgen
from vqgen.core.errors import VqgenError
from vqgen.core.interfaces import signature_problems
from vqgen.core.registry import ComponentError
from vqgen.plugins.judges import ImageClassifier, save_classifier
from vqgen.samplers import Chain, TopK, TopP
from vqgen.samplers.rejection import (
    DEFAULT_INNER,
    Rejection,
    candidates_per_label,
    rejection_sample,
    select,
)

pytestmark = pytest.mark.usefixtures("one_thread")

N_CLASSES = 4


def make(**params) -> Rejection:
    return vqgen.default_registry().create("sampler", "rejection", params)


def encode(cls: torch.Tensor) -> torch.Tensor:
    """Images ``[B, 3, 8, 8]`` whose constant pixel value encodes each true class."""
    return (cls.float() / N_CLASSES - 0.5)[:, None, None, None].expand(-1, 3, 8, 8).clone()


class Recognizer(nn.Module):
    """Reads the class back from the pixels: logits ``5 * onehot(true class)``."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = torch.round((x.mean(dim=(1, 2, 3)) + 0.5) * N_CLASSES).long()  # (B,)
        return 5.0 * nn.functional.one_hot(cls, N_CLASSES).float() + self.dummy  # (B, K)


class FakeDraw:
    """A stand-in for the Pipeline's ``draw``: candidates of random true classes.

    Candidate ``j`` (in drawing order) has a true class drawn from its own seeded
    stream, so the content is independent of how candidates are batched. Codes
    are ``[B, 2, 2]`` grids holding the true class and the candidate index.
    """

    def __init__(self, probs: list[float] | None = None, with_codes: bool = True) -> None:
        self.probs = torch.tensor(probs or [1 / N_CLASSES] * N_CLASSES)
        self.with_codes = with_codes
        self.calls: list[torch.Tensor] = []  # idx of every call
        self.true: list[torch.Tensor] = []  # true classes of every call's candidates
        self.drawn = 0

    def __call__(self, idx: torch.Tensor):
        self.calls.append(idx.clone())
        j = torch.arange(self.drawn, self.drawn + len(idx))
        self.drawn += len(idx)
        cls = torch.stack(
            [
                torch.multinomial(self.probs, 1, generator=torch.Generator().manual_seed(int(i)))[0]
                for i in j
            ]
        )  # (B,)
        self.true.append(cls)
        images = encode(cls)  # (B, 3, 8, 8)
        if not self.with_codes:
            return images
        codes = torch.stack([cls, j], dim=1)[:, :, None].expand(-1, 2, 2).clone()  # (B, 2, 2)
        return images, codes


def true_class(codes: torch.Tensor) -> torch.Tensor:
    return codes[:, 0, 0]  # (n,)


# -- construction ------------------------------------------------------------


def test_registered_with_conformance_friendly_defaults():
    reg = vqgen.default_registry()
    assert "rejection" in reg.list("sampler")
    assert signature_problems(Rejection) == []
    s = make()
    assert isinstance(s, Rejection) and isinstance(s.inner, TopK)
    assert s.params.model_dump() == {
        "inner": {"name": "top_k", "params": {}},
        "acceptance_rate": 0.25,
        "classifier": "",
        "batch_size": 16,
    }
    assert s.params.inner == DEFAULT_INNER


def test_warp_and_sample_are_the_inner_samplers():
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(0))
    s = make(inner={"name": "top_p", "params": {"p": 0.5, "temperature": 0.7}})
    ref = TopP(p=0.5, temperature=0.7)
    assert torch.equal(s.warp(logits), ref.warp(logits))
    a = s.sample(logits, torch.Generator().manual_seed(3))
    b = ref.sample(logits, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert torch.equal(make().warp(logits), TopK().warp(logits))


def test_a_chain_may_be_the_inner_sampler():
    steps = [{"name": "top_k", "params": {"k": 5}}, {"name": "top_p", "params": {"p": 0.9}}]
    s = make(inner={"name": "chain", "params": {"steps": steps}})
    logits = torch.randn(3, 20)
    assert isinstance(s.inner, Chain)
    assert torch.equal(s.warp(logits), Chain(steps=steps).warp(logits))


def test_rejection_refused_as_inner():
    with pytest.raises(ComponentError, match="'rejection' cannot be the inner sampler"):
        make(inner={"name": "rejection", "params": {}})


def test_bad_inner_named():
    with pytest.raises(ComponentError, match=r"params\.inner \('top_kk'\)"):
        make(inner={"name": "top_kk"})
    with pytest.raises(ComponentError, match=r"params\.inner.*k"):
        make(inner={"name": "top_k", "params": {"k": 0}})


@pytest.mark.parametrize(
    "params", [{"acceptance_rate": 0.0}, {"acceptance_rate": 1.5}, {"batch_size": 0}]
)
def test_bad_params_refused(params):
    with pytest.raises(ComponentError, match=next(iter(params))):
        make(**params)


# -- the classifier ------------------------------------------------------------


def test_missing_classifier_says_how_to_train_one():
    s = make()
    with pytest.raises(VqgenError) as err:
        s.score(torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long))
    msg = str(err.value)
    assert "no classifier" in msg
    assert "python -m vqgen.training.judges" in msg and "save_classifier" in msg
    assert "set_classifier" in msg


def test_bad_classifier_file_is_named(tmp_path: Path):
    bad = tmp_path / "nope.safetensors"
    s = make(classifier=str(bad))  # read on first use, not at construction
    with pytest.raises(VqgenError, match="nope.safetensors.*does not exist"):
        s.score(torch.zeros(1, 3, 8, 8), torch.zeros(1, dtype=torch.long))
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(VqgenError, match="nope.safetensors"):
        make(classifier=str(bad)).score(torch.zeros(1, 3, 8, 8), torch.zeros(1, dtype=torch.long))


def test_score_is_the_log_probability_of_the_requested_class():
    s = make().set_classifier(Recognizer())
    cls = torch.tensor([0, 1, 2, 3, 2])
    labels = torch.tensor([0, 2, 2, 3, 1])
    scores = s.score(encode(cls), labels)
    ref = torch.log_softmax(Recognizer()(encode(cls)), dim=-1)[torch.arange(5), labels]
    assert scores.dtype == torch.float32 and scores.shape == (5,)
    assert torch.allclose(scores, ref)
    assert (scores[labels == cls] > scores[labels != cls].max()).all()
    with pytest.raises(VqgenError, match="label 7 is out of range"):
        s.score(encode(cls[:1]), torch.tensor([7]))
    with pytest.raises(TypeError):
        s.set_classifier(lambda x: x)  # type: ignore[arg-type]


def test_classifier_from_a_saved_file(tmp_path: Path):
    torch.manual_seed(0)
    model = ImageClassifier(n_classes=N_CLASSES, resolution=16).eval()
    path = save_classifier(model, tmp_path / "clf.safetensors")
    s = make(classifier=str(path))
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    labels = torch.tensor([0, 3, 1])
    ref = torch.log_softmax(model(images), dim=-1)[torch.arange(3), labels]
    assert torch.allclose(s.score(images, labels), ref, atol=1e-6)
    with pytest.warns(UserWarning, match="trained on 16x16"):
        s.score(torch.zeros(1, 3, 32, 32), torch.tensor([0]))


# -- select ------------------------------------------------------------------


def test_select_hand_example():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3, 0.8, float("nan")])
    labels = torch.tensor([0, 1, 0, 1, 0, 2, 0])
    assert select(scores, labels, {0: 2, 1: 1}).tolist() == [2, 4, 1]
    assert select(scores, labels, 1).tolist() == [2, 1, 5]
    assert select(scores, labels, {0: 9}).tolist() == [2, 4, 0, 6]  # NaN counts as worst
    assert select(scores, labels, 0).tolist() == []
    ties = torch.tensor([1.0, 2.0, 1.0, 2.0])
    assert select(ties, torch.zeros(4, dtype=torch.long), 3).tolist() == [1, 3, 0]
    with pytest.raises(ValueError):
        select(scores, labels, -1)


def test_candidates_per_label_is_exact():
    assert candidates_per_label(3, 0.1) == 30  # 3 / 0.1 == 30.000000000000004
    assert candidates_per_label(8, 0.25) == 32
    assert candidates_per_label(1, 0.3) == 4
    assert candidates_per_label(5, 1.0) == 5


# -- the rejection loop --------------------------------------------------------


def test_a_scorer_preferring_one_class_keeps_only_that_class():
    s = make(acceptance_rate=0.25, batch_size=16).set_classifier(Recognizer())
    draw = FakeDraw(probs=[0.2, 0.2, 0.4, 0.2])  # a mix: class 2 is 40 % of the candidates
    labels = torch.full((8,), 2)
    res = rejection_sample(draw, labels, s)
    assert res.n_drawn == 32 and res.acceptance == 0.25
    assert res.images.shape == (8, 3, 8, 8) and res.codes.shape == (8, 2, 2)
    drawn = torch.cat(draw.true)  # (32,)
    assert 8 <= int((drawn == 2).sum()) < 32  # enough candidates of class 2, and others too
    assert (true_class(res.codes) == 2).all()
    assert torch.equal(res.images, encode(true_class(res.codes)))  # images and codes stay paired
    assert (res.scores[:-1] >= res.scores[1:]).all()  # best first


def test_mixed_labels_each_get_their_own_class_in_request_order():
    s = make(acceptance_rate=0.25, batch_size=16).set_classifier(Recognizer())
    labels = torch.tensor([3, 0, 3, 1, 2, 0, 1, 3])
    draw = FakeDraw()
    images, codes, acceptance = s.draw_and_select(draw, labels, torch.Generator())
    assert acceptance == 0.25 and images.shape == (8, 3, 8, 8)
    assert torch.equal(images, encode(true_class(codes)))
    idx, true = torch.cat(draw.calls), torch.cat(draw.true)  # (32,) each
    assert torch.bincount(labels[idx]).tolist() == [8, 8, 4, 12]  # 4 per requested sample
    for c in range(N_CLASSES):
        # every candidate of the right class is kept, up to the number requested
        n_c, found = int((labels == c).sum()), int((true[labels[idx] == c] == c).sum())
        assert int((true_class(codes)[labels == c] == c).sum()) == min(n_c, found)
    right = true_class(codes) == labels
    assert right.sum() >= 6  # (this draw gives the one request of class 2 no class-2 candidate)
    res = rejection_sample(FakeDraw(), labels, s)
    assert torch.equal(labels[res.source], labels)  # each kept one was drawn for its label
    assert torch.equal(res.codes, codes)


@pytest.mark.parametrize("batch_size", [1, 5, 16, 100])
def test_candidates_are_drawn_in_batches(batch_size: int):
    s = make(acceptance_rate=0.25, batch_size=batch_size).set_classifier(Recognizer())
    labels = torch.tensor([0, 1, 1, 2, 3, 3, 3])  # counts 1, 2, 1, 3 → 4 + 8 + 4 + 12 drawn
    draw = FakeDraw()
    res = rejection_sample(draw, labels, s)
    m = 28
    assert res.n_drawn == m and draw.drawn == m and res.acceptance == 7 / 28
    sizes = [len(c) for c in draw.calls]
    assert sizes == [batch_size] * (m // batch_size) + ([m % batch_size] if m % batch_size else [])
    per_label = torch.bincount(labels[torch.cat(draw.calls)], minlength=N_CLASSES)
    assert per_label.tolist() == [4, 8, 4, 12]


def test_streaming_selection_does_not_depend_on_the_batch_size():
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    results = [
        rejection_sample(
            FakeDraw(),
            labels,
            make(acceptance_rate=0.4, batch_size=bs).set_classifier(Recognizer()),
        )
        for bs in (1, 3, 7, 64)
    ]
    for res in results[1:]:
        for a, b in zip(res, results[0], strict=True):
            assert a == b if isinstance(a, (int, float)) else torch.equal(a, b)
    assert results[0].n_drawn == 5 + 3 + 8  # ceil(2 / 0.4), ceil(1 / 0.4), ceil(3 / 0.4)


def test_achieved_acceptance_is_reported_when_not_divisible():
    s = make(acceptance_rate=0.3, batch_size=4).set_classifier(Recognizer())
    res = rejection_sample(FakeDraw(), torch.tensor([1]), s)
    assert res.n_drawn == 4 and res.acceptance == 0.25
    res = rejection_sample(FakeDraw(), torch.tensor([2, 2, 2]), s)
    assert res.n_drawn == 10 and res.acceptance == 0.3


def test_images_only_draw_and_rate_one():
    s = make(acceptance_rate=1.0, batch_size=2).set_classifier(Recognizer())
    labels = torch.tensor([1, 0, 1])
    res = rejection_sample(FakeDraw(with_codes=False), labels, s)
    assert res.codes is None and res.images.shape == (3, 3, 8, 8)
    assert res.n_drawn == 3 and res.acceptance == 1.0
    assert sorted(res.candidate.tolist()) == [0, 1, 2]


def test_draw_returning_the_wrong_batch_is_refused():
    s = make(batch_size=4).set_classifier(Recognizer())
    with pytest.raises(ValueError, match="draw returned images"):
        rejection_sample(lambda idx: torch.zeros(1, 3, 8, 8), torch.tensor([0]), s)


# -- end to end through Pipeline.generate --------------------------------------


class CodeClassRecognizer(nn.Module):
    """For the stub tokenizer's grey images: class = code // 4 (16 codes, 4 classes)."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        code = torch.round((x.mean(dim=(1, 2, 3)) + 1) / 2 * 15).long()  # (B,)
        return 5.0 * nn.functional.one_hot(code // 4, N_CLASSES).float() + self.dummy


def test_pipeline_generate_with_rejection_keeps_the_requested_classes():
    from vqgen_test_stubs import StubConditioner, StubPrior, StubTokenizer

    pipe = vqgen.Pipeline(StubTokenizer(n_embed=16, downsample=8), StubPrior(vocab_size=16),
                          grid=(1, 1), conditioner=StubConditioner(n_classes=4))
    sampler = make(acceptance_rate=0.05, batch_size=16,
                   inner={"name": "temperature", "params": {}}).set_classifier(
        CodeClassRecognizer())
    labels = torch.tensor([2, 2, 2, 0, 0, 3])
    out = pipe.generate(6, labels, sampler=sampler, seed=0)
    assert out.images.shape == (6, 3, 8, 8) and out.codes.shape == (6, 1, 1)
    assert torch.equal(out.codes[:, 0, 0] // 4, labels)  # each sample its own label's class
    assert out.acceptance == pytest.approx(0.05, abs=0.01)
    again = pipe.generate(6, labels, sampler=sampler, seed=0)
    assert torch.equal(again.codes, out.codes)  # reproducible from the seed
    with pytest.raises(VqgenError, match="class condition"):
        vqgen.Pipeline(StubTokenizer(n_embed=16, downsample=8), StubPrior(vocab_size=16),
                       grid=(1, 1)).generate(2, sampler=sampler, seed=0)
