"""Token cache: encoded once, keyed by weights and data, atomic."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import vqgen
from vqgen.training.tokens import TokenCache, state_hash
from vqgen_test_stubs import StubConditioner, StubTokenizer


class WeightedTokenizer(StubTokenizer):
    """The stub tokenizer with a weight, so that retraining changes its hash."""

    def __init__(self, n_embed: int = 16, downsample: int = 4) -> None:
        super().__init__(n_embed=n_embed, downsample=downsample)
        self.shift = torch.nn.Parameter(torch.zeros(()))
        self.calls = 0

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return (super().encode(x) + self.shift.round().long()) % self.vocab_size


@pytest.fixture
def data() -> torch.utils.data.Dataset:
    return vqgen.create("dataset", "shapes", {"resolution": 32, "length": 40})


def test_cache_holds_the_encoded_dataset(tmp_path: Path, data: torch.utils.data.Dataset) -> None:
    tok, cond = WeightedTokenizer(), StubConditioner()
    cache = TokenCache.build(tmp_path, data, tok, cond, data={"name": "shapes"}, batch_size=16,
                             progress=False)
    assert len(cache) == 40 and tok.calls == 3
    for i in (0, 17, 39):
        sample = data[i]
        expected = tok.encode(sample["image"][None])[0]
        item = cache[i]
        assert item["codes"].dtype == torch.int64 and torch.equal(item["codes"], expected)
        assert item["cond"].tolist() == [int(sample["label"])]
    assert cache.codes.dtype.itemsize == 1  # 16 codes fit in uint8

    calls = tok.calls
    again = TokenCache.build(tmp_path, data, tok, cond, data={"name": "shapes"}, progress=False)
    assert again.path == cache.path and tok.calls == calls  # reused, not re-encoded


def test_changed_tokenizer_or_data_invalidates(
    tmp_path: Path, data: torch.utils.data.Dataset
) -> None:
    tok = WeightedTokenizer()
    a = TokenCache.build(tmp_path, data, tok, data={"res": 32}, progress=False)
    h = state_hash(tok)
    with torch.no_grad():
        tok.shift.fill_(3.0)
    assert state_hash(tok) != h
    b = TokenCache.build(tmp_path, data, tok, data={"res": 32}, progress=False)
    assert b.path != a.path
    assert torch.equal(b[0]["codes"], (a[0]["codes"] + 3) % 16)
    c = TokenCache.build(tmp_path, data, tok, data={"res": 64}, progress=False)
    assert c.path not in (a.path, b.path)
    assert "cond" not in a[0]


def test_interrupted_build_leaves_nothing(tmp_path: Path, data: torch.utils.data.Dataset) -> None:
    tok = WeightedTokenizer()

    def boom(x: torch.Tensor) -> torch.Tensor:
        tok.calls += 1
        if tok.calls == 2:
            raise KeyboardInterrupt
        return StubTokenizer.encode(tok, x)

    tok.encode = boom  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        TokenCache.build(tmp_path, data, tok, batch_size=16, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_unreadable_cache_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "meta.json").write_text("{}")
    (tmp_path / "codes.npy").write_bytes(b"not numpy")
    with pytest.raises(vqgen.VqgenError, match="token cache .* is unreadable"):
        TokenCache(tmp_path)


@pytest.mark.parametrize("damage", ["cond_deleted", "codes_truncated", "meta_of_another",
                                    "code_out_of_range", "cond_out_of_range"])
def test_a_damaged_cache_is_refused_on_open_and_rebuilt_by_build(
    tmp_path: Path, data: torch.utils.data.Dataset, damage: str
) -> None:
    import json

    import numpy as np

    tok, cond = WeightedTokenizer(), StubConditioner()
    build = lambda: TokenCache.build(tmp_path, data, tok, cond,  # noqa: E731
                                     data={"name": "shapes"}, progress=False)
    cache = build()
    codes = np.array(cache.codes)
    conds = np.array(cache.cond)
    if damage == "cond_deleted":
        (cache.path / "cond.npy").unlink()
        says = "cond.npy (the condition tokens) is missing"
    elif damage == "codes_truncated":
        np.save(cache.path / "codes.npy", codes[:10])
        says = "codes.npy holds 10 grids, meta.json says 40"
    elif damage == "code_out_of_range":
        bad = codes.copy()
        bad[7, 1, 2] = 200
        np.save(cache.path / "codes.npy", bad)
        says = "codes.npy holds code 200, outside [0, 16)"
    elif damage == "cond_out_of_range":
        bad = conds.copy()
        bad[3, 0] = 9
        np.save(cache.path / "cond.npy", bad)
        says = "cond.npy holds token 9, outside [0, 4)"
    else:
        meta = json.loads((cache.path / "meta.json").read_text())
        (cache.path / "meta.json").write_text(json.dumps({**meta, "key": "0" * 24}))
        says = "meta.json is for key"
    with pytest.raises(vqgen.VqgenError, match=re.escape(f"{cache.path} is damaged: {says}")):
        TokenCache(cache.path)
    calls = tok.calls
    with pytest.warns(UserWarning, match="rebuilding it"):
        again = build()
    assert tok.calls > calls  # encoded again
    assert np.array_equal(again.codes, codes) and np.array_equal(again.cond, conds)


def test_a_cache_built_without_a_condition_is_not_used_with_one(
    tmp_path: Path, data: torch.utils.data.Dataset
) -> None:
    tok = WeightedTokenizer()
    plain = TokenCache.build(tmp_path, data, tok, data={"name": "shapes"}, progress=False)
    with pytest.raises(vqgen.VqgenError, match="built without a condition"):
        TokenCache(plain.path, with_cond=True)


def test_a_full_disk_is_an_error_before_the_cache_is_written(
    tmp_path: Path, data: torch.utils.data.Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache's blocks are reserved first, so a full disk is a clear error (not a
    SIGBUS when a page of the memory map is written); nothing is left behind."""
    import errno
    import os

    from vqgen.core.errors import VqgenError

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(VqgenError, match="token cache .*codes.npy: no space left on device"):
        TokenCache.build(tmp_path, data, StubTokenizer(), data={"name": "shapes"},
                         progress=False)
    assert list(tmp_path.iterdir()) == []
