"""Import taming-transformers checkpoints into vqgen run directories.

``import_taming(ckpt, config, out_dir)`` reads a taming-transformers Lightning
checkpoint (a dict with a ``state_dict``) and the YAML config it was trained with
(``model: {target, params}``) and writes a run directory that
:func:`vqgen.load_run` loads and ``vqgen sample`` uses.
The checkpoint is read with ``torch.load(weights_only=True)``: nothing in it is
ever unpickled.

What maps to what (by the class name at the end of ``target``):

* ``VQModel``, ``VQNoDiscModel`` → tokenizer ``vqgan`` in its plain configuration
  (``codebook_dim: 0``, no l2 normalisation, no k-means init, no restarts,
  ``norm_groups: 32``, ``beta: 0.25``, ``legacy_beta`` from the quantizer's
  ``legacy`` flag, true unless the config says ``legacy: false``). Taming's old
  ``VectorQuantizer`` and its ``VectorQuantizer2`` share the key layout and the
  computation (the old one is the legacy β placement). The loss config's
  weights (``disc_start``, ``disc_weight`` × ``disc_factor``, ``codebook_weight``,
  ``perceptual_weight``, ``disc_num_layers``, ``disc_ndf``, ``disc_loss``) become
  the tokenizer's training params, for fine-tuning.
* ``EMAVQ`` → ``vqgan`` as above (the EMA statistics are dropped; fine-tuning
  would train the codebook by gradient).
* ``VQSegmentationModel``, or a ``VQModel`` with ``image_key: segmentation`` and
  a ``colorize`` buffer → ``vqgan_segmentation`` (``n_labels`` = its channels).
* ``GumbelVQ`` → ``vqgan_gumbel`` (:class:`VQGANGumbel`, defined here): taming's
  Gumbel quantizer. Decoding is exact; encoding takes the arg-max of the code
  logits, where taming's eval mode still adds Gumbel noise (so taming's codes
  are a random draw around these).
* ``Net2NetTransformer`` → its first stage as above, prior ``gpt`` (minGPT keys
  one to one), its permuter as an ordering (``Identity`` → ``row_major``,
  ``SpiralOut`` → ``spiral_out``, ``ZCurve`` → ``z_curve``, ``Subsample`` →
  ``subsample``, ``AlternateParsing`` → ``alternate``, ``SpiralIn`` →
  ``spiral_in``; the stored index buffers are checked against the ordering), and
  its cond stage: ``SOSProvider`` / ``__is_unconditional__`` / ``unconditional:
  true`` → no conditioner, the GPT's ``start_token`` is taming's ``sos_token``;
  ``Labelator`` → ``class``; a VQ model with ``cond_stage_key: segmentation`` →
  ``segmentation``, with ``cond_stage_key: depth`` → ``depth`` (its weights in
  ``cond/``). Every conditioner gets ``null_token: false``, the GPT
  ``cond_vocab_size: 0``, and ``pipeline.json`` ``cond_offset: 0``: condition
  ids share the image codes' embedding table, as in taming.

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
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from vqgen.core.checkpoint import save_component
from vqgen.core.config import PipelineConfig, TrainConfig, dumps_config, parse_config
from vqgen.core.errors import VqgenError
from vqgen.core.interfaces import ParamsModel, cond_stage_tokenizer
from vqgen.core.io import atomic_write_text
from vqgen.core.layout import CONFIG_FILE, STAGES, write_pipeline_layout
from vqgen.core.registry import Registry, default_registry
from vqgen.plugins.vqgan.gumbel import GumbelQuantizer, VQGANGumbel
from vqgen.plugins.vqgan.tokenizer import VQGAN

__all__ = [
    "TAMING_ORDERINGS",
    "GumbelQuantizer",
    "VQGANGumbel",
    "import_taming",
    "read_taming_checkpoint",
    "read_taming_config",
]

#: taming permuter class → vqgen ordering name.
TAMING_ORDERINGS: dict[str, str] = {
    "Identity": "row_major",
    "SpiralOut": "spiral_out",
    "ZCurve": "z_curve",
    "Subsample": "subsample",
    "AlternateParsing": "alternate",
    "SpiralIn": "spiral_in",
}
VQ_TARGETS = ("VQModel", "VQNoDiscModel", "VQSegmentationModel", "EMAVQ", "GumbelVQ")
DDCONFIG_KEYS = {
    "ch", "out_ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout",
    "resamp_with_conv", "in_channels", "resolution", "z_channels", "double_z", "give_pre_end",
    "tanh_out",
}
#: taming loss-config param → vqgen tokenizer param (training hyper-parameters only)
LOSS_PARAMS = {
    "disc_start": "disc_start",
    "codebook_weight": "codebook_weight",
    "perceptual_weight": "perceptual_weight",
    "disc_num_layers": "disc_n_layers",
    "disc_ndf": "disc_ch",
    "disc_loss": "disc_loss",
}
IMPORT_FILE = "taming_import.json"
DATA_PLACEHOLDER = "<your image folder: set data.params.root to fine-tune>"


# -----------------------------------------------------------------------------
# reading the inputs


def read_taming_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], int]:
    """``(state_dict, global_step)`` of a taming ``.ckpt``, read with ``weights_only=True``.

    Also accepts a file holding just ``{"state_dict": ...}`` or a bare state_dict.
    """
    path = Path(path)
    if not path.is_file():
        raise VqgenError(f"taming checkpoint {path} not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for these files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VqgenError(
            f"{path} cannot be read with torch.load(weights_only=True) ({first[:300]}). vqgen "
            "never unpickles arbitrary objects, and Lightning checkpoints often hold pickled "
            "callbacks or hyper-parameters. If you trust the file, re-save just its weights "
            "with: python -c \"import torch; c = torch.load('IN.ckpt', map_location='cpu', "
            "weights_only=False); torch.save({'state_dict': c['state_dict'], 'global_step': "
            "c.get('global_step', 0)}, 'OUT.ckpt')\" and import OUT.ckpt"
        ) from None
    step = 0
    if isinstance(obj, Mapping) and "state_dict" in obj:
        raw_step = obj.get("global_step", 0)
        step = int(raw_step) if isinstance(raw_step, int | float) else 0
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise VqgenError(
            f"{path} is not a taming checkpoint: expected a dict with a 'state_dict' of named "
            "tensors (a Lightning .ckpt), or such a state_dict itself"
        )
    return dict(obj), max(step, 0)


def read_taming_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``model`` section (``{target, params}``) of a taming YAML config."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VqgenError(f"taming config {path} not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        reason = " ".join(str(exc).split())
        raise VqgenError(f"taming config {path} is not readable YAML: {reason}") from None
    model = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("target"), str):
        raise VqgenError(
            f"{path} is not a taming-transformers config: expected a 'model' section with "
            "'target' (e.g. taming.models.vqgan.VQModel) and 'params'"
        )
    if not isinstance(model.get("params", {}), dict):
        raise VqgenError(f"{path}: model.params must be a mapping")
    return model


# -----------------------------------------------------------------------------
# strict bookkeeping of the checkpoint's tensors


class _Tensors:
    """A checkpoint's tensors, and which of them were loaded or dropped (and why)."""

    def __init__(self, tensors: dict[str, torch.Tensor], source: Path, config: Path) -> None:
        self.tensors, self.source, self.config = tensors, source, config
        self.used: set[str] = set()
        self.dropped: dict[str, list[str]] = {}  # reason → keys

    def under(self, prefix: str) -> list[str]:
        """Keys starting with ``prefix`` that are neither loaded nor dropped yet."""
        return sorted(
            k for k in self.tensors
            if k.startswith(prefix) and k not in self.used and not self._is_dropped(k)
        )

    def _is_dropped(self, key: str) -> bool:
        return any(key in keys for keys in self.dropped.values())

    def drop(self, key: str, reason: str) -> None:
        self.dropped.setdefault(reason, []).append(key)

    def error(self, what: str) -> VqgenError:
        return VqgenError(
            f"cannot import taming checkpoint {self.source} (config {self.config}): {what}"
        )

    def load(self, module: nn.Module, prefix: str, what: str) -> None:
        """Load every unclaimed tensor under ``prefix`` into ``module``, strictly."""
        expected = module.state_dict()
        mapped: dict[str, torch.Tensor] = {}
        for key in self.under(prefix):
            name = key[len(prefix):]
            if name not in expected:
                raise self.error(
                    f"unexpected tensor {key!r} {tuple(self.tensors[key].shape)}: the {what} "
                    "this config describes has no such weight, and it is not one vqgen drops "
                    "on purpose (loss.*, colorize, attention masks, permuter indices, EMA "
                    "statistics). Check that the config is the one this checkpoint was "
                    "trained with"
                )
            t, want = self.tensors[key], expected[name]
            if tuple(t.shape) != tuple(want.shape):
                raise self.error(
                    f"tensor {key!r} has shape {tuple(t.shape)} but the {what} this config "
                    f"describes needs {tuple(want.shape)}. Check that the config is the one "
                    "this checkpoint was trained with"
                )
            mapped[name] = t
        missing = [k for k in expected if k not in mapped]
        if missing:
            raise self.error(
                f"missing tensor {prefix + missing[0]!r} {tuple(expected[missing[0]].shape)}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + f": the {what} this config describes has it, the checkpoint does not. "
                "Check that the config is the one this checkpoint was trained with"
            )
        module.load_state_dict(mapped, strict=True)
        self.used.update(prefix + k for k in mapped)

    def check_all_claimed(self, valid: str) -> None:
        """Raise for the first tensor that was neither loaded nor dropped."""
        left = self.under("")
        if left:
            raise self.error(
                f"unexpected tensor {left[0]!r} {tuple(self.tensors[left[0]].shape)}"
                + (f" (and {len(left) - 1} more)" if len(left) > 1 else "")
                + f": no part of the model this config describes takes it (it has {valid}), "
                "and it is not one vqgen drops on purpose. Check that the config is the one "
                "this checkpoint was trained with"
            )


