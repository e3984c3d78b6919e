"""A custom registry reaches nested components: a spatial conditioner's own tokenizer,
the rejection sampler's inner sampler, a chain's steps, and wiring, training and loading.

Each check registers a component in a *copy* of the default registry only; building from
the default registry must fail on that name, building from the copy must use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import vqgen
from vqgen.core.config import parse_config
from vqgen.core.registry import ComponentError, Registry, current_registry, default_registry
from vqgen.plugins.vqgan import VQGAN
from vqgen.samplers.top_k import TopK

pytestmark = pytest.mark.usefixtures("one_thread")

MAP_VQ: dict[str, Any] = {"ch": 8, "ch_mult": [1, 2, 2], "norm_groups": 4, "z_channels": 4,
                          "embed_dim": 4, "n_embed": 8, "perceptual_weight": 0.0,
                          "disc_weight": 0.0, "kmeans_init": False}


class LocalVQGAN(VQGAN):
    """A VQGAN known only to the custom registry."""


class LocalTopK(TopK):
    """A top-k sampler known only to the custom registry."""


@pytest.fixture()
def custom() -> Registry:
    reg = default_registry().copy()
    reg.add("tokenizer", "local_vqgan", LocalVQGAN)
    reg.add("sampler", "local_top_k", LocalTopK)
    return reg


def test_current_registry_is_the_builder_during_construction_only(custom: Registry) -> None:
    assert current_registry() is default_registry()
    with custom.building():
        assert current_registry() is custom
        with default_registry().building():
            assert current_registry() is default_registry()
        assert current_registry() is custom
    assert current_registry() is default_registry()


def test_a_conditioners_own_tokenizer_comes_from_the_building_registry(
    custom: Registry,
) -> None:
    params = {"tokenizer": {"name": "local_vqgan", "params": MAP_VQ}}
    cond = custom.create("conditioner", "depth", params)
    assert type(cond.tokenizer) is LocalVQGAN
    with pytest.raises(vqgen.VqgenError, match="local_vqgan"):
        default_registry().create("conditioner", "depth", params)


@pytest.mark.parametrize("name, params", [
    ("rejection", {"inner": {"name": "local_top_k", "params": {"k": 3}}}),
    ("chain", {"steps": [{"name": "local_top_k", "params": {"k": 3}}]}),
])
def test_nested_samplers_come_from_the_building_registry(
    custom: Registry, name: str, params: dict[str, Any]
) -> None:
    sampler = custom.create("sampler", name, params)
    inner = sampler.inner if name == "rejection" else sampler.steps[0]
    assert type(inner) is LocalTopK and inner.params.k == 3
    with pytest.raises(ComponentError, match="local_top_k"):
        default_registry().create("sampler", name, params)


def _config() -> dict[str, Any]:
    steps = {"steps": 2, "batch_size": 4, "lr": 1e-3, "device": "cpu", "log_every": 1,
             "image_every": 0}
    return {
        "data": {"name": "shapes", "params": {"resolution": 32, "length": 16}},
        "tokenizer": {"name": "vqgan", "params": {**MAP_VQ, "n_embed": 16}},
        # no ch_mult: wiring looks the nested tokenizer up to give it the image's f
        "conditioner": {"name": "depth", "params": {"tokenizer": {
            "name": "local_vqgan", "params": {k: v for k, v in MAP_VQ.items()
                                              if k != "ch_mult"}}}},
        "prior": {"name": "gpt", "params": {"n_layer": 1, "n_head": 2, "n_embd": 16}},
        "sampler": {"name": "chain", "params": {"steps": [{"name": "local_top_k",
                                                           "params": {"k": 4}}]}},
        "train": {"tokenizer": steps, "cond": steps,
                  "prior": {k: v for k, v in steps.items() if k != "image_every"}},
    }


def test_wiring_looks_nested_specs_up_in_the_given_registry(custom: Registry) -> None:
    cfg = parse_config(_config(), registry=custom)  # wires the sizes
    nested = cfg.conditioner.params["tokenizer"]
    assert nested["name"] == "local_vqgan" and nested["params"]["ch_mult"] == [1, 2, 2]
    with pytest.raises(vqgen.VqgenError, match="local_vqgan"):
        parse_config(_config())


def test_train_and_load_run_with_a_custom_registry(custom: Registry, tmp_path: Path) -> None:
    from vqgen.runs import load_run, train

    run = tmp_path / "run"
    train(parse_config(_config(), registry=custom), run, registry=custom, progress=False)
    pipe = load_run(run, registry=custom)
    assert type(pipe.conditioner.tokenizer) is LocalVQGAN
    assert type(pipe.sampler.steps[0]) is LocalTopK
    depth = torch.rand(2, 1, 32, 32)
    out = pipe.generate(2, {"depth": depth}, seed=0)
    assert out.images.shape == (2, 3, 32, 32)
    with pytest.raises(vqgen.VqgenError, match="local_"):
        load_run(run)  # the default registry knows neither
