"""Stage-1 training: the loop, its logs, checkpoints, resume and error paths."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

import vqgen
from vqgen.core.config import PipelineConfig, StageTrainConfig, parse_config
from vqgen.core.errors import VqgenError
from vqgen.core.interfaces import ParamsModel
from vqgen.plugins.kmeans import KMeansTokenizer
from vqgen.plugins.shapes import ShapesDataset
from vqgen.plugins.vqgan import VQGAN, VQGANSegmentation
from vqgen.training.engine import (
    batch_stream,
    check_finite,
    load_component,
    lr_at,
    make_adam,
    resolve_lr,
    train_tokenizer,
)

TINY: dict[str, Any] = {
    "ch": 8, "ch_mult": [1, 2, 2], "norm_groups": 4, "z_channels": 4, "embed_dim": 4,
    "n_embed": 16,
}
TINY_GAN: dict[str, Any] = {
    **TINY, "perceptual_weight": 0.0, "disc_n_layers": 2, "disc_ch": 8, "disc_start": 1000,
}


pytestmark = pytest.mark.usefixtures("one_thread")


class NaNShapes(ShapesDataset):
    """Shapes whose images turn to NaN from index 8 on (to provoke a non-finite loss)."""

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = super().__getitem__(index)
        if index >= 8:
            sample["image"] = torch.full_like(sample["image"], float("nan"))
        return sample


class Probe(VQGAN):
    """VQGAN that remembers its loss module and the discriminator's initial state."""

    built: list[tuple[nn.Module, dict[str, torch.Tensor]]] = []

    def build_loss(self) -> nn.Module:
        loss = super().build_loss()
        snapshot = {k: v.clone() for k, v in loss.discriminator.state_dict().items()}
        Probe.built.append((loss, snapshot))
        return loss


@pytest.fixture(scope="module")
def reg() -> vqgen.Registry:
    r = vqgen.default_registry().copy()
    for kind, name, cls in [
        ("dataset", "shapes", ShapesDataset),
        ("tokenizer", "vqgan", VQGAN),
        ("tokenizer", "vqgan_segmentation", VQGANSegmentation),
        ("tokenizer", "kmeans", KMeansTokenizer),
    ]:
        if name not in r.list(kind):
            r.add(kind, name, cls)
    r.add("dataset", "nan_shapes", NaNShapes)
    r.add("tokenizer", "vqgan_probe", Probe)
    return r


def config(
    reg: vqgen.Registry,
    tokenizer: str,
    params: dict[str, Any],
    data: str = "shapes",
    length: int = 256,
    **train: Any,
) -> PipelineConfig:
    settings = {"batch_size": 4, "lr": 2e-3, "log_every": 5, "image_every": 0, **train}
    return parse_config(
        {
            "data": {"name": data, "params": {"resolution": 32, "length": length}},
            "tokenizer": {"name": tokenizer, "params": params},
            "train": {"tokenizer": settings},
        },
        registry=reg,
    )


def records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_learning_rate_rule() -> None:
    cfg = StageTrainConfig(batch_size=8, grad_accum=2, base_lr=1e-4)
    assert resolve_lr(cfg) == pytest.approx(1.6e-3)
    assert resolve_lr(cfg, world=4) == pytest.approx(6.4e-3)
    assert resolve_lr(StageTrainConfig(lr=3e-4, batch_size=8)) == 3e-4


@pytest.mark.parametrize("decoupled", [False, True])
def test_make_adam_is_fused_on_the_cpu_and_matches_plain_adam(decoupled: bool) -> None:
    torch.manual_seed(0)
    w0 = torch.randn(5, 4)
    grads = [torch.randn(5, 4) for _ in range(3)]
    a, b = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    fused = make_adam([a], 1e-2, (0.5, 0.9), decoupled=decoupled)
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    plain = cls([b], lr=1e-2, betas=(0.5, 0.9))
    assert fused.param_groups[0]["fused"] is True and type(fused) is cls
    for g in grads:
        a.grad, b.grad = g.clone(), g.clone()
        fused.step()
        plain.step()
    assert torch.allclose(a, b, atol=1e-6)


def test_make_adam_falls_back_where_fusing_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    class NoFused(torch.optim.Adam):
        def __init__(self, *args: Any, fused: bool | None = None, **kwargs: Any) -> None:
            if fused:
                raise RuntimeError("`fused=True` requires all the params to be floating point")
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", NoFused)
    opt = make_adam([nn.Parameter(torch.zeros(3))], 1e-3, (0.9, 0.99))
    assert isinstance(opt, NoFused) and not opt.param_groups[0]["fused"]