def _class_name(target: Any) -> str:
    return str(target).rsplit(".", 1)[-1]


# -----------------------------------------------------------------------------
# stage 1: VQ models


def _tokenizer_spec(
    cfg: Mapping[str, Any], tensors: _Tensors, prefix: str, *, segmentation: bool | None = None
) -> tuple[str, dict[str, Any]]:
    """The vqgen tokenizer (registry name, params) of a taming VQ model config.

    Also drops the checkpoint tensors vqgen does not use (under ``prefix``).
    """
    where = f"{prefix.rstrip('.')} " if prefix else ""
    target = _class_name(cfg.get("target"))
    if target not in VQ_TARGETS:
        raise tensors.error(
            f"{where}target {cfg.get('target')!r} is not a taming VQ model vqgen can import; "
            f"valid: {', '.join(VQ_TARGETS)}"
        )
    p = dict(cfg.get("params") or {})
    dd = dict(p.get("ddconfig") or {})
    unknown = sorted(set(dd) - DDCONFIG_KEYS)
    if unknown:
        raise tensors.error(
            f"{where}ddconfig has {', '.join(unknown)}, which taming's Encoder/Decoder do "
            f"not take; valid: {', '.join(sorted(DDCONFIG_KEYS))}"
        )
    for key, default, bad, why in (
        ("double_z", True, True, "a VQ model's encoder gives z_channels; set double_z: false"),
        ("resamp_with_conv", True, False, "vqgen resamples with convolutions only"),
        ("give_pre_end", False, True, "vqgen's decoder always ends with norm, swish, conv_out"),
        ("tanh_out", False, True, "vqgen's decoder output is not squashed"),
    ):
        if bool(dd.get(key, default)) == bad:
            raise tensors.error(
                f"{where}ddconfig.{key}: {dd.get(key, default)!r}"
                + (" (taming's default)" if key not in dd else "")
                + f" is not supported: {why}"
            )
    if p.get("remap") is not None or f"{prefix}quantize.used" in tensors.tensors:
        raise tensors.error(
            f"{where}uses a quantizer 'remap' (a subset of the codebook); vqgen's tokenizers "
            "cannot express it"
        )
    for key in ("ch", "ch_mult", "num_res_blocks", "resolution", "z_channels", "in_channels"):
        if key not in dd:
            raise tensors.error(f"{where}ddconfig lacks {key!r}")
    for key in ("n_embed", "embed_dim"):
        if key not in p:
            raise tensors.error(f"{where}params lack {key!r}")
    params: dict[str, Any] = {
        "ch": int(dd["ch"]),
        "ch_mult": [int(m) for m in dd["ch_mult"]],
        "num_res_blocks": int(dd["num_res_blocks"]),
        "attn_resolutions": [int(r) for r in dd.get("attn_resolutions") or []],
        "resolution": int(dd["resolution"]),
        "z_channels": int(dd["z_channels"]),
        "dropout": float(dd.get("dropout", 0.0)),
        "norm_groups": 32,  # taming's Normalize
        "n_embed": int(p["n_embed"]),
        "embed_dim": int(p["embed_dim"]),
    }
    in_ch, out_ch = int(dd["in_channels"]), int(dd.get("out_ch", dd["in_channels"]))
    for key in list(tensors.under(prefix + "loss.")):
        tensors.drop(key, "the training loss (discriminator, LPIPS): not part of a tokenizer")
    colorize = f"{prefix}colorize"
    if segmentation is None:
        segmentation = target == "VQSegmentationModel" or (
            colorize in tensors.tensors and p.get("image_key") == "segmentation"
        )
    if colorize in tensors.tensors:
        shape = tuple(tensors.tensors[colorize].shape)
        n = in_ch if segmentation else shape[1] if len(shape) == 4 else -1
        if shape != (3, n, 1, 1):
            raise tensors.error(
                f"{colorize!r} has shape {shape}; taming's colorize projection is "
                f"(3, {'n_labels' if segmentation else 'colorize_nlabels'}, 1, 1)"
                + (f" = (3, {in_ch}, 1, 1) for this config" if segmentation else "")
            )
        tensors.drop(colorize, "colorize: a random projection taming uses for previews only")
    if target == "EMAVQ":
        for name in ("cluster_size", "embed_avg"):
            key = f"{prefix}quantize.embedding.{name}"
            if key in tensors.tensors:
                tensors.drop(key, "EMA codebook statistics: training only")
    if target == "GumbelVQ":
        params.update(kl_weight=float(p.get("kl_weight", 1e-8)), temperature=1.0,
                      in_channels=in_ch, out_channels=0 if out_ch == in_ch else out_ch)
        params.update(_loss_params(p.get("lossconfig"), VQGANGumbel.Params))
        return "vqgan_gumbel", params
    params.update(codebook_dim=0, l2_normalize=False, kmeans_init=False, restart_after=0,
                  beta=float(p.get("beta", 0.25)), legacy_beta=bool(p.get("legacy", True)))
    if segmentation:
        if in_ch != out_ch:
            raise tensors.error(
                f"{where}is a segmentation model with in_channels={in_ch} but out_ch={out_ch}; "
                "vqgan_segmentation takes and predicts the same n_labels channels"
            )
        n_labels = p.get("n_labels", in_ch)
        if int(n_labels) != in_ch:
            raise tensors.error(
                f"{where}n_labels={n_labels} but ddconfig.in_channels={in_ch}; they must agree"
            )
        lc = p.get("lossconfig") or {}
        weight = (lc.get("params") or {}).get("codebook_weight")
        if weight is not None:
            params["codebook_weight"] = float(weight)
        return "vqgan_segmentation", {**params, "n_labels": in_ch}
    params.update(in_channels=in_ch, out_channels=0 if out_ch == in_ch else out_ch)
    params.update(_loss_params(p.get("lossconfig"), VQGAN.Params))
    return "vqgan", params


