"""The folder dataset's held-out split, class ids, class_names, labels and scan cache."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vqgen.plugins.folder_layout as folder_mod
from vqgen.core.data import DataWarning
from vqgen.core.errors import VqgenError
from vqgen.core.io import cache_dir
from vqgen.plugins.folder import EmptySplit, FolderDataset


def png(path: Path, seed: int = 0, size: tuple[int, int] = (8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return path


def folder(root: Path, counts: dict[str, int], start: int = 0) -> Path:
    """``counts[c]`` images per class folder ``c`` (``""``: flat), named ``<c>_<i>.png``."""
    for c, n in counts.items():
        for i in range(start, start + n):
            png(root / "images" / c / f"{c or 'x'}_{i:03d}.png", seed=i)
    return root


def open_(root: Path, **params: object) -> FolderDataset:
    return FolderDataset(root=str(root), resolution=8, **params)  # type: ignore[arg-type]


def rel(ds: FolderDataset, base: str = "images") -> list[str]:
    return [s.image.relative_to(ds.root / base).as_posix() for s in ds.samples]


def score(relpath: str) -> float:
    """The hash of the rule: salted sha256, first 8 bytes, top 53 bits, in [0, 1)."""
    d = hashlib.sha256(f"{folder_mod._SPLIT_SALT}:{relpath}".encode()).digest()
    return (int.from_bytes(d[:8], "big") >> 11) / 2**53


def expected_val(relpaths: Iterable[str], held_out: float) -> set[str]:
    """The rule, written out independently: per class, hash < held_out; a class of >= 2
    with none lends its lowest; a class keeps its highest when all would go."""
    by_class: dict[str, list[str]] = {}
    for r in relpaths:
        by_class.setdefault(r.rsplit("/", 1)[0] if "/" in r else "", []).append(r)
    out: set[str] = set()
    for files in by_class.values():
        held = {r for r in files if score(r) < held_out}
        if not held and len(files) >= 2:
            held = {min(files, key=score)}
        if len(held) == len(files):
            held.discard(max(files, key=score))
        out |= held
    return out


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh cache dir per test (the session one is shared)."""
    monkeypatch.setenv("VQGEN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every path that the image check decodes, in order."""
    calls: list[Path] = []
    real = folder_mod._image_size

    def counting(path: Path) -> tuple[int, int]:
        calls.append(Path(path))
        return real(path)

    monkeypatch.setattr(folder_mod, "_image_size", counting)
    return calls


# -- an explicit held-out folder --------------------------------------------------------
@pytest.mark.parametrize("name", ["val", "held_out"])
def test_held_out_folder_is_the_val_split(tmp_path: Path, name: str) -> None:
    root = folder(tmp_path / "d", {"ant": 3, "cat": 2})
    png(root / name / "ant" / "v_ant.png")
    png(root / name / "ant" / "sub" / "v_ant2.png")  # nested below the class: still ant
    train = open_(root, held_out=0.5)  # ignored while the folder exists
    assert rel(train) == ["ant/ant_000.png", "ant/ant_001.png", "ant/ant_002.png",
                          "cat/cat_000.png", "cat/cat_001.png"]
    assert train.labels == [0, 0, 0, 1, 1] and train.classes == ["ant", "cat"]
    val = open_(root, split="val")
    assert rel(val, name) == ["ant/sub/v_ant2.png", "ant/v_ant.png"]
    assert val.labels == [0, 0] and val.classes == ["ant", "cat"]  # cat missing: fine
    assert [int(val[i]["label"]) for i in range(len(val))] == val.labels


def test_held_out_folder_with_its_own_class_is_an_error(tmp_path: Path) -> None:
    root = folder(tmp_path / "d", {"ant": 2, "cat": 2})
    png(root / "val" / "dog" / "d.png")
    for split in ("train", "val"):
        with pytest.raises(VqgenError, match=r"'dog' that are not classes of .*images"):
            open_(root, split=split)
    with pytest.raises(VqgenError, match="'dog'"):
        FolderDataset.class_names({"root": str(root)})


def test_val_and_held_out_folders_together_are_an_error(tmp_path: Path) -> None:
    root = folder(tmp_path / "d", {"ant": 2})
    png(root / "val" / "ant" / "a.png")
    (root / "held_out" / "ant").mkdir(parents=True)
    with pytest.raises(VqgenError) as err:
        open_(root)
    assert str(root / "val") in str(err.value) and str(root / "held_out") in str(err.value)


@pytest.mark.parametrize(("flat", "stray", "says"), [
    (False, "val/v.png", "holds images directly inside it (v.png)"),
    (True, "val/c/v.png", "sub-folders ('c'), but"),
])
def test_held_out_folder_is_laid_out_like_images(tmp_path: Path, flat: bool, stray: str,
                                                 says: str) -> None:
    root = folder(tmp_path / "d", {"" if flat else "ant": 2})
    png(root / stray)
    with pytest.raises(VqgenError) as err:
        open_(root)
    assert says in str(err.value), str(err.value)


def test_conditions_are_shared_and_stems_unique_across_images_and_val(tmp_path: Path) -> None:
    root = folder(tmp_path / "d", {"ant": 2})
    png(root / "val" / "ant" / "v.png")
    (root / "segmentation").mkdir()
    for stem in ("ant_000", "ant_001", "v"):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "segmentation" / f"{stem}.png")
    val = open_(root, split="val")
    assert val.conditions == ["segmentation"]
    assert val.samples[0].segmentation == root / "segmentation" / "v.png"
    png(root / "val" / "ant" / "ant_000.png")  # the stem of a training image
    for split in ("train", "val"):
        with pytest.raises(VqgenError, match=r"1 file stems occur more than once \(ant_000\)"):
            open_(root, split=split)
    assert len(open_(root, split="val", conditions=[])) == 2  # no conditions: no rule