def test_short_run_lowers_the_loss_and_writes_a_run_directory(
    reg: vqgen.Registry, tmp_path: Path
) -> None:
    # eight images seen again and again: the tiny model must learn them quickly
    cfg = config(reg, "vqgan", {**TINY_GAN, "disc_start": 45}, length=8, steps=60,
                 batch_size=8, log_every=10, image_every=30)
    tok = train_tokenizer(cfg, tmp_path, registry=reg, progress=False)
    assert not tok.training
    recs = records(tmp_path)
    assert [r["step"] for r in recs] == list(range(10, 70, 10))
    assert recs[-1]["rec"] < 0.85 * recs[0]["rec"]
    for key in ("loss", "rec", "perceptual", "codebook", "g", "lambda", "usage", "perplexity"):
        assert key in recs[0]
    assert recs[0]["lambda"] == 0 and recs[-1]["lambda"] > 0 and "disc" in recs[-1]
    ckpt = tmp_path / "tokenizer"
    weights = load_file(str(ckpt / "weights.safetensors"))
    assert set(weights) == set(tok.state_dict())  # no LPIPS, no discriminator
    assert set(load_file(str(ckpt / "discriminator.safetensors"))) >= {"main.0.weight"}
    meta = json.loads((ckpt / "meta.json").read_text())
    assert (meta["kind"], meta["name"], meta["step"]) == ("tokenizer", "vqgan", 60)
    assert meta["params"]["disc_start"] == 45 and "rec" in meta["metrics"]
    state = torch.load(ckpt / "train_state.pt", weights_only=True)
    assert state["step"] == 60 and state["opt_g"]["state"] and state["opt_d"]["state"]
    grids = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert grids == ["tokenizer_000030.png", "tokenizer_000060.png"]
    with Image.open(tmp_path / "images" / grids[0]) as im:
        assert im.size == (8 * 34 + 2, 2 * 34 + 2)  # inputs above reconstructions
    again = load_component(ckpt, reg)
    x = torch.stack([ShapesDataset(split="val")[i]["image"] for i in range(4)])
    assert torch.equal(again.encode(x), tok.encode(x))


@pytest.mark.parametrize(("schedule", "warmup"), [(None, 0), ("constant", 2), ("cosine", 2)])
def test_stage1_learning_rate_schedule(
    reg: vqgen.Registry, tmp_path: Path, schedule: str | None, warmup: int
) -> None:
    extra = {"lr_schedule": schedule} if schedule else {}
    cfg = config(reg, "vqgan", TINY_GAN, steps=6, log_every=1, warmup_steps=warmup, **extra)
    train_tokenizer(cfg, tmp_path, registry=reg, progress=False)
    logged = [r["lr"] for r in records(tmp_path)]
    expected = [lr_at(s, 2e-3, warmup, 6, schedule=schedule or "constant") for s in range(6)]
    assert logged == pytest.approx(expected, rel=1e-6)
    if schedule == "cosine":  # warm-up, then decay towards 10 % of the base rate
        assert logged[0] == pytest.approx(1e-3) and logged[1] == pytest.approx(2e-3)
        assert logged[2] > logged[3] > logged[4] > logged[5] > 2e-4
    else:
        assert logged[warmup:] == pytest.approx([2e-3] * (6 - warmup))


def test_discriminator_untouched_before_disc_start_and_trained_after(
    reg: vqgen.Registry, tmp_path: Path
) -> None:
    Probe.built.clear()
    for steps in (3, 5):
        cfg = config(reg, "vqgan_probe", {**TINY_GAN, "disc_start": 3}, steps=steps)
        train_tokenizer(cfg, None, registry=reg, progress=False)
    (before_loss, before_init), (after_loss, after_init) = Probe.built
    unchanged = before_loss.discriminator.state_dict()
    assert all(torch.equal(unchanged[k], v) for k, v in before_init.items())
    changed = after_loss.discriminator.state_dict()
    params = [n for n, _ in after_loss.discriminator.named_parameters()]
    weights = [n for n in params if n.endswith("weight")]  # a bias may get zero gradient
    assert all(not torch.equal(changed[n], after_init[n]) for n in weights)


@pytest.mark.parametrize("disc_loss", ["hinge", "vanilla"])
def test_gan_losses_train(reg: vqgen.Registry, disc_loss: str) -> None:
    cfg = config(reg, "vqgan", {**TINY_GAN, "disc_start": 0, "disc_loss": disc_loss}, steps=2,
                 log_every=1)
    train_tokenizer(cfg, None, registry=reg, progress=False)


