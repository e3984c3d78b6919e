"""Attention backends: ``xformers`` | ``sdpa`` | ``math``, behind one function.

``attention(q, k, v, causal=..., backend=...)`` takes ``q: [B, nh, Tq, hs]`` and
``k, v: [B, nh, Tk, hs]`` and returns ``[B, nh, Tq, hs]``. With ``causal=True``
and ``Tq < Tk`` (decoding with a KV cache) query ``i`` sits at absolute position
``Tk - Tq + i`` and sees keys ``0 .. Tk - Tq + i``; ``Tq > Tk`` is an error there.

* ``math``: explicit softmax(QKᵀ/√hs)V, the reference.
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``.
* ``xformers``: ``xformers.ops.memory_efficient_attention`` (CUDA, optional extra).
* ``auto``: xformers on CUDA tensors when it imports and runs, else sdpa. The
  environment variable ``VQGEN_ATTENTION`` overrides ``auto``.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["BACKENDS", "Backend", "attention", "resolve_backend", "xformers_available"]

log = logging.getLogger(__name__)

Backend = Literal["auto", "xformers", "sdpa", "math"]
BACKENDS: tuple[str, ...] = ("auto", "xformers", "sdpa", "math")
ENV = "VQGEN_ATTENTION"


@functools.lru_cache(maxsize=1)
def xformers_available() -> bool:
    """Whether xformers imports and runs one tiny attention on this CUDA device."""
    if not torch.cuda.is_available():
        return False
    try:
        import xformers.ops as xops

        q = torch.zeros(1, 8, 1, 64, device="cuda", dtype=torch.float16)  # (B, T, nh, hs)
        xops.memory_efficient_attention(q, q, q)
        return True
    except Exception as exc:  # ImportError, or a build without kernels for this GPU
        log.info("xformers unavailable (%s: %s)", type(exc).__name__, exc)
        return False


_announced: set[str] = set()


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend ``auto`` (or ``$VQGEN_ATTENTION``) means on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend == "auto" and (env := os.environ.get(ENV, "").strip().lower()):
        if env not in BACKENDS:
            raise ValueError(
                f"unknown attention backend {env!r} in ${ENV}; valid: {', '.join(BACKENDS)}"
            )
        backend = env
    if backend == "auto":
        chosen = "xformers" if device.type == "cuda" and xformers_available() else "sdpa"
        if (key := f"{device.type}:{chosen}") not in _announced:
            _announced.add(key)
            log.info("attention backend 'auto' chose %r on %s", chosen, device.type)
        return chosen
    if backend == "xformers" and not (device.type == "cuda" and xformers_available()):
        raise RuntimeError(
            "attention backend 'xformers' needs a CUDA device and the xformers package "
            "(pip install 'vqgen[xformers]'); use 'auto' or 'sdpa' instead"
        )
    return backend


def _causal_mask(tq: int, tk: int, device: torch.device) -> torch.Tensor:
    """``[Tq, Tk]`` bool, True where query ``i`` may see key ``j``."""
    i = torch.arange(tq, device=device)[:, None] + (tk - tq)  # (Tq, 1) absolute positions
    j = torch.arange(tk, device=device)[None, :]  # (1, Tk)
    return j <= i


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    backend: str = "auto",
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Scaled dot-product attention; ``[B, nh, Tq, hs]`` out (see module docstring)."""
    tq, tk, hs = q.shape[-2], k.shape[-2], q.shape[-1]
    if causal and tq > tk:
        raise ValueError(
            f"causal attention needs at least as many keys as queries, got Tq={tq} > Tk={tk} "
            "(the queries are the last Tq of the Tk positions)"
        )
    which = resolve_backend(backend, q.device)
    if causal and tq == 1:
        causal = False  # the one query is the last position: it sees every key
    if which == "math":
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, nh, Tq, Tk)
        if causal:
            att = att.masked_fill(~_causal_mask(tq, tk, q.device), float("-inf"))
        att = torch.softmax(att.float(), dim=-1).to(q.dtype)
        if dropout_p > 0:
            att = F.dropout(att, p=dropout_p)
        return att @ v  # (B, nh, Tq, hs)
    if which == "sdpa":
        if causal and tq == tk:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        mask = _causal_mask(tq, tk, q.device) if causal else None  # (Tq, Tk)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    import xformers.ops as xops

    bias = None
    if causal:
        bias = (
            xops.LowerTriangularMask()
            if tq == tk
            else xops.fmha.attn_bias.LowerTriangularFromBottomRightMask()
        )
    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, p=dropout_p
    )  # (B, Tq, nh, hs)
    return out.transpose(1, 2)  # (B, nh, Tq, hs)
