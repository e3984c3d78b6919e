"""Attention backends agree with the explicit-softmax reference; `auto` and the env override."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml

import vqgen
from vqgen.cli import main
from vqgen.core import attention as attn_mod
from vqgen.core.attention import attention, resolve_backend, xformers_available
from vqgen.core.errors import VqgenError

CPU = torch.device("cpu")
TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def qkv(
    tq: int, tk: int, *, b: int = 2, nh: int = 3, hs: int = 16, seed: int = 0, **kw: object
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, nh, tq, hs, generator=g)  # (B, nh, Tq, hs)
    k = torch.randn(b, nh, tk, hs, generator=g)  # (B, nh, Tk, hs)
    v = torch.randn(b, nh, tk, hs, generator=g)  # (B, nh, Tk, hs)
    return tuple(t.to(**kw) for t in (q, k, v))  # type: ignore[return-value]


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(attn_mod.ENV, raising=False)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("tq", "tk"), [(17, 17), (1, 9), (5, 12), (1, 1)])
def test_sdpa_matches_math_fp32(causal: bool, tq: int, tk: int) -> None:
    q, k, v = qkv(tq, tk)
    ref = attention(q, k, v, causal=causal, backend="math")
    out = attention(q, k, v, causal=causal, backend="sdpa")
    assert out.shape == (2, 3, tq, 16)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_math_causal_is_masked_softmax() -> None:
    q, k, v = qkv(6, 6)
    att = (q @ k.transpose(-2, -1)) / 4.0  # (B, nh, T, T), hs = 16
    att = att.masked_fill(torch.ones(6, 6).triu(1).bool(), float("-inf"))
    ref = torch.softmax(att, dim=-1) @ v
    torch.testing.assert_close(attention(q, k, v, causal=True, backend="math"), ref)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_kv_case_equals_last_rows_of_full_attention(backend: str) -> None:
    """Tq < Tk: query i sits at absolute position Tk - Tq + i (decoding with a KV cache)."""
    q, k, v = qkv(10, 10)
    full = attention(q, k, v, causal=True, backend=backend)  # (B, nh, 10, hs)
    for tq in (1, 3):
        part = attention(q[:, :, -tq:], k, v, causal=True, backend=backend)
        torch.testing.assert_close(part, full[:, :, -tq:], atol=1e-5, rtol=1e-5)


def test_gradients_agree() -> None:
    grads = {}
    for backend in ("math", "sdpa"):
        q, k, v = (t.requires_grad_() for t in qkv(9, 9))
        attention(q, k, v, causal=True, backend=backend).square().sum().backward()
        grads[backend] = [t.grad for t in (q, k, v)]
    for a, b in zip(grads["math"], grads["sdpa"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_causal_with_more_queries_than_keys_is_an_error() -> None:
    q, k, v = qkv(5, 3)
    with pytest.raises(ValueError, match="Tq=5 > Tk=3"):
        attention(q, k, v, causal=True, backend="math")


def test_auto_resolves_to_sdpa_on_cpu_and_says_so_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(attn_mod, "_announced", set())
    with caplog.at_level(logging.INFO, logger="vqgen.core.attention"):
        assert resolve_backend("auto", CPU) == "sdpa"
        q, k, v = qkv(4, 4)
        attention(q, k, v, causal=True)
        attention(q, k, v, causal=True, backend="auto")
    said = [r for r in caplog.records if "chose" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO
    assert "'sdpa'" in said[0].getMessage()


def test_env_overrides_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VQGEN_ATTENTION", "math")
    assert resolve_backend("auto", CPU) == "math"
    q, k, v = qkv(7, 7)
    ref = attention(q, k, v, causal=True, backend="math")

    def no_sdpa(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("sdpa must not run under VQGEN_ATTENTION=math")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", no_sdpa)
    assert torch.equal(attention(q, k, v, causal=True), ref)
    # an explicit backend is kept
    assert resolve_backend("sdpa", CPU) == "sdpa"


def test_unknown_backend_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v = qkv(3, 3)
    with pytest.raises(ValueError, match=r"unknown attention backend 'flash'.*sdpa"):
        attention(q, k, v, backend="flash")
    monkeypatch.setenv("VQGEN_ATTENTION", "fast")
    with pytest.raises(ValueError, match=r"'fast' in \$VQGEN_ATTENTION"):
        resolve_backend("auto", CPU)


def test_xformers_on_cpu_is_a_clear_error() -> None:
    q, k, v = qkv(3, 3)
    with pytest.raises(VqgenError, match="xformers needs a CUDA device.*cpu"):
        attention(q, k, v, backend="xformers")


CUDA = torch.device("cuda")  # a device object: nothing runs on it in these tests


@pytest.mark.parametrize("status, faster, want", [
    ((True, "runs"), True, "xformers"),  # runs and is faster: chosen
    ((True, "runs"), False, "sdpa"),  # runs but slower: sdpa
    ((False, "no kernels"), True, "sdpa"),  # cannot run: sdpa (auto may fall back)
])
def test_auto_picks_xformers_only_where_it_runs_and_is_faster(
        status: tuple[bool, str], faster: bool, want: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    timed: list[str] = []
    monkeypatch.setattr(attn_mod, "xformers_status", lambda: status)
    monkeypatch.setattr(attn_mod, "xformers_faster",
                        lambda device: timed.append(device) or faster)
    monkeypatch.delenv("VQGEN_ATTENTION", raising=False)
    assert resolve_backend("auto", CUDA) == want
    assert timed == (["cuda"] if status[0] else [])  # timed only where it runs
    assert resolve_backend("auto", CPU) == "sdpa"  # never xformers on the CPU


def test_explicit_xformers_that_cannot_run_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    why = ("xformers 0.0.99 is installed but its kernels do not run on this device "
           "(NotImplementedError: no operator found)")
    monkeypatch.setattr(attn_mod, "xformers_status", lambda: (False, why))
    with pytest.raises(VqgenError, match=r"xformers cannot run here: xformers 0\.0\.99 .*"
                       r"no operator found"):
        resolve_backend("xformers", CUDA)
    monkeypatch.setattr(attn_mod, "xformers_status", lambda: (True, "runs"))
    assert resolve_backend("xformers", CUDA) == "xformers"  # kept, never replaced


def test_xformers_status_without_cuda_names_the_reason() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    runs, why = attn_mod.xformers_status()
    assert not runs and "no CUDA device" in why


def test_the_prior_stage_reports_its_backend_and_refuses_one_that_cannot_run(
        tmp_path: Path) -> None:
    cfg = yaml.safe_load(TINY.read_text())
    run = tmp_path / "run"
    assert main(["train", str(TINY), "--run-dir", str(run)]) == 0
    prior = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["stage"] == "prior"]
    assert prior and all(r["attention"] == "sdpa" for r in prior)  # auto on the CPU
    cfg["prior"]["params"]["attention"] = "xformers"
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(VqgenError, match="xformers needs a CUDA device"):
        vqgen.train(path, tmp_path / "x", stages=("tokenizer", "prior"))
    assert not (tmp_path / "x" / "prior").exists()  # refused before the prior trained


@pytest.mark.parametrize(("tq", "tk"), [(64, 64), (1, 64), (8, 40)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_xformers_matches_sdpa_bf16(tq: int, tk: int, causal: bool) -> None:
    if not xformers_available():
        pytest.skip("xformers is not installed or does not run on this GPU")
    q, k, v = qkv(tq, tk, b=2, nh=4, hs=64, device="cuda", dtype=torch.bfloat16)
    # small values keep outputs below 0.5, where one bf16 rounding step is under 2e-3: the
    # kernels may round differently, a wrong mask or scale misses by far more
    v = v * 0.1
    ref = attention(q, k, v, causal=causal, backend="sdpa")
    out = attention(q, k, v, causal=causal, backend="xformers")
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-3, rtol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sdpa_matches_math_on_cuda_fp32() -> None:
    q, k, v = qkv(33, 33, device="cuda")
    ref = attention(q, k, v, causal=True, backend="math")
    torch.testing.assert_close(
        attention(q, k, v, causal=True, backend="sdpa"), ref, atol=1e-5, rtol=1e-5
    )


def _fake_xformers(root: Path, cpp_lib: str) -> None:
    """An installed-looking xformers 0.0.35 (metadata and cpp_lib.json only) under root."""
    info = root / "xformers-0.0.35.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: xformers\nVersion: 0.0.35\n")
    (root / "xformers").mkdir()
    (root / "xformers" / "cpp_lib.json").write_text(cpp_lib)


def test_xformers_build_is_read_from_the_wheel_without_importing_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_xformers(tmp_path, '{"version": {"cuda": 1208, "torch": "2.10.0+cu128"}}')
    monkeypatch.syspath_prepend(str(tmp_path))
    assert attn_mod.xformers_build() == {"xformers": "0.0.35", "torch": "2.10.0+cu128",
                                         "cuda": "12.8"}
    (tmp_path / "xformers" / "cpp_lib.json").write_text("{not json")
    assert attn_mod.xformers_build() is None  # a build that does not say: nothing claimed


BUILT = {"xformers": "0.0.35", "torch": "2.10.0+cu128", "cuda": "12.8"}


@pytest.mark.parametrize("torch_version, cuda, pairs", [
    ("2.10.0+cu128", "12.8", True),
    ("2.10.1+cu126", "12.6", True),  # same torch minor, same CUDA major
    ("2.14.1+cu130", "13.0", False),  # the machine's torch: another minor and CUDA major
    ("2.10.0+cu130", "13.0", False),  # another CUDA major only
    ("2.11.0+cu128", "12.8", False),  # another torch minor only
])
def test_an_xformers_build_pairs_with_torch_or_names_the_pair_to_install(
        torch_version: str, cuda: str, pairs: bool) -> None:
    why = attn_mod.build_mismatch(BUILT, torch_version, cuda)
    assert (why is None) == pairs
    if not pairs:
        assert f"this is torch {torch_version} (CUDA {cuda})" in why
        assert "pip install 'torch==2.10.0' --index-url https://download.pytorch.org/whl/cu128" \
            in why
    assert attn_mod.build_mismatch(None, torch_version, cuda) is None


def test_auto_says_why_an_installed_xformers_is_not_used(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    why = "xformers 0.0.35 was built for torch 2.10.0+cu128 (CUDA 12.8), and this is ..."
    monkeypatch.setattr(attn_mod, "_announced", set())
    monkeypatch.setattr(attn_mod, "xformers_status", lambda: (False, why))
    monkeypatch.delenv("VQGEN_ATTENTION", raising=False)
    for installed, level in ((True, logging.WARNING), (False, logging.INFO)):
        monkeypatch.setattr(attn_mod, "_announced", set())
        monkeypatch.setattr(attn_mod, "xformers_installed", lambda i=installed: i)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="vqgen.core.attention"):
            assert resolve_backend("auto", CUDA) == "sdpa"
        [said] = [r for r in caplog.records if "chose" in r.getMessage()]
        assert said.levelno == level
        assert (why in said.getMessage()) == installed
