"""Activation estimates (:class:`vqgen.ActivationEstimate`): a lower bound of what a
training forward pass really keeps for backward, close enough to refuse what cannot fit,
and `config validate` refusing a batch that cannot train on this machine by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import vqgen
from vqgen.cli import main
from vqgen.core.interfaces import ActivationEstimate

pytestmark = pytest.mark.usefixtures("one_thread")

B, V = 8, 64
VQ = {"ch": 16, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "norm_groups": 2, "z_channels": 16,
      "perceptual_weight": 0.0}
CASES: dict[tuple[str, str], dict[str, Any]] = {
    ("prior", "gpt"): {"vocab_size": V, "cond_vocab_size": 5, "block_size": 64, "n_layer": 2,
                       "n_head": 4, "n_embd": 64},
    ("prior", "maskgit"): {"vocab_size": V, "cond_vocab_size": 5, "height": 8, "width": 8,
                           "n_layer": 2, "n_head": 4, "n_embd": 64},
    ("prior", "pixelsnail"): {"vocab_size": V, "cond_vocab_size": 5, "height": 8, "width": 8,
                              "channels": 32, "n_blocks": 2, "n_res_blocks": 2, "n_head": 2},
    ("tokenizer", "vqgan"): {**VQ, "n_embed": V, "embed_dim": 16},
    ("tokenizer", "fsq"): {**VQ, "levels": [4, 4, 4]},
    ("tokenizer", "lfq"): {**VQ, "codebook_bits": 6},
}


def saved_bytes(fn: Any) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs."""
    storages: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[(s.data_ptr(), s.nbytes())] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


@pytest.mark.parametrize("kind, name", sorted(CASES))
def test_the_estimate_is_a_lower_bound_within_a_small_factor(kind: str, name: str) -> None:
    torch.manual_seed(0)
    module = vqgen.create(kind, name, CASES[(kind, name)]).train()
    assert isinstance(module, ActivationEstimate)
    if kind == "prior":
        seq = torch.randint(0, V, (B, 64))  # (B, L)
        cond = torch.full((B, 1), V + 2)  # (B, 1): a class
        kept = saved_bytes(lambda: module.loss(seq, cond).mean())
        estimate = module.activation_bytes(B)
    else:
        x = torch.rand(B, 3, 32, 32)  # (B, 3, H, W)
        kept = saved_bytes(lambda: module(x).recon.square().mean())
        estimate = module.activation_bytes(B, (32, 32))
    assert 0 < estimate <= kept <= 8 * estimate, (estimate, kept)
    # linear in the batch
    assert module.activation_bytes(3 * B, *(() if kind == "prior" else ((32, 32),))) \
        == 3 * estimate


def test_a_batch_that_cannot_fit_this_machine_is_refused_by_name(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = yaml.safe_load(Path("configs/demo.yaml").read_text())
    config["train"]["prior"].update(batch_size=1_000_000, device="cpu")
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["config", "validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "train.prior.batch_size: " in err and "a batch of 1000000 keeps at least" in err
    assert "GiB of activations" in err and "Traceback" not in err
    config["train"]["prior"]["batch_size"] = 64  # the demo's: fits
    path.write_text(yaml.safe_dump(config))
    assert main(["config", "validate", str(path)]) == 0
