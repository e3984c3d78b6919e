"""Property: whatever damage a run directory has taken (files deleted, truncated,
replaced by links that lead outside, JSON fields changed), `vqgen sample`, `vqgen eval`
and `vqgen train --resume` either work or exit 2 with a message: never a traceback,
never a change outside the run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vqgen.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"

pytestmark = pytest.mark.usefixtures("one_thread")

JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5),
                        st.just([]), st.just({}), st.just([8, -8]))
DAMAGE = st.tuples(st.sampled_from(["delete", "truncate", "link_file", "link_dir", "json"]),
                   st.integers(0, 10**6), st.integers(0, 200), JSON_VALUES)


#: names vqgen writes in a run that a trained run may not hold yet: damage may plant them
WRITTEN = (".lock.owner", "eval.json", "tensorboard", "prior/history", "prior/best",
           "tokens", "metrics.jsonl", "pipeline.json")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("damage") / "run"
    assert main(["train", str(TINY), "--run-dir", str(run)]) == 0
    assert main(["eval", str(run), "--n", "8"]) == 0  # eval.json and a token cache too
    return run


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            if p.is_file() and not p.is_symlink() else "other"
            for p in sorted(root.rglob("*"))}


def _damage(run: Path, canary: Path, kind: str, pick: int, cut: int, value: object) -> None:
    """One damage to the entry ``pick`` (modulo the count) of the run's entries."""
    entries = sorted({p for p in run.rglob("*") if len(p.relative_to(run).parts) <= 2
                      and p.name != ".lock"} | {run / name for name in WRITTEN})
    if kind == "json":
        entries = [p for p in run.rglob("*") if p.suffix in (".json", ".jsonl") and p.is_file()]
    if not entries:
        return
    path = sorted(entries)[pick % len(entries)]
    if kind == "json":
        real = path.resolve()
        try:
            data = json.loads(real.read_text().splitlines()[0])
        except ValueError:
            return
        if isinstance(data, dict) and data:
            key = sorted(data)[pick % len(data)]
            data[key] = value
        real.unlink()
        real.write_text(json.dumps(data))
        return
    if not path.exists() and not path.is_symlink():
        path.parent.mkdir(parents=True, exist_ok=True)
    elif path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif kind == "truncate" and path.is_file() and not path.is_symlink():
        data = path.read_bytes()
        path.unlink()
        path.write_bytes(data[: cut % (len(data) + 1)])
        return
    elif path.exists() or path.is_symlink():
        path.unlink()
    if kind == "link_file":
        path.symlink_to(canary / "file")
    elif kind == "link_dir":
        path.symlink_to(canary / "dir", target_is_directory=True)


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(damages=st.lists(DAMAGE, min_size=1, max_size=3),
       command=st.sampled_from(["sample", "eval", "resume"]))
def test_damaged_runs_work_or_exit_2(damages: list, command: str, trained: Path,
                                     tmp_path_factory: pytest.TempPathFactory,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    tmp = tmp_path_factory.mktemp("case")
    run = tmp / "run"
    shutil.copytree(trained, run, symlinks=True)
    canary = tmp / "canary"
    (canary / "dir" / "step_000001").mkdir(parents=True)
    (canary / "dir" / "step_000001" / "meta.json").write_text('{"step": 1}')
    (canary / "file").write_text("precious\n")
    for damage in damages:
        _damage(run, canary, *damage)
    before = _hashes(canary)
    argv = {"sample": ["sample", str(run), "--n", "2", "-o", str(tmp / "out.png")],
            "eval": ["eval", str(run), "--n", "8"],
            "resume": ["train", str(run / "config.yaml"), "--run-dir", str(run), "--resume"],
            }[command]
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code in (0, 2), (damages, command, err)
    assert "Traceback" not in err
    if code == 2:
        assert "vqgen: error: " in err
    assert _hashes(canary) == before, (damages, command)
    assert sorted(os.listdir(canary)) == ["dir", "file"]
