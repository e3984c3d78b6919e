"""FSQ and LFQ: the quantizers on hand-made inputs, and their tokenizers (tiny, CPU, seeded)."""

from __future__ import annotations

import itertools
import time
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from vqgen.core.config import ConfigError, parse_config
from vqgen.core.interfaces import Adversarial, signature_problems
from vqgen.plugins.vqgan import VQGAN, VQGANFSQ, VQGANLFQ, FSQuantizer, LFQuantizer
from vqgen.plugins.vqgan.lfq import lfq_entropies

pytestmark = pytest.mark.usefixtures("one_thread")

TINY: dict[str, Any] = {"ch": 8, "ch_mult": (1, 2), "norm_groups": 4, "z_channels": 8,
                        "resolution": 16, "perceptual_weight": 0.0}


def column(values: list[float], channels: int) -> torch.Tensor:
    """``values`` as the latents of one image with a 1-pixel-wide column: ``[1, C, n, 1]``
    where every channel holds ``values``."""
    return torch.tensor(values).view(1, 1, -1, 1).expand(1, channels, -1, 1).contiguous()


def smooth_images(n: int, seed: int) -> torch.Tensor:
    """``[n, 3, 16, 16]`` in ``[-1, 1]``: random 4×4 colour fields, bilinearly upsampled."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    return F.interpolate(low, size=16, mode="bilinear", align_corners=False)


# -- FSQ: the quantizer ------------------------------------------------------------
def test_fsq_rounds_each_channel_to_exactly_its_levels() -> None:
    """A sweep over the whole real line gives exactly L values per channel, normalised by
    L // 2: odd levels symmetric, even levels offset by half a step (the paper's)."""
    q = FSQuantizer([2, 3, 4, 5, 8])
    out = q(column(torch.linspace(-30, 30, 60000).tolist(), 5))  # symmetric, without 0
    expected = {
        2: [-1.0, 0.0],
        3: [-1.0, 0.0, 1.0],
        4: [-1.0, -0.5, 0.0, 0.5],
        5: [-1.0, -0.5, 0.0, 0.5, 1.0],
        8: [v / 4 for v in range(-4, 4)],
    }
    for i, level in enumerate([2, 3, 4, 5, 8]):
        assert sorted(set(out.z_q[0, i, :, 0].tolist())) == expected[level], level
    # the bins are symmetric about z = 0: the sweep (symmetric too) hits value k of a
    # channel as often as value L - 1 - k
    for i in range(5):
        counts = q.codes_to_digits(out.codes)[0, :, 0, i].bincount()
        assert torch.equal(counts, counts.flip(0)), (i, counts)


@pytest.mark.parametrize(
    ("z", "grid", "code"),
    [  # levels [3, 4]: code = digit_0 + 3 · digit_1, digit = value + L // 2
        ((0.54, -0.01), (0.0, -0.5), 1 + 3 * 1),  # L=3 rounds up past atanh(0.5/1.001)≈0.549
        ((0.56, 0.01), (1.0, 0.0), 2 + 3 * 2),  # L=4's middle boundary is z = 0
        ((-0.56, 0.79), (-1.0, 0.0), 0 + 3 * 2),  # …its others ±atanh(1/1.5015)≈±0.804
        ((10.0, 0.81), (1.0, 0.5), 2 + 3 * 3),  # the last code
        ((-10.0, -0.79), (-1.0, -0.5), 0 + 3 * 1),
        ((0.0, -0.81), (0.0, -1.0), 1 + 3 * 0),
        ((0.0, 0.0), (0.0, 0.0), 1 + 3 * 2),  # a tie (bound -0.5) takes the upper middle
        ((-10.0, -10.0), (-1.0, -1.0), 0),  # the first code
    ],
)
def test_fsq_codes_of_hand_made_latents(z: tuple[float, float], grid: tuple[float, float],
                                        code: int) -> None:
    q = FSQuantizer([3, 4])
    out = q(torch.tensor(z).view(1, 2, 1, 1))
    assert out.z_q.flatten().tolist() == list(grid)
    assert out.codes.item() == code and out.codes.dtype == torch.int64
    assert float(out.loss) == 0.0 and out.restarted == 0


