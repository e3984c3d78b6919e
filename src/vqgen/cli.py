"""The ``vqgen`` command (also ``python -m vqgen``).

User errors (bad files, fields, values) print one paragraph to stderr and exit
with status 2, without a traceback.

Why one file of this size: the argument parser and one short function per command.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vqgen.core.errors import InterruptedAgain, SampleError, VqgenError

__all__ = ["main"]


def _cmd_plugins(args: argparse.Namespace) -> int:
    from vqgen.core.registry import KINDS, default_registry

    reg = default_registry()
    kinds = [args.kind] if args.kind else list(KINDS)
    rows = [
        (e.kind, e.name, e.source, e.summary)
        for k in kinds
        for e in reg.entries(k)
        if not args.pattern or e.name in reg.list(k, args.pattern)
    ]
    if args.json:
        keys = ("kind", "name", "source", "summary")
        print(json.dumps([dict(zip(keys, r, strict=True)) for r in rows]))
        return 0
    heads = ("kind", "name", "source")
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(heads)]
    print(f"{'kind':<{widths[0]}}  {'name':<{widths[1]}}  {'source':<{widths[2]}}  description")
    for kind, name, source, summary in rows:
        print(f"{kind:<{widths[0]}}  {name:<{widths[1]}}  {source:<{widths[2]}}  {summary}")
    print()
    print("plugins loaded:")
    for plugin, where in reg.plugins.items():
        print(f"  {plugin}  ({where})")
    for plugin, message in reg.failures:
        print(f"  FAILED {plugin}: {message}")
    return 0


def _cmd_config_validate(args: argparse.Namespace) -> int:
    from vqgen.core.config import dumps_config, load_config
    from vqgen.core.registry import default_registry

    cfg = load_config(args.file)
    if args.from_run:  # what `vqgen train --from-run RUN` would train with
        from vqgen.runs import reuse_config

        cfg = reuse_config(cfg, Path(args.from_run), default_registry())
    parts = ", ".join(f"{s}={spec.name}" for s, spec in cfg.components().items())
    source = f" with the tokenizer of {args.from_run}" if args.from_run else ""
    print(f"ok: {args.file} ({parts}){source}")
    if args.resolved:
        print(dumps_config(cfg, "yaml"), end="")
    return 0


def _cmd_config_schema(args: argparse.Namespace) -> int:
    from vqgen.core.config import config_schema
    from vqgen.core.io import atomic_write_text

    text = json.dumps(config_schema(), indent=2) + "\n"
    if args.output:
        _check_output(args.output)
        atomic_write_text(Path(args.output), text)
        print(f"wrote {args.output}")
    else:
        sys.stdout.write(text)
    return 0


_INT = re.compile(r"[-+]?\d{1,30}")
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d{1,4})?")


def _scalar(text: str, pair: str, flag: str) -> Any:
    """One command-line value, read strictly: an integer, a decimal number, ``true`` /
    ``false``, ``null``, or else text; never YAML (no tags, anchors or nesting)."""
    t = text.strip()
    if _INT.fullmatch(t):
        return int(t)
    if _FLOAT.fullmatch(t):
        return float(t)
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    if t.lower() in ("null", "none", "~"):
        return None
    if t[:1] in ("[", "{", "*", "&", "!", "|", ">", "@", "`") or t[-1:] in ("]", "}"):
        raise VqgenError(f"{flag} {pair}: the value {text!r} is not a single value; give a "
                         "number, true / false, or text (a list: [a, b] of such values)")
    return text


def _parse_kv(pairs: Sequence[str], flag: str = "--param") -> dict[str, Any]:
    """``["k=v", ...]`` (given with ``flag``) → dict; each value one scalar
    (:func:`_scalar`) or a flat list ``[a, b]`` of them."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise VqgenError(f"{flag} expects KEY=VALUE, got {pair!r}")
        v = value.strip()
        if v.startswith("[") and v.endswith("]") and len(v) < 10_000:
            inner = v[1:-1].strip()
            out[key] = [_scalar(x, pair, flag) for x in inner.split(",")] if inner else []
        else:
            out[key] = _scalar(value, pair, flag)
    return out


