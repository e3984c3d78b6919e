"""``kmeans``: the f = 1 baseline tokenizer — every pixel is a token.

A pixel's code is the nearest of ``n_embed`` colour centroids (K = 512 by default,
as in the paper's f1 experiment); decoding paints each code's centroid colour.
There is no network: "training" is :meth:`KMeansTokenizer.fit`, mini-batch
k-means (Sculley 2010) over pixels sampled from the data, started by k-means++
on the first sample, with clusters that stay empty re-seeded from pixels far
from every centroid.

The k-means helpers here (:func:`kmeans_plusplus`, :func:`lloyd`) also
initialise the VQGAN codebook from the first encoder outputs.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from einops import rearrange
from pydantic import Field

from vqgen.core.interfaces import ParamsModel, Tokenizer

__all__ = ["KMeansTokenizer", "codebook_stats", "kmeans_plusplus", "lloyd", "nearest"]


# -----------------------------------------------------------------------------
# k-means helpers (plain tensors, any device)


def nearest(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centre (squared L2) of each row: ``[N, D], [K, D] → [N]``."""
    d = (
        x.pow(2).sum(1, keepdim=True)
        + centers.pow(2).sum(1)
        - 2 * x @ centers.t()
    )  # (N, K)
    return d.argmin(1)


def _sq_dist_to(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return (x - c).pow(2).sum(1)  # (N,)


def kmeans_plusplus(
    x: torch.Tensor, k: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): ``k`` rows of ``x`` ``[N, D]``.

    Each new centre is a data point drawn with probability proportional to its
    squared distance to the nearest centre chosen so far, so distinct points are
    preferred; once every point coincides with a centre, the rest are uniform.
    """
    n = x.shape[0]
    x = x.float()
    first = int(torch.randint(n, (1,), generator=generator, device="cpu"))
    idx = [first]
    d2 = _sq_dist_to(x, x[first])  # (N,)
    for _ in range(1, k):
        total = float(d2.sum())
        if total > 0 and torch.isfinite(d2).all():
            i = int(torch.multinomial(d2.cpu().double(), 1, generator=generator))
        else:
            i = int(torch.randint(n, (1,), generator=generator, device="cpu"))
        idx.append(i)
        d2 = torch.minimum(d2, _sq_dist_to(x, x[i]))
    return x[torch.tensor(idx, device=x.device)].clone()  # (k, D)


def lloyd(
    x: torch.Tensor, centers: torch.Tensor, iters: int, spherical: bool = False
) -> torch.Tensor:
    """``iters`` Lloyd iterations from ``centers`` ``[K, D]`` on data ``x`` ``[N, D]``.

    An empty cluster keeps its centre. ``spherical``: centres are re-normalised to
    unit length after every update (k-means for l2-normalised data).
    """
    c = centers.float().clone()
    x = x.float()
    for _ in range(iters):
        assign = nearest(x, c)  # (N,)
        sums = torch.zeros_like(c).index_add_(0, assign, x)  # (K, D)
        counts = torch.bincount(assign, minlength=c.shape[0]).to(x.dtype)  # (K,)
        hit = counts > 0
        c[hit] = sums[hit] / counts[hit, None]
        if spherical:
            c = torch.nn.functional.normalize(c, dim=1)
    return c


def codebook_stats(codes: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(usage, perplexity)`` of integer codes: fraction of the ``n`` codes hit, exp(entropy)."""
    counts = torch.bincount(codes.reshape(-1), minlength=n).float()  # (n,)
    p = counts / counts.sum().clamp_min(1)
    perplexity = torch.exp(-(p * torch.log(p + 1e-10)).sum())
    usage = (counts > 0).float().mean()
    return usage, perplexity


# -----------------------------------------------------------------------------
# the tokenizer


class KMeansTokenizer(Tokenizer):
    """f = 1 baseline: each pixel's code is its nearest of K colour centroids.

    ``encode`` ``[B, C, H, W] → [B, H, W]`` (nearest centroid), ``decode`` paints the
    centroid colours. Fit with :meth:`fit` / :meth:`fit_step` (mini-batch k-means
    with k-means++ initialisation; the stage-1 trainer calls ``fit_step``).
    Before fitting, the centroids are a fixed pseudo-random set in ``[-1, 1]``.
    """

    class Params(ParamsModel):
        n_embed: int = Field(512, ge=1, le=1 << 20, description="K, the number of colour centroids")
        in_channels: int = Field(3, ge=1)
        sample_pixels: int = Field(
            16384, ge=1, description="pixels sampled from each mini-batch of images"
        )
        reseed_after: int = Field(
            10, ge=1, description="re-seed a centroid that got no pixel for this many steps"
        )

    def __init__(
        self,
        n_embed: int = 512,
        in_channels: int = 3,
        sample_pixels: int = 16384,
        reseed_after: int = 10,
    ) -> None:
        super().__init__(
            n_embed=n_embed,
            in_channels=in_channels,
            sample_pixels=sample_pixels,
            reseed_after=reseed_after,
        )
        self.vocab_size, self.downsample, self.in_channels = n_embed, 1, in_channels
        g = torch.Generator().manual_seed(0)
        init = torch.rand(n_embed, in_channels, generator=g) * 2 - 1  # (K, C)
        self.register_buffer("centroids", init)
        # fitting state (saved by the trainer's train_state, not in the weights)
        self.register_buffer("counts", torch.zeros(n_embed), persistent=False)  # (K,)
        self.register_buffer("last_hit", torch.zeros(n_embed, dtype=torch.int64), persistent=False)
        self.register_buffer("fit_steps", torch.zeros((), dtype=torch.int64), persistent=False)

    # -- tokenizer interface ----------------------------------------------------
    def code_vectors(self) -> torch.Tensor:
        """``[K, C]``: each code's centroid colour."""
        return self.centroids.detach().float().clone()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` float → ``[B, H, W]`` int64: index of the nearest centroid."""
        b, _, h, w = x.shape
        pix = rearrange(x.float(), "b c h w -> (b h w) c")
        step = max(1, 2**24 // self.vocab_size)  # bounds the distance matrix to 64 MiB
        codes = torch.cat(
            [nearest(pix[i : i + step], self.centroids) for i in range(0, len(pix), step)]
        )  # (B*H*W,)
        return rearrange(codes, "(b h w) -> b h w", b=b, h=h, w=w)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``[B, H, W]`` int64 → ``[B, C, H, W]``: the centroid colour of every pixel."""
        return rearrange(self.centroids[codes], "b h w c -> b c h w")

    # -- fitting ----------------------------------------------------------------
    def _sample(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        pix = rearrange(x.float(), "b c h w -> (b h w) c")  # (N, C)
        m = min(self.params.sample_pixels, pix.shape[0])
        pick = torch.randperm(pix.shape[0], generator=generator)[:m].to(pix.device)
        return pix[pick]  # (m, C)

    @torch.no_grad()
    def fit_step(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, float]:
        """One mini-batch k-means step on pixels sampled from images ``x`` ``[B, C, H, W]``.

        The first call seeds the centroids with k-means++ on its sample. Each call
        moves every centroid towards the mean of its assigned pixels with the
        per-centroid rate 1 / (pixels seen), and re-seeds centroids that got no
        pixel for ``reseed_after`` steps. Returns ``mse`` (mean squared distance
        of the sample to its centroid, before the update), ``usage`` and ``perplexity``.
        """
        pix = self._sample(x, generator).to(self.centroids.device)  # (m, C)
        k, step = self.vocab_size, int(self.fit_steps)
        if step == 0:
            self.centroids.copy_(kmeans_plusplus(pix, k, generator))
            self.counts.zero_()
            self.last_hit.zero_()
        assign = nearest(pix, self.centroids)  # (m,)
        mse = (pix - self.centroids[assign]).pow(2).sum(1).mean()
        usage, perplexity = codebook_stats(assign, k)
        n = torch.bincount(assign, minlength=k).to(pix.dtype)  # (K,)
        # c ← c + Σ(x − c) / counts: the running mean of every pixel ever assigned to c
        # (a sum of differences, so a centroid that sits exactly on its pixels stays put)
        delta = torch.zeros_like(self.centroids).index_add_(
            0, assign, pix - self.centroids[assign]
        )  # (K, C)
        hit = n > 0
        self.counts += n
        self.centroids[hit] += delta[hit] / self.counts[hit, None]
        self.last_hit[hit] = step
        reseeded = self._reseed(pix, step, generator)
        self.fit_steps += 1
        return {
            "mse": float(mse),
            "usage": float(usage),
            "perplexity": float(perplexity),
            "reseeded": float(reseeded),
        }

    def _reseed(self, pix: torch.Tensor, step: int, generator: torch.Generator | None) -> int:
        """Move long-empty centroids onto sampled pixels far from every centroid."""
        dead = (step - self.last_hit) >= self.params.reseed_after  # (K,)
        n_dead = int(dead.sum())
        if n_dead == 0:
            return 0
        d2 = (pix - self.centroids[nearest(pix, self.centroids)]).pow(2).sum(1)  # (m,)
        if float(d2.sum()) <= 0:  # every pixel sits on a centroid: nothing to gain
            self.last_hit[dead] = step
            return 0
        pick = torch.multinomial(d2.cpu().double(), n_dead, replacement=True, generator=generator)
        self.centroids[dead] = pix[pick.to(pix.device)]
        self.counts[dead] = 0
        self.last_hit[dead] = step
        return n_dead

    def fit(
        self,
        batches: Iterable[torch.Tensor],
        steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, float]:
        """Mini-batch k-means over ``batches`` of images (at most ``steps`` of them).

        Returns the statistics of the last step (see :meth:`fit_step`).
        """
        stats: dict[str, float] = {}
        for i, x in enumerate(batches):
            if steps is not None and i >= steps:
                break
            stats = self.fit_step(x, generator)
        return stats
