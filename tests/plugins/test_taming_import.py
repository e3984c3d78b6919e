"""Importing taming-transformers checkpoints: strict loading, and outputs equal to taming's.

The checkpoints are built here, in taming's exact key layout with random weights at
tiny sizes, by a small test-local re-implementation of taming's computation (its
Encoder/Decoder, VectorQuantizer2 and old VectorQuantizer, GumbelQuantize, minGPT and
Net2NetTransformer's sequence handling). The imported run must give the same codes
and the same outputs to 1e-5.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import vqgen
from vqgen.core.checkpoint import load_component
from vqgen.core.errors import VqgenError
from vqgen.core.interfaces import signature_problems
from vqgen.core.layout import (
    BEST_DIR,
    CONFIG_FILE,
    CURRENT,
    HISTORY_DIR,
    META_FILE,
    STAGES,
    STATE_FILE,
    WEIGHTS_FILE,
)
from vqgen.core.pipeline import Pipeline
from vqgen.importers.taming import VQGANGumbel, import_taming

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-5
DD: dict[str, Any] = {  # a tiny ddconfig: f = 2, 8×8 images → 4×4 codes, attention at 4×4
    "double_z": False, "z_channels": 8, "resolution": 8, "in_channels": 3, "out_ch": 3,
    "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [4], "dropout": 0.0,
}
N_EMBED, EMBED_DIM = 16, 8


# -----------------------------------------------------------------------------
# a faithful, test-local re-implementation of taming's modules (its key layout)


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


class TResnet(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = norm(cin), nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2, self.dropout = norm(cout), nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class TAttn(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q = self.q(y).reshape(b, c, h * w).permute(0, 2, 1)  # (b, hw, c)
        k = self.k(y).reshape(b, c, h * w)  # (b, c, hw)
        att = torch.softmax(torch.bmm(q, k) * c ** (-0.5), dim=2)  # (b, hw_q, hw_k)
        v = self.v(y).reshape(b, c, h * w)  # (b, c, hw)
        out = torch.bmm(v, att.permute(0, 2, 1)).reshape(b, c, h, w)
        return x + self.proj_out(out)


class TDown(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class TUp(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def mid(c: int) -> nn.Module:
    m = nn.Module()
    m.block_1, m.attn_1, m.block_2 = TResnet(c, c), TAttn(c), TResnet(c, c)
    return m


class TEncoder(nn.Module):
    def __init__(self, *, ch: int, ch_mult: list[int], num_res_blocks: int,
                 attn_resolutions: list[int], in_channels: int, resolution: int,
                 z_channels: int, **_: Any) -> None:
        super().__init__()
        self.n, self.nb = len(ch_mult), num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        self.down = nn.ModuleList()
        res, mults = resolution, [1, *ch_mult]
        for i in range(self.n):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            cin, cout = ch * mults[i], ch * ch_mult[i]
            for _ in range(num_res_blocks):
                level.block.append(TResnet(cin, cout))
                cin = cout
                if res in attn_resolutions:
                    level.attn.append(TAttn(cin))
            if i != self.n - 1:
                level.downsample = TDown(cin)
                res //= 2
            self.down.append(level)
        self.mid = mid(cin)
        self.norm_out, self.conv_out = norm(cin), nn.Conv2d(cin, z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hs = [self.conv_in(x)]
        for i in range(self.n):
            for j in range(self.nb):
                h = self.down[i].block[j](hs[-1])
                if len(self.down[i].attn) > 0:
                    h = self.down[i].attn[j](h)
                hs.append(h)
            if i != self.n - 1:
                hs.append(self.down[i].downsample(hs[-1]))
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(hs[-1])))
        return self.conv_out(swish(self.norm_out(h)))


class TDecoder(nn.Module):
    def __init__(self, *, ch: int, out_ch: int, ch_mult: list[int], num_res_blocks: int,
                 attn_resolutions: list[int], resolution: int, z_channels: int,
                 **_: Any) -> None:
        super().__init__()
        self.n, self.nb = len(ch_mult), num_res_blocks
        cin = ch * ch_mult[-1]
        res = resolution // 2 ** (self.n - 1)
        self.conv_in = nn.Conv2d(z_channels, cin, 3, 1, 1)
        self.mid = mid(cin)
        self.up = nn.ModuleList()
        for i in reversed(range(self.n)):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            cout = ch * ch_mult[i]
            for _ in range(num_res_blocks + 1):
                level.block.append(TResnet(cin, cout))
                cin = cout
                if res in attn_resolutions:
                    level.attn.append(TAttn(cin))
            if i != 0:
                level.upsample = TUp(cin)
                res *= 2
            self.up.insert(0, level)
        self.norm_out, self.conv_out = norm(cin), nn.Conv2d(cin, out_ch, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i in reversed(range(self.n)):
            for j in range(self.nb + 1):
                h = self.up[i].block[j](h)
                if len(self.up[i].attn) > 0:
                    h = self.up[i].attn[j](h)
            if i != 0:
                h = self.up[i].upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class TQuantizer2(nn.Module):
    """VectorQuantizer2 (``legacy`` β placement) or, with ``old``, VectorQuantizer."""

    def __init__(self, n_e: int, e_dim: int, beta: float, legacy: bool, old: bool) -> None:
        super().__init__()
        self.n_e, self.e_dim, self.beta, self.legacy, self.old = n_e, e_dim, beta, legacy, old
        self.embedding = nn.Embedding(n_e, e_dim)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        z = z.permute(0, 2, 3, 1).contiguous()
        zf = z.view(-1, self.e_dim)
        w = self.embedding.weight
        d = zf.pow(2).sum(1, keepdim=True) + w.pow(2).sum(1) - 2 * zf @ w.t()
        idx = torch.argmin(d, dim=1)
        if self.old:  # one-hot matmul, β on the codebook term
            enc = torch.zeros(idx.shape[0], self.n_e).scatter_(1, idx[:, None], 1)
            z_q = (enc @ w).view(z.shape)
        else:
            z_q = self.embedding(idx).view(z.shape)
        commit = torch.mean((z_q.detach() - z) ** 2)
        codebook = torch.mean((z_q - z.detach()) ** 2)
        if self.old or self.legacy:
            loss = commit + self.beta * codebook
        else:
            loss = self.beta * commit + codebook
        z_q = z + (z_q - z).detach()
        return z_q.permute(0, 3, 1, 2).contiguous(), loss, (None, None, idx)

    def get_codebook_entry(self, idx: torch.Tensor, shape: tuple) -> torch.Tensor:
        return self.embedding(idx).view(shape).permute(0, 3, 1, 2).contiguous()


class TGumbel(nn.Module):
    """GumbelQuantize, with the noise left out (``hard`` arg-max of the logits)."""

    def __init__(self, hidden: int, embed_dim: int, n_embed: int) -> None:
        super().__init__()
        self.n_embed = n_embed
        self.proj = nn.Conv2d(hidden, n_embed, 1)
        self.embed = nn.Embedding(n_embed, embed_dim)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        logits = self.proj(z)
        one_hot = F.one_hot(logits.argmax(1), self.n_embed).permute(0, 3, 1, 2).float()
        z_q = torch.einsum("b n h w, n d -> b d h w", one_hot, self.embed.weight)
        qy = F.softmax(logits, dim=1)
        diff = 1e-8 * torch.sum(qy * torch.log(qy * self.n_embed + 1e-10), dim=1).mean()
        return z_q, diff, (None, None, one_hot.argmax(1))

    def get_codebook_entry(self, idx: torch.Tensor, shape: tuple) -> torch.Tensor:
        b, h, w, _ = shape
        one_hot = F.one_hot(idx.reshape(b, h, w), self.n_embed).permute(0, 3, 1, 2).float()
        return torch.einsum("b n h w, n d -> b d h w", one_hot, self.embed.weight)


class TLoss(nn.Module):
    """Stand-in for VQLPIPSWithDiscriminator's tensors (the importer drops them)."""

    def __init__(self) -> None:
        super().__init__()
        self.discriminator = nn.Module()
        self.discriminator.main = nn.Sequential(nn.Conv2d(3, 4, 4), nn.BatchNorm2d(4))
        self.perceptual_loss = nn.Module()
        self.perceptual_loss.lin0 = nn.Module()
        self.perceptual_loss.lin0.model = nn.Sequential(nn.Dropout(), nn.Conv2d(4, 1, 1))