def _cmd_data_write(args: argparse.Namespace) -> int:
    from vqgen.core.registry import default_registry

    reg = default_registry()
    entry = reg.get("dataset", args.dataset)
    if not hasattr(entry.cls, "write_folder"):
        raise VqgenError(
            f"dataset {args.dataset!r} cannot be written to disk (it has no write_folder); "
            "datasets that can: "
            + ", ".join(e.name for e in reg.entries("dataset") if hasattr(e.cls, "write_folder"))
        )
    if args.n < 1:
        raise VqgenError(f"--n must be at least 1, got {args.n}")
    _check_output(args.out_dir, "out_dir")
    params = {"seed": args.seed, "length": args.n, **_parse_kv(args.param)}
    if args.resolution is not None:
        params["resolution"] = args.resolution
    dataset = reg.create("dataset", args.dataset, params)
    out = dataset.write_folder(args.out_dir, overwrite=args.overwrite, progress=True)
    print(f"wrote {len(dataset)} samples of {args.dataset!r} to {out}")
    return 0


def _cmd_data_preview(args: argparse.Namespace) -> int:
    from vqgen.core.images import write_preview
    from vqgen.core.registry import default_registry

    _check_output(args.output)
    _count("--per-class", args.per_class, 1, MAX_PREVIEW)
    params = _parse_kv(args.param)
    if args.resolution is not None:
        params["resolution"] = args.resolution
    dataset = default_registry().create("dataset", args.dataset, params)
    out = write_preview(dataset, args.output, per_class=args.per_class)
    print(f"wrote {out} (one row per class: image with keypoints, segmentation, depth)")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from vqgen.core.layout import META_FILE
    from vqgen.runs import STAGES, train

    stages = tuple(s.strip() for s in args.stages.split(",")) if args.stages else STAGES
    run_dir = Path(args.run_dir or Path("runs") / Path(args.config).stem)
    config: Any = args.config
    if args.logger or args.threads is not None:  # recorded in the run's config
        from vqgen.core.config import load_config

        config = load_config(args.config)
        config.train.loggers = [*config.train.loggers,
                                *(n for n in args.logger or () if n not in config.train.loggers)]
        if args.threads is not None:
            config.train.threads = _threads(args.threads)
    train(config, run_dir, stages=stages, resume=args.resume, progress=True,
          from_run=args.from_run)
    done = [s for s in stages if (run_dir / s / META_FILE).is_file()]
    print(f"trained {', '.join(done) or 'nothing'} into {run_dir}")
    return 0


def _check_output(path: str | Path, flag: str = "-o") -> None:
    """Refuse an output that would overwrite what a run directory reads back."""
    from vqgen.core.layout import refuse_run_input

    refuse_run_input(path, flag)


def _threads(n: int | None) -> int | None:
    """``--threads N``, checked; applied to torch where given."""
    if n is None:
        return None
    if not 1 <= n <= 1024:
        raise VqgenError(f"--threads must be between 1 and 1024, got {n}")
    import torch

    torch.set_num_threads(n)
    return n


MAX_SAMPLES = 100_000  # --n: more is a typo, and would fill memory before any output
MAX_SIDE = 8192  # --size: pixels per side
MAX_GRID = 1024  # import taming --grid: codes per side
MAX_PREVIEW = 64  # data preview --per-class: samples per row


def _count(flag: str, value: int, lo: int, hi: int) -> int:
    """``value`` of ``flag`` if ``lo <= value <= hi``, else a VqgenError naming both."""
    if not lo <= value <= hi:
        raise VqgenError(f"{flag} must be between {lo} and {hi}, got {value}")
    return value


