"""Spatial conditioners: tokens, grids, determinism, inputs, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cond_helpers import SPATIAL, TINY_MAP, make, shapes_batch
from PIL import Image

import vqgen
from vqgen.conditioners import ConditionInputs, SpatialConditioner
from vqgen.conditioners.canny import canny
from vqgen.conditioners.depth import load_depth
from vqgen.conditioners.pose import SHAPES_SKELETON, load_keypoints
from vqgen.plugins.shapes import SKELETON, ShapesDataset

VqgenError = vqgen.VqgenError


@pytest.fixture(params=list(SPATIAL))
def case(request: pytest.FixtureRequest) -> str:
    return request.param


# -- every spatial conditioner --------------------------------------------------
def test_tokens_grid_and_vocab(case: str) -> None:
    cond = make(case)
    assert isinstance(cond, SpatialConditioner) and cond.spatial
    batch = shapes_batch(4)
    grid = cond.grid(batch)
    tokens = cond.tokens(batch)
    assert grid.shape == (4, 8, 8) and grid.dtype == torch.int64
    assert torch.equal(tokens, grid.reshape(4, 64))  # row-major
    assert cond.null_id == cond.vocab_size - 1
    assert 0 <= int(tokens.min()) and int(tokens.max()) < cond.null_id  # null never emitted
    inner = cond.tokenizer.vocab_size if cond.tokenizer is not None else 5
    assert cond.vocab_size == inner + 1


def test_deterministic_per_sample_and_mode_independent(case: str) -> None:
    cond = make(case)
    batch = shapes_batch(4)
    tokens = cond.tokens(batch)
    assert torch.equal(cond.tokens(batch), tokens)
    half = {k: v[:2] for k, v in batch.items()}
    assert torch.equal(cond.tokens(half), tokens[:2])  # a sample's tokens ignore the others
    cond.train()
    assert torch.equal(cond.tokens(batch), tokens)  # encoded in eval mode, mode restored
    assert cond.tokenizer is None or cond.tokenizer.training


def test_condition_input_and_stage1_dataset(case: str) -> None:
    cond = make(case)
    batch = shapes_batch(2)
    x = cond.condition_input(batch)
    assert x.ndim == 4 and x.shape[0] == 2 and x.shape[-2:] == (32, 32)
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    if cond.tokenizer is not None:
        assert x.shape[1] == cond.tokenizer.in_channels
        data = ConditionInputs(ShapesDataset(length=2, max_shapes=2), cond)
        (key,) = data[1]
        assert key == getattr(cond.tokenizer, "input_key", "image")
        assert torch.allclose(data[1][key], x[1], atol=1e-6)


def test_without_null_token(case: str) -> None:
    name, params = SPATIAL[case]
    cond = vqgen.create("conditioner", name, {**params, "null_token": False})
    inner = cond.tokenizer.vocab_size if cond.tokenizer is not None else 5
    assert (cond.vocab_size, cond.null_id) == (inner, None)


@pytest.mark.parametrize("name", ["segmentation", "depth", "edge", "pose", "lowres"])
def test_default_cond_stage_matches_the_default_image_grid(name: str) -> None:
    """Default tokenizers have f = 4: a 32×32 condition gives the 8×8 grid of the image's."""
    torch.manual_seed(0)
    cond = vqgen.create("conditioner", name).eval()
    image_f = vqgen.create("tokenizer", "vqgan").downsample
    assert cond.tokenizer is not None and cond.tokenizer.downsample == image_f == 4
    assert cond.grid(shapes_batch(1)).shape == (1, 8, 8)
    assert cond.vocab_size == cond.tokenizer.vocab_size + 1 == 257


def test_tokenizer_spec_errors() -> None:
    # input channels left out: what the conditioner feeds; given and different: an error
    depth = vqgen.create("conditioner", "depth", {"tokenizer": {"name": "vqgan", "params": {}}})
    assert depth.tokenizer.in_channels == 1
    assert depth.params.tokenizer.params["in_channels"] == 1  # recorded in the config
    assert vqgen.create("conditioner", "segmentation", {"n_labels": 7}).tokenizer.in_channels == 7
    with pytest.raises(VqgenError, match="in_channels: 1"):
        vqgen.create("conditioner", "depth", {"tokenizer": {"name": "vqgan",
                                                            "params": {"in_channels": 3}}})
    with pytest.raises(VqgenError, match="n_labels: 7"):
        vqgen.create("conditioner", "segmentation", {"n_labels": 7, "tokenizer": {
            "name": "vqgan_segmentation", "params": {"n_labels": 5}}})
    with pytest.raises(VqgenError, match="unknown tokenizer 'vqgna'.*vqgan"):
        vqgen.create("conditioner", "edge", {"tokenizer": {"name": "vqgna"}})
    with pytest.raises(vqgen.ComponentError, match="tokenizer.colour"):
        vqgen.create("conditioner", "edge", {"tokenizer": {"name": "vqgan", "colour": 1}})


