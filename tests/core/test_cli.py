"""The `vqgen` command: exit codes, messages, no tracebacks."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import vqgen
from vqgen.cli import main

TESTS_DIR = Path(__file__).resolve().parents[1]

GOOD = """\
data:      {name: shapes, params: {resolution: 32}}
tokenizer: {name: stub_tokenizer}
ordering:  {name: snake}
prior:     {name: stub_prior, params: {n_head: 4}}
"""


def run_cli(*args: str, stubs: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `python -m vqgen ARGS` in a subprocess, with the test stubs as a plugin."""
    env = dict(os.environ)
    if stubs:
        env["VQGEN_PLUGINS"] = "vqgen_test_stubs"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "vqgen", *args], capture_output=True, text=True, env=env,
        timeout=120,
    )


def test_plugins_lists_every_component_with_its_source(registry: vqgen.Registry) -> None:
    out = run_cli("plugins", stubs=False)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for e in registry.entries():
        assert any(ln.split()[:3] == [e.kind, e.name, e.source] for ln in lines), e
    assert "  example  (vqgen-plugin-example 0.1.0)" in lines
    assert "  vqgen.orderings  (built-in)" in lines
    js = json.loads(run_cli("plugins", "--json", "--kind", "ordering", stubs=False).stdout)
    assert {(r["name"], r["source"]) for r in js} >= {("snake", "vqgen-plugin-example")}
    assert {r["kind"] for r in js} == {"ordering"}


def test_console_script_is_installed() -> None:
    exe = Path(sys.executable).with_name("vqgen")
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"vqgen {vqgen.__version__}"


def test_config_validate_ok_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    out = run_cli("config", "validate", str(good))
    assert out.returncode == 0, out.stderr
    assert "ok:" in out.stdout and "ordering=snake" in out.stdout

    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("n_head: 4", "n_heads: 4").replace("snake", "snaek"))
    out = run_cli("config", "validate", str(bad))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert str(bad) in out.stderr
    assert "prior.params.n_heads: Extra inputs are not permitted" in out.stderr
    assert "ordering.name: unknown ordering 'snaek'; did you mean 'snake'?" in out.stderr
    assert out.stdout == ""


def test_config_validate_missing_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config", "validate", str(tmp_path / "nope.toml")]) == 2
    err = capsys.readouterr().err
    assert "nope.toml" in err and "file not found" in err


def test_config_schema_is_json_with_component_params() -> None:
    out = run_cli("config", "schema")
    assert out.returncode == 0, out.stderr
    schema = json.loads(out.stdout)
    assert schema["title"] == "vqgen pipeline config"
    text = out.stdout
    assert "ordering 'snake'" in text and "conditioner 'brightness'" in text
    assert "prior 'stub_prior'" in text and "n_head" in text