def test_fsq_straight_through_gradient() -> None:
    """The gradient through the rounding is the identity: it equals the gradient of the
    (unrounded) bound, and reaches every input."""
    q = FSQuantizer([3, 4, 8])
    torch.manual_seed(0)
    z = (torch.randn(2, 3, 4, 4) * 2).requires_grad_()
    w = torch.randn(2, 3, 4, 4)
    (q(z).z_q * w).sum().backward()
    z_ref = z.detach().clone().requires_grad_()
    half_width = torch.tensor([1.0, 2.0, 4.0]).view(1, 3, 1, 1)
    (q.bound(z_ref) / half_width * w).sum().backward()
    assert z.grad is not None and z_ref.grad is not None
    assert torch.allclose(z.grad, z_ref.grad, atol=1e-6)
    assert (z.grad != 0).all()


def test_fsq_codes_and_digits_round_trip_over_every_code() -> None:
    levels = [2, 3, 4, 5]
    q = FSQuantizer(levels)
    assert q.n_embed == 120
    digits = torch.tensor(list(itertools.product(*[range(v) for v in reversed(levels)])))
    digits = digits.flip(1)  # (120, 4), channel 0 fastest
    codes = q.digits_to_codes(digits)
    assert torch.equal(codes, digits[:, 0] + 2 * digits[:, 1] + 6 * digits[:, 2]
                       + 24 * digits[:, 3])
    assert torch.equal(codes, torch.arange(120))  # a bijection onto [0, 120)
    assert torch.equal(q.codes_to_digits(codes), digits)
    # the grid value of a code is what forward gives the latents that produce that code
    torch.manual_seed(0)
    out = q(torch.rand(8, 4, 32, 32) * 4 - 2)
    assert torch.equal(q.embed_codes(out.codes), out.z_q)
    assert out.codes.unique().numel() == 120


# -- LFQ: the quantizer ------------------------------------------------------------
def test_lfq_signs_to_index() -> None:
    q = LFQuantizer(3)
    z = torch.tensor([[0.3, -2.0, 0.1], [-0.1, -0.2, -0.3], [1.0, 1.0, 1.0], [0.0, 5.0, -1.0]])
    out = q(rearrange_positions(z))  # (1, 3, 1, 4): four positions
    assert out.codes.flatten().tolist() == [1 + 4, 0, 7, 2]  # bit i = channel i > 0; 0 → −1
    assert out.z_q[0, :, 0, 0].tolist() == [1.0, -1.0, 1.0]
    assert out.z_q[0, :, 0, 3].tolist() == [-1.0, 1.0, -1.0]


def test_lfq_codes_and_signs_round_trip_over_every_code() -> None:
    q = LFQuantizer(5)
    signs = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=5))).flip(1)  # (32, 5)
    codes = q.signs_to_codes(signs)
    assert torch.equal(codes, torch.arange(32))
    assert torch.equal(q.codes_to_signs(codes), signs)
    out = q(rearrange_positions(signs * 0.3))
    assert torch.equal(out.codes.flatten(), torch.arange(32))
    assert torch.equal(q.embed_codes(out.codes), out.z_q)


def rearrange_positions(rows: torch.Tensor) -> torch.Tensor:
    """``[N, d]`` → ``[1, d, 1, N]`` latents (one row of N positions)."""
    return rows.t().reshape(1, rows.shape[1], 1, rows.shape[0])


def test_lfq_straight_through_gradient_is_the_identity() -> None:
    q = LFQuantizer(4, entropy_weight=0.0, commitment_weight=0.0)
    torch.manual_seed(0)
    z = torch.randn(2, 4, 3, 3).requires_grad_()
    w = torch.randn(2, 4, 3, 3)
    out = q(z)
    assert set(out.z_q.unique().tolist()) == {-1.0, 1.0}
    (out.z_q * w).sum().backward()
    assert z.grad is not None and torch.equal(z.grad, w)