def test_resume_continues_exactly(reg: vqgen.Registry, tmp_path: Path) -> None:
    params = {**TINY_GAN, "disc_start": 2, "restart_after": 1}
    whole = train_tokenizer(config(reg, "vqgan", params, steps=4), tmp_path / "a",
                            registry=reg, progress=False)
    train_tokenizer(config(reg, "vqgan", params, steps=2, checkpoint_every=2), tmp_path / "b",
                    registry=reg, progress=False)
    resumed = train_tokenizer(config(reg, "vqgan", params, steps=4), tmp_path / "b",
                              registry=reg, progress=False, resume=True)
    for k, v in whole.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    assert [r["step"] for r in records(tmp_path / "b")] == [2, 4]


def test_segmentation_tokenizer_trains_on_label_maps(reg: vqgen.Registry, tmp_path: Path) -> None:
    cfg = config(reg, "vqgan_segmentation", TINY, steps=10, image_every=10)
    tok = train_tokenizer(cfg, tmp_path, registry=reg, progress=False)
    recs = records(tmp_path)
    assert "ce" in recs[0] and recs[-1]["ce"] < recs[0]["ce"]
    assert (tmp_path / "images" / "tokenizer_000010.png").is_file()
    seg = ShapesDataset(split="val")[0]["segmentation"][None]
    assert tok.encode(seg).shape == (1, 8, 8)


def test_kmeans_training_is_its_fit(reg: vqgen.Registry, tmp_path: Path) -> None:
    cfg = config(reg, "kmeans", {"n_embed": 32, "sample_pixels": 1024}, steps=8,
                 image_every=8)
    tok = train_tokenizer(cfg, tmp_path, registry=reg, progress=False)
    assert {"mse", "usage", "perplexity"} <= set(records(tmp_path)[-1])
    x = torch.stack([ShapesDataset(split="val")[i]["image"] for i in range(8)])
    untrained = KMeansTokenizer(n_embed=32)
    error = (tok.decode(tok.encode(x)) - x).square().mean()
    assert error < (untrained.decode(untrained.encode(x)) - x).square().mean()
    assert (tmp_path / "images" / "tokenizer_000008.png").is_file()
    again = load_component(tmp_path / "tokenizer", reg)
    assert torch.equal(again.centroids, tok.centroids)


def test_non_finite_loss_names_the_step_and_term(reg: vqgen.Registry) -> None:
    cfg = config(reg, "vqgan", {**TINY_GAN, "kmeans_init": False}, data="nan_shapes",
                 steps=50, batch_size=4)
    # the term that blew up comes first, the total it makes non-finite after it
    with pytest.raises(VqgenError, match=r"non-finite loss at step \d+: rec = nan.*loss = nan"):
        train_tokenizer(cfg, None, registry=reg, progress=False)
    with pytest.raises(VqgenError, match="step 7: g = inf"):
        check_finite(7, {"rec": 0.1, "g": float("inf")})
    with pytest.raises(VqgenError, match=r"step 3: codebook = nan, loss = nan\. Lower"):
        check_finite(3, {"loss": float("nan"), "rec": 0.2, "codebook": float("nan")})
    check_finite(3, {"loss": 1.0, "rec": 0.5})  # finite: no error


def test_untrainable_tokenizer_and_missing_input_are_errors(
    reg: vqgen.Registry, test_registry: vqgen.Registry
) -> None:
    r = test_registry.copy()
    if "shapes" not in r.list("dataset"):
        r.add("dataset", "shapes", ShapesDataset)
    with pytest.raises(VqgenError, match="neither fit_step"):
        train_tokenizer(config(r, "stub_tokenizer", {}, steps=1), None, registry=r,
                        progress=False)
    cfg = config(reg, "vqgan", TINY_GAN, steps=1, input_key="edges")
    with pytest.raises(VqgenError, match="no 'edges'"):
        train_tokenizer(cfg, None, registry=reg, progress=False)


class _Range(torch.utils.data.Dataset):
    class Params(ParamsModel):
        pass

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> int:
        return i


def test_batch_stream_is_resumable() -> None:
    full = [b.tolist() for _, b in zip(range(7), batch_stream(_Range(), 3, seed=5), strict=False)]
    later = [b.tolist() for _, b in zip(range(3), batch_stream(_Range(), 3, seed=5, start=4),
                                        strict=False)]
    assert later == full[4:]
    assert all(len(b) == 3 for b in full)  # the last partial batch of an epoch is dropped
    assert sorted(sum(full[:3], [])) != sorted(sum(full[3:6], [])) or full[:3] != full[3:6]