# -- segmentation -----------------------------------------------------------------
def test_segmentation_majority_vote() -> None:
    cond = vqgen.create("conditioner", "segmentation", {"mode": "downsample", "downsample": 2})
    assert cond.tokenizer is None and (cond.vocab_size, cond.null_id) == (6, 5)
    seg = torch.tensor([[[1, 1, 2, 0],
                         [1, 3, 2, 0],
                         [4, 4, 0, 0],
                         [4, 0, 0, 3]]])  # (1, 4, 4)
    assert cond.grid({"segmentation": seg}).tolist() == [[[1, 0], [4, 0]]]  # tie 2|0 → 0


def test_segmentation_errors_name_the_sample() -> None:
    cond = make("segmentation")
    batch = shapes_batch(3)
    seg = batch["segmentation"]
    bad = seg.clone()
    bad[2, 5, 5] = 9
    with pytest.raises(VqgenError, match=r"sample 2 has label 9, outside \[0, 5\)"):
        cond.tokens({"segmentation": bad})
    bad[1, 0, 0] = -1
    with pytest.raises(VqgenError, match=r"sample 1 has label -1"):
        cond.tokens({"segmentation": bad})
    with pytest.raises(VqgenError, match=r"\[B, H, W\]; got \(3, 32\)"):
        cond.tokens({"segmentation": seg[:, 0]})
    with pytest.raises(VqgenError, match="integer labels"):
        cond.tokens({"segmentation": seg.float()})
    with pytest.raises(VqgenError, match="segmentation is 16x32 pixels but the image is 32x32"):
        cond.tokens({"segmentation": seg[:, :16], "image": batch["image"]})
    with pytest.raises(VqgenError, match=r"missing segmentation.*batch\['segmentation'\]"):
        cond.tokens({"image": batch["image"]})


# -- depth ------------------------------------------------------------------------
def test_depth_is_normalised_per_image() -> None:
    cond = make("depth")
    depth = shapes_batch(3)["depth"]
    x = cond.condition_input({"depth": depth})
    assert torch.allclose(x.amin((1, 2, 3)), torch.tensor(-1.0)) and torch.allclose(
        x.amax((1, 2, 3)), torch.tensor(1.0)
    )
    scaled = depth * torch.tensor([3.0, 0.5, 10.0])[:, None, None, None] + 2  # affine per image
    assert torch.equal(cond.tokens({"depth": scaled}), cond.tokens({"depth": depth}))
    flat = cond.condition_input({"depth": torch.full((1, 1, 8, 8), 0.7)})
    assert torch.equal(flat, torch.zeros(1, 1, 8, 8))  # constant map → 0.5 → 0


def test_depth_errors_and_files(tmp_path: Path) -> None:
    cond = make("depth")
    depth = shapes_batch(2)["depth"]
    with pytest.raises(VqgenError, match=r"\[B, 1, H, W\]; got \(2, 32, 32\)"):
        cond.tokens({"depth": depth[:, 0]})
    bad = depth.clone()
    bad[1, 0, 3, 3] = float("nan")
    with pytest.raises(VqgenError, match="depth of sample 1 contains NaN"):
        cond.tokens({"depth": bad})
    u16 = np.rint(depth[0, 0].numpy() * 65535).astype(np.uint16)
    Image.fromarray(u16).save(tmp_path / "a.png")
    np.save(tmp_path / "b.npy", depth[1, 0].numpy())
    loaded = load_depth([tmp_path / "a.png", tmp_path / "b.npy"])
    assert loaded.shape == (2, 1, 32, 32)
    assert torch.allclose(loaded, depth, atol=1e-4)
    assert torch.equal(cond.tokens({"depth": [str(tmp_path / "a.png")]}),
                       cond.tokens({"depth": loaded[:1]}))
    with pytest.raises(VqgenError, match="depth of sample 1: no such file .*missing.npy"):
        cond.tokens({"depth": [tmp_path / "a.png", tmp_path / "missing.npy"]})


