"""VQGAN (Esser et al. 2021): encoder, quantizer, decoder, and its training losses.

Registered as tokenizers ``vqgan`` (images; ``in_channels: 1`` for depth or
edge maps), ``vqgan_segmentation`` (one-hot label maps, cross-entropy) and
``vqgan_gumbel`` (taming's Gumbel quantizer, for imported GumbelVQ checkpoints),
``fsq`` (Finite Scalar Quantization) and ``lfq`` (Lookup-Free Quantization). The
image variants (``vqgan``, ``vqgan_gumbel``, ``fsq``, ``lfq``) differ only in the
quantizer: encoder, decoder and losses are shared.
"""

from __future__ import annotations

from vqgen.plugins.vqgan.fsq import VQGANFSQ, FSQuantizer
from vqgen.plugins.vqgan.gumbel import VQGANGumbel
from vqgen.plugins.vqgan.lfq import VQGANLFQ, LFQuantizer
from vqgen.plugins.vqgan.model import Decoder, Encoder, VectorQuantizer
from vqgen.plugins.vqgan.tokenizer import VQGAN, VQGANOutput, VQGANSegmentation

__all__ = [
    "VQGAN",
    "VQGANFSQ",
    "VQGANLFQ",
    "Decoder",
    "Encoder",
    "FSQuantizer",
    "LFQuantizer",
    "VQGANGumbel",
    "VQGANOutput",
    "VQGANSegmentation",
    "VectorQuantizer",
]
