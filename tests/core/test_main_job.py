"""The main job's reliability: eval, signals, kept checkpoints, bad input, torchrun/DDP."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

import vqgen
from vqgen.cli import main
from vqgen.core.checkpoint import load_component
from vqgen.core.config import ConfigError, parse_config
from vqgen.evaluation import psnr, ssim
from vqgen.runs import stage_step
from vqgen.training import loggers
from vqgen.training.engine import TrainingInterrupted, train_prior, train_tokenizer

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"


def tiny(**train: Any) -> dict[str, Any]:
    """The tiny config as a dict (a smaller VQGAN), with ``train`` overrides per stage."""
    cfg = yaml.safe_load(TINY.read_text())
    cfg["tokenizer"]["params"].update(ch=16, norm_groups=8)
    for stage, values in train.items():
        cfg["train"].setdefault(stage, {}).update(values)
    return cfg


def copy_run(run: Path, dest: Path) -> Path:
    """A copy of a run directory with its layout (``current`` and the top-level links)."""
    shutil.copytree(run, dest, symlinks=True)
    return dest


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("main") / "tiny"
    assert main(["train", str(TINY), "--run-dir", str(run_dir)]) == 0
    return run_dir


# -----------------------------------------------------------------------------
# eval


def test_psnr_and_ssim_exact_values() -> None:
    x = torch.zeros(2, 3, 16, 16)
    assert torch.allclose(psnr(x + 0.2, x), torch.full((2,), 20.0))  # mse (0.1)² → 20 dB
    assert torch.allclose(ssim(x, x), torch.ones(2))
    noisy = x + 0.5 * torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert float(ssim(noisy, x).max()) < 0.5


def test_eval_reports_tokenizer_prior_and_samples(run: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from vqgen.plugins.judges import save_classifier
    from vqgen.plugins.shapes import ShapesDataset
    from vqgen.training.judges import train_classifier

    clf = tmp_path / "clf.safetensors"
    save_classifier(train_classifier(ShapesDataset(resolution=32, length=64), steps=3,
                                     progress=False), clf)
    out = tmp_path / "eval.json"
    assert main(["eval", str(run), "--n", "32", "--per-class", "3", "--classifier", str(clf),
                 "--fid", "4", "-o", str(out)]) == 0
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    tok = report["tokenizer"]
    assert 0 < tok["codebook_usage"] <= 1 and 1 <= tok["perplexity"] <= 32
    assert tok["psnr_db"] > 0 and -1 <= tok["ssim"] <= 1 and tok["lpips"] >= 0
    assert "backbone" in tok["lpips_backbone"]
    prior = report["prior"]
    assert prior["val_nll_bits"] == pytest.approx(prior["val_nll_nats"] / math.log(2), abs=1e-4)
    assert prior["cond_gain_bits"] == pytest.approx(
        prior["val_nll_bits_other_cond"] - prior["val_nll_bits"], abs=1e-4)
    assert report["samples"]["n_samples"] == 12 and len(report["samples"]["per_class"]) == 4
    assert 0 <= report["samples"]["class_accuracy"] <= 1
    fid = report["fid_is"]
    assert "fid" in fid or fid["fid_is"].startswith("skipped: torch-fidelity")


def test_eval_without_classifier_says_how_to_get_one(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    assert main(["eval", str(run), "--n", "16", "-o", str(out)]) == 0
    samples = json.loads(out.read_text())["samples"]
    assert samples["class_accuracy"] is None and "vqgen.training.judges" in samples["note"]


# -----------------------------------------------------------------------------
# signals


def signal_at(monkeypatch: pytest.MonkeyPatch, step: int, signum: int,
              stage: str | None = None) -> None:
    """Deliver ``signum`` to this process while an objective (of ``stage``: "tokenizer"
    or "prior"; None: any) computes step ``step``."""
    from vqgen.training.objectives.prior import PriorObjective
    from vqgen.training.objectives.stage1 import AdversarialObjective, FittedObjective

    stage1 = (AdversarialObjective, FittedObjective)
    classes = {None: (*stage1, PriorObjective), "tokenizer": stage1, "prior": (PriorObjective,)}
    for cls in classes[stage]:
        def step_then_signal(self: Any, batch: Any, s: int, _step: Any = cls.step) -> Any:
            out = _step(self, batch, s)
            if s == step:
                signal.raise_signal(signum)
            return out

        monkeypatch.setattr(cls, "step", step_then_signal)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_finishes_the_step_checkpoints_and_resumes_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signum: int
) -> None:
    cfg = parse_config(tiny(tokenizer={"steps": 6}))
    straight = train_tokenizer(cfg, tmp_path / "straight", progress=False)
    with monkeypatch.context() as m:
        signal_at(m, 2, signum)
        with pytest.raises(TrainingInterrupted, match="--resume") as info:
            train_tokenizer(cfg, tmp_path / "cut", progress=False)
    assert info.value.exit_code == 128 + signum
    assert stage_step(tmp_path / "cut", "tokenizer") == 3  # step 2 (0-based) was finished
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    resumed = train_tokenizer(cfg, tmp_path / "cut", progress=False, resume=True)
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_prior_signal_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = parse_config(tiny(prior={"steps": 5, "cond_dropout": 0.5}))
    tok = train_tokenizer(cfg, progress=False)
    cond = vqgen.create("conditioner", "class", {"n_classes": 4})
    straight = train_prior(cfg, tok, cond, tmp_path / "a", progress=False).prior
    with monkeypatch.context() as m:
        signal_at(m, 1, signal.SIGTERM)
        with pytest.raises(TrainingInterrupted):
            train_prior(cfg, tok, cond, tmp_path / "b", progress=False)
    # the flag is read in the step's one collective, after its micro-batches
    assert stage_step(tmp_path / "b", "prior") == 2
    resumed = train_prior(cfg, tok, cond, tmp_path / "b", progress=False, resume=True).prior
    for k, v in straight.state_dict().items():  # incl. the condition-dropout draws
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_sigterm_from_outside_stops_the_cli_with_a_resume_hint(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "long.yaml", tiny(tokenizer={"steps": 100000, "log_every": 1}))
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vqgen", "train", str(cfg), "--run-dir", str(run)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.is_file()
                                      or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    # the hint is a command that works as it is: this run's own config and directory
    assert f"vqgen train {run / 'config.yaml'} --run-dir {run} --resume" in err
    step = stage_step(run, "tokenizer")
    assert step is not None and step >= 2
    assert load_component(run / "tokenizer") is not None


# -----------------------------------------------------------------------------
# kept checkpoints


def test_keeps_the_last_k_and_the_best(tmp_path: Path) -> None:
    cfg = parse_config(tiny(tokenizer={"steps": 2},
                            prior={"steps": 5, "checkpoint_every": 1, "keep_last": 2}))
    pipe = vqgen.train(cfg, tmp_path / "run", progress=False)
    assert pipe is not None
    prior_dir = tmp_path / "run" / "prior"
    assert sorted(p.name for p in (prior_dir / "history").iterdir()) == [
        "step_000004", "step_000005"
    ]
    vals = {}
    for step in (4, 5):
        meta = json.loads((prior_dir / "history" / f"step_{step:06d}" / "meta.json").read_text())
        assert meta["step"] == step
        vals[step] = meta["metrics"]["val_nll_nats"]
    best = json.loads((prior_dir / "best" / "best.json").read_text())
    assert best["val_loss"] <= min(vals.values()) + 1e-9
    best_meta = json.loads((prior_dir / "best" / "meta.json").read_text())
    assert best_meta["step"] == best["step"]
    assert best_meta["metrics"]["val_nll_nats"] == pytest.approx(best["val_loss"])
    assert load_component(prior_dir / "best") is not None
    latest = load_file(str(prior_dir / "weights.safetensors"))
    kept = load_file(str(prior_dir / "history" / "step_000005" / "weights.safetensors"))
    assert all(torch.equal(latest[k], kept[k]) for k in latest)


# -----------------------------------------------------------------------------
# bad input


def _err(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_missing_empty_and_unreadable_data(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    def cfg_for(root: Path) -> Path:
        cfg = tiny()
        cfg["data"] = {"name": "folder", "params": {"root": str(root), "resolution": 32}}
        cfg.pop("conditioner")
        cfg["prior"]["params"]["cond_vocab_size"] = 0
        return write_config(tmp_path / f"{root.name}.yaml", cfg)

    assert main(["train", str(cfg_for(tmp_path / "absent")), "--run-dir",
                 str(tmp_path / "r1")]) == 2
    assert "absent" in _err(capsys)
    (tmp_path / "empty" / "images").mkdir(parents=True)
    assert main(["train", str(cfg_for(tmp_path / "empty")), "--run-dir",
                 str(tmp_path / "r2")]) == 2
    assert "empty" in _err(capsys)
    bad = tmp_path / "bad"
    (bad / "images").mkdir(parents=True)
    (bad / "images" / "broken.png").write_bytes(b"not a png at all")
    assert main(["train", str(cfg_for(bad)), "--run-dir", str(tmp_path / "r3")]) == 2
    assert "broken.png" in _err(capsys)


def test_a_train_state_that_is_not_ours_is_refused_on_resume(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """(Other damaged checkpoints: the table in test_hostile_cli.py.)"""
    pickled = copy_run(run, tmp_path / "pickled")
    cfg = yaml.safe_load((pickled / "config.yaml").read_text())
    (pickled / "prior" / "meta.json").write_text(
        (pickled / "prior" / "meta.json").read_text().replace('"step": 4', '"step": 2'))
    torch.save({"step": 2, "obj": _Alien()}, pickled / "prior" / "train_state.pt")
    before = (pickled / "prior" / "weights.safetensors").read_bytes()
    assert main(["train", str(write_config(tmp_path / "c.yaml", cfg)), "--run-dir",
                 str(pickled), "--resume"]) == 2
    err = _err(capsys)
    assert "train_state.pt" in err and "not ours" in err
    assert (pickled / "prior" / "weights.safetensors").read_bytes() == before


class _Alien:
    """Something only pickle can store."""


def _tree_hash(root: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}



# -----------------------------------------------------------------------------
# a cond stage from a config


def test_spatial_conditioner_trains_its_cond_stage_from_the_config(tmp_path: Path) -> None:
    cfg = tiny(tokenizer={"steps": 2}, cond={"steps": 3, "batch_size": 8, "lr": 1e-3,
                                             "device": "cpu", "image_every": 0},
               prior={"steps": 2})
    cfg["conditioner"] = {"name": "depth", "params": {"tokenizer": {"name": "vqgan", "params": {
        "in_channels": 1, "ch": 16, "ch_mult": [1, 2, 2], "n_embed": 16, "embed_dim": 8,
        "z_channels": 8, "norm_groups": 4, "perceptual_weight": 0, "disc_weight": 0,
        "kmeans_init": False}}}}
    cfg["prior"]["params"].update(cond_vocab_size=17, block_size=128)
    path = write_config(tmp_path / "depth.yaml", cfg)
    run = tmp_path / "run"
    assert main(["train", str(path), "--run-dir", str(run)]) == 0
    assert stage_step(run, "cond") == 3
    records = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in records} == {"tokenizer", "cond", "prior"}
    pipe = vqgen.load_run(run)
    trained = load_file(str(run / "cond" / "weights.safetensors"))
    own = pipe.conditioner.tokenizer.state_dict()
    assert all(torch.equal(trained[k], own[k]) for k in trained)
    depth = torch.rand(1, 1, 32, 32)
    gen = pipe.generate(2, {"depth": depth}, seed=0)
    assert gen.images.shape == (2, 3, 32, 32)
    from PIL import Image

    Image.fromarray((depth[0, 0].numpy() * 255).astype("uint8")).save(tmp_path / "d.png")
    out = tmp_path / "s.png"
    assert main(["sample", str(run), "--n", "2", "--cond", str(tmp_path / "d.png"),
                 "-o", str(out), "--singles", str(tmp_path / "one")]) == 0
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["0000.png", "0001.png"]
    # without --cond: held-out conditions, each row condition | 4 samples | real image
    sheet = tmp_path / "sheet.png"
    assert main(["sample", str(run), "--n", "8", "-o", str(sheet)]) == 0
    grid = torch.from_numpy(np.array(Image.open(sheet))).float()  # (H, W, 3)
    assert tuple(grid.shape) == (2 * 34 + 2, 6 * 34 + 2, 3)
    held = vqgen.create("dataset", "shapes", {"resolution": 32, "split": "val", "length": 2})

    def tile(r: int, c: int) -> torch.Tensor:
        return grid[2 + 34 * r : 34 + 34 * r, 2 + 34 * c : 34 + 34 * c].permute(2, 0, 1)

    def u8(x: torch.Tensor) -> torch.Tensor:
        return ((x.clamp(-1, 1) + 1) * 127.5).round()

    for r in range(2):
        real = held[r]["image"]
        assert torch.allclose(tile(r, 5), u8(real), atol=1)  # the real image, last
        shown = pipe.conditioner.condition_input({"depth": held[r]["depth"][None]})[0]
        assert torch.allclose(tile(r, 0), u8(shown).expand(3, -1, -1), atol=1)


# -----------------------------------------------------------------------------
# torchrun / DDP on the CPU (gloo)

_DDP_SCRIPT = textwrap.dedent('''
    import os, sys
    import torch
    torch.set_num_threads(1)
    from safetensors.torch import save_file
    import vqgen
    from vqgen.training import train_prior, train_tokenizer

    def weights(module):
        return {k: v.detach().contiguous() for k, v in module.state_dict().items()}

    cfg, out = vqgen.load_config(sys.argv[1]), sys.argv[2]
    rank = int(os.environ.get("RANK", "0"))
    tok = train_tokenizer(cfg, progress=False)
    cond = vqgen.create("conditioner", "class", {"n_classes": 4})
    pipe = train_prior(cfg, tok, cond, progress=False, cache_root=out + f"/cache{rank}")
    save_file(weights(tok), f"{out}/tok{rank}.safetensors")
    save_file(weights(pipe.prior), f"{out}/prior{rank}.safetensors")
    if os.environ.get("WORLD_SIZE", "1") == "1":  # the weights before the first update
        zero = cfg.model_copy(deep=True)
        zero.train.tokenizer.steps = zero.train.prior.steps = 0
        save_file(weights(train_tokenizer(zero, progress=False)), f"{out}/tok_init.safetensors")
        pipe0 = train_prior(zero, tok, cond, progress=False, cache_root=out + "/cache_init")
        save_file(weights(pipe0.prior), f"{out}/prior_init.safetensors")
''')



@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gloo_processes_equal_one_process_with_the_global_batch(
        tmp_path: Path, strategy: str) -> None:
    """Under DDP and under FSDP (the prior's weights, gradients and optimizer state
    sharded over the two ranks), two processes train what one does on the global batch."""
    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT)
    # Plain SGD (train.*.optimizer: sgd) instead of Adam: an update linear in the gradient
    # keeps the reduction-order noise of an all-reduce (~1e-7 relative) at that size, where
    # Adam turns it into a full step on any near-zero gradient (CPU-dependent).
    common = {"lr": 0.05, "device": "cpu", "log_every": 1, "image_every": 0,
              "optimizer": "sgd"}
    per_rank = tiny(tokenizer={**common, "steps": 3, "batch_size": 4},
                    prior={**common, "steps": 3, "batch_size": 4, "cond_dropout": 0.3})
    per_rank["conditioner"]["params"]["null_token"] = True
    per_rank["train"]["prior"]["strategy"] = strategy
    single = json.loads(json.dumps(per_rank))
    single["train"]["tokenizer"]["batch_size"] = 8
    single["train"]["prior"]["batch_size"] = 8
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), str(write_config(tmp_path / "two.yaml", per_rank)), str(tmp_path / "two")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run(
        [sys.executable, str(script), str(write_config(tmp_path / "one.yaml", single)),
         str(tmp_path / "one")], capture_output=True, text=True, env=env, timeout=300,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    moved = 0.0
    for name in ("tok", "prior"):
        r0 = load_file(str(tmp_path / "two" / f"{name}0.safetensors"))
        r1 = load_file(str(tmp_path / "two" / f"{name}1.safetensors"))
        ref = load_file(str(tmp_path / "one" / f"{name}0.safetensors"))
        init = load_file(str(tmp_path / "one" / f"{name}_init.safetensors"))
        floats = [k for k in ref if ref[k].is_floating_point()]
        # the largest update one process made to this stage's weights
        scale = max(float((ref[k] - init[k]).abs().max()) for k in floats)
        moved = max(moved, scale)
        for k in ref:
            assert torch.equal(r0[k], r1[k]), (name, k)  # ranks agree exactly
            if k not in floats:
                assert torch.equal(r0[k], ref[k]), (name, k)
                continue
            # the updates of the two runs agree to 1e-5 of the stage's largest update,
            # plus the float32 rounding of the weights they were added to; a wrong
            # batch split or a missing gradient average changes them by O(1)
            d2, d1 = (r0[k] - init[k]).double(), (ref[k] - init[k]).double()
            ulp = 2 * torch.finfo(torch.float32).eps * float(init[k].abs().max())
            torch.testing.assert_close(d2, d1, rtol=0, atol=1e-5 * scale + ulp,
                                       msg=lambda m, at=f"{name} {k}": f"{at}: {m}")
    assert moved > 1e-3  # the updates are large enough for the comparison to mean something


def _torchrun_train(cfg: Path, run: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """``vqgen train`` under torchrun with two CPU processes (one thread each); it must
    succeed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "vqgen", "train", str(cfg), "--run-dir", str(run), "--threads", "1", *extra],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_torchrun_cli_trains_a_run_that_samples(tmp_path: Path) -> None:
    common = {"device": "cpu", "log_every": 1, "image_every": 0}
    cfg = write_config(tmp_path / "c.yaml", tiny(tokenizer={**common, "steps": 2, "batch_size": 4},
                                                 prior={**common, "steps": 2, "batch_size": 4}))
    run = tmp_path / "run"
    proc = _torchrun_train(cfg, run)
    assert proc.stdout.count("trained tokenizer, prior") == 2  # both ranks finish
    records = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["stage"] == "prior"] == [1, 2]  # rank 0 alone logs
    pipe = vqgen.load_run(run)
    assert pipe.generate(2, [0, 1], seed=0).images.shape == (2, 3, 32, 32)


