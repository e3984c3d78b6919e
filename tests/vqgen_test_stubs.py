"""Stand-in components for tests, loadable as a plugin: ``VQGEN_PLUGINS=vqgen_test_stubs``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

import torch
from pydantic import Field

import vqgen


class StubTokenizer(vqgen.Tokenizer):
    """Stand-in tokenizer for config tests: codes are quantised mean brightness."""

    class Params(vqgen.ParamsModel):
        n_embed: int = Field(16, ge=2)
        downsample: int = Field(4, ge=1)

    def __init__(self, n_embed: int = 16, downsample: int = 4) -> None:
        super().__init__(n_embed=n_embed, downsample=downsample)
        self.vocab_size, self.downsample, self.in_channels = n_embed, downsample, 3

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.avg_pool2d(x.mean(1, keepdim=True), self.downsample)
        return ((pooled[:, 0] + 1) / 2 * (self.vocab_size - 1)).round().long()  # (B, h, w)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        grey = codes.float() / (self.vocab_size - 1) * 2 - 1  # (B, h, w)
        up = grey.repeat_interleave(self.downsample, 1).repeat_interleave(self.downsample, 2)
        return up[:, None].expand(-1, 3, -1, -1)  # (B, 3, H, W)


class StubPrior(vqgen.AutoregressivePrior):
    """Stand-in prior for config tests: uniform logits."""

    class Params(vqgen.ParamsModel):
        vocab_size: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"  # the assembly's
        n_head: int = Field(2, ge=1)

    def __init__(self, vocab_size: int | Literal["auto"] = "auto", n_head: int = 2) -> None:
        super().__init__(vocab_size=vocab_size, n_head=n_head)
        vqgen.require_wired(self, ("vocab_size",))
        self.vocab_size = int(vocab_size)

    def logits(self, seq: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return torch.zeros(*seq.shape, self.vocab_size)  # (B, L, V)

    def start(self, cond: torch.Tensor | None, batch_size: int) -> Any:
        return batch_size

    def step(self, state: Any, token: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
        return torch.zeros(state, self.vocab_size), state


class StubConditioner(vqgen.Conditioner):
    """Stand-in conditioner: the label as one token."""

    class Params(vqgen.ParamsModel):
        n_classes: int = Field(4, ge=1)

    def __init__(self, n_classes: int = 4) -> None:
        super().__init__(n_classes=n_classes)
        self.vocab_size = n_classes

    def tokens(self, batch: Mapping[str, Any]) -> torch.Tensor:
        return batch["label"].long()[:, None]  # (B, 1)


@vqgen.hookimpl
def vqgen_register(registry: Any) -> None:
    """Register the stand-ins (tokenizer, prior, conditioner) for tests."""
    registry.add("tokenizer", "stub_tokenizer", StubTokenizer)
    registry.add("prior", "stub_prior", StubPrior)
    registry.add("conditioner", "stub_class", StubConditioner)
