"""Orderings that read the grid row by row: ``row_major`` and ``alternate``."""

from __future__ import annotations

import numpy as np
import torch

from vqgen.core.interfaces import NoParams, Ordering
from vqgen.core.pipeline import RowMajor  # the pipeline's default, registered here

__all__ = ["Alternate", "RowMajor"]


class Alternate(Ordering):
    """Boustrophedon: even rows left to right, odd rows right to left.

    Consecutive tokens are always grid neighbours. Defined as is for every
    ``h × w``; taming-transformers' ``AlternateParsing`` (which also accepts any size).
    """

    Params = NoParams

    def __init__(self) -> None:
        super().__init__()

    def permutation(self, h: int, w: int) -> torch.Tensor:
        grid = np.arange(h * w, dtype=np.int64).reshape(h, w)
        grid[1::2] = grid[1::2, ::-1]  # reverse every odd row
        return torch.from_numpy(grid.reshape(-1).copy())
