"""Training loops (stage 1: the tokenizer) and the helpers every loop shares.

Shared helpers: the learning-rate rule (:func:`resolve_lr`), seeding, an
endless and resumable batch stream (:func:`batch_stream`), a tqdm progress bar,
``metrics.jsonl`` logging (:class:`MetricsLogger`), non-finite loss detection
(:func:`check_finite`), and atomic checkpoint files (safetensors weights + JSON
metadata: :func:`save_component`, :func:`load_component`).

Stage 1 (:func:`train_tokenizer`) knows no concrete tokenizer; it trains any
tokenizer that offers one of two protocols:

* **fitted** — ``fit_step(x, generator) -> dict[str, float]``: one fitting step on
  a batch ``x`` (k-means). No optimizer.
* **GAN-trained** — ``forward(x)`` returning an object with ``recon``, ``qloss``,
  ``usage`` and ``perplexity``; ``last_layer`` (the decoder's last weight); and
  ``build_loss()`` returning a module with ``generator_loss(x, out, step,
  last_layer) -> (loss, logs)``, ``discriminator`` (a module or ``None``),
  ``discriminator_loss(x, recon, step) -> (loss, logs)`` and ``disc_active(step)``
  (VQGAN). Generator and discriminator get their own Adam optimizers.

Optional for both: ``input_key`` (the batch key trained on, default ``"image"``),
``prepare_input(value) -> tensor`` and ``to_rgb(x) -> images`` for preview grids.

A run directory holds::

    metrics.jsonl                       one JSON record per log_every steps
    images/tokenizer_<step>.png         inputs (top row) above reconstructions
    tokenizer/weights.safetensors       the tokenizer's state_dict (nothing else)
    tokenizer/meta.json                 kind, registry name, params, step, metrics
    tokenizer/discriminator.safetensors GAN-trained tokenizers: the discriminator
    tokenizer/train_state.pt            optimizer states, step, RNG, bookkeeping buffers

Every file is written atomically (temporary file + ``os.replace``); ``meta.json``
is written last, so its ``step`` names a complete checkpoint. ``train_state.pt``
holds only tensors and plain containers and is read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from vqgen.core.config import PipelineConfig, StageTrainConfig
from vqgen.core.errors import VqgenError
from vqgen.core.io import atomic_path
from vqgen.core.registry import Registry, default_registry

__all__ = [
    "MetricsLogger",
    "batch_stream",
    "check_finite",
    "load_component",
    "progress_bar",
    "resolve_device",
    "resolve_lr",
    "save_component",
    "seed_everything",
    "train_tokenizer",
    "world_size",
]

log = logging.getLogger(__name__)

TOKENIZER_DIR = "tokenizer"
IMAGES_DIR = "images"
METRICS_FILE = "metrics.jsonl"
PREVIEW_IMAGES = 8  # samples in a preview grid


# =============================================================================
# shared helpers


def world_size() -> int:
    """Processes in the torch.distributed group (1 when not distributed)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def resolve_lr(cfg: StageTrainConfig, world: int | None = None) -> float:
    """The paper's rule ``base_lr × batch_size × grad_accum × world_size``, or ``cfg.lr``."""
    if cfg.lr is not None:
        return cfg.lr
    return cfg.base_lr * cfg.batch_size * cfg.grad_accum * (world or world_size())


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; anything else as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise VqgenError(f"invalid device {name!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise VqgenError(f"device {name!r} was requested but CUDA is not available")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _EpochBatches:
    """Batches of indices, a fresh permutation per epoch, starting at batch ``start``."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int = 0) -> None:
        self.n, self.batch_size, self.seed, self.start = n, batch_size, seed, start
        self.drop_last = n >= batch_size
        self.per_epoch = n // batch_size if self.drop_last else 1

    def __iter__(self) -> Iterator[list[int]]:
        epoch, offset = divmod(self.start, self.per_epoch)
        while True:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
            for b in range(offset, self.per_epoch):
                yield perm[b * self.batch_size : (b + 1) * self.batch_size]
            epoch, offset = epoch + 1, 0


def batch_stream(
    dataset: Dataset,
    batch_size: int,
    *,
    seed: int = 0,
    start: int = 0,
    num_workers: int = 0,
) -> Iterator[Any]:
    """Endless collated batches; reshuffled every epoch, a function of ``(seed, position)``.

    ``start`` skips that many batches (without loading them), so a resumed run sees
    the data an uninterrupted one would have seen.
    """
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise VqgenError("the dataset is empty")
    sampler = _EpochBatches(n, batch_size, seed, start)
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,  # type: ignore[arg-type]
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),  # leaves the global RNG alone
    )
    yield from loader


def check_finite(step: int, terms: Mapping[str, Any]) -> None:
    """Raise a :class:`VqgenError` naming the step and the first non-finite loss term."""
    for name, value in terms.items():
        v = float(value)
        if not math.isfinite(v):
            raise VqgenError(
                f"non-finite loss at step {step}: {name} = {v}. Lower the learning rate, "
                "check the data for NaN/inf values, or resume from an earlier checkpoint"
            )


def progress_bar(total: int, *, initial: int = 0, desc: str = "", enabled: bool = True) -> tqdm:
    """A tqdm bar over steps (shows step, rate and ETA; losses go in its postfix)."""
    return tqdm(
        total=total, initial=initial, desc=desc, unit="step", disable=not enabled,
        dynamic_ncols=True, leave=True,
    )


class _Averager:
    """Running means of scalar logs between two metrics records."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, logs: Mapping[str, Any]) -> None:
        for k, v in logs.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
            self.counts[k] = self.counts.get(k, 0) + 1

    def pop(self) -> dict[str, float]:
        out = {k: self.sums[k] / self.counts[k] for k in self.sums}
        self.sums, self.counts = {}, {}
        return out


class MetricsLogger:
    """Appends one JSON object per line to ``path`` (nothing when ``path`` is None)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: Mapping[str, Any]) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(dict(record), allow_nan=True) + "\n")


def _atomic(path: Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` for a temporary file beside ``path``, then rename it over ``path``."""
    with atomic_path(path) as tmp:
        write(str(tmp))
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


def save_component(
    directory: str | os.PathLike[str],
    module: nn.Module,
    *,
    kind: str,
    name: str,
    step: int,
    metrics: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``weights.safetensors`` (the state_dict) and ``meta.json`` into ``directory``.

    ``meta.json``: ``{"kind", "name", "params", "step", "metrics", "vqgen_version"}``,
    with ``params`` the component's validated params, so :func:`load_component` can
    rebuild it from the registry by name.
    """
    from vqgen import __version__

    directory = Path(directory)
    save_tensors(module.state_dict(), directory / "weights.safetensors")
    params = module.params.model_dump(mode="json")  # type: ignore[union-attr,operator]
    meta = {
        "kind": kind, "name": name, "params": params, "step": step,
        "metrics": dict(metrics or {}), "vqgen_version": __version__,
    }
    save_json(meta, directory / "meta.json")
    return directory


def load_component(
    directory: str | os.PathLike[str],
    registry: Registry | None = None,
    map_location: str | torch.device = "cpu",
) -> Any:
    """Rebuild a component saved by :func:`save_component` (strict weight loading), in eval mode."""
    directory = Path(directory)
    meta_path = directory / "meta.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VqgenError(f"{meta_path} not found: not a saved component directory") from None
    registry = registry or default_registry()
    module = registry.create(meta["kind"], meta["name"], meta["params"])
    state = load_file(str(directory / "weights.safetensors"), device=str(map_location))
    module.load_state_dict(state, strict=True)
    return module.to(map_location).eval()


def _extra_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """Buffers not in the state_dict (training bookkeeping such as code usage)."""
    persistent = module.state_dict().keys()
    return {n: b for n, b in module.named_buffers() if n not in persistent}


def _restore_buffers(module: nn.Module, saved: Mapping[str, torch.Tensor]) -> None:
    buffers = dict(module.named_buffers())
    for n, t in saved.items():
        if n in buffers:
            buffers[n].copy_(t)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# =============================================================================
# stage 1: the tokenizer


def _to_device(value: Any, device: torch.device) -> Any:
    return value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value


class _Stage1:
    """State shared by the fitted and the GAN-trained stage-1 loops."""

    def __init__(
        self, config: PipelineConfig, run_dir: Path | None, registry: Registry, progress: bool
    ) -> None:
        self.config, self.run_dir, self.progress = config, run_dir, progress
        self.cfg = config.train.tokenizer
        self.device = resolve_device(self.cfg.device)
        seed_everything(self.cfg.seed)
        self.dataset = registry.create("dataset", config.data.name, config.data.params)
        self.tok = registry.create("tokenizer", config.tokenizer.name, config.tokenizer.params)
        self.tok.to(self.device)
        self.key = self.cfg.input_key or getattr(self.tok, "input_key", "image")
        sample = self.dataset[0]
        if self.key not in sample:
            raise VqgenError(
                f"dataset {config.data.name!r} has no {self.key!r} in its samples (it has "
                f"{', '.join(sorted(sample))}); set train.tokenizer.input_key"
            )
        self.ckpt_dir = run_dir / TOKENIZER_DIR if run_dir else None
        self.metrics = MetricsLogger(run_dir / METRICS_FILE if run_dir else None)
        self.last_metrics: dict[str, float] = {}
        n = min(PREVIEW_IMAGES, len(self.dataset))
        self.preview = torch.stack([self.dataset[i][self.key] for i in range(n)])
        self.t0 = time.time()

    def input_of(self, batch: Mapping[str, Any]) -> torch.Tensor:
        x = _to_device(batch[self.key], self.device)
        prepare = getattr(self.tok, "prepare_input", None)
        return prepare(x) if prepare is not None else x

    def stream(self, start_step: int) -> Iterator[Any]:
        cfg = self.cfg
        return batch_stream(
            self.dataset, cfg.batch_size, seed=cfg.seed,
            start=start_step * cfg.grad_accum, num_workers=cfg.num_workers,
        )

    def record(self, step: int, averager: _Averager, extra: Mapping[str, Any]) -> None:
        values = averager.pop()
        self.last_metrics = values
        rec = {"step": step, "stage": "tokenizer", **extra,
               "elapsed_s": round(time.time() - self.t0, 3), **values}
        self.metrics.log(rec)

    @torch.no_grad()
    def save_preview(self, step: int) -> None:
        if self.run_dir is None:
            return
        from vqgen.core.data import save_image_grid

        was_training = self.tok.training
        self.tok.eval()
        x = self.input_of({self.key: self.preview})
        if hasattr(self.tok, "fit_step"):
            recon = self.tok.decode(self.tok.encode(x))
        else:
            recon = self.tok(x).recon
        to_rgb = getattr(self.tok, "to_rgb", lambda t: t)
        grid = torch.cat([to_rgb(x), to_rgb(recon)]).float().cpu()  # (2n, C, H, W)
        save_image_grid(grid, self.run_dir / IMAGES_DIR / f"tokenizer_{step:06d}.png",
                        nrow=x.shape[0])
        self.tok.train(was_training)

    def due(self, every: int, done: int) -> bool:
        return done == self.cfg.steps or (every > 0 and done % every == 0)

    def save(self, step: int, state: dict[str, Any], discriminator: nn.Module | None) -> None:
        if self.ckpt_dir is None:
            return
        d = self.ckpt_dir
        if discriminator is not None:
            save_tensors(discriminator.state_dict(), d / "discriminator.safetensors")
        state = {**state, "step": step, "rng": _rng_state(),
                 "buffers": {k: v.cpu() for k, v in _extra_buffers(self.tok).items()}}
        save_state(state, d / "train_state.pt")
        # weights.safetensors, then meta.json last: its step marks a complete checkpoint
        save_component(d, self.tok, kind="tokenizer", name=self.config.tokenizer.name,
                       step=step, metrics=self.last_metrics)

    def load(self, discriminator: nn.Module | None) -> dict[str, Any] | None:
        """The saved train state (weights restored into the models), or None."""
        d = self.ckpt_dir
        if d is None or not (d / "meta.json").is_file():
            return None
        meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
        state = torch.load(d / "train_state.pt", map_location="cpu", weights_only=True)
        if meta.get("step") != state.get("step"):
            raise VqgenError(f"{d}: meta.json and train_state.pt disagree on the step; "
                             "the checkpoint is incomplete")
        dev = str(self.device)
        self.tok.load_state_dict(load_file(str(d / "weights.safetensors"), device=dev))
        if discriminator is not None:
            discriminator.load_state_dict(
                load_file(str(d / "discriminator.safetensors"), device=dev)
            )
        _restore_buffers(self.tok, state["buffers"])
        _set_rng_state(state["rng"])
        return state


def train_tokenizer(
    config: PipelineConfig,
    run_dir: str | os.PathLike[str] | None = None,
    *,
    registry: Registry | None = None,
    progress: bool = True,
    resume: bool = False,
) -> Any:
    """Train the first stage of ``config`` (tokenizer on its data); return it in eval mode.

    Settings come from ``config.train.tokenizer``. With ``run_dir`` it writes metrics,
    preview grids and checkpoints there (layout in the module docstring); ``resume``
    continues from the checkpoint in ``run_dir`` when there is one. k-means-like
    tokenizers are fitted (``fit_step``), VQGAN-like ones trained with their GAN
    objective (see the module docstring for both protocols).
    """
    run = _Stage1(config, Path(run_dir) if run_dir else None, registry or default_registry(),
                  progress)
    tok = run.tok
    if hasattr(tok, "fit_step"):
        _fit_loop(run, resume)
    elif hasattr(tok, "build_loss"):
        _gan_loop(run, resume)
    else:
        raise VqgenError(
            f"tokenizer {config.tokenizer.name!r} ({type(tok).__name__}) cannot be trained by "
            "vqgen's stage-1 loop: it has neither fit_step() nor build_loss()"
        )
    return tok.eval()


def _fit_loop(run: _Stage1, resume: bool) -> None:
    """Fitted tokenizers (k-means): one ``fit_step`` per batch, no optimizer."""
    cfg, tok = run.cfg, run.tok
    generator = torch.Generator().manual_seed(cfg.seed)
    start = 0
    if resume and (state := run.load(None)) is not None:
        start = int(state["step"])
        generator.set_state(state["generator"])
    avg = _Averager()
    bar = progress_bar(cfg.steps, initial=start, desc="tokenizer (fit)", enabled=run.progress)
    batches = run.stream(start)
    for step in range(start, cfg.steps):
        stats = tok.fit_step(run.input_of(next(batches)), generator)
        check_finite(step, stats)
        avg.add(stats)
        done = step + 1
        bar.update(1)
        bar.set_postfix({k: f"{v:.4g}" for k, v in stats.items()}, refresh=False)
        if run.due(cfg.log_every, done):
            run.record(done, avg, {})
        if run.due(cfg.image_every, done) and cfg.image_every > 0:
            run.save_preview(done)
        if run.due(cfg.checkpoint_every, done):
            run.save(done, {"generator": generator.get_state()}, None)
    bar.close()
    if cfg.steps == start:  # nothing to do; still leave a checkpoint behind
        run.save(start, {"generator": generator.get_state()}, None)


def _gan_loop(run: _Stage1, resume: bool) -> None:
    """GAN-trained tokenizers (VQGAN): alternating generator / discriminator Adam steps."""
    cfg, tok = run.cfg, run.tok
    loss_fn = tok.build_loss().to(run.device)
    disc = loss_fn.discriminator
    lr = resolve_lr(cfg)
    betas = cfg.betas or (0.5, 0.9)
    opt_g = torch.optim.Adam([p for p in tok.parameters() if p.requires_grad], lr, betas=betas)
    opt_d = torch.optim.Adam(disc.parameters(), lr, betas=betas) if disc is not None else None
    start = 0
    if resume and (state := run.load(disc)) is not None:
        start = int(state["step"])
        opt_g.load_state_dict(state["opt_g"])
        if opt_d is not None:
            opt_d.load_state_dict(state["opt_d"])
    tok.train()
    loss_fn.train()
    log.info("training tokenizer at lr %.3g (betas %s) for %d steps", lr, betas, cfg.steps)

    def train_state() -> dict[str, Any]:
        return {"opt_g": opt_g.state_dict(),
                "opt_d": opt_d.state_dict() if opt_d is not None else {}, "lr": lr}

    avg = _Averager()
    bar = progress_bar(cfg.steps, initial=start, desc="tokenizer", enabled=run.progress)
    batches = run.stream(start)
    for step in range(start, cfg.steps):
        opt_g.zero_grad(set_to_none=True)
        if opt_d is not None:
            opt_d.zero_grad(set_to_none=True)
        d_on = loss_fn.disc_active(step)
        for _ in range(cfg.grad_accum):
            x = run.input_of(next(batches))
            out = tok(x)
            g_loss, logs = loss_fn.generator_loss(x, out, step, tok.last_layer)
            check_finite(step, logs)
            (g_loss / cfg.grad_accum).backward()
            if d_on:
                d_loss, d_logs = loss_fn.discriminator_loss(x, out.recon, step)
                check_finite(step, d_logs)
                (d_loss / cfg.grad_accum).backward()
                logs.update(d_logs)
            logs.update(usage=out.usage, perplexity=out.perplexity, restarted=out.restarted)
            avg.add(logs)
        opt_g.step()
        if d_on and opt_d is not None:
            opt_d.step()
        done = step + 1
        bar.update(1)
        shown = {k: f"{float(logs[k]):.4g}" for k in ("loss", "rec", "ce", "usage") if k in logs}
        bar.set_postfix(shown, refresh=False)
        if run.due(cfg.log_every, done):
            run.record(done, avg, {"lr": lr})
        if cfg.image_every > 0 and run.due(cfg.image_every, done):
            run.save_preview(done)
        if run.due(cfg.checkpoint_every, done):
            run.save(done, train_state(), disc)
    bar.close()
    if cfg.steps == start:
        run.save(start, train_state(), disc)