def test_fsdp_checkpoints_are_whole_resume_exactly_and_sample_in_one_process(
        tmp_path: Path) -> None:
    common = {"device": "cpu", "log_every": 1, "image_every": 0}
    config = tiny(tokenizer={**common, "steps": 2, "batch_size": 4},
                  prior={**common, "steps": 4, "batch_size": 4, "checkpoint_every": 2,
                         "strategy": "fsdp"})
    config["prior"]["params"]["n_layer"] = 2
    cfg = write_config(tmp_path / "c.yaml", config)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _torchrun_train(cfg, straight)
    # the same run stopped after step 2: its checkpoint at step 2 made current again
    prior = copy_run(straight, resumed) / "prior"
    shutil.rmtree(prior / "history" / "step_000004")
    (prior / "current").unlink()
    (prior / "current").symlink_to("history/step_000002")
    _torchrun_train(cfg, resumed, "--resume")
    a = load_file(str(straight / "prior" / "weights.safetensors"))
    b = load_file(str(resumed / "prior" / "weights.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit-exact across the sharded resume
    # whole tensors on disk, as one process writes them: the weights load in one process,
    # and the Adam moments have their parameters' full shapes
    pipe = vqgen.load_run(straight)
    shapes = sorted(tuple(p.shape) for p in pipe.prior.parameters())
    state = torch.load(straight / "prior" / "train_state.pt", weights_only=True)
    moments = state["optimizer"]["state"].values()
    assert sorted(tuple(m["exp_avg"].shape) for m in moments) == shapes
    assert sorted(tuple(m["exp_avg_sq"].shape) for m in moments) == shapes
    assert pipe.generate(2, [0, 1], seed=0).images.shape == (2, 3, 32, 32)


@pytest.mark.parametrize("field, value, says", [
    ("strategy", "fsdp", "fsdp shards the prior stage only"),
    ("activation_checkpointing", True, "activation checkpointing is for the prior's blocks"),
])
def test_fsdp_and_activation_checkpointing_are_prior_stage_settings(
        field: str, value: Any, says: str) -> None:
    for stage in ("tokenizer", "cond"):
        config = tiny()
        config["train"][stage] = {field: value}
        with pytest.raises(ConfigError, match=rf"train.{stage}.{field}: .*{says}"):
            parse_config(config)
    config = tiny()
    config["train"]["prior"][field] = value
    assert getattr(parse_config(config).train.prior, field) == value


def test_fsdp_with_fp16_is_refused_by_name() -> None:
    config = tiny(prior={"strategy": "fsdp", "amp": "fp16"})
    with pytest.raises(ConfigError, match=r"train.prior: .*amp: fp16 .*use amp: bf16"):
        parse_config(config)
    config["train"]["prior"]["amp"] = "bf16"
    assert parse_config(config).train.prior.amp == "bf16"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_both_stages_train_under_autocast_on_cuda(tmp_path: Path, amp: str) -> None:
    common = {"device": "cuda", "amp": amp, "log_every": 1, "image_every": 0}
    cfg = tiny(tokenizer={**common, "steps": 3}, prior={**common, "steps": 3})
    cfg["tokenizer"]["params"].update(disc_weight=0.1, disc_start=1, disc_n_layers=1)
    pipe = vqgen.train(parse_config(cfg), tmp_path / "run", progress=False)
    assert pipe is not None
    records = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r.get("loss", r.get("nll_nats", 0.0))) for r in records)
    assert pipe.to("cuda").generate(2, [0, 1], seed=0).images.shape == (2, 3, 32, 32)