def _loss_params(lossconfig: Any, model: type[ParamsModel]) -> dict[str, Any]:
    """vqgen training params from a taming ``VQLPIPSWithDiscriminator`` config."""
    if not isinstance(lossconfig, Mapping):
        return {}
    lp = lossconfig.get("params") or {}
    if "LPIPSWithDiscriminator" not in str(lossconfig.get("target", "")):
        return {}
    out: dict[str, Any] = {}
    for theirs, ours in LOSS_PARAMS.items():
        if theirs in lp and ours in model.model_fields:
            out[ours] = lp[theirs]
    if "disc_weight" in model.model_fields and ("disc_weight" in lp or "disc_factor" in lp):
        out["disc_weight"] = float(lp.get("disc_weight", 1.0)) * float(lp.get("disc_factor", 1.0))
    try:  # keep only what validates; the weights matter, these are fine-tuning defaults
        defaults = model().model_dump()
        model.model_validate({**defaults, **out})
    except Exception:  # noqa: BLE001
        return {}
    return out


def _build(
    registry: Registry, tensors: _Tensors, kind: str, name: str, params: dict[str, Any]
) -> Any:
    if name not in registry.list(kind):
        raise tensors.error(
            f"it needs the {kind} {name!r}, which is not registered (register "
            "vqgen.importers.taming.VQGANGumbel as tokenizer 'vqgan_gumbel')"
        )
    try:
        return registry.create(kind, name, params)
    except VqgenError as exc:
        raise tensors.error(f"its {kind} settings do not validate in vqgen: {exc}") from None


