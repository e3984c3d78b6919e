"""taming's VQ models (the first stage, and a VQ cond stage) as vqgen tokenizers.

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
* ``GumbelVQ`` → ``vqgan_gumbel`` (:class:`~vqgen.plugins.vqgan.gumbel.VQGANGumbel`):
  taming's Gumbel quantizer. Decoding is exact; encoding takes the arg-max of the
  code logits, where taming's eval mode still adds Gumbel noise (so taming's codes
  are a random draw around these).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from vqgen.core.errors import VqgenError
from vqgen.core.interfaces import ParamsModel
from vqgen.core.registry import Registry
from vqgen.importers.taming.reading import Tensors, class_name
from vqgen.plugins.vqgan.gumbel import VQGANGumbel
from vqgen.plugins.vqgan.tokenizer import VQGAN

__all__ = ["VQ_TARGETS", "build", "latent_grid", "load_first_stage", "tokenizer_spec"]

VQ_TARGETS = ("VQModel", "VQNoDiscModel", "VQSegmentationModel", "EMAVQ", "GumbelVQ")
DDCONFIG_KEYS = {
    "ch", "out_ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout",
    "resamp_with_conv", "in_channels", "resolution", "z_channels", "double_z", "give_pre_end",
    "tanh_out",
}
#: ddconfig flags vqgen cannot express: (key, taming's default, the refused value, why)
UNSUPPORTED_FLAGS = (
    ("double_z", True, True, "a VQ model's encoder gives z_channels; set double_z: false"),
    ("resamp_with_conv", True, False, "vqgen resamples with convolutions only"),
    ("give_pre_end", False, True, "vqgen's decoder always ends with norm, swish, conv_out"),
    ("tanh_out", False, True, "vqgen's decoder output is not squashed"),
)
#: taming loss-config param → vqgen tokenizer param (training hyper-parameters only)
LOSS_PARAMS = {
    "disc_start": "disc_start",
    "codebook_weight": "codebook_weight",
    "perceptual_weight": "perceptual_weight",
    "disc_num_layers": "disc_n_layers",
    "disc_ndf": "disc_ch",
    "disc_loss": "disc_loss",
}


def tokenizer_spec(
    cfg: Mapping[str, Any], tensors: Tensors, prefix: str, *, segmentation: bool | None = None
) -> tuple[str, dict[str, Any]]:
    """The vqgen tokenizer (registry name, params) of a taming VQ model config.

    Also drops the checkpoint tensors vqgen does not use (under ``prefix``).
    """
    where = f"{prefix.rstrip('.')} " if prefix else ""
    target, p, dd = _checked_config(cfg, tensors, prefix, where)
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
    segmentation = _drop_unused(tensors, prefix, target, p, in_ch, segmentation)
    if target == "GumbelVQ":
        params.update(kl_weight=float(p.get("kl_weight", 1e-8)), temperature=1.0,
                      in_channels=in_ch, out_channels=0 if out_ch == in_ch else out_ch)
        params.update(_loss_params(p.get("lossconfig"), VQGANGumbel.Params))
        return "vqgan_gumbel", params
    params.update(codebook_dim=0, l2_normalize=False, kmeans_init=False, restart_after=0,
                  beta=float(p.get("beta", 0.25)), legacy_beta=bool(p.get("legacy", True)))
    if segmentation:
        return "vqgan_segmentation", _segmentation_params(params, p, tensors, where,
                                                          in_ch, out_ch)
    params.update(in_channels=in_ch, out_channels=0 if out_ch == in_ch else out_ch)
    params.update(_loss_params(p.get("lossconfig"), VQGAN.Params))
    return "vqgan", params


def _checked_config(
    cfg: Mapping[str, Any], tensors: Tensors, prefix: str, where: str
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``(target class, params, ddconfig)`` of a VQ model config vqgen can express."""
    target = class_name(cfg.get("target"))
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
    for key, default, bad, why in UNSUPPORTED_FLAGS:
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
    return target, p, dd


def _drop_unused(tensors: Tensors, prefix: str, target: str, p: Mapping[str, Any],
                 in_ch: int, segmentation: bool | None) -> bool:
    """Drop the loss, ``colorize`` and EMA tensors; return whether it is a segmentation
    model (``segmentation`` None: decided by the target and its ``colorize`` buffer)."""
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
    return segmentation


def _segmentation_params(params: dict[str, Any], p: Mapping[str, Any], tensors: Tensors,
                         where: str, in_ch: int, out_ch: int) -> dict[str, Any]:
    """``vqgan_segmentation`` params: ``params`` with ``n_labels`` and the codebook weight."""
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
    return {**params, "n_labels": in_ch}


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


def latent_grid(params: Mapping[str, Any]) -> tuple[int, int]:
    """The code grid ``(h, w)`` of a tokenizer's ``resolution`` and ``ch_mult``."""
    f = 2 ** (len(params["ch_mult"]) - 1)
    r = int(params["resolution"]) // f
    return r, r


def build(
    registry: Registry, tensors: Tensors, kind: str, name: str, params: dict[str, Any]
) -> Any:
    """``registry.create(kind, name, params)``, its errors naming the checkpoint."""
    if name not in registry.list(kind):
        raise tensors.error(
            f"it needs the {kind} {name!r}, which is not registered (register "
            "vqgen.importers.taming.VQGANGumbel as tokenizer 'vqgan_gumbel')"
        )
    try:
        return registry.create(kind, name, params)
    except VqgenError as exc:
        raise tensors.error(f"its {kind} settings do not validate in vqgen: {exc}") from None


def load_first_stage(
    cfg: Mapping[str, Any], tensors: Tensors, registry: Registry, prefix: str, what: str
) -> tuple[str, dict[str, Any], nn.Module]:
    """``(name, params, tokenizer)`` of the VQ model ``cfg``, its weights loaded from the
    tensors under ``prefix`` (``what`` names it in errors)."""
    name, params = tokenizer_spec(cfg, tensors, prefix)
    tokenizer = build(registry, tensors, "tokenizer", name, params)
    tensors.load(tokenizer, prefix, what)
    return name, params, tokenizer
