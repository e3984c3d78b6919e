"""The token cache: a data set encoded once by the trained tokenizer (and conditioner),
for the prior's training and held-out NLL (``run_dir/tokens/<key>/``)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vqgen.core.data import DataWarning, sample_source
from vqgen.core.errors import SampleError, VqgenError
from vqgen.core.layout import META_FILE
from vqgen.core.progress import track

__all__ = ["TokenCache", "state_hash"]


def state_hash(*modules: torch.nn.Module | None) -> str:
    """SHA-256 of the modules' state dicts (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for m in modules:
        h.update(b"<none>" if m is None else type(m).__qualname__.encode())
        if m is None:
            continue
        for name, t in sorted(m.state_dict().items()):
            t = t.detach().cpu().contiguous().reshape(-1)  # (numel,)
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class TokenCache:
    """A dataset encoded once: code grids ``[N, h, w]`` and condition tokens ``[N, Lc]``.

    Stored as ``.npy`` files under ``root/<key>/`` and opened memory-mapped. The
    ``key`` hashes the tokenizer's and conditioner's weights and the data settings,
    so a retrained tokenizer or other data gets a new cache, never a stale one.
    Grids are stored before the ordering is applied: changing the ordering reuses
    the cache. The condition tokens are the conditioner's own ids (not offset).
    """

    def __init__(self, path: Path, *, with_cond: bool | None = None) -> None:
        """Open the cache at ``path``; ``with_cond`` says whether it must hold condition
        tokens (``None``: as its ``meta.json`` says). A cache whose files disagree with
        its ``meta.json`` (a file missing, truncated or of another length) is refused."""
        self.path = Path(path)
        try:
            self.meta = json.loads((self.path / META_FILE).read_text())
            self.codes = np.load(self.path / "codes.npy", mmap_mode="r")  # (N, h, w)
            cond = self.path / "cond.npy"
            self.cond = np.load(cond, mmap_mode="r") if cond.exists() else None  # (N, Lc)
        except (OSError, ValueError) as exc:
            raise VqgenError(f"token cache {self.path} is unreadable ({exc}); delete it") from None
        problem = self._damage(with_cond)
        if problem:
            raise VqgenError(f"token cache {self.path} is damaged: {problem}; delete it (the "
                             "next training run rebuilds it)")

    def _damage(self, with_cond: bool | None) -> str | None:
        """What disagrees between the files and ``meta.json``, or None."""
        meta = self.meta if isinstance(self.meta, dict) else {}
        n = meta.get("n")
        if meta.get("key") not in (None, self.path.name):
            return f"meta.json is for key {meta.get('key')!r}, not {self.path.name!r}"
        if n is not None and self.codes.shape[0] != n:
            return f"codes.npy holds {self.codes.shape[0]} grids, meta.json says {n}"
        recorded = meta.get("has_cond", with_cond)
        if with_cond is not None and recorded is not None and recorded != with_cond:
            return "it was built " + ("with" if recorded else "without") + " a condition"
        if recorded and self.cond is None:
            return "cond.npy (the condition tokens) is missing"
        if self.cond is not None and self.cond.shape[0] != self.codes.shape[0]:
            return (f"cond.npy holds {self.cond.shape[0]} rows, codes.npy "
                    f"{self.codes.shape[0]}")
        for name, ids, vocab in (("codes.npy", self.codes, meta.get("vocab_size")),
                                 ("cond.npy", self.cond, meta.get("cond_vocab_size"))):
            if ids is not None and isinstance(vocab, int) and ids.size:
                lo, hi = int(ids.min()), int(ids.max())  # one streaming pass over the map
                if lo < 0 or hi >= vocab:
                    what = "code" if name == "codes.npy" else "token"
                    return (f"{name} holds {what} {hi if hi >= vocab else lo}, outside "
                            f"[0, {vocab})")
        return None

    def __len__(self) -> int:
        return int(self.codes.shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        out = {"codes": torch.from_numpy(np.asarray(self.codes[index], dtype=np.int64))}
        if self.cond is not None:
            out["cond"] = torch.from_numpy(np.asarray(self.cond[index], dtype=np.int64))
        return out

    @staticmethod
    def key(tokenizer: torch.nn.Module, conditioner: torch.nn.Module | None, data: Any) -> str:
        """The cache key: weights of both stages and the data settings (JSON-able)."""
        spec = json.dumps(data, sort_keys=True, default=str)
        return hashlib.sha256(
            (state_hash(tokenizer) + state_hash(conditioner) + spec).encode()
        ).hexdigest()[:24]

    @classmethod
    def build(
        cls,
        root: str | os.PathLike[str],
        dataset: Any,
        tokenizer: Any,
        conditioner: Any = None,
        *,
        data: Any = None,
        batch_size: int = 64,
        progress: bool = True,
    ) -> TokenCache:
        """Open the cache for these weights and data, encoding the dataset if needed.

        ``data`` describes the dataset (e.g. its config spec) for the key. The
        cache is written to a temporary folder and renamed into place, so an
        interrupted build leaves nothing half-written.
        """
        key = cls.key(tokenizer, conditioner, data)
        path = Path(root) / key
        if (path / META_FILE).exists():
            try:
                return cls(path, with_cond=conditioner is not None)
            except VqgenError as exc:  # derived data: encode it again
                warnings.warn(f"{exc}; rebuilding it", DataWarning, stacklevel=2)
                shutil.rmtree(path)
        if path.parent.exists() and not path.parent.is_dir():
            raise VqgenError(f"the token cache {path.parent} is not a folder; move it away "
                             "(it holds derived data that vqgen writes again)")
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{key}.*"):  # a build that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{key}."))
        try:
            has_cond = _encode_into(tmp, dataset, tokenizer, conditioner, batch_size, progress)
            meta = {"key": key, "n": len(dataset), "data": data, "vocab_size": tokenizer.vocab_size,
                    "has_cond": has_cond,
                    "cond_vocab_size": conditioner.vocab_size if conditioner else None}
            (tmp / META_FILE).write_text(json.dumps(meta, default=str, indent=2))
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls(path)


