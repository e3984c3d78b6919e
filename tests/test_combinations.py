"""Any combination by names alone: pairs of stage choices, trained and sampled by the CLI.

The choices are read from the registry (``list_components``), so a new built-in or an
installed plugin is covered without editing this file. A greedy pairwise covering array
puts every pair of choices of (tokenizer, prior, conditioner, ordering, sampler) into at
least one tiny config (about 60 configs, a minute on 2 cores). Each config gives only
the sizes a person would choose (none that follow from another stage); it must pass
``vqgen config validate``, train a few steps through ``vqgen train`` and sample through
``vqgen sample`` (spatial conditions from files written by ``vqgen data write``).

A pair that cannot work by its nature (rejection sampling judges by class, so it needs
the class conditioner) is not trained: ``vqgen config validate`` must refuse it with a
message that names both sections.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import vqgen
from vqgen.cli import main

REGISTRY = vqgen.default_registry()
FACTORS: dict[str, list[str | None]] = {
    "tokenizer": list(REGISTRY.list("tokenizer")),
    "prior": list(REGISTRY.list("prior")),
    "conditioner": [None, *REGISTRY.list("conditioner")],
    "ordering": list(REGISTRY.list("ordering")),
    "sampler": list(REGISTRY.list("sampler")),
}
NAMES = list(FACTORS)

#: Small architectures for the built-ins (what a person would choose for a smoke test);
#: other components run with their defaults.
_VQ = {"ch": 8, "ch_mult": [1, 2, 2], "norm_groups": 4, "z_channels": 8, "embed_dim": 8,
       "n_embed": 16, "perceptual_weight": 0.0, "disc_weight": 0.0, "kmeans_init": False}
_NESTED_VQ = {k: v for k, v in _VQ.items() if k != "ch_mult"}  # f: the image tokenizer's
TINY: dict[tuple[str, str], dict[str, Any]] = {
    ("tokenizer", "kmeans"): {"n_embed": 8},
    ("prior", "gpt"): {"n_layer": 1, "n_head": 2, "n_embd": 16},
    ("prior", "pixelsnail"): {"channels": 8, "n_blocks": 1, "n_res_blocks": 1,
                              "n_cond_res_blocks": 1, "n_head": 2},
    ("prior", "maskgit"): {"n_layer": 1, "n_head": 2, "n_embd": 16},
    ("conditioner", "class"): {"n_classes": 4},
}


def _fitting(kind: str, name: str, params: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``params`` that component ``name`` has fields for."""
    fields = REGISTRY.get(kind, name).params_model.model_fields
    return {k: v for k, v in params.items() if k in fields}


def _allowed(row: dict[str, str | None]) -> bool:
    """Rows that can work: rejection sampling needs the class conditioner."""
    if row.get("sampler") == "rejection" and "conditioner" in row:
        return row["conditioner"] == "class"
    return True


def covering_rows() -> list[dict[str, str | None]]:
    """A pairwise covering array over FACTORS (greedy, deterministic): every allowed
    pair of choices of two stages is in at least one row; every row is allowed."""
    uncovered = {
        ((a, va), (b, vb))
        for a, b in itertools.combinations(NAMES, 2)
        for va in FACTORS[a] for vb in FACTORS[b]
        if _allowed({a: va, b: vb})
    }
    rows: list[dict[str, str | None]] = []
    while uncovered:
        (a, va), (b, vb) = min(uncovered, key=lambda p: (NAMES.index(p[0][0]), str(p)))
        row: dict[str, str | None] = {a: va, b: vb}
        for name in NAMES:
            if name not in row:
                row[name] = max(
                    (v for v in FACTORS[name] if _allowed({**row, name: v})),
                    key=lambda v: sum(((n, row[n]), (name, v)) in uncovered
                                      or ((name, v), (n, row[n])) in uncovered for n in row),
                )
        uncovered -= {((x, row[x]), (y, row[y])) for x, y in itertools.combinations(NAMES, 2)}
        rows.append(row)
    return rows


ROWS = covering_rows()


def _row_id(row: dict[str, str | None]) -> str:
    return "-".join(str(row[n] or "none") for n in NAMES)


def _params(kind: str, name: str) -> dict[str, Any]:
    """Tiny params: the table above, a small VQGAN-like architecture for any tokenizer
    with such fields, and the same for a conditioner's own tokenizer (without ch_mult
    and channels: those are wired)."""
    params = dict(TINY.get((kind, name), {}))
    if kind == "tokenizer" and "ch" in REGISTRY.get(kind, name).params_model.model_fields:
        params = {**_fitting(kind, name, _VQ), **params}
    if kind == "conditioner":
        field = REGISTRY.get(kind, name).params_model.model_fields.get("tokenizer")
        default = field.get_default(call_default_factory=True) if field else None
        if default is not None and getattr(default, "name", None):  # its own tokenizer: tiny
            params["tokenizer"] = {"name": default.name,
                                   "params": _fitting("tokenizer", default.name, _NESTED_VQ)}
    return params


