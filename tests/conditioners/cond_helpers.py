"""Tiny conditioners, shapes batches and few-step training loops shared by the tests."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from torch.utils.data import default_collate

import vqgen
from vqgen.conditioners import SpatialConditioner
from vqgen.plugins.shapes import ShapesDataset

_ARCH = {"ch": 8, "ch_mult": [1, 2, 2], "norm_groups": 4, "z_channels": 8, "embed_dim": 8}
#: A tiny f = 4 VQGAN of 1-channel maps that trains offline (no LPIPS, no GAN).
TINY_MAP: dict[str, Any] = {
    **_ARCH, "in_channels": 1, "n_embed": 16,
    "perceptual_weight": 0.0, "pretrained_backbone": False, "disc_weight": 0.0,
}
TINY_RGB: dict[str, Any] = {**TINY_MAP, "in_channels": 3}
TINY_SEG: dict[str, Any] = {**_ARCH, "n_embed": 16, "n_labels": 5}

#: case id → (registry name, params): every built-in spatial conditioner, tiny.
SPATIAL: dict[str, tuple[str, dict[str, Any]]] = {
    "segmentation": ("segmentation", {"tokenizer": {"name": "vqgan_segmentation",
                                                    "params": TINY_SEG}}),
    "segmentation_downsample": ("segmentation", {"mode": "downsample", "downsample": 4}),
    "depth": ("depth", {"tokenizer": {"name": "vqgan", "params": TINY_MAP}}),
    "edge": ("edge", {"tokenizer": {"name": "vqgan", "params": TINY_MAP}}),
    "pose": ("pose", {"tokenizer": {"name": "vqgan", "params": TINY_MAP}}),
    "lowres": ("lowres", {"tokenizer": {"name": "vqgan", "params": TINY_RGB}}),
}
ALL: dict[str, tuple[str, dict[str, Any]]] = {"class": ("class", {"n_classes": 4}), **SPATIAL}

V = 16  # image codes of the stub image tokenizer (f = 4)


def make(case: str) -> vqgen.Conditioner:
    """A tiny conditioner for ``case`` (seeded, eval mode)."""
    name, params = ALL[case]
    torch.manual_seed(0)
    return vqgen.create("conditioner", name, params).eval()


@lru_cache(maxsize=8)
def _batch(n: int, resolution: int, max_shapes: int, seed: int) -> dict[str, torch.Tensor]:
    ds = ShapesDataset(resolution=resolution, length=n, seed=seed, max_shapes=max_shapes)
    return default_collate([ds[i] for i in range(n)])


def shapes_batch(
    n: int = 8, resolution: int = 32, max_shapes: int = 2, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A collated ``shapes`` batch (a fresh dict of fresh tensors)."""
    return {k: v.clone() for k, v in _batch(n, resolution, max_shapes, seed).items()}


def train_cond_stage(cond: vqgen.Conditioner, batch: dict[str, Any], steps: int = 4) -> list[float]:
    """A few stage-1 steps of a spatial conditioner's own tokenizer on ``condition_input``."""
    tok = cond.tokenizer if isinstance(cond, SpatialConditioner) else None
    if tok is None:  # a class, or a majority vote: nothing to train
        return []
    loss_fn = tok.build_loss()
    opt = torch.optim.Adam(tok.parameters(), 2e-3, betas=(0.5, 0.9))
    x = tok.prepare_input(cond.condition_input(batch))  # (B, C, H, W)
    tok.train()
    losses = []
    for step in range(steps):
        loss, _ = loss_fn.generator_loss(x, tok(x), step, tok.last_layer)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    tok.eval()
    return losses


def tiny_gpt(cond: vqgen.Conditioner, lc: int, grid: tuple[int, int] = (8, 8)) -> vqgen.Prior:
    """A 1-layer GPT over the stub tokenizer's codes with ``lc`` condition tokens."""
    torch.manual_seed(0)
    block = max(lc, 1) + grid[0] * grid[1] - 1
    return vqgen.create("prior", "gpt", {
        "vocab_size": V, "cond_vocab_size": cond.vocab_size, "block_size": block,
        "n_layer": 1, "n_head": 2, "n_embd": 32,
    })


def train_prior(
    pipe: Any, batch: dict[str, Any], steps: int = 4, cond_dropout: float = 0.0
) -> list[float]:
    """A few stage-2 steps: image tokens from the pipeline, condition dropout as asked."""
    seq = pipe.ordering.flatten(pipe.encode(batch["image"]))  # (B, L)
    own = pipe.conditioner.tokens(batch)  # (B, Lc), the conditioner's ids
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(pipe.prior.parameters(), 3e-3)
    pipe.prior.train()
    losses = []
    for _ in range(steps):
        cond = pipe.prior_cond(own, dropout=cond_dropout, generator=g)  # (B, Lc)
        loss = pipe.prior(seq, cond)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    pipe.prior.eval()
    return losses