# -- the held-out fraction --------------------------------------------------------------
def test_fraction_split_is_stratified_deterministic_and_exact(tmp_path: Path) -> None:
    counts = {"ant": 40, "bee": 7, "cat": 2, "dog": 1}
    root = folder(tmp_path / "d", counts)
    everything = {f"{c}/{c}_{i:03d}.png" for c, n in counts.items() for i in range(n)}
    train, val = open_(root, held_out=0.2), open_(root, split="val", held_out=0.2)
    assert set(rel(val)) == expected_val(everything, 0.2)
    assert set(rel(train)) | set(rel(val)) == everything
    assert not set(rel(train)) & set(rel(val))
    for c, n in counts.items():
        n_val = sum(r.startswith(c + "/") for r in rel(val))
        assert (n_val >= 1 and n - n_val >= 1) if n >= 2 else n_val == 0, c
    assert rel(train) == sorted(rel(train)) and rel(val) == sorted(rel(val))  # class, path
    assert val.labels == [train.classes.index(r.split("/")[0]) for r in rel(val)]
    again = open_(root, split="val", held_out=0.2, seed=7)  # seed is for crops only
    assert rel(again) == rel(val)


def test_split_is_pinned(tmp_path: Path) -> None:
    """The hash (and its salt) must never change: users' val sets would be reshuffled."""
    root = folder(tmp_path / "d", {"a": 20})
    assert rel(open_(root, split="val", held_out=0.3)) == [
        "a/a_003.png", "a/a_007.png", "a/a_009.png", "a/a_015.png"]


def test_adding_files_never_moves_existing_ones(tmp_path: Path) -> None:
    root = folder(tmp_path / "d", {"ant": 30, "cat": 25})
    before = set(rel(open_(root, split="val", held_out=0.2)))
    # every held-out file is below the threshold: the lend rule is not in play
    assert {r.split("/")[0] for r in before} == {"ant", "cat"}
    assert all(score(r) < 0.2 for r in before)
    folder(root, {"ant": 40, "cat": 10, "eel": 5}, start=30)
    after = set(rel(open_(root, split="val", held_out=0.2)))
    old = {f"ant/ant_{i:03d}.png" for i in range(30)} | {f"cat/cat_{i:03d}.png" for i in range(25)}
    assert after & old == before


