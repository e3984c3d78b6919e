"""VQGAN: architecture, quantizer, losses (tiny models, CPU, seeded)."""

from __future__ import annotations

import urllib.error
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from vqgen.core.errors import VqgenError
from vqgen.core.interfaces import signature_problems
from vqgen.plugins.vqgan import VQGAN, VectorQuantizer, VQGANSegmentation
from vqgen.plugins.vqgan.losses import (
    NLayerDiscriminator,
    VQGANLoss,
    adaptive_weight,
    discriminator_loss_fn,
    load_lpips,
)
from vqgen.plugins.vqgan.model import AttnBlock

TINY: dict[str, Any] = {
    "ch": 8, "ch_mult": (1, 2), "norm_groups": 4, "z_channels": 4, "embed_dim": 4,
    "n_embed": 16, "resolution": 16, "perceptual_weight": 0.0,
}
PLAIN = {"codebook_dim": 0, "l2_normalize": False, "kmeans_init": False, "restart_after": 0}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread (and never stall on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(**overrides: Any) -> VQGAN:
    torch.manual_seed(0)
    return VQGAN(**{**TINY, **overrides})


def images(b: int, h: int, w: int, c: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, h, w, generator=g) * 2 - 1


def test_constructors_take_exactly_their_params() -> None:
    assert signature_problems(VQGAN) == []
    assert signature_problems(VQGANSegmentation) == []


@pytest.mark.parametrize(
    ("ch_mult", "size"),
    [((1,), (8, 8)), ((1, 2), (16, 16)), ((1, 2, 2), (32, 32)), ((1, 1, 2), (16, 24)),
     ((1, 2, 2, 4), (16, 32))],
)
def test_shapes_and_dtypes(ch_mult: tuple[int, ...], size: tuple[int, int]) -> None:
    tok = tiny(ch_mult=ch_mult, attn_resolutions=(8,)).eval()
    f = 2 ** (len(ch_mult) - 1)
    assert tok.downsample == f and tok.vocab_size == 16 and tok.in_channels == 3
    h, w = size
    x = images(2, h, w)
    codes = tok.encode(x)
    assert codes.shape == (2, h // f, w // f) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < 16
    y = tok.decode(codes)
    assert y.shape == (2, 3, h, w) and y.dtype == torch.float32
    out = tok(x)
    assert out.recon.shape == x.shape and out.codes.shape == codes.shape
    assert out.qloss.shape == () and 0 < float(out.usage) <= 1


def test_size_not_divisible_by_f_is_an_error() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        tiny(ch_mult=(1, 2, 2)).encode(images(1, 18, 16))


@pytest.mark.parametrize("quantizer", [{}, PLAIN], ids=["default", "plain"])
def test_decode_of_codes_equals_decode_of_quantized_latents(quantizer: dict[str, Any]) -> None:
    tok = tiny(**quantizer)
    x = images(4, 16, 16)
    tok.train()
    for _ in range(3):  # k-means init and restarts run in training forwards
        tok(x)
    tok.eval()
    with torch.no_grad():
        out = tok(x)
        codes = tok.encode(x)
        assert torch.equal(codes, out.codes)
        assert torch.equal(tok.decode(codes), out.recon)


def test_straight_through_gradient_reaches_the_encoder() -> None:
    tok = tiny(**PLAIN)
    x = images(2, 16, 16)
    out = tok(x)
    out.recon.square().mean().backward()  # the reconstruction term alone
    for name in ("encoder.conv_in.weight", "encoder.conv_out.weight", "quant_conv.weight"):
        grad = tok.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert tok.quantize.embedding.weight.grad is None  # codes learn from the VQ loss only


def test_straight_through_with_projection_and_l2() -> None:
    tok = tiny()
    out = tok(images(2, 16, 16))
    out.recon.mean().backward()
    assert tok.encoder.conv_in.weight.grad.abs().sum() > 0
    assert tok.quantize.proj_in.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("legacy", [False, True])
def test_quantizer_loss_and_gradients_follow_taming(legacy: bool) -> None:
    torch.manual_seed(0)
    q = VectorQuantizer(8, 3, beta=0.25, legacy_beta=legacy)
    z = torch.randn(2, 3, 4, 5, requires_grad=True)
    out = q(z)
    zf = z.detach().permute(0, 2, 3, 1).reshape(-1, 3)  # (N, 3)
    e = q.embedding.weight.detach()
    idx = torch.cdist(zf, e).argmin(1)
    assert torch.equal(out.codes.reshape(-1), idx)
    mse = (e[idx] - zf).square().mean()
    assert torch.allclose(out.loss, 1.25 * mse)
    # value of the quantized latents is exactly the code vectors
    assert torch.equal(out.z_q.permute(0, 2, 3, 1).reshape(-1, 3), e[idx])
    out.loss.backward()
    n = zf.numel()
    w_commit, w_code = (1.0, 0.25) if legacy else (0.25, 1.0)
    expected_z = w_commit * 2 * (zf - e[idx]) / n
    assert torch.allclose(z.grad.permute(0, 2, 3, 1).reshape(-1, 3), expected_z, atol=1e-7)
    expected_e = torch.zeros_like(e).index_add_(0, idx, w_code * 2 * (e[idx] - zf) / n)
    assert torch.allclose(q.embedding.weight.grad, expected_e, atol=1e-7)


def test_attention_block_matches_the_reference_formula() -> None:
    torch.manual_seed(0)
    blk = AttnBlock(8, groups=4, backend="sdpa").eval()
    x = torch.randn(2, 8, 3, 5)
    h = blk.norm(x)
    q, k, v = (m(h).flatten(2) for m in (blk.q, blk.k, blk.v))  # (B, C, HW)
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * 8**-0.5, dim=2)  # (B, HW, HW)
    ref = x + blk.proj_out(torch.einsum("bij,bcj->bci", w, v).reshape(2, 8, 3, 5))
    assert torch.allclose(blk(x), ref, atol=1e-5)


def test_parameter_names_map_onto_taming() -> None:
    tok = tiny(**PLAIN, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(8,))
    keys = set(tok.state_dict())
    expected = {
        "encoder.conv_in.weight",
        "encoder.down.0.block.1.conv2.weight",
        "encoder.down.0.downsample.conv.weight",
        "encoder.down.1.block.0.nin_shortcut.weight",
        "encoder.down.1.attn.1.proj_out.weight",
        "encoder.mid.block_1.norm1.weight",
        "encoder.mid.attn_1.q.weight",
        "encoder.mid.block_2.conv2.bias",
        "encoder.norm_out.weight",
        "encoder.conv_out.weight",
        "quant_conv.weight",
        "quantize.embedding.weight",
        "post_quant_conv.weight",
        "decoder.conv_in.weight",
        "decoder.mid.attn_1.k.weight",
        "decoder.up.0.block.2.conv1.weight",
        "decoder.up.0.block.0.nin_shortcut.weight",
        "decoder.up.1.upsample.conv.weight",
        "decoder.up.1.attn.2.v.weight",
        "decoder.norm_out.bias",
        "decoder.conv_out.weight",
    }
    assert expected <= keys
    assert not any("proj_in" in k or "downsample" in k and "down.1" in k for k in keys)
    assert not any(k.startswith("decoder.up.0.upsample") for k in keys)
    assert tok.quantize.embedding.weight.shape == (16, 4)
    gn = tok.encoder.norm_out
    assert gn.eps == 1e-6 and gn.num_groups == 4 and gn.affine


def test_loaded_codebook_is_not_reinitialised() -> None:
    a, b = tiny(), tiny()
    b.load_state_dict(a.state_dict())
    assert bool(b.quantize.initialized)
    b.train()
    b(images(8, 16, 16))  # would k-means-initialise a fresh codebook
    assert torch.equal(a.quantize.embedding.weight, b.quantize.embedding.weight)


def test_kmeans_init_and_restarts_use_the_codebook() -> None:
    torch.manual_seed(0)
    q = VectorQuantizer(16, 4, codebook_dim=4, l2_normalize=True, kmeans_init=True,
                        restart_after=2).train()
    z = torch.randn(4, 4, 4, 4)  # 64 vectors = 4 × n_embed: initialises on the first call
    out = q(z)
    assert out.restarted == 16 and bool(q.initialized)
    assert torch.allclose(q.embedding.weight.norm(dim=1), torch.ones(16), atol=1e-5)
    # a batch that hits one code: the others are restarted after `restart_after` steps,
    # onto the batch's own (code-space) vectors
    same = torch.ones(2, 4, 2, 2)
    outs = [q(same) for _ in range(3)]
    assert [o.restarted for o in outs] == [0, 0, 15]
    target = F.normalize(q.proj_in(torch.ones(1, 4)), dim=1)  # (1, 4)
    moved = torch.arange(16) != outs[0].codes[0, 0, 0]
    assert torch.allclose(q.codebook()[moved], target.expand(15, -1), atol=1e-6)


def test_segmentation_variant_shapes_and_labels() -> None:
    torch.manual_seed(0)
    tok = VQGANSegmentation(**{k: v for k, v in TINY.items() if k != "perceptual_weight"},
                            n_labels=5).eval()
    labels = torch.randint(0, 5, (2, 16, 16))
    codes = tok.encode(labels)
    assert codes.shape == (2, 8, 8)
    assert torch.equal(codes, tok.encode(F.one_hot(labels, 5).permute(0, 3, 1, 2).float()))
    assert tok.decode(codes).shape == (2, 5, 16, 16)
    assert tok.labels(codes).dtype == torch.int64
    assert tok.to_rgb(tok.decode(codes)).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="n_labels"):
        tok.encode(torch.full((1, 16, 16), 7))


