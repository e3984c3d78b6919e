"""One table of hostile CLI input: every case exits 2, prints no traceback, names the
culprit (file, field or value) and leaves the run directory it points at unchanged.

Each case runs on a fresh copy of a trained tiny run (``class``: four classes;
``seg``: a segmentation-conditioned run), optionally damaged first; the copy is
hashed before and after the command. Placeholders in the arguments and in the
expected message: ``{run}`` (the copy), ``{tmp}`` (a scratch folder with the files
written by ``_scratch``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml
from numpy.lib import format as npy_format
from PIL import Image

from vqgen.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"

pytestmark = pytest.mark.usefixtures("one_thread")


def _seg_config() -> dict:
    """The tiny config with a segmentation conditioner (5 labels, its own small VQGAN)."""
    cfg = yaml.safe_load(TINY.read_text())
    vq = {"ch": 16, "ch_mult": [1, 2, 2], "n_embed": 16, "embed_dim": 8, "z_channels": 8,
          "norm_groups": 4, "perceptual_weight": 0, "disc_weight": 0, "kmeans_init": False}
    cfg["tokenizer"]["params"] = {**vq}
    cfg["conditioner"] = {"name": "segmentation", "params": {
        "tokenizer": {"name": "vqgan", "params": {**vq, "in_channels": 5}}}}
    cfg["prior"]["params"].update(vocab_size=16, cond_vocab_size=17, block_size=128)
    cfg["train"]["cond"] = {**cfg["train"]["tokenizer"], "steps": 2}
    return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile")
    seg_cfg = root / "seg.yaml"
    seg_cfg.write_text(yaml.safe_dump(_seg_config()))
    out = {"class": root / "class", "seg": root / "seg"}
    assert main(["train", str(TINY), "--run-dir", str(out["class"])]) == 0
    assert main(["train", str(seg_cfg), "--run-dir", str(out["seg"])]) == 0
    return out


def _npy(path: Path, shape: tuple[int, ...], payload: bytes) -> None:
    buf = io.BytesIO()
    npy_format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False,
                                            "shape": shape})
    path.write_bytes(buf.getvalue() + payload)


def _labels(path: Path, size: int, top: int) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, top, (size, size)).astype(np.uint8), "L").save(path)


def _scratch(tmp: Path) -> None:
    """Condition files and a data set that the cases point at."""
    (tmp / "seven.txt").write_text("7\n")
    _labels(tmp / "seg20.png", 20, 5)  # smaller than the 32×32 training size
    _labels(tmp / "seg33.png", 33, 5)  # not a multiple of f = 4
    _labels(tmp / "seg198.png", 32, 200)  # labels beyond n_labels = 5
    _npy(tmp / "lies.npy", (5000, 5000), b"\0" * 16)  # a header promising 100 MB
    np.save(tmp / "inf.npy", np.full((32, 32), np.inf, np.float32))
    data = tmp / "data"
    for folder in ("images/c0", "images/c1", "segmentation"):
        (data / folder).mkdir(parents=True)
    for i in range(8):
        image = np.full((32, 32, 3), 30 * i, np.uint8)
        Image.fromarray(image).save(data / "images" / f"c{i % 2}" / f"{i:03d}.png")
        _labels(data / "segmentation" / f"{i:03d}.png", 32, 200 if i == 5 else 5)
    cfg = _seg_config()
    cfg["data"] = {"name": "folder", "params": {"root": str(data), "resolution": 32}}
    (tmp / "bad_labels.yaml").write_text(yaml.safe_dump(cfg))
    tiny = yaml.safe_load(TINY.read_text())
    for name, change in {
        "kmeans_512": {"tokenizer": {"name": "kmeans", "params": {"n_embed": 16}},
                       "prior": {"name": "gpt", "params": {"vocab_size": 512}}},
        "block_too_small": {"prior": {"name": "gpt", "params": {"block_size": 16}}},
        "resolution_not_multiple": {"data": {"name": "shapes", "params": {"resolution": 34}}},
        "pixelsnail_grid": {"prior": {"name": "pixelsnail", "params": {"height": 16}}},
        # the successors' stages: their own params, bounded where they enter
        "fsq_level_one": {"tokenizer": {"name": "fsq", "params": {"levels": [8, 1, 4]}}},
        "fsq_no_levels": {"tokenizer": {"name": "fsq", "params": {"levels": []}}},
        "fsq_huge": {"tokenizer": {"name": "fsq", "params": {"levels": [64] * 5}}},
        "lfq_bits_zero": {"tokenizer": {"name": "lfq", "params": {"codebook_bits": 0}}},
        "lfq_bits_huge": {"tokenizer": {"name": "lfq", "params": {"codebook_bits": 30}}},
        "maskgit_zero_steps": {"prior": {"name": "maskgit", "params": {"steps": 0}}},
        "maskgit_schedule": {"prior": {"name": "maskgit",
                                       "params": {"mask_schedule": "random"}}},
        "rope2d_head_size": {"prior": {"name": "gpt", "params": {
            "n_layer": 1, "n_head": 6, "n_embd": 36, "pos_emb": "rope2d"}}},
        "rope2d_grid": {"prior": {"name": "gpt", "params": {
            "n_layer": 1, "n_head": 2, "n_embd": 32, "pos_emb": "rope2d", "height": 4}}},
        "optimizer_unknown": {"train": {**tiny["train"], "prior": {
            **tiny["train"]["prior"], "optimizer": "rmsprop"}}},
        "logger_unknown": {"train": {**tiny["train"], "loggers": ["wandb"]}},
        # one's own folders: classes wired from them, paths resolved where they enter
        "n_classes_wrong": {"conditioner": {"name": "class", "params": {"n_classes": 5}}},
        "root_var_unset": {"data": {"name": "folder", "params": {
            "root": "$VQGEN_SURELY_UNSET/x", "resolution": 32}}},
        "held_out_too_big": {"data": {"name": "folder", "params": {
            "root": str(data), "resolution": 32, "held_out": 1.5}}},
        "classes_missing_folder": {"data": {"name": "folder", "params": {
            "root": str(data), "resolution": 32, "classes": ["c0", "c1", "c9"]}},
            "conditioner": {"name": "class"}},
        "folder_n_classes_wrong": {"data": {"name": "folder", "params": {
            "root": str(data), "resolution": 32}}},  # 2 class folders, n_classes: 4
        # numbers that passed validation and broke at use: bounded where they enter
        "betas_above_one": _train(tiny, betas=[0.9, 1.5]),
        "betas_nan": _train(tiny, betas=[float("nan"), 0.9]),
        "lr_inf": _train(tiny, lr=float("inf")),
        "seed_huge": _train(tiny, seed=2**63),
        "device_meta": _train(tiny, device="meta"),
        "grad_accum_huge": _train(tiny, grad_accum=10**9),
        "codebook_weight_inf": {"tokenizer": {"name": "vqgan", "params": {
            **tiny["tokenizer"]["params"], "codebook_weight": float("inf")}}},
        "out_channels_huge": {"tokenizer": {"name": "vqgan", "params": {
            **tiny["tokenizer"]["params"], "out_channels": 10**9}}},
        "shapes_length_huge": {"data": {"name": "shapes", "params": {"length": 10**12}}},
        "sizes_absurd_together": {"prior": {"name": "gpt", "params": {
            "n_layer": 256, "n_head": 8, "n_embd": 16384}}},
        "batch_beyond_memory": _train(tiny, batch_size=1 << 20, device="cpu"),
        "fsdp_tokenizer": {"train": {**tiny["train"], "tokenizer": {
            **tiny["train"]["tokenizer"], "strategy": "fsdp"}}},
        "temperature_denormal": {"sampler": {"name": "top_k", "params": {
            "k": 8, "temperature": 1e-320}}},
        "k_boolean": {"sampler": {"name": "top_k", "params": {"k": True}}},
    }.items():
        (tmp / f"{name}.yaml").write_text(yaml.safe_dump({**tiny, **change}))
    (tmp / "weight_decay_infinity.json").write_text(  # JSON's Infinity
        json.dumps({**tiny, **_train(tiny, weight_decay=float("inf"))}))
    os.mkfifo(tmp / "fifo")
    (tmp / "dir.png").mkdir()


def _train(tiny: dict, **prior: object) -> dict:
    """A ``train`` section: the tiny config's with ``prior`` settings changed."""
    return {"train": {**tiny["train"], "prior": {**tiny["train"]["prior"], **prior}}}


