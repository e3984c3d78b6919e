"""Checkpoints: safetensors weights + JSON metadata + optimizer state, atomic and resumable.

A stage directory (``tokenizer/``, ``cond/``, ``prior/``) holds its checkpoints::

    history/step_NNNNNN/   whole checkpoints, the newest ``keep_last`` (at least the current):
        weights.safetensors    the component's state_dict, nothing else
        meta.json              kind, registry name, params, step, metrics, vqgen version
        train_state.pt         optimizer state, step, RNG states (tensors, plain containers)
        *.safetensors          other trained modules (e.g. discriminator.safetensors)
    current -> history/step_NNNNNN    the last whole checkpoint (a symlink)
    weights.safetensors, meta.json, ... -> current/<name>   the same files, for readers
    best/                  the checkpoint with the lowest validation loss, with best.json

A checkpoint commits as one unit (:func:`checkpoint_commit`): its files are written
into a fresh temporary folder, flushed to disk, the folder is renamed to
``history/step_NNNNNN``, and then the one pointer ``current`` is switched to it. A
crash (even ``kill -9``) at any point leaves ``current`` on the previous whole
checkpoint; leftovers of an interrupted commit are removed by the next one. A stage
directory of the earlier layout (plain files at the top, no ``current``) still loads.
Weights load only from safetensors, train state only through
``torch.load(weights_only=True)``.

Why one file of this size: the on-disk format (files, atomic commit, history and
``best`` links) is one contract; its writer and its reader apart would drift.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from vqgen.core.errors import VqgenError
from vqgen.core.io import atomic_path
from vqgen.core.layout import (
    BEST_DIR,
    BEST_FILE,
    CURRENT,
    HISTORY_DIR,
    META_FILE,
    WEIGHTS_FILE,
)
from vqgen.core.registry import Registry, default_registry

__all__ = [
    "CheckpointError",
    "checkpoint_commit",
    "checkpoint_dir",
    "keep_checkpoint",
    "load_component",
    "load_tensors",
    "load_train_state",
    "read_meta",
    "rng_state",
    "save_component",
    "save_json",
    "save_state",
    "save_tensors",
    "set_rng_state",
]



class CheckpointError(VqgenError):
    """A checkpoint file that is missing, truncated or not written by vqgen."""


def _atomic(path: Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` for a temporary file beside ``path``, then rename it over ``path``.

    torch and safetensors report a failed write (a full disk) as RuntimeError and
    SafetensorError: those become a :class:`VqgenError` naming ``path`` and the reason.
    """
    with atomic_path(path) as tmp:
        try:
            write(str(tmp))
        except (RuntimeError, SafetensorError) as exc:
            free = shutil.disk_usage(tmp.parent).free
            why = ("no space left on device" if "os error 28" in str(exc) or free < 1 << 20
                   else " ".join(str(exc).split()))
            raise VqgenError(f"cannot write {path}: {why}") from None
    return path


def save_tensors(tensors: Mapping[str, torch.Tensor], path: Path) -> Path:
    """Write tensors as safetensors, atomically."""
    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return _atomic(path, lambda tmp: save_file(flat, tmp))


def save_json(obj: Any, path: Path) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    text = json.dumps(obj, indent=2, allow_nan=True) + "\n"
    return _atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def save_state(obj: Any, path: Path) -> Path:
    """``torch.save`` of tensors and plain containers (weights_only-loadable), atomically."""
    return _atomic(path, lambda tmp: torch.save(obj, tmp))


def load_tensors(path: str | os.PathLike[str], device: str | torch.device = "cpu"
                 ) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file; a clear error when it is missing or damaged."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} not found: the checkpoint is incomplete")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({exc}); it is truncated or was not "
            "written by vqgen. Restore it, or retrain this stage in a new run directory"
        ) from None


def load_train_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A ``train_state.pt`` read with ``torch.load(weights_only=True)``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} not found: the checkpoint is incomplete")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for bad files
        raise CheckpointError(
            f"{path} cannot be read as a vqgen train state ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); it is truncated, or not ours "
            "(only tensors and plain containers are loaded, never pickled objects)"
        ) from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path} is not a vqgen train state (no 'step' entry)")
    return state