def test_lend_rule_and_last_training_file(tmp_path: Path) -> None:
    root = folder(tmp_path / "d", {"ant": 2, "bee": 3, "cat": 1})
    files = [f"{c}/{c}_{i:03d}.png" for c, n in {"ant": 2, "bee": 3, "cat": 1}.items()
             for i in range(n)]
    tiny = open_(root, split="val", held_out=1e-9)  # the threshold holds nothing out
    assert set(rel(tiny)) == expected_val(files, 1e-9)
    assert sorted(r.split("/")[0] for r in rel(tiny)) == ["ant", "bee"]  # one lent each
    huge = open_(root, held_out=0.999999)  # the threshold would hold everything out
    assert sorted(r.split("/")[0] for r in rel(huge)) == ["ant", "bee", "cat"]


@pytest.mark.parametrize(("counts", "held_out", "why"), [
    ({"ant": 3, "cat": 3}, 0.0, "held_out is 0"),
    ({"ant": 1, "cat": 1, "dog": 1}, 0.5, "no class has 2 or more images"),
    ({"": 1}, 0.5, "no class has 2 or more images"),
])
def test_no_held_out_data_is_a_clear_error(tmp_path: Path, counts: dict[str, int],
                                           held_out: float, why: str) -> None:
    root = folder(tmp_path / "d", counts)
    assert len(open_(root, held_out=held_out)) == sum(counts.values())
    with pytest.raises(EmptySplit) as err:
        open_(root, split="val", held_out=held_out)
    msg = str(err.value)
    assert isinstance(err.value, VqgenError)
    assert "no held-out data" in msg and why in msg, msg
    assert str(root / "val") in msg and "set held_out > 0" in msg, msg


def test_an_empty_held_out_folder_is_a_clear_error(tmp_path: Path) -> None:
    root = folder(tmp_path / "d", {"ant": 3})
    (root / "val" / "ant").mkdir(parents=True)
    assert len(open_(root)) == 3
    with pytest.raises(EmptySplit, match=r"no held-out data \(.*val holds no images"):
        open_(root, split="val")


def test_flat_folder_splits_as_one_group(tmp_path: Path) -> None:
    root = folder(tmp_path / "d", {"": 20})
    train, val = open_(root, held_out=0.2), open_(root, split="val", held_out=0.2)
    assert set(rel(val)) == expected_val(rel(train) + rel(val), 0.2) and len(val) >= 1
    assert train.classes == [] and train.labels == [-1] * len(train)
    assert val.labels == [-1] * len(val) and "label" not in val[0]
    assert FolderDataset.class_names({"root": str(root)}) is None


# -- class ids ----------------------------------------------------------------------------
@pytest.mark.parametrize(("names", "order"), [
    ([str(i) for i in range(1, 11)], [str(i) for i in range(1, 11)]),
    (["img10", "img2", "Img3", "b", "A", "cat", "Cat", "x01", "x1"],
     ["A", "b", "Cat", "cat", "img2", "Img3", "img10", "x01", "x1"]),
])
def test_auto_classes_are_in_natural_order(tmp_path: Path, names: list[str],
                                           order: list[str]) -> None:
    root = folder(tmp_path / "d", dict.fromkeys(names, 1))
    ds = open_(root, held_out=0)
    assert ds.classes == order
    assert FolderDataset.class_names({"root": str(root)}) == order
    assert ds.labels == list(range(len(order)))
    assert [s.image.parent.name for s in ds.samples] == order


def test_explicit_classes_give_the_ids(tmp_path: Path) -> None:
    root = folder(tmp_path / "d", {"ant": 1, "cat": 2, "dog": 1})
    params = {"root": str(root), "classes": ["dog", "ant", "cat"], "held_out": 0}
    ds = FolderDataset(resolution=8, **params)  # type: ignore[arg-type]
    assert ds.classes == ["dog", "ant", "cat"] == FolderDataset.class_names(params)
    assert ds.labels == [0, 1, 2, 2] and [s.image.parent.name for s in ds.samples] == [
        "dog", "ant", "cat", "cat"]
    assert [int(ds[i]["label"]) for i in range(len(ds))] == ds.labels