# -----------------------------------------------------------------------------
# stage 2: Net2NetTransformer


def _gpt(
    cfg: Mapping[str, Any], tensors: _Tensors, vocab: int, start_token: int
) -> dict[str, Any]:
    """GPT params from taming's ``transformer_config``; drops the checked mask buffers."""
    if _class_name(cfg.get("target")) != "GPT":
        raise tensors.error(
            f"transformer_config.target {cfg.get('target')!r} is not supported; vqgen imports "
            "taming.modules.transformer.mingpt.GPT"
        )
    p = dict(cfg.get("params") or {})
    for key in ("vocab_size", "block_size"):
        if key not in p:
            raise tensors.error(f"transformer_config.params lack {key!r}")
    if int(p.get("n_unmasked", 0)) != 0:
        raise tensors.error(
            f"transformer_config.params.n_unmasked={p['n_unmasked']}: a GPT whose first "
            "positions attend both ways is not supported (vqgen's GPT is causal throughout)"
        )
    if int(p["vocab_size"]) != vocab:
        raise tensors.error(
            f"transformer_config.params.vocab_size={p['vocab_size']} differs from the first "
            f"stage's n_embed={vocab}; vqgen's GPT predicts exactly the tokenizer's codes"
        )
    block = int(p["block_size"])
    causal = torch.tril(torch.ones(block, block)).view(1, 1, block, block)  # (1, 1, T, T)
    for key in tensors.under("transformer."):
        if key.endswith(".attn.mask"):
            mask = tensors.tensors[key]
            if tuple(mask.shape) != tuple(causal.shape) or not torch.equal(
                mask.float().cpu(), causal
            ):
                raise tensors.error(
                    f"{key!r} is not the causal mask of block_size={block}; vqgen's GPT is "
                    "causal throughout"
                )
            tensors.drop(key, "the GPT's causal-mask buffers (checked; vqgen computes them)")
    return {
        "vocab_size": vocab,
        "cond_vocab_size": 0,
        "block_size": block,
        "n_layer": int(p.get("n_layer", 12)),
        "n_head": int(p.get("n_head", 8)),
        "n_embd": int(p.get("n_embd", 256)),
        "embd_pdrop": float(p.get("embd_pdrop", 0.0)),
        "resid_pdrop": float(p.get("resid_pdrop", 0.0)),
        "attn_pdrop": float(p.get("attn_pdrop", 0.0)),
        "start_token": start_token,
    }


