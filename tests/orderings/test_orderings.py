"""The six built-in orderings: taming-transformers compatibility, generality, round trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vqgen
from vqgen.core.interfaces import Ordering, signature_problems

NAMES = ["row_major", "spiral_out", "z_curve", "subsample", "alternate", "spiral_in"]

# One instance per name, built through the registry (so registration is tested too)
# and shared so that the permutation cache is exercised across tests.
ORDERINGS: dict[str, Ordering] = {
    n: vqgen.default_registry().create("ordering", n) for n in NAMES
}

# forward_shuffle_idx of taming/modules/transformer/permuter.py for n x n grids
# (Identity, SpiralOut, ZCurve, Subsample, AlternateParsing, SpiralIn).
TAMING = {
    "row_major": {
        2: [0, 1, 2, 3],
        4: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
        8: [
            0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
            16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31,
            32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47,
            48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63,
        ],
    },
    "spiral_out": {
        2: [2, 0, 1, 3],
        4: [9, 5, 6, 10, 14, 13, 12, 8, 4, 0, 1, 2, 3, 7, 11, 15],
        8: [
            35, 27, 28, 36, 44, 43, 42, 34, 26, 18, 19, 20, 21, 29, 37, 45,
            53, 52, 51, 50, 49, 41, 33, 25, 17, 9, 10, 11, 12, 13, 14, 22,
            30, 38, 46, 54, 62, 61, 60, 59, 58, 57, 56, 48, 40, 32, 24, 16,
            8, 0, 1, 2, 3, 4, 5, 6, 7, 15, 23, 31, 39, 47, 55, 63,
        ],
    },
    "z_curve": {
        2: [0, 1, 2, 3],
        4: [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15],
        8: [
            0, 1, 8, 9, 2, 3, 10, 11, 16, 17, 24, 25, 18, 19, 26, 27,
            4, 5, 12, 13, 6, 7, 14, 15, 20, 21, 28, 29, 22, 23, 30, 31,
            32, 33, 40, 41, 34, 35, 42, 43, 48, 49, 56, 57, 50, 51, 58, 59,
            36, 37, 44, 45, 38, 39, 46, 47, 52, 53, 60, 61, 54, 55, 62, 63,
        ],
    },
    "subsample": {
        2: [0, 1, 2, 3],
        4: [0, 2, 8, 10, 1, 3, 9, 11, 4, 6, 12, 14, 5, 7, 13, 15],
        8: [
            0, 4, 32, 36, 2, 6, 34, 38, 16, 20, 48, 52, 18, 22, 50, 54,
            1, 5, 33, 37, 3, 7, 35, 39, 17, 21, 49, 53, 19, 23, 51, 55,
            8, 12, 40, 44, 10, 14, 42, 46, 24, 28, 56, 60, 26, 30, 58, 62,
            9, 13, 41, 45, 11, 15, 43, 47, 25, 29, 57, 61, 27, 31, 59, 63,
        ],
    },
    "alternate": {
        2: [0, 1, 3, 2],
        4: [0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11, 15, 14, 13, 12],
        8: [
            0, 1, 2, 3, 4, 5, 6, 7, 15, 14, 13, 12, 11, 10, 9, 8,
            16, 17, 18, 19, 20, 21, 22, 23, 31, 30, 29, 28, 27, 26, 25, 24,
            32, 33, 34, 35, 36, 37, 38, 39, 47, 46, 45, 44, 43, 42, 41, 40,
            48, 49, 50, 51, 52, 53, 54, 55, 63, 62, 61, 60, 59, 58, 57, 56,
        ],
    },
    "spiral_in": {
        2: [3, 1, 0, 2],
        4: [15, 11, 7, 3, 2, 1, 0, 4, 8, 12, 13, 14, 10, 6, 5, 9],
        8: [
            63, 55, 47, 39, 31, 23, 15, 7, 6, 5, 4, 3, 2, 1, 0, 8,
            16, 24, 32, 40, 48, 56, 57, 58, 59, 60, 61, 62, 54, 46, 38, 30,
            22, 14, 13, 12, 11, 10, 9, 17, 25, 33, 41, 49, 50, 51, 52, 53,
            45, 37, 29, 21, 20, 19, 18, 26, 34, 42, 43, 44, 36, 28, 27, 35,
        ],
    },
}


def perm(name: str, h: int, w: int) -> list[int]:
    p = ORDERINGS[name].permutation(h, w)
    assert p.dtype == torch.int64 and p.shape == (h * w,)
    return p.tolist()


def test_registered() -> None:
    assert set(NAMES) <= set(vqgen.default_registry().list("ordering"))
    for name in NAMES:
        assert isinstance(ORDERINGS[name], Ordering)
        assert signature_problems(type(ORDERINGS[name])) == []


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("name", NAMES)
def test_taming_literals(name: str, n: int) -> None:
    assert perm(name, n, n) == TAMING[name][n]


# -- independent references, each stated differently from the implementation -------------


def _bits(x: int, k: int) -> str:
    return format(x, f"0{k}b") if k else ""


def ref_z_curve(h: int, w: int) -> list[int]:
    """Sort by the binary string that interleaves row and column bits (row bit first)."""
    k = max(h, w).bit_length()
    key = [
        "".join(a + b for a, b in zip(_bits(i // w, k), _bits(i % w, k), strict=True))
        for i in range(h * w)
    ]
    return sorted(range(h * w), key=lambda i: key[i])


def ref_subsample(h: int, w: int) -> list[int]:
    """Square powers of two: position = interleaved bits of (row, col), least significant
    bits first (the 2x2 phase of the finest level is the most significant digit)."""
    k = h.bit_length() - 1
    key = [
        "".join(a + b for a, b in zip(_bits(i // w, k)[::-1], _bits(i % w, k)[::-1], strict=True))
        for i in range(h * w)
    ]
    return sorted(range(h * w), key=lambda i: key[i])


def ref_spiral_out(h: int, w: int) -> list[int]:
    """Even squares: a turtle from (n/2, n/2-1) turning up, right, down, left with runs
    1, 1, 2, 2, ..., n-1, n-1 and a final run of n-1."""
    n = h
    r, c = n // 2, n // 2 - 1
    out = [r * n + c]
    runs = [k for k in range(1, n) for _ in (0, 1)] + [n - 1]
    for t, run in enumerate(runs):
        dr, dc = [(-1, 0), (0, 1), (1, 0), (0, -1)][t % 4]
        for _ in range(run):
            r, c = r + dr, c + dc
            out.append(r * n + c)
    return out


def ref_alternate(h: int, w: int) -> list[int]:
    return [r * w + (c if r % 2 == 0 else w - 1 - c) for r in range(h) for c in range(w)]


REFERENCE = {
    "row_major": lambda h, w: list(range(h * w)),
    "spiral_out": ref_spiral_out,
    "z_curve": ref_z_curve,
    "subsample": ref_subsample,
    "alternate": ref_alternate,
    "spiral_in": lambda h, w: ref_spiral_out(h, w)[::-1],
}


@pytest.mark.parametrize("name", NAMES)
def test_references_agree_with_taming_literals(name: str) -> None:
    for n, expected in TAMING[name].items():
        assert REFERENCE[name](n, n) == expected


@pytest.mark.parametrize("n", [2, 4, 8, 16, 32, 64])
@pytest.mark.parametrize("name", NAMES)
def test_power_of_two_squares_match_reference(name: str, n: int) -> None:
    assert perm(name, n, n) == REFERENCE[name](n, n)


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 48), w=st.integers(1, 48))
def test_taming_sizes_beyond_squares(h: int, w: int) -> None:
    # taming's ZCurve, AlternateParsing and Identity accept any H, W: match them everywhere.
    for name in ("row_major", "z_curve", "alternate"):
        assert perm(name, h, w) == REFERENCE[name](h, w)


# -- the documented generalisation to any h x w --------------------------------------------

# Sequence position of each cell (the inverse permutation), as a grid: easy to read.
GENERAL = {
    ("spiral_out", 3, 3): [[4, 5, 6], [3, 0, 7], [2, 1, 8]],
    ("spiral_out", 3, 5): [[8, 9, 10, 11, 12], [7, 0, 1, 2, 13], [6, 5, 4, 3, 14]],
    ("spiral_out", 2, 3): [[2, 3, 4], [1, 0, 5]],
    ("spiral_in", 3, 3): [[4, 3, 2], [5, 8, 1], [6, 7, 0]],
    ("spiral_in", 1, 4): [[3, 2, 1, 0]],
    ("spiral_in", 4, 1): [[3], [2], [1], [0]],
    ("subsample", 3, 3): [[0, 4, 1], [6, 8, 7], [2, 5, 3]],
    ("subsample", 3, 5): [[0, 6, 2, 7, 1], [10, 13, 12, 14, 11], [3, 8, 5, 9, 4]],
    ("subsample", 1, 4): [[0, 2, 1, 3]],
    ("subsample", 2, 4): [[0, 2, 1, 3], [4, 6, 5, 7]],
    ("z_curve", 3, 5): [[0, 1, 4, 5, 12], [2, 3, 6, 7, 13], [8, 9, 10, 11, 14]],
    ("alternate", 3, 2): [[0, 1], [3, 2], [4, 5]],
}


@pytest.mark.parametrize(("name", "h", "w"), list(GENERAL))
def test_general_sizes_literals(name: str, h: int, w: int) -> None:
    assert ORDERINGS[name].inverse(h, w).reshape(h, w).tolist() == GENERAL[name, h, w]


@pytest.mark.parametrize("name", NAMES)
def test_one_by_one(name: str) -> None:
    assert perm(name, 1, 1) == [0]


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 48), w=st.integers(1, 48))
def test_spirals_are_connected_and_mutually_reversed(h: int, w: int) -> None:
    out, into = perm("spiral_out", h, w), perm("spiral_in", h, w)
    assert out == into[::-1]
    assert into[0] == h * w - 1  # spiral_in starts at the bottom-right corner
    for name in ("spiral_out", "alternate"):
        p = np.array(perm(name, h, w))
        r, c = np.divmod(p, w)
        assert np.all(np.abs(np.diff(r)) + np.abs(np.diff(c)) == 1)  # neighbours only


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 48), w=st.integers(1, 48))
def test_subsample_recursion(h: int, w: int) -> None:
    # the (even row, even col) cells come first, ordered as subsample orders that sub-grid
    p = perm("subsample", h, w)
    hh, ww = (h + 1) // 2, (w + 1) // 2
    head = [(i // w // 2) * ww + (i % w) // 2 for i in p[: hh * ww]]
    assert all((i // w) % 2 == 0 and (i % w) % 2 == 0 for i in p[: hh * ww])
    assert head == perm("subsample", hh, ww)


# -- every ordering: a bijection, and flatten / unflatten round trips ----------------------


@settings(max_examples=80, deadline=None)
@given(name=st.sampled_from(NAMES), h=st.integers(1, 48), w=st.integers(1, 48))
def test_bijection(name: str, h: int, w: int) -> None:
    p = ORDERINGS[name].permutation(h, w)
    assert p.dtype == torch.int64 and p.shape == (h * w,)
    assert torch.equal(torch.sort(p).values, torch.arange(h * w))
    inv = ORDERINGS[name].inverse(h, w)
    assert torch.equal(p[inv], torch.arange(h * w))


@settings(max_examples=80, deadline=None)
@given(
    name=st.sampled_from(NAMES),
    h=st.integers(1, 48),
    w=st.integers(1, 48),
    b=st.integers(1, 3),
    rest=st.sampled_from([(), (2,), (3, 2)]),
    seed=st.integers(0, 2**16),
)
def test_round_trip(name: str, h: int, w: int, b: int, rest: tuple[int, ...], seed: int) -> None:
    o = ORDERINGS[name]
    g = torch.Generator().manual_seed(seed)
    grid = torch.randint(0, 1000, (b, h, w, *rest), generator=g)  # (B, h, w, *rest)
    seq = o.flatten(grid)  # (B, h*w, *rest)
    assert seq.shape == (b, h * w, *rest)
    # sequence position i holds the cell whose raster index is permutation[i]
    assert torch.equal(seq, grid.reshape(b, h * w, *rest)[:, o.permutation(h, w)])
    assert torch.equal(o.unflatten(seq, h, w), grid)
    other = torch.randint(0, 1000, (b, h * w, *rest), generator=g)
    assert torch.equal(o.flatten(o.unflatten(other, h, w)), other)
