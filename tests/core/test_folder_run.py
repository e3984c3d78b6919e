"""A user's own labelled folder, start to finish through the CLI: held-out data (a val/
folder, or a fraction), classes wired and named from the folders, evaluation, sampling
by class name, previews across classes, portable roots, a reused tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from safetensors.torch import load_file

import vqgen
from vqgen.cli import main
from vqgen.plugins.folder import FolderDataset

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
#: three classes, one solid colour each (so a preview's classes can be read off pixels)
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def write_folder(root: Path, per_class: int, val_per_class: int = 0) -> None:
    """``root/images/<colour>/…`` (and ``root/val/<colour>/…``): 32×32 images of one
    colour per class with a little per-image shading."""
    for split, n in (("images", per_class), ("val", val_per_class)):
        for name, rgb in COLOURS.items():
            if n == 0:
                continue
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                shade = np.array(rgb) * (0.85 + 0.03 * i)
                px = np.broadcast_to(shade.clip(0, 255).astype(np.uint8), (32, 32, 3))
                Image.fromarray(np.ascontiguousarray(px)).save(
                    root / split / name / f"{split}_{name}_{i}.png")


def user_config(path: Path, root: str, **data: object) -> Path:
    """The tiny config on the folder at ``root`` with ``n_classes`` left to the wiring,
    previews at the end of the tokenizer stage and validation at the end of the prior's."""
    cfg = yaml.safe_load(TINY.read_text())
    cfg["data"] = {"name": "folder", "params": {"root": root, "resolution": 32, **data}}
    cfg["conditioner"] = {"name": "class"}
    cfg["train"]["tokenizer"].update(image_every=4)
    cfg["train"]["prior"].update(steps=6, log_every=3, image_every=0)
    path.write_text(yaml.safe_dump(cfg))
    return path


def records(run: Path, stage: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("stage") == stage]


@pytest.mark.parametrize("layout", ["val_folder", "fraction"])
def test_own_folder_start_to_finish(layout: str, tmp_path: Path, one_thread: None,
                                    monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    project = tmp_path / "project"
    if layout == "val_folder":  # a relative root, taken from the config's folder
        write_folder(project / "data", per_class=6, val_per_class=2)
        config = user_config(project / "mine.yaml", "data")
    else:  # a root through an environment variable; a quarter held out per class
        write_folder(project / "data", per_class=8)
        monkeypatch.setenv("MY_IMAGES", str(project))
        config = user_config(project / "mine.yaml", "$MY_IMAGES/data", held_out=0.25)
    monkeypatch.chdir(tmp_path)  # not the config's folder
    run = tmp_path / "runs" / "mine"
    assert main(["train", str(config), "--run-dir", str(run), "--threads", "1"]) == 0

    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["params"]["root"] == str(project / "data")  # recorded absolute
    assert saved["data"]["params"]["classes"] == ["blue", "green", "red"]  # natural order
    assert saved["conditioner"]["params"]["n_classes"] == 3

    held = vqgen.load_run(run)
    assert held.class_names == ["blue", "green", "red"]
    # held-out NLL in the metrics, and best/ chosen on it
    prior = records(run, "prior")
    val = [r for r in prior if "val_nll_nats" in r]
    assert val and all(np.isfinite(r["val_nll_nats"]) for r in val)
    best = json.loads((run / "prior" / "best" / "best.json").read_text())
    assert best["val_loss"] == min(r["val_nll_nats"] for r in val)
    assert any("val_loss" in r for r in records(run, "tokenizer"))

    # the tokenizer's preview mixes the classes: its top row shows every colour
    preview = sorted((run / "images").glob("tokenizer_*.png"))[-1]
    top = np.asarray(Image.open(preview).convert("RGB"))[2:34]  # (32, W, 3): the inputs
    centres = [top[16, 2 + 34 * k + 16] for k in range(top.shape[1] // 34)]
    seen = {max(range(3), key=lambda ch: int(c[ch])) for c in centres}
    assert seen == {0, 1, 2}  # a red, a green and a blue image

    # vqgen eval works on the held-out part
    assert main(["eval", str(run), "--n", "16"]) == 0
    report = json.loads((run / "eval.json").read_text())
    val_split = FolderDataset(**{**saved["data"]["params"], "split": "val"})
    assert report["held_out_samples"] == len(val_split) >= 3  # every class held out
    assert len(val_split) == 6 or layout == "fraction"  # val/: 2 per class
    assert np.isfinite(report["prior"]["val_nll_nats"])

    # sampling by class name: the same codes as by its id
    out = tmp_path / "green.png"
    assert main(["sample", str(run), "--class", "green", "--n", "2", "-o", str(out),
                 "--codes"]) == 0
    codes = load_file(str(out.with_suffix(".codes.safetensors")))["codes"]
    assert np.array_equal(codes.numpy(), held.generate(2, [1, 1], seed=0).codes.numpy())
    capsys.readouterr()
    assert main(["sample", str(run), "--class", "purple", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "'purple' is not a class" in err and "blue, green, red" in err

    # a second run reuses the trained tokenizer: only the prior trains, it loads alone
    cfg = yaml.safe_load(config.read_text())
    cfg["prior"]["params"]["n_layer"] = 2
    other = config.with_name("other.yaml")
    other.write_text(yaml.safe_dump(cfg))
    second = tmp_path / "runs" / "second"
    assert main(["train", str(other), "--run-dir", str(second), "--from-run", str(run),
                 "--stages", "prior"]) == 0
    assert {r["stage"] for r in map(json.loads, (second / "metrics.jsonl").read_text()
                                    .splitlines())} == {"prior"}
    shutil.rmtree(run)
    assert vqgen.load_run(second).generate(1, "red", seed=0).images.shape == (1, 3, 32, 32)
