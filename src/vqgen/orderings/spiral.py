"""Spiral orderings: ``spiral_in`` (border to centre) and ``spiral_out`` (its reverse)."""

from __future__ import annotations

import torch

from vqgen.core.interfaces import NoParams, Ordering


def spiral_in(h: int, w: int) -> list[int]:
    """Raster indices of an ``h × w`` grid peeled ring by ring, outside in.

    Each ring starts at its bottom-right cell and runs counter-clockwise: up the right
    column, left along the top row, down the left column, right along the bottom row.
    The next ring starts just above where the last one ended, so the path is connected.
    """
    out: list[int] = []
    top, bottom, left, right = 0, h - 1, 0, w - 1
    while top <= bottom and left <= right:
        out += [r * w + right for r in range(bottom, top - 1, -1)]  # up the right column
        out += [top * w + c for c in range(right - 1, left - 1, -1)]  # left along the top
        if left < right:
            out += [r * w + left for r in range(top + 1, bottom + 1)]  # down the left column
        if top < bottom:
            out += [bottom * w + c for c in range(left + 1, right)]  # right along the bottom
        top, bottom, left, right = top + 1, bottom - 1, left + 1, right - 1
    return out


class SpiralIn(Ordering):
    """Spiral from the border to the centre: starts at the bottom-right corner and winds
    counter-clockwise (up, left, down, right) ring by ring inwards.

    Taming-transformers defines ``SpiralIn`` as its ``SpiralOut`` reversed (even squares
    only); that is exactly this ring-peeling spiral, which is defined for any ``h × w``:
    rings of a rectangle are peeled the same way, a ring that is a single row or column
    is read once (a column bottom to top, a row right to left).
    """

    Params = NoParams

    def __init__(self) -> None:
        super().__init__()

    def permutation(self, h: int, w: int) -> torch.Tensor:
        return torch.tensor(spiral_in(h, w), dtype=torch.int64)


class SpiralOut(Ordering):
    """Spiral from the centre to the border: ``spiral_in`` reversed, winding clockwise
    (up, right, down, left) outwards and ending at the bottom-right corner.

    For an even ``n × n`` grid it starts at (n/2, n/2 - 1) with runs of 1, 1, 2, 2, ...,
    n-1, n-1, n-1 cells: taming-transformers' ``SpiralOut``. Any ``h × w``: it starts
    where ``spiral_in`` ends, in the innermost ring (the centre cell of an odd square),
    and every step moves to a neighbouring cell.
    """

    Params = NoParams

    def __init__(self) -> None:
        super().__init__()

    def permutation(self, h: int, w: int) -> torch.Tensor:
        return torch.tensor(spiral_in(h, w)[::-1], dtype=torch.int64)
