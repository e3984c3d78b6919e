"""Run every benchmark script and collect what it prints.

Each ``benchmarks/<name>.py`` prints one JSON object (its last line of stdout that
parses as JSON). This runner writes ``benchmarks/results/<name>.json`` and a
Markdown table of every scalar figure to ``benchmarks/results/SUMMARY.md``.

    python benchmarks/run_all.py              # all scripts
    python benchmarks/run_all.py prior cuda   # some
    python benchmarks/run_all.py --summary    # only rebuild SUMMARY.md from results/*.json

SUMMARY.md starts with one table of headline figures (``HEADLINES``: a label and
a dotted path into each script's JSON), then every scalar of every result.
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


_VQ = "variants.vqgan_f4_default_quantizer"
_PLAIN = "variants.vqgan_f4_plain_quantizer"

#: per script: (label, dotted path into its JSON) of the figures worth a glance
HEADLINES: dict[str, list[tuple[str, str]]] = {
    "tokenizer_quality": [
        ("VQGAN f=4 PSNR, default quantizer (dB)", f"{_VQ}.psnr_db"),
        ("VQGAN f=4 codebook usage, default quantizer", f"{_VQ}.codebook_usage"),
        ("VQGAN f=4 codebook usage, plain quantizer", f"{_PLAIN}.codebook_usage"),
        ("k-means f=1 PSNR, K=512 (dB)", "variants.kmeans_f1.psnr_db"),
        ("k-means f=1 PSNR, K=1024 (dB)", "variants.kmeans_f1_K1024.psnr_db"),
        ("VQGAN encode (images/s)", f"{_VQ}.encode_images_per_s"),
    ],
    "prior": [
        ("GPT training, sdpa (tokens/s)", "training.gpt_sdpa.tokens_per_s"),
        ("GPT training, math (tokens/s)", "training.gpt_math.tokens_per_s"),
        ("PixelSNAIL training, matched size (tokens/s)", "training.pixelsnail.tokens_per_s"),
        ("KV-cache sampling speed-up", "sampling.speedup"),
        ("token-cache stage-2 step speed-up (taming f=4)", "stage2_token_cache.taming_f4.speedup"),
    ],
    "gpt_vs_pixelsnail": [
        ("GPT held-out NLL, eq. steps (bits/token)", "equal_steps.gpt.val_nll_bits"),
        ("PixelSNAIL held-out NLL, eq. steps (bits/token)", "equal_steps.pixelsnail.val_nll_bits"),
        ("GPT held-out NLL, equal time (bits/token)", "equal_time.gpt.val_nll_bits"),
        ("PixelSNAIL held-out NLL, equal time (bits/token)", "equal_time.pixelsnail.val_nll_bits"),
    ],
    "orderings": [
        (f"{o} held-out NLL (nats/token; paper {paper})", f"orderings.{o}.val_nll_nats")
        for o, paper in (("row_major", 4.767), ("spiral_out", 4.889), ("z_curve", 4.810),
                         ("subsample", 5.015), ("alternate", 4.812), ("spiral_in", 4.901))
    ],
    "sampling": [
        ("sliding window, 16x16 latents (ms/token)", "sliding.16x16.ms_per_token"),
        ("sliding window, 32x64 latents (ms/token)", "sliding.32x64.ms_per_token"),
        ("per-token cost max/min", "ratio_max_min"),
    ],
    "conditioning": [
        *((f"{d} data, {c}: closure of the fidelity gap (pass >= 0.5)",
           f"closures.{d}.{c}.closure")
          for d in ("default", "demo")
          for c in ("class", "segmentation", "depth", "edge", "pose", "lowres")),
        *((f"{d} data, {c}: NLL gain from the condition (bits/token)",
           f"settings.{d}.summary.{c}.gap_bits")
          for d in ("default", "demo") for c in ("class", "lowres")),
        *((f"{d} data: class accuracy of class-conditional samples",
           f"settings.{d}.summary.class.accuracy.samples") for d in ("default", "demo")),
    ],
    "stage_matrix": [
        *((f"{d} data, {t}: reconstruction PSNR (dB)",
           f"settings.{d}.tokenizers.{t}.psnr_db") for d in ("demo", "default")
          for t in ("vqgan", "fsq", "lfq")),
        *((f"{d} data, {t}: codebook usage", f"settings.{d}.tokenizers.{t}.usage")
          for d in ("demo", "default") for t in ("vqgan", "fsq", "lfq")),
        *((f"{d} data, {t} + {p}: class accuracy at guidance 2",
           f"settings.{d}.cells.{t}+{p}.guidance_2.accuracy")
          for d in ("demo", "default") for t in ("vqgan", "fsq", "lfq")
          for p in ("gpt", "pixelsnail", "maskgit")),
        *((f"{p}, 16x16 latents, batch 1: sampling ms per image",
           f"sampling_ms_per_image.{p}_16x16_batch1") for p in ("gpt", "maskgit")),
    ],
    "cuda": [
        ("GPT 24x1024 bf16 training, sdpa, 256 tokens (tokens/s)", "results.0.tokens_per_s"),
        ("same, model-FLOPs utilisation", "results.0.mfu"),
        ("same, math attention (tokens/s)", "results.1.tokens_per_s"),
    ],
}


def get(obj: Any, path: str) -> Any:
    """``obj`` at dotted ``path``, or None."""
    for part in path.split("."):
        if isinstance(obj, list) and part.isdigit() and int(part) < len(obj):
            obj = obj[int(part)]
            continue
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def summarize(results: dict[str, dict[str, Any]], machine: str) -> str:
    """SUMMARY.md: the headline table, then every scalar per script."""
    when = time.strftime("%Y-%m-%d %H:%M")
    lines = [f"# Benchmarks\n\nMachine: {machine}; written {when}.\n",
             "| benchmark | figure | value |", "| --- | --- | --- |"]
    for name, result in results.items():
        rows = [(label, get(result, path)) for label, path in HEADLINES.get(name, [])]
        if result.get("skipped"):
            rows = [("skipped", result.get("reason", ""))]
        for key in ("all_targets_met",):
            if key in result:
                rows.append(("all targets met", result[key]))
        lines += [f"| {name} | {label} | {fmt(v)} |" for label, v in rows if v is not None]
    for name, result in results.items():
        lines.append(f"\n## {name}\n\n| figure | value |\n| --- | --- |")
        lines += [f"| {k} | {fmt(v)} |" for k, v in flatten(result).items()]
    return "\n".join(lines) + "\n"


def update_readme(summary: str) -> None:
    """Put the headline table (with its machine line) between README's bench-table markers."""
    readme = HERE.parent / "README.md"
    start, end = "<!-- bench-table -->", "<!-- /bench-table -->"
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    if start not in text or end not in text:
        return
    head = summary.split("\n## ")[0].splitlines()
    machine = next((line for line in head if line.startswith("Machine:")), "")
    table = "\n".join(line for line in head if line.startswith("|"))
    before, rest = text.split(start, 1)
    after = rest.split(end, 1)[1]
    readme.write_text(f"{before}{start}\n{machine}\n\n{table}\n{end}{after}", encoding="utf-8")
    print(f"updated the table in {readme}")


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def main(argv: list[str]) -> int:
    summary_only = "--summary" in argv
    argv = [a for a in argv if a != "--summary"]
    scripts = sorted(
        p for p in HERE.glob("*.py") if p.name != "run_all.py" and not p.name.startswith("_")
    )
    if argv:
        scripts = [p for p in scripts if p.stem in argv]
    RESULTS.mkdir(exist_ok=True)
    machine = describe_machine()
    status = 0
    for script in [] if summary_only else scripts:
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
    results = {}
    for script in scripts:
        path = RESULTS / f"{script.stem}.json"
        if path.is_file():
            results[script.stem] = json.loads(path.read_text())
    text = summarize(results, machine)
    (RESULTS / "SUMMARY.md").write_text(text)
    print(f"wrote {RESULTS / 'SUMMARY.md'}")
    update_readme(text)
    return status


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
