"""Import taming-transformers checkpoints into vqgen run directories.

``import_taming(ckpt, config, out_dir)`` reads a taming-transformers Lightning
checkpoint (a dict with a ``state_dict``) and the YAML config it was trained with
(``model: {target, params}``) and writes a run directory that
:func:`vqgen.load_run` loads and ``vqgen sample`` uses. The work is split by job:

* :mod:`.reading`: the checkpoint, read with ``torch.load(weights_only=True)``
  (nothing in it is ever unpickled), the YAML config, and the strict bookkeeping
  of the checkpoint's tensors;
* :mod:`.first_stage`: ``VQModel``, ``VQNoDiscModel``, ``VQSegmentationModel``,
  ``EMAVQ`` and ``GumbelVQ`` → tokenizers ``vqgan``, ``vqgan_segmentation`` and
  ``vqgan_gumbel`` (see there what maps to what);
* :mod:`.transformer`: ``Net2NetTransformer`` → its first stage as above, prior
  ``gpt``, its permuter as an ordering and its cond stage as a conditioner (a
  spatial one's weights in ``cond/``); ``pipeline.json`` gets ``cond_offset: 0``;
* this module: the orchestration, and writing the run.

Each stage folder is written through :class:`vqgen.training.checkpointer.Checkpointer`
as a finished stage (``current`` → ``history/step_NNNNNN``, no training state), its
step the one ``config.yaml``'s ``train`` section gives that stage: taming's
``global_step`` for the imported model's own stage, 0 for a transformer's first
and cond stages (trained elsewhere).

Not supported, each with an error that says so: ``CoordStage`` (vqgen has no
coordinate conditioner), ``__is_first_stage__`` cond stages, other cond stage
keys, ``downsample_cond_size``, quantizer ``remap``, a GPT with ``n_unmasked >
0``, the ``Random`` permuter, a transformer ``vocab_size`` other than the first
stage's ``n_embed``, ``ddconfig`` options vqgen does not implement
(``double_z: true``, ``resamp_with_conv: false``, ``give_pre_end: true``).

Loading is strict: every tensor of the checkpoint is loaded into a vqgen module
or dropped on purpose, and ``taming_import.json`` in the run directory lists what
was dropped: the loss module (discriminator and LPIPS copies), the
segmentation ``colorize`` projection (a preview aid), EMA codebook statistics,
the GPT's causal-mask buffers and the permuter's index buffers (both checked
against what vqgen computes first). A missing, unexpected or misshapen tensor
is an error naming it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from vqgen.core.config import PipelineConfig, TrainConfig, dumps_config, parse_config
from vqgen.core.errors import VqgenError
from vqgen.core.interfaces import cond_stage_tokenizer
from vqgen.core.io import atomic_write_text
from vqgen.core.layout import CONFIG_FILE, IMPORT_FILE, STAGES, write_pipeline_layout
from vqgen.core.registry import Registry, default_registry
from vqgen.importers.taming.first_stage import VQ_TARGETS, latent_grid, load_first_stage
from vqgen.importers.taming.reading import (
    Tensors,
    class_name,
    read_taming_checkpoint,
    read_taming_config,
)
from vqgen.importers.taming.transformer import TAMING_ORDERINGS, load_transformer
from vqgen.plugins.vqgan.gumbel import GumbelQuantizer, VQGANGumbel
from vqgen.training.checkpointer import Checkpointer

__all__ = [
    "TAMING_ORDERINGS",
    "GumbelQuantizer",
    "VQGANGumbel",
    "import_taming",
    "read_taming_checkpoint",
    "read_taming_config",
]

DATA_PLACEHOLDER = "<your image folder: set data.params.root to fine-tune>"
TOKENIZER, COND, PRIOR = STAGES  # the stage folders, also the config's train sections


@dataclass
class _Imported:
    """The vqgen components a taming model maps to, their weights loaded."""

    tok_name: str
    tok_params: dict[str, Any]
    tokenizer: nn.Module
    steps: dict[str, int]  # stage → its step (the config's train steps)
    grid: tuple[int, int]
    sections: dict[str, Any] = field(default_factory=dict)  # config sections beyond stage 1
    prior: nn.Module | None = None
    conditioner: Any = None


def import_taming(
    ckpt: str | os.PathLike[str],
    config: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    registry: Registry | None = None,
    *,
    grid: tuple[int, int] | None = None,
) -> Path:
    """Convert a taming-transformers checkpoint + config into a vqgen run directory.

    ``grid`` overrides the latent grid the transformer was trained on (default: the
    permuter's ``H, W``, else the first stage's ``resolution / f``). Returns the
    run directory; see the module docstring for what is supported.
    """
    registry = registry or default_registry()
    ckpt, config, out = Path(ckpt), Path(config), Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise VqgenError(f"{out} exists and is not an empty directory; choose a new -o RUN_DIR")
    model = read_taming_config(config)
    state, step = read_taming_checkpoint(ckpt)
    tensors = Tensors(state, ckpt, config)
    target = class_name(model["target"])
    if target in VQ_TARGETS:
        imported = _import_vq(model, tensors, registry, step, grid)
    elif target == "Net2NetTransformer":
        imported = _import_net2net(dict(model.get("params") or {}), tensors, registry, step,
                                   grid)
    else:
        raise tensors.error(
            f"target {model['target']!r} is not supported; vqgen imports "
            f"{', '.join(VQ_TARGETS)} and Net2NetTransformer"
        )
    if COND in imported.steps and COND not in TrainConfig.model_fields:
        raise tensors.error(
            "its spatial cond stage needs a vqgen with run-directory cond stages (train.cond)"
        )
    resolution = max(imported.grid) * imported.tokenizer.downsample
    data = {"name": "folder", "params": {"root": DATA_PLACEHOLDER, "resolution": resolution}}
    cfg = _pipeline_config(
        {"data": data, "tokenizer": {"name": imported.tok_name, "params": imported.tok_params},
         **imported.sections,
         "train": {stage: {"steps": s} for stage, s in imported.steps.items()}},
        tensors, registry,
    )
    _write_run(out, cfg, registry, imported, {
        "source": str(ckpt), "config": str(config), "target": str(model["target"]),
        "global_step": step, **tensors.record(),
    })
    return out


def _import_vq(model: Mapping[str, Any], tensors: Tensors, registry: Registry, step: int,
               grid: tuple[int, int] | None) -> _Imported:
    """A taming VQ model → a run with only a tokenizer, at taming's ``global_step``."""
    what = f"taming {class_name(model['target'])}"
    name, params, tokenizer = load_first_stage(model, tensors, registry, "", what)
    tensors.check_all_claimed("encoder, decoder, quantize, quant_conv, post_quant_conv")
    return _Imported(name, params, tokenizer, {TOKENIZER: step}, grid or latent_grid(params))


