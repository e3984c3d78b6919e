"""The procedural ``shapes`` dataset and its writer, read back by the ``folder`` dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch.utils.data import DataLoader

import vqgen
from vqgen.core.errors import VqgenError
from vqgen.plugins.folder import FolderDataset
from vqgen.plugins.shapes import CLASSES, KEYPOINT_NAMES, SKELETON, ShapesDataset, write_shapes

KEYS = ("image", "label", "segmentation", "depth", "keypoints")


def as_bytes(sample: dict[str, torch.Tensor]) -> tuple[bytes, ...]:
    return tuple(sample[k].numpy().tobytes() for k in KEYS)


def test_registered_with_metadata() -> None:
    ds = vqgen.create("dataset", "shapes", {"resolution": 48, "length": 7})
    assert isinstance(ds, ShapesDataset) and len(ds) == 7
    assert ds.classes == CLASSES == sorted(CLASSES) and len(CLASSES) >= 4
    assert ds.keypoint_names == KEYPOINT_NAMES and ds.skeleton == SKELETON
    assert all(0 <= i < len(KEYPOINT_NAMES) and 0 <= j < len(KEYPOINT_NAMES) for i, j in SKELETON)
    with pytest.raises(vqgen.ComponentError, match="resolution"):
        vqgen.create("dataset", "shapes", {"resolution": 16})
    with pytest.raises(IndexError):
        ds[7]


def test_deterministic_and_independent_of_access_order() -> None:
    a, b = ShapesDataset(max_shapes=3), ShapesDataset(max_shapes=3)
    later = [as_bytes(b[i]) for i in (4, 2, 0)]
    assert [as_bytes(a[i]) for i in (0, 2, 4)] == later[::-1]
    assert as_bytes(a[0]) == as_bytes(a[0])
    assert a[0]["image"].numpy().tobytes() != a[1]["image"].numpy().tobytes()
    other = ShapesDataset(max_shapes=3, seed=1)
    assert a[0]["image"].numpy().tobytes() != other[0]["image"].numpy().tobytes()
    # the length does not change the samples
    assert as_bytes(ShapesDataset(max_shapes=3, length=5)[3]) == as_bytes(a[3])


def test_train_and_val_differ() -> None:
    train, val = ShapesDataset(), ShapesDataset(split="val")
    for i in range(10):
        assert not torch.equal(train[i]["image"], val[i]["image"])


def check_sample(s: dict[str, torch.Tensor], res: int, max_shapes: int) -> None:
    assert set(s) == set(KEYS)
    assert s["image"].shape == (3, res, res) and s["image"].dtype == torch.float32
    assert s["image"].min() >= -1 and s["image"].max() <= 1
    u8 = (s["image"] + 1) * 127.5  # exactly 8-bit levels
    assert torch.allclose(u8, u8.round(), atol=1e-4)
    assert s["label"].shape == () and s["label"].dtype == torch.int64
    assert 0 <= s["label"] < len(CLASSES)
    seg = s["segmentation"]
    assert seg.shape == (res, res) and seg.dtype == torch.int64
    assert seg.min() >= 0 and seg.max() <= len(CLASSES)
    assert (seg == s["label"] + 1).any()  # the main shape is visible
    assert s["depth"].shape == (1, res, res) and s["depth"].dtype == torch.float32
    assert s["depth"].min() >= 0 and s["depth"].max() <= 1
    kp = s["keypoints"]
    assert kp.shape == (max_shapes, len(KEYPOINT_NAMES), 3) and kp.dtype == torch.float32
    vis = kp[..., 2]
    assert ((vis == 0) | (vis == 1)).all()
    assert (kp[vis == 0] == 0).all()  # invisible and padded points are (0, 0, 0)
    xy = kp[vis == 1][:, :2]
    assert ((xy >= 0) & (xy < res)).all()
    assert vis[0, 0] == 1  # the main shape's centre is always inside


@pytest.mark.parametrize("res", [32, 64])
@pytest.mark.parametrize("max_shapes", [1, 4])
def test_format(res: int, max_shapes: int) -> None:
    ds = ShapesDataset(resolution=res, max_shapes=max_shapes)
    for i in range(25):
        check_sample(ds[i], res, max_shapes)
    if max_shapes > 1:  # several objects do occur
        counts = [int((ds[i]["keypoints"][..., 2].sum(-1) > 0).sum()) for i in range(25)]
        assert max(counts) > 1


def test_format_at_256() -> None:
    ds = ShapesDataset(resolution=256, max_shapes=2)
    for i in range(2):
        check_sample(ds[i], 256, 2)


def test_classes_segmentation_keypoints_and_depth() -> None:
    ds = ShapesDataset(max_shapes=1)
    labels = []
    for i in range(200):
        s = ds[i]
        label, seg, kp = int(s["label"]), s["segmentation"], s["keypoints"]
        labels.append(label)
        assert set(seg.unique().tolist()) <= {0, label + 1}
        # a single shape: every visible keypoint's centre lies in its segmentation
        x, y, v = kp[0, 0].tolist()
        assert v == 1 and seg[int(y), int(x)] == label + 1
        # depth: the background is a plane in [0.6, 1], the shape a card in [0.1, 0.5]
        obj = seg > 0
        far = torch.nn.functional.max_pool2d(obj[None, None].float(), 5, 1, 2)[0, 0] == 0
        d = s["depth"][0].double()
        assert d[obj].min() <= 0.5 and d[far].min() >= 0.6 - 1e-6
        yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
        basis = torch.stack([torch.ones_like(xx), xx, yy], -1).double()  # (H, W, 3)
        coef = torch.linalg.lstsq(basis[far], d[far][:, None]).solution
        plane = (basis @ coef)[..., 0]  # (H, W)
        assert torch.allclose(d[far], plane[far], atol=1e-5)
        assert (d[obj] < plane[obj]).all()  # every object pixel is nearer than the background
        # boundary points lie on the shape's edge: next to pixels the shape partly covers
        touched = d < plane - 1e-5
        for x, y, v in kp[0, 1:].tolist():
            if v:
                r0, c0 = int(y), int(x)
                assert touched[max(r0 - 1, 0) : r0 + 2, max(c0 - 1, 0) : c0 + 2].any()
                if CLASSES[label] in ("circle", "square"):  # blunt: a labelled pixel is near
                    near = seg[max(r0 - 1, 0) : r0 + 2, max(c0 - 1, 0) : c0 + 2]
                    assert (near == label + 1).any()
    assert set(labels) == set(range(len(CLASSES)))
    assert min(np.bincount(labels)) > 20  # roughly balanced


def test_several_shapes() -> None:
    ds = ShapesDataset(max_shapes=4, resolution=64)
    for i in range(40):
        s = ds[i]
        label, seg, kp, d = int(s["label"]), s["segmentation"], s["keypoints"], s["depth"][0]
        x, y, v = kp[0, 0].tolist()  # the main shape is front-most: its centre is its own
        assert v == 1 and seg[int(y), int(x)] == label + 1
        assert d[int(y), int(x)] == d[seg > 0].min()  # and nearest
        n_obj = int((kp[..., 2].sum(-1) > 0).sum())
        assert len(set(seg.unique().tolist()) - {0}) <= n_obj


def test_dataloader_batches() -> None:
    batch = next(iter(DataLoader(ShapesDataset(max_shapes=2), batch_size=4)))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["label"].shape == (4,)
    assert batch["keypoints"].shape == (4, 2, 5, 3) and batch["depth"].shape == (4, 1, 32, 32)


# -- write_shapes → folder -------------------------------------------------------------
def test_written_folder_reads_back_identically(tmp_path: Path) -> None:
    out = write_shapes(tmp_path / "data", 40, max_shapes=2, progress=False)
    assert out == tmp_path / "data"
    assert sorted(p.name for p in (out / "images").iterdir()) == CLASSES
    assert (out / "segmentation" / "000000.png").is_file()
    assert (out / "depth" / "000039.png").is_file()
    meta = json.loads((out / "shapes.json").read_text())
    assert meta["classes"] == CLASSES and meta["keypoint_names"] == KEYPOINT_NAMES

    shapes = ShapesDataset(max_shapes=2)
    folder = FolderDataset(root=str(out), resolution=32, max_objects=2, held_out=0)
    assert folder.classes == CLASSES and len(folder) == 40
    assert folder.conditions == ["segmentation", "depth", "keypoints"]
    for i, sample in enumerate(folder.samples):
        a, b = shapes[int(sample.image.stem)], folder[i]
        assert set(b) == set(KEYS)
        assert torch.allclose(a["image"], b["image"], atol=1 / 127.5 + 1e-6)
        assert torch.equal(a["label"], b["label"])
        assert sample.image.parent.name == CLASSES[int(a["label"])]
        assert torch.equal(a["segmentation"], b["segmentation"])
        assert torch.allclose(a["depth"], b["depth"], atol=1 / 65535)
        assert torch.equal(a["keypoints"], b["keypoints"])


def test_writer_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    out = write_shapes(tmp_path, 6, progress=False)
    with pytest.raises(VqgenError, match=f"{tmp_path}.*not empty"):
        write_shapes(tmp_path, 3, progress=False)
    (tmp_path / "keep.txt").write_text("mine")
    write_shapes(tmp_path, 3, progress=False, overwrite=True, split="val")
    assert (tmp_path / "keep.txt").read_text() == "mine"
    stems = sorted(p.stem for p in (out / "images").rglob("*.png"))
    assert stems == ["000000", "000001", "000002"]
    assert json.loads((out / "shapes.json").read_text())["params"]["split"] == "val"
    with pytest.raises(VqgenError, match="n: "):
        write_shapes(tmp_path / "other", 0, progress=False)


def test_gray_background_and_palette_keep_class_geometry_random() -> None:
    simple = ShapesDataset(length=64, background="gray", palette=2)
    corners = {(255, 0, 0), (0, 0, 255)}  # the first two palette colours: red, blue
    labels, colours, centres = [], set(), set()
    for i in range(64):
        raw = simple.generate(i)
        img = raw.image.reshape(-1, 3)
        bg = raw.segmentation.reshape(-1) == 0
        # the background is exactly mid-grey away from the anti-aliased edges
        assert (np.abs(img[bg].astype(int) - 128) <= 1).mean() > 0.9
        inside = raw.segmentation.reshape(-1) > 0
        solid = {tuple(c) for c in img[inside] if tuple(c) in corners}
        assert solid, i  # shapes are painted in palette colours only
        colours |= solid
        labels.append(raw.label)
        centres.add(tuple(np.round(raw.keypoints[0, 0, :2])))
    assert colours == corners and set(labels) == {0, 1, 2, 3} and len(centres) > 50
    with pytest.raises(ValidationError):
        ShapesDataset(palette=9)
    with pytest.raises(ValidationError):
        ShapesDataset(background="noisy")  # type: ignore[arg-type]
