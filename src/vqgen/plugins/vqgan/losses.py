"""VQGAN training losses: L1 (or L2) + LPIPS reconstruction, PatchGAN with an adaptive weight.

The generator objective (Esser et al. 2021, eq. 5–7) is ::

    L = L_rec + λ · L_GAN + codebook_weight · L_VQ
    L_rec = |x − x̂|₁ + perceptual_weight · LPIPS(x, x̂)
    λ = disc_weight · clamp(‖∇_GL L_rec‖ / (‖∇_GL L_GAN‖ + 1e-4), 0, 1e4)

with ∇_GL the gradient at the decoder's last layer. Before ``disc_start`` the
discriminator is not run at all: λ = 0 and its parameters (and BatchNorm
statistics) stay untouched. The discriminator is taming's ``NLayerDiscriminator``
(pix2pix PatchGAN: 4×4 convs, BatchNorm, LeakyReLU 0.2). Loss ``hinge``
(default): D minimises ½(E[relu(1 − D(x))] + E[relu(1 + D(x̂))]), G minimises
−E[D(x̂)] (as taming); ``vanilla``: D minimises ½(E[softplus(−D(x))] +
E[softplus(D(x̂))]), G the non-saturating E[softplus(−D(x̂))].

LPIPS comes from the ``lpips`` package (VGG16 trunk, its own linear weights).
Its parameters are frozen and it lives in the loss module, never in the
tokenizer's weights; the trainer saves only the discriminator.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vqgen.core.errors import VqgenError

__all__ = [
    "NLayerDiscriminator",
    "SegmentationLoss",
    "VQGANLoss",
    "adaptive_weight",
    "discriminator_loss_fn",
    "generator_gan_loss",
    "load_lpips",
]


# -----------------------------------------------------------------------------
# perceptual loss


#: torchvision's ImageNet VGG16 file; its name carries the first hex digits of its SHA-256
VGG16_FILE = "vgg16-397923af.pth"
VGG16_URL = "https://download.pytorch.org/models/" + VGG16_FILE
VGG16_SHA256_PREFIX = "397923af"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _vgg16_weights() -> dict[str, torch.Tensor]:
    """torchvision's ImageNet VGG16 state dict, checked against its published hash and read
    with ``torch.load(weights_only=True)`` (never unpickled otherwise). Downloaded into
    ``$TORCH_HOME/hub/checkpoints`` when missing and the network allows."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE
    how = (f"put torchvision's {VGG16_FILE} there (from {VGG16_URL}; check it with "
           f"`sha256sum {VGG16_FILE}`: the digest must start with {VGG16_SHA256_PREFIX})")
    if not path.is_file():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(VGG16_URL, str(path),
                                           hash_prefix=VGG16_SHA256_PREFIX, progress=False)
        except Exception as err:  # offline, refused, a bad download
            raise VqgenError(f"{path} is missing and could not be downloaded "
                             f"({type(err).__name__}: {err}); {how}") from None
    digest = _sha256(path)
    if not digest.startswith(VGG16_SHA256_PREFIX):
        raise VqgenError(f"{path} is not torchvision's VGG16 file (SHA-256 {digest[:16]}…); "
                         f"it was not loaded. Delete it and {how}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise VqgenError(f"{path} could not be read as weights ({type(err).__name__}: {err}); "
                         f"delete it and {how}") from None
    return state  # type: ignore[no-any-return]