def _state(change: Callable[[dict], None]) -> Callable[[Path], None]:
    """Damage the prior's train_state.pt with ``change`` and give the prior two more
    steps, so that ``--resume`` reads it."""
    import torch

    def damage(run: Path) -> None:
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        cfg["train"]["prior"]["steps"] = 6
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        target = (run / "prior" / "train_state.pt").resolve()
        state = torch.load(target, weights_only=True)
        change(state)
        target.unlink()  # hard-linked into best/: write a new file
        torch.save(state, target)
    return damage


def _moment_of_wrong_shape(state: dict) -> None:
    import torch

    state["optimizer"]["state"][0]["exp_avg"] = torch.zeros(3)


_HELD: list[object] = []  # locks held by a case while its command runs


def _lock_held_with_binary_owner(run: Path) -> None:
    import filelock

    lock = filelock.FileLock(str(run / ".lock"), timeout=0)
    lock.acquire()
    _HELD.append(lock)
    (run / ".lock.owner").write_bytes(b"\xff\xfe\x00 binary \x80")


def _lock_is_a_folder(run: Path) -> None:
    (run / ".lock").unlink(missing_ok=True)
    (run / ".lock").mkdir()


def _huge_seg_beside(run: Path) -> None:
    """A 20000×20000 label map in the scratch folder beside ``run`` (made only for the
    case that reads it: 400 MB to decode)."""
    Image.new("L", (20000, 20000)).save(run.parent / "scratch" / "seg_huge.png")