def _encode_into(folder: Path, dataset: Any, tokenizer: Any, conditioner: Any,
                 batch_size: int, progress: bool) -> bool:
    """Encode ``dataset`` into ``folder/codes.npy`` (and ``cond.npy``: the conditioner's
    tokens), in order, flushed; returns whether there is a ``cond.npy``."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    input_key = getattr(tokenizer, "input_key", "image")  # what the tokenizer encodes
    codes_mm = cond_mm = None
    device = next(iter(tokenizer.parameters()), torch.zeros(())).device
    with torch.no_grad():
        i = 0
        for batch in track(loader, len(loader), desc="encoding tokens",
                           enabled=progress, unit="batch"):
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            codes = tokenizer.encode(batch[input_key]).cpu().numpy()  # (B, h, w)
            try:
                cond = conditioner.tokens(batch).cpu().numpy() if conditioner else None  # (B, Lc)
            except SampleError as err:
                raise err.at(sample_source(dataset, i + err.index, err.key)) from None
            if codes_mm is None:
                n = len(dataset)
                codes_mm = _open_memmap(folder / "codes.npy", _int_dtype(tokenizer.vocab_size),
                                        (n, *codes.shape[1:]))
                if cond is not None:
                    cond_mm = _open_memmap(folder / "cond.npy",
                                           _int_dtype(conditioner.vocab_size),
                                           (n, *cond.shape[1:]))
            codes_mm[i : i + len(codes)] = codes
            if cond_mm is not None:
                cond_mm[i : i + len(codes)] = cond
            i += len(codes)
    for mm in (codes_mm, cond_mm):
        if mm is not None:
            mm.flush()
    return cond_mm is not None


def _open_memmap(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A new ``.npy`` memmap whose blocks are reserved on disk first: a full disk is
    then an OSError here, not a SIGBUS when a page of the map is written later."""
    a = np.lib.format.open_memmap(path, "w+", dtype, shape)
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise VqgenError(f"cannot write the token cache {path}: no space left on "
                                 "device; free some space and run the same command") from None
            # a file system without fallocate: the map is written as before
    return a


def _int_dtype(vocab: int) -> np.dtype:
    """The smallest integer dtype that holds ids ``[0, vocab)``."""
    return np.dtype(np.uint8 if vocab <= 256 else np.int16 if vocab <= 32768 else np.int32)


