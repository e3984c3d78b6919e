"""`vqgen train` → `vqgen sample` on a tiny config; run-directory safety."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import vqgen
from vqgen.cli import main
from vqgen.core.images import save_image_grid
from vqgen.runs import config_diff, stage_step

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("run") / "tiny"
    assert main(["train", str(TINY), "--run-dir", str(run_dir)]) == 0
    return run_dir


def test_train_writes_every_stage(run: Path) -> None:
    assert stage_step(run, "tokenizer") == 4 and stage_step(run, "prior") == 4
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in records} == {"tokenizer", "prior"}
    assert json.loads((run / "pipeline.json").read_text()) == {"grid": [8, 8]}
    saved = vqgen.load_config(run / "config.yaml")
    assert saved == vqgen.load_config(TINY)


def test_sample_from_cli_and_python(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    assert main(["sample", str(run), "--n", "8", "--seed", "1", "-o", str(out), "--codes"]) == 0
    codes = load_file(str(out.with_suffix(".codes.safetensors")))["codes"]
    pipe = vqgen.load_run(run)
    again = pipe.generate(8, torch.arange(4).repeat_interleave(2), seed=1)
    assert torch.equal(again.codes, codes)
    plain = tmp_path / "plain.png"
    save_image_grid(again.images, plain, nrow=2)
    with Image.open(out) as im, Image.open(plain) as grid:
        # 4 classes × 2 per row of 32 px images, 2 px padding, after a margin of class names
        assert grid.size == (2 * 34 + 2, 4 * 34 + 2) and im.size[1] == grid.size[1]
        margin = im.size[0] - grid.size[0]
        assert margin > 20
        assert np.array_equal(np.asarray(im)[:, margin:], np.asarray(grid))
        names = np.asarray(im.convert("L"))[:, :margin]  # (H, margin): dark text per row
        rows = [names[2 + r * 34: 34 + r * 34] for r in range(4)]
        assert all((row < 128).any() for row in rows)
    by_name = tmp_path / "star.png"
    assert main(["sample", str(run), "--n", "2", "--class", "star", "--seed", "1",
                 "-o", str(by_name), "--codes"]) == 0
    star = load_file(str(by_name.with_suffix(".codes.safetensors")))["codes"]
    assert torch.equal(star, pipe.generate(2, ["star", "star"], seed=1).codes)
    assert torch.equal(star, pipe.generate(2, [2, 2], seed=1).codes)  # star is class 2
    big = pipe.generate(1, 2, size=(48, 40), seed=0)
    assert big.images.shape == (1, 3, 48, 40)


def test_rerun_skips_finished_stages_and_refuses_another_config(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (run / "prior" / "weights.safetensors").stat().st_mtime_ns
    assert main(["train", str(TINY), "--run-dir", str(run)]) == 0
    assert (run / "prior" / "weights.safetensors").stat().st_mtime_ns == before
    other = tmp_path / "other.yaml"
    other.write_text(TINY.read_text().replace("k: 8", "k: 9"))
    assert main(["train", str(other), "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert "sampler.params.k: 8 → 9" in err and "Traceback" not in err
    assert (run / "prior" / "weights.safetensors").stat().st_mtime_ns == before


def test_config_diff_names_paths() -> None:
    assert config_diff({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}, "d": 4}) == [
        "a.c: 2 → 3", "d: '<unset>' → 4"
    ]


def test_demo_command_writes_pictures_and_metrics(run: Path) -> None:
    assert main(["demo", "--config", str(TINY), "--out", str(run), "--per-class", "2",
                 "--classifier-steps", "5"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"train_wall_s", "tokenizer_psnr_db", "codebook_usage", "prior_val_nll_bits",
            "prior_cond_gain_bits", "sample_class_accuracy", "real_class_accuracy",
            "reconstruction_class_accuracy"} <= set(metrics)
    assert isinstance(metrics["prior_cond_gain_bits"], float)
    assert 0.0 <= metrics["sample_class_accuracy"] <= 1.0
    assert 0.0 <= metrics["reconstruction_class_accuracy"] <= 1.0
    assert metrics["samples_judged"] == 4 * 32
    assert (run / "classifier.safetensors").is_file()
    with Image.open(run / "samples.png") as im:  # one row of 2 per class
        assert im.size == (2 * 34 + 2, 4 * 34 + 2)
    with Image.open(run / "reconstructions.png") as im:  # inputs above reconstructions
        assert im.size == (8 * 34 + 2, 2 * 34 + 2)


def test_the_shipped_configs_validate() -> None:
    root = Path(__file__).resolve().parents[2] / "configs"
    for path in sorted(root.glob("*.yaml")):
        assert main(["config", "validate", str(path)]) == 0, path


def test_a_run_written_with_explicit_sizes_resumes_and_loads_as_before(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Runs written before sizes were wired spell them out in config.yaml: the same
    numbers as the wiring's, so the old run loads, and resuming it with today's config
    (sizes left out) is not 'another config'."""
    import yaml

    old = yaml.safe_load(TINY.read_text())
    old["prior"]["params"].update(vocab_size=32, cond_vocab_size=5, block_size=64)
    assert "vocab_size" not in TINY.read_text()  # today's config leaves them to the wiring
    assert vqgen.load_config(TINY) == vqgen.core.config.parse_config(old)
    old_cfg = tmp_path / "old.yaml"
    old_cfg.write_text(yaml.safe_dump(old))
    run = tmp_path / "run"
    assert main(["train", str(old_cfg), "--run-dir", str(run), "--stages", "tokenizer"]) == 0
    written = vqgen.core.config.dumps_config(vqgen.core.config.parse_config(old))
    assert "vocab_size: 32" in written  # resolved, as earlier versions wrote it
    (run / "config.yaml").write_text(written)
    assert main(["train", str(TINY), "--run-dir", str(run), "--resume"]) == 0
    assert "another config" not in capsys.readouterr().err
    assert vqgen.load_run(run).prior.block_size == 64