def _ordering(
    cfg: Any, tensors: _Tensors, registry: Registry, grid: tuple[int, int]
) -> tuple[str, tuple[int, int]]:
    """The ordering name of taming's permuter (checked against its index buffers)."""
    cfg = cfg or {"target": "taming.modules.transformer.permuter.Identity"}
    cls = _class_name(cfg.get("target"))
    if cls not in TAMING_ORDERINGS:
        raise tensors.error(
            f"permuter {cfg.get('target')!r} has no vqgen ordering; supported permuters: "
            + ", ".join(f"{k} ({v})" for k, v in TAMING_ORDERINGS.items())
        )
    name = TAMING_ORDERINGS[cls]
    p = cfg.get("params") or {}
    if "H" in p and "W" in p:
        grid = (int(p["H"]), int(p["W"]))
    perm = registry.create("ordering", name, {}).permutation(*grid)  # (h*w,)
    buffers = {"forward_shuffle_idx": perm, "backward_shuffle_idx": torch.argsort(perm)}
    for buf, want in buffers.items():
        key = f"permuter.{buf}"
        if key not in tensors.tensors:
            continue
        have = tensors.tensors[key]
        if tuple(have.shape) != tuple(want.shape) or not torch.equal(have.long().cpu(), want):
            raise tensors.error(
                f"{key!r} is not the {name} order of a {grid[0]}x{grid[1]} grid, so taming's "
                f"{cls} and vqgen's {name} disagree here; this checkpoint cannot be imported "
                "with its order intact"
            )
        tensors.drop(key, "the permuter's index buffers (checked against the ordering)")
    return name, grid


