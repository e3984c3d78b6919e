"""The Pipeline: one tokenizer, conditioner, ordering, prior and sampler, composed.

It owns the seams between the stages:

* **Ids.** Image codes are ``[0, V)`` with ``V = tokenizer.vocab_size``; condition
  tokens are shifted by ``cond_offset`` (default ``V``) into their own range
  ``[V, V + conditioner.vocab_size)`` before the prior sees them. ``cond_offset=0``
  reproduces taming-transformers' layout, where condition ids share the image-code
  table.
* **Order.** The ordering is applied once: the grid is flattened into the prior's
  sequence on the way in and unflattened on the way out.
* **Decoding.** ``generate`` turns a request (condition tokens, guidance and null
  tokens, the sampler, the generator, known cells) into one :class:`Decoding` and the
  prior decodes it (:meth:`Prior.decode`): an autoregressive prior token by token with
  its KV cache (O(L) steps), a masked prior in its ``steps`` parallel rounds.
* **Canvas.** The training grid is decoded whole. A larger canvas is sampled with a
  sliding window (Fig. 3 of the paper), for autoregressive priors only: each token is
  predicted by the prior from a training-size window that contains it, clamped at the
  borders, in row-major order inside the window; a spatial condition is windowed the
  same way. A masked prior samples the training grid only (a larger canvas is refused).
* **Families.** ``nll`` (an exact likelihood) needs an autoregressive prior; ``loss`` is
  the prior's own training loss (``prior.loss_name`` says which) for either family.

Why one file of this size: the Pipeline owns every seam between the stages (condition
ids, ordering, canvas, guidance, sliding window); each is a short method here.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vqgen.core.errors import VqgenError
from vqgen.core.interfaces import (
    Autoregressive,
    Conditioner,
    Decoding,
    NoParams,
    Ordering,
    Prior,
    Sampler,
    Tokenizer,
    guide,
    prior_family,
)
from vqgen.core.positions import GridPositions

__all__ = ["Generation", "Pipeline", "RowMajor", "align_condition", "assemble",
           "cond_offset_problem", "window_origin"]


class RowMajor(Ordering):
    """Raster order: left to right, top to bottom (the identity permutation).

    Defined as is for every ``h × w``; taming-transformers' ``Identity``. The
    pipeline's default ordering, registered as ``row_major`` by :mod:`vqgen.orderings`.
    """

    Params = NoParams

    def __init__(self) -> None:
        super().__init__()

    def permutation(self, h: int, w: int) -> torch.Tensor:
        return torch.arange(h * w, dtype=torch.int64)


@dataclass
class Generation:
    """What ``Pipeline.generate`` returns."""

    images: torch.Tensor  # (n, C, H, W) in [-1, 1] (approximately)
    codes: torch.Tensor  # (n, h, w) int64
    labels: torch.Tensor | None = None  # (n,) requested classes, where given
    acceptance: float | None = None  # rejection sampling: kept / drawn


#: the largest classifier-free guidance scale (beyond it the logits overflow: no sample)
MAX_GUIDANCE = 100.0


def window_origin(i: int, size: int, window: int) -> int:
    """First row (or column) of the ``window``-long window that predicts cell ``i`` of a
    ``size``-long axis: centred on ``i`` where possible, clamped at the borders."""
    return min(max(i - window // 2, 0), max(size - window, 0))


def align_condition(cond: torch.Tensor, ordering: Ordering, grid: tuple[int, int]
                    ) -> torch.Tensor:
    """Row-major condition tokens ``[B, h*w]`` of a ``grid`` → ``ordering``'s sequence
    order; a condition of another length (a class) is returned as given."""
    h, w = grid
    if cond.shape[1] != h * w or h * w == 1:
        return cond
    return ordering.flatten(cond.reshape(cond.shape[0], h, w))  # (B, h*w)


class Pipeline(nn.Module):
    """Compose the five stages; see the module docstring for the seams it owns.

    ``grid`` is the latent grid ``(h, w)`` the prior was trained on (the default
    canvas, and the sliding window's size).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prior: Prior | None = None,
        *,
        grid: tuple[int, int],
        ordering: Ordering | None = None,
        sampler: Sampler | None = None,
        conditioner: Conditioner | None = None,
        cond_offset: int | None = None,
        guidance: float = 1.0,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.guidance = float(guidance)  # the default of generate(guidance=None)
        #: names of the class ids (the data set's), where known: a class condition may
        #: name its class (:meth:`class_ids`)
        self.class_names = list(class_names) if class_names is not None else None
        self.tokenizer = tokenizer
        self.prior = prior
        self.conditioner = conditioner
        self.ordering = ordering or RowMajor()
        self.sampler = sampler
        self.grid = (int(grid[0]), int(grid[1]))
        self.cond_offset = tokenizer.vocab_size if cond_offset is None else int(cond_offset)
        if isinstance(prior, GridPositions):  # the ordering is applied once, here
            try:
                prior.set_cell_order(self.ordering.permutation(*self.grid))
            except ValueError as exc:
                raise VqgenError(f"the prior cannot place the {self.grid[0]}x{self.grid[1]} "
                                 f"grid's cells: {exc}") from None
        if prior is not None and prior.vocab_size != tokenizer.vocab_size:
            raise VqgenError(
                f"prior.params.vocab_size is {prior.vocab_size} but the tokenizer has "
                f"{tokenizer.vocab_size} codes; set prior.params.vocab_size: "
                f"{tokenizer.vocab_size}"
            )
        if (why := cond_offset_problem(prior, conditioner, cond_offset)) is not None:
            raise VqgenError(why)
        cond_vocab = getattr(prior, "cond_vocab_size", None)
        if (
            prior is not None
            and conditioner is not None
            and cond_offset is None
            and cond_vocab is not None
            and cond_vocab != conditioner.vocab_size
        ):
            raise VqgenError(
                f"prior.params.cond_vocab_size is {cond_vocab} but the conditioner has "
                f"{conditioner.vocab_size} tokens; set prior.params.cond_vocab_size: "
                f"{conditioner.vocab_size}"
            )

    # -- the seams ----------------------------------------------------------
    @property
    def device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def cond_batch(self, condition: Any, n: int) -> dict[str, Any] | None:
        """Normalise a ``condition`` argument to a batch mapping of ``n`` samples.

        ``None`` (unconditional), a class id or a sequence/tensor of ``n`` class ids
        (shorthand for ``{"label": ...}``), or a mapping of condition tensors with a
        leading batch dimension of ``n`` or 1 (broadcast).
        """
        if condition is None:
            if self.conditioner is not None:
                raise VqgenError(
                    f"this pipeline is conditional ({type(self.conditioner).__name__}); "
                    "pass a condition"
                )
            return None
        if self.conditioner is None:
            raise VqgenError("this pipeline has no conditioner, so it takes no condition")
        if not isinstance(condition, Mapping):
            labels = self.class_ids(condition)  # (n or 1,)
            condition = {"label": labels}
        batch: dict[str, Any] = {}
        for key, value in condition.items():
            if isinstance(value, torch.Tensor):
                if value.ndim == 0:
                    value = value[None]
                if value.shape[0] == 1 and n > 1:
                    value = value.expand(n, *value.shape[1:])
                elif value.shape[0] != n:
                    raise VqgenError(
                        f"condition {key!r} has {value.shape[0]} entries; expected {n} or 1"
                    )
                value = value.to(self.device)
            batch[key] = value
        return batch

    def class_ids(self, classes: Any) -> torch.Tensor:
        """Class ids ``[n]`` int64 of ``classes``: an id, a class name, or a sequence or
        tensor of them (names: :attr:`class_names`, e.g. the data's class folders)."""
        if isinstance(classes, torch.Tensor):
            return classes.to(torch.long).reshape(-1)
        items = [classes] if isinstance(classes, str | int) else list(classes)
        if not any(isinstance(c, str) for c in items):
            return torch.as_tensor(items, dtype=torch.long).reshape(-1)
        names = self.class_names
        if names is None:
            raise VqgenError(f"class {next(c for c in items if isinstance(c, str))!r}: this "
                             "pipeline knows no class names (its data set names none); "
                             "give class ids")
        ids = []
        for c in items:
            if isinstance(c, str) and c not in names:
                close = difflib.get_close_matches(c, names, n=3)
                hint = f"did you mean {', '.join(close)}? " if close else ""
                shown = ", ".join(names[:20]) + (" …" if len(names) > 20 else "")
                raise VqgenError(f"class {c!r} is not a class of this run; {hint}classes: "
                                 f"{shown} (or ids 0..{len(names) - 1})")
            ids.append(names.index(c) if isinstance(c, str) else int(c))
        return torch.tensor(ids, dtype=torch.long)  # (n,)

    def cond_tokens(self, batch: Mapping[str, Any] | None) -> torch.Tensor | None:
        """Condition tokens ``[B, Lc]`` of a data batch as the prior takes them
        (:meth:`prior_cond`)."""
        if batch is None or self.conditioner is None:
            return None
        return self.prior_cond(self.conditioner.tokens(batch))  # (B, Lc)

    def prior_cond(self, raw: torch.Tensor | None, *, dropout: float = 0.0,
                   generator: torch.Generator | None = None, rank: int = 0,
                   world: int = 1) -> torch.Tensor | None:
        """The one seam from conditioner ids to the prior's: ``raw [B, Lc]`` (row-major,
        as conditioners make them) with condition dropout ``dropout`` (drawn for the
        global batch of ``world`` slices, this one ``rank``), offset into the prior's id
        range and, for a prior that takes a spatial map aligned, in its sequence order.
        Training, held-out losses and sampling all go through here."""
        if raw is None:
            return None
        if dropout > 0:
            assert self.conditioner is not None
            raw = self.conditioner.drop(raw, dropout, generator, rank=rank, world=world)
        return self.align_cond(raw + self.cond_offset)  # (B, Lc)

    def align_cond(self, cond: torch.Tensor) -> torch.Tensor:
        """Row-major spatial condition tokens ``[B, h*w]`` → the prior's sequence order,
        where the prior takes them aligned (``Prior.aligned_condition``); else as given."""
        aligned = bool(getattr(self.prior, "aligned_condition", False))
        return align_condition(cond, self.ordering, self.grid) if aligned else cond


    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, H, W]`` → code grid ``[B, h, w]``."""
        return self.tokenizer.encode(images)

    @torch.no_grad()
    def tokens(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A data batch → ``(seq [B, L], cond [B, Lc] | None)`` as the prior trains on it."""
        codes = self.encode(batch[getattr(self.tokenizer, "input_key", "image")])  # (B, h, w)
        return self.ordering.flatten(codes), self.cond_tokens(batch)

    def nll(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """``[B]`` negative log-likelihood, nats per image token (autoregressive priors:
        a masked prior has no likelihood; see :meth:`loss`)."""
        prior = self._require_prior()
        if not isinstance(prior, Autoregressive):
            raise VqgenError(
                f"Pipeline.nll needs an autoregressive prior (an exact likelihood); the "
                f"{type(prior).__name__} prior is a {prior_family(prior)} prior, and its "
                f"training loss ({prior.loss_name!r}) is not a likelihood: use "
                "Pipeline.loss(batch) (prior.loss) for it, and compare such priors by their "
                "samples"
            )
        seq, cond = self.tokens(batch)
        return prior.nll(seq, cond)

    def loss(self, batch: Mapping[str, Any], generator: torch.Generator | None = None
             ) -> torch.Tensor:
        """``[B]`` the prior's training loss (``prior.loss_name``: ``"nll"`` or
        ``"masked_ce"``), nats per image token; ``generator`` feeds a masked prior's masks."""
        seq, cond = self.tokens(batch)
        return self._require_prior().loss(seq, cond, generator=generator)

    def _require_prior(self) -> Prior:
        if self.prior is None:
            raise VqgenError("this pipeline has no prior (a stage-1-only config)")
        return self.prior

    # -- generation ---------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        n: int,
        condition: Any = None,
        *,
        size: tuple[int, int] | None = None,
        sampler: Sampler | None = None,
        seed: int | None = None,
        prefix: torch.Tensor | None = None,
        batch_size: int | None = None,
        guidance: float | None = None,
        known: torch.Tensor | None = None,
    ) -> Generation:
        """Sample ``n`` images.

        ``size`` is the image size ``(H, W)`` in pixels (default: a spatial
        condition's size, else the training grid; see :meth:`condition_canvas`);
        ``prefix`` is a partial code grid ``[n or 1, r, w]`` of the top ``r`` rows to
        complete (any canvas); ``known`` is a code grid ``[n or 1, h, w]`` of the
        training grid with ``-1`` where a cell is to be drawn, any cells known
        (inpainting): a masked prior sees every known cell from its first round, an
        autoregressive one each known cell once its ordering reaches it (the cells
        before it are drawn without seeing it). Known cells come back unchanged.
        ``seed`` makes the draw reproducible. With a rejection sampler the
        result also carries the acceptance rate achieved. ``guidance`` is the
        classifier-free guidance scale ``s``: each step samples from
        ``uncond + s · (cond − uncond)`` logits, the unconditional ones computed with
        the conditioner's null tokens; ``s = 1`` is plain conditional sampling; ``None``
        takes the pipeline's ``guidance`` (the config's ``sampling.guidance``).
        """
        guidance, sampler = self._check_request(n, guidance, sampler)
        cond = self.cond_batch(condition, n)
        h, w = self._request_canvas(cond, size)
        prefix = self._check_prefix(prefix, n, h, w)
        if known is not None:
            if prefix is not None:
                raise VqgenError("give prefix rows or a known grid, not both")
            known = self._check_known(known, n, h, w)
        labels = cond.get("label") if cond is not None else None
        device = self.device
        gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        bs = batch_size or n

        def draw(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """Codes and decoded images for the samples ``idx`` of the request."""
            sub = {k: v[idx] if isinstance(v, torch.Tensor) else v for k, v in (cond or {}).items()}
            pre = prefix[idx] if prefix is not None else None
            request = _Draw(self._require_prior(), len(idx), sub or None, sampler, gen, pre,
                            guidance, known[idx] if known is not None else None)
            codes = self._sample_codes(request, h, w)
            return self.to_images(self.tokenizer.decode(codes)), codes

        select = getattr(sampler, "draw_and_select", None)
        if select is not None:  # a rejection sampler judges finished samples
            if labels is None:
                raise VqgenError("rejection sampling needs a class condition to judge against")
            images, codes, acceptance = select(draw, labels, gen)
            return Generation(images, codes, labels, acceptance)
        chunks = [draw(torch.arange(i, min(i + bs, n), device=device)) for i in range(0, n, bs)]
        images = torch.cat([c[0] for c in chunks])  # (n, C, H, W)
        codes = torch.cat([c[1] for c in chunks])  # (n, h, w)
        return Generation(images, codes, labels)

    def _check_request(self, n: int, guidance: float | None, sampler: Sampler | None
                       ) -> tuple[float, Sampler]:
        """The guidance scale and sampler of a :meth:`generate` call, checked."""
        guidance = self.guidance if guidance is None else float(guidance)
        if not math.isfinite(guidance) or not 0 <= guidance <= MAX_GUIDANCE:
            raise VqgenError(f"guidance must be a finite number in [0, {MAX_GUIDANCE:g}], "
                             f"got {guidance}")
        if n < 1:
            raise VqgenError(f"n must be at least 1, got {n}")
        sampler = sampler or self.sampler
        if sampler is None:
            raise VqgenError("no sampler: pass sampler= or give the config a sampler section")
        if guidance != 1.0 and (self.conditioner is None or self.conditioner.null_id is None):
            raise VqgenError(
                "classifier-free guidance needs a conditioner with a null token, and a prior "
                "trained with cond_dropout > 0"
            )
        return guidance, sampler

    def _request_canvas(self, cond: Mapping[str, Any] | None,
                        size: tuple[int, int] | None) -> tuple[int, int]:
        """The latent canvas ``(h, w)`` of a request: ``size``'s, else a spatial
        condition's, else the training grid; a condition of another size is refused."""
        canvas = self.condition_canvas(cond)
        h, w = self._canvas(size) if size is not None or canvas is None else canvas
        if canvas is not None and canvas != (h, w):
            raise VqgenError(
                f"the spatial condition is a {canvas[0]}x{canvas[1]} token grid but the canvas "
                f"is {h}x{w} latents; give a condition of the canvas size (or leave size out)"
            )
        return h, w

    def condition_canvas(self, cond: Mapping[str, Any] | None) -> tuple[int, int] | None:
        """The latent canvas ``(h, w)`` that a spatial condition batch fixes (None for
        no condition or a non-spatial one). A condition smaller than the training grid
        is refused (the prior has not learnt to start a smaller picture); a larger one
        is sampled with the sliding window."""
        if cond is None or self.conditioner is None or not self.conditioner.spatial:
            return None
        one = {k: v[:1] if isinstance(v, torch.Tensor) else v for k, v in cond.items()}
        try:
            hc, wc = self.conditioner.grid(one).shape[1:]  # (1, hc, wc)
        except ValueError as exc:  # e.g. a size not divisible by the cond stage's f
            raise VqgenError(f"the condition cannot be encoded: {exc}") from None
        th, tw = self.grid
        if hc < th or wc < tw:
            f = self.tokenizer.downsample
            raise VqgenError(
                f"the condition gives a {hc}x{wc} token grid, smaller than the training "
                f"grid {th}x{tw} ({th * f}x{tw * f} pixels); give a condition at least the "
                "training size"
            )
        return int(hc), int(wc)

    def to_images(self, decoded: torch.Tensor) -> torch.Tensor:
        """What the tokenizer decodes → pictures ``[n, 1 or 3, H, W]``: its ``to_rgb``
        where it has one (label logits become palette colours), else as decoded."""
        to_rgb = getattr(self.tokenizer, "to_rgb", None)
        return to_rgb(decoded) if callable(to_rgb) else decoded

    def _canvas(self, size: tuple[int, int] | None) -> tuple[int, int]:
        if size is None:
            return self.grid
        try:
            return self.tokenizer.latent_shape(int(size[0]), int(size[1]))
        except ValueError as exc:
            raise VqgenError(str(exc)) from None

    def _check_prefix(
        self, prefix: torch.Tensor | None, n: int, h: int, w: int
    ) -> torch.Tensor | None:
        if prefix is None:
            return None
        if prefix.ndim == 2:
            prefix = prefix[None]
        if prefix.ndim != 3 or prefix.shape[2] != w or prefix.shape[1] > h:
            raise VqgenError(
                f"prefix must be the top rows of the code grid, [n, r <= {h}, {w}]; "
                f"got {tuple(prefix.shape)}"
            )
        if prefix.shape[0] not in (1, n):
            raise VqgenError(f"prefix has {prefix.shape[0]} grids; expected {n} or 1")
        known = prefix.shape[1] * w
        first = self.ordering.permutation(h, w)[:known]
        if isinstance(self.prior, Autoregressive) and not torch.equal(
                torch.sort(first).values, torch.arange(known)):
            raise VqgenError(
                f"the {type(self.ordering).__name__} ordering does not visit the top "
                f"{prefix.shape[1]} rows first, so they cannot be completed from; use row_major"
            )
        return prefix.expand(n, -1, -1).to(self.device)

    def _check_known(self, known: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
        """``known`` as ``[n, h, w]`` int64 on the pipeline's device, checked: the training
        grid's shape, codes of the tokenizer or -1."""
        known = torch.as_tensor(known)
        if known.ndim == 2:
            known = known[None]
        if (h, w) != self.grid:
            raise VqgenError(f"known cells are given on the training grid "
                             f"{self.grid[0]}x{self.grid[1]}; for a {h}x{w} canvas give "
                             "prefix rows")
        if known.ndim != 3 or tuple(known.shape[1:]) != (h, w) or known.shape[0] not in (1, n):
            raise VqgenError(f"known must be a code grid [{n} or 1, {h}, {w}] with -1 where a "
                             f"cell is drawn; got {tuple(known.shape)}")
        if known.is_floating_point() or known.dtype == torch.bool:
            raise VqgenError(f"known must hold integer codes, got dtype {known.dtype}")
        vocab = self.tokenizer.vocab_size
        bad = (known < -1) | (known >= vocab)
        if bool(bad.any()):
            raise VqgenError(f"known holds {int(known[bad][0])}, not a code in [0, {vocab}) "
                             "or -1 (to be drawn)")
        return known.long().expand(n, -1, -1).to(self.device)

    def _sample_codes(self, d: _Draw, h: int, w: int) -> torch.Tensor:
        """``[b, h, w]`` codes: the prior decodes the training grid, else sliding."""
        if (h, w) == self.grid:
            return self._sample_cached(d, h, w)
        if not isinstance(d.prior, Autoregressive):
            f, (gh, gw) = self.tokenizer.downsample, self.grid
            raise VqgenError(
                f"canvas {h}x{w} latents is not the training grid {gh}x{gw}: the "
                f"{type(d.prior).__name__} prior is a {prior_family(d.prior)} prior and "
                "samples the training grid only (the sliding window is for autoregressive "
                f"priors); sample {gh * f}x{gw * f} pixels (leave size out), with a condition "
                "of that size"
            )
        if h < self.grid[0] or w < self.grid[1]:
            raise VqgenError(
                f"canvas {h}x{w} latents is smaller than the training grid "
                f"{self.grid[0]}x{self.grid[1]} in one dimension; sample at least the "
                "training size"
            )
        if not torch.equal(self.ordering.permutation(h, w), torch.arange(h * w)):
            raise VqgenError(
                f"canvases larger than the training grid are sampled with a sliding window, "
                f"which needs row-major order; this pipeline uses "
                f"{type(self.ordering).__name__}"
            )
        return self._sample_sliding(d, h, w)

    def _sample_cached(self, d: _Draw, h: int, w: int) -> torch.Tensor:
        """The training grid, decoded by the prior from one :class:`Decoding` request."""
        c = self.cond_tokens(d.cond)  # (b, Lc) or None
        grid = d.known  # (b, h, w), -1 = to be drawn
        if d.prefix is not None:  # the top rows known, the rest -1
            grid = torch.full((d.b, h, w), -1, dtype=torch.long, device=d.prefix.device)
            grid[:, : d.prefix.shape[1]] = d.prefix
        known = self.ordering.flatten(grid) if grid is not None else None  # (b, h*w)
        guided = d.guidance != 1.0 and c is not None
        request = Decoding(
            batch_size=d.b, length=h * w, sampler=d.sampler, cond=c,
            null=self._null(c) if guided and c is not None else None,
            guidance=d.guidance, generator=d.gen, known=known,
        )
        seq = d.prior.decode(request)  # (b, h*w)
        return self.ordering.unflatten(seq, h, w)  # (b, h, w)

    def _null(self, c: torch.Tensor) -> torch.Tensor:
        """Offset null tokens shaped like the offset condition tokens ``c``."""
        assert self.conditioner is not None
        return self.conditioner.null_like(c - self.cond_offset) + self.cond_offset

    def _sample_sliding(self, d: _Draw, h: int, w: int) -> torch.Tensor:
        prior, b, cond, prefix, guidance = d.prior, d.b, d.cond, d.prefix, d.guidance
        assert isinstance(prior, Autoregressive)  # checked by _sample_codes
        wh, ww = self.grid
        codes = torch.zeros(b, h, w, dtype=torch.long, device=self.device)  # (b, h, w)
        n_known = 0
        if prefix is not None:
            codes[:, : prefix.shape[1]] = prefix
            n_known = prefix.shape[1] * w
        cond_grid = self._cond_grid(cond, h, w)  # (b, h, w) spatial condition, or None
        cond_flat = self.cond_tokens(cond) if cond_grid is None else None  # (b, Lc)
        for i in range(h):
            top = window_origin(i, h, wh)
            for j in range(w):
                if i * w + j < n_known:
                    continue
                left = window_origin(j, w, ww)
                window = codes[:, top : top + wh, left : left + ww].reshape(b, -1)  # (b, wh*ww)
                c = cond_flat
                if cond_grid is not None:
                    c = cond_grid[:, top : top + wh, left : left + ww].reshape(b, -1)
                    c = c + self.cond_offset  # (b, wh*ww)
                pos = (i - top) * ww + (j - left)
                if prior.prefix_logits:  # later window positions cannot matter
                    window = window[:, : pos + 1]  # (b, pos + 1)
                if guidance != 1.0 and c is not None:
                    both = prior.logits(torch.cat([window, window]), torch.cat([c, self._null(c)]))
                    logits = _guide(both[:, pos], guidance)  # (b, V)
                else:
                    logits = prior.logits(window, c)[:, pos]  # (b, V): sees window[:, :pos] only
                codes[:, i, j] = d.sampler.sample(logits, generator=d.gen)
        return codes

    def _cond_grid(self, cond: Mapping[str, Any] | None, h: int, w: int) -> torch.Tensor | None:
        """The spatial condition as a ``[b, h, w]`` token grid (before offsetting); its
        size was checked against the canvas by :meth:`generate`."""
        if cond is None or self.conditioner is None or not self.conditioner.spatial:
            return None
        return self.conditioner.grid(cond)  # (b, h, w)


@dataclass
class _Draw:
    """One batch of sampling, besides its canvas: ``b`` samples from ``prior`` under
    ``cond`` with ``sampler`` and ``gen``, a known ``prefix`` of rows or ``known`` cells,
    the guidance."""

    prior: Prior
    b: int
    cond: Mapping[str, Any] | None
    sampler: Sampler
    gen: torch.Generator | None
    prefix: torch.Tensor | None  # (b, r, w) known top rows, or None
    guidance: float = 1.0
    known: torch.Tensor | None = None  # (b, h, w) known cells of the training grid, -1 else


def _guide(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """``[2b, V]`` (conditional rows, then unconditional) → ``[b, V]`` guided logits."""
    return guide(logits, scale)  # (b, V)


def cond_offset_problem(prior: Any, conditioner: Conditioner | None,
                        cond_offset: int | None) -> str | None:
    """Why an explicit ``cond_offset`` cannot feed ``conditioner``'s tokens to ``prior``
    (their shifted ids outside the prior's condition ids), or None when it can: with
    ``cond_vocab_size`` C > 0 the prior takes condition ids in ``[V, V + C)``, with 0
    (taming's shared table) in ``[0, V)``."""
    cond_vocab = getattr(prior, "cond_vocab_size", None)
    if cond_offset is None or conditioner is None or cond_vocab is None:
        return None
    v, n = int(prior.vocab_size), int(conditioner.vocab_size)
    lo, hi = (v, v + cond_vocab) if cond_vocab else (0, v)
    if lo <= cond_offset and cond_offset + n <= hi:
        return None
    return (f"cond_offset {cond_offset} puts the conditioner's {n} tokens at "
            f"[{cond_offset}, {cond_offset + n}), outside the prior's condition ids "
            f"[{lo}, {hi})")


def assemble(config: Any, tokenizer: Tokenizer, conditioner: Conditioner | None,
             grid: tuple[int, int], registry: Any, *, prior: Prior | None = None,
             cond_offset: int | None = None) -> Pipeline:
    """The Pipeline of a (loaded) ``config`` around its tokenizer and conditioner: the
    prior built from the config (or the given, e.g. trained, one), the ordering
    (row-major where the config has none), the sampler and the default guidance.
    The one place a pipeline is put together from a config (training and loading)."""
    if prior is None and config.prior is not None:
        prior = registry.create("prior", config.prior.name, config.prior.params)
    ordering = (registry.create("ordering", config.ordering.name, config.ordering.params)
                if config.ordering else RowMajor())
    sampler = (registry.create("sampler", config.sampler.name, config.sampler.params)
               if config.sampler else None)
    pipe = Pipeline(tokenizer, prior, grid=grid, ordering=ordering, sampler=sampler,
                    conditioner=conditioner, cond_offset=cond_offset,
                    guidance=config.sampling.guidance,
                    class_names=config_class_names(config, registry, conditioner))
    pipe.config = config  # type: ignore[attr-defined]
    pipe.registry = registry  # type: ignore[attr-defined]  # held-out data, judges
    return pipe


def config_class_names(config: Any, registry: Any, conditioner: Conditioner | None
                       ) -> list[str] | None:
    """The class names of a config's data (``data.params.classes`` as recorded, else the
    data set's ``class_names(params)``), where they fit the class conditioner; else None."""
    n = getattr(conditioner, "n_classes", None)
    if n is None:
        return None
    names = config.data.params.get("classes")
    if not isinstance(names, list):
        lister = getattr(registry.get("dataset", config.data.name).cls, "class_names", None)
        try:
            names = lister(config.data.params) if lister is not None else None
        except Exception:  # noqa: BLE001 (the data may be absent where a run is sampled)
            names = None
    if not isinstance(names, list) or len(names) != n:
        return None
    return [str(c) for c in names]