def _config(row: dict[str, str | None], classifier: Path | None) -> dict[str, Any]:
    steps = {"steps": 2, "batch_size": 4, "lr": 1e-3, "device": "cpu", "log_every": 1,
             "image_every": 0}
    cfg: dict[str, Any] = {
        "data": {"name": "shapes", "params": {"resolution": 32, "length": 16}},
        "train": {"tokenizer": steps, "cond": steps, "prior": steps},
    }
    for section in NAMES:
        name = row[section]
        if name is not None:
            cfg[section] = {"name": name, "params": _params(section, name)}
    if row["sampler"] == "rejection":
        cfg["sampler"]["params"].update(classifier=str(classifier), acceptance_rate=0.5)
    return cfg


@pytest.fixture(scope="module")
def judge(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny class judge for the rejection sampler (trained on real shapes)."""
    from vqgen.plugins.judges import save_classifier
    from vqgen.training.judges import train_classifier

    path = tmp_path_factory.mktemp("judge") / "judge.safetensors"
    data = vqgen.create("dataset", "shapes", {"resolution": 32, "length": 32})
    save_classifier(train_classifier(data, steps=2, batch_size=8, width=8, progress=False),
                    path)
    return path


@pytest.fixture(scope="module")
def conditions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Condition files of two shapes samples, as `vqgen data write` writes them."""
    out = tmp_path_factory.mktemp("conditions") / "shapes"
    assert main(["data", "write", "shapes", str(out), "--n", "2", "--resolution", "32"]) == 0
    return out


def _cond_args(run: Path, conditions: Path) -> list[str]:
    """``--cond FILE`` for the run's conditioner, from `vqgen data write`'s files (none
    for a class, whose rows are drawn per class; none for a conditioner whose batch key
    has no such file: then `vqgen sample` draws held-out conditions itself)."""
    pipe = vqgen.load_run(run)
    key = getattr(pipe.conditioner, "condition_key", None)
    if pipe.conditioner is None or key in (None, "label"):
        return []
    image = sorted((conditions / "images").rglob("*.png"))[0]
    if key == "image":
        return ["--cond", str(image)]
    if key == "lowres":
        f = pipe.conditioner.params.factor
        small = run.parent / "lowres.png"
        with Image.open(image) as im:
            im.resize((im.width // f, im.height // f), Image.BOX).save(small)
        return ["--cond", str(small)]
    files = sorted((conditions / key).glob("*")) if (conditions / key).is_dir() else []
    return ["--cond", str(files[0])] if files else []


def test_the_covering_rows_cover_every_allowed_pair() -> None:
    covered = {((a, r[a]), (b, r[b])) for r in ROWS for a, b in itertools.combinations(NAMES, 2)}
    for a, b in itertools.combinations(NAMES, 2):
        for va, vb in itertools.product(FACTORS[a], FACTORS[b]):
            if _allowed({a: va, b: vb}):
                assert ((a, va), (b, vb)) in covered, (a, va, b, vb)
    assert all(_allowed(r) for r in ROWS)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("row", ROWS, ids=_row_id)
def test_combination_trains_and_samples(row: dict[str, str | None], tmp_path: Path,
                                        judge: Path, conditions: Path) -> None:
    """About 60 configs, a minute on 2 cores (idle machine)."""
    torch.manual_seed(0)
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(row, judge)))
    assert main(["config", "validate", str(cfg_path)]) == 0
    run = tmp_path / "run"
    assert main(["train", str(cfg_path), "--run-dir", str(run)]) == 0
    out = tmp_path / "s.png"
    assert main(["sample", str(run), "--n", "2", "-o", str(out),
                 *_cond_args(run, conditions)]) == 0
    with Image.open(out) as im:
        pixels = np.asarray(im)
    assert pixels.ndim == 3 and pixels.shape[2] == 3 and pixels.std() > 0
    # the run records every wired size: no size is left 'auto' in config.yaml
    recorded = yaml.safe_load((run / "config.yaml").read_text())["prior"]["params"]
    sizes = {*vqgen.Sizes.__dataclass_fields__, "block_size"}
    assert not [k for k, v in recorded.items() if k in sizes and v == "auto"], recorded


@pytest.mark.parametrize("conditioner", [c for c in FACTORS["conditioner"] if c != "class"])
def test_rejection_without_a_class_conditioner_is_refused_by_validate(
    conditioner: str | None, tmp_path: Path, judge: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    row = {"tokenizer": "vqgan", "prior": "gpt", "conditioner": conditioner,
           "ordering": "row_major", "sampler": "rejection"}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_config(row, judge)))
    assert main(["config", "validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "sampler" in err and "class conditioner" in err and "Traceback" not in err
