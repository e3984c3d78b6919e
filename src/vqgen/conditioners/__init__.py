"""Built-in conditioners (a plugin registered through the `vqgen_register` hook).

=================  ===================================  ==============================
name               reads                                tokens
=================  ===================================  ==============================
``class``          ``label`` ``[B]``                    1 per image
``segmentation``   ``segmentation`` ``[B, H, W]``       segmentation VQGAN or majority
``depth``          ``depth`` ``[B, 1, H, W]``           1-channel VQGAN
``edge``           ``image`` (Canny) or ``edges``       1-channel VQGAN
``pose``           ``keypoints`` ``[B, N, K, 3]``       rendered, then a VQGAN
``lowres``         ``lowres`` or ``image``              RGB VQGAN of the upsampled image
=================  ===================================  ==============================

Every one reserves the last id as the null token (``null_token: false`` drops it).
"""

from __future__ import annotations

from typing import Any

from vqgen.conditioners.base import (
    ConditionInputs,
    SpatialConditioner,
    TokenizerSpec,
    drop_condition,
)
from vqgen.conditioners.canny import canny
from vqgen.conditioners.depth import DepthConditioner
from vqgen.conditioners.edge import EdgeConditioner
from vqgen.conditioners.label import ClassConditioner
from vqgen.conditioners.lowres import LowResConditioner
from vqgen.conditioners.pose import PoseConditioner
from vqgen.conditioners.segmentation import SegmentationConditioner
from vqgen.core.hookspecs import hookimpl

__all__ = [
    "ClassConditioner",
    "ConditionInputs",
    "DepthConditioner",
    "EdgeConditioner",
    "LowResConditioner",
    "PoseConditioner",
    "SegmentationConditioner",
    "SpatialConditioner",
    "TokenizerSpec",
    "canny",
    "drop_condition",
]


@hookimpl
def vqgen_register(registry: Any) -> None:
    """Register the built-in conditioners."""
    registry.add("conditioner", "class", ClassConditioner)
    registry.add("conditioner", "segmentation", SegmentationConditioner)
    registry.add("conditioner", "depth", DepthConditioner)
    registry.add("conditioner", "edge", EdgeConditioner)
    registry.add("conditioner", "pose", PoseConditioner)
    registry.add("conditioner", "lowres", LowResConditioner)
