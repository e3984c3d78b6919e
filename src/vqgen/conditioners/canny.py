"""A batched Canny edge detector in plain torch (for the ``edge`` conditioner).

``canny(images, sigma, low, high)`` runs the four classic steps on every image of a
batch at once, on whatever device the images live:

1. grayscale (ITU-R 601 luma) in ``[0, 1]`` and a Gaussian blur (``sigma``; 0 = none);
2. Sobel gradients, scaled to intensity per pixel (a unit step reads about 1 before
   blurring; a blur of ``sigma`` lowers the peak to about ``0.4 / sigma``);
3. non-maximum suppression along the gradient direction, quantised to 4 directions
   (ties between two equal neighbours keep the first one along the gradient, so a
   symmetric step gives a 1-pixel line);
4. double threshold and hysteresis: pixels at or above ``high`` are edges, pixels at
   or above ``low`` join them when 8-connected to an edge (iterative dilation inside
   the weak set until nothing changes).

Thresholds are absolute gradient magnitudes of the ``[0, 1]`` grayscale image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["canny", "gaussian_blur", "grayscale", "hysteresis", "non_max_suppression", "sobel"]

_LUMA = (0.299, 0.587, 0.114)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """``[B, 3 | 1, H, W]`` in ``[-1, 1]`` → ``[B, 1, H, W]`` in ``[0, 1]``."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [B, 3 or 1, H, W], got {tuple(images.shape)}")
    x = (images.float() + 1) / 2  # (B, C, H, W) in [0, 1]
    if x.shape[1] == 3:
        w = x.new_tensor(_LUMA).view(1, 3, 1, 1)
        x = (x * w).sum(1, keepdim=True)  # (B, 1, H, W)
    return x


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[B, 1, H, W]`` (replicated borders); ``sigma`` 0: none."""
    if sigma <= 0:
        return x
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()  # (2r+1,)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))  # along x
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))  # along y


def sobel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, 1, H, W]`` → gradients ``(gx, gy)``, each ``[B, 1, H, W]``, per pixel (÷ 8)."""
    kx = x.new_tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8
    k = torch.stack([kx, kx.T])[:, None]  # (2, 1, 3, 3): d/dx, d/dy (y points down)
    g = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k)  # (B, 2, H, W)
    return g[:, :1], g[:, 1:]


# neighbour offset (dy, dx) along the gradient for each direction sector:
# 0 ≈ 0° (horizontal gradient), 1 ≈ 45° (down-right), 2 ≈ 90° (down), 3 ≈ 135° (down-left)
_OFFSETS = ((0, 1), (1, 1), (1, 0), (1, -1))


def _shifted(padded: torch.Tensor, dy: int, dx: int, h: int, w: int) -> torch.Tensor:
    """``value[y + dy, x + dx]`` for a 1-pixel zero-padded ``[B, 1, H + 2, W + 2]`` map."""
    return padded[:, :, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]


def non_max_suppression(mag: torch.Tensor, gx: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """Keep ``mag`` where it is a maximum along the (4-way quantised) gradient; else 0.

    A pixel survives when it is strictly larger than its neighbour behind it and at
    least as large as the one ahead, so a plateau of two equal pixels keeps one.
    """
    _, _, h, w = mag.shape
    angle = torch.atan2(gy, gx) % math.pi  # (B, 1, H, W) in [0, pi)
    sector = torch.round(angle / (math.pi / 4)).long() % 4  # (B, 1, H, W) in {0..3}
    padded = F.pad(mag, (1, 1, 1, 1))  # (B, 1, H+2, W+2), zeros outside
    keep = torch.zeros_like(mag, dtype=torch.bool)
    for s, (dy, dx) in enumerate(_OFFSETS):
        ahead = _shifted(padded, dy, dx, h, w)
        behind = _shifted(padded, -dy, -dx, h, w)
        keep |= (sector == s) & (mag > behind) & (mag >= ahead)
    return torch.where(keep, mag, torch.zeros_like(mag))


def hysteresis(
    strong: torch.Tensor, weak: torch.Tensor, max_iters: int | None = None
) -> torch.Tensor:
    """Grow ``strong`` (bool ``[B, 1, H, W]``) into 8-connected ``weak`` pixels.

    Dilates by one pixel per iteration, never leaving ``strong | weak``, until nothing
    changes (at most ``max_iters``, default ``H * W``, which always suffices).
    """
    allowed = strong | weak
    edges = strong & allowed
    n = max_iters if max_iters is not None else strong.shape[-2] * strong.shape[-1]
    for _ in range(n):
        grown = F.max_pool2d(edges.float(), 3, stride=1, padding=1).bool() & allowed
        if torch.equal(grown, edges):
            break
        edges = grown
    return edges


def canny(
    images: torch.Tensor, sigma: float = 1.0, low: float = 0.02, high: float = 0.05
) -> torch.Tensor:
    """Canny edges of ``[B, 3 | 1, H, W]`` images in ``[-1, 1]`` → float ``[B, 1, H, W]`` in {0, 1}.

    ``low`` and ``high`` are gradient magnitudes of the ``[0, 1]`` grayscale image
    (see the module docstring); ``low <= high``.
    """
    if low > high:
        raise ValueError(f"low threshold {low} is above the high threshold {high}")
    x = gaussian_blur(grayscale(images), sigma)  # (B, 1, H, W)
    gx, gy = sobel(x)
    mag = non_max_suppression(torch.hypot(gx, gy), gx, gy)  # (B, 1, H, W)
    edges = hysteresis((mag >= high) & (mag > 0), (mag >= low) & (mag > 0))  # (B, 1, H, W)
    return edges.to(images.dtype if images.is_floating_point() else torch.float32)
