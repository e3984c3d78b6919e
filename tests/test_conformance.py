"""Conformance: every registered component of every kind, checked the same way.

New plugins (built-in or installed) are picked up automatically. A component
whose Params have required fields provides ``example_params(tmp_path) -> dict``
as a classmethod so that it can be built here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import vqgen
from vqgen.core.config import SECTIONS, dump_config, load_config, parse_config
from vqgen.core.interfaces import signature_problems

REGISTRY = vqgen.default_registry()
ENTRIES = list(REGISTRY.entries())
SECTION_OF = {kind: section for section, kind in SECTIONS.items()}


def params_for(entry: Any, tmp_path: Path) -> dict[str, Any]:
    """Default params, or the component's own example where some are required."""
    required = [n for n, f in entry.params_model.model_fields.items() if f.is_required()]
    if not required:
        return {}
    example = getattr(entry.cls, "example_params", None)
    assert example is not None, (
        f"{entry.kind} {entry.name!r} has required params {required}; "
        "give it a classmethod example_params(tmp_path) -> dict"
    )
    return dict(example(tmp_path))


@pytest.fixture(params=ENTRIES, ids=lambda e: f"{e.kind}:{e.name}")
def entry(request: pytest.FixtureRequest) -> Any:
    return request.param


def test_registry_is_not_empty() -> None:
    kinds = {e.kind for e in ENTRIES}
    assert {"ordering", "dataset", "sampler", "conditioner"} <= kinds, kinds


def test_constructor_takes_exactly_the_params(entry: Any) -> None:
    assert signature_problems(entry.cls) == []
    assert entry.cls.__doc__, f"{entry.kind} {entry.name!r} needs a docstring"


def test_created_from_default_params(entry: Any, tmp_path: Path,
                                    test_registry: vqgen.Registry) -> None:
    """Built from its defaults once a config has wired the sizes that follow from the
    other stages (``"auto"``: a prior's vocabulary, grid, block size)."""
    spec = _wired(entry, params_for(entry, tmp_path), test_registry)
    obj = test_registry.create(entry.kind, entry.name, spec.params)
    assert isinstance(obj, entry.cls)
    check = KIND_CHECKS.get(entry.kind)
    if check:
        check(obj)


@pytest.mark.parametrize("suffix", [".yaml", ".toml", ".json"])
def test_params_round_trip_through_a_config_file(
    entry: Any, suffix: str, tmp_path: Path, test_registry: vqgen.Registry
) -> None:
    given = params_for(entry, tmp_path)
    cfg = _config(entry, given, test_registry)
    path = dump_config(cfg, tmp_path / f"cfg{suffix}", test_registry)
    again = load_config(path, test_registry)
    assert again == cfg
    spec = getattr(again, SECTION_OF[entry.kind])
    kept = test_registry.validate_params(entry.kind, entry.name, spec.params).model_dump()
    assert {k: kept[k] for k in given} == entry.params_model.model_validate(given).model_dump(
        include=set(given))  # what the user gave is kept as given


def _config(entry: Any, params: dict[str, Any], registry: vqgen.Registry) -> Any:
    """A config with ``entry`` in its section (a stand-in tokenizer, shapes data)."""
    base: dict[str, Any] = {
        "data": {"name": "shapes"},
        "tokenizer": {"name": "stub_tokenizer"},
    }
    if getattr(entry.cls, "needs_class_condition", False):  # e.g. rejection sampling
        base["conditioner"] = {"name": "class"}
    base[SECTION_OF[entry.kind]] = {"name": entry.name, "params": params}
    return parse_config(base, registry=registry)


def _wired(entry: Any, params: dict[str, Any], registry: vqgen.Registry) -> Any:
    return getattr(_config(entry, params, registry), SECTION_OF[entry.kind])


# -- per-kind behaviour -----------------------------------------------------
def check_ordering(ordering: vqgen.Ordering) -> None:
    for h, w in [(1, 1), (1, 5), (4, 4), (3, 7), (8, 2)]:
        perm = ordering.permutation(h, w)
        assert torch.equal(torch.sort(torch.as_tensor(perm)).values, torch.arange(h * w))
        grid = torch.randint(0, 100, (2, h, w))
        assert torch.equal(ordering.unflatten(ordering.flatten(grid), h, w), grid)


def check_sampler(sampler: vqgen.Sampler) -> None:
    logits = torch.randn(4, 50)  # (B, V)
    warped = sampler.warp(logits)
    assert warped.shape == logits.shape
    assert torch.isfinite(warped).any(dim=1).all()
    g = torch.Generator().manual_seed(0)
    tokens = sampler.sample(logits, generator=g)
    assert tokens.shape == (4,) and tokens.dtype == torch.int64
    assert torch.isfinite(warped.gather(1, tokens[:, None])).all()


def check_dataset(dataset: Any) -> None:
    sample = dataset[0]
    image = sample["image"]
    assert image.dtype == torch.float32 and image.ndim == 3 and image.shape[0] == 3
    assert image.min() >= -1 and image.max() <= 1
    assert len(dataset) > 0


def check_conditioner(cond: vqgen.Conditioner) -> None:
    assert isinstance(cond.vocab_size, int) and cond.vocab_size > 0


KIND_CHECKS = {
    "ordering": check_ordering,
    "sampler": check_sampler,
    "dataset": check_dataset,
    "conditioner": check_conditioner,
}
