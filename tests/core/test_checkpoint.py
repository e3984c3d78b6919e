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
