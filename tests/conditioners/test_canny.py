"""The batched torch Canny: thin lines, thresholds, hysteresis, batching."""

from __future__ import annotations

import pytest
import torch

from vqgen.conditioners.canny import (
    canny,
    gaussian_blur,
    grayscale,
    hysteresis,
    non_max_suppression,
    sobel,
)


def gray_image(values: torch.Tensor) -> torch.Tensor:
    """``[H, W]`` gray levels in ``[0, 1]`` → ``[1, 3, H, W]`` in ``[-1, 1]``."""
    return (values * 2 - 1)[None, None].expand(1, 3, -1, -1).clone()


def nms_magnitude(image: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    gx, gy = sobel(gaussian_blur(grayscale(image), sigma))
    return non_max_suppression(torch.hypot(gx, gy), gx, gy)


def test_vertical_step_gives_a_one_pixel_line_at_the_step() -> None:
    v = torch.zeros(16, 20)
    v[:, 8:] = 1.0  # step between columns 7 and 8
    edges = canny(gray_image(v))
    assert edges.shape == (1, 1, 16, 20) and edges.dtype == torch.float32
    assert set(edges.unique().tolist()) <= {0.0, 1.0}
    e = edges[0, 0]
    assert torch.equal(e.sum(1), torch.ones(16)), "exactly one edge pixel per row"
    assert set(e.nonzero()[:, 1].tolist()) <= {7, 8}
    horizontal = canny(gray_image(v.T.contiguous()))[0, 0]  # the same step, turned
    assert torch.equal(horizontal.sum(0), torch.ones(16))


def test_flat_image_has_no_edges() -> None:
    assert canny(torch.full((2, 3, 16, 16), 0.3)).sum() == 0
    assert canny(torch.full((1, 3, 16, 16), -1.0), low=1e-6, high=1e-6).sum() == 0


def test_raising_the_high_threshold_removes_weak_edges() -> None:
    v = torch.zeros(16, 32)
    v[:, 8:] = 0.5  # strong step at 7|8
    v[:, 24:] = 0.6  # weak step at 23|24, not connected to the strong one
    image = gray_image(v)
    mag = nms_magnitude(image)[0, 0]
    strong, weak = float(mag[:, 6:10].max()), float(mag[:, 22:26].max())
    assert weak < strong
    cols = lambda e: set(e[0, 0].nonzero()[:, 1].tolist())  # noqa: E731
    both = canny(image, low=weak / 2, high=weak * 0.9)
    assert cols(both) & {7, 8} and cols(both) & {23, 24}
    only_strong = canny(image, low=weak / 2, high=(weak + strong) / 2)
    assert cols(only_strong) & {7, 8} and not cols(only_strong) & {23, 24}
    assert canny(image, low=weak / 2, high=strong * 1.1).sum() == 0


def test_hysteresis_keeps_connected_weak_pixels_and_drops_isolated_ones() -> None:
    # image 0: one vertical edge fading from strong (top) to weak (bottom);
    # image 1: a weak edge alone, as weak as image 0's bottom
    a = torch.full((32, 32), 0.3)
    a[:, 10:] = torch.linspace(0.9, 0.5, 32)[:, None]
    b = torch.full((32, 32), 0.3)
    b[:, 10:] = 0.5
    images = torch.cat([gray_image(a), gray_image(b)])  # (2, 3, 32, 32)
    mag = nms_magnitude(images)
    weak = float(mag[1].max())
    low, high = weak / 2, weak * 1.5
    assert float(mag[0].max()) > high and float(mag[0, 0, -1].max()) < high
    edges = canny(images, low=low, high=high)[:, 0]  # (2, H, W)
    assert torch.equal(edges[0, :, 8:12].sum(1), torch.ones(32)), "weak part joined to strong"
    assert edges[0].sum() == 32
    assert edges[1].sum() == 0, "an isolated weak edge is dropped"
    no_hysteresis = canny(images, low=high, high=high)[:, 0]
    assert 0 < no_hysteresis[0].sum() < 32


def test_hysteresis_on_masks() -> None:
    strong = torch.zeros(1, 1, 5, 7, dtype=torch.bool)
    weak = torch.zeros_like(strong)
    strong[0, 0, 2, 0] = True
    weak[0, 0, 2, 1:4] = True  # a chain leading away from the strong pixel
    weak[0, 0, 1, 4] = True  # diagonal step: 8-connected
    weak[0, 0, 4, 6] = True  # isolated
    out = hysteresis(strong, weak)[0, 0]
    assert out[2, :4].all() and out[1, 4]
    assert not out[4, 6]
    assert int(out.sum()) == 5
    assert int(hysteresis(strong, weak, max_iters=1)[0, 0].sum()) == 2


def test_batched_equals_one_at_a_time_and_grayscale_input() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 24, 24, generator=g) * 2 - 1
    images = gaussian_blur(images.reshape(9, 1, 24, 24), 1.5).reshape(3, 3, 24, 24)
    batched = canny(images, low=0.005, high=0.01)
    assert batched.sum() > 0
    for i in range(3):
        assert torch.equal(batched[i : i + 1], canny(images[i : i + 1], low=0.005, high=0.01))
    gray = grayscale(images) * 2 - 1  # (3, 1, H, W)
    assert torch.equal(canny(gray, low=0.005, high=0.01), batched)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="above the high"):
        canny(torch.zeros(1, 3, 8, 8), low=0.2, high=0.1)
    with pytest.raises(ValueError, match="images"):
        canny(torch.zeros(1, 2, 8, 8))