def _replace_with_file(rel: str) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        target = run / rel
        if target.is_symlink() or target.is_file():
            target.unlink()
        else:
            shutil.rmtree(target)
        target.write_text("not a folder\n")
    return damage


def _meta_field(rel: str, **fields: object) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        target = (run / rel).resolve()
        meta = json.loads(target.read_text())
        target.unlink()  # may be hard-linked into history and best
        target.write_text(json.dumps({**meta, **fields}))
    return damage


def _unlink_real(rel: str) -> Callable[[Path], None]:
    return lambda run: (run / rel).resolve().unlink()


def _write(rel: str, text: str) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        target = (run / rel).resolve()
        target.unlink()  # a checkpoint file may be hard-linked into history and best
        target.write_text(text)
    return damage


def _truncate(rel: str) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        target = (run / rel).resolve()
        data = target.read_bytes()
        target.unlink()
        target.write_bytes(data[:100])
    return damage


@dataclass(frozen=True)
class Case:
    id: str
    argv: list[str]
    says: list[str]
    run: str = "class"
    damage: Callable[[Path], None] | None = field(default=None, compare=False)


SAMPLE = ["sample", "{run}", "-o", "{tmp}/out.png"]
RESUME = ["train", "{run}/config.yaml", "--run-dir", "{run}", "--resume"]
TRAIN = RESUME[:-1]