def test_segmentation_vqgan_lowers_its_cross_entropy() -> None:
    torch.manual_seed(0)
    tok = VQGANSegmentation(**{k: v for k, v in TINY.items() if k != "perceptual_weight"},
                            n_labels=5, **PLAIN)
    loss_fn = tok.build_loss()
    assert loss_fn.discriminator is None
    g = torch.Generator().manual_seed(1)
    labels = torch.zeros(8, 16, 16, dtype=torch.int64)
    for i in range(8):  # a square of class i % 4 + 1 on background
        y, x = torch.randint(0, 8, (2,), generator=g).tolist()
        labels[i, y : y + 8, x : x + 8] = i % 4 + 1
    opt = torch.optim.Adam(tok.parameters(), 2e-3, betas=(0.5, 0.9))
    ces = []
    for step in range(30):
        x = tok.prepare_input(labels)
        loss, logs = loss_fn.generator_loss(x, tok(x), step, tok.last_layer)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ces.append(float(logs["ce"]))
    assert ces[-1] < 0.5 * ces[0]


def test_one_channel_vqgan() -> None:
    tok = tiny(in_channels=1).eval()
    x = images(2, 16, 16, c=1)
    assert tok.decode(tok.encode(x)).shape == (2, 1, 16, 16)


# -- losses -------------------------------------------------------------------
def test_adaptive_weight_matches_a_hand_computation() -> None:
    tok = tiny(**PLAIN)
    torch.manual_seed(1)
    disc = NLayerDiscriminator(3, ndf=8, n_layers=2)
    x = images(2, 16, 16)
    recon = tok(x).recon
    rec_loss = (x - recon).abs().mean()
    gan_loss = -disc(recon).mean()
    lam = adaptive_weight(rec_loss, gan_loss, tok.last_layer, disc_weight=0.8)

    tok.zero_grad()
    rec_loss.backward(retain_graph=True)
    g_rec = tok.last_layer.grad.clone()
    tok.zero_grad()
    gan_loss.backward(retain_graph=True)
    g_gan = tok.last_layer.grad.clone()
    expected = 0.8 * min(max(g_rec.norm() / (g_gan.norm() + 1e-4), 0.0), 1e4)
    assert torch.allclose(lam, torch.as_tensor(expected), rtol=1e-5)
    assert not lam.requires_grad


