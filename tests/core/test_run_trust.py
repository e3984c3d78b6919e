"""A run directory is untrusted input: links planted in it never lead vqgen outside it,
and an output never overwrites what the run reads back.

Each case plants a symbolic link in a fresh copy of a trained tiny run, pointing at a
canary file or folder outside it, runs a command, and expects exit 2 with the link and
its target named, the canary and the run unchanged (hashed before and after).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from vqgen.cli import main
from vqgen.core.errors import VqgenError
from vqgen.core.layout import check_run_links

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("trust") / "run"
    assert main(["train", str(TINY), "--run-dir", str(run)]) == 0
    return run


def tree(root: Path) -> dict[str, str]:
    """Every path below ``root`` → content hash, link target or "dir"."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = (
            f"-> {os.readlink(p)}" if p.is_symlink() else
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
    return out


TRAIN = ["train", "{run}/config.yaml", "--run-dir", "{run}"]
RESUME = [*TRAIN, "--resume"]
SAMPLE = ["sample", "{run}", "-o", "{tmp}/out.png"]


@dataclass(frozen=True)
class Link:
    id: str
    at: str  # where the link is planted, relative to the run
    argv: list[str]
    to_dir: bool = False  # the canary it points at: a folder (else a file)
    replace: bool = True  # move the real file or folder away first


LINKS = [
    # written or deleted outside the run (the six), each must be impossible
    Link("history_pruned", "prior/history", RESUME, to_dir=True),
    Link("token_cache_built_outside", "tokens", TRAIN, to_dir=True),
    Link("eval_json_overwritten", "eval.json", ["eval", "{run}", "--n", "8"], replace=False),
    Link("lock_owner_overwritten", ".lock.owner", TRAIN, replace=False),
    Link("metrics_appended", "metrics.jsonl", RESUME),
    Link("pipeline_json_rewritten", "pipeline.json", TRAIN),
    Link("lock_file", ".lock", TRAIN, replace=False),
    Link("tensorboard_folder", "tensorboard", TRAIN, to_dir=True, replace=False),
    Link("images_folder", "images", RESUME, to_dir=True, replace=False),
    # read through a link: the same clear refusal
    Link("config_read_through_link", "config.yaml", SAMPLE),
    Link("best_read_through_link", "prior/best", SAMPLE, to_dir=True),
    Link("weights_link_pointing_outside", "prior/weights.safetensors", SAMPLE),
    Link("current_pointing_outside", "tokenizer/current", SAMPLE, to_dir=True),
]


@pytest.mark.parametrize("case", LINKS, ids=[c.id for c in LINKS])
def test_a_planted_link_is_refused_and_nothing_outside_changes(
        case: Link, trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run, symlinks=True)
    canary = tmp_path / "canary"
    canary.mkdir()
    if case.to_dir:  # a folder with what a pruner or cache builder would touch
        target = canary / "dir"
        for name in ("step_000001", ".step_000002.x", "keep"):
            (target / name).mkdir(parents=True)
            (target / name / "f").write_text(name)
    else:
        target = canary / "file"
        target.write_text("precious\n")
    planted = run / case.at
    if planted.is_symlink() or planted.is_file():
        planted.unlink()
    elif planted.is_dir():
        shutil.rmtree(planted)
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.symlink_to(target, target_is_directory=case.to_dir)
    before_run, before_canary = tree(run), tree(canary)

    capsys.readouterr()
    argv = [a.replace("{run}", str(run)).replace("{tmp}", str(tmp_path)) for a in case.argv]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert str(planted) in err and str(target) in err, err
    assert tree(canary) == before_canary
    assert tree(run) == before_run
    assert not (tmp_path / "out.png").exists()


def test_the_checkpointers_own_links_pass(trained: Path) -> None:
    check_run_links(trained)  # a trained run: current -> history/…, files -> current/…
    assert (trained / "prior" / "current").is_symlink()
    assert (trained / "prior" / "weights.safetensors").is_symlink()


@pytest.mark.parametrize("at, target", [
    ("prior/current", "../../elsewhere"),  # the right name, a target outside
    ("prior/weights.safetensors", "current/meta.json"),  # a file through another's name
    ("prior/history/step_000004/weights.safetensors", "../../current/weights.safetensors"),
    ("x/current", "history/step_000001"),  # not a stage folder
])
def test_look_alike_links_are_refused(at: str, target: str, trained: Path,
                                      tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run, symlinks=True)
    link = run / at
    if link.is_symlink() or link.is_file():
        link.unlink()
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    with pytest.raises(VqgenError, match="symbolic link"):
        check_run_links(run)


# -- an output that would destroy its own input --------------------------------------
OUTPUTS = [
    ("sample_over_config", ["sample", "{run}", "-o", "{run}/config.yaml"], "config.yaml"),
    ("sample_over_weights", ["sample", "{run}", "-o", "{run}/prior/weights.safetensors"],
     "prior/weights.safetensors"),
    ("sample_codes_into_stage", ["sample", "{run}", "-o", "{run}/prior/x.png", "--codes"],
     "prior/x.png"),
    ("singles_into_tokens", ["sample", "{run}", "--singles", "{run}/tokens"], "tokens"),
    ("eval_over_pipeline", ["eval", "{run}", "-o", "{run}/pipeline.json"], "pipeline.json"),
    ("schema_over_meta", ["config", "schema", "-o", "{run}/tokenizer/meta.json"],
     "tokenizer/meta.json"),
    ("preview_over_metrics", ["data", "preview", "shapes", "-o", "{run}/metrics.jsonl"],
     "metrics.jsonl"),
    ("data_into_a_stage", ["data", "shapes", "{run}/prior/data", "--n", "2"], "prior/data"),
    ("through_a_link_outside", ["sample", "{run}", "-o", "{tmp}/alias.yaml"], "config.yaml"),
]


@pytest.mark.parametrize("argv, names", [o[1:] for o in OUTPUTS], ids=[o[0] for o in OUTPUTS])
def test_an_output_over_the_runs_own_files_is_refused(
        argv: list[str], names: str, trained: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run, symlinks=True)
    (tmp_path / "alias.yaml").symlink_to(run / "config.yaml")  # -o writes through links
    before = tree(run)
    capsys.readouterr()
    code = main([a.replace("{run}", str(run)).replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and names in err and "refusing to write" in err, err
    assert tree(run) == before


def test_outputs_beside_the_run_files_are_fine(trained: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run, symlinks=True)
    assert main(["sample", str(run), "--n", "2", "-o", str(run / "more.png")]) == 0
    assert (run / "more.png").is_file()
