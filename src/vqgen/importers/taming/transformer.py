"""taming's ``Net2NetTransformer`` stage 2: the GPT, its permuter and its cond stage.

* the minGPT maps to prior ``gpt``, keys one to one; the causal-mask buffers are
  checked and dropped.
* the permuter maps to an ordering (``Identity`` → ``row_major``, ``SpiralOut`` →
  ``spiral_out``, ``ZCurve`` → ``z_curve``, ``Subsample`` → ``subsample``,
  ``AlternateParsing`` → ``alternate``, ``SpiralIn`` → ``spiral_in``); the stored
  index buffers are checked against the ordering, then dropped.
* the cond stage: ``SOSProvider`` / ``__is_unconditional__`` / ``unconditional:
  true`` → no conditioner, the GPT's ``start_token`` is taming's ``sos_token``;
  ``Labelator`` → ``class``; a VQ model with ``cond_stage_key: segmentation`` →
  ``segmentation``, with ``cond_stage_key: depth`` → ``depth``. Every conditioner
  gets ``null_token: false`` and the GPT ``cond_vocab_size: 0``: condition ids
  share the image codes' embedding table, as in taming.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vqgen.core.interfaces import cond_stage_tokenizer
from vqgen.core.registry import Registry
from vqgen.importers.taming.first_stage import VQ_TARGETS, build, latent_grid, tokenizer_spec
from vqgen.importers.taming.reading import Tensors, class_name

__all__ = ["TAMING_ORDERINGS", "Stage2", "load_transformer"]

#: taming permuter class → vqgen ordering name.
TAMING_ORDERINGS: dict[str, str] = {
    "Identity": "row_major",
    "SpiralOut": "spiral_out",
    "ZCurve": "z_curve",
    "Subsample": "subsample",
    "AlternateParsing": "alternate",
    "SpiralIn": "spiral_in",
}


@dataclass
class Stage2:
    """What a Net2NetTransformer's stage 2 maps to, its weights loaded."""

    prior: nn.Module
    gpt_params: dict[str, Any]
    conditioner: Any  # None when unconditional
    cond_name: str | None
    cond_params: dict[str, Any] | None
    n_cond: int  # condition tokens per sample (1 for a start token or a class)
    ordering: str
    grid: tuple[int, int]

    def check_fits(self, tensors: Tensors) -> None:
        """Raise unless the condition and the grid fit in the GPT's ``block_size``."""
        need = max(self.n_cond, 1) + self.grid[0] * self.grid[1] - 1
        if need > self.gpt_params["block_size"]:
            raise tensors.error(
                f"a {self.grid[0]}x{self.grid[1]} latent grid with {self.n_cond} condition "
                f"token(s) needs {need} GPT positions but block_size is "
                f"{self.gpt_params['block_size']}; pass the grid the transformer was trained "
                "on (grid=(h, w))"
            )


def load_transformer(p: Mapping[str, Any], tensors: Tensors, registry: Registry, vocab: int,
                     grid: tuple[int, int]) -> Stage2:
    """The GPT, conditioner and ordering of a Net2NetTransformer's ``params``, loaded.

    ``vocab`` is the first stage's ``n_embed``; ``grid`` the latent grid unless the
    permuter names one.
    """
    cond_name, cond_params, n_cond = _cond_stage(p, tensors, vocab)
    sos = int(p.get("sos_token", 0))
    if cond_name is None and not 0 <= sos < vocab:
        raise tensors.error(f"sos_token={sos} is not an id of the GPT's table [0, {vocab})")
    tcfg = p.get("transformer_config")
    if not isinstance(tcfg, Mapping):
        raise tensors.error("params.transformer_config is missing")
    gpt_params = _gpt(tcfg, tensors, vocab, sos if cond_name is None else 0)
    prior = build(registry, tensors, "prior", "gpt", gpt_params)
    tensors.load(prior, "transformer.", "GPT")
    conditioner = None
    if cond_name is not None:
        conditioner = build(registry, tensors, "conditioner", cond_name, cond_params or {})
        cond_tok = cond_stage_tokenizer(conditioner)
        if cond_tok is not None:
            tensors.load(cond_tok, "cond_stage_model.", "cond stage")
    ordering, grid = _ordering(p.get("permuter_config"), tensors, registry, grid)
    return Stage2(prior, gpt_params, conditioner, cond_name, cond_params, n_cond,
                       ordering, grid)


def _gpt(
    cfg: Mapping[str, Any], tensors: Tensors, vocab: int, start_token: int
) -> dict[str, Any]:
    """GPT params from taming's ``transformer_config``; drops the checked mask buffers."""
    if class_name(cfg.get("target")) != "GPT":
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
    _drop_causal_masks(tensors, block)
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


def _drop_causal_masks(tensors: Tensors, block: int) -> None:
    """Check that every ``transformer.*.attn.mask`` is causal over ``block``; drop them."""
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


def _ordering(
    cfg: Any, tensors: Tensors, registry: Registry, grid: tuple[int, int]
) -> tuple[str, tuple[int, int]]:
    """The ordering name of taming's permuter (checked against its index buffers)."""
    cfg = cfg or {"target": "taming.modules.transformer.permuter.Identity"}
    cls = class_name(cfg.get("target"))
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
        have = tensors.tensors[key]  # (h*w,)
        if tuple(have.shape) != tuple(want.shape) or not torch.equal(have.long().cpu(), want):
            raise tensors.error(
                f"{key!r} is not the {name} order of a {grid[0]}x{grid[1]} grid, so taming's "
                f"{cls} and vqgen's {name} disagree here; this checkpoint cannot be imported "
                "with its order intact"
            )
        tensors.drop(key, "the permuter's index buffers (checked against the ordering)")
    return name, grid


def _cond_stage(
    p: Mapping[str, Any], tensors: Tensors, vocab: int
) -> tuple[str | None, dict[str, Any] | None, int]:
    """``(conditioner name, params, Lc)`` of a Net2NetTransformer's cond stage."""
    cfg = p.get("cond_stage_config")
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
    cls = class_name(cfg.get("target"))
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
    return _vq_cond_stage(p, cfg, tensors, vocab)


def _vq_cond_stage(p: Mapping[str, Any], cfg: Mapping[str, Any], tensors: Tensors,
                   vocab: int) -> tuple[str, dict[str, Any], int]:
    """``(conditioner name, params, Lc)`` of a VQ model cond stage (segmentation, depth)."""
    key = p.get("cond_stage_key", "depth")
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
    name, tparams = tokenizer_spec(cfg, tensors, "cond_stage_model.", segmentation=seg)
    if tparams["n_embed"] > vocab:
        raise tensors.error(
            f"the cond stage has n_embed={tparams['n_embed']} codes but the GPT's table holds "
            f"{vocab} ids, which condition ids share"
        )
    hc, wc = latent_grid(tparams)
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