def naive_entropies(z: torch.Tensor, inv_temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The same two entropies from an explicit softmax over all 2^bits codes."""
    bits = z.shape[1]
    codes = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=bits)))  # (2^bits, bits)
    d = (z[:, None, :] - codes[None]).pow(2).sum(-1)  # (N, 2^bits) squared distances
    p = torch.softmax(-inv_temperature * d, dim=1)
    per_sample = -(p * p.clamp_min(1e-30).log()).sum(1).mean()
    mean_p = p.mean(0)
    return per_sample, -(mean_p * mean_p.clamp_min(1e-30).log()).sum()


@pytest.mark.parametrize("chunk_elements", [1 << 22, 7 * 40])
def test_lfq_entropies_match_an_explicit_softmax(chunk_elements: int) -> None:
    """Closed-form per-sample entropy and the chunked batch entropy (checkpointed when
    chunked) equal an explicit softmax over the codes, values and gradients."""
    torch.manual_seed(0)
    z = (torch.randn(40, 5) * 0.1).requires_grad_()
    ps, batch = lfq_entropies(z, 3.0, chunk_elements=chunk_elements)
    (ps - 0.7 * batch).backward()
    z_ref = z.detach().clone().requires_grad_()
    ps_ref, batch_ref = naive_entropies(z_ref, 3.0)
    (ps_ref - 0.7 * batch_ref).backward()
    assert torch.allclose(ps, ps_ref, atol=1e-5) and torch.allclose(batch, batch_ref, atol=1e-5)
    assert z.grad is not None and z_ref.grad is not None
    assert torch.allclose(z.grad, z_ref.grad, atol=1e-5)


def test_lfq_loss_is_entropy_and_commitment() -> None:
    q = LFQuantizer(4, entropy_weight=0.3, commitment_weight=0.2, diversity_gamma=0.5,
                    inv_temperature=2.0)
    torch.manual_seed(0)
    z = torch.randn(2, 4, 3, 3)
    ps, batch = naive_entropies(z.permute(0, 2, 3, 1).reshape(-1, 4), 2.0)
    commit = F.mse_loss(z, torch.where(z > 0, 1.0, -1.0))
    assert torch.allclose(q(z).loss, 0.3 * (ps - 0.5 * batch) + 0.2 * commit, atol=1e-5)
    with torch.no_grad():  # encode: the entropies only matter for gradients
        assert torch.allclose(q(z).loss, 0.2 * commit)


@pytest.mark.parametrize(("entropy_weight", "low", "high"), [(1.0, 0.9, 1.0), (0.0, 0.0, 0.1)])
def test_lfq_entropy_loss_spreads_a_collapsed_batch(entropy_weight: float, low: float,
                                                    high: float) -> None:
    """Latents that all start on one code: the entropy loss alone spreads them over the
    codebook; commitment alone keeps them there."""
    q = LFQuantizer(6, entropy_weight=entropy_weight, commitment_weight=1.0 - entropy_weight)
    torch.manual_seed(0)
    z = (0.02 + 0.005 * torch.randn(1, 6, 16, 32)).abs().requires_grad_()
    assert q(z).codes.unique().numel() == 1
    opt = torch.optim.Adam([z], lr=3e-3)
    for _ in range(200):
        loss = q(z).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert low <= float(q(z).usage) <= high


# -- the tokenizers ----------------------------------------------------------------
def test_constructors_take_exactly_their_params() -> None:
    assert signature_problems(VQGANFSQ) == []
    assert signature_problems(VQGANLFQ) == []
    assert issubclass(VQGANFSQ, Adversarial) and issubclass(VQGANLFQ, Adversarial)


@pytest.mark.parametrize(
    ("cls", "params", "vocab", "dim"),
    [(VQGANFSQ, {}, 1000, 4), (VQGANFSQ, {"levels": [8, 8]}, 64, 2),
     (VQGANLFQ, {}, 512, 9), (VQGANLFQ, {"codebook_bits": 6}, 64, 6),
     (VQGANLFQ, {"codebook_bits": 10}, 1024, 10)],
)
def test_vocab_size_shapes_and_decode(cls: type, params: dict[str, Any], vocab: int,
                                      dim: int) -> None:
    torch.manual_seed(0)
    tok = cls(**TINY, **params).eval()
    assert tok.vocab_size == vocab and tok.downsample == 2 and tok.in_channels == 3
    assert not [k for k in tok.state_dict() if k.startswith("quantize.")]  # no codebook
    x = smooth_images(2, 0)
    codes = tok.encode(x)
    assert codes.shape == (2, 8, 8) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < vocab
    y = tok.decode(codes)
    assert y.shape == x.shape and y.dtype == torch.float32
    out = tok(x)
    assert out.recon.shape == x.shape and torch.equal(out.codes, codes)
    # decode: codes → grid values → post_quant_conv → decoder, the latents forward decodes
    z_q = tok.quantize_latents(x).z_q  # (2, dim, 8, 8)
    assert z_q.shape == (2, dim, 8, 8)
    assert torch.equal(tok.quantize.embed_codes(codes), z_q)
    assert torch.allclose(y, tok.decode_latents(z_q), atol=1e-5)
    vectors = tok.code_vectors()
    assert vectors.shape == (vocab, dim)
    assert torch.equal(vectors[codes[0, 0, 0]], z_q[0, :, 0, 0])
    assert tok.double().decode(codes).dtype == torch.float64


def test_the_vocabulary_wires_into_the_prior_by_name() -> None:
    for tokenizer, vocab in [({"name": "fsq", "params": {"levels": [7, 5, 3]}}, 105),
                             ({"name": "lfq", "params": {"codebook_bits": 6}}, 64)]:
        cfg = parse_config({"data": {"name": "shapes", "params": {"resolution": 32}},
                            "tokenizer": tokenizer, "prior": {"name": "gpt"}})
        assert cfg.prior is not None
        assert cfg.prior.params["vocab_size"] == vocab
        assert cfg.prior.params["block_size"] == 8 * 8  # f = 4 from the default ch_mult


def test_shared_parts_are_the_vqgan_ones() -> None:
    """Encoder, decoder and loss are vqgan's: the same modules, shapes and loss class."""
    torch.manual_seed(0)
    ref = VQGAN(**TINY)
    for cls in (VQGANFSQ, VQGANLFQ):
        tok = cls(**TINY)
        assert type(tok.encoder) is type(ref.encoder) and type(tok.decoder) is type(ref.decoder)
        assert {k: v.shape for k, v in tok.encoder.state_dict().items()} == \
            {k: v.shape for k, v in ref.encoder.state_dict().items()}
        assert type(tok.build_loss()) is type(ref.build_loss())


@pytest.mark.parametrize(
    ("name", "params", "field", "reason"),
    [
        ("fsq", {"levels": [8, 1, 5]}, "levels", "every level must be >= 2"),
        ("fsq", {"levels": []}, "levels", "at least 1 item"),
        ("fsq", {"levels": [1024, 1024, 2]}, "levels", "must be <= 2^20"),
        ("fsq", {"levels": [2] * 21}, "levels", "must be <= 2^20"),
        ("fsq", {"levels": [8, -3]}, "levels", "every level must be >= 2"),
        ("fsq", {"n_embed": 64}, "n_embed", "Extra inputs are not permitted"),
        ("lfq", {"codebook_bits": 0}, "codebook_bits", "greater than or equal to 1"),
        ("lfq", {"codebook_bits": 30}, "codebook_bits", "less than or equal to 20"),
        ("lfq", {"entropy_weight": -1.0}, "entropy_weight", "greater than or equal to 0"),
        ("lfq", {"inv_temperature": 0.0}, "inv_temperature", "greater than 0"),
    ],
)
def test_bad_params_are_refused_naming_the_field(name: str, params: dict[str, Any],
                                                 field: str, reason: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config({"data": {"name": "shapes"}, "tokenizer": {"name": name, "params": params}})
    message = str(exc.value)
    assert f"tokenizer.params.{field}: " in message and reason in message, message


@pytest.mark.parametrize(("cls", "params"), [(VQGANFSQ, {"levels": [8, 8]}),
                                             (VQGANLFQ, {"codebook_bits": 6})])
def test_a_tiny_fit_uses_the_whole_codebook(cls: type, params: dict[str, Any]) -> None:
    """200 Adam steps of reconstruction + the quantizer's loss on smooth random colour
    fields: ≥ 90 % of the 64 codes are used on 64 held-out images (4096 positions),
    from 20–35 % at initialisation (~7 s each on one core). Over seeds 0–5 this fit
    ends at 94–100 % for both; the test runs seed 0."""
    torch.manual_seed(0)
    tok = cls(**TINY, **params)
    held_out = smooth_images(64, 10_000)
    with torch.no_grad():
        before = float(tok.eval()(held_out).usage)
    opt = torch.optim.Adam(tok.parameters(), lr=3e-3)
    tok.train()
    start = time.perf_counter()
    for step in range(200):
        x = smooth_images(16, step)
        out = tok(x)
        loss = F.mse_loss(out.recon, x) + out.qloss
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = tok.eval()(held_out)
    assert before < 0.5, before
    assert float(after.usage) >= 0.9, (before, float(after.usage), time.perf_counter() - start)
    assert float(F.mse_loss(after.recon, held_out)) < float(held_out.var())
