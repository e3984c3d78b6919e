"""The folder dataset (layout, conversions, transforms, bad input) and save_image_grid."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vqgen.core.data import DataWarning
from vqgen.core.errors import VqgenError
from vqgen.core.images import save_image_grid, u8_to_image
from vqgen.plugins.folder import FolderDataset

#: these tests read every file of their folder: nothing held out
Folder = functools.partial(FolderDataset, held_out=0)

def rgb(w: int, h: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save(arr: np.ndarray | Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (arr if isinstance(arr, Image.Image) else Image.fromarray(arr)).save(path)
    return path


def write_kp(path: Path, objects: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"objects": objects}))
    return path


def two_class_folder(root: Path, n: int = 3, size: tuple[int, int] = (8, 8)) -> Path:
    for i in range(n):
        save(rgb(*size, seed=i), root / "images" / ("cat" if i % 2 else "ant") / f"{i:03d}.png")
    return root


# -- layout and labels ---------------------------------------------------------
def test_labels_come_from_sorted_subfolders(tmp_path: Path) -> None:
    two_class_folder(tmp_path, n=4)
    ds = Folder(root=str(tmp_path), resolution=8)
    assert ds.classes == ["ant", "cat"] and len(ds) == 4 and ds.conditions == []
    labels = sorted((s.image.stem, int(ds[i]["label"])) for i, s in enumerate(ds.samples))
    assert labels == [("000", 0), ("001", 1), ("002", 0), ("003", 1)]
    sample = ds[0]
    assert set(sample) == {"image", "label"}
    assert sample["label"].dtype == torch.int64 and sample["label"].ndim == 0


def test_flat_folder_is_unlabelled(tmp_path: Path) -> None:
    for i in range(2):
        save(rgb(8, 8, i), tmp_path / "images" / f"{i}.png")
    ds = Folder(root=str(tmp_path), resolution=8)
    assert ds.classes == [] and set(ds[0]) == {"image"}


def test_same_resolution_image_is_exact(tmp_path: Path) -> None:
    a = rgb(8, 8, 3)
    save(a, tmp_path / "images" / "x" / "a.png")
    img = Folder(root=str(tmp_path), resolution=8)[0]["image"]
    assert img.shape == (3, 8, 8) and img.dtype == torch.float32
    expected = torch.from_numpy(a).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(img, expected, atol=1e-6)
    assert torch.equal(img, u8_to_image(a))


# -- conversions ---------------------------------------------------------------
def _modes(tmp_path: Path) -> dict[str, Image.Image]:
    gray = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)
    pal = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) % 4, mode="L").convert("P")
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30] + [0] * (252 * 3))
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 255  # red, opaque on the left half, transparent on the right
    rgba[:, :4, 3] = 255
    i16 = np.zeros((8, 8), np.uint16)
    i16[:, 4:] = 65535
    la = Image.fromarray(np.stack([np.zeros((8, 8), np.uint8), rgba[..., 3]], -1), mode="LA")
    return {
        "L": gray,
        "P": pal,
        "RGBA": Image.fromarray(rgba),
        "I;16": Image.fromarray(i16),
        "LA": la,
    }


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "I;16", "LA"])
def test_image_modes_load_as_rgb(tmp_path: Path, mode: str) -> None:
    im = _modes(tmp_path)[mode]
    assert im.mode == mode
    save(im, tmp_path / "images" / "c" / "a.png")
    with Image.open(tmp_path / "images" / "c" / "a.png") as check:
        assert check.mode == mode  # the file really is in that mode
    x = Folder(root=str(tmp_path), resolution=8)[0]["image"]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    if mode == "RGBA":  # composited onto white
        assert torch.equal(x[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
        assert torch.equal(x[:, 0, 7], torch.ones(3))
    if mode == "LA":
        assert torch.equal(x[:, 0, 0], -torch.ones(3)) and torch.equal(x[:, 0, 7], torch.ones(3))
    if mode == "I;16":  # 16-bit reduced to 8 bits
        assert torch.equal(x[:, 0, 0], -torch.ones(3)) and torch.equal(x[:, 0, 7], torch.ones(3))
    if mode == "P":  # palette colours, not indices
        assert torch.equal(x[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
        assert torch.equal(x[:, 0, 1], torch.tensor([-1.0, 1.0, -1.0]))
    if mode == "L":
        assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])


def test_resize_and_center_crop_non_square(tmp_path: Path) -> None:
    a = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 high: red | green | blue
    a[:, :10, 0] = 255
    a[:, 10:30, 1] = 255
    a[:, 30:, 2] = 255
    save(a, tmp_path / "images" / "c" / "wide.png")
    write_kp(tmp_path / "keypoints" / "wide.json", [[[20.0, 10.0, 1], [2.0, 3.0, 1], [21, 11, 0]]])
    seg = np.zeros((20, 40), np.uint8)
    seg[:, 20:] = 3
    save(seg, tmp_path / "segmentation" / "wide.png")

    full = Folder(root=str(tmp_path), resolution=20)[0]  # no resize: crop x 10..30
    assert full["image"].shape == (3, 20, 20)
    assert torch.equal(full["image"], u8_to_image(a[:, 10:30]))
    assert torch.equal(full["segmentation"], torch.from_numpy(seg[:, 10:30].astype(np.int64)))
    assert torch.equal(full["keypoints"][0, 0], torch.tensor([10.0, 10.0, 1.0]))

    half = Folder(root=str(tmp_path), resolution=10)[0]  # 40x20 → 20x10, crop x 5..15
    x = half["image"]
    assert x.shape == (3, 10, 10)
    assert torch.allclose(x[:, :, 2:8], torch.tensor([-1.0, 1.0, -1.0])[:, None, None], atol=0.02)
    assert half["segmentation"].shape == (10, 10)
    assert (half["segmentation"][:, :5] == 0).all() and (half["segmentation"][:, 5:] == 3).all()
    kp = half["keypoints"]
    assert kp.shape == (4, 3, 3)
    assert torch.equal(kp[0, 0], torch.tensor([5.0, 5.0, 1.0]))  # (20, 10) / 2 - (5, 0)
    assert torch.equal(kp[0, 1], torch.zeros(3))  # (2, 3) / 2 - (5, 0) is outside: invisible
    assert torch.equal(kp[0, 2], torch.zeros(3))  # annotated invisible
    assert torch.equal(kp[1:], torch.zeros(3, 3, 3))  # padding


def test_random_crop_stays_inside_and_is_seeded(tmp_path: Path) -> None:
    save(rgb(30, 10), tmp_path / "images" / "c" / "a.png")
    ds = Folder(root=str(tmp_path), resolution=10, crop="random", seed=3)
    crops = {ds[0]["image"].numpy().tobytes() for _ in range(3)}
    assert len(crops) == 1  # a function of (seed, epoch, index)
    seen = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        seen.add(ds[0]["image"].numpy().tobytes())
    assert len(seen) > 1


def test_hflip_is_consistent(tmp_path: Path) -> None:
    a = rgb(8, 8, 5)
    save(a, tmp_path / "images" / "c" / "s.png")
    seg = np.zeros((8, 8), np.uint8)
    seg[2, 1] = 7  # one asymmetric labelled pixel
    save(seg, tmp_path / "segmentation" / "s.png")
    dep = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000
    save(dep, tmp_path / "depth" / "s.png")
    write_kp(tmp_path / "keypoints" / "s.json", [[[1.5, 2.5, 1], [0.25, 7.0, 1]]])

    plain = Folder(root=str(tmp_path), resolution=8)[0]
    assert torch.equal(plain["keypoints"][0], torch.tensor([[1.5, 2.5, 1.0], [0.25, 7.0, 1.0]]))
    assert torch.allclose(plain["depth"][0], torch.from_numpy(dep / 65535).float())
    flips = 0
    for seed in range(16):
        s = Folder(root=str(tmp_path), resolution=8, hflip=True, seed=seed)[0]
        if torch.equal(s["image"], plain["image"]):
            for k in ("segmentation", "depth", "keypoints"):
                assert torch.equal(s[k], plain[k])
            continue
        flips += 1
        assert torch.equal(s["image"], plain["image"].flip(-1))
        assert torch.equal(s["segmentation"], plain["segmentation"].flip(-1))
        assert s["segmentation"][2, 6] == 7
        assert torch.equal(s["depth"], plain["depth"].flip(-1))
        kp = torch.tensor([[8 - 1.5, 2.5, 1.0], [8 - 0.25, 7.0, 1.0]])
        assert torch.equal(s["keypoints"][0], kp)
        # the flipped keypoint still lands on the flipped labelled pixel
        assert s["segmentation"][int(kp[0, 1]), int(kp[0, 0])] == 7
    assert 0 < flips < 16


# -- condition maps --------------------------------------------------------------
def test_label_maps_depth_and_batches(tmp_path: Path) -> None:
    save(rgb(8, 8, 0), tmp_path / "images" / "a" / "p.png")
    save(rgb(8, 8, 1), tmp_path / "images" / "b" / "q.png")
    seg16 = np.full((8, 8), 300, np.uint16)  # 16-bit label map
    save(seg16, tmp_path / "segmentation" / "p.png")
    pal = Image.fromarray(np.full((8, 8), 5, np.uint8), mode="L").convert("P")
    pal.putpalette([9] * 768)  # palette label map: the indices count, not the colours
    save(pal, tmp_path / "segmentation" / "q.png")
    save(np.full((8, 8), 32768, np.uint16), tmp_path / "depth" / "p.png")
    np.save(tmp_path / "depth" / "q.npy", np.linspace(2.0, 5.0, 64).reshape(8, 8))
    write_kp(tmp_path / "keypoints" / "p.json", [])
    write_kp(tmp_path / "keypoints" / "q.json", [[[1, 1, 1]] * 2, [[2, 2, 2]] * 2])

    ds = Folder(root=str(tmp_path), resolution=8, max_objects=3)
    assert ds.conditions == ["segmentation", "depth", "keypoints"] and ds.num_keypoints == 2
    p, q = ds[0], ds[1]
    assert p["segmentation"].dtype == torch.int64 and (p["segmentation"] == 300).all()
    assert (q["segmentation"] == 5).all()
    assert p["depth"].shape == (1, 8, 8) and p["depth"].dtype == torch.float32
    assert torch.allclose(p["depth"], torch.tensor(32768 / 65535))
    assert q["depth"].min() == 0 and q["depth"].max() == 1  # .npy: min-max per image
    assert torch.equal(p["keypoints"], torch.zeros(3, 2, 3))
    assert torch.equal(q["keypoints"][1, 0], torch.tensor([2.0, 2.0, 1.0]))  # v > 0 → 1

    batch = next(iter(DataLoader(ds, batch_size=2)))
    assert batch["image"].shape == (2, 3, 8, 8) and batch["label"].tolist() == [0, 1]
    assert batch["segmentation"].shape == (2, 8, 8) and batch["depth"].shape == (2, 1, 8, 8)
    assert batch["keypoints"].shape == (2, 3, 2, 3)

    only = Folder(root=str(tmp_path), resolution=8, conditions=["depth"])
    assert set(only[0]) == {"image", "label", "depth"}


def test_smaller_condition_map_is_resized(tmp_path: Path) -> None:
    save(rgb(16, 16), tmp_path / "images" / "c" / "a.png")
    save(np.full((4, 4), 65535, np.uint16), tmp_path / "depth" / "a.png")
    d = Folder(root=str(tmp_path), resolution=16)[0]["depth"]
    assert d.shape == (1, 16, 16) and torch.allclose(d, torch.ones(1))


# -- bad input -------------------------------------------------------------------------
def test_missing_root_and_images(tmp_path: Path) -> None:
    with pytest.raises(VqgenError, match="does not exist.*root/images/<class>"):
        Folder(root=str(tmp_path / "nope"))
    with pytest.raises(VqgenError, match="no images/ folder"):
        Folder(root=str(tmp_path))
    (tmp_path / "images" / "empty_class").mkdir(parents=True)
    (tmp_path / "images" / "empty_class" / "notes.txt").write_text("hi")
    with pytest.raises(VqgenError, match="contains no images") as err:
        Folder(root=str(tmp_path))
    assert str(tmp_path / "images") in str(err.value)


def test_mixed_layout_is_an_error(tmp_path: Path) -> None:
    two_class_folder(tmp_path, n=2)
    save(rgb(8, 8), tmp_path / "images" / "stray.png")
    with pytest.raises(VqgenError, match="mixes class sub-folders"):
        Folder(root=str(tmp_path))


def test_corrupt_image_is_reported_or_skipped(tmp_path: Path) -> None:
    two_class_folder(tmp_path, n=4)
    bad = tmp_path / "images" / "ant" / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    good = tmp_path / "images" / "cat" / "001.png"
    truncated = tmp_path / "images" / "cat" / "trunc.png"
    truncated.write_bytes(good.read_bytes()[:-20])
    with pytest.raises(VqgenError) as err:
        Folder(root=str(tmp_path), resolution=8)
    msg = str(err.value)
    assert "2 of 6 samples" in msg and "2 unreadable image file(s)" in msg
    assert str(bad) in msg and str(truncated) in msg and "on_bad_file='skip'" in msg
    with pytest.warns(DataWarning, match="2 unreadable image file"):
        ds = Folder(root=str(tmp_path), resolution=8, on_bad_file="skip")
    assert len(ds) == 4 and all(s.image not in (bad, truncated) for s in ds.samples)


def test_keypoint_files_are_validated(tmp_path: Path) -> None:
    two_class_folder(tmp_path, n=3)
    write_kp(tmp_path / "keypoints" / "000.json", [[[1, 1, 1]]])
    many = write_kp(tmp_path / "keypoints" / "001.json", [[[1, 1, 1]]] * 3)
    broken = tmp_path / "keypoints" / "002.json"
    broken.write_text('{"objects": [[[1, 2]]]')
    with pytest.raises(VqgenError) as err:
        Folder(root=str(tmp_path), resolution=8, max_objects=2)
    msg = str(err.value)
    assert str(many) in msg and "more than max_objects=2" in msg
    assert str(broken) in msg and "not valid JSON" in msg
    broken.write_text('{"objects": [[[1, 2]]]}')  # valid JSON, wrong shape
    with pytest.raises(VqgenError, match=r"002\.json.*\[x, y, visible\]"):
        Folder(root=str(tmp_path), resolution=8, max_objects=3)
    write_kp(broken, [[[1, 1, 1], [2, 2, 1]]])  # a different number of points
    with pytest.raises(VqgenError, match=r"002\.json \(objects have 2 points"):
        Folder(root=str(tmp_path), resolution=8, max_objects=3)


def test_missing_condition_file_names_the_stem(tmp_path: Path) -> None:
    two_class_folder(tmp_path, n=3)
    for stem in ("000", "002"):
        save(np.zeros((8, 8), np.uint8), tmp_path / "segmentation" / f"{stem}.png")
    with pytest.raises(VqgenError, match=r"1 image\(s\) without a segmentation file.*: 001"):
        Folder(root=str(tmp_path), resolution=8)
    with pytest.warns(DataWarning):
        ds = Folder(root=str(tmp_path), resolution=8, on_bad_file="skip")
    assert sorted(s.image.stem for s in ds.samples) == ["000", "002"]
    assert len(Folder(root=str(tmp_path), resolution=8, conditions=[])) == 3
    with pytest.raises(VqgenError, match="no depth/ folder"):
        Folder(root=str(tmp_path), resolution=8, conditions=["depth"])


def test_bad_condition_maps(tmp_path: Path) -> None:
    two_class_folder(tmp_path, n=2)
    save(rgb(8, 8), tmp_path / "segmentation" / "000.png")  # RGB is not a label map
    save(np.zeros((8, 8), np.uint8), tmp_path / "segmentation" / "001.png")
    save(np.zeros((8, 8), np.uint16), tmp_path / "depth" / "000.png")
    save(np.zeros((4, 8), np.uint16), tmp_path / "depth" / "001.png")  # wrong aspect
    with pytest.raises(VqgenError) as err:
        Folder(root=str(tmp_path), resolution=8)
    msg = str(err.value)
    assert "2 of 2 samples" in msg
    assert "segmentation/000.png" in msg and "single-channel" in msg
    assert "depth/001.png" in msg and "does not match" in msg
    np.save(tmp_path / "depth" / "x.npy", np.zeros((2, 3, 4)))
    save(rgb(8, 8), tmp_path / "images" / "ant" / "x.png")
    with pytest.warns(DataWarning, match=r"x\.npy \(expected a 2-D map"):
        Folder(root=str(tmp_path), resolution=8, conditions=["depth"], on_bad_file="skip")


def test_duplicate_stems_with_conditions(tmp_path: Path) -> None:
    save(rgb(8, 8), tmp_path / "images" / "a" / "x.png")
    save(rgb(8, 8), tmp_path / "images" / "b" / "x.png")
    assert len(Folder(root=str(tmp_path), resolution=8)) == 2
    save(np.zeros((8, 8), np.uint8), tmp_path / "segmentation" / "x.png")
    with pytest.raises(VqgenError, match="stems occur more than once"):
        Folder(root=str(tmp_path), resolution=8)


def test_file_broken_after_opening_does_not_crash(tmp_path: Path) -> None:
    two_class_folder(tmp_path, n=3)
    ds = Folder(root=str(tmp_path), resolution=8)
    ds.samples[1].image.write_bytes(b"garbage")
    with pytest.warns(DataWarning, match="could not read sample"):
        out = [ds[i]["image"] for i in range(len(ds))]
    assert torch.equal(out[1], out[2])
    with pytest.raises(IndexError):
        ds[3]


# -- save_image_grid ------------------------------------------------------------------
@pytest.mark.parametrize("channels", [1, 3])
def test_save_image_grid(tmp_path: Path, channels: int) -> None:
    x = torch.rand(5, channels, 8, 6) * 2 - 1  # (N, C, H, W)
    x[0, :, 0, 0] = -1.0
    out = save_image_grid(x, tmp_path / "sub" / "grid.png", nrow=3)
    assert out == tmp_path / "sub" / "grid.png"
    assert sorted(p.name for p in out.parent.iterdir()) == ["grid.png"]  # no temp file left
    with Image.open(out) as im:
        assert im.size == (3 * (6 + 2) + 2, 2 * (8 + 2) + 2)
        assert im.mode == ("L" if channels == 1 else "RGB")
        arr = np.asarray(im)
    assert (arr[2, 2] == 0).all() and (arr[0, 0] == 255).all()  # image 0's pixel; white padding
    save_image_grid(x[:1], out, nrow=8, padding=0)  # replaced atomically
    with Image.open(out) as im:
        assert im.size == (6, 8)
    with pytest.raises(ValueError):
        save_image_grid(torch.zeros(2, 4, 8, 8), tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def _truncated_jpeg(path: Path) -> Path:
    Image.fromarray(rgb(16, 16)).save(path.with_suffix(".tmp.jpg"), quality=90)
    data = path.with_suffix(".tmp.jpg").read_bytes()
    path.with_suffix(".tmp.jpg").unlink()
    path.write_bytes(data[: len(data) // 2])  # header intact, scan data cut
    return path


@pytest.mark.parametrize(("case", "says"), [
    ("truncated_jpeg", "unreadable image file(s)"),
    ("bomb", "decompression bomb"),
    ("string_depth", "not numbers"),
    ("inf_depth", "infinite values"),
    ("nan_depth", "every value is NaN"),
])
def test_defects_are_found_when_the_data_set_opens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   case: str, says: str) -> None:
    """Each defect is reported by name (file and reason) when the data set opens,
    never swapped for another sample in the middle of an epoch."""
    two_class_folder(tmp_path, n=2)
    (tmp_path / "depth").mkdir()
    for stem in ("000", "001"):
        np.save(tmp_path / "depth" / f"{stem}.npy", np.random.rand(8, 8).astype(np.float32))
    culprit = {"truncated_jpeg": tmp_path / "images" / "ant" / "000.jpg",
               "bomb": tmp_path / "images" / "cat" / "001.png",
               "string_depth": tmp_path / "depth" / "000.npy",
               "inf_depth": tmp_path / "depth" / "000.npy",
               "nan_depth": tmp_path / "depth" / "001.npy"}[case]
    if case == "truncated_jpeg":
        (tmp_path / "images" / "ant" / "000.png").unlink()
        _truncated_jpeg(culprit)
    elif case == "bomb":  # PIL refuses more than 2 × MAX_IMAGE_PIXELS
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 8×8 images pass, 16×16 not
        save(rgb(16, 16), culprit)
    elif case == "string_depth":
        np.save(culprit, np.array([["a"] * 8] * 8))
    elif case == "inf_depth":
        np.save(culprit, np.full((8, 8), np.inf, np.float32))
    else:
        np.save(culprit, np.full((8, 8), np.nan, np.float32))
    with pytest.raises(VqgenError) as err:
        Folder(root=str(tmp_path), resolution=8)
    msg = str(err.value)
    assert str(culprit) in msg and says in msg, msg


def _npy_with_header(path: Path, shape: tuple[int, ...], descr: str, payload: bytes) -> Path:
    """A ``.npy`` file whose header says ``shape``/``descr``, whatever the payload."""
    import io

    from numpy.lib import format as npy_format

    buf = io.BytesIO()
    npy_format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False,
                                            "shape": shape})
    path.write_bytes(buf.getvalue() + payload)
    return path


CRAFTED_NPY = [  # (header shape, dtype, payload, what the error says)
    ((5000, 5000), "<f4", b"\0" * 16, "header promises"),
    ((100_000, 100_000), "<f4", b"\0" * 16, "larger than"),
    ((8, 8), "<c8", b"\0" * 512, "complex"),
    ((8, 8), "<U4", b"a" * 1024, "not numbers"),
    ((8, 8), "|O", b"\0" * 64, "cannot be read"),
    ((1, 1, 1, 1, 8, 8), "<f4", b"\0" * 256, "2-D"),
]


@pytest.mark.parametrize(("shape", "descr", "payload", "says"), CRAFTED_NPY)
def test_crafted_npy_files_are_refused_by_name(tmp_path: Path, shape: tuple[int, ...],
                                               descr: str, payload: bytes, says: str) -> None:
    """A ``.npy`` whose header lies (a shape far larger than the file, complex or
    string values, pickled objects) is refused before anything is allocated, naming
    the file, both as a ``--cond`` file and in a data set's depth folder."""
    from vqgen.conditioners.depth import load_depth
    from vqgen.core.data import read_condition

    bad = _npy_with_header(tmp_path / "bad.npy", shape, descr, payload)
    for read in (lambda: read_condition("depth", bad), lambda: load_depth([bad])):
        with pytest.raises(VqgenError) as err:
            read()
        assert str(bad) in str(err.value) and says in str(err.value), str(err.value)
    two_class_folder(tmp_path / "set", n=2)
    (tmp_path / "set" / "depth").mkdir()
    np.save(tmp_path / "set" / "depth" / "000.npy", np.random.rand(8, 8).astype(np.float32))
    culprit = _npy_with_header(tmp_path / "set" / "depth" / "001.npy", shape, descr, payload)
    with pytest.raises(VqgenError) as err:
        Folder(root=str(tmp_path / "set"), resolution=8)
    assert str(culprit) in str(err.value) and says in str(err.value), str(err.value)


def test_a_class_folder_that_cannot_be_listed_is_an_error(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """An unreadable class folder is named (it used to be skipped while its class
    stayed listed, so the class looked empty). Simulated: tests may run as root."""
    import os

    two_class_folder(tmp_path, n=4)
    locked = tmp_path / "images" / "cat"
    real_scandir = os.scandir

    def scandir(path: object = ".") -> object:
        if Path(str(path)) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(VqgenError) as err:
        Folder(root=str(tmp_path), resolution=8)
    assert f"cannot list {locked} (Permission denied)" in str(err.value), str(err.value)