def test_generator_loss_uses_lambda_after_disc_start_only() -> None:
    tok = tiny(**PLAIN)
    loss_fn = VQGANLoss(in_channels=3, perceptual_weight=0.0, disc_start=5, disc_weight=0.8,
                        disc_n_layers=2, disc_ch=8)
    x = images(2, 16, 16)
    out = tok(x)
    _, before = loss_fn.generator_loss(x, out, 4, tok.last_layer)
    assert float(before["lambda"]) == 0.0 and float(before["g"]) == 0.0
    loss, after = loss_fn.generator_loss(x, out, 5, tok.last_layer)
    assert float(after["lambda"]) > 0
    expected = after["nll"] + after["lambda"] * after["g"] + after["codebook"]
    assert torch.allclose(loss.detach(), expected)
    loss.backward()
    assert all(p.grad is None for p in loss_fn.discriminator.parameters())


@pytest.mark.parametrize("rec_loss", ["l1", "l2"])
def test_reconstruction_loss_is_l1_or_l2(rec_loss: str) -> None:
    tok = tiny(**PLAIN, rec_loss=rec_loss)
    loss_fn = tok.build_loss()
    x = images(2, 16, 16)
    out = tok(x)
    _, logs = loss_fn.generator_loss(x, out, 0, tok.last_layer)
    diff = x - out.recon.detach()
    expected = diff.abs().mean() if rec_loss == "l1" else diff.square().mean()
    assert torch.allclose(logs["rec"], expected)
    assert torch.allclose(logs["loss"], expected + out.qloss.detach())
    with pytest.raises(ValidationError, match="rec_loss"):
        VQGAN.Params(**TINY, rec_loss="l3")


