"""Every conditioner end to end on ``shapes``: tiny stage 1, tiny prior, conditional samples;
spatial conditions windowed with the sliding window; dropout and the null token."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from cond_helpers import (
    ALL,
    SPATIAL,
    TINY_MAP,
    V,
    make,
    shapes_batch,
    tiny_gpt,
    train_cond_stage,
    train_prior,
)

import vqgen
from vqgen.conditioners import ConditionInputs, drop_condition
from vqgen.core.config import parse_config
from vqgen.core.pipeline import Pipeline, window_origin
from vqgen.plugins.shapes import ShapesDataset
from vqgen.training.engine import train_tokenizer
from vqgen_test_stubs import StubTokenizer

#: what each conditioner reads at sampling
KEYS = {
    "class": ["label"], "segmentation": ["segmentation"], "segmentation_downsample":
    ["segmentation"], "depth": ["depth"], "edge": ["image"], "pose": ["keypoints"],
    "lowres": ["image"],
}


def condition_of(case: str, batch: dict[str, Any], n: int) -> dict[str, Any]:
    cond = {k: batch[k][:n] for k in KEYS[case]}
    if case == "lowres":  # the user's small image
        cond = {"lowres": make("lowres").lowres(batch)[:n]}
    if case == "pose":
        cond["size"] = tuple(batch["image"].shape[-2:])
    return cond


def sampler() -> vqgen.Sampler:
    return vqgen.create("sampler", "top_k", {"k": 4})


@pytest.mark.parametrize("case", list(ALL))
def test_train_tiny_models_and_generate_with_a_condition(case: str) -> None:
    cond = make(case)
    batch = shapes_batch(8)
    losses = train_cond_stage(cond, batch, steps=3)
    assert all(math.isfinite(v) for v in losses)
    lc = cond.tokens(batch).shape[1]
    assert lc == (1 if case == "class" else 64)
    pipe = Pipeline(StubTokenizer(), tiny_gpt(cond, lc), grid=(8, 8), sampler=sampler(),
                    conditioner=cond)
    prior_losses = train_prior(pipe, batch, steps=6, cond_dropout=0.2)
    assert all(math.isfinite(v) for v in prior_losses) and prior_losses[-1] < prior_losses[0]
    out = pipe.generate(2, condition=condition_of(case, batch, 2), seed=0)
    assert out.images.shape == (2, 3, 32, 32) and out.codes.shape == (2, 8, 8)
    assert 0 <= int(out.codes.min()) and int(out.codes.max()) < V
    again = pipe.generate(2, condition=condition_of(case, batch, 2), seed=0)
    assert torch.equal(again.codes, out.codes)
    if cond.spatial:  # a larger canvas, sampled with the sliding window
        big = shapes_batch(1, resolution=48)
        out = pipe.generate(1, condition=condition_of(case, big, 1), size=(48, 48), seed=0)
        assert out.images.shape == (1, 3, 48, 48) and out.codes.shape == (1, 12, 12)


class RecordingPrior(vqgen.AutoregressivePrior):
    """Uniform logits; records the condition of every call."""

    class Params(vqgen.ParamsModel):
        cond_vocab_size: int = 0

    def __init__(self, cond_vocab_size: int = 0) -> None:
        super().__init__(cond_vocab_size=cond_vocab_size)
        self.vocab_size, self.cond_vocab_size = V, cond_vocab_size
        self.conds: list[torch.Tensor] = []

    def logits(self, seq: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        assert cond is not None
        self.conds.append(cond.clone())
        return torch.zeros(*seq.shape, V)  # (B, L, V)

    def start(self, cond: torch.Tensor | None, batch_size: int) -> Any:
        assert cond is not None
        self.conds.append(cond.clone())
        return batch_size

    def step(self, state: Any, token: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
        return torch.zeros(state, V), state


@pytest.mark.parametrize("case", list(SPATIAL))
def test_spatial_condition_windows_follow_the_sliding_window(case: str) -> None:
    cond = make(case)
    prior = RecordingPrior(cond.vocab_size)
    pipe = Pipeline(StubTokenizer(), prior, grid=(8, 8), sampler=sampler(), conditioner=cond)
    big = shapes_batch(2, resolution=48)
    condition = condition_of(case, big, 2)
    full = cond.grid(condition)  # (2, 12, 12): the whole canvas's condition grid
    assert full.shape == (2, 12, 12)
    pipe.generate(2, condition=condition, size=(48, 48), seed=0)
    assert len(prior.conds) == 12 * 12
    for k, c in enumerate(prior.conds):
        i, j = divmod(k, 12)
        top, left = window_origin(i, 12, 8), window_origin(j, 12, 8)
        window = full[:, top : top + 8, left : left + 8].reshape(2, 64)
        assert torch.equal(c, window + V), (i, j)
    prior.conds.clear()
    small = condition_of(case, shapes_batch(2), 2)  # the training grid: all at once
    pipe.generate(2, condition=small, seed=0)
    assert torch.equal(prior.conds[0], cond.tokens(small) + V)


def test_dropout_trains_one_model_for_conditional_and_unconditional_sampling() -> None:
    cond = make("class")
    batch = shapes_batch(8)
    pipe = Pipeline(StubTokenizer(), tiny_gpt(cond, 1), grid=(8, 8), sampler=sampler(),
                    conditioner=cond)
    train_prior(pipe, batch, steps=3, cond_dropout=0.5)
    seq, tokens = pipe.tokens(batch)  # tokens already offset
    null = cond.null_like(tokens - pipe.cond_offset) + pipe.cond_offset
    assert bool((null == V + cond.null_id).all())
    with torch.no_grad():
        c, u = pipe.prior.logits(seq, tokens), pipe.prior.logits(seq, null)  # (B, L, V)
    assert not torch.allclose(c, u)
    guided = u + 1.0 * (c - u)  # scale 1: plain conditional sampling
    assert torch.allclose(guided, c, atol=1e-5)
    out = pipe.generate(2, condition=torch.tensor([-1, -1]), seed=0)  # unconditional
    assert out.codes.shape == (2, 8, 8)
    # the pipeline's guidance (a config's sampling.guidance) is generate's default
    pipe.guidance = 2.0
    guided = pipe.generate(2, condition=[0, 1], seed=0).codes
    assert torch.equal(guided, pipe.generate(2, condition=[0, 1], seed=0, guidance=2.0).codes)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(vqgen.VqgenError, match="guidance must be a finite number"):
            pipe.generate(2, condition=[0, 1], guidance=bad)
    spatial = make("depth")
    dropped = drop_condition(spatial, spatial.tokens(batch), 1.0)
    assert bool((dropped == spatial.null_id).all()) and dropped.shape == (8, 64)


class DepthInputs(ConditionInputs):
    """The depth conditioner's stage-1 data, as a dataset component (test only)."""

    class Params(vqgen.ParamsModel):
        length: int = 16

    def __init__(self, length: int = 16) -> None:
        super().__init__(ShapesDataset(length=length), make("depth"))
        self.params = self.Params(length=length)


