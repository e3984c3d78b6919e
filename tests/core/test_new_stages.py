"""The successors' stages through the run directory: a masked prior trains and reports its
masked-token loss under its own name (never as an NLL), FSQ / LFQ / maskgit / rope2d runs
resume bit-exactly, and the pipeline tells a 2-D positional prior the ordering's cells."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import vqgen
from vqgen.cli import main
from vqgen.core.config import parse_config
from vqgen.runs import train
from vqgen.training.loop import TrainingInterrupted

from .test_main_job import signal_at, tiny, write_config

MASKGIT = {"name": "maskgit", "params": {"n_layer": 1, "n_head": 2, "n_embd": 32,
                                          "dropout": 0.0, "steps": 4}}


def _records(run: Path, stage: str) -> list[dict[str, Any]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["stage"] == stage]


def test_masked_prior_reports_masked_ce_never_nll(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tiny(prior={"steps": 4, "log_every": 2, "cond_dropout": 0.2})
    cfg["prior"] = MASKGIT
    cfg["conditioner"]["params"]["null_token"] = True
    run = tmp_path / "run"
    assert main(["train", str(write_config(tmp_path / "c.yaml", cfg)), "--run-dir",
                 str(run)]) == 0
    records = _records(run, "prior")
    assert [r["step"] for r in records] == [2, 4]
    assert all("masked_ce_nats" in r and not any("nll" in k for k in r) for r in records)
    assert "val_masked_ce_nats" in records[-1]
    best = json.loads((run / "prior" / "best" / "best.json").read_text())
    assert best["step"] == 4 and best["val_loss"] == pytest.approx(
        records[-1]["val_masked_ce_nats"])
    meta = json.loads((run / "prior" / "meta.json").read_text())
    assert meta["name"] == "maskgit"
    capsys.readouterr()
    assert main(["eval", str(run), "--n", "8"]) == 0
    report = json.loads(capsys.readouterr().out)
    prior = report["prior"]
    assert "val_masked_ce_bits" in prior and "cond_gain_bits" in prior
    assert not any("nll" in k for k in prior)
    pipe = vqgen.load_run(run)
    g = pipe.generate(4, [0, 1, 2, 3], seed=0, guidance=2.0)
    assert g.codes.shape == (4, 8, 8) and bool((g.codes >= 0).all())
    with pytest.raises(vqgen.VqgenError, match="maskgit|MaskGIT"):
        pipe.nll({"image": torch.zeros(1, 3, 32, 32), "label": torch.zeros(1, dtype=torch.long)})


@pytest.mark.parametrize("stage", ["fsq", "lfq", "maskgit", "rope2d"])
def test_new_stages_resume_bit_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       stage: str) -> None:

    cfg = tiny(tokenizer={"steps": 4, "log_every": 1}, prior={"steps": 4, "log_every": 1})
    tok_params = {k: v for k, v in cfg["tokenizer"]["params"].items()
                  if k not in ("n_embed", "embed_dim", "kmeans_init")}
    if stage == "fsq":
        cfg["tokenizer"] = {"name": "fsq", "params": {**tok_params, "levels": [4, 4, 2]}}
    elif stage == "lfq":
        cfg["tokenizer"] = {"name": "lfq", "params": {**tok_params, "codebook_bits": 5}}
    elif stage == "maskgit":
        cfg["prior"] = MASKGIT
    else:
        cfg["prior"]["params"]["pos_emb"] = "rope2d"
        cfg["ordering"] = {"name": "spiral_out"}
    config = write_config(tmp_path / "c.yaml", cfg)
    train(config, tmp_path / "whole", progress=False)
    with monkeypatch.context() as m:
        signal_at(m, 1, signal.SIGINT, "prior" if stage in ("maskgit", "rope2d") else "tokenizer")
        with pytest.raises(TrainingInterrupted):
            train(config, tmp_path / "cut", progress=False)
    train(config, tmp_path / "cut", resume=True, progress=False)
    for part in ("tokenizer", "prior"):
        a = load_file(str(tmp_path / "whole" / part / "weights.safetensors"))
        b = load_file(str(tmp_path / "cut" / part / "weights.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (stage, part)


def test_pipeline_gives_a_2d_positional_prior_the_orderings_cells() -> None:
    cfg = tiny()
    cfg["prior"]["params"]["pos_emb"] = "rope2d"
    cfg["ordering"] = {"name": "spiral_out"}
    config = parse_config(cfg)
    registry = vqgen.default_registry()
    from vqgen.core.pipeline import assemble

    tok = registry.create("tokenizer", config.tokenizer.name, config.tokenizer.params)
    cond = registry.create("conditioner", config.conditioner.name, config.conditioner.params)
    pipe = assemble(config, tok, cond, (8, 8), registry)
    expected = registry.create("ordering", "spiral_out", {}).permutation(8, 8)
    assert torch.equal(pipe.prior.cell_order, expected)
    assert not torch.equal(expected, torch.arange(64))  # the check can fail
