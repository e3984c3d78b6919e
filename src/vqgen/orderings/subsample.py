"""The ``subsample`` ordering: coarse-to-fine by recursive 2×2 polyphase splitting."""

from __future__ import annotations

import numpy as np
import torch

from vqgen.core.interfaces import NoParams, Ordering


def _subsample(cells: np.ndarray) -> np.ndarray:
    """Raster indices in ``cells`` (a 2-D block of them) in subsample order."""
    if cells.size <= 1:
        return cells.reshape(-1)
    phases = [cells[i::2, j::2] for i in (0, 1) for j in (0, 1)]  # (even|odd rows) x (cols)
    return np.concatenate([_subsample(p) for p in phases if p.size])


class Subsample(Ordering):
    """Recursive subsampling: the cells at (even row, even col) come first, then
    (even, odd), (odd, even) and (odd, odd); each of these four sub-grids is ordered
    the same way, recursively, down to single cells.

    For a ``2^k × 2^k`` grid this is taming-transformers' ``Subsample``: the sequence
    position is the Morton code of the bit-reversed row and column. Any ``h × w``:
    a dimension of odd size has ``ceil(n / 2)`` even and ``floor(n / 2)`` odd
    positions; empty sub-grids are skipped (a 1-row grid splits only its columns).
    """

    Params = NoParams

    def __init__(self) -> None:
        super().__init__()

    def permutation(self, h: int, w: int) -> torch.Tensor:
        cells = np.arange(h * w, dtype=np.int64).reshape(h, w)
        return torch.from_numpy(_subsample(cells))
