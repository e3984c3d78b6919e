"""The small image classifier and segmentation net, their files and metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from vqgen.core.errors import VqgenError
from vqgen.plugins.judges import (
    FORMAT,
    ImageClassifier,
    SegmentationNet,
    accuracy,
    degrade,
    iou_per_class,
    load_classifier,
    load_segmenter,
    mean_iou,
    predict_segmentation,
    save_classifier,
)
from vqgen.plugins.shapes import CLASSES, ShapesDataset
from vqgen.training.judges import main, train_classifier, train_segmenter

pytestmark = pytest.mark.usefixtures("one_thread")


def stack(ds: ShapesDataset, key: str) -> torch.Tensor:
    return torch.stack([ds[i][key] for i in range(len(ds))])


# -- models --------------------------------------------------------------------


@pytest.mark.parametrize("size", [(16, 16), (32, 32), (48, 40), (17, 23)])
def test_shapes_at_any_resolution(size: tuple[int, int]) -> None:
    x = torch.rand(2, 3, *size) * 2 - 1
    assert ImageClassifier(n_classes=4)(x).shape == (2, 4)
    assert SegmentationNet(n_classes=5)(x).shape == (2, 5, *size)


def test_a_colour_shift_does_not_matter() -> None:
    torch.manual_seed(0)
    model, seg = ImageClassifier().eval(), SegmentationNet().eval()
    x = torch.rand(2, 3, 32, 32) * 0.5
    shift = torch.tensor([0.3, -0.2, 0.1])[:, None, None]  # (3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(x), model(x + shift), atol=1e-5)
        assert torch.allclose(seg(x), seg(x + shift), atol=1e-5)


# -- training ------------------------------------------------------------------


@pytest.fixture(scope="module")
def few() -> list[dict[str, torch.Tensor]]:
    """16 ``shapes`` samples in memory: small enough to overfit in a few steps."""
    ds = ShapesDataset(length=16)
    return [ds[i] for i in range(len(ds))]


def test_training_loss_falls_and_is_deterministic(few: list[dict[str, torch.Tensor]]) -> None:
    h1: list[float] = []
    h2: list[float] = []
    kw = dict(steps=30, batch_size=16, lr=1e-2, seed=1, progress=False, n_classes=4, n_stages=2)
    model = train_classifier(few, history=h1, **kw)
    assert len(h1) == 30 and sum(h1[-5:]) / 5 < 0.85 * sum(h1[:5]) / 5
    assert not model.training and model.arch["n_classes"] == 4
    train_classifier(few, history=h2, **{**kw, "steps": 5})
    train_classifier(few, history=h2, **{**kw, "steps": 5})
    assert h2[:5] == h2[5:]  # the same seed trains the same model


def test_classes_and_resolution_come_from_the_dataset() -> None:
    model = train_classifier(ShapesDataset(length=4), steps=1, batch_size=2, progress=False)
    assert model.classes == CLASSES and model.resolution == 32 and model.arch["n_classes"] == 4


def test_segmenter_loss_falls(few: list[dict[str, torch.Tensor]]) -> None:
    h: list[float] = []
    kw = dict(steps=20, batch_size=8, lr=1e-2, seed=0, progress=False, history=h)
    model = train_segmenter(few, n_classes=5, width=8, **kw)
    assert model.arch["n_classes"] == len(CLASSES) + 1
    assert sum(h[-5:]) / 5 < 0.85 * sum(h[:5]) / 5
    pred = predict_segmentation(model, torch.stack([s["image"] for s in few[:4]]))
    assert pred.shape == (4, 32, 32) and pred.dtype == torch.int64


def test_dataset_without_classes_needs_n_classes() -> None:
    data = [{"image": torch.zeros(3, 16, 16), "label": torch.tensor(0)}] * 4
    with pytest.raises(VqgenError, match="n_classes"):
        train_classifier(data, steps=1, batch_size=2, progress=False)
    model = train_classifier(data, steps=1, batch_size=2, progress=False, n_classes=3)
    assert model.arch["n_classes"] == 3 and model.classes is None
    with pytest.raises(VqgenError, match="'segmentation'"):
        train_segmenter(data, steps=1, batch_size=2, progress=False, n_classes=3)


@pytest.mark.slow
def test_held_out_accuracy_after_short_training() -> None:
    model = train_classifier(ShapesDataset(resolution=32), steps=600, progress=False)
    val = ShapesDataset(resolution=32, split="val", length=500)
    assert accuracy(model, stack(val, "image"), stack(val, "label")) >= 0.90


def test_degrade_softens_some_images_reproducibly() -> None:
    x = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    a = degrade(x, torch.Generator().manual_seed(1))
    b = degrade(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == x.shape
    assert float(a.min()) >= -1 and float(a.max()) <= 1
    changed = (a - x).abs().flatten(1).amax(1) > 0  # (64,)
    assert 20 <= int(changed.sum()) <= 56  # p = 0.6 of 64 images
    # a softened random image loses most of its pixel-level variation
    assert float((a[changed] - a[changed].mean((2, 3), keepdim=True)).std()) < 0.7 * float(
        x.std())
    assert torch.equal(degrade(x, torch.Generator().manual_seed(1), p=0.0), x)


def test_augmented_training_is_deterministic_and_differs(
    few: list[dict[str, torch.Tensor]],
) -> None:
    plain, aug, aug2 = [], [], []
    train_classifier(few, steps=4, batch_size=8, progress=False, n_classes=4, history=plain)
    for hist in (aug, aug2):
        train_classifier(few, steps=4, batch_size=8, progress=False, n_classes=4,
                         history=hist, augment=True)
    assert aug == aug2 and aug != plain


@pytest.mark.slow
def test_augmented_judge_is_accurate_on_real_and_blurred_images() -> None:
    model = train_classifier(ShapesDataset(resolution=32), steps=800, progress=False,
                             augment=True)
    val = ShapesDataset(resolution=32, split="val", length=500)
    x, y = stack(val, "image"), stack(val, "label")
    assert accuracy(model, x, y) >= 0.90
    blurred = torch.nn.functional.interpolate(
        torch.nn.functional.interpolate(x, scale_factor=0.25, mode="area"), size=(32, 32),
        mode="bilinear", align_corners=False)  # (500, 3, 32, 32): 8 × 8 detail only
    assert accuracy(model, blurred, y) >= 0.75


# -- files ---------------------------------------------------------------------


def test_save_load_round_trips_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    clf = ImageClassifier(n_classes=3, width=8, n_stages=2, classes=["a", "b", "c"], resolution=16)
    seg = SegmentationNet(n_classes=4, width=8, resolution=16)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    p1 = save_classifier(clf.eval(), tmp_path / "clf.safetensors")
    p2 = save_classifier(seg.eval(), tmp_path / "sub" / "seg.safetensors")
    a, b = load_classifier(p1), load_segmenter(p2)
    assert isinstance(a, ImageClassifier) and isinstance(b, SegmentationNet)
    assert a.arch == clf.arch and a.classes == ["a", "b", "c"] and a.resolution == 16
    assert b.arch == seg.arch and b.classes is None
    with torch.no_grad():
        assert torch.equal(a(x), clf(x)) and torch.equal(b(x), seg(x))
    assert sorted(p.name for p in tmp_path.rglob("*")) == [
        "clf.safetensors",
        "seg.safetensors",
        "sub",
    ]


def test_bad_files_are_named(tmp_path: Path) -> None:
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(VqgenError, match="missing.safetensors does not exist"):
        load_classifier(missing)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x80\x04 a pickle, perhaps")
    with pytest.raises(VqgenError, match="garbage.pt: not a safetensors file"):
        load_classifier(garbage)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(VqgenError, match="foreign.safetensors is a safetensors file but not"):
        load_classifier(foreign)
    seg = save_classifier(SegmentationNet(width=8), tmp_path / "seg.safetensors")
    with pytest.raises(VqgenError, match="seg.safetensors holds a SegmentationNet"):
        load_classifier(seg)
    clf = ImageClassifier(width=8)
    state = {k: v.contiguous() for k, v in clf.state_dict().items()}
    meta = {"format": FORMAT, "model": "ImageClassifier", "arch": json.dumps(clf.arch)}
    state.pop("head.bias")
    save_file(state, str(tmp_path / "damaged.safetensors"), metadata=meta)
    with pytest.raises(VqgenError, match="damaged.safetensors is damaged"):
        load_classifier(tmp_path / "damaged.safetensors")
    with pytest.raises(TypeError, match="set_classifier"):
        save_classifier(nn.Linear(2, 2), tmp_path / "x.safetensors")  # type: ignore[arg-type]


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "c.safetensors"
    args = ["--data-params", '{"resolution": 32, "length": 16}', "--steps", "2"]
    assert main([*args, "--batch-size", "4", "--out", str(out)]) == 0
    assert "held-out accuracy" in capsys.readouterr().out
    assert isinstance(load_classifier(out), ImageClassifier)
    assert main([*args, "--batch-size", "4", "--augment", "--out", str(tmp_path / "a.st")]) == 0


# -- metrics -------------------------------------------------------------------


def test_mean_iou_hand_examples() -> None:
    pred = torch.tensor([[0, 1], [1, 1]])
    target = torch.tensor([[0, 1], [0, 1]])
    # class 0: 1 shared of 2 → 1/2; class 1: 2 shared of 3 → 2/3; class 2 in neither: skipped
    iou = iou_per_class(pred, target, 3)
    assert iou[:2].tolist() == [0.5, 2 / 3] and math.isnan(iou[2])
    assert mean_iou(pred, target, 3) == pytest.approx(7 / 12, rel=1e-15)
    assert mean_iou(target, target, 3) == 1.0
    assert mean_iou(torch.zeros(2, 2), torch.ones(2, 2), 2) == 0.0
    # pooled over the batch, not averaged per image
    p = torch.tensor([[[1, 1]], [[0, 0]]])
    t = torch.tensor([[[1, 0]], [[0, 0]]])
    assert mean_iou(p, t, 2) == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert math.isnan(mean_iou(torch.zeros(0), torch.zeros(0), 2))
    with pytest.raises(ValueError, match="outside"):
        mean_iou(torch.tensor([3]), torch.tensor([0]), 3)


def test_accuracy_hand_example() -> None:
    class Fixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.stack([x.mean(dim=(1, 2, 3)), -x.mean(dim=(1, 2, 3))], dim=1) + self.w

    images = torch.tensor([1.0, -1.0, 0.5, -0.5, 1.0])[:, None, None, None].expand(-1, 3, 4, 4)
    labels = torch.tensor([0, 1, 1, 1, 0])
    assert accuracy(Fixed(), images, labels, batch_size=2) == 4 / 5