@pytest.mark.parametrize(("classes", "says"), [
    (["ant", "cat", "ant"], "classes lists 'ant' more than once"),
    (["ant", "cat", "dog"], "classes lists 'dog', but"),
    (["ant"], "class folder(s) 'cat' of"),
    ([], "class folder(s) 'ant', 'cat' of"),
])
def test_bad_classes_lists_name_the_culprit(tmp_path: Path, classes: list[str],
                                            says: str) -> None:
    root = folder(tmp_path / "d", {"ant": 2, "cat": 2})
    for make in (lambda: open_(root, classes=classes),
                 lambda: FolderDataset.class_names({"root": str(root), "classes": classes})):
        with pytest.raises(VqgenError) as err:
            make()
        assert says in str(err.value), str(err.value)


def test_class_names_agrees_and_reads_no_image(tmp_path: Path,
                                               decoded: list[Path]) -> None:
    root = folder(tmp_path / "d", {"b10": 2, "b9": 2, "a": 1})
    names = FolderDataset.class_names({"root": str(root), "held_out": 0.5})
    assert decoded == []
    assert names == ["a", "b9", "b10"] == open_(root).classes == open_(root, split="val").classes
    with pytest.raises(VqgenError, match="no images/ folder"):
        FolderDataset.class_names({"root": str(tmp_path)})
    with pytest.raises(VqgenError, match="does not exist"):
        FolderDataset.class_names({"root": str(tmp_path / "nope")})