def _cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from vqgen.core.images import save_image_grid
    from vqgen.runs import load_run

    _count("--n", args.n, 1, MAX_SAMPLES)
    if args.seed is not None and not 0 <= args.seed < 2**63:
        raise VqgenError(f"--seed must be between 0 and 2**63 - 1, got {args.seed}")
    _threads(args.threads)
    _check_output(args.output)
    _check_output(Path(args.output).with_suffix(".codes.safetensors"), "-o (its codes)")
    if args.singles:
        _check_output(Path(args.singles) / "0000.png", "--singles")
    pipe = load_run(args.run_dir)
    sampler = _sampler(pipe, args)
    size = _size(args.size) if args.size else None
    condition, nrow = None, min(args.n, 8)
    n_classes = getattr(pipe.conditioner, "n_classes", None)
    if not args.cond and getattr(pipe.conditioner, "spatial", False):
        if size is not None:
            raise VqgenError("--size with a spatial condition needs --cond FILE of that size")
        return _sample_held_out(pipe, args, sampler)
    row_labels = None
    if args.cond:
        condition = _read_conds(pipe, args.cond)
    elif args.class_id is not None:
        condition = _class_condition(pipe, args.class_id).expand(args.n)  # (n,)
    elif n_classes:  # one row per class, named where the run knows names
        per = max(1, args.n // n_classes)
        condition = torch.arange(n_classes).repeat_interleave(per)
        nrow, row_labels = per, pipe.class_names
    n = len(condition) if isinstance(condition, torch.Tensor) else args.n
    out = pipe.generate(n, condition, size=size, sampler=sampler, seed=args.seed,
                        guidance=args.guidance)
    path = save_image_grid(out.images, args.output, nrow=nrow, row_labels=row_labels)
    if args.codes:
        from vqgen.core.checkpoint import save_tensors

        save_tensors({"codes": out.codes}, Path(args.output).with_suffix(".codes.safetensors"))
    if args.singles:
        for i, image in enumerate(out.images):
            save_image_grid(image[None], Path(args.singles) / f"{i:04d}.png", nrow=1, padding=0)
    note = f" (acceptance {out.acceptance:.3f})" if out.acceptance is not None else ""
    print(f"wrote {n} samples to {path}{note}")
    return 0


def _sampler(pipe: Any, args: argparse.Namespace) -> Any:
    """The sampler that `vqgen sample`'s flags ask for (None: the run's own)."""
    from vqgen.core.registry import default_registry

    if not (args.sampler or args.k is not None or args.p is not None
            or args.temperature is not None or args.sampler_param):
        return None
    cfg = pipe.config.sampler
    name = args.sampler or (cfg.name if cfg else "top_k")
    params = dict(cfg.params) if cfg and cfg.name == name else {}
    for key, value in (("k", args.k), ("p", args.p), ("temperature", args.temperature)):
        if value is not None:
            params[key] = value
    params.update(_parse_kv(args.sampler_param, "--sampler-param"))
    return default_registry().create("sampler", name, params)


def _size(text: str) -> tuple[int, int]:
    """``--size HxW`` in pixels, checked."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise VqgenError(f"--size expects HxW in pixels, e.g. 64x96; got {text!r}") from None
    if not (0 < h <= MAX_SIDE and 0 < w <= MAX_SIDE):
        raise VqgenError(f"--size {text}: each side must be 1 to {MAX_SIDE} pixels")
    return h, w


def _class_condition(pipe: Any, value: str) -> Any:
    """``--class VALUE``: a class name of the run, else an integer class id, as ``[1]``."""
    n_classes = getattr(pipe.conditioner, "n_classes", None)
    if n_classes is None:
        raise VqgenError("--class: this run has no class conditioner")
    names = pipe.class_names or []
    if value not in names:
        try:
            cid = int(value)
        except ValueError:
            return pipe.class_ids([value])  # names the close matches, or says none are known
        if not 0 <= cid < n_classes:
            shown = f" ({', '.join(names[:10])}{' …' if len(names) > 10 else ''})" if names \
                else ""
            raise VqgenError(f"--class {value}: class ids of this run are 0..{n_classes - 1}"
                             f"{shown}")
        return pipe.class_ids([cid])
    return pipe.class_ids([value])  # (1,)


def _sample_held_out(pipe: Any, args: argparse.Namespace, sampler: Any) -> int:
    """A spatially conditioned run without ``--cond``: conditions from the held-out
    split, one row each: condition | samples | the real image."""
    from vqgen.core.images import save_image_grid
    from vqgen.evaluation import condition_sheet

    per_row = min(args.n, 4)
    rows = max(1, args.n // per_row)
    sheet = condition_sheet(pipe, rows=rows, per_row=per_row, seed=args.seed, sampler=sampler,
                            guidance=args.guidance)
    path = save_image_grid(sheet, args.output, nrow=per_row + 2)
    print(f"wrote {rows * per_row} samples for {rows} held-out conditions to {path} "
          "(each row: condition | samples | real image)")
    return 0


def _read_conds(pipe: Any, specs: Sequence[str]) -> dict[str, Any]:
    """``--cond [KEY=]FILE`` arguments → a condition batch of one (KEY: the conditioner's)."""
    from vqgen.core.data import read_condition

    if pipe.conditioner is None:
        raise VqgenError("--cond: this run has no conditioner, so it takes no condition")
    default_key = pipe.conditioner.condition_key
    batch = {}
    for spec in specs:
        key, sep, file = spec.partition("=")
        if not sep:
            key, file = default_key, spec
            if key is None:
                raise VqgenError(f"--cond {spec}: {type(pipe.conditioner).__name__} names no "
                                 "batch key for condition files; write --cond KEY=FILE")
        batch[key] = read_condition(key, file)
    files = ", ".join(s.partition("=")[2] or s for s in specs)
    try:  # a bad value or size is reported naming the file, before any sampling
        one = pipe.cond_batch(batch, 1)
        if pipe.condition_canvas(one) is None:  # a spatial one was encoded by that
            pipe.conditioner.tokens(one)
    except SampleError as err:
        raise err.at(f"--cond {files}") from None
    except VqgenError as err:
        raise VqgenError(f"--cond {files}: {err}") from None
    return batch


def _cmd_eval(args: argparse.Namespace) -> int:
    from vqgen.core.io import atomic_write_text
    from vqgen.core.layout import EVAL_FILE
    from vqgen.evaluation import evaluate_run
    from vqgen.runs import load_run

    _count("--n", args.n, 1, MAX_SAMPLES)
    _count("--per-class", args.per_class, 1, MAX_SAMPLES)
    _count("--fid", args.fid, 0, MAX_SAMPLES)
    _threads(args.threads)
    if args.output:
        _check_output(args.output)
    out = evaluate_run(load_run(args.run_dir), args.run_dir, n=args.n,
                       per_class=args.per_class, classifier=args.classifier,
                       fid_samples=args.fid, seed=args.seed)
    text = json.dumps(out, indent=2) + "\n"
    path = Path(args.output) if args.output else Path(args.run_dir) / EVAL_FILE
    atomic_write_text(path, text)
    print(text, end="")
    print(f"wrote {path}", file=sys.stderr)
    return 0


def _cmd_import_taming(args: argparse.Namespace) -> int:
    from vqgen.importers.taming import import_taming

    grid = tuple(args.grid) if args.grid else None
    if grid is not None and not all(1 <= g <= MAX_GRID for g in grid):
        raise VqgenError(f"--grid {grid[0]} {grid[1]}: each side must be 1 to {MAX_GRID} "
                         "codes (the transformer's latent grid)")
    out = import_taming(args.ckpt, args.config, args.output, grid=grid)
    print(f"imported {args.ckpt} into {out}; sample with `vqgen sample {out}`")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from vqgen.runs import run_demo

    _count("--per-class", args.per_class, 1, 32)
    _count("--classifier-steps", args.classifier_steps, 1, 10**7)
    run_demo(args.config, args.out, per_class=args.per_class,
             classifier_steps=args.classifier_steps)
    return 0


_THREADS_HELP = ("CPU threads (default: the cores this process may use, at most 16); on a "
                 "machine shared with other busy processes, set your share (often 1 or 2)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``vqgen`` command."""
    from vqgen import __version__

    p = argparse.ArgumentParser(
        prog="vqgen", description="Two-stage VQ + autoregressive image generation."
    )
    p.add_argument("--version", action="version", version=f"vqgen {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sp = sub.add_parser("plugins", help="list registered components and where they come from")
    sp.add_argument("--kind", choices=["tokenizer", "prior", "conditioner", "ordering",
                                       "sampler", "dataset"])
    sp.add_argument("--pattern", help="fnmatch pattern on names, e.g. 'spiral*'")
    sp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sp.set_defaults(func=_cmd_plugins)

    cp = sub.add_parser("config", help="validate configs, print the config JSON Schema")
    csub = cp.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    v = csub.add_parser("validate", help="check a YAML/TOML/JSON pipeline config (exit 0 or 2)")
    v.add_argument("file")
    v.add_argument("--resolved", action="store_true", help="also print it with all defaults")
    v.add_argument("--from-run", metavar="RUN",
                   help="check it with the trained tokenizer of RUN (as `vqgen train --from-run`)")
    v.set_defaults(func=_cmd_config_validate)
    s = csub.add_parser("schema", help="JSON Schema including every component's params")
    s.add_argument("-o", "--output", help="write to a file instead of stdout")
    s.set_defaults(func=_cmd_config_schema)

    tp = sub.add_parser("train", help="train every stage of a config into a run directory")
    tp.add_argument("config")
    tp.add_argument("--run-dir", help="default: runs/<config name>")
    tp.add_argument("--resume", action="store_true", help="continue unfinished stages")
    tp.add_argument("--stages", help="comma-separated subset of: tokenizer,cond,prior")
    tp.add_argument("--logger", action="append", choices=["jsonl", "tensorboard"],
                    help="also report to this logger (repeatable; train.loggers in a config); "
                    "tensorboard writes <run>/tensorboard")
    tp.add_argument("--from-run", metavar="RUN",
                    help="take the trained tokenizer (and cond stage) from RUN instead of "
                    "training them; checked to fit the config, copied into the new run")
    tp.add_argument("--threads", type=int, metavar="N", help=_THREADS_HELP)
    tp.set_defaults(func=_cmd_train)

    sp2 = sub.add_parser("sample", help="draw samples from a trained run")
    sp2.add_argument("run_dir")
    sp2.add_argument("--n", type=int, default=16)
    sp2.add_argument("--class", dest="class_id", metavar="CLASS",
                     help="class to sample: its name (e.g. a class folder) or id")
    sp2.add_argument("--threads", type=int, metavar="N", help=_THREADS_HELP)
    sp2.add_argument("--size", help="image size HxW in pixels (larger: sliding window)")
    sp2.add_argument("--sampler", help="sampler name (default: the config's)")
    sp2.add_argument("--k", type=int)
    sp2.add_argument("--p", type=float)
    sp2.add_argument("--temperature", type=float)
    sp2.add_argument("--sampler-param", action="append", default=[], metavar="KEY=VALUE")
    sp2.add_argument("--guidance", type=float, default=None,
                     help="classifier-free guidance scale (default: the config's "
                     "sampling.guidance)")
    sp2.add_argument("--seed", type=int, default=0)
    sp2.add_argument("--cond", action="append", default=[], metavar="[KEY=]FILE",
                     help="a condition file (map, image, keypoint JSON); KEY defaults to the "
                     "conditioner's batch key")
    sp2.add_argument("--codes", action="store_true",
                     help="also save the codes (<output>.codes.safetensors)")
    sp2.add_argument("--singles", metavar="DIR", help="also write each image to DIR/NNNN.png")
    sp2.add_argument("-o", "--output", default="samples.png")
    sp2.set_defaults(func=_cmd_sample)

    ep = sub.add_parser("eval", help="evaluate a trained run; JSON out")
    ep.add_argument("run_dir")
    ep.add_argument("--n", type=int, default=512, help="held-out images (default 512)")
    ep.add_argument("--per-class", type=int, default=32, help="samples per class for accuracy")
    ep.add_argument("--classifier",
                    help="classifier file (default: RUN_DIR/classifier.safetensors)")
    ep.add_argument("--fid", type=int, default=0, metavar="N",
                    help="also FID / IS on N samples (needs the eval extra and its weights)")
    ep.add_argument("--seed", type=int, default=0)
    ep.add_argument("-o", "--output", help="JSON file (default: RUN_DIR/eval.json)")
    ep.add_argument("--threads", type=int, metavar="N", help=_THREADS_HELP)
    ep.set_defaults(func=_cmd_eval)

    ip = sub.add_parser("import", help="convert checkpoints of other projects into runs")
    isub = ip.add_subparsers(dest="import_command", required=True, metavar="SOURCE")
    it = isub.add_parser("taming", help="a taming-transformers .ckpt + its YAML config")
    it.add_argument("ckpt")
    it.add_argument("--config", required=True, help="the checkpoint's YAML config")
    it.add_argument("-o", "--output", required=True, help="run directory to create")
    it.add_argument("--grid", type=int, nargs=2, metavar=("H", "W"),
                    help="the latent grid the transformer was trained on, where the config "
                    "does not say")
    it.set_defaults(func=_cmd_import_taming)

    dm = sub.add_parser("demo", help="train the demo config, write samples and metrics")
    dm.add_argument("--config", default="configs/demo.yaml")
    dm.add_argument("--out", default="runs/demo")
    dm.add_argument("--per-class", type=int, default=8, help="samples shown per class (≤ 32)")
    dm.add_argument("--classifier-steps", type=int, default=800,
                    help="training steps of the classifier that judges the samples")
    dm.set_defaults(func=_cmd_demo)

    dp0 = sub.add_parser("data", help="write a dataset to disk, or a picture of it")
    dsub = dp0.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    pv = dsub.add_parser("preview", help="a PNG of samples and their conditions, a row per class")
    pv.add_argument("dataset", help="registered dataset name, e.g. shapes")
    pv.add_argument("-o", "--output", default="preview.png")
    pv.add_argument("--per-class", type=int, default=4)
    pv.add_argument("--resolution", type=int, help="image side in pixels")
    pv.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                    help="any other dataset param (repeatable)")
    pv.set_defaults(func=_cmd_data_preview)
    write = dsub.add_parser("write", help="write a dataset to disk in the folder format")
    write.add_argument("dataset", help="registered dataset name, e.g. shapes")
    shapes = dsub.add_parser("shapes", help="write the shapes data (= write shapes)")
    shapes.set_defaults(dataset="shapes")
    for dp in (write, shapes):
        _data_write_args(dp)
    return p


def _data_write_args(dp: argparse.ArgumentParser) -> None:
    """Arguments of `vqgen data write NAME` and `vqgen data shapes`."""
    dp.add_argument("out_dir")
    dp.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    dp.add_argument("--resolution", type=int, help="image side in pixels")
    dp.add_argument("--seed", type=int, default=0)
    dp.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                    help="any other dataset param (repeatable)")
    dp.add_argument("--overwrite", action="store_true", help="write into a non-empty directory")
    dp.set_defaults(func=_cmd_data_write)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    if threading.current_thread() is threading.main_thread():  # start-up is over (vqgen's
        signal.signal(signal.SIGINT, signal.default_int_handler)  # __init__ quietened it)
    parser = build_parser()
    args = parser.parse_args(argv)
    old = None
    if threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGTERM, _terminate)  # training installs its own
    try:
        return int(args.func(args))
    except VqgenError as exc:
        print(f"vqgen: error: {exc}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 2))
    except OSError as exc:  # the machine said no: permissions, a read-only disk, no space
        print(f"vqgen: error: {_os_error(exc)}", file=sys.stderr)
        return 2
    except _Terminated:
        print("vqgen: terminated (SIGTERM) before training began or after it ended; every "
              "file is written whole or not at all, so run the same command again "
              "(`vqgen train` with --resume) to go on", file=sys.stderr)
        return 128 + signal.SIGTERM
    except InterruptedAgain as exc:
        print(f"\nvqgen: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("\nvqgen: interrupted; every file is written whole or not at all, so run the "
              "same command again (`vqgen train` with --resume) to go on", file=sys.stderr)
        return 130
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def _os_error(exc: OSError) -> str:
    """One sentence for an operating-system error no command turned into its own message:
    what failed, on which file, and that the files written so far are whole."""
    what = exc.strerror or str(exc) or type(exc).__name__
    where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
    return (f"{what}{f': {where}' if where else ''} ({type(exc).__name__}); every file vqgen "
            "writes is written whole or not at all, so fix this (permissions, a read-only "
            "or full disk) and run the same command again")


class _Terminated(BaseException):
    """SIGTERM outside a training loop (which stops gracefully by itself)."""


def _terminate(signum: int, frame: Any) -> None:
    raise _Terminated