def load_lpips(pretrained_backbone: bool = True) -> nn.Module:
    """``lpips.LPIPS`` with the VGG16 trunk, frozen and in eval mode.

    LPIPS' own linear layers always load (they ship with the package). The VGG16
    trunk is torchvision's ImageNet one when ``pretrained_backbone`` (read from
    ``$TORCH_HOME/hub/checkpoints``, fetched there on first use, and checked against its
    published SHA-256 before it is read), random otherwise. Every file is read with
    ``torch.load(weights_only=True)``. A failure to obtain the weights is a
    :class:`VqgenError` that names the file, how to check it, and both ways out.
    """
    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's `pretrained=` deprecation notes
        # a random trunk and no linear weights: nothing is fetched or unpickled here
        model = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)
    lin_file = Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"
    lin = torch.load(lin_file, map_location="cpu", weights_only=True)
    _load_exact(model, lin, lin_file)
    if pretrained_backbone:
        try:
            vgg = _vgg16_weights()
        except VqgenError as err:
            raise VqgenError(
                f"could not load the ImageNet-pretrained VGG16 backbone of the LPIPS "
                f"perceptual loss: {err}. Or set the tokenizer param `pretrained_backbone: "
                "false` (random VGG backbone; LPIPS' own linear weights still load) or "
                "`perceptual_weight: 0` (no perceptual loss)"
            ) from None
        trunk = {}  # lpips keeps features[i] as net.slice<k>.<i>
        for name in model.net.state_dict():
            index_and_leaf = name.split(".", 1)[1]  # "<i>.weight"
            trunk[name] = vgg[f"features.{index_and_leaf}"]
        _load_exact(model.net, trunk, Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE)
    model.eval()
    model.requires_grad_(False)
    return model


def _load_exact(module: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Load ``state`` into ``module``: every tensor of ``state`` used, shapes equal."""
    own = module.state_dict()
    bad = [k for k in state if k not in own or own[k].shape != state[k].shape]
    if bad:
        raise VqgenError(f"{source} does not match LPIPS-VGG: {', '.join(bad[:5])}")
    module.load_state_dict(state, strict=False)


# -----------------------------------------------------------------------------
# discriminator


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix / taming): ``[B, C, H, W] → [B, 1, H', W']`` logits."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        kw, pad = 4, 1
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, ndf, kw, stride=2, padding=pad),
            nn.LeakyReLU(0.2, True),
        ]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, kw, stride=2, padding=pad, bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [
            nn.Conv2d(ndf * prev, ndf * mult, kw, stride=1, padding=pad, bias=False),
            nn.BatchNorm2d(ndf * mult),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * mult, 1, kw, stride=1, padding=pad),
        ]
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)  # (B, 1, H', W')


def _init_weights(m: nn.Module) -> None:
    """taming's ``weights_init``: conv N(0, 0.02); BatchNorm weight N(1, 0.02), bias 0."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def discriminator_loss_fn(
    kind: str, logits_real: torch.Tensor, logits_fake: torch.Tensor
) -> torch.Tensor:
    """The discriminator's loss, ``hinge`` or ``vanilla`` (see the module docstring)."""
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def generator_gan_loss(kind: str, logits_fake: torch.Tensor) -> torch.Tensor:
    """The generator's adversarial loss: −E[D(x̂)] (hinge) or E[softplus(−D(x̂))] (vanilla)."""
    if kind == "hinge":
        return -logits_fake.mean()
    return F.softplus(-logits_fake).mean()


