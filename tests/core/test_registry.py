"""Registry: register / create / list, duplicates, unknown names, contracts."""

from __future__ import annotations

import pytest
import torch
from pydantic import BaseModel, Field

import vqgen
from vqgen.core.interfaces import signature_problems
from vqgen.core.registry import KINDS


class Flip(vqgen.Ordering):
    """Reverse raster order."""

    class Params(vqgen.ParamsModel):
        stride: int = Field(1, ge=1)

    def __init__(self, stride: int = 1) -> None:
        super().__init__(stride=stride)

    def permutation(self, h: int, w: int) -> torch.Tensor:
        return torch.arange(h * w).flip(0)


def fresh() -> vqgen.Registry:
    reg = vqgen.Registry()
    reg.add("ordering", "flip", Flip)
    return reg


def test_create_validates_and_passes_params() -> None:
    reg = fresh()
    obj = reg.create("ordering", "flip", {"stride": 3})
    assert isinstance(obj, Flip) and obj.params.stride == 3
    assert reg.create("ordering", "flip").params.stride == 1
    assert reg.create("ordering", "flip", Flip.Params(stride=2)).params.stride == 2
    assert reg.name_of(obj) == ("ordering", "flip")


def test_register_decorator_and_wildcard_list() -> None:
    reg = fresh()
    for name in ("spiral_a", "spiral_b", "zeta"):
        reg.register("ordering", name)(type(name, (Flip,), {}))
    assert reg.list("ordering") == ["flip", "spiral_a", "spiral_b", "zeta"]
    assert reg.list("ordering", "spiral*") == ["spiral_a", "spiral_b"]
    assert reg.list("ordering", "?eta") == ["zeta"]
    assert reg.list("sampler") == []


def test_duplicate_name_raises_naming_both_sources() -> None:
    reg = fresh()
    with pytest.raises(vqgen.ComponentError, match=r"duplicate ordering name 'flip'.*<runtime>"):
        reg.add("ordering", "flip", Flip, source="other-dist")


def test_unknown_name_lists_close_matches() -> None:
    reg = fresh()
    reg.add("ordering", "spiral_out", Flip)
    with pytest.raises(vqgen.ComponentError, match=r"did you mean 'spiral_out'") as exc:
        reg.create("ordering", "spiral_uot")
    assert "available: flip, spiral_out" in str(exc.value)
    with pytest.raises(vqgen.ComponentError, match="unknown component kind 'orderings'"):
        reg.list("orderings")


def test_bad_params_name_the_field() -> None:
    reg = fresh()
    with pytest.raises(vqgen.ComponentError, match=r"params\.stride: .*greater than or equal"):
        reg.create("ordering", "flip", {"stride": 0})
    with pytest.raises(vqgen.ComponentError, match=r"params\.strid: Extra inputs"):
        reg.create("ordering", "flip", {"strid": 2})
    with pytest.raises(vqgen.ComponentError, match="must be a mapping"):
        reg.create("ordering", "flip", [1, 2])  # type: ignore[arg-type]


def test_registration_contract_is_enforced() -> None:
    reg = vqgen.Registry()
    with pytest.raises(vqgen.ComponentError, match="must subclass vqgen.Ordering"):
        reg.add("ordering", "x", object)

    class Lenient(BaseModel):
        k: int = 1

    class NoForbid(Flip):
        Params = Lenient  # type: ignore[assignment]

    with pytest.raises(vqgen.ComponentError, match="extra='forbid'"):
        reg.add("ordering", "lenient", NoForbid)

    class NoParamsAttr:
        pass

    with pytest.raises(vqgen.ComponentError, match="must declare a pydantic `Params`"):
        reg.add("dataset", "np", NoParamsAttr)
    with pytest.raises(vqgen.ComponentError, match="unknown component kind"):
        reg.add("model", "x", Flip)
    assert set(KINDS) == {"tokenizer", "prior", "conditioner", "ordering", "sampler", "dataset"}


def test_direct_construction_validates_too() -> None:
    with pytest.raises(ValueError, match="stride"):
        Flip(stride=0)


def test_init_signature_problems_detects_mismatch() -> None:
    class Drift(Flip):
        def __init__(self, stride: int = 2, extra: int = 0) -> None:
            super().__init__(stride=stride)

    problems = signature_problems(Drift)
    assert "__init__ takes 'extra', which Params lacks" in problems
    assert any("default of 'stride' is 2" in p for p in problems)
    assert signature_problems(Flip) == []


def test_copy_is_independent(registry: vqgen.Registry) -> None:
    reg = registry.copy()
    reg.add("ordering", "flip_copy_only", Flip)
    assert "flip_copy_only" in reg.list("ordering")
    assert "flip_copy_only" not in registry.list("ordering")


def test_module_level_api_uses_default_registry() -> None:
    assert vqgen.list_components("ordering", "snake") == ["snake"]
    assert isinstance(vqgen.create("ordering", "snake"), vqgen.Ordering)


class Strided(vqgen.Ordering):
    """Raster order; declares its fields once, in Params."""

    class Params(vqgen.ParamsModel):
        stride: int = Field(1, ge=1)
        name: str = "x"

    def __init__(self, **fields: object) -> None:
        super().__init__(**fields)

    def permutation(self, h: int, w: int) -> torch.Tensor:
        return torch.arange(h * w)


def test_a_fields_only_constructor_takes_its_signature_from_params() -> None:
    import inspect

    sig = inspect.signature(Strided)
    assert [(p.name, p.kind, p.default) for p in sig.parameters.values()] == [
        ("stride", inspect.Parameter.KEYWORD_ONLY, 1),
        ("name", inspect.Parameter.KEYWORD_ONLY, "x"),
    ]
    assert signature_problems(Strided) == []
    assert Strided(stride=3).params.stride == 3
    with pytest.raises(ValueError, match="bogus"):
        Strided(bogus=1)  # extra="forbid": nothing but the Params fields
    with pytest.raises(ValueError, match="stride"):
        Strided(stride=0)
    # an explicit constructor that drifts from Params is still caught
    assert signature_problems(Flip) == []

    class Drifted(Flip):
        def __init__(self, stride: int = 2) -> None:
            super().__init__(stride=stride)

    assert signature_problems(Drifted) == ["default of 'stride' is 2 in __init__ but 1 in Params"]