def _latent_grid(params: Mapping[str, Any]) -> tuple[int, int]:
    f = 2 ** (len(params["ch_mult"]) - 1)
    r = int(params["resolution"]) // f
    return r, r


def _cond_stage(
    p: Mapping[str, Any], tensors: _Tensors, vocab: int
) -> tuple[str | None, dict[str, Any] | None, int]:
    """``(conditioner name, params, Lc)`` of a Net2NetTransformer's cond stage."""
    cfg = p.get("cond_stage_config")
    key = p.get("cond_stage_key", "depth")
    if p.get("unconditional", False) or cfg == "__is_unconditional__":
        return None, None, 1
    if cfg == "__is_first_stage__":
        raise tensors.error(
            "cond_stage_config '__is_first_stage__' (the first stage encodes the condition "
            "too) is not supported; vqgen's conditioners are class, segmentation, depth, edge, "
            "pose and lowres"
        )
    if not isinstance(cfg, Mapping):
        raise tensors.error(f"cond_stage_config must be a mapping with a target, got {cfg!r}")
    cls = _class_name(cfg.get("target"))
    if cls == "SOSProvider":
        return None, None, 1
    if cls == "Labelator":
        n = int((cfg.get("params") or {}).get("n_classes", 0))
        if not 1 <= n <= vocab:
            raise tensors.error(
                f"Labelator n_classes={n}: class ids share the GPT's table of {vocab} ids, so "
                f"n_classes must lie in [1, {vocab}]"
            )
        return "class", {"n_classes": n, "null_token": False}, 1
    if cls == "CoordStage":
        raise tensors.error(
            "cond stage CoordStage (coordinate conditioning) is not supported: vqgen has no "
            "coordinate conditioner"
        )
    if cls not in VQ_TARGETS:
        raise tensors.error(
            f"cond stage {cfg.get('target')!r} is not supported; vqgen imports SOSProvider, "
            f"Labelator and VQ models ({', '.join(VQ_TARGETS)})"
        )
    if int(p.get("downsample_cond_size", -1)) > -1:
        raise tensors.error(
            f"downsample_cond_size={p['downsample_cond_size']} (resizing the condition before "
            "encoding it) is not supported by vqgen's conditioners"
        )
    if key not in ("segmentation", "depth"):
        raise tensors.error(
            f"cond_stage_key {key!r} with a VQ cond stage is not supported; vqgen maps "
            "'segmentation' (conditioner segmentation) and 'depth' (conditioner depth)"
        )
    seg = key == "segmentation"
    name, tparams = _tokenizer_spec(cfg, tensors, "cond_stage_model.", segmentation=seg)
    if tparams["n_embed"] > vocab:
        raise tensors.error(
            f"the cond stage has n_embed={tparams['n_embed']} codes but the GPT's table holds "
            f"{vocab} ids, which condition ids share"
        )
    hc, wc = _latent_grid(tparams)
    spec = {"name": name, "params": tparams}
    if seg:
        return "segmentation", {"mode": "vqgan", "n_labels": tparams["n_labels"],
                                "tokenizer": spec, "null_token": False}, hc * wc
    if tparams.get("in_channels") != 1:
        raise tensors.error(
            f"the depth cond stage takes {tparams.get('in_channels')} channels; vqgen's depth "
            "conditioner encodes 1-channel maps"
        )
    return "depth", {"tokenizer": spec, "null_token": False}, hc * wc


