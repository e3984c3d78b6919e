"""The floors of ``../shared/DESIGN.md``, as a layer contract checked by import-linter.

``pyproject.toml`` holds the contracts: ``core`` → components (``plugins``,
``conditioners``, ``orderings``, ``samplers``) → ``training``, ``evaluation``,
``importers`` → ``runs`` → ``cli``, nothing imported upward (function-level imports
included), and no import cycle between the modules of any package.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_imports_keep_the_floors_and_have_no_cycles() -> None:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail("lint-imports (import-linter) is not installed: `make install`")
    done = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout, done.stdout