class TVQModel(nn.Module):
    """VQModel / VQSegmentationModel / EMAVQ / GumbelVQ: encode, decode, forward."""

    def __init__(self, kind: str = "vq", dd: dict[str, Any] = DD, n_embed: int = N_EMBED,
                 embed_dim: int = EMBED_DIM, legacy: bool = True, old: bool = False,
                 loss: bool = True, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.encoder, self.decoder = TEncoder(**dd), TDecoder(**dd)
        if loss:
            self.loss = TLoss()
        if kind == "gumbel":
            self.quantize: nn.Module = TGumbel(dd["z_channels"], embed_dim, n_embed)
        else:
            self.quantize = TQuantizer2(n_embed, embed_dim, 0.25, legacy, old)
        self.quant_conv = nn.Conv2d(dd["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, dd["z_channels"], 1)
        if kind == "seg":
            self.register_buffer("colorize", torch.randn(3, dd["in_channels"], 1, 1))
        if kind == "ema":
            self.quantize.embedding.register_buffer("cluster_size", torch.rand(n_embed))
            self.quantize.embedding.register_buffer("embed_avg", torch.randn(n_embed, embed_dim))
        randomize(self)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        return self.quantize(self.quant_conv(self.encoder(x)))

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quant))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        quant, diff, _ = self.encode(x)
        return self.decode(quant), diff


def randomize(module: nn.Module) -> None:
    """Perturb every norm's affine parameters and every codebook so nothing is trivial."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.GroupNorm | nn.LayerNorm):
                m.weight.add_(0.2 * torch.randn_like(m.weight))
                m.bias.add_(0.2 * torch.randn_like(m.bias))
            elif isinstance(m, nn.Embedding):
                m.weight.normal_(0, 1)


class TSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, block_size: int) -> None:
        super().__init__()
        self.key, self.query, self.value, self.proj = (
            nn.Linear(n_embd, n_embd) for _ in range(4)
        )
        mask = torch.tril(torch.ones(block_size, block_size))
        self.register_buffer("mask", mask.view(1, 1, block_size, block_size))
        self.n_head = n_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        k = self.key(x).view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        q = self.query(x).view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        v = self.value(x).view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.mask[:, :, :t, :t] == 0, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).contiguous().view(b, t, c)
        return self.proj(y)


class TBlock(nn.Module):
    def __init__(self, n_embd: int, n_head: int, block_size: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attn = TSelfAttention(n_embd, n_head, block_size)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(),
                                 nn.Linear(4 * n_embd, n_embd), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TGPT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, n_layer: int = 2, n_head: int = 2,
                 n_embd: int = 16) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Parameter(0.1 * torch.randn(1, block_size, n_embd))
        self.drop = nn.Dropout(0.0)
        self.blocks = nn.Sequential(*[TBlock(n_embd, n_head, block_size) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.tok_emb(idx) + self.pos_emb[:, : idx.shape[1]])
        return self.head(self.ln_f(self.blocks(x)))


def subsample_idx(h: int, w: int) -> torch.Tensor:
    """taming's Subsample permuter: recursive 2×2 polyphase split."""
    c, idx = 1, np.arange(h * w).reshape(1, h, w)
    while min(h, w) > 1:
        idx = idx.reshape(c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3)
        idx = idx.reshape(c * 4, h // 2, w // 2)
        h, w, c = h // 2, w // 2, c * 4
    return torch.tensor(idx.ravel())


class TNet2Net(nn.Module):
    """Net2NetTransformer's modules and its logits computation."""

    def __init__(self, cond: nn.Module | None, block_size: int, permute: bool) -> None:
        super().__init__()
        self.first_stage_model = TVQModel(loss=False, seed=1)
        if cond is not None:
            self.cond_stage_model = cond
        torch.manual_seed(2)
        self.transformer = TGPT(N_EMBED, block_size)
        randomize(self.transformer)
        self.permuter = nn.Module()
        if permute:
            fwd = subsample_idx(4, 4)
            self.permuter.register_buffer("forward_shuffle_idx", fwd)
            self.permuter.register_buffer("backward_shuffle_idx", torch.argsort(fwd))

    def z_indices(self, x: torch.Tensor) -> torch.Tensor:
        idx = self.first_stage_model.encode(x)[2][2].view(x.shape[0], -1)
        if hasattr(self.permuter, "forward_shuffle_idx"):
            idx = idx[:, self.permuter.forward_shuffle_idx]
        return idx

    def logits(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        cz = torch.cat((c, z), dim=1)
        return self.transformer(cz[:, :-1])[:, c.shape[1] - 1 :]


# -----------------------------------------------------------------------------
# helpers


def vq_config(kind: str = "vq", dd: dict[str, Any] = DD, **extra: Any) -> dict[str, Any]:
    target = {"vq": "VQModel", "seg": "VQSegmentationModel", "ema": "EMAVQ",
              "gumbel": "GumbelVQ"}[kind]
    params: dict[str, Any] = {"embed_dim": EMBED_DIM, "n_embed": N_EMBED, "ddconfig": dd,
                              "lossconfig": {"target": "taming.modules.losses.vqperceptual."
                                             "VQLPIPSWithDiscriminator",
                                             "params": {"disc_start": 250001, "disc_weight": 0.8,
                                                        "codebook_weight": 1.0}}, **extra}
    if kind == "seg":
        params.update(n_labels=dd["in_channels"], image_key="segmentation")
        params["lossconfig"] = {"target": "taming.modules.losses.segmentation.BCELossWithQuant",
                                "params": {"codebook_weight": 1.0}}
    if kind == "gumbel":
        params.update(kl_weight=1e-8, temperature_scheduler_config={"target": "x.Sched"})
    return {"target": f"taming.models.vqgan.{target}", "params": params}


def write(tmp: Path, model: nn.Module, config: dict[str, Any],
          state: dict[str, torch.Tensor] | None = None) -> tuple[Path, Path]:
    ckpt, cfg = tmp / "model.ckpt", tmp / "config.yaml"
    sd = model.state_dict() if state is None else state
    torch.save({"state_dict": sd, "global_step": 1234, "epoch": 3}, ckpt)
    cfg.write_text(yaml.safe_dump({"model": config}), encoding="utf-8")
    return ckpt, cfg


def images(b: int = 2, c: int = 3, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, c, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture
def reg(registry: vqgen.Registry) -> vqgen.Registry:
    return registry


def load(run: Path, reg: vqgen.Registry) -> Pipeline:
    """``vqgen.load_run``, checked to restore the id layout taming needs."""
    meta = json.loads((run / "pipeline.json").read_text())
    pipe = vqgen.load_run(run, reg)
    assert pipe.cond_offset == meta["cond_offset"] or pipe.conditioner is None
    return pipe


# -----------------------------------------------------------------------------
# stage 1


@pytest.mark.parametrize(
    ("kind", "legacy", "old"),
    [("vq", True, False), ("vq", False, False), ("vq", True, True), ("ema", True, False)],
    ids=["legacy", "non_legacy", "old_quantizer", "emavq"],
)
@torch.no_grad()
def test_vqmodel_matches_taming(
    kind: str, legacy: bool, old: bool, tmp_path: Path, reg: vqgen.Registry
) -> None:
    ref = TVQModel(kind, legacy=legacy, old=old).eval()
    extra = {} if legacy else {"legacy": False}
    ckpt, cfg = write(tmp_path, ref, vq_config(kind, **extra))
    run = import_taming(ckpt, cfg, tmp_path / "run", reg)
    tok = load(run, reg).tokenizer
    assert type(tok).__name__ == "VQGAN" and tok.params.legacy_beta == legacy
    x = images()
    quant, qloss, (_, _, idx) = ref.encode(x)
    ours = tok.quantize_latents(x)
    assert torch.equal(ours.codes.reshape(-1), idx)
    assert torch.equal(tok.encode(x), idx.view(2, 4, 4))
    torch.testing.assert_close(ours.z_q, quant, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.loss, qloss, atol=ATOL, rtol=1e-5)  # β placement
    rec, _ = ref(x)
    torch.testing.assert_close(tok(x).recon, rec, atol=ATOL, rtol=0)
    torch.testing.assert_close(tok.decode(idx.view(2, 4, 4)), rec, atol=ATOL, rtol=0)
    meta = json.loads((run / "taming_import.json").read_text())
    dropped = [k for keys in meta["dropped"].values() for k in keys]
    assert all(k.startswith("loss.") or "embedding." in k for k in dropped)
    assert ("quantize.embedding.cluster_size" in dropped) == (kind == "ema")
    assert meta["loaded"] + len(dropped) == len(ref.state_dict())
    cfg_out = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg_out["train"]["tokenizer"]["steps"] == 1234
    assert cfg_out["tokenizer"]["params"]["disc_start"] == 250001


@torch.no_grad()
def test_segmentation_model_matches_taming(tmp_path: Path, reg: vqgen.Registry) -> None:
    dd = {**DD, "in_channels": 5, "out_ch": 5, "attn_resolutions": []}
    ref = TVQModel("seg", dd=dd).eval()
    ckpt, cfg = write(tmp_path, ref, vq_config("seg", dd=dd))
    tok = load(import_taming(ckpt, cfg, tmp_path / "run", reg), reg).tokenizer
    assert type(tok).__name__ == "VQGANSegmentation" and tok.params.n_labels == 5
    labels = torch.randint(0, 5, (2, 8, 8), generator=torch.Generator().manual_seed(0))
    onehot = F.one_hot(labels, 5).permute(0, 3, 1, 2).float()  # (2, 5, 8, 8), taming's input
    _, _, (_, _, idx) = ref.encode(onehot)
    assert torch.equal(tok.encode(labels).reshape(-1), idx)
    torch.testing.assert_close(tok(labels).recon, ref(onehot)[0], atol=ATOL, rtol=0)


@torch.no_grad()
def test_gumbel_vq(tmp_path: Path, reg: vqgen.Registry) -> None:
    dd = {**DD, "z_channels": EMBED_DIM}  # taming's GumbelVQ needs embed_dim == z_channels
    ref = TVQModel("gumbel", dd=dd).eval()
    ckpt, cfg = write(tmp_path, ref, vq_config("gumbel", dd=dd))
    tok = load(import_taming(ckpt, cfg, tmp_path / "run", reg), reg).tokenizer
    assert isinstance(tok, VQGANGumbel)
    x = images()
    quant, diff, (_, _, idx) = ref.encode(x)  # taming's computation without the noise
    assert torch.equal(tok.encode(x), idx)
    q = tok.quantize_latents(x)
    torch.testing.assert_close(q.z_q, quant, atol=ATOL, rtol=0)
    torch.testing.assert_close(q.loss, diff, atol=1e-12, rtol=1e-5)
    shape = (2, 4, 4, EMBED_DIM)
    rec = ref.decode(ref.quantize.get_codebook_entry(idx.reshape(-1), shape))
    torch.testing.assert_close(tok.decode(idx), rec, atol=ATOL, rtol=0)


def test_gumbel_tokenizer_keeps_the_component_contract() -> None:
    assert signature_problems(VQGANGumbel) == []
    tok = VQGANGumbel(ch=32, ch_mult=(1, 2), attn_resolutions=(), resolution=8,
                      z_channels=8, embed_dim=8, n_embed=16)
    out = tok.train()(images())  # training mode: straight-through Gumbel-softmax
    assert out.recon.shape == (2, 3, 8, 8) and out.codes.shape == (2, 4, 4)
    out.recon.mean().backward()
    assert tok.quantize.proj.weight.grad is not None


# -----------------------------------------------------------------------------
# Net2NetTransformer


def net2net_config(cond: dict[str, Any] | str, block_size: int, permute: bool,
                   **extra: Any) -> dict[str, Any]:
    first = vq_config()
    first["params"]["lossconfig"] = {"target": "taming.modules.losses.DummyLoss"}
    params: dict[str, Any] = {
        "transformer_config": {
            "target": "taming.modules.transformer.mingpt.GPT",
            "params": {"vocab_size": N_EMBED, "block_size": block_size, "n_layer": 2,
                       "n_head": 2, "n_embd": 16},
        },
        "first_stage_config": first,
        "cond_stage_config": cond,
        **extra,
    }
    if permute:
        params["permuter_config"] = {"target": "taming.modules.transformer.permuter.Subsample",
                                     "params": {"H": 4, "W": 4}}
    return {"target": "taming.models.cond_transformer.Net2NetTransformer", "params": params}


@torch.no_grad()
def test_unconditional_transformer(tmp_path: Path, reg: vqgen.Registry) -> None:
    ref = TNet2Net(None, block_size=16, permute=True).eval()
    cfg = net2net_config("__is_unconditional__", 16, True, sos_token=3)
    ckpt, cfgp = write(tmp_path, ref, cfg)
    run = import_taming(ckpt, cfgp, tmp_path / "run", reg)
    pipe = load(run, reg)
    assert pipe.grid == (4, 4) and type(pipe.ordering).__name__ == "Subsample"
    assert pipe.conditioner is None and pipe.prior.start_id == 3
    x = images()
    z = ref.z_indices(x)  # (2, 16), permuted
    seq, cond = pipe.tokens({"image": x})
    assert cond is None and torch.equal(seq, z)
    sos = torch.full((2, 1), 3, dtype=torch.long)
    torch.testing.assert_close(pipe.prior.logits(seq), ref.logits(z, sos), atol=ATOL, rtol=0)
    meta = json.loads((run / "taming_import.json").read_text())
    dropped = [k for keys in meta["dropped"].values() for k in keys]
    assert "permuter.forward_shuffle_idx" in dropped
    assert "transformer.blocks.1.attn.mask" in dropped
    cfg_out = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg_out["train"]["prior"]["steps"] == 1234
    assert cfg_out["train"]["tokenizer"]["steps"] == 0
    gen = pipe.generate(2, seed=0)
    assert gen.codes.shape == (2, 4, 4) and gen.images.shape == (2, 3, 8, 8)


@torch.no_grad()
def test_class_conditional_transformer(tmp_path: Path, reg: vqgen.Registry) -> None:
    ref = TNet2Net(None, block_size=16, permute=False).eval()
    cond = {"target": "taming.modules.util.Labelator", "params": {"n_classes": 10}}
    ckpt, cfgp = write(tmp_path, ref, net2net_config(cond, 16, False,
                                                     cond_stage_key="class_label"))
    pipe = load(import_taming(ckpt, cfgp, tmp_path / "run", reg), reg)
    assert type(pipe.conditioner).__name__ == "ClassConditioner"
    assert pipe.conditioner.null_id is None and pipe.cond_offset == 0
    x, y = images(), torch.tensor([7, 2])
    seq, c = pipe.tokens({"image": x, "label": y})
    assert torch.equal(c, y[:, None])  # no offset: ids share the image-code table
    torch.testing.assert_close(pipe.prior.logits(seq, c), ref.logits(ref.z_indices(x), y[:, None]),
                               atol=ATOL, rtol=0)
    assert pipe.generate(2, condition=[1, 2], seed=0).codes.shape == (2, 4, 4)


@torch.no_grad()
def test_segmentation_conditional_transformer(tmp_path: Path, reg: vqgen.Registry) -> None:
    dd = {**DD, "in_channels": 5, "out_ch": 5, "attn_resolutions": []}
    cond_ref = TVQModel("seg", dd=dd, n_embed=12, loss=False, seed=3)
    ref = TNet2Net(cond_ref, block_size=32, permute=False).eval()
    cond_cfg = vq_config("seg", dd=dd)
    cond_cfg["params"]["n_embed"] = 12
    ckpt, cfgp = write(tmp_path, ref, net2net_config(cond_cfg, 32, False,
                                                     cond_stage_key="segmentation"))
    run = import_taming(ckpt, cfgp, tmp_path / "run", reg)
    assert (run / "cond" / "weights.safetensors").is_file()
    cond_tok = load_component(run / "cond", reg)
    labels = torch.randint(0, 5, (2, 8, 8), generator=torch.Generator().manual_seed(1))
    onehot = F.one_hot(labels, 5).permute(0, 3, 1, 2).float()
    c_ref = cond_ref.encode(onehot)[2][2].view(2, -1)  # (2, 16) row-major, no permuter
    assert torch.equal(cond_tok.encode(labels).reshape(2, -1), c_ref)
    pipe = load(run, reg)
    x = images()
    seq, c = pipe.tokens({"image": x, "segmentation": labels})
    assert torch.equal(c, c_ref)
    torch.testing.assert_close(pipe.prior.logits(seq, c), ref.logits(ref.z_indices(x), c_ref),
                               atol=ATOL, rtol=0)


@torch.no_grad()
def test_imported_run_has_the_checkpoint_layout(tmp_path: Path, reg: vqgen.Registry) -> None:
    """Every stage is a finished checkpoint, at the step the config's train section gives."""
    dd = {**DD, "in_channels": 5, "out_ch": 5, "attn_resolutions": []}
    cond_ref = TVQModel("seg", dd=dd, n_embed=12, loss=False, seed=3)
    ref = TNet2Net(cond_ref, block_size=32, permute=True).eval()
    cond_cfg = vq_config("seg", dd=dd)
    cond_cfg["params"]["n_embed"] = 12
    ckpt, cfgp = write(tmp_path, ref, net2net_config(cond_cfg, 32, True,
                                                     cond_stage_key="segmentation"))
    run = import_taming(ckpt, cfgp, tmp_path / "run", reg)
    train = yaml.safe_load((run / CONFIG_FILE).read_text())["train"]
    assert set(STAGES) <= set(train) and train["prior"]["steps"] == 1234
    for stage in STAGES:
        folder, step = run / stage, train[stage]["steps"]
        name = f"step_{step:06d}"
        unit = (folder / HISTORY_DIR / name).resolve()
        assert (folder / CURRENT).is_symlink()
        assert (folder / CURRENT).readlink() == Path(HISTORY_DIR) / name
        assert sorted(p.name for p in (folder / HISTORY_DIR).iterdir()) == [name]
        assert json.loads((folder / META_FILE).read_text())["step"] == step
        assert (folder / WEIGHTS_FILE).resolve() == unit / WEIGHTS_FILE
        assert not (folder / STATE_FILE).exists() and not (unit / STATE_FILE).exists()
        assert not (folder / BEST_DIR).exists()
    pipe = load(run, reg)
    sd = ref.state_dict()  # the loaded weights are taming's, bit for bit
    for prefix, module in (("first_stage_model.", pipe.tokenizer), ("transformer.", pipe.prior),
                           ("cond_stage_model.", pipe.conditioner.tokenizer)):
        for key, value in module.state_dict().items():
            assert torch.equal(value, sd[prefix + key]), prefix + key
    labels = torch.randint(0, 5, (2, 8, 8), generator=torch.Generator().manual_seed(1))
    onehot = F.one_hot(labels, 5).permute(0, 3, 1, 2).float()
    c_ref = cond_ref.encode(onehot)[2][2].view(2, -1)  # (2, 16) row-major, no permuter
    x = images()
    seq, c = pipe.tokens({"image": x, "segmentation": labels})
    assert torch.equal(seq, ref.z_indices(x)) and torch.equal(c, c_ref)
    torch.testing.assert_close(pipe.prior.logits(seq, c), ref.logits(seq, c_ref),
                               atol=ATOL, rtol=0)
    first = pipe.generate(2, condition={"segmentation": labels}, seed=0)
    again = load(run, reg).generate(2, condition={"segmentation": labels}, seed=0)
    assert first.codes.shape == (2, 4, 4) and first.images.shape == (2, 3, 8, 8)
    assert torch.equal(first.codes, again.codes) and torch.equal(first.images, again.images)


@torch.no_grad()
def test_depth_conditional_transformer(tmp_path: Path, reg: vqgen.Registry) -> None:
    dd = {**DD, "in_channels": 1, "out_ch": 1, "attn_resolutions": []}
    cond_ref = TVQModel("vq", dd=dd, loss=False, seed=4)
    ref = TNet2Net(cond_ref, block_size=32, permute=False).eval()
    ckpt, cfgp = write(tmp_path, ref, net2net_config(vq_config(dd=dd), 32, False,
                                                     cond_stage_key="depth"))
    pipe = load(import_taming(ckpt, cfgp, tmp_path / "run", reg), reg)
    assert type(pipe.conditioner).__name__ == "DepthConditioner"
    depth = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    depth = (depth - depth.amin((1, 2, 3), True)) / (
        depth.amax((1, 2, 3), True) - depth.amin((1, 2, 3), True))  # exactly [0, 1]
    c_ref = cond_ref.encode(depth * 2 - 1)[2][2].view(2, -1)  # taming's depth is in [-1, 1]
    x = images()
    seq, c = pipe.tokens({"image": x, "depth": depth})
    assert torch.equal(c, c_ref)
    torch.testing.assert_close(pipe.prior.logits(seq, c), ref.logits(ref.z_indices(x), c_ref),
                               atol=ATOL, rtol=0)


# -----------------------------------------------------------------------------
# strictness and errors


def test_unexpected_and_missing_tensors_are_named(tmp_path: Path, reg: vqgen.Registry) -> None:
    ref = TVQModel()
    sd = dict(ref.state_dict())
    sd["encoder.mid.extra.weight"] = torch.zeros(3)
    ckpt, cfg = write(tmp_path, ref, vq_config(), sd)
    with pytest.raises(VqgenError, match=r"unexpected tensor 'encoder\.mid\.extra\.weight'"):
        import_taming(ckpt, cfg, tmp_path / "a", reg)
    sd = dict(ref.state_dict())
    del sd["decoder.conv_out.bias"]
    ckpt, cfg = write(tmp_path, ref, vq_config(), sd)
    with pytest.raises(VqgenError, match=r"missing tensor 'decoder\.conv_out\.bias'") as err:
        import_taming(ckpt, cfg, tmp_path / "b", reg)
    assert str(ckpt) in str(err.value)
    sd = dict(ref.state_dict())
    sd["mystery"] = torch.zeros(1)
    ckpt, cfg = write(tmp_path, ref, vq_config(), sd)
    with pytest.raises(VqgenError, match=r"unexpected tensor 'mystery'"):
        import_taming(ckpt, cfg, tmp_path / "c", reg)
    ckpt, cfg = write(tmp_path, ref, vq_config(embed_dim=4))
    shape_error = r"quant_conv\.weight' has shape \(8, 8, 1, 1\) .* needs \(8, 4, 1, 1\)"
    with pytest.raises(VqgenError, match=shape_error):
        import_taming(ckpt, cfg, tmp_path / "d", reg)
    assert not (tmp_path / "d" / "config.yaml").exists()


def test_pickled_checkpoint_gives_a_clear_error(tmp_path: Path, reg: vqgen.Registry) -> None:
    ref = TVQModel(loss=False)
    ckpt, cfg = write(tmp_path, ref, vq_config())
    torch.save({"state_dict": ref.state_dict(), "hparams": argparse.Namespace(lr=1.0)}, ckpt)
    with pytest.raises(VqgenError, match=r"weights_only=True.*re-save just its weights") as err:
        import_taming(ckpt, cfg, tmp_path / "run", reg)
    assert str(ckpt) in str(err.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"cond_stage_config": {"target": "taming.modules.misc.coord.CoordStage",
                                "params": {"n_embed": 16, "down_factor": 2}}},
         "no coordinate conditioner"),
        ({"cond_stage_config": "__is_first_stage__"}, "__is_first_stage__"),
        ({"permuter_config": {"target": "taming.modules.transformer.permuter.Random",
                              "params": {"H": 4, "W": 4}}}, "Random"),
    ],
    ids=["coord", "first_stage", "random_permuter"],
)
def test_unsupported_transformers_are_refused(
    change: dict[str, Any], message: str, tmp_path: Path, reg: vqgen.Registry
) -> None:
    ref = TNet2Net(None, block_size=16, permute=False)
    cfg = net2net_config("__is_unconditional__", 16, False)
    cfg["params"].update(change)
    ckpt, cfgp = write(tmp_path, ref, cfg)
    with pytest.raises(VqgenError, match=message):
        import_taming(ckpt, cfgp, tmp_path / "run", reg)


def test_bad_inputs(tmp_path: Path, reg: vqgen.Registry) -> None:
    ref = TVQModel(loss=False)
    ckpt, cfg = write(tmp_path, ref, {**vq_config(), "target": "taming.models.vqgan.Foo"})
    with pytest.raises(VqgenError, match=r"vqgen imports VQModel"):
        import_taming(ckpt, cfg, tmp_path / "a", reg)
    ckpt, cfg = write(tmp_path, ref, vq_config(dd={**DD, "double_z": True}))
    with pytest.raises(VqgenError, match=r"double_z"):
        import_taming(ckpt, cfg, tmp_path / "b", reg)
    ckpt, cfg = write(tmp_path, ref, vq_config())
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(VqgenError, match=r"not an empty directory"):
        import_taming(ckpt, cfg, tmp_path / "full", reg)


def test_cli_import_then_sample(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vqgen.cli import main

    ref = TNet2Net(None, block_size=16, permute=True).eval()
    ckpt, cfgp = write(tmp_path, ref, net2net_config("__is_unconditional__", 16, True,
                                                     sos_token=3))
    run = tmp_path / "run"
    assert main(["import", "taming", str(ckpt), "--config", str(cfgp), "-o", str(run)]) == 0
    assert f"vqgen sample {run}" in capsys.readouterr().out
    out = tmp_path / "grid.png"
    assert main(["sample", str(run), "--n", "2", "-o", str(out)]) == 0
    assert out.is_file()
    # a second import into the same directory is refused; nothing is overwritten
    before = (run / "prior" / "weights.safetensors").stat().st_mtime_ns
    assert main(["import", "taming", str(ckpt), "--config", str(cfgp), "-o", str(run)]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert (run / "prior" / "weights.safetensors").stat().st_mtime_ns == before
