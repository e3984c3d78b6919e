"""The benchmark scripts' shared helpers: a smoke run never overwrites a stored result."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture()
def common():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(BENCH))
    try:
        import _common

        yield _common
    finally:
        sys.path.remove(str(BENCH))


def test_full_scale_writes_results_and_smoke_runs_go_aside(common) -> None:  # type: ignore
    full = common.parser(None, "orderings").parse_args([])
    common.setup(full)
    assert full.out == BENCH / "results" / "orderings.json"
    smoke = common.parser(None, "orderings").parse_args(["--scale", "0.02"])
    common.setup(smoke)
    assert smoke.out == BENCH / "results" / "smoke" / "orderings.json"
    chosen = common.parser(None, "orderings").parse_args(["--scale", "0.02", "--out", "x.json"])
    common.setup(chosen)
    assert chosen.out == Path("x.json")


def test_emit_replaces_the_file_whole_and_prints_one_line(
    common, tmp_path: Path, capsys: pytest.CaptureFixture[str]  # type: ignore[no-untyped-def]
) -> None:
    out = tmp_path / "r" / "b.json"
    common.emit({"a": 1.5}, out)
    common.emit({"a": 2}, out)
    assert json.loads(out.read_text()) == {"a": 2}
    assert sorted(p.name for p in out.parent.iterdir()) == ["b.json"]
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == [
        {"a": 1.5}, {"a": 2}]


def test_headline_paths_reach_into_lists_and_nested_settings() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import run_all
    finally:
        sys.path.pop(0)
    result = {"results": [{"tokens_per_s": 5.0}], "closures": {"demo": {"class": {"closure": 0.7}}}}
    assert run_all.get(result, "results.0.tokens_per_s") == 5.0
    assert run_all.get(result, "closures.demo.class.closure") == 0.7
    assert run_all.get(result, "results.3.tokens_per_s") is None
    assert run_all.get(result, "closures.default.class.closure") is None


def test_the_cuda_benchmark_runs_its_code_paths_on_the_cpu() -> None:
    """benchmarks/cuda.py's smoke run (tiny sizes, --device cpu): every section is there,
    and the activation-checkpointed step computes the eager step's loss exactly."""
    import subprocess

    args = ["--device", "cpu", "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
            "--seqs", "32", "--tokens", "64", "--warmup", "0", "--steps", "1",
            "--backends", "sdpa", "--sample-batch", "1", "--vqgan-size", "32",
            "--vqgan-batch", "1", "--vqgan-ch", "16"]
    done = subprocess.run([sys.executable, str(BENCH / "cuda.py"), *args],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    runs = {r["mode"]: r for r in out["results"]}
    assert set(runs) == {"eager", "checkpointed"}  # compiled: CUDA only, said so
    assert "compiled" in out["skipped_backends"]
    assert runs["checkpointed"]["loss"] == runs["eager"]["loss"]
    assert out["sampling"]["tokens_per_s"] > 0 and out["vqgan"]["images_per_s"] > 0
    assert out["fsdp"]["skipped"] is True and "two devices" in out["fsdp"]["reason"]
