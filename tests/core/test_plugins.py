"""Plugin discovery: the real installed example package, and faked metadata."""

from __future__ import annotations

import importlib.metadata
import textwrap
from pathlib import Path

import pytest
import torch

import vqgen
from vqgen.core.plugins import BUILTIN_PLUGINS, load_plugins


def test_installed_example_plugin_is_discovered(registry: vqgen.Registry) -> None:
    assert registry.plugins["example"] == "vqgen-plugin-example 0.1.0"
    snake = registry.get("ordering", "snake")
    assert snake.source == "vqgen-plugin-example"
    assert registry.get("conditioner", "brightness").source == "vqgen-plugin-example"
    perm = registry.create("ordering", "snake").permutation(2, 3)
    assert perm.tolist() == [0, 1, 2, 5, 4, 3]
    for mod in BUILTIN_PLUGINS:
        assert registry.plugins[mod] == "built-in"
    assert registry.failures == []


class FakeDist(importlib.metadata.Distribution):
    """A distribution that exists only in memory, advertising vqgen plugins."""

    def __init__(self, name: str, entry_points: dict[str, str]) -> None:
        self._name = name
        self._eps = entry_points

    def read_text(self, filename: str) -> str | None:
        if filename == "METADATA":
            return f"Metadata-Version: 2.1\nName: {self._name}\nVersion: 9.9\n"
        if filename == "entry_points.txt":
            lines = [f"{k} = {v}" for k, v in self._eps.items()]
            return "[vqgen.plugins]\n" + "\n".join(lines) + "\n"
        return None

    def locate_file(self, path: str | Path) -> Path:
        return Path(path)


GOOD = '''
import torch, vqgen

class Diagonal(vqgen.Ordering):
    """Column-major order."""
    def __init__(self) -> None:
        super().__init__()
    def permutation(self, h, w):
        return torch.arange(h * w).reshape(h, w).t().reshape(-1)

@vqgen.hookimpl
def vqgen_register(registry):
    registry.add("ordering", "fake_column_major", Diagonal)
'''
BROKEN = "raise ImportError('needs libfoo 3, found 2')\n"
CLASHING = '''
import vqgen
from vqgen_fake_good import Diagonal

@vqgen.hookimpl
def vqgen_register(registry):
    registry.add("ordering", "row_major_clash", Diagonal)
    registry.add("ordering", "snake", Diagonal)  # already taken by the example package
'''


@pytest.fixture
def fake_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for mod, src in {
        "vqgen_fake_good": GOOD,
        "vqgen_fake_broken": BROKEN,
        "vqgen_fake_clash": CLASHING,
    }.items():
        (tmp_path / f"{mod}.py").write_text(textwrap.dedent(src))
    monkeypatch.syspath_prepend(str(tmp_path))
    dists = [
        FakeDist("fake-broken", {"broken": "vqgen_fake_broken"}),
        FakeDist("fake-good", {"good": "vqgen_fake_good"}),
        FakeDist("fake-clash", {"clash": "vqgen_fake_clash"}),
    ]
    real = list(importlib.metadata.distributions())
    monkeypatch.setattr(importlib.metadata, "distributions", lambda **kw: real + dists)


def test_faked_metadata_broken_plugin_reported_others_load(fake_plugins: None) -> None:
    reg = vqgen.Registry()
    with pytest.warns(RuntimeWarning) as caught:
        load_plugins(reg)
    messages = " | ".join(str(w.message) for w in caught)
    assert "fake-broken" in messages and "fake-clash" in messages
    assert reg.get("ordering", "fake_column_major").source == "fake-good"
    assert reg.create("ordering", "fake_column_major").permutation(2, 2).tolist() == [0, 2, 1, 3]
    assert reg.plugins["good"] == "fake-good 9.9"
    assert reg.get("ordering", "snake").source == "vqgen-plugin-example"  # still loads
    failures = dict(reg.failures)
    broken = next(k for k in failures if k.startswith("broken"))
    assert "distribution fake-broken 9.9" in broken
    assert "ImportError: needs libfoo 3, found 2" in failures[broken]
    clash = next(k for k in failures if k.startswith("clash"))
    assert "duplicate ordering name 'snake'" in failures[clash]
    assert "row_major_clash" not in reg.list("ordering")  # all of a plugin, or none
    assert "broken" not in reg.plugins


def test_disable_autoload_keeps_builtins_only(
    fake_plugins: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VQGEN_DISABLE_PLUGIN_AUTOLOAD", "1")
    reg = vqgen.Registry()
    load_plugins(reg)
    assert set(reg.plugins) == set(BUILTIN_PLUGINS)
    assert "snake" not in reg.list("ordering")
    assert "fake_column_major" not in reg.list("ordering")
    assert reg.failures == []


def test_example_plugin_usable_from_config_file(
    test_registry: vqgen.Registry, tmp_path: Path
) -> None:
    cfg_file = tmp_path / "pipeline.yaml"
    cfg_file.write_text(
        "data: {name: shapes, params: {resolution: 32}}\n"
        "tokenizer: {name: stub_tokenizer}\n"
        "conditioner: {name: brightness, params: {n_bins: 4}}\n"
        "ordering: {name: snake}\n"
        "prior: {name: stub_prior}\n"
    )
    cfg = vqgen.load_config(cfg_file, registry=test_registry)
    ordering = test_registry.create("ordering", cfg.ordering.name, cfg.ordering.params)
    grid = torch.arange(6).reshape(1, 2, 3)
    assert ordering.flatten(grid).tolist() == [[0, 1, 2, 5, 4, 3]]
    cond = test_registry.create("conditioner", cfg.conditioner.name, cfg.conditioner.params)
    image = torch.stack([torch.full((3, 4, 4), -1.0), torch.full((3, 4, 4), 1.0)])
    assert cond.tokens({"image": image}).tolist() == [[0], [3]]