def test_root_is_a_path_field_and_expands_home(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    field = FolderDataset.Params.model_fields["root"]
    assert field.json_schema_extra == {"path": True} and field.description
    folder(tmp_path / "d", {"ant": 2})
    monkeypatch.setenv("HOME", str(tmp_path))
    assert len(FolderDataset(root="~/d", resolution=8, held_out=0)) == 2
    assert FolderDataset.class_names({"root": "~/d"}) == ["ant"]


# -- the scan cache -----------------------------------------------------------------------
def cache_files(cache: Path) -> list[Path]:
    return sorted((cache / "folder-scan").glob("*.json"))


def test_cache_skips_decoding_an_unchanged_folder(tmp_path: Path, own_cache: Path,
                                                  decoded: list[Path]) -> None:
    root = folder(tmp_path / "d", {"ant": 5, "cat": 5})
    train = open_(root, held_out=0.3)
    assert sorted(decoded) == sorted(s.image for s in train.samples)
    [file] = cache_files(own_cache)
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    assert file == cache_dir() / "folder-scan" / f"{key}.json"
    decoded.clear()
    again = open_(root, held_out=0.3)
    assert decoded == [] and [s.size for s in again.samples] == [s.size for s in train.samples]
    val = open_(root, split="val", held_out=0.3)  # only val's files are new to the cache
    assert sorted(decoded) == sorted(s.image for s in val.samples)
    decoded.clear()
    open_(root, split="val", held_out=0.3)
    open_(root, held_out=0.3)
    assert decoded == []
    entries = json.loads(file.read_text())["files"]
    assert sorted(entries) == sorted(rel(train, ".") + rel(val, "."))


def test_a_changed_file_is_decoded_again(tmp_path: Path, decoded: list[Path]) -> None:
    root = folder(tmp_path / "d", {"ant": 3})
    touched, resized = root / "images/ant/ant_000.png", root / "images/ant/ant_001.png"
    open_(root, held_out=0)
    decoded.clear()
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, new mtime
    st = resized.stat()
    png(resized, seed=9, size=(8, 12))  # new size on disk, mtime put back
    os.utime(resized, ns=(st.st_atime_ns, st.st_mtime_ns))
    ds = open_(root, held_out=0)
    assert sorted(decoded) == [touched, resized]
    assert ds.samples[1].size == (8, 12)


def test_failures_are_never_cached_and_gone_files_leave(tmp_path: Path, own_cache: Path,
                                                        decoded: list[Path]) -> None:
    root = folder(tmp_path / "d", {"ant": 3})
    broken = root / "images" / "ant" / "ant_001.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    with pytest.warns(DataWarning, match="1 unreadable image"):
        open_(root, held_out=0, on_bad_file="skip")
    decoded.clear()
    with pytest.raises(VqgenError, match="1 of 3 samples"):
        open_(root, held_out=0)
    assert decoded == [broken]
    (root / "images" / "ant" / "ant_002.png").unlink()
    broken.unlink()
    open_(root, held_out=0)
    [file] = cache_files(own_cache)
    assert sorted(json.loads(file.read_text())["files"]) == ["images/ant/ant_000.png"]


_ENTRY = b'{"version": 1, "root": ROOT, "files": {"images/ant/ant_000.png": %s}}'
CORRUPT_CACHES = [  # ROOT, SIZE, MTIME: the real values, so only the named defect is wrong
    b"\x00\xff garbage \x80",
    b"[1, 2, 3]",
    b"[" * 100_000,
    b'{"version": "1", "root": ROOT, "files": {}}',
    _ENTRY % b'"8x8"',
    _ENTRY % b"[SIZE, MTIME, 8.5, 8]",
    _ENTRY % b"[SIZE, MTIME, true, 8]",
    _ENTRY % b"[SIZE, MTIME, 0, 8]",
    _ENTRY % b"[SIZE, MTIME, 8]",
    _ENTRY % b"[SIZE, MTIME, 8, null]",
]


@pytest.mark.parametrize("content", CORRUPT_CACHES)
def test_a_corrupt_cache_file_is_ignored(tmp_path: Path, own_cache: Path,
                                         decoded: list[Path], content: bytes) -> None:
    root = folder(tmp_path / "d", {"ant": 2})
    open_(root, held_out=0)
    [file] = cache_files(own_cache)
    good = json.loads(file.read_text())
    st = (root / "images" / "ant" / "ant_000.png").stat()
    for name, value in (("ROOT", json.dumps(good["root"])), ("SIZE", str(st.st_size)),
                        ("MTIME", str(st.st_mtime_ns))):
        content = content.replace(name.encode(), value.encode())
    file.write_bytes(content)
    decoded.clear()
    assert len(open_(root, held_out=0)) == 2
    assert len(decoded) == 2  # nothing trusted, no error
    assert json.loads(file.read_text()) == good  # and rewritten whole


def test_a_cache_for_another_root_or_stale_stat_is_not_trusted(tmp_path: Path, own_cache: Path,
                                                               decoded: list[Path]) -> None:
    root = folder(tmp_path / "d", {"ant": 2})
    open_(root, held_out=0)
    [file] = cache_files(own_cache)
    data = json.loads(file.read_text())
    file.write_text(json.dumps({**data, "root": "/somewhere/else"}))
    decoded.clear()
    open_(root, held_out=0)
    assert len(decoded) == 2


def test_an_unwritable_cache_dir_still_opens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             decoded: list[Path]) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("VQGEN_CACHE_DIR", str(blocker / "cache"))
    root = folder(tmp_path / "d", {"ant": 2})
    assert len(open_(root, held_out=0)) == 2
    assert len(open_(root, held_out=0)) == 2
    assert len(decoded) == 4  # nothing cached, nothing raised
    monkeypatch.setenv("VQGEN_CACHE_DIR", str(tmp_path / "dir_cache"))
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    (tmp_path / "dir_cache" / "folder-scan" / f"{key}.json").mkdir(parents=True)  # a folder
    assert len(open_(root, held_out=0)) == 2


def test_cache_dir_follows_the_environment(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VQGEN_CACHE_DIR", str(tmp_path / "own"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "own"
    monkeypatch.setenv("VQGEN_CACHE_DIR", "")
    assert cache_dir() == tmp_path / "xdg" / "vqgen"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert cache_dir() == tmp_path / "home" / ".cache" / "vqgen"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.delenv("VQGEN_CACHE_DIR")
    assert cache_dir() == tmp_path / "home" / ".cache" / "vqgen"