def test_usage_errors_exit_2_without_traceback() -> None:
    out = run_cli("frobnicate", stubs=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "invalid choice" in out.stderr


def test_data_write_and_preview(tmp_path: Path) -> None:
    out = tmp_path / "shapes"
    assert main(["data", "write", "shapes", str(out), "--n", "6", "--resolution", "32"]) == 0
    assert len(list((out / "images").rglob("*.png"))) == 6
    assert len(list((out / "segmentation").glob("*.png"))) == 6
    before = sorted(p.stat().st_mtime_ns for p in out.rglob("*.png"))
    # a second write refuses to touch the non-empty directory
    assert main(["data", "write", "shapes", str(out), "--n", "6"]) == 2
    assert sorted(p.stat().st_mtime_ns for p in out.rglob("*.png")) == before
    assert main(["data", "write", "folder", str(tmp_path / "x")]) == 2
    alias = tmp_path / "alias"  # `vqgen data shapes DIR` is `vqgen data write shapes DIR`
    assert main(["data", "shapes", str(alias), "--n", "3"]) == 0
    assert len(list((alias / "images").rglob("*.png"))) == 3
    assert main(["data", "write", "shapes", str(tmp_path / "y"), "--param", "max_shapes=9"]) == 2

    from PIL import Image

    png = tmp_path / "preview.png"
    assert main(["data", "preview", "shapes", "-o", str(png), "--per-class", "2"]) == 0
    with Image.open(png) as im:  # 4 classes × (2 samples × 3 tiles of 128 px + padding)
        assert im.size == (6 * 130 + 2, 4 * 130 + 2)


# -----------------------------------------------------------------------------
# -o PATH: never replaces what is not a regular file


def _output_cases(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Hostile output paths: (path, what the error must say)."""
    folder = tmp_path / "a_folder"
    folder.mkdir()
    (folder / "keep.txt").write_text("keep")
    fifo = tmp_path / "a_fifo"
    os.mkfifo(fifo)
    blocker = tmp_path / "a_file"
    blocker.write_text("keep")
    return {
        "directory": (folder, "is a directory"),
        "fifo": (fifo, "is a FIFO"),
        "link_to_directory": (_link(tmp_path / "dir_link", folder), "is a directory"),
        "parent_is_a_file": (blocker / "out.png", "cannot write"),
    }


def _link(link: Path, target: Path) -> Path:
    link.symlink_to(target)
    return link


def _snapshot(root: Path) -> dict[str, Any]:
    return {str(p.relative_to(root)): (p.is_symlink(), p.read_bytes() if p.is_file()
                                       and not p.is_symlink() else None)
            for p in sorted(root.rglob("*")) if not stat.S_ISFIFO(p.lstat().st_mode)}


@pytest.mark.parametrize("case", ["directory", "fifo", "link_to_directory", "parent_is_a_file"])
@pytest.mark.parametrize("command", [["config", "schema", "-o"],
                                     ["data", "preview", "shapes", "--per-class", "1", "-o"]])
def test_hostile_output_paths_exit_2_and_change_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, command: list[str]
) -> None:
    path, says = _output_cases(tmp_path)[case]
    before = _snapshot(tmp_path)
    assert main([*command, str(path)]) == 2
    err = capsys.readouterr().err
    assert says in err and str(path) in err and "Traceback" not in err
    assert _snapshot(tmp_path) == before
    assert stat.S_ISFIFO((tmp_path / "a_fifo").lstat().st_mode)  # still a FIFO


def test_output_through_a_symlink_writes_its_target(tmp_path: Path) -> None:
    target = tmp_path / "real.json"
    target.write_text("old")
    link = _link(tmp_path / "link.json", target)
    assert main(["config", "schema", "-o", str(link)]) == 0
    assert link.is_symlink() and json.loads(target.read_text())  # the link kept, target written


@pytest.mark.parametrize(("section", "field", "value"), [
    ("tokenizer", "ch", 100_000_000), ("tokenizer", "n_embed", 10**9),
    ("prior", "n_layer", 10_000), ("prior", "block_size", 10**7), ("prior", "n_embd", 10**6),
])
def test_absurd_sizes_are_refused_by_validate(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str],
                                              section: str, field: str, value: int) -> None:
    import yaml

    cfg = yaml.safe_load((TESTS_DIR.parent / "configs" / "tiny.yaml").read_text())
    cfg[section]["params"][field] = value
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["config", "validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{section}.params.{field}" in err and "less than or equal" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("command", [
    [sys.executable, "-m", "vqgen", "plugins"],
    [str(Path(sys.executable).parent / "vqgen"), "plugins"],
])
def test_ctrl_c_while_the_command_starts_up_is_one_line_and_exit_130(
        command: list[str]) -> None:
    """SIGINT while `vqgen` still imports torch: exit 130 with one line, no traceback."""
    import signal
    import time

    if not Path(command[0]).exists():
        pytest.skip("the vqgen script is not installed next to this python")
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    time.sleep(0.4)  # the interpreter is up; importing torch takes seconds
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert "vqgen: interrupted" in err


def test_the_library_keeps_ctrl_c_as_keyboard_interrupt() -> None:
    """Importing vqgen in a user's program leaves SIGINT to Python (KeyboardInterrupt)."""
    import signal

    code = "import signal, vqgen; print(signal.getsignal(signal.SIGINT) is " \
           "signal.default_int_handler)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.strip() == "True", done.stderr[-2000:]
    assert signal.getsignal(signal.SIGINT) is not None


@pytest.mark.parametrize("error, says", [
    (PermissionError(13, "Permission denied", "/runs/r/prior/history/step_000004"),
     "Permission denied: /runs/r/prior/history/step_000004 (PermissionError)"),
    (OSError(30, "Read-only file system", "/runs/r/tokens", None, "/runs/r/.tokens.tmp"),
     "Read-only file system: /runs/r/tokens -> /runs/r/.tokens.tmp (OSError)"),
])
def test_an_os_error_no_command_handled_is_one_line_and_exit_2(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        error: OSError, says: str) -> None:
    """What the machine refuses (a read-only run directory, history or token folder that
    root could still write, so it is faked here) ends as a named error, not a traceback."""
    import vqgen.cli as cli

    def refuse(args: Any) -> int:
        raise error

    parser = cli.build_parser()
    real = parser.parse_args
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    monkeypatch.setattr(parser, "parse_args",
                        lambda argv=None: setattr(ns := real(argv), "func", refuse) or ns)
    assert main(["plugins"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vqgen: error: ") and says in err and "Traceback" not in err