# -----------------------------------------------------------------------------
# the importer


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
    tensors = _Tensors(state, ckpt, config)
    target = _class_name(model["target"])
    p = dict(model.get("params") or {})
    cond_name: str | None = None
    cond_params: dict[str, Any] | None = None
    if target in VQ_TARGETS:
        tok_name, tok_params = _tokenizer_spec(model, tensors, "")
        tokenizer = _build(registry, tensors, "tokenizer", tok_name, tok_params)
        tensors.load(tokenizer, "", f"taming {target}")
        tensors.check_all_claimed("encoder, decoder, quantize, quant_conv, post_quant_conv")
        steps = {"tokenizer": step}
        grid = grid or _latent_grid(tok_params)
        sections: dict[str, Any] = {}
        prior = conditioner = None
    elif target == "Net2NetTransformer":
        first = p.get("first_stage_config")
        if not isinstance(first, Mapping):
            raise tensors.error("params.first_stage_config is missing")
        tok_name, tok_params = _tokenizer_spec(first, tensors, "first_stage_model.")
        tokenizer = _build(registry, tensors, "tokenizer", tok_name, tok_params)
        tensors.load(tokenizer, "first_stage_model.", "first stage")
        vocab = int(tok_params["n_embed"])
        cond_name, cond_params, n_cond = _cond_stage(p, tensors, vocab)
        sos = int(p.get("sos_token", 0))
        if cond_name is None and not 0 <= sos < vocab:
            raise tensors.error(f"sos_token={sos} is not an id of the GPT's table [0, {vocab})")
        tcfg = p.get("transformer_config")
        if not isinstance(tcfg, Mapping):
            raise tensors.error("params.transformer_config is missing")
        gpt_params = _gpt(tcfg, tensors, vocab, sos if cond_name is None else 0)
        prior = _build(registry, tensors, "prior", "gpt", gpt_params)
        tensors.load(prior, "transformer.", "GPT")
        conditioner = None
        if cond_name is not None:
            conditioner = _build(registry, tensors, "conditioner", cond_name, cond_params or {})
            cond_tok = cond_stage_tokenizer(conditioner)
            if cond_tok is not None:
                tensors.load(cond_tok, "cond_stage_model.", "cond stage")
        ordering, grid = _ordering(p.get("permuter_config"), tensors, registry,
                                   grid or _latent_grid(tok_params))
        tensors.check_all_claimed(
            "first_stage_model, transformer"
            + (", cond_stage_model" if getattr(conditioner, "tokenizer", None) is not None else "")
            + (", permuter" if p.get("permuter_config") else "")
        )
        need = max(n_cond, 1) + grid[0] * grid[1] - 1
        if need > gpt_params["block_size"]:
            raise tensors.error(
                f"a {grid[0]}x{grid[1]} latent grid with {n_cond} condition token(s) needs "
                f"{need} GPT positions but block_size is {gpt_params['block_size']}; pass the "
                "grid the transformer was trained on (grid=(h, w))"
            )
        steps = {"tokenizer": 0, "prior": step}
        if cond_name is not None and getattr(conditioner, "tokenizer", None) is not None:
            steps["cond"] = 0
        sections = {
            "ordering": {"name": ordering},
            "prior": {"name": "gpt", "params": gpt_params},
            "sampler": {"name": "top_k", "params": {"k": 100, "temperature": 1.0}},
        }
        if cond_name is not None:
            sections["conditioner"] = {"name": cond_name, "params": cond_params}
    else:
        raise tensors.error(
            f"target {model['target']!r} is not supported; vqgen imports "
            f"{', '.join(VQ_TARGETS)} and Net2NetTransformer"
        )
    if "cond" in steps and "cond" not in TrainConfig.model_fields:
        raise tensors.error(
            "its spatial cond stage needs a vqgen with run-directory cond stages (train.cond)"
        )
    f = tokenizer.downsample
    data = {"name": "folder", "params": {"root": DATA_PLACEHOLDER,
                                         "resolution": max(grid) * f}}
    cfg = _pipeline_config(
        {"data": data, "tokenizer": {"name": tok_name, "params": tok_params}, **sections,
         "train": {stage: {"steps": s} for stage, s in steps.items()}},
        tensors, registry,
    )
    _write_run(out, cfg, registry, tokenizer, tok_name, prior, conditioner, steps, grid, {
        "source": str(ckpt), "config": str(config), "target": str(model["target"]),
        "global_step": step, "loaded": len(tensors.used),
        "dropped": {reason: sorted(keys) for reason, keys in tensors.dropped.items()},
    })
    return out


