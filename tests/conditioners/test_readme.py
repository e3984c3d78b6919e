"""docs/conditioners.md's "A new conditioner in 30 lines" runs as written."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from cond_helpers import TINY_MAP, shapes_batch

import vqgen
from vqgen.core import registry as registry_module
from vqgen.core.interfaces import signature_problems
from vqgen.core.pipeline import Pipeline
from vqgen_test_stubs import StubTokenizer

README = Path(__file__).parents[2] / "docs" / "conditioners.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)


def test_the_example_conditioner_registers_and_generates(monkeypatch: pytest.MonkeyPatch) -> None:
    module, usage, learned = python_blocks()
    mod = types.ModuleType("my_conditioners")  # pydantic resolves annotations through it
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    ns: dict[str, Any] = mod.__dict__
    exec(compile(module, "README:my_conditioners.py", "exec"), ns)
    cls = ns["ColourLayout"]
    assert signature_problems(cls) == []
    reg = vqgen.default_registry().copy()
    ns["vqgen_register"](reg.scoped("my_conditioners"))
    monkeypatch.setattr(registry_module, "_default", reg)  # vqgen.create sees the plugin

    batch = shapes_batch(4)
    cond = vqgen.create("conditioner", "colour_layout", {"block": 4})
    tokens = cond.tokens(batch)
    assert tokens.shape == (4, 64) and tokens.dtype == torch.int64
    assert int(tokens.max()) < cond.null_id == cond.vocab_size - 1
    assert torch.equal(tokens, cond.grid(batch).reshape(4, 64))
    with pytest.raises(vqgen.VqgenError, match="missing image"):
        cond.tokens({"label": batch["label"]})

    ns.update(tokenizer=StubTokenizer(), sampler=vqgen.create("sampler", "top_k", {"k": 4}),
              layout_images=batch["image"], Pipeline=Pipeline)
    torch.manual_seed(0)
    exec(compile(usage, "README:usage", "exec"), ns)
    assert ns["images"].shape == (4, 3, 32, 32)

    exec(compile(learned, "README:learned", "exec"), ns)
    saturation = ns["Saturation"]
    assert signature_problems(saturation) == []
    sat = saturation(tokenizer={"name": "vqgan", "params": TINY_MAP}).eval()
    assert sat.spatial and sat.vocab_size == 17 and sat.null_id == 16
    assert sat.tokens(batch).shape == (4, 64)
