"""Checkpoint bookkeeping: the best checkpoint is chosen by finite held-out losses only."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from vqgen.core.checkpoint import BEST_DIR, keep_checkpoint


def _checkpoint(d: Path, step: int) -> None:
    """Files replaced as checkpoints replace them (a new file renamed over the old one;
    best/ holds hard links, so writing in place would change it too)."""
    d.mkdir(exist_ok=True)
    for name, text in (("weights.safetensors", f"step {step}"),
                       ("meta.json", json.dumps({"step": step}))):
        (d / f".{name}.tmp").write_text(text)
        os.replace(d / f".{name}.tmp", d / name)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_val_loss_never_becomes_the_best(tmp_path: Path, bad: float) -> None:
    _checkpoint(tmp_path, 1)
    assert keep_checkpoint(tmp_path, 1, keep_last=0, val_loss=bad)["best_step"] is None
    assert not (tmp_path / BEST_DIR).exists()
    _checkpoint(tmp_path, 2)
    assert keep_checkpoint(tmp_path, 2, keep_last=0, val_loss=3.0)["best_step"] == 2
    _checkpoint(tmp_path, 3)
    assert keep_checkpoint(tmp_path, 3, keep_last=0, val_loss=bad)["best_step"] == 2
    assert (tmp_path / BEST_DIR / "weights.safetensors").read_text() == "step 2"


def test_a_stored_non_finite_or_damaged_best_is_replaced(tmp_path: Path) -> None:
    for stored in ({"step": 1, "val_loss": math.nan}, {"step": 1}, {"val_loss": "x"}):
        best = tmp_path / BEST_DIR
        best.mkdir(parents=True, exist_ok=True)
        (best / "best.json").write_text(json.dumps(stored))  # NaN as written by json
        _checkpoint(tmp_path, 5)
        assert keep_checkpoint(tmp_path, 5, keep_last=0, val_loss=2.0)["best_step"] == 5
        assert json.loads((best / "best.json").read_text()) == {"step": 5, "val_loss": 2.0}


def _commit(d: Path, step: int, fail: bool = False) -> None:
    from vqgen.core.checkpoint import checkpoint_commit

    with checkpoint_commit(d, step) as unit:
        (unit / "weights.safetensors").write_text(f"weights {step}")
        if fail:
            raise KeyboardInterrupt  # a crash between the files of one checkpoint
        (unit / "meta.json").write_text(json.dumps({"step": step}))


def test_a_checkpoint_commits_as_one_unit(tmp_path: Path) -> None:
    from vqgen.core.checkpoint import CURRENT, checkpoint_dir

    d = tmp_path / "prior"
    _commit(d, 1)
    assert os.readlink(d / CURRENT) == "history/step_000001"
    assert (d / "meta.json").read_text() == '{"step": 1}'  # top level links through current
    assert (d / "weights.safetensors").read_text() == "weights 1"
    with pytest.raises(KeyboardInterrupt):
        _commit(d, 2, fail=True)
    # nothing of step 2 is visible: current, the top level and the history are step 1's
    assert checkpoint_dir(d) == (d / "history" / "step_000001").resolve()
    assert (d / "weights.safetensors").read_text() == "weights 1"
    assert sorted(p.name for p in (d / "history").iterdir()) == ["step_000001"]
    # a commit killed before its pointer switch leaves a temporary folder: cleaned next time
    (d / "history" / ".step_000002.killed").mkdir()
    _commit(d, 2)
    assert sorted(p.name for p in (d / "history").iterdir()) == ["step_000001", "step_000002"]
    assert json.loads((d / "meta.json").read_text()) == {"step": 2}
    # keep_last prunes history, never the current checkpoint
    assert keep_checkpoint(d, 2, keep_last=0, val_loss=None)["history"] == ["step_000002"]
    assert sorted(p.name for p in (d / "history").iterdir()) == ["step_000002"]
    # the same step committed again (a resume that stops at once) keeps the whole one
    _commit(d, 2)
    assert (d / "weights.safetensors").read_text() == "weights 2"


def test_a_first_commit_killed_before_its_switch_leaves_nothing_trained(tmp_path: Path) -> None:
    """Only history/ with a temporary folder: the stage has not been trained yet, and
    training starts it afresh (nothing whole was lost)."""
    from vqgen.runs import stage_step

    (tmp_path / "prior" / "history" / ".step_000001.killed").mkdir(parents=True)
    assert stage_step(tmp_path, "prior") is None
    _commit(tmp_path / "prior", 1)
    assert stage_step(tmp_path, "prior") == 1


@pytest.mark.parametrize("meta", [
    {"kind": "prior", "name": "no_such_prior", "params": {}, "step": 1},
    {"kind": "no_such_kind", "name": "gpt", "params": {}, "step": 1},
    {"kind": "prior", "name": "gpt", "params": {"n_layers": 3}, "step": 1},
])
def test_a_foreign_meta_json_is_named(tmp_path: Path, meta: dict) -> None:
    from vqgen.core.checkpoint import CheckpointError, load_component

    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'meta.json'} names a component"):
        load_component(tmp_path)


def test_a_shape_mismatch_is_one_paragraph_naming_the_file(tmp_path: Path) -> None:
    import vqgen
    from vqgen.core.checkpoint import CheckpointError, load_weights, save_component

    small = vqgen.create("prior", "gpt", {"vocab_size": 8, "block_size": 8, "n_layer": 2,
                                          "n_head": 1, "n_embd": 8})
    save_component(tmp_path, small, kind="prior", name="gpt", step=1)
    wide = vqgen.create("prior", "gpt", {"vocab_size": 8, "block_size": 8, "n_layer": 2,
                                         "n_head": 1, "n_embd": 16})
    with pytest.raises(CheckpointError) as info:
        load_weights(wide, tmp_path / "weights.safetensors")
    msg = str(info.value)
    assert "\n" not in msg and str(tmp_path / "weights.safetensors") in msg
    assert "tensor(s) differ in shape, e.g." in msg and "(8,) in the file, (16,)" in msg


def test_a_file_where_best_goes_is_moved_aside_not_deleted(tmp_path: Path) -> None:
    (tmp_path / BEST_DIR).write_text("a user's notes")
    _checkpoint(tmp_path, 1)
    assert keep_checkpoint(tmp_path, 1, keep_last=0, val_loss=1.0)["best_step"] == 1
    assert (tmp_path / BEST_DIR / "weights.safetensors").read_text() == "step 1"
    assert (tmp_path / f".{BEST_DIR}.moved-aside").read_text() == "a user's notes"
    _checkpoint(tmp_path, 2)  # a better one later replaces the best directory as usual
    assert keep_checkpoint(tmp_path, 2, keep_last=0, val_loss=0.5)["best_step"] == 2
    assert (tmp_path / BEST_DIR / "weights.safetensors").read_text() == "step 2"
    assert (tmp_path / f".{BEST_DIR}.moved-aside").read_text() == "a user's notes"
