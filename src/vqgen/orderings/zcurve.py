"""The ``z_curve`` ordering: Morton (Z-order) traversal of the grid."""

from __future__ import annotations

import numpy as np
import torch

from vqgen.core.interfaces import NoParams, Ordering


def morton_codes(h: int, w: int) -> np.ndarray:
    """``int64 [h * w]``: Morton code of each cell, in raster order.

    The bits of the column ``c`` go to the even bit positions and those of the row
    ``r`` to the odd ones, so a 2×2 block is read (0, 0), (0, 1), (1, 0), (1, 1).
    """
    r, c = np.divmod(np.arange(h * w, dtype=np.int64), w)  # (h*w,) each
    code = np.zeros(h * w, dtype=np.int64)
    for b in range(max(h, w).bit_length()):
        code |= ((c >> b) & 1) << (2 * b)
        code |= ((r >> b) & 1) << (2 * b + 1)
    return code


class ZCurve(Ordering):
    """Z-order (Morton) curve: recursively visit quadrants top-left, top-right,
    bottom-left, bottom-right, and within a 2×2 block go right, then down-left, then right.

    Any ``h × w``: the cells are sorted by their Morton code, i.e. the Z-curve over the
    bounding power-of-two square with the cells outside the grid dropped. For every
    size this is exactly taming-transformers' ``ZCurve`` (``argsort`` of the codes).
    """

    Params = NoParams

    def __init__(self) -> None:
        super().__init__()

    def permutation(self, h: int, w: int) -> torch.Tensor:
        return torch.from_numpy(np.argsort(morton_codes(h, w), kind="stable"))
