"""The f = 1 k-means tokenizer and the k-means helpers."""

from __future__ import annotations

import pytest
import torch

from vqgen.core.interfaces import signature_problems
from vqgen.plugins.kmeans import KMeansTokenizer, codebook_stats, kmeans_plusplus, lloyd, nearest

pytestmark = pytest.mark.usefixtures("one_thread")


def palette_image(k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``[2, 3, 32, 32]`` image batch using exactly ``k`` distinct 8-bit colours."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.randint(256**3, (4 * k,), generator=g).unique()  # packed RGB values
    colours = colours[torch.randperm(colours.numel(), generator=g)[:k]]  # k distinct
    rgb = torch.stack([colours // 65536, colours // 256 % 256, colours % 256], 1)  # (k, 3)
    palette = rgb.float() / 127.5 - 1  # (k, 3) exact u8 levels
    idx = torch.arange(2 * 32 * 32) % k  # every colour used, many times
    idx = idx[torch.randperm(idx.numel(), generator=g)].reshape(2, 32, 32)
    return palette[idx].permute(0, 3, 1, 2).contiguous(), palette


def test_constructor_takes_exactly_its_params() -> None:
    assert signature_problems(KMeansTokenizer) == []


def test_shapes_and_dtypes() -> None:
    tok = KMeansTokenizer(n_embed=16)
    x = torch.rand(2, 3, 8, 12) * 2 - 1
    codes = tok.encode(x)
    assert codes.shape == (2, 8, 12) and codes.dtype == torch.int64
    assert tok.decode(codes).shape == (2, 3, 8, 12)
    assert (tok.vocab_size, tok.downsample, tok.in_channels) == (16, 1, 3)


@pytest.mark.parametrize("k", [16, 64])
def test_an_image_of_exactly_k_colours_reconstructs_exactly(k: int) -> None:
    x, palette = palette_image(k)
    tok = KMeansTokenizer(n_embed=k, sample_pixels=2048)
    g = torch.Generator().manual_seed(0)
    tok.fit([x] * 5, generator=g)
    assert torch.equal(tok.decode(tok.encode(x)), x)
    assert {tuple(c) for c in tok.centroids.tolist()} == {tuple(c) for c in palette.tolist()}


def test_fit_lowers_the_quantisation_error() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.rand(8, 3, generator=g) * 1.6 - 0.8  # (8, 3)
    pix = centres[torch.randint(8, (1024,), generator=g)] + 0.05 * torch.randn(1024, 3, generator=g)
    x = pix.T.reshape(3, 4, 16, 16).transpose(0, 1)  # 8 colour blobs
    tok = KMeansTokenizer(n_embed=8, sample_pixels=512)
    before = (tok.decode(tok.encode(x)) - x).square().mean()
    stats = tok.fit([x] * 10, generator=g)
    after = (tok.decode(tok.encode(x)) - x).square().mean()
    assert after < 0.3 * before and after < 1.2 * 0.05**2  # the blobs' own variance
    assert 0 < stats["usage"] <= 1 and stats["perplexity"] > 1


def test_empty_clusters_are_reseeded() -> None:
    tok = KMeansTokenizer(n_embed=4, sample_pixels=64, reseed_after=2)
    g = torch.Generator().manual_seed(0)
    two = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])  # first data: two colours
    x = two[torch.arange(64) % 2].T.reshape(1, 3, 8, 8)
    tok.fit([x], generator=g)
    tok.centroids[3] = 5.0  # a centroid no pixel will ever reach
    wide = torch.linspace(-1, 1, 64)[:, None].expand(64, 3).T.reshape(1, 3, 8, 8)
    reseeded = [tok.fit_step(wide, g)["reseeded"] for _ in range(4)]
    assert sum(reseeded) >= 1
    assert float(tok.centroids.abs().max()) <= 1.0


def test_kmeans_plusplus_picks_distinct_points_first() -> None:
    x = torch.tensor([[0.0], [0.0], [1.0], [1.0], [5.0]])
    c = kmeans_plusplus(x, 3, torch.Generator().manual_seed(0))
    assert sorted(c.flatten().tolist()) == [0.0, 1.0, 5.0]
    c4 = kmeans_plusplus(x, 4, torch.Generator().manual_seed(0))  # more centres than points
    assert c4.shape == (4, 1)


def test_lloyd_and_helpers() -> None:
    x = torch.tensor([[0.0, 0.0], [0.0, 2.0], [10.0, 0.0], [10.0, 2.0]])
    c = lloyd(x, torch.tensor([[1.0, 1.0], [9.0, 1.0]]), iters=3)
    assert torch.allclose(c, torch.tensor([[0.0, 1.0], [10.0, 1.0]]))
    assert nearest(x, c).tolist() == [0, 0, 1, 1]
    usage, ppl = codebook_stats(torch.tensor([0, 0, 1, 1]), 4)
    assert float(usage) == 0.5 and abs(float(ppl) - 2.0) < 1e-4
    sph = lloyd(x + 1, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), iters=2, spherical=True)
    assert torch.allclose(sph.norm(dim=1), torch.ones(2))
