"""The ``class`` conditioner: one token per image, the null token, dropout, errors."""

from __future__ import annotations

import pytest
import torch

import vqgen
from vqgen.conditioners import ClassConditioner, drop_condition


def test_tokens_and_vocab() -> None:
    cond = vqgen.create("conditioner", "class", {"n_classes": 4})
    assert isinstance(cond, ClassConditioner) and not cond.spatial
    assert (cond.vocab_size, cond.null_id) == (5, 4)
    tokens = cond.tokens({"label": torch.tensor([0, 3, 1])})
    assert tokens.dtype == torch.int64 and tokens.tolist() == [[0], [3], [1]]
    assert cond.tokens({"label": torch.tensor(2)}).tolist() == [[2]]  # a scalar: one sample
    assert cond.null_like(tokens).tolist() == [[4]] * 3


def test_null_label_means_unconditional() -> None:
    cond = ClassConditioner(n_classes=4)
    assert cond.tokens({"label": torch.tensor([-1, 2])}).tolist() == [[4], [2]]
    assert cond.tokens({"label": [None, 1]}).tolist() == [[4], [1]]


def test_without_null_token() -> None:
    cond = ClassConditioner(n_classes=4, null_token=False)
    assert (cond.vocab_size, cond.null_id) == (4, None)
    with pytest.raises(vqgen.VqgenError, match="sample 1 is -1.*null_token: true"):
        cond.tokens({"label": torch.tensor([0, -1])})
    with pytest.raises(ValueError, match="no null token"):
        cond.null_like(torch.zeros(2, 1, dtype=torch.long))


def test_bad_labels_name_the_sample() -> None:
    cond = ClassConditioner(n_classes=4)
    with pytest.raises(vqgen.VqgenError, match=r"label of sample 2 is 7, outside \[0, 4\)"):
        cond.tokens({"label": torch.tensor([0, 1, 7])})
    with pytest.raises(vqgen.VqgenError, match=r"sample 0 is -3"):
        cond.tokens({"label": torch.tensor([-3])})
    with pytest.raises(vqgen.VqgenError, match=r"missing label.*batch has image"):
        cond.tokens({"image": torch.zeros(1, 3, 8, 8)})
    with pytest.raises(vqgen.VqgenError, match="integer"):
        cond.tokens({"label": torch.tensor([0.5])})
    with pytest.raises(vqgen.VqgenError, match=r"\[B\] class ids"):
        cond.tokens({"label": torch.zeros(2, 2, dtype=torch.long)})


def test_drop_condition_uses_the_null_token() -> None:
    cond = ClassConditioner(n_classes=4)
    tokens = cond.tokens({"label": torch.arange(4).repeat(64)})  # (256, 1)
    g = torch.Generator().manual_seed(0)
    dropped = drop_condition(cond, tokens, 0.5, g)
    is_null = dropped[:, 0] == cond.null_id
    assert 0.35 < is_null.float().mean() < 0.65
    assert torch.equal(dropped[~is_null], tokens[~is_null])
    assert torch.equal(drop_condition(cond, tokens, 0.0), tokens)
    assert bool((drop_condition(cond, tokens, 1.0) == cond.null_id).all())