def test_discriminator_losses() -> None:
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    assert torch.isclose(discriminator_loss_fn("hinge", real, fake), torch.tensor(0.5))
    vanilla = 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())
    assert torch.isclose(discriminator_loss_fn("vanilla", real, fake), vanilla)


def test_lpips_random_backbone_loads_offline_and_is_frozen() -> None:
    lp = load_lpips(pretrained_backbone=False)
    assert not any(p.requires_grad for p in lp.parameters())
    assert not lp.training
    tok = tiny(perceptual_weight=1.0, pretrained_backbone=False)
    loss_fn = tok.build_loss()
    assert loss_fn.perceptual is not None
    assert not any(k.startswith(("perceptual", "net.", "lin")) for k in tok.state_dict())
    x = images(2, 16, 16)
    _, logs = loss_fn.train().generator_loss(x, tok(x), 0, tok.last_layer)
    assert float(logs["perceptual"]) > 0 and not loss_fn.perceptual.training


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub cache, and no network: a download attempt fails at once."""
    from vqgen.plugins.vqgan import losses

    def offline(*args: Any, **kwargs: Any) -> None:
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    return tmp_path / "hub" / "checkpoints" / losses.VGG16_FILE


def test_lpips_download_failure_names_both_ways_out(torch_home: Path) -> None:
    with pytest.raises(VqgenError) as info:
        tiny(perceptual_weight=1.0, pretrained_backbone=True).build_loss()
    msg = str(info.value)
    assert "pretrained_backbone: false" in msg and "perceptual_weight: 0" in msg
    assert str(torch_home) in msg and "sha256sum" in msg and "397923af" in msg


class _Planted:
    """A pickle that runs code when it is loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (Path.write_text, (self.marker, "ran"))


def test_a_planted_pickle_in_the_hub_cache_is_never_run(torch_home: Path,
                                                        tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"features.0.weight": _Planted(marker)}, torch_home)
    with pytest.raises(VqgenError, match=r"is not torchvision's VGG16 file \(SHA-256"):
        load_lpips(pretrained_backbone=True)
    assert not marker.exists() and torch_home.is_file()  # not run, left for the user


def test_a_vgg16_file_with_the_published_hash_loads_into_the_trunk(
    torch_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vqgen.plugins.vqgan import losses

    random_trunk = load_lpips(pretrained_backbone=False).net.state_dict()
    fake = {f"features.{k.split('.', 1)[1]}": torch.randn_like(v)
            for k, v in random_trunk.items()}
    torch.save(fake, torch_home)
    monkeypatch.setattr(losses, "VGG16_SHA256_PREFIX", losses._sha256(torch_home)[:8])
    net = load_lpips(pretrained_backbone=True).net.state_dict()
    assert all(torch.equal(net[k], fake[f"features.{k.split('.', 1)[1]}"]) for k in net)


def test_invalid_norm_groups_is_a_params_error() -> None:
    with pytest.raises(ValueError, match="norm_groups"):
        VQGAN.Params(ch=12, norm_groups=8)
