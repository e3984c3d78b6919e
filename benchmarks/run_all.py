"""Run every benchmark script and collect what it prints.

Each ``benchmarks/<name>.py`` prints one JSON object (its last line of stdout that
parses as JSON). This runner writes ``benchmarks/results/<name>.json`` and a
Markdown table of every scalar figure to ``benchmarks/results/SUMMARY.md``.

    python benchmarks/run_all.py              # all scripts
    python benchmarks/run_all.py prior cuda   # some
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def last_json(text: str) -> dict[str, Any] | None:
    """The last line of ``text`` that is a JSON object."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts → ``{"a.b.c": scalar}`` (lists of scalars kept as strings)."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, list) and any(isinstance(v, dict | list) for v in obj):
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}[{i}]"))
    else:
        out[prefix] = obj
    return out


def describe_machine() -> str:
    """CPU model, core count and Python version, for the results table."""
    import os

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}"


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def main(argv: list[str]) -> int:
    scripts = sorted(
        p for p in HERE.glob("*.py") if p.name != "run_all.py" and not p.name.startswith("_")
    )
    if argv:
        scripts = [p for p in scripts if p.stem in argv]
    RESULTS.mkdir(exist_ok=True)
    machine = describe_machine()
    summary = [f"# Benchmarks\n\nMachine: {machine}; run {time.strftime('%Y-%m-%d %H:%M')}.\n"]
    status = 0
    for script in scripts:
        print(f"== {script.name}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        result = last_json(proc.stdout)
        if proc.returncode != 0 or result is None:
            status = 1
            print(proc.stdout[-2000:], proc.stderr[-4000:], sep="\n")
            result = {"error": f"exit {proc.returncode}", "stderr_tail": proc.stderr[-500:]}
        result.setdefault("wall_s", round(wall, 1))
        (RESULTS / f"{script.stem}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result))
        summary.append(f"\n## {script.stem}\n\n| figure | value |\n| --- | --- |")
        summary += [f"| {k} | {fmt(v)} |" for k, v in flatten(result).items()]
    (RESULTS / "SUMMARY.md").write_text("\n".join(summary) + "\n")
    print(f"wrote {RESULTS / 'SUMMARY.md'}")
    return status


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
