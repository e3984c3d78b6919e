"""VQGAN (Esser et al. 2021): encoder, quantizer, decoder, and its training losses.

Registered as tokenizers ``vqgan`` (images; ``in_channels: 1`` for depth or
edge maps), ``vqgan_segmentation`` (one-hot label maps, cross-entropy) and
``vqgan_gumbel`` (taming's Gumbel quantizer, for imported GumbelVQ checkpoints).
"""

from __future__ import annotations

from vqgen.plugins.vqgan.gumbel import VQGANGumbel
from vqgen.plugins.vqgan.model import Decoder, Encoder, VectorQuantizer
from vqgen.plugins.vqgan.tokenizer import VQGAN, VQGANOutput, VQGANSegmentation

__all__ = [
    "VQGAN",
    "Decoder",
    "Encoder",
    "VQGANGumbel",
    "VQGANOutput",
    "VQGANSegmentation",
    "VectorQuantizer",
]
