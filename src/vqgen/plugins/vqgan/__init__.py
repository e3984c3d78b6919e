"""VQGAN (Esser et al. 2021): encoder, quantizer, decoder, and its training losses.

Registered as tokenizers ``vqgan`` (images; ``in_channels: 1`` for depth or
edge maps) and ``vqgan_segmentation`` (one-hot label maps, cross-entropy).
"""

from __future__ import annotations

from vqgen.plugins.vqgan.model import Decoder, Encoder, VectorQuantizer
from vqgen.plugins.vqgan.tokenizer import VQGAN, VQGANOutput, VQGANSegmentation

__all__ = ["VQGAN", "Decoder", "Encoder", "VQGANOutput", "VQGANSegmentation", "VectorQuantizer"]
