"""Training on one's own images: paths in configs, classes wired from the data, class
names, a trained tokenizer reused, thread counts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

import vqgen
from vqgen.cli import main
from vqgen.core.config import ConfigError, load_config, parse_config
from vqgen.core.data import spread_indices
from vqgen.core.errors import VqgenError
from vqgen.core.layout import META_FILE, STATE_FILE, WEIGHTS_FILE
from vqgen.training import runtime

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"


def labelled_folder(root: Path, classes: list[str], per_class: int = 2) -> Path:
    """``root/images/<class>/<i>.png``: 8×8 images, one colour per class."""
    for c, name in enumerate(classes):
        d = root / "images" / name
        d.mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), (40 * c, 200 - 30 * i, 90)).save(d / f"{name}_{i}.png")
    return root


def folder_config(root: str, **conditioner: object) -> dict:
    """The tiny config on a folder data set."""
    cfg = yaml.safe_load(TINY.read_text())
    cfg["data"] = {"name": "folder", "params": {"root": root, "resolution": 32}}
    cfg["conditioner"] = {"name": "class", "params": dict(conditioner)}
    return cfg


# -- paths --------------------------------------------------------------------------
def test_relative_root_is_taken_from_the_config_folder(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    labelled_folder(tmp_path / "data", ["a", "b"])
    (tmp_path / "configs").mkdir()
    path = tmp_path / "configs" / "mine.yaml"
    path.write_text(yaml.safe_dump(folder_config("../data")))
    monkeypatch.chdir(ROOT)  # anywhere but the config's folder
    cfg = load_config(path)
    assert cfg.data.params["root"] == str(tmp_path / "data")
    # recorded absolute: the run's config.yaml loads the same from anywhere
    again = parse_config(cfg.to_dict())
    assert again.data.params["root"] == str(tmp_path / "data")


def test_env_vars_and_home_expand(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    labelled_folder(tmp_path / "data", ["a", "b"])
    monkeypatch.setenv("MY_DATA", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    for root in ("$MY_DATA/data", "${MY_DATA}/data", "~/data"):
        assert parse_config(folder_config(root)).data.params["root"] == str(tmp_path / "data")


@pytest.mark.parametrize("root, culprit", [
    ("$VQGEN_SURELY_UNSET/data", "$VQGEN_SURELY_UNSET"),
    ("${VQGEN_SURELY_UNSET}/x", "$VQGEN_SURELY_UNSET"),
])
def test_unset_variable_is_named(root: str, culprit: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(folder_config(root, n_classes=2))
    assert "data.params.root" in str(err.value) and culprit in str(err.value)


def test_placeholder_root_is_kept() -> None:
    """The taming importer writes a placeholder root; it stays as written."""
    cfg = parse_config(folder_config("<your image folder>", n_classes=3))
    assert cfg.data.params["root"] == "<your image folder>"
    assert cfg.conditioner.params["n_classes"] == 3  # explicit: nothing to check against


# -- classes ------------------------------------------------------------------------
def test_n_classes_and_names_are_wired_from_the_folder(tmp_path: Path) -> None:
    labelled_folder(tmp_path, ["1", "2", "10"])
    cfg = parse_config(folder_config(str(tmp_path)))
    assert cfg.conditioner.params["n_classes"] == 3
    assert cfg.data.params["classes"] == ["1", "2", "10"]  # natural order, recorded
    assert cfg.prior.params["cond_vocab_size"] == 4  # 3 classes + the null token


def test_config_validate_names_a_wrong_n_classes(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    labelled_folder(tmp_path / "data", ["a", "b", "c"])
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(folder_config("data", n_classes=4)))
    assert main(["config", "validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "conditioner.params.n_classes" in err and "has 3 classes" in err
    assert "Traceback" not in err
    path.write_text(yaml.safe_dump(folder_config("data")))
    assert main(["config", "validate", str(path), "--resolved"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out.split("\n", 1)[1])
    assert resolved["data"]["params"]["classes"] == ["a", "b", "c"]
    assert resolved["conditioner"]["params"]["n_classes"] == 3


def test_auto_n_classes_needs_classes(tmp_path: Path) -> None:
    flat = tmp_path / "flat" / "images"
    flat.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(flat / "x.png")
    with pytest.raises(ConfigError) as err:
        parse_config(folder_config(str(tmp_path / "flat")))
    assert "conditioner.params.n_classes" in str(err.value) and "no classes" in str(err.value)
    with pytest.raises(ConfigError) as err:
        parse_config(folder_config(str(tmp_path / "missing")))
    assert "data.params" in str(err.value) and "missing" in str(err.value)


def test_class_names_in_the_python_api(registry: vqgen.Registry) -> None:
    cfg = vqgen.load_config(TINY)
    from vqgen.core.pipeline import config_class_names

    cond = registry.create("conditioner", "class", cfg.conditioner.params)
    assert config_class_names(cfg, registry, cond) == ["circle", "square", "star", "triangle"]
    pipe = vqgen.Pipeline(registry.create("tokenizer", "kmeans", {"n_embed": 4}),
                          grid=(2, 2), conditioner=cond,
                          class_names=["circle", "square", "star", "triangle"])
    assert pipe.class_ids(["star", 0, "triangle"]).tolist() == [2, 0, 3]
    assert pipe.class_ids("square").tolist() == [1]
    with pytest.raises(VqgenError, match="'sqaure' is not a class.*did you mean square"):
        pipe.class_ids(["sqaure"])
    pipe.class_names = None
    with pytest.raises(VqgenError, match="knows no class names"):
        pipe.class_ids("star")


def test_spread_indices_mix_classes() -> None:
    class Labelled:
        labels = [0] * 5 + [1] * 5 + [2] * 2

        def __len__(self) -> int:
            return 12

    picked = spread_indices(Labelled(), 6, seed=0)
    assert [Labelled.labels[i] for i in picked] == [0, 1, 2, 0, 1, 2]
    assert len(set(picked)) == 6 and picked == spread_indices(Labelled(), 6, seed=0)
    more = spread_indices(Labelled(), 12, seed=0)
    assert sorted(more) == list(range(12))  # a class that runs out leaves the rotation
    assert spread_indices(list(range(10)), 4) == [0, 1, 2, 3]  # no labels: the first n


# -- threads ------------------------------------------------------------------------
def test_default_threads_respect_affinity_quota_and_local_processes(
        monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(6)),
                        raising=False)
    monkeypatch.setattr(runtime, "_cpu_quota", lambda: None)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert runtime.default_threads() == 6
    monkeypatch.setattr(runtime, "_cpu_quota", lambda: 3)
    assert runtime.default_threads() == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert runtime.default_threads() == 1
    monkeypatch.setattr(runtime, "_cpu_quota", lambda: None)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert runtime.default_threads() == 1  # 6 // 4, never 0


def test_cpu_quota_reads_cgroup_v2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "cpu.max"
    monkeypatch.setattr(runtime, "CPU_MAX_FILE", str(f))
    for text, want in [("max 100000\n", None), ("150000 100000\n", 2), ("50000 100000", 1),
                       ("garbage", None)]:
        f.write_text(text)
        assert runtime._cpu_quota() == want
    f.unlink()
    assert runtime._cpu_quota() is None


@pytest.mark.parametrize("value", ["0", "-3", "100000"])
def test_threads_flag_is_checked(value: str, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", str(TINY), "--run-dir", str(tmp_path / "r"), "--threads", value]) == 2
    err = capsys.readouterr().err
    assert "--threads" in err and value in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


# -- a trained tokenizer reused -----------------------------------------------------
@pytest.fixture(scope="module")
def source_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("source") / "run"
    assert main(["train", str(TINY), "--run-dir", str(run), "--threads", "1"]) == 0
    return run


def test_from_run_trains_only_the_prior_and_loads_alone(source_run: Path, tmp_path: Path,
                                                        one_thread: None) -> None:
    src = tmp_path / "src"
    shutil.copytree(source_run, src, symlinks=True)
    cfg = yaml.safe_load(TINY.read_text())
    cfg["prior"]["params"]["n_layer"] = 2  # only the prior changes
    cfg["tokenizer"]["params"]["disc_weight"] = 0.5  # a loss setting: not a size, replaced
    path = tmp_path / "new.yaml"
    path.write_text(yaml.safe_dump(cfg))
    new = tmp_path / "new"
    assert main(["train", str(path), "--run-dir", str(new), "--from-run", str(src)]) == 0
    stages = {json.loads(line)["stage"] for line in (new / "metrics.jsonl").read_text()
              .splitlines()}
    assert stages == {"prior"}  # the tokenizer was not trained again
    assert (new / "tokenizer" / WEIGHTS_FILE).read_bytes() == \
        (src / "tokenizer" / WEIGHTS_FILE).read_bytes()
    assert not (new / "tokenizer" / STATE_FILE).exists()
    meta = json.loads((new / "tokenizer" / META_FILE).read_text())
    assert meta["metrics"]["from_run"] == str(src.resolve())
    recorded = yaml.safe_load((new / "config.yaml").read_text())
    assert recorded["tokenizer"] == yaml.safe_load((src / "config.yaml").read_text())[
        "tokenizer"]
    assert recorded["prior"]["params"]["n_layer"] == 2
    shutil.rmtree(src)  # the new run holds what it needs
    pipe = vqgen.load_run(new)
    assert pipe.generate(2, [0, 1], seed=0).images.shape == (2, 3, 32, 32)
    # the run's own config trains it again as a no-op (finished, and it matches)
    before = (new / "prior" / WEIGHTS_FILE).read_bytes()
    assert main(["train", str(new / "config.yaml"), "--run-dir", str(new)]) == 0
    assert (new / "prior" / WEIGHTS_FILE).read_bytes() == before


def test_from_run_refuses_a_tokenizer_that_does_not_fit(
        source_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = yaml.safe_load(TINY.read_text())
    cfg["tokenizer"]["params"]["n_embed"] = 64
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(cfg))
    new = tmp_path / "new"
    for command in (["config", "validate", str(path)],
                    ["train", str(path), "--run-dir", str(new)]):
        assert main([*command, "--from-run", str(source_run)]) == 2
        err = capsys.readouterr().err
        assert "vocab_size 32 there, 64 here" in err and "Traceback" not in err
    assert not new.exists()
    assert main(["config", "validate", str(TINY), "--from-run", str(source_run)]) == 0
    assert main(["train", str(TINY), "--run-dir", str(new), "--from-run",
                 str(tmp_path / "nope")]) == 2
    assert "not a vqgen run directory" in capsys.readouterr().err
