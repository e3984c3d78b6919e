"""Attention backends: ``xformers`` | ``sdpa`` | ``math``, behind one function.

``attention(q, k, v, causal=..., backend=...)`` takes ``q: [B, nh, Tq, hs]`` and
``k, v: [B, nh, Tk, hs]`` and returns ``[B, nh, Tq, hs]``. With ``causal=True``
and ``Tq < Tk`` (decoding with a KV cache) query ``i`` sits at absolute position
``Tk - Tq + i`` and sees keys ``0 .. Tk - Tq + i``; ``Tq > Tk`` is an error there.

* ``math``: explicit softmax(QKᵀ/√hs)V, the reference.
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``.
* ``xformers``: ``xformers.ops.memory_efficient_attention`` (CUDA, optional extra).
* ``auto``: xformers on CUDA tensors where it imports, runs and is faster than sdpa
  (timed once per device), else sdpa. The environment variable ``VQGEN_ATTENTION``
  overrides ``auto``. An explicit ``xformers`` that cannot run is an error naming why.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from vqgen.core.errors import VqgenError

__all__ = ["BACKENDS", "Backend", "attention", "build_mismatch", "resolve_backend",
           "xformers_available", "xformers_build", "xformers_faster", "xformers_installed",
           "xformers_status"]

log = logging.getLogger(__name__)

Backend = Literal["auto", "xformers", "sdpa", "math"]
BACKENDS: tuple[str, ...] = ("auto", "xformers", "sdpa", "math")
ENV = "VQGEN_ATTENTION"


def xformers_build() -> dict[str, str] | None:
    """What the installed xformers was compiled against, read from its wheel's
    ``xformers/cpp_lib.json`` without importing it: ``{"xformers", "torch", "cuda"}``
    (e.g. ``0.0.35``, ``2.10.0+cu128``, ``12.8``); None where xformers is not installed or
    does not say."""
    from importlib import metadata

    try:
        dist = metadata.distribution("xformers")
        info = json.loads(Path(str(dist.locate_file("xformers/cpp_lib.json"))).read_text())
        built = info["version"]
        cuda = int(built["cuda"]) if built.get("cuda") else None  # e.g. 1208
        return {"xformers": dist.version, "torch": str(built["torch"]),
                "cuda": f"{cuda // 100}.{cuda % 100}" if cuda else "none"}
    except (metadata.PackageNotFoundError, OSError, ValueError, KeyError, TypeError):
        return None


def build_mismatch(build: dict[str, str] | None, torch_version: str,
                   cuda_version: str | None) -> str | None:
    """Why an xformers ``build`` (:func:`xformers_build`) does not pair with this torch
    (``torch_version``, its CUDA ``cuda_version``), naming the pair to install; None when
    the torch minor version and the CUDA major version agree (or nothing is known)."""
    if build is None:
        return None
    minor = ".".join(build["torch"].split("+")[0].split(".")[:2])
    ours = ".".join(torch_version.split("+")[0].split(".")[:2])
    cuda_major = (cuda_version or "none").split(".")[0]
    if minor == ours and build["cuda"].split(".")[0] == cuda_major:
        return None
    tag = "cu" + build["cuda"].replace(".", "") if build["cuda"] != "none" else "cpu"
    return (f"xformers {build['xformers']} was built for torch {build['torch']} (CUDA "
            f"{build['cuda']}), and this is torch {torch_version} (CUDA {cuda_version}): "
            f"install that pair (pip install 'torch=={build['torch'].split('+')[0]}' "
            f"--index-url https://download.pytorch.org/whl/{tag}), or an xformers built for "
            f"torch {torch_version}")


def xformers_installed() -> bool:
    """Whether an xformers package is installed (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("xformers") is not None


@functools.lru_cache(maxsize=1)
def xformers_status() -> tuple[bool, str]:
    """Whether xformers runs here, and why not: it must import without complaining about
    the torch it was built for, and run one tiny attention on this CUDA device."""
    if not torch.cuda.is_available():
        return False, "there is no CUDA device (xformers' kernels are CUDA only)"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import xformers
            import xformers.ops as xops
    except Exception as exc:  # ImportError, or a broken install
        return False, (f"xformers does not import ({type(exc).__name__}: {exc}); "
                       "pip install 'vqgen[xformers]' installs a build for your torch")
    built = [str(w.message).split("\n")[0] for w in caught if "built for" in str(w.message)]
    try:
        q = torch.zeros(1, 8, 1, 64, device="cuda", dtype=torch.float16)  # (B, T, nh, hs)
        xops.memory_efficient_attention(q, q, q)
    except Exception as exc:  # a build without kernels for this GPU or this torch
        detail = " ".join(str(exc).split())[:200]
        why = (f"xformers {getattr(xformers, '__version__', '?')} is installed but its kernels "
               f"do not run on this device ({type(exc).__name__}: {detail})")
        pairing = build_mismatch(xformers_build(), torch.__version__, torch.version.cuda)
        if pairing:
            why += f"; {pairing}"
        elif built:
            why += (f"; it says: {built[0]} — install the xformers build for torch "
                    f"{torch.__version__.split('+')[0]}")
        return False, why
    return True, "runs"


def xformers_available() -> bool:
    """Whether xformers imports and runs one tiny attention on this CUDA device."""
    return xformers_status()[0]


@functools.lru_cache(maxsize=8)
def xformers_faster(device: str) -> bool:
    """Whether xformers beats SDPA on ``device`` for a typical prior's attention (bf16,
    batch 8, 16 heads of 64 over 256 positions, causal; median of 5 timed calls)."""
    q = torch.randn(8, 16, 256, 64, device=device, dtype=torch.bfloat16)  # (B, nh, T, hs)
    times = {}
    for name in ("sdpa", "xformers"):
        for _ in range(2):  # warm-up
            attention(q, q, q, causal=True, backend=name)
        laps = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            attention(q, q, q, causal=True, backend=name)
            end.record()
            torch.cuda.synchronize()
            laps.append(start.elapsed_time(end))
        times[name] = sorted(laps)[len(laps) // 2]
    log.info("attention timing on %s: %s ms", device, times)
    return times["xformers"] < times["sdpa"]


_announced: set[str] = set()


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend ``auto`` (or ``$VQGEN_ATTENTION``) means on ``device``:
    ``xformers`` where it runs and is faster than SDPA, else ``sdpa``. An explicit
    ``xformers`` that cannot run here is a :class:`VqgenError` naming why (never a
    silent fallback)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend == "auto" and (env := os.environ.get(ENV, "").strip().lower()):
        if env not in BACKENDS:
            raise ValueError(
                f"unknown attention backend {env!r} in ${ENV}; valid: {', '.join(BACKENDS)}"
            )
        backend = env
    if backend == "auto":
        runs, why = xformers_status() if device.type == "cuda" else (False, "")
        chosen = "xformers" if runs and xformers_faster(str(device)) else "sdpa"
        if (key := f"{device}:{chosen}") not in _announced:
            _announced.add(key)
            if device.type == "cuda" and not runs and xformers_installed():
                # installed for a reason: say why it is not used, never fall back silently
                log.warning("attention backend 'auto' chose 'sdpa' on %s: xformers is "
                            "installed but cannot run: %s", device, why)
            else:
                log.info("attention backend 'auto' chose %r on %s", chosen, device)
        return chosen
    if backend == "xformers":
        if device.type != "cuda":
            raise VqgenError(f"attention: xformers needs a CUDA device, and this model runs on "
                             f"{device.type}; use attention: auto (sdpa here) or sdpa")
        runs, why = xformers_status()
        if not runs:
            raise VqgenError(f"attention: xformers cannot run here: {why}; use attention: auto "
                             "or sdpa")
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