# -- edge -------------------------------------------------------------------------
def test_edge_from_image_or_batch() -> None:
    cond = make("edge")
    batch = shapes_batch(2)
    p = cond.params
    edges = canny(batch["image"], p.sigma, p.low_threshold, p.high_threshold)
    assert edges.sum() > 0
    assert torch.equal(cond.condition_input(batch), edges * 2 - 1)
    name, params = SPATIAL["edge"]
    torch.manual_seed(0)
    given = vqgen.create("conditioner", name, {**params, "source": "batch"}).eval()
    given.tokenizer.load_state_dict(cond.tokenizer.state_dict())
    assert torch.equal(given.tokens({"edges": edges}), cond.tokens(batch))
    with pytest.raises(VqgenError, match=r"missing edges.*source: batch"):
        given.tokens(batch)
    with pytest.raises(VqgenError, match=r"edges of sample 1 has values outside \[0, 1\]"):
        given.tokens({"edges": torch.stack([edges[0], edges[1] * 2])})
    with pytest.raises(VqgenError, match=r"missing image"):
        cond.tokens({"edges": edges})
    with pytest.raises(vqgen.ComponentError, match="low_threshold=0.5 is above"):
        vqgen.create("conditioner", "edge", {"low_threshold": 0.5, "high_threshold": 0.1})


@pytest.mark.parametrize("dilate", [1, 2])
def test_edge_dilate_grows_each_edge_pixel_to_a_square(dilate: int) -> None:
    name, params = SPATIAL["edge"]
    cond = vqgen.create("conditioner", name, {**params, "source": "batch", "dilate": dilate})
    edges = torch.zeros(1, 1, 16, 16)
    edges[0, 0, 5, 7] = 1.0
    edges[0, 0, 0, 15] = 1.0  # at the border: the square is cut, nothing wraps
    want = torch.zeros(1, 1, 16, 16)
    want[0, 0, 5 - dilate : 6 + dilate, 7 - dilate : 8 + dilate] = 1.0
    want[0, 0, : 1 + dilate, 15 - dilate :] = 1.0
    assert torch.equal(cond.condition_input({"edges": edges}), want * 2 - 1)
    plain = vqgen.create("conditioner", name, {**params, "source": "batch"})
    assert torch.equal(plain.condition_input({"edges": edges}), edges * 2 - 1)  # default: 0


# -- pose -------------------------------------------------------------------------
def test_pose_rendering() -> None:
    cond = make("pose")
    kp = torch.zeros(1, 2, 5, 3)  # (B, N, K, 3)
    kp[0, 0, 0] = torch.tensor([10.5, 20.5, 1])  # centre pixel (10, 20) → row 20, col 10
    kp[0, 0, 1] = torch.tensor([10.5, 10.5, 1])  # top: a limb 0–1 down column 10
    kp[0, 0, 2] = torch.tensor([25.5, 20.5, 0])  # invisible: no blob, no limb
    img = cond.render(kp, (32, 32))[0, 0]  # (H, W)
    assert img.shape == (32, 32) and 0 <= img.min() and img.max() <= 1
    assert img[20, 10] == 1 and img[10, 10] == 1 and img[15, 10] > 0.99  # joints, limb
    assert img[20, 25] < 1e-6 and img[20, 18] < 1e-6  # invisible point and its limb
    assert img[15, 14] < 1e-3  # off the limb
    assert cond.size({"keypoints": kp, "size": (48, 40)}) == (48, 40)
    assert cond.condition_input({"keypoints": kp, "size": (48, 40)}).shape == (1, 1, 48, 40)
    two = vqgen.create("conditioner", "pose", {"channels": 2, "tokenizer": {
        "name": "vqgan", "params": {**TINY_MAP, "in_channels": 2}}})
    limbs, joints = two.render(kp, (32, 32))[0]
    assert joints[15, 10] < 0.01 and limbs[15, 10] > 0.99
    three = vqgen.create("conditioner", "pose", {"channels": 3, "tokenizer": {
        "name": "vqgan", "params": {**TINY_MAP, "in_channels": 3}}})
    assert three.render(kp, (32, 32)).shape == (1, 3, 32, 32)
    assert vqgen.create("conditioner", "pose", {"channels": 3}).tokenizer.in_channels == 3
    with pytest.raises(VqgenError, match="in_channels: 3"):
        vqgen.create("conditioner", "pose", {"channels": 3, "tokenizer": {
            "name": "vqgan", "params": {**TINY_MAP, "in_channels": 1}}})


