"""Where tokens sit on the latent grid, and 2-D rotary position embeddings over it.

A prior that follows an :class:`~vqgen.core.interfaces.Ordering` sees the image tokens
as a sequence; one with *grid positions* (:class:`GridPositions`) also knows the cell
``(row, col)`` of every sequence position, from the ordering's permutation, which the
pipeline hands it with ``set_cell_order(ordering.permutation(h, w))``.

2-D RoPE (rotary position embedding, Su et al. 2021, "RoFormer"; on an image grid as in
LlamaGen, Sun et al. 2024): each attention head's ``hs`` dimensions are split in two
halves, the first rotated by the token's row, the second by its column. Inside a half of
``d = hs / 2`` dimensions, pair ``i`` (dimensions ``2i, 2i + 1``) turns by the angle
``p * θ_i`` with ``θ_i = base^(-2i / d)`` (the standard 1-D RoPE frequencies; ``base``
10000). Rotating queries and keys alike makes the score ``q·k`` depend on the *offset*
between the two cells only, not on where they sit. ``hs`` must be divisible by 4.

Positions are integer ``(row, col)`` pairs; they may be negative (a prior places tokens
that describe no cell, such as a class token, off the grid).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from einops import rearrange

__all__ = [
    "GridPositions",
    "apply_rope2d",
    "check_permutation",
    "raster_cells",
    "rope2d",
    "rope2d_angles",
    "rope_frequencies",
]


@runtime_checkable
class GridPositions(Protocol):
    """A prior that places its tokens on the latent grid (2-D positions, e.g. 2-D RoPE).

    ``set_cell_order(perm)`` takes ``int64 [h * w]``, ``perm[k]`` the row-major (raster)
    index of the cell of sequence position ``k`` (``Ordering.permutation(h, w)``); the
    pipeline calls it once it knows the ordering and the grid. Until then the order is
    row-major. A prior whose positions do not depend on the grid may ignore it.
    """

    def set_cell_order(self, perm: torch.Tensor) -> None: ...


def check_permutation(perm: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """``perm`` as ``int64 [n]``, checked to be a permutation of ``0 .. n - 1`` (any ``n``
    where ``None``); raises ValueError naming what is wrong."""
    perm = torch.as_tensor(perm)
    if perm.ndim != 1 or perm.dtype.is_floating_point or perm.dtype == torch.bool:
        raise ValueError(f"a cell order must be a 1-D integer tensor, got {tuple(perm.shape)} "
                         f"{perm.dtype}")
    if n is not None and perm.shape[0] != n:
        raise ValueError(f"a cell order of the grid must have {n} entries, got {perm.shape[0]}")
    perm = perm.long()  # (n,)
    if not torch.equal(torch.sort(perm.cpu()).values, torch.arange(perm.shape[0])):
        raise ValueError(f"the cell order is not a permutation of 0..{perm.shape[0] - 1}")
    return perm


def raster_cells(raster: torch.Tensor, width: int) -> torch.Tensor:
    """Row-major indices ``[N]`` of a grid ``width`` wide → their cells ``[N, 2]`` (row, col)."""
    return torch.stack([raster // width, raster % width], dim=-1)  # (N, 2)


def rope_frequencies(dim: int, base: float = 10000.0, *, device: torch.device | None = None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[dim // 2]``: ``θ_i = base^(-2i / dim)``, the angle per unit of position of pair
    ``i`` of a ``dim``-wide 1-D rotary embedding (``dim`` even)."""
    if dim < 2 or dim % 2:
        raise ValueError(f"a rotary embedding needs an even width of at least 2, got {dim}")
    i = torch.arange(dim // 2, device=device, dtype=torch.float64)  # (dim / 2,)
    return (base ** (-2.0 * i / dim)).to(dtype)  # (dim / 2,)


def rope2d_angles(cells: torch.Tensor, head_size: int, base: float = 10000.0, *,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin [T, 2, head_size // 4]`` of the rotations of positions ``cells [T, 2]``
    (row, col): axis 0 of the pair turns with the row, axis 1 with the column."""
    if head_size % 4:
        raise ValueError(f"2-D RoPE needs a head size divisible by 4, got {head_size}")
    theta = rope_frequencies(head_size // 2, base, device=cells.device, dtype=dtype)  # (n,)
    angle = cells.to(dtype)[:, :, None] * theta  # (T, 2, n)
    return angle.cos(), angle.sin()  # (T, 2, n) each


def apply_rope2d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, nh, T, hs]`` by :func:`rope2d_angles`' ``cos, sin [T, 2, hs // 4]``;
    computed in (at least) float32, returned in ``x``'s dtype."""
    work = torch.promote_types(x.dtype, cos.dtype)
    pairs = rearrange(x.to(work), "b nh t (ax n two) -> b nh t ax n two", ax=2, two=2)
    x1, x2 = pairs[..., 0], pairs[..., 1]  # (B, nh, T, 2, n) each
    cos, sin = cos.to(work), sin.to(work)  # (T, 2, n) each
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (B, nh, T, 2, n, 2)
    return rearrange(out, "b nh t ax n two -> b nh t (ax n two)").to(x.dtype)  # (B, nh, T, hs)


def rope2d(x: torch.Tensor, cells: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """``x [B, nh, T, hs]`` rotated by the positions ``cells [T, 2]`` (row, col)."""
    cos, sin = rope2d_angles(cells, x.shape[-1], base,
                             dtype=torch.promote_types(x.dtype, torch.float32))  # (T, 2, hs/4)
    return apply_rope2d(x, cos, sin)  # (B, nh, T, hs)