def read_meta(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``meta.json`` of a saved component, checked for the fields vqgen writes."""
    path = checkpoint_dir(directory) / META_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} not found: not a saved vqgen component directory")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(
            f"{path} is not valid JSON ({exc}); the checkpoint is truncated or not ours"
        ) from None
    missing = [k for k in ("kind", "name", "params", "step") if not isinstance(meta, dict)
               or k not in meta]
    if missing:
        raise CheckpointError(
            f"{path} is not a vqgen checkpoint: it lacks {', '.join(missing)}"
        )
    return meta


def save_component(
    directory: str | os.PathLike[str],
    module: nn.Module,
    *,
    kind: str,
    name: str,
    step: int,
    metrics: Mapping[str, Any] | None = None,
    weights: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``weights.safetensors`` (the state_dict, or ``weights`` where given) and
    ``meta.json`` into ``directory``.

    ``meta.json``: ``{"kind", "name", "params", "step", "metrics", "vqgen_version"}``,
    with ``params`` the component's validated params, so :func:`load_component` can
    rebuild it from the registry by name.
    """
    from vqgen.core.version import __version__

    directory = Path(directory)
    save_tensors(module.state_dict() if weights is None else weights, directory / WEIGHTS_FILE)
    params = module.params.model_dump(mode="json")  # type: ignore[union-attr,operator]
    meta = {
        "kind": kind, "name": name, "params": params, "step": step,
        "metrics": dict(metrics or {}), "vqgen_version": __version__,
    }
    save_json(meta, directory / META_FILE)
    return directory


def load_weights(module: nn.Module, path: Path, device: str | torch.device = "cpu") -> None:
    """Load a safetensors state_dict into ``module`` strictly; mismatches name the keys."""
    state = load_tensors(path, device)
    own = module.state_dict()
    wrong = [f"{k} {tuple(v.shape)} in the file, {tuple(own[k].shape)} in the model"
             for k, v in state.items() if k in own and v.shape != own[k].shape]
    if wrong:
        raise CheckpointError(
            f"{path} does not fit {type(module).__name__}: {len(wrong)} tensor(s) differ in "
            f"shape, e.g. {'; '.join(wrong[:3])}. It was saved for other params"
        )
    result = module.load_state_dict(state, strict=False)
    problems = []
    if result.missing_keys:
        problems.append("missing " + ", ".join(result.missing_keys[:8]))
    if result.unexpected_keys:
        problems.append("unexpected " + ", ".join(result.unexpected_keys[:8]))
    if problems:
        raise CheckpointError(
            f"{path} does not fit {type(module).__name__}: {'; '.join(problems)}. It was "
            "saved for other params or another component"
        )


def load_component(
    directory: str | os.PathLike[str],
    registry: Registry | None = None,
    map_location: str | torch.device = "cpu",
) -> Any:
    """Rebuild a component saved by :func:`save_component` (strict weight loading), in eval mode."""
    directory = checkpoint_dir(directory)
    meta = read_meta(directory)
    registry = registry or default_registry()
    try:
        module = registry.create(meta["kind"], meta["name"], meta["params"])
    except (VqgenError, TypeError, ValueError) as exc:  # a foreign or edited meta.json
        raise CheckpointError(
            f"{directory / META_FILE} names a component that cannot be built here: {exc}"
        ) from None
    try:
        load_weights(module, directory / WEIGHTS_FILE, map_location)
    except RuntimeError as exc:  # shape mismatches
        raise CheckpointError(f"{directory / WEIGHTS_FILE}: {exc}") from None
    return module.to(map_location).eval()


def extra_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """Buffers not in the state_dict (training bookkeeping such as code usage)."""
    persistent = module.state_dict().keys()
    return {n: b.detach().cpu() for n, b in module.named_buffers() if n not in persistent}


def restore_buffers(module: nn.Module, saved: Mapping[str, torch.Tensor]) -> None:
    """Copy buffers saved by :func:`extra_buffers` back into ``module``."""
    buffers = dict(module.named_buffers())
    for n, t in saved.items():
        if n in buffers:
            buffers[n].copy_(t)


def rng_state() -> dict[str, Any]:
    """The global torch RNG states (CPU, and CUDA where present)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(directory: str | os.PathLike[str]) -> Path:
    """Where a stage directory's last whole checkpoint lies: ``current/`` where it
    exists, else the directory itself (a saved component, or the earlier layout)."""
    directory = Path(directory)
    current = directory / CURRENT
    return current.resolve() if current.is_dir() else directory


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_link(link: Path, target: str) -> None:
    """Point the symlink ``link`` at ``target`` atomically (whatever stood there)."""
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)


@contextlib.contextmanager
def checkpoint_commit(directory: str | os.PathLike[str], step: int) -> Iterator[Path]:
    """Write one checkpoint of ``step`` into ``directory`` as one unit.

    Yields a fresh folder for the checkpoint's files. When the block ends without an
    exception, the files are flushed to disk, the folder becomes
    ``history/step_NNNNNN``, the pointer ``current`` is switched to it (one atomic
    rename), and the top-level names link through ``current``. On an exception
    nothing changes; leftovers of a commit killed earlier are removed.
    """
    directory = Path(directory)
    hist = directory / HISTORY_DIR
    hist.mkdir(parents=True, exist_ok=True)
    for stale in hist.glob(".step_*"):  # an earlier commit that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=hist, prefix=f".step_{step:06d}."))
    try:
        _chmod_like_mkdir(tmp)
        yield tmp
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
    except VqgenError as exc:  # a write failed (a full disk): say what is kept
        shutil.rmtree(tmp, ignore_errors=True)
        kept = checkpoint_dir(directory)
        kept_note = (f"the last whole checkpoint, {kept}, is kept"
                     if (kept / META_FILE).is_file() else "this stage has no checkpoint yet")
        raise VqgenError(
            f"{exc}. The checkpoint of step {step} was not written; {kept_note}. Free some "
            f"space and run the same `vqgen train` command with --resume to go on"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    name = f"step_{step:06d}"
    final = hist / name
    if final.exists() and checkpoint_dir(directory) == final.resolve():
        shutil.rmtree(tmp)  # this step is the current checkpoint already: keep it whole
    else:
        if final.exists():  # written, but a kill came before the switch: not current
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(hist)
        _replace_link(directory / CURRENT, f"{HISTORY_DIR}/{name}")  # the commit
    for f in final.iterdir():  # readers of <stage>/<file> see the current checkpoint
        top = directory / f.name
        if not (top.is_symlink() and os.readlink(top) == f"{CURRENT}/{f.name}"):
            _replace_link(top, f"{CURRENT}/{f.name}")
    for top in directory.iterdir():  # a file the new checkpoint no longer has
        if top.is_symlink() and os.readlink(top).startswith(f"{CURRENT}/") and not top.exists():
            top.unlink()
    _fsync(directory)


def _chmod_like_mkdir(path: Path) -> None:
    """Give a ``mkdtemp`` folder (0700) the permissions ``mkdir`` would (0777 − umask)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o777 & ~mask)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _snapshot(directory: Path, target: Path) -> None:
    """Copy the checkpoint files of ``directory`` (not its subfolders) into ``target``.

    Written into a temporary folder that is renamed at the end, so ``target`` is
    never half-written; files are hard-linked where possible.
    """
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in sorted(directory.iterdir()):
        if f.is_file() and not f.name.startswith("."):
            _link_or_copy(f, tmp / f.name)
    old = target.with_name(f".{target.name}.old")  # the checkpoint being replaced
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    elif target.exists() or target.is_symlink():  # put there by hand: not vqgen's to delete
        aside = target.with_name(f".{target.name}.moved-aside")
        n = 1
        while aside.exists() or aside.is_symlink():
            n += 1
            aside = target.with_name(f".{target.name}.moved-aside.{n}")
        os.replace(target, aside)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def keep_checkpoint(
    directory: str | os.PathLike[str],
    step: int,
    *,
    keep_last: int,
    val_loss: float | None = None,
    keep_best: bool = True,
) -> dict[str, Any]:
    """After a checkpoint was written to ``directory``: keep history and the best one.

    Adds ``history/step_NNNNNN`` and prunes it to the newest ``keep_last``; when
    ``val_loss`` is finite and lower than the one in ``best/best.json`` (or there is no
    usable one: missing, damaged or not finite), ``best/`` becomes this checkpoint. A
    non-finite ``val_loss`` never does. Returns ``{"history": [...], "best_step": n}``.
    """
    directory = Path(directory)
    source = checkpoint_dir(directory)
    committed = source != directory  # written by checkpoint_commit: already in history/
    out: dict[str, Any] = {"history": [], "best_step": None}
    hist = directory / HISTORY_DIR
    if keep_last > 0 and not committed:
        _snapshot(directory, hist / f"step_{step:06d}")
    if hist.is_dir():
        snaps = sorted(p for p in hist.iterdir() if p.is_dir() and p.name.startswith("step_"))
        keep = max(keep_last, 1 if committed else 0)
        for old in snaps[: len(snaps) - keep]:
            if old.resolve() != source:  # never the current checkpoint
                shutil.rmtree(old, ignore_errors=True)
        out["history"] = [p.name for p in snaps[len(snaps) - keep:]] if keep else []
    best_json = directory / BEST_DIR / BEST_FILE
    if keep_best and val_loss is not None:
        best = _read_best(best_json)
        if math.isfinite(val_loss) and (best is None or float(val_loss) < best[1]):
            _snapshot(source, directory / BEST_DIR)
            save_json({"step": step, "val_loss": float(val_loss)}, best_json)
            best = (step, float(val_loss))
        out["best_step"] = best[0] if best is not None else None
    return out


def _read_best(path: Path) -> tuple[int, float] | None:
    """``(step, val_loss)`` of ``best.json``, or None when missing, damaged or not finite."""
    try:
        best = json.loads(path.read_text(encoding="utf-8"))
        step, loss = int(best["step"]), float(best["val_loss"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (step, loss) if math.isfinite(loss) else None