def _pipeline_config(data: dict[str, Any], tensors: _Tensors, registry: Registry
                     ) -> PipelineConfig:
    try:
        return parse_config(data, f"<import of {tensors.source}>", registry)
    except VqgenError as exc:
        raise tensors.error(f"the vqgen config it maps to does not validate: {exc}") from None


def _write_run(
    out: Path,
    cfg: PipelineConfig,
    registry: Registry,
    tokenizer: nn.Module,
    tok_name: str,
    prior: nn.Module | None,
    conditioner: Any,
    steps: Mapping[str, int],
    grid: tuple[int, int],
    provenance: dict[str, Any],
) -> None:
    """Write the run directory; ``config.yaml`` last, so a half-written one never loads."""
    out.mkdir(parents=True, exist_ok=True)
    save_component(out / STAGES[0], tokenizer, kind="tokenizer", name=tok_name,
                   step=steps["tokenizer"])
    cond_tok = cond_stage_tokenizer(conditioner)
    if cond_tok is not None and cfg.conditioner is not None:
        spec = cfg.conditioner.params["tokenizer"]
        save_component(out / STAGES[1], cond_tok, kind="tokenizer", name=spec["name"],
                       step=steps["cond"])
    if prior is not None:
        save_component(out / STAGES[2], prior, kind="prior", name="gpt", step=steps["prior"])
    write_pipeline_layout(out, (int(grid[0]), int(grid[1])), cond_offset=0)
    atomic_write_text(out / IMPORT_FILE, json.dumps(provenance, indent=2) + "\n")
    atomic_write_text(out / CONFIG_FILE, dumps_config(cfg, "yaml", registry))