def test_sampler_param_alone_is_used(run: Path, tmp_path: Path) -> None:
    """--sampler-param k=1 (greedy) draws what --k 1 draws, whatever the seed."""
    a, b, c = (tmp_path / f"{n}.png" for n in "abc")
    assert main(["sample", str(run), "--n", "4", "--sampler-param", "k=1", "--seed", "1",
                 "-o", str(a)]) == 0
    assert main(["sample", str(run), "--n", "4", "--k", "1", "--seed", "2", "-o", str(b)]) == 0
    assert main(["sample", str(run), "--n", "4", "--seed", "1", "-o", str(c)]) == 0
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()


def test_a_second_process_on_a_run_directory_is_refused(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:

    from vqgen.runs import run_lock

    busy = copy_run(run, tmp_path / "busy")
    (busy / "prior" / "meta.json").resolve().unlink()  # damaged: the lock comes first
    before = _tree_hash(busy)
    holder = subprocess.Popen(  # another process holds the run, as a running `vqgen train`
        [sys.executable, "-c", "import sys, time; from vqgen.runs import run_lock\n"
         "with run_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)",
         str(busy)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        after_hold = _tree_hash(busy)
        assert main(["train", str(busy / "config.yaml"), "--run-dir", str(busy),
                     "--resume"]) == 2
        err = _err(capsys)
        assert f"{busy} is in use by another vqgen process (pid {holder.pid}" in err
        assert _tree_hash(busy) == after_hold
    finally:
        holder.kill()
        holder.wait()
    # the lock died with its holder: this process can take it now
    with run_lock(busy):
        pass
    assert {k for k in _tree_hash(busy) if not k.startswith(".lock")} == {
        k for k in before if not k.startswith(".lock")}


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_equals_an_uninterrupted_run(
    tmp_path: Path,
) -> None:
    """SIGKILL at random moments (checkpoints every step, so often mid-commit); each
    time `--resume` goes on from the last whole checkpoint, and the final weights equal
    those of a run that was never interrupted."""
    import random

    every = {"checkpoint_every": 1, "log_every": 1, "image_every": 0, "device": "cpu"}
    cfg = write_config(tmp_path / "c.yaml", tiny(tokenizer={**every, "steps": 30},
                                                 prior={**every, "steps": 40}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def train(run: Path) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "vqgen", "train", str(cfg), "--run-dir",
                                 str(run), "--resume"], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)

    whole = tmp_path / "whole"
    t0 = time.time()
    assert train(whole).wait(timeout=300) == 0
    took = time.time() - t0  # kill somewhere in the middle third of a whole run's time
    killed = tmp_path / "killed"
    rng = random.Random(0)
    seen = set()  # (stage, step) of the last whole checkpoint after each kill
    for _ in range(15):
        proc = train(killed)
        try:
            proc.wait(timeout=rng.uniform(0.2, 0.5) * took)
            break  # it finished before the kill
        except subprocess.TimeoutExpired:
            proc.kill()  # SIGKILL: no handler runs
            proc.wait()
            if (killed / "config.yaml").is_file():
                seen |= {(s, stage_step(killed, s)) for s in ("tokenizer", "prior")}
    progress = {(s, n) for s, n in seen if n}
    assert len(progress) >= 3, seen  # killed at several points of training
    done = train(killed)
    assert done.wait(timeout=300) == 0
    for stage in ("tokenizer", "prior"):
        a = load_file(str(whole / stage / "weights.safetensors"))
        b = load_file(str(killed / stage / "weights.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), stage
    assert not list((killed / "prior" / "history").glob(".step_*"))  # leftovers cleaned


def test_condition_picture_shows_every_kind_of_condition_input() -> None:
    from vqgen.evaluation import condition_picture

    gray = torch.linspace(-1, 1, 16).reshape(1, 1, 4, 4)
    out = condition_picture(gray, (8, 8))  # one channel: grey, enlarged (nearest)
    assert out.shape == (1, 3, 8, 8) and torch.equal(out[0, 0], out[0, 2])
    assert torch.equal(out[0, 0, ::2, ::2], gray[0, 0])
    rgb = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.equal(condition_picture(rgb, (8, 8)), rgb)  # three: as they are
    labels = torch.tensor([[0, 1], [2, 1]])
    onehot = torch.nn.functional.one_hot(labels, 5).permute(2, 0, 1)[None].float()
    shown = condition_picture(onehot, (2, 2))  # more: a colour per label
    assert torch.equal(shown[0, :, 0, 1], shown[0, :, 1, 1])
    assert not torch.equal(shown[0, :, 0, 0], shown[0, :, 0, 1])
    assert not torch.equal(shown[0, :, 0, 1], shown[0, :, 1, 0])


def test_sampling_an_unfinished_or_stage1_run_says_what_to_do(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cut = copy_run(run, tmp_path / "cut")
    meta = cut / "prior" / "meta.json"
    meta.write_text(meta.read_text().replace('"step": 4', '"step": 2'))
    (cut / "pipeline.json").unlink()  # as after an interrupted prior
    assert main(["sample", str(cut), "-o", str(tmp_path / "s.png")]) == 2
    err = _err(capsys)
    assert "the prior stage of" in err and "is unfinished (step 2 of 4)" in err
    assert f"vqgen train {cut / 'config.yaml'} --run-dir {cut} --resume" in err

    cfg = tiny(tokenizer={"steps": 2})
    del cfg["prior"]
    stage1 = tmp_path / "stage1"
    assert main(["train", str(write_config(tmp_path / "s1.yaml", cfg)), "--run-dir",
                 str(stage1)]) == 0
    assert vqgen.load_run(stage1).prior is None  # loads without pipeline.json
    assert main(["sample", str(stage1), "-o", str(tmp_path / "s1.png")]) == 2
    assert "no prior (a stage-1-only config)" in _err(capsys)


def test_sigterm_while_encoding_tokens_says_what_happened(tmp_path: Path) -> None:
    cfg = tiny(tokenizer={"steps": 2, "log_every": 1})
    cfg["data"]["params"]["length"] = 50000  # encoding takes a while
    path = write_config(tmp_path / "c.yaml", cfg)
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vqgen", "train", str(path), "--run-dir",
                             str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not list((run / "tokens").glob(".*")):
        time.sleep(0.05)  # until the token cache is being written
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "terminated (SIGTERM)" in err and "Traceback" not in err
    assert list((run / "tokens").iterdir()) == []  # the half-written cache was removed


@pytest.mark.parametrize("writer", ["safetensors", "torch.save", "metrics"])
def test_a_full_disk_stops_training_with_the_last_checkpoint_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    writer: str,
) -> None:
    """The disk fills up at the prior's third checkpoint (simulated: each writer fails as
    it does on a full disk). Exit 2, one paragraph naming the file and the reason, the
    step-2 checkpoint stays current, and --resume after freeing space finishes the run."""
    from safetensors import SafetensorError

    from vqgen.core import checkpoint

    cfg = write_config(tmp_path / "c.yaml", tiny(prior={"checkpoint_every": 1, "log_every": 1}))
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--run-dir", str(run), "--stages", "tokenizer"]) == 0

    def full(real: Any, exc: Exception) -> Any:
        def write(*args: Any, **kwargs: Any) -> Any:
            if (run / "prior").exists() and stage_step(run, "prior") == 2:
                raise exc
            return real(*args, **kwargs)
        return write

    if writer == "safetensors":
        monkeypatch.setattr(checkpoint, "save_file", full(checkpoint.save_file, SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)")))
    elif writer == "torch.save":
        monkeypatch.setattr(torch, "save", full(torch.save, RuntimeError(
            "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")))
        monkeypatch.setattr(checkpoint.shutil, "disk_usage",
                            lambda p: shutil_usage(0))
    else:
        monkeypatch.setattr(loggers, "_append_line", full(
            loggers._append_line, OSError(28, "No space left on device")))
    capsys.readouterr()
    assert main(["train", str(cfg), "--run-dir", str(run)]) == 2
    err = _err(capsys)
    assert err.count("vqgen: error:") == 1 and ("No space left" in err or "no space left" in err)
    assert str(run) in err and "--resume" in err
    assert stage_step(run, "prior") == 2  # the last whole checkpoint is current
    monkeypatch.undo()
    assert main(["train", str(cfg), "--run-dir", str(run), "--resume"]) == 0
    assert stage_step(run, "prior") == 4


def shutil_usage(free: int) -> Any:
    import shutil

    return shutil._ntuple_diskusage(1 << 30, (1 << 30) - free, free)  # type: ignore[attr-defined]


def test_a_second_ctrl_c_while_the_checkpoint_is_written_keeps_the_last_whole_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C asks for a checkpoint and a stop; a second one during that checkpoint's
    write abandons it: exit 130, a message saying what is on disk, the step-1
    checkpoint current, no half-written folder, and --resume finishes the run."""
    from vqgen.core import checkpoint

    cfg = write_config(tmp_path / "c.yaml", tiny(prior={"checkpoint_every": 1}))
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--run-dir", str(run), "--stages", "tokenizer"]) == 0
    real = checkpoint.save_tensors

    def impatient(tensors: Any, path: Path) -> Any:
        if "prior" in str(path) and stage_step(run, "prior") == 1:
            os.kill(os.getpid(), signal.SIGINT)  # the graceful stop: finish, checkpoint
            os.kill(os.getpid(), signal.SIGINT)  # and again, while it is being written
        return real(tensors, path)

    monkeypatch.setattr(checkpoint, "save_tensors", impatient)
    capsys.readouterr()
    assert main(["train", str(cfg), "--run-dir", str(run)]) == 130
    err = _err(capsys)
    assert "interrupted again" in err and f"{run / 'prior'}" in err and "--resume" in err
    assert stage_step(run, "prior") == 1
    assert not list((run / "prior" / "history").glob(".step_*"))
    monkeypatch.undo()
    assert main(["train", str(cfg), "--run-dir", str(run), "--resume"]) == 0
    assert stage_step(run, "prior") == 4
