"""Pipeline configs: formats, round trips, error messages, malformed input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import vqgen
from vqgen.core.config import (
    ConfigError,
    PipelineConfig,
    config_schema,
    dump_config,
    dumps_config,
    load_config,
    parse_config,
)

BASE: dict[str, Any] = {
    "data": {"name": "shapes", "params": {"resolution": 32}},
    "tokenizer": {"name": "stub_tokenizer", "params": {"n_embed": 32}},
    "conditioner": {"name": "stub_class", "params": {"n_classes": 4}},
    "ordering": {"name": "snake"},
    "prior": {"name": "stub_prior", "params": {"n_head": 4}},
    "train": {"tokenizer": {"steps": 10, "batch_size": 4}, "prior": {"steps": 20}},
}

YAML_TEXT = """\
data:        {name: shapes, params: {resolution: 32}}
tokenizer:   {name: stub_tokenizer, params: {n_embed: 32}}
conditioner: {name: stub_class, params: {n_classes: 4}}
ordering:    {name: snake}
prior:       {name: stub_prior, params: {n_head: 4}}
train:       {tokenizer: {steps: 10, batch_size: 4}, prior: {steps: 20}}
"""
TOML_TEXT = """\
[data]
name = "shapes"
params = { resolution = 32 }
[tokenizer]
name = "stub_tokenizer"
params = { n_embed = 32 }
[conditioner]
name = "stub_class"
params = { n_classes = 4 }
[ordering]
name = "snake"
[prior]
name = "stub_prior"
params = { n_head = 4 }
[train.tokenizer]
steps = 10
batch_size = 4
[train.prior]
steps = 20
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_three_formats_load_to_the_same_resolved_config(
    tmp_path: Path, test_registry: vqgen.Registry
) -> None:
    from_yaml = load_config(write(tmp_path, "c.yaml", YAML_TEXT), test_registry)
    from_toml = load_config(write(tmp_path, "c.toml", TOML_TEXT), test_registry)
    from_json = load_config(write(tmp_path, "c.json", json.dumps(BASE)), test_registry)
    assert from_yaml == from_toml == from_json
    # params are stored resolved: defaults filled in, user values kept, and sizes that
    # follow from other stages wired (the prior's vocabulary is the tokenizer's)
    assert from_yaml.tokenizer.params == {"n_embed": 32, "downsample": 4}
    assert from_yaml.prior.params == {"vocab_size": 32, "n_head": 4}
    assert from_yaml.ordering.params == {}
    assert from_yaml.sampler is None
    assert from_yaml.train.tokenizer.steps == 10 and from_yaml.train.prior.batch_size == 32


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".toml", ".json"])
def test_dump_and_reload_is_equal(
    suffix: str, tmp_path: Path, test_registry: vqgen.Registry
) -> None:
    cfg = parse_config(BASE, registry=test_registry)
    path = dump_config(cfg, tmp_path / f"out{suffix}", test_registry)
    assert load_config(path, test_registry) == cfg
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_toml_refuses_null_with_a_clear_error(test_registry: vqgen.Registry) -> None:
    cfg = parse_config(BASE, registry=test_registry)
    cfg.tokenizer.params["n_embed"] = None  # default 16: leaving it out would change it
    with pytest.raises(ConfigError, match=r"tokenizer\.params\.n_embed: TOML cannot represent"):
        dumps_config(cfg, "toml", test_registry)


def test_toml_leaves_out_null_params_whose_default_is_null(
    tmp_path: Path, test_registry: vqgen.Registry
) -> None:
    cfg = parse_config(
        {**BASE, "sampler": {"name": "top_p", "params": {"p": 0.5}}}, registry=test_registry
    )
    assert cfg.sampler is not None and cfg.sampler.params["top_k"] is None
    text = dumps_config(cfg, "toml", test_registry)
    assert "top_k" not in text
    assert load_config(dump_config(cfg, tmp_path / "c.toml", test_registry), test_registry) == cfg


@pytest.mark.parametrize(
    ("patch", "path", "reason"),
    [
        ({"ordering": {"name": "snak"}}, "ordering.name", "did you mean 'snake'"),
        ({"prior": {"name": "stub_prior", "params": {"n_haed": 8}}}, "prior.params.n_haed",
         "Extra inputs are not permitted"),
        ({"prior": {"name": "stub_prior", "params": {"n_head": "eight"}}}, "prior.params.n_head",
         "valid integer"),
        ({"prior": {"name": "stub_prior", "params": {"n_head": 0}}}, "prior.params.n_head",
         "greater than or equal to 1"),
        ({"tokenizer": None}, "tokenizer", "valid dictionary"),
        ({"piror": {"name": "stub_prior"}}, "piror", "Extra inputs are not permitted"),
        ({"train": {"prior": {"stepz": 3}}}, "train.prior.stepz", "Extra inputs"),
        ({"data": {"params": {}}}, "data.name", "Field required"),
    ],
)
def test_errors_name_file_path_and_reason(
    patch: dict[str, Any], path: str, reason: str, tmp_path: Path,
    test_registry: vqgen.Registry,
) -> None:
    file = write(tmp_path, "bad.yaml", yaml.safe_dump({**BASE, **patch}))
    with pytest.raises(ConfigError) as exc:
        load_config(file, test_registry)
    message = str(exc.value)
    assert str(file) in message
    assert f"  {path}: " in message and reason in message, message


def test_unreadable_files_are_config_errors(tmp_path: Path) -> None:
    cases = {
        "missing.yaml": (None, "file not found"),
        "c.ini": ("", "unsupported extension '.ini'"),
        "broken.yaml": ("data: [unclosed\n", "not valid YAML"),
        "broken.toml": ("data = \n", "not valid TOML"),
        "broken.json": ("{", "not valid JSON"),
        "list.yaml": ("- 1\n- 2\n", "expected a mapping of sections"),
        "binary.yaml": (b"\xff\xfe\x00", "cannot read file"),
    }
    for name, (content, reason) in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            path.write_text(content)
        with pytest.raises(ConfigError, match=reason):
            load_config(path)