def adaptive_weight(
    rec_loss: torch.Tensor,
    gan_loss: torch.Tensor,
    last_layer: torch.Tensor,
    disc_weight: float = 1.0,
) -> torch.Tensor:
    """``disc_weight · clamp(‖∇_GL rec_loss‖ / (‖∇_GL gan_loss‖ + 1e-4), 0, 1e4)``, detached."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    lam = torch.linalg.vector_norm(g_rec) / (torch.linalg.vector_norm(g_gan) + 1e-4)
    return lam.clamp(0.0, 1e4).detach() * disc_weight


# -----------------------------------------------------------------------------
# loss modules (built by the trainer from the tokenizer's params)


class VQGANLoss(nn.Module):
    """The VQGAN objective for images: generator side and discriminator side.

    ``generator_loss(x, out, step, last_layer)`` and ``discriminator_loss(x, recon,
    step)`` return ``(loss, logs)`` with ``logs`` a dict of detached scalars.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        codebook_weight: float = 1.0,
        rec_loss: str = "l1",
        perceptual_weight: float = 1.0,
        pretrained_backbone: bool = True,
        disc_start: int = 0,
        disc_weight: float = 0.8,
        disc_loss: str = "hinge",
        disc_n_layers: int = 3,
        disc_ch: int = 64,
    ) -> None:
        super().__init__()
        if rec_loss not in ("l1", "l2"):
            raise VqgenError(f"rec_loss must be 'l1' or 'l2', got {rec_loss!r}")
        self.codebook_weight, self.rec_loss = codebook_weight, rec_loss
        self.perceptual_weight = perceptual_weight
        self.disc_start, self.disc_weight, self.disc_kind = disc_start, disc_weight, disc_loss
        self.perceptual: nn.Module | None = None
        if perceptual_weight > 0:
            if in_channels not in (1, 3):
                raise VqgenError(
                    f"the LPIPS perceptual loss needs 1- or 3-channel images, but the "
                    f"tokenizer has in_channels={in_channels}; set `perceptual_weight: 0`"
                )
            self.perceptual = load_lpips(pretrained_backbone)
        self.discriminator: nn.Module | None = None
        if disc_weight > 0:
            self.discriminator = NLayerDiscriminator(in_channels, disc_ch, disc_n_layers)

    def train(self, mode: bool = True) -> VQGANLoss:
        super().train(mode)
        if self.perceptual is not None:
            self.perceptual.eval()  # LPIPS' dropout stays off
        return self

    def disc_active(self, step: int) -> bool:
        """Whether the discriminator takes part at optimizer step ``step``."""
        return self.discriminator is not None and step >= self.disc_start

    def perceptual_loss(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """Mean LPIPS distance (1-channel inputs are repeated to RGB)."""
        assert self.perceptual is not None
        if x.shape[1] == 1:
            x, recon = x.expand(-1, 3, -1, -1), recon.expand(-1, 3, -1, -1)
        return self.perceptual(x.contiguous(), recon.contiguous()).mean()

    def generator_loss(
        self, x: torch.Tensor, out: Any, step: int, last_layer: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Reconstruction + λ·GAN + codebook loss for the tokenizer's output ``out``."""
        recon = out.recon  # (B, C, H, W)
        diff = x - recon  # (B, C, H, W)
        rec = diff.abs().mean() if self.rec_loss == "l1" else diff.square().mean()
        zero = rec.new_zeros(())
        p_loss = self.perceptual_loss(x, recon) if self.perceptual is not None else zero
        nll = rec + self.perceptual_weight * p_loss
        g_loss, lam = zero, zero
        if self.disc_active(step):
            disc = self.discriminator
            assert disc is not None
            disc.requires_grad_(False)  # gradients flow through D to x̂, not into D
            try:
                g_loss = generator_gan_loss(self.disc_kind, disc(recon.contiguous()))
            finally:
                disc.requires_grad_(True)
            if torch.is_grad_enabled() and last_layer.requires_grad:
                lam = adaptive_weight(nll, g_loss, last_layer, self.disc_weight)
        loss = nll + lam * g_loss + self.codebook_weight * out.qloss
        logs = {
            "loss": loss, "rec": rec, "perceptual": p_loss, "nll": nll,
            "codebook": out.qloss, "g": g_loss, "lambda": lam,
        }
        return loss, {k: v.detach() for k, v in logs.items()}

    def discriminator_loss(
        self, x: torch.Tensor, recon: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The discriminator's loss on real ``x`` and (detached) reconstructions."""
        assert self.discriminator is not None
        logits_real = self.discriminator(x.detach().contiguous())
        logits_fake = self.discriminator(recon.detach().contiguous())
        d_loss = discriminator_loss_fn(self.disc_kind, logits_real, logits_fake)
        logs = {
            "disc": d_loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()
        }
        return d_loss, {k: v.detach() for k, v in logs.items()}


class SegmentationLoss(nn.Module):
    """Cross-entropy reconstruction of label maps + codebook loss; no discriminator."""

    discriminator = None

    def __init__(self, *, codebook_weight: float = 1.0) -> None:
        super().__init__()
        self.codebook_weight = codebook_weight

    def disc_active(self, step: int) -> bool:
        return False

    def generator_loss(
        self, x: torch.Tensor, out: Any, step: int, last_layer: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``x`` one-hot ``[B, n_labels, H, W]``; ``out.recon`` logits of the same shape."""
        ce = F.cross_entropy(out.recon, x.argmax(1))
        loss = ce + self.codebook_weight * out.qloss
        logs = {"loss": loss, "ce": ce, "codebook": out.qloss}
        return loss, {k: v.detach() for k, v in logs.items()}