def test_cond_stage_trains_with_the_stage1_loop() -> None:
    reg = vqgen.default_registry().copy()
    reg.add("dataset", "depth_inputs", DepthInputs)
    cfg = parse_config({
        "data": {"name": "depth_inputs"},
        "tokenizer": {"name": "vqgan", "params": TINY_MAP},
        "train": {"tokenizer": {"steps": 2, "batch_size": 4, "lr": 2e-3, "image_every": 0}},
    }, registry=reg)
    trained = train_tokenizer(cfg, None, registry=reg, progress=False)
    cond = make("depth")
    cond.tokenizer.load_state_dict(trained.state_dict())
    assert cond.tokens(shapes_batch(2)).shape == (2, 64)


class AlignedRecordingPrior(RecordingPrior):
    """A prior that takes a spatial condition cell by cell in its sequence order."""

    aligned_condition = True


@pytest.mark.parametrize("aligned", [False, True])
def test_aligned_priors_get_the_spatial_condition_in_their_ordering(aligned: bool) -> None:
    from vqgen.training.objectives.prior import _Tokens

    cond = make("depth")
    prior = (AlignedRecordingPrior if aligned else RecordingPrior)(cond.vocab_size)
    ordering = vqgen.create("ordering", "spiral_out")
    pipe = Pipeline(StubTokenizer(), prior, grid=(8, 8), sampler=sampler(), conditioner=cond,
                    ordering=ordering)
    small = condition_of("depth", shapes_batch(2), 2)
    grid = cond.grid(small)  # (2, 8, 8), row-major cells
    want = (ordering.flatten(grid) if aligned else grid.reshape(2, 64)) + V  # (2, 64)
    pipe.generate(2, condition=small, seed=0)
    assert torch.equal(prior.conds[0], want)
    assert torch.equal(pipe.cond_tokens(small), want)
    # training reads the token cache (conditioner ids, row-major) through the same seam
    cache = [{"codes": torch.zeros(8, 8, dtype=torch.long), "cond": grid[i].reshape(64)}
             for i in range(2)]
    items = _Tokens(cache, pipe)  # type: ignore[arg-type]
    raw = torch.stack([items[i]["cond"] for i in range(2)])  # (2, 64)
    assert torch.equal(pipe.prior_cond(raw), want)
    # a class condition (Lc = 1) is never permuted
    label = make("class")
    pipe = Pipeline(StubTokenizer(), AlignedRecordingPrior(label.vocab_size), grid=(8, 8),
                    sampler=sampler(), conditioner=label, ordering=ordering)
    assert pipe.cond_tokens({"label": torch.tensor([2, 3])}).tolist() == [[V + 2], [V + 3]]