def _import_net2net(p: Mapping[str, Any], tensors: Tensors, registry: Registry, step: int,
                    grid: tuple[int, int] | None) -> _Imported:
    """A Net2NetTransformer (its ``params``) → tokenizer, prior, ordering and conditioner;
    the prior at taming's ``global_step``, the first and cond stages at 0."""
    first = p.get("first_stage_config")
    if not isinstance(first, Mapping):
        raise tensors.error("params.first_stage_config is missing")
    name, params, tokenizer = load_first_stage(first, tensors, registry, "first_stage_model.",
                                               "first stage")
    t = load_transformer(p, tensors, registry, int(params["n_embed"]),
                         grid or latent_grid(params))
    cond_tok = cond_stage_tokenizer(t.conditioner)
    tensors.check_all_claimed(
        "first_stage_model, transformer"
        + (", cond_stage_model" if cond_tok is not None else "")
        + (", permuter" if p.get("permuter_config") else "")
    )
    t.check_fits(tensors)
    steps = {TOKENIZER: 0, PRIOR: step}
    if cond_tok is not None:
        steps[COND] = 0
    sections: dict[str, Any] = {
        "ordering": {"name": t.ordering},
        "prior": {"name": "gpt", "params": t.gpt_params},
        "sampler": {"name": "top_k", "params": {"k": 100, "temperature": 1.0}},
    }
    if t.cond_name is not None:
        sections["conditioner"] = {"name": t.cond_name, "params": t.cond_params}
    return _Imported(name, params, tokenizer, steps, t.grid, sections, t.prior, t.conditioner)


def _pipeline_config(data: dict[str, Any], tensors: Tensors, registry: Registry
                     ) -> PipelineConfig:
    """The vqgen config ``data`` maps to, validated; errors name the checkpoint."""
    try:
        return parse_config(data, f"<import of {tensors.source}>", registry)
    except VqgenError as exc:
        raise tensors.error(f"the vqgen config it maps to does not validate: {exc}") from None


def _write_run(out: Path, cfg: PipelineConfig, registry: Registry, imported: _Imported,
               record: dict[str, Any]) -> None:
    """Write the run directory: each stage as a finished checkpoint, then
    ``pipeline.json``, the import record and ``config.yaml`` last, so a half-written
    run never loads."""
    out.mkdir(parents=True, exist_ok=True)
    stages: list[tuple[str, nn.Module, str, str]] = [  # (stage, module, kind, name)
        (TOKENIZER, imported.tokenizer, "tokenizer", imported.tok_name)]
    cond_tok = cond_stage_tokenizer(imported.conditioner)
    if cond_tok is not None and cfg.conditioner is not None:
        stages.append((COND, cond_tok, "tokenizer", cfg.conditioner.params["tokenizer"]["name"]))
    if imported.prior is not None:
        stages.append((PRIOR, imported.prior, "prior", "gpt"))
    for stage, module, kind, name in stages:
        Checkpointer(out / stage, module, kind=kind, name=name, keep_last=1,
                     keep_best=False).save(imported.steps[stage], None, {})
    write_pipeline_layout(out, (int(imported.grid[0]), int(imported.grid[1])), cond_offset=0)
    atomic_write_text(out / IMPORT_FILE, json.dumps(record, indent=2) + "\n")
    atomic_write_text(out / CONFIG_FILE, dumps_config(cfg, "yaml", registry))