CASES = [
    # numbers on the sample command line
    Case("n_zero", [*SAMPLE, "--n", "0"], ["--n must be between 1 and 100000, got 0"]),
    Case("n_negative", [*SAMPLE, "--n", "-3"], ["--n must be between 1 and 100000, got -3"]),
    Case("n_huge", [*SAMPLE, "--n", "10000000"], ["--n must be between 1 and 100000"]),
    Case("seed_huge", [*SAMPLE, "--seed", "99999999999999999999999"],
         ["--seed must be between 0 and 2**63 - 1"]),
    Case("seed_negative", [*SAMPLE, "--seed", "-1"], ["--seed must be between 0 and 2**63 - 1"]),
    Case("size_huge", [*SAMPLE, "--size", "100000x32"],
         ["--size 100000x32: each side must be 1 to 8192 pixels"]),
    Case("size_zero", [*SAMPLE, "--size", "0x32"], ["--size 0x32: each side must be 1 to 8192"]),
    Case("size_text", [*SAMPLE, "--size", "big"], ["--size expects HxW in pixels", "'big'"]),
    Case("size_not_multiple", [*SAMPLE, "--size", "33x32"], ["33x32", "f=4"]),
    Case("guidance_nan", [*SAMPLE, "--guidance", "nan"], ["guidance must be a finite number"]),
    Case("guidance_inf", [*SAMPLE, "--guidance", "inf"], ["guidance must be a finite number"]),
    Case("sampler_param_no_value", [*SAMPLE, "--sampler-param", "k"],
         ["--sampler-param expects KEY=VALUE, got 'k'"]),
    Case("sampler_param_unknown", [*SAMPLE, "--sampler-param", "bogus=1"],
         ["sampler 'top_k'", "params.bogus"]),
    # condition files
    Case("class_out_of_range", [*SAMPLE, "--cond", "{tmp}/seven.txt"],
         ["--cond {tmp}/seven.txt", "label is 7, outside [0, 4)"]),
    Case("cond_missing", [*SAMPLE, "--cond", "{tmp}/nothing.png"],
         ["condition file {tmp}/nothing.png not found"], run="seg"),
    Case("seg_smaller_than_training", [*SAMPLE, "--cond", "{tmp}/seg20.png"],
         ["--cond {tmp}/seg20.png", "smaller than the training grid 8x8 (32x32 pixels)"],
         run="seg"),
    Case("seg_huge", [*SAMPLE, "--cond", "{tmp}/seg_huge.png"],
         ["condition file {tmp}/seg_huge.png is too large"], run="seg", damage=_huge_seg_beside),
    Case("seg_not_multiple_of_f", [*SAMPLE, "--cond", "{tmp}/seg33.png"],
         ["--cond {tmp}/seg33.png", "33x33", "f=4"], run="seg"),
    Case("seg_label_out_of_range", [*SAMPLE, "--cond", "{tmp}/seg198.png"],
         ["--cond {tmp}/seg198.png", "outside [0, 5) (n_labels=5)"], run="seg"),
    Case("npy_header_lies", [*SAMPLE, "--cond", "depth={tmp}/lies.npy"],
         ["{tmp}/lies.npy", "header promises 100000000 bytes"], run="seg"),
    Case("png_for_a_class_label", [*SAMPLE, "--cond", "{tmp}/seg20.png"],
         ["condition file {tmp}/seg20.png cannot be read as 'label'"]),
    # output paths
    Case("output_is_a_directory", ["sample", "{run}", "-o", "{tmp}/dir.png"],
         ["refusing to write {tmp}/dir.png: it is a directory"]),
    Case("output_is_a_fifo", ["sample", "{run}", "-o", "{tmp}/fifo"],
         ["refusing to write {tmp}/fifo: it is a FIFO"]),
    Case("output_below_a_file", ["sample", "{run}", "-o", "{tmp}/seven.txt/x.png"],
         ["cannot write {tmp}/seven.txt/x.png: {tmp}/seven.txt is a file, not a folder"]),
    # damaged run directories
    Case("not_a_run", ["sample", "{tmp}/nothing"], ["{tmp}/nothing is not a vqgen run directory"]),
    Case("weights_truncated", SAMPLE, ["{run}/prior/history/step_000004/weights.safetensors",
                                       "is not a readable safetensors file"],
         damage=_truncate("prior/weights.safetensors")),
    Case("meta_json_foreign", SAMPLE, ["{run}/tokenizer", "not a vqgen checkpoint"],
         damage=_write("tokenizer/meta.json", json.dumps({"step": 1}))),
    Case("meta_json_truncated", SAMPLE, ["not a vqgen checkpoint"],
         damage=_write("prior/meta.json", "{trunc")),
    Case("pipeline_json_grid_text", SAMPLE, ["{run}/pipeline.json is damaged", "grid"],
         damage=_write("pipeline.json", '{"grid": "x"}')),
    Case("pipeline_json_grid_negative", SAMPLE, ["{run}/pipeline.json is damaged", "grid.1"],
         damage=_write("pipeline.json", '{"grid": [8, -8]}')),
    Case("config_yaml_damaged", SAMPLE, ["{run}/config.yaml"],
         damage=_write("config.yaml", "data: [unclosed\n")),
    Case("tokenizer_meta_missing_resume", RESUME, ["{run}/tokenizer", "no meta.json"],
         damage=_unlink_real("tokenizer/meta.json")),
    Case("prior_meta_missing_resume", RESUME, ["{run}/prior", "no meta.json"],
         damage=_unlink_real("prior/meta.json")),
    Case("another_config_on_resume", ["train", str(TINY).replace("tiny", "demo"), "--run-dir",
                                      "{run}", "--resume"], ["differs", "{run}"]),
    # configs whose stages do not fit together: `config validate` assembles them
    Case("prior_vocab_differs_from_tokenizer", ["config", "validate", "{tmp}/kmeans_512.yaml"],
         ["prior.params.vocab_size: 512, but tokenizer 'kmeans' has 16 codes"]),
    Case("block_size_too_small", ["config", "validate", "{tmp}/block_too_small.yaml"],
         ["prior.params.block_size: 16 is too small", "need 64 positions"]),
    Case("resolution_not_multiple_of_f", ["config", "validate",
                                          "{tmp}/resolution_not_multiple.yaml"],
         ["data.params.resolution: 34", "f=4"]),
    Case("pixelsnail_grid_differs", ["config", "validate", "{tmp}/pixelsnail_grid.yaml"],
         ["prior.params.height: 16, but the data's latent grid is 8x8"]),
    Case("fsq_level_of_one", ["config", "validate", "{tmp}/fsq_level_one.yaml"],
         ["tokenizer.params.levels", "every level must be >= 2"]),
    Case("fsq_no_levels", ["config", "validate", "{tmp}/fsq_no_levels.yaml"],
         ["tokenizer.params.levels"]),
    Case("fsq_vocabulary_too_large", ["config", "validate", "{tmp}/fsq_huge.yaml"],
         ["tokenizer.params.levels", "2^20"]),
    Case("lfq_zero_bits", ["config", "validate", "{tmp}/lfq_bits_zero.yaml"],
         ["tokenizer.params.codebook_bits"]),
    Case("lfq_too_many_bits", ["config", "validate", "{tmp}/lfq_bits_huge.yaml"],
         ["tokenizer.params.codebook_bits"]),
    Case("maskgit_zero_rounds", ["config", "validate", "{tmp}/maskgit_zero_steps.yaml"],
         ["prior.params.steps"]),
    Case("maskgit_unknown_schedule", ["config", "validate", "{tmp}/maskgit_schedule.yaml"],
         ["prior.params.mask_schedule", "cosine"]),
    Case("rope2d_head_size_not_divisible_by_4",
         ["config", "validate", "{tmp}/rope2d_head_size.yaml"], ["rope2d", "n_head"]),
    Case("rope2d_grid_differs", ["config", "validate", "{tmp}/rope2d_grid.yaml"],
         ["prior.params.height", "8x8"]),
    Case("optimizer_unknown", ["config", "validate", "{tmp}/optimizer_unknown.yaml"],
         ["train.prior.optimizer", "rmsprop"]),
    Case("logger_unknown", ["config", "validate", "{tmp}/logger_unknown.yaml"],
         ["train.loggers", "wandb"]),
    Case("train_refuses_before_training", ["train", "{tmp}/kmeans_512.yaml", "--run-dir",
                                           "{run}"], ["prior.params.vocab_size: 512"]),
    Case("n_classes_differs_from_the_data", ["config", "validate", "{tmp}/n_classes_wrong.yaml"],
         ["conditioner.params.n_classes: 5, but data 'shapes' has 4 classes"]),
    Case("folder_n_classes_differs", ["config", "validate", "{tmp}/folder_n_classes_wrong.yaml"],
         ["conditioner.params.n_classes: 4, but data 'folder' has 2 classes"]),
    Case("root_variable_unset", ["config", "validate", "{tmp}/root_var_unset.yaml"],
         ["data.params.root", "$VQGEN_SURELY_UNSET", "not set"]),
    Case("held_out_too_big", ["config", "validate", "{tmp}/held_out_too_big.yaml"],
         ["data.params.held_out"]),
    Case("classes_list_names_a_missing_folder",
         ["config", "validate", "{tmp}/classes_missing_folder.yaml"], ["data.params", "'c9'"]),
    # classes, threads and reuse on the command line
    Case("class_name_unknown", [*SAMPLE, "--class", "hexagon"],
         ["'hexagon' is not a class", "circle, square, star, triangle"]),
    Case("class_id_out_of_range", [*SAMPLE, "--class", "7"], ["--class 7", "0..3"]),
    Case("class_id_huge", [*SAMPLE, "--class", str(2**63)], [f"--class {2**63}", "0..3"]),
    Case("threads_zero", [*SAMPLE, "--threads", "0"],
         ["--threads must be between 1 and 1024, got 0"]),
    Case("from_run_not_a_run", ["train", "{run}/config.yaml", "--run-dir", "{tmp}/fresh",
                                "--from-run", "{tmp}/nothing"],
         ["--from-run {tmp}/nothing", "not a vqgen run directory"]),
    # numbers bounded where they enter
    *[Case(f"config_{name}", ["config", "validate", f"{{tmp}}/{name}.yaml"], says)
      for name, says in [
          ("betas_above_one", ["train.prior.betas"]),
          ("betas_nan", ["train.prior.betas"]),
          ("lr_inf", ["train.prior.lr", "finite"]),
          ("seed_huge", ["train.prior.seed"]),
          ("device_meta", ["train.prior.device", "'meta'"]),
          ("grad_accum_huge", ["train.prior.grad_accum"]),
          ("codebook_weight_inf", ["tokenizer.params.codebook_weight", "finite"]),
          ("out_channels_huge", ["tokenizer.params.out_channels"]),
          ("shapes_length_huge", ["data.params.length"]),
          ("sizes_absurd_together", ["prior.params", "parameters"]),
          ("batch_beyond_memory", ["train.prior.batch_size", "GiB of activations"]),
          ("fsdp_tokenizer", ["train.tokenizer.strategy", "fsdp shards the prior"]),
          ("temperature_denormal", ["sampler.params.temperature"]),
          ("k_boolean", ["sampler.params", "k: true is a boolean"]),
      ]],
    Case("config_json_infinity", ["config", "validate", "{tmp}/weight_decay_infinity.json"],
         ["train.prior.weight_decay", "finite"]),
    Case("temperature_tiny", [*SAMPLE, "--temperature", "1e-300"], ["temperature"]),
    Case("guidance_huge", [*SAMPLE, "--guidance", "1e300"],
         ["guidance must be a finite number in [0, 100]"]),
    Case("class_id_2_pow_63", [*SAMPLE, "--class", str(2**63)], ["--class", "0..3"]),
    *[Case(f"sampler_param_{name}", [*SAMPLE, "--sampler-param", f"k={value}"], says)
      for name, value, says in [
          ("unclosed_list", "[1", ["--sampler-param k=[1", "not a single value"]),
          ("alias", "*nope", ["--sampler-param k=*nope", "not a single value"]),
          ("deep_list", "[" * 200 + "]" * 200, ["not a single value"]),
          ("boolean", "true", ["k: true is a boolean"]),
          ("tag", "!!python/object:os.system", ["not a single value"]),
      ]],
    Case("meta_step_infinity", SAMPLE, ["{run}/prior", "step is inf"],
         damage=_write("prior/meta.json", json.dumps({"step": float("inf")}))),
    # a damaged train state is checked against the model before it is used
    *[Case(f"train_state_{name}", RESUME, ["train_state.pt cannot be resumed from", *says],
           damage=_state(change))
      for name, change, says in [
          ("moment_of_wrong_shape", _moment_of_wrong_shape,
           ["'exp_avg' of parameter 0 has shape (3,)"]),
          ("optimizer_empty", lambda s: s.update(optimizer={}), ["'optimizer'"]),
          ("param_groups_doubled", lambda s: s["optimizer"].update(
              param_groups=s["optimizer"]["param_groups"] * 2), ["parameter groups"]),
          ("rng_missing", lambda s: s.pop("rng"), ["'rng'"]),
          ("rng_wrong_size", lambda s: s["rng"].update(torch=s["rng"]["torch"][:10]),
           ["'rng'"]),
          ("generator_bad", lambda s: s.update(generator=s["generator"][:3]), ["generator"]),
      ]],
    Case("depth_cond_infinite", [*SAMPLE, "--cond", "depth={tmp}/inf.npy"],
         ["{tmp}/inf.npy", "infinite"], run="seg"),
    Case("import_grid_huge", ["import", "taming", "{tmp}/seven.txt", "--config",
                              "{tmp}/seven.txt", "-o", "{tmp}/imported", "--grid", "100000",
                              "100000"], ["--grid 100000 100000", "1 to 1024"]),
    # the run lock
    Case("lock_is_a_folder", TRAIN, ["cannot lock {run}/.lock"], damage=_lock_is_a_folder),
    Case("lock_owner_binary_while_held", TRAIN, ["in use by another vqgen process"],
         damage=_lock_held_with_binary_owner),
    # counts that would fill memory before any output
    Case("preview_per_class_huge",
         ["data", "preview", "shapes", "--per-class", "1000000000", "-o", "{tmp}/out.png"],
         ["--per-class must be between 1 and 64, got 1000000000"]),
    Case("eval_per_class_huge", ["eval", "{run}", "--per-class", "1000000000", "-o",
                                 "{tmp}/out.png"], ["--per-class must be between 1 and 100000"]),
    Case("eval_n_zero", ["eval", "{run}", "--n", "0", "-o", "{tmp}/out.png"],
         ["--n must be between 1 and 100000, got 0"]),
    Case("eval_fid_negative", ["eval", "{run}", "--fid", "-1", "-o", "{tmp}/out.png"],
         ["--fid must be between 0 and 100000, got -1"]),
    Case("demo_per_class_over_32", ["demo", "--per-class", "33", "--out", "{tmp}/demo"],
         ["--per-class must be between 1 and 32, got 33"]),
    # checkpoint internals
    Case("tokens_is_a_file", ["eval", "{run}", "-o", "{tmp}/out.png"],
         ["the token cache {run}/tokens is not a folder"],
         damage=_replace_with_file("tokens")),
    Case("meta_names_a_sampler", SAMPLE, ["meta.json"],
         damage=_meta_field("prior/meta.json", kind="sampler", name="top_k")),
    Case("pipeline_grid_beyond_block", SAMPLE, ["pipeline.json is damaged (grid [64, 64]"],
         damage=_write("pipeline.json", '{"grid": [64, 64]}')),
    Case("pipeline_cond_offset_beyond_table", SAMPLE,
         ["pipeline.json is damaged", "cond_offset 100000", "[32, 37)"],
         damage=_write("pipeline.json", '{"grid": [8, 8], "cond_offset": 100000}')),
    Case("pipeline_cond_offset_into_codes", SAMPLE,
         ["pipeline.json is damaged", "cond_offset 3", "[32, 37)"],
         damage=_write("pipeline.json", '{"grid": [8, 8], "cond_offset": 3}')),
    # data
    Case("training_labels_out_of_range",
         ["train", "{tmp}/bad_labels.yaml", "--run-dir", "{tmp}/fresh"],
         ["{tmp}/data/segmentation/005.png", "has label", "outside [0, 5)"]),
]


def _tree(root: Path) -> dict[str, str]:
    """Every path below ``root`` (but the lock file) → its content hash or link target."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if rel.startswith(".lock"):
            continue
        out[rel] = (f"-> {os.readlink(p)}" if p.is_symlink() else
                    hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_cli_input_exits_2_names_the_culprit_and_changes_nothing(
    case: Case, runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs[case.run], run, symlinks=True)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    _scratch(scratch)
    if case.damage is not None:
        case.damage(run)
    before = _tree(run)

    def fill(s: str) -> str:
        return s.replace("{run}", str(run)).replace("{tmp}", str(scratch))

    capsys.readouterr()
    try:
        code = main([fill(a) for a in case.argv])
    finally:
        while _HELD:
            _HELD.pop().release()  # type: ignore[attr-defined]
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "\nvqgen: error: " in f"\n{err}", err
    for says in case.says:
        assert fill(says) in err, err
    assert _tree(run) == before
    assert not (scratch / "out.png").exists()
