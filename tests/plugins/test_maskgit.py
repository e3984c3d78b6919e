"""MaskGIT prior: schedule, decoding rounds, guidance, seeding, a learnt teacher, pipelines."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch
from torch.utils.data import default_collate

import vqgen
from vqgen.core.config import parse_config
from vqgen.core.pipeline import Pipeline, align_condition
from vqgen.plugins.maskgit import MaskGIT, mask_ratio, masking_schedule
from vqgen.plugins.shapes import ShapesDataset
from vqgen_test_stubs import StubTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

V = 16  # image codes of the stub tokenizer (f = 4)


def tiny(cond_vocab_size: int = 0, grid: tuple[int, int] = (4, 4), **kw: Any) -> MaskGIT:
    torch.manual_seed(0)
    m = vqgen.create("prior", "maskgit", {
        "vocab_size": V, "cond_vocab_size": cond_vocab_size, "height": grid[0],
        "width": grid[1], "n_layer": 1, "n_head": 2, "n_embd": 16, "dropout": 0.0, **kw})
    assert isinstance(m, MaskGIT)
    return m.eval()


def classes() -> vqgen.Conditioner:
    return vqgen.create("conditioner", "class", {"n_classes": 4})  # null id 4: 5 ids


def sampler(name: str = "top_k") -> vqgen.Sampler:
    params = {"top_k": {"k": 4}, "top_p": {"p": 0.9}, "temperature": {"temperature": 0.8},
              "chain": {"steps": [{"name": "top_k", "params": {"k": 6}},
                                  {"name": "top_p", "params": {"p": 0.9}}]}}[name]
    return vqgen.create("sampler", name, params)


# -- the schedule -----------------------------------------------------------
def test_masking_schedule_counts() -> None:
    assert masking_schedule(16, 8) == [15, 14, 13, 11, 8, 6, 3, 0]
    assert masking_schedule(64, 8) == [62, 59, 53, 45, 35, 24, 12, 0]
    assert masking_schedule(64, 8, "linear") == [56, 48, 40, 32, 24, 16, 8, 0]
    assert masking_schedule(3, 8) == [2, 1, 0, 0, 0, 0, 0, 0]  # one new cell per round
    assert masking_schedule(5, 1) == [0]
    for n, t, kind in itertools.product([1, 2, 7, 16, 256], [1, 2, 8, 12], ["cosine", "square"]):
        plan = masking_schedule(n, t, kind)
        assert len(plan) == t and plan[-1] == 0
        for before, after in itertools.pairwise([n, *plan]):
            assert after < before or before == after == 0, (n, t, kind, plan)
    assert mask_ratio(0.0) == 1.0 and abs(mask_ratio(1.0)) < 1e-12


def test_training_masks_follow_the_ratio() -> None:
    m = tiny()
    g = torch.Generator().manual_seed(3)
    masked = m.random_mask(500, torch.device("cpu"), g)  # (500, 16)
    again = torch.Generator().manual_seed(3)
    u = torch.rand(500, generator=again)  # the same first draws
    want = torch.ceil(torch.cos(math.pi / 2 * u) * 16).long().clamp(1, 16)
    assert torch.equal(masked.sum(1), want)
    assert masked.float().mean(0).min() > 0.4  # every cell gets masked (uniform choice)


def test_loss_is_masked_cross_entropy_per_sample() -> None:
    m = tiny(cond_vocab_size=5)
    assert m.loss_name == "masked_ce" and not hasattr(m, "nll")
    seq = torch.randint(0, V, (6, 16))
    cond = torch.randint(V, V + 5, (6, 1))
    a = m.loss(seq, cond, generator=torch.Generator().manual_seed(0))
    b = m.loss(seq, cond, generator=torch.Generator().manual_seed(0))
    assert a.shape == (6,) and torch.equal(a, b) and torch.isfinite(a).all()
    masked = m.random_mask(6, seq.device, torch.Generator().manual_seed(0))
    logits = m.masked_logits(seq.masked_fill(masked, -1), cond)  # (6, 16, V)
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), seq, reduction="none")
    torch.testing.assert_close(a, (ce * masked).sum(1) / masked.sum(1))
    assert m(seq, cond).shape == ()  # forward: the batch mean, for a plain training step


def test_masked_logits_see_every_visible_cell() -> None:
    m = tiny()
    seq = torch.randint(0, V, (2, 16))
    seq[:, 0] = -1
    base = m.masked_logits(seq)[:, 0]
    later = seq.clone()
    later[:, 15] = (later[:, 15] + 1) % V  # a cell after cell 0 in any order
    assert not torch.allclose(base, m.masked_logits(later)[:, 0])  # bidirectional
    with pytest.raises(ValueError, match=r"\[B, 16\] int64"):
        m.masked_logits(seq[:, :8])
    with pytest.raises(ValueError, match="image codes must lie in"):
        m.masked_logits(seq.clamp(min=0) + V)


# -- decoding ---------------------------------------------------------------
def test_decoding_fixes_each_cell_once_and_keeps_known_cells(monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    m = tiny(steps=8)
    seen: list[torch.Tensor] = []
    real = m.masked_logits

    def record(seq: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        seen.append(seq.clone())
        return real(seq, cond)

    monkeypatch.setattr(m, "masked_logits", record)
    g = torch.Generator().manual_seed(0)
    known = torch.full((3, 16), -1)
    known[1, [0, 5, 9]] = torch.tensor([3, 4, 5])  # rows know different cells
    known[2, :15] = torch.arange(15)  # all but one
    out = m.decode(vqgen.Decoding(batch_size=3, length=16, sampler=sampler(), generator=g,
                                  known=known))
    assert out.shape == (3, 16) and (out >= 0).all() and (out < V).all()
    assert torch.equal(out[known >= 0], known[known >= 0])
    assert len(seen) == 8 and torch.equal(seen[0], known)
    rounds = [*seen[1:], out]
    for row, unknown in enumerate([16, 13, 1]):
        plan = masking_schedule(unknown, 8)
        for t, after in enumerate(rounds):
            assert int((after[row] < 0).sum()) == plan[t], (row, t)
        for before, after in itertools.pairwise([seen[0], *rounds]):
            fixed = before[row] >= 0
            assert torch.equal(after[row][fixed], before[row][fixed])  # fixed for good


def test_each_round_fixes_the_most_confident_cells(monkeypatch: pytest.MonkeyPatch) -> None:
    m = tiny(steps=4, choice_temperature=0.0)  # no noise: confidence = log p of the draw
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = m.masked_logits

    def record(seq: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        out = real(seq, cond)
        seen.append((seq.clone(), out.clone()))
        return out

    monkeypatch.setattr(m, "masked_logits", record)
    greedy = vqgen.create("sampler", "top_k", {"k": 1})
    out = m.decode(vqgen.Decoding(batch_size=2, length=16, sampler=greedy))
    rounds = [s for s, _ in seen[1:]] + [out]
    for (before, logits), after in zip(seen, rounds, strict=True):
        best = torch.log_softmax(logits, -1).max(-1)  # (2, 16): greedy draw and its log p
        new = (before < 0) & (after >= 0)  # fixed in this round
        left = after < 0
        assert torch.equal(after[new], best.indices[new])
        for row in range(2):
            if left[row].any():
                assert best.values[row][new[row]].min() >= best.values[row][left[row]].max()


def test_decoding_draws_from_the_model_at_the_one_unknown_cell() -> None:
    m = tiny()
    known = torch.randint(0, V, (1, 16)).expand(4000, -1).clone()
    known[:, 6] = -1
    out = m.decode(vqgen.Decoding(batch_size=4000, length=16, known=known,
                                  generator=torch.Generator().manual_seed(1)))
    want = torch.softmax(m.masked_logits(known[:1])[0, 6], -1)  # (V,)
    got = torch.bincount(out[:, 6], minlength=V).float() / 4000
    assert 0.5 * (got - want).abs().sum() < 0.05


def test_guidance_scale_one_is_conditional_sampling_bit_for_bit() -> None:
    m = tiny(cond_vocab_size=5)
    cond = torch.tensor([[V + 0], [V + 3]])
    null = torch.full_like(cond, V + 4)

    def run(**kw: Any) -> torch.Tensor:
        g = torch.Generator().manual_seed(5)
        return m.decode(vqgen.Decoding(batch_size=2, length=16, sampler=sampler(), cond=cond,
                                       generator=g, **kw))

    plain = run()
    assert torch.equal(run(null=null, guidance=1.0), plain)
    assert not torch.equal(run(null=null, guidance=3.0), plain)
    pipe = Pipeline(StubTokenizer(), m, grid=(4, 4), sampler=sampler(), conditioner=classes(),
                    guidance=3.0)
    a = pipe.generate(2, [0, 3], seed=5, guidance=1.0).codes
    pipe.guidance = 1.0
    assert torch.equal(pipe.generate(2, [0, 3], seed=5).codes, a)


def test_guided_rounds_mix_conditional_and_null_logits(monkeypatch: pytest.MonkeyPatch) -> None:
    m = tiny(cond_vocab_size=5, steps=2)
    calls: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    real = m.masked_logits

    def record(seq: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        calls.append((seq.clone(), cond))
        return real(seq, cond)

    monkeypatch.setattr(m, "masked_logits", record)
    pipe = Pipeline(StubTokenizer(), m, grid=(4, 4), sampler=sampler(), conditioner=classes())
    pipe.generate(2, [1, 2], seed=0, guidance=2.0)
    assert len(calls) == 2
    seq, cond = calls[0]
    assert seq.shape == (4, 16) and cond is not None
    assert cond.tolist() == [[V + 1], [V + 2], [V + 4], [V + 4]]  # conditional rows, then null


@pytest.mark.parametrize("name", ["top_k", "top_p", "temperature", "chain"])
def test_seeded_sampling_is_reproducible(name: str) -> None:
    pipe = Pipeline(StubTokenizer(), tiny(cond_vocab_size=5), grid=(4, 4), sampler=sampler(name),
                    conditioner=classes())
    a = pipe.generate(3, [0, 1, 2], seed=11).codes
    assert torch.equal(pipe.generate(3, [0, 1, 2], seed=11).codes, a)
    assert not torch.equal(pipe.generate(3, [0, 1, 2], seed=12).codes, a)
    torch.manual_seed(4)
    b = pipe.generate(3, [0, 1, 2], batch_size=2).codes  # torch's global RNG
    torch.manual_seed(4)
    assert torch.equal(pipe.generate(3, [0, 1, 2], batch_size=2).codes, b)


def test_a_tiny_maskgit_learns_a_teacher_conditional() -> None:
    """Cells 0-2 uniform, cell 3 ~ TEACHER[cell 0]: trained on fresh draws, the logits of the
    last cell, all others known, match the teacher (total variation < 0.1)."""
    teacher = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.6, 0.2, 0.1],
                            [0.25, 0.25, 0.25, 0.25], [0.05, 0.05, 0.45, 0.45]])
    torch.manual_seed(0)
    m = vqgen.create("prior", "maskgit", {"vocab_size": 4, "height": 2, "width": 2, "n_layer": 1,
                                          "n_head": 2, "n_embd": 32, "dropout": 0.0})
    steps = 300
    opt = torch.optim.AdamW(m.parameters(), 5e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 5e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        first = torch.randint(0, 4, (512, 3), generator=g)
        last = torch.multinomial(teacher[first[:, 0]], 1, generator=g)
        loss = m.loss(torch.cat([first, last], 1), generator=g).mean()  # (B,) → ()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    m.eval()
    ctx = torch.tensor(list(itertools.product(range(4), repeat=3)))  # (64, 3): every context
    with torch.no_grad():
        p = torch.softmax(m.masked_logits(torch.cat([ctx, torch.full((64, 1), -1)], 1))[:, 3], -1)
    tv = 0.5 * (p - teacher[ctx[:, 0]]).abs().sum(-1)  # (64,)
    assert tv.mean() < 0.1 and tv.max() < 0.2, (tv.mean(), tv.max())


# -- through the pipeline -----------------------------------------------------
def test_class_conditional_pipeline_and_completion() -> None:
    m = tiny(cond_vocab_size=5)
    for order in ["row_major", "spiral_out"]:  # any ordering: it only relabels positions
        pipe = Pipeline(StubTokenizer(), m, grid=(4, 4), sampler=sampler(), conditioner=classes(),
                        ordering=vqgen.create("ordering", order))
        out = pipe.generate(3, [0, 1, 3], seed=0)
        assert out.codes.shape == (3, 4, 4) and out.images.shape == (3, 3, 16, 16)
        prefix = torch.tensor([[[1, 2, 3, 4], [5, 6, 7, 8]]])  # the top two rows
        done = pipe.generate(2, [2, 2], seed=1, prefix=prefix).codes
        assert torch.equal(done[:, :2], prefix.expand(2, -1, -1))


def test_spatial_conditional_pipeline_aligns_the_map(monkeypatch: pytest.MonkeyPatch) -> None:
    seg = vqgen.create("conditioner", "segmentation", {"mode": "downsample", "downsample": 8})
    ds = ShapesDataset(resolution=32, length=2, seed=0, max_shapes=2)
    batch = default_collate([ds[i] for i in range(2)])
    m = tiny(cond_vocab_size=seg.vocab_size)
    conds: list[torch.Tensor | None] = []
    real = m.masked_logits

    def record(seq: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        conds.append(cond)
        return real(seq, cond)

    monkeypatch.setattr(m, "masked_logits", record)
    order = vqgen.create("ordering", "spiral_out")
    pipe = Pipeline(StubTokenizer(), m, grid=(4, 4), sampler=sampler(), conditioner=seg,
                    ordering=order)
    condition = {"segmentation": batch["segmentation"]}
    out = pipe.generate(2, condition, seed=0)
    assert out.codes.shape == (2, 4, 4)
    want = align_condition(seg.tokens(condition) + V, order, (4, 4))  # (2, 16) in seq order
    assert conds[0] is not None and torch.equal(conds[0], want)
    assert torch.equal(pipe.generate(2, condition, seed=0).codes, out.codes)
    guided = pipe.generate(2, condition, seed=0, guidance=2.0).codes
    assert guided.shape == (2, 4, 4)


def test_rejection_sampling_judges_finished_maskgit_samples() -> None:
    judge = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 4, 4), torch.nn.Flatten(),
                                torch.nn.LazyLinear(4))
    judge(torch.zeros(1, 3, 16, 16))
    rej = vqgen.create("sampler", "rejection", {"inner": {"name": "top_k", "params": {"k": 4}},
                                                "acceptance_rate": 0.5})
    rej.set_classifier(judge)
    pipe = Pipeline(StubTokenizer(), tiny(cond_vocab_size=5), grid=(4, 4), sampler=rej,
                    conditioner=classes())
    out = pipe.generate(4, [0, 1, 2, 3], seed=0)
    assert out.codes.shape == (4, 4, 4) and out.acceptance == 0.5


def test_nll_and_larger_canvases_are_refused_clearly() -> None:
    pipe = Pipeline(StubTokenizer(), tiny(), grid=(4, 4), sampler=sampler())
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with pytest.raises(vqgen.VqgenError, match=r"MaskGIT prior is a masked prior.*masked_ce.*"
                                               r"Pipeline\.loss"):
        pipe.nll({"image": images})
    assert pipe.loss({"image": images}).shape == (2,)
    with pytest.raises(vqgen.VqgenError, match="samples the training grid only.*16x16 pixels"):
        pipe.generate(1, size=(24, 24))


def test_config_wires_sizes_and_accepts_any_ordering(test_registry: vqgen.Registry) -> None:
    cfg = parse_config({
        "data": {"name": "shapes", "params": {"resolution": 32}},
        "tokenizer": {"name": "stub_tokenizer"},
        "conditioner": {"name": "class", "params": {"n_classes": 4}},
        "ordering": {"name": "z_curve"},
        "prior": {"name": "maskgit", "params": {"n_layer": 1, "n_embd": 16, "n_head": 2}},
        "sampler": {"name": "top_p"},
    }, registry=test_registry)
    assert cfg.prior is not None
    p = cfg.prior.params
    assert (p["vocab_size"], p["cond_vocab_size"], p["height"], p["width"]) == (16, 5, 8, 8)
    with pytest.raises(vqgen.ConfigError, match=r"prior.params.height: 4, but the data's"):
        parse_config({"data": {"name": "shapes", "params": {"resolution": 32}},
                      "tokenizer": {"name": "stub_tokenizer"},
                      "prior": {"name": "maskgit", "params": {"height": 4}}},
                     registry=test_registry)
    with pytest.raises(vqgen.ConfigError, match=r"prior.params: maskgit adds a spatial "
                                                r"condition cell by cell, but it has 16 tokens"):
        parse_config({"data": {"name": "shapes", "params": {"resolution": 32}},
                      "tokenizer": {"name": "stub_tokenizer"},
                      "conditioner": {"name": "segmentation",
                                      "params": {"mode": "downsample", "downsample": 8}},
                      "prior": {"name": "maskgit"}}, registry=test_registry)
    with pytest.raises(vqgen.ConfigError, match=r"n_embd=10 is not divisible by n_head=4"):
        parse_config({"data": {"name": "shapes"}, "tokenizer": {"name": "stub_tokenizer"},
                      "prior": {"name": "maskgit", "params": {"n_embd": 10, "n_head": 4}}},
                     registry=test_registry)


def test_a_prefix_class_token_is_a_position_of_its_own() -> None:
    """class_token: prefix feeds the class as a token before the cells: [B, L, V] logits
    that depend on the class; the default (add) draws the same initial weights as before
    the option existed (the prefix's position is drawn last); a spatial map is still added
    cell by cell; pipelines sample with it."""
    add, pre = tiny(cond_vocab_size=5), tiny(cond_vocab_size=5, class_token="prefix")
    assert add.cond_pos is None and pre.cond_pos is not None
    shared = add.state_dict()
    for k, v in pre.state_dict().items():
        if k != "cond_pos":
            assert torch.equal(v, shared[k]), k  # same stream up to the new parameter
    seq = torch.full((2, 16), -1)  # (B, L): all masked
    with torch.no_grad():
        a = pre.masked_logits(seq, torch.tensor([[V], [V]]))  # (2, L, V)
        b = pre.masked_logits(seq, torch.tensor([[V], [V + 3]]))
        spatial = pre.masked_logits(seq, torch.full((2, 16), V + 1))  # a map: added
    assert a.shape == (2, 16, V) and spatial.shape == (2, 16, V)
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])
    pipe = Pipeline(StubTokenizer(), pre, grid=(4, 4), sampler=sampler(), conditioner=classes())
    assert pipe.generate(2, [0, 3], seed=0, guidance=2.0).codes.shape == (2, 4, 4)