def test_direct_construction_validates_components(test_registry: vqgen.Registry) -> None:
    bad = {**BASE, "prior": {"name": "stub_prior", "params": {"n_head": -1}}}
    with pytest.raises(ValidationError, match=r"prior\.params\.n_head"):
        PipelineConfig.model_validate(bad, context={"registry": test_registry})
    ok = PipelineConfig.model_validate(BASE, context={"registry": test_registry})
    assert ok == parse_config(BASE, registry=test_registry)


def test_schema_covers_every_registered_component(test_registry: vqgen.Registry) -> None:
    schema = config_schema(test_registry)
    titles = json.dumps(schema)
    for entry in test_registry.entries():
        assert f"{entry.kind} '{entry.name}'" in titles, entry
    assert set(schema["required"]) == {"data", "tokenizer"}
    assert "n_head" in titles and "n_bins" in titles


# -- malformed input only ever produces ConfigError -------------------------
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
    st.text(max_size=8), st.sampled_from(["shapes", "snake", "stub_prior", "stub_tokenizer"]),
)
keys = st.sampled_from(["name", "params", "n_head", "steps", "k", "x"]) | st.text(max_size=5)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(keys, inner, max_size=3),
    max_leaves=12,
)
section = st.sampled_from(
    ["data", "tokenizer", "conditioner", "ordering", "prior", "sampler", "train", "bogus"]
)


FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@FUZZ
@given(
    mutations=st.dictionaries(section, values, max_size=3),
    drop=st.lists(section, max_size=2),
    fmt=st.sampled_from(["yaml", "json"]),
)
def test_malformed_configs_only_raise_config_error(
    mutations: dict[str, Any], drop: list[str], fmt: str,
    tmp_path: Path, test_registry: vqgen.Registry,
) -> None:
    data = {k: v for k, v in {**BASE, **mutations}.items() if k not in drop}
    path = tmp_path / f"fuzz.{fmt}"
    if fmt == "yaml":
        path.write_text(yaml.safe_dump(data))
    else:
        path.write_text(json.dumps(data))
    try:
        cfg = load_config(path, test_registry)
    except ConfigError as exc:
        assert str(path) in str(exc)
    else:
        assert isinstance(cfg, PipelineConfig)


@FUZZ
@given(text=st.text(max_size=80), fmt=st.sampled_from(["yaml", "toml", "json"]))
def test_arbitrary_text_only_raises_config_error(
    text: str, fmt: str, tmp_path: Path, test_registry: vqgen.Registry
) -> None:
    path = tmp_path / f"text.{fmt}"
    path.write_text(YAML_TEXT[: len(text) % len(YAML_TEXT)] + text if fmt == "yaml" else text,
                    encoding="utf-8", errors="surrogatepass")
    try:
        load_config(path, test_registry)
    except ConfigError:
        pass


@pytest.mark.parametrize(("sampling", "dropout", "says"), [
    ({"guidance": 2.0}, 0.0, "sampling.guidance: 2.0 needs a prior trained with condition "
                             "dropout; set train.prior.cond_dropout"),
    ({"guidance": float("nan")}, 0.1, "sampling.guidance"),
    ({"guidance": -1.0}, 0.1, "sampling.guidance"),
    ({"guidanse": 2.0}, 0.1, "sampling.guidanse"),
])
def test_sampling_section_is_checked(tmp_path: Path, test_registry: vqgen.Registry,
                                     sampling: dict[str, Any], dropout: float,
                                     says: str) -> None:
    cfg = {**BASE, "sampling": sampling, "train": {"prior": {"cond_dropout": dropout}}}
    file = write(tmp_path, "s.yaml", yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=r"(?s)s\.yaml.*" + says.replace(".", r"\.")):
        load_config(file, test_registry)
    ok = {**BASE, "sampling": {"guidance": 2.0}, "train": {"prior": {"cond_dropout": 0.1}}}
    assert parse_config(ok, registry=test_registry).sampling.guidance == 2.0
    assert parse_config(BASE, registry=test_registry).sampling.guidance == 1.0  # default


def test_hostile_config_files_are_refused_quickly(tmp_path: Path) -> None:
    """An alias bomb, a device behind a symlink, a directory and an oversized file are
    each a ConfigError naming the file, before anything is expanded or read whole."""
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(12))
    (tmp_path / "bomb.yaml").write_text(f"data:\n  name: shapes\n  params: {{x: 1}}\n{bomb}")
    (tmp_path / "zero.yaml").symlink_to("/dev/zero")
    (tmp_path / "dir.yaml").mkdir()
    (tmp_path / "big.yaml").write_text("# " + "x" * (1 << 20) + "\n")
    cases = {"bomb.yaml": "more than 100 aliases", "zero.yaml": "not a regular file",
             "dir.yaml": "not a regular file", "big.yaml": "larger than 1 MiB"}
    for name, reason in cases.items():
        with pytest.raises(ConfigError, match=reason) as info:
            load_config(tmp_path / name)
        assert str(tmp_path / name) in str(info.value)


def test_wiring_builds_nothing_real_and_leaves_the_random_state_alone() -> None:
    """Loading a config assembles the stages on the meta device to learn their sizes:
    no weights are drawn, so seeded training after loading is what it was before."""
    import torch

    root = Path(__file__).resolve().parents[2] / "configs"
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    for path in sorted(root.glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.prior is not None and cfg.prior.params["vocab_size"] != "auto"
    assert torch.equal(torch.rand(4), expected)
