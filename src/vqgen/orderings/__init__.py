"""Built-in orderings (a plugin registered through the `vqgen_register` hook).

The six sequence orderings of "Taming Transformers" (Appendix F), each defined for
every ``h × w`` grid and equal to taming-transformers' permuter on the square
power-of-two grids where that one is defined.
"""

from __future__ import annotations

from typing import Any

from vqgen.core.hookspecs import hookimpl
from vqgen.orderings.raster import Alternate, RowMajor
from vqgen.orderings.spiral import SpiralIn, SpiralOut
from vqgen.orderings.subsample import Subsample
from vqgen.orderings.zcurve import ZCurve

__all__ = ["Alternate", "RowMajor", "SpiralIn", "SpiralOut", "Subsample", "ZCurve"]

BUILTIN_ORDERINGS: dict[str, type] = {
    "row_major": RowMajor,
    "spiral_out": SpiralOut,
    "z_curve": ZCurve,
    "subsample": Subsample,
    "alternate": Alternate,
    "spiral_in": SpiralIn,
}


@hookimpl
def vqgen_register(registry: Any) -> None:
    """Register the built-in orderings."""
    for name, cls in BUILTIN_ORDERINGS.items():
        registry.add("ordering", name, cls)