def test_a_run_written_before_new_fields_and_stage_defaults_still_resumes(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A config.yaml of an earlier version (no optimizer / loggers fields, stage defaults
    left null) is the same config to this one; a logger chosen on resume is no change."""
    import shutil

    import yaml

    old = shutil.copytree(run, tmp_path / "old", symlinks=True)
    cfg = yaml.safe_load((old / "config.yaml").read_text())
    cfg["train"].pop("loggers")
    for stage in ("tokenizer", "cond", "prior"):
        cfg["train"][stage].pop("optimizer")
        cfg["train"][stage].update(betas=None, lr_schedule=None)
    (old / "config.yaml").write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert main(["train", str(old / "config.yaml"), "--run-dir", str(old), "--resume",
                 "--logger", "tensorboard"]) == 0
    assert "differs" not in capsys.readouterr().err
    changed = dict(cfg, train={**cfg["train"], "prior": {**cfg["train"]["prior"],
                                                         "optimizer": "sgd"}})
    (tmp_path / "changed.yaml").write_text(yaml.safe_dump(changed))
    assert main(["train", str(tmp_path / "changed.yaml"), "--run-dir", str(old),
                 "--resume"]) == 2
    assert "train.prior.optimizer: 'adamw' → 'sgd'" in capsys.readouterr().err


@pytest.mark.parametrize("layout, says, mended", [
    ({"grid": [64, 64]}, "(grid [64, 64]", {"grid": [8, 8]}),
    ({"grid": [8, 8], "cond_offset": 100000}, "(cond_offset 100000", {"grid": [8, 8]}),
])
def test_a_wrong_pipeline_json_is_mended_by_the_resume_it_names(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], layout: dict[str, Any],
    says: str, mended: dict[str, Any],
) -> None:
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy, symlinks=True)
    (copy / "pipeline.json").write_text(json.dumps(layout))
    capsys.readouterr()
    assert main(["sample", str(copy), "--n", "1", "-o", str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err
    assert f"pipeline.json is damaged {says}" in err and "--resume" in err
    assert main(["train", str(copy / "config.yaml"), "--run-dir", str(copy), "--resume"]) == 0
    assert json.loads((copy / "pipeline.json").read_text()) == mended
    assert main(["sample", str(copy), "--n", "1", "-o", str(tmp_path / "b.png")]) == 0