def test_pose_skeletons() -> None:
    assert SHAPES_SKELETON == [tuple(p) for p in SKELETON]
    auto = make("pose")
    assert auto.skeleton(5) == SHAPES_SKELETON and len(auto.skeleton(17)) == 19
    with pytest.raises(VqgenError, match="K=7.*list of"):
        auto.skeleton(7)
    coco = vqgen.create("conditioner", "pose", {"skeleton": "coco17"})
    with pytest.raises(VqgenError, match=r"coco17 joins keypoints \(15, 13\).*K=5"):
        coco.tokens(shapes_batch(1))
    custom = vqgen.create("conditioner", "pose", {"skeleton": [[0, 1], [1, 2]]})
    assert custom.skeleton(3) == [(0, 1), (1, 2)]


def test_pose_errors_and_json_files(tmp_path: Path) -> None:
    cond = make("pose")
    batch = shapes_batch(2)
    with pytest.raises(VqgenError, match=r"missing keypoints.*\[B, N, K, 3\]"):
        cond.tokens({"image": batch["image"]})
    with pytest.raises(VqgenError, match=r"\[B, N, K, 3\].*got \(2, 5, 3\)"):
        cond.tokens({"keypoints": batch["keypoints"][:, 0]})
    bad = batch["keypoints"].clone()
    bad[1, 0, 0, 0] = float("inf")
    with pytest.raises(VqgenError, match="keypoints of sample 1 contain NaN or infinite"):
        cond.tokens({"keypoints": bad})
    kp = batch["keypoints"]  # (2, 2, 5, 3)
    for i in range(2):
        objects = [o for o in kp[i].tolist() if any(v for _, _, v in o)]
        (tmp_path / f"{i}.json").write_text(json.dumps({"objects": objects}))
    (tmp_path / "bare.json").write_text(json.dumps(kp[0, :1].tolist()))
    loaded = load_keypoints([tmp_path / "0.json", tmp_path / "1.json"])
    n = loaded.shape[1]
    assert torch.equal(loaded, kp[:, :n]) and bool((kp[:, n:, :, 2] == 0).all())
    assert torch.equal(load_keypoints([tmp_path / "bare.json"]), kp[:1, :1])
    size = {"size": (32, 32)}
    assert torch.equal(cond.tokens({"keypoints": [str(tmp_path / "0.json")], **size}),
                       cond.tokens({"keypoints": kp[:1], **size}))
    with pytest.raises(VqgenError, match="keypoints of sample 1: no such file .*nope.json"):
        cond.tokens({"keypoints": [tmp_path / "0.json", tmp_path / "nope.json"]})
    (tmp_path / "broken.json").write_text('{"objects": [[1, 2]]}')
    with pytest.raises(VqgenError, match="keypoints of sample 0: .*broken.json must hold"):
        load_keypoints([tmp_path / "broken.json"])


# -- lowres -----------------------------------------------------------------------
def test_lowres_reads_the_small_image_or_downsamples() -> None:
    cond = make("lowres")
    batch = shapes_batch(2)
    small = cond.lowres(batch)  # (2, 3, 4, 4)
    assert small.shape == (2, 3, 4, 4)
    assert torch.allclose(small, batch["image"].reshape(2, 3, 4, 8, 4, 8).mean((3, 5)), atol=1e-6)
    x = cond.condition_input(batch)
    assert torch.equal(x, small.repeat_interleave(8, 2).repeat_interleave(8, 3))
    assert torch.allclose(F.avg_pool2d(x, 8), small, atol=1e-6)
    assert torch.equal(cond.tokens({"lowres": small}), cond.tokens(batch))
    with pytest.raises(VqgenError, match="lowres is 4x4 pixels but the image is 64x64"):
        cond.tokens({"lowres": small, "image": torch.zeros(2, 3, 64, 64)})
    with pytest.raises(VqgenError, match="36x36 pixels cannot be downsampled by factor=8"):
        cond.tokens({"image": torch.zeros(1, 3, 36, 36)})
    with pytest.raises(VqgenError, match=r"missing image.*batch\['lowres'\]"):
        cond.tokens({"label": torch.zeros(1)})
    with pytest.raises(VqgenError, match=r"\[B, 3, h, w\]; got \(2, 4, 4\)"):
        cond.tokens({"lowres": small[:, 0]})
