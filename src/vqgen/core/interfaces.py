"""The five abstract stages of a two-stage VQ image model (a tokenizer, then a prior).

Conventions shared by every interface:

* Images are float tensors ``[B, C, H, W]`` with values in ``[-1, 1]``.
* Codes (token ids) are ``int64`` tensors.
* A *grid* of codes is ``[B, h, w]``; a *sequence* is ``[B, L]`` with ``L = h * w``.
* Every component declares a pydantic ``Params`` model (``extra="forbid"``) and its
  constructor takes exactly those fields as keyword arguments. The validated
  values are kept on ``self.params``.

Nothing here knows a concrete plugin.

Why one file of this size: the five interfaces, their optional-ability Protocols and the
sizes they exchange are the contract every component is written against; read together
they are one page of the design, split they would be five half-contracts.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol, get_args, runtime_checkable

import torch
from pydantic import BaseModel, ConfigDict, model_validator
from torch import nn

from vqgen.core.errors import VqgenError

__all__ = [
    "AUTO",
    "ActivationEstimate",
    "Adversarial",
    "Auto",
    "Autoregressive",
    "AutoregressivePrior",
    "Component",
    "CondStage",
    "Conditioner",
    "Decoding",
    "Fitted",
    "InitFromCodeVectors",
    "Masked",
    "MaskedPrior",
    "NoParams",
    "Ordering",
    "ParamsModel",
    "Prior",
    "Sampler",
    "Sizes",
    "Tokenizer",
    "check_grid",
    "cond_stage_tokenizer",
    "guide",
    "prior_family",
    "require_wired",
    "signature_problems",
    "transformer_activation_bytes",
]


def _accepts_bool(annotation: Any) -> bool:
    """Whether a field's type admits ``True`` / ``False`` as such (not as 1 / 0)."""
    if annotation is bool or annotation is Any:
        return True
    return any(_accepts_bool(a) for a in get_args(annotation))


def refuse_bools_for_numbers(model: type[BaseModel], data: Any) -> Any:
    """``data`` for ``model``, refusing ``true`` / ``false`` given for a number field
    (pydantic would read them as 1 / 0: ``k=true`` is a typo, not k = 1)."""
    if isinstance(data, dict):
        for name, value in data.items():
            field = model.model_fields.get(name)
            if isinstance(value, bool) and field is not None \
                    and not _accepts_bool(field.annotation):
                raise ValueError(f"{name}: {str(value).lower()} is a boolean; give a number")
    return data


class ParamsModel(BaseModel):
    """Base of every component's ``Params``: unknown fields are an error, and so are
    non-finite numbers (``inf``, ``nan``) and booleans where a number is expected."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bools_for_numbers(cls, data: Any) -> Any:
        return refuse_bools_for_numbers(cls, data)


class NoParams(ParamsModel):
    """Params of a component that takes none."""


def signature_problems(cls: type) -> list[str]:
    """Differences between ``cls.__init__``'s keyword arguments and ``cls.Params``' fields.

    An empty list means the constructor takes exactly the Params fields, with the
    same defaults: the contract every registered component keeps.
    """
    sig = inspect.signature(cls.__init__)  # type: ignore[misc]
    args = {
        n: p
        for n, p in sig.parameters.items()
        if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }
    fields = cls.Params.model_fields  # type: ignore[attr-defined]
    problems = [f"__init__ lacks field {n!r}" for n in fields if n not in args]
    problems += [f"__init__ takes {n!r}, which Params lacks" for n in args if n not in fields]
    for n, p in args.items():
        if n in fields and not fields[n].is_required():
            default = fields[n].get_default(call_default_factory=True)
            if p.default is inspect.Parameter.empty or p.default != default:
                problems.append(
                    f"default of {n!r} is {p.default!r} in __init__ but {default!r} in Params"
                )
    return problems


def _takes_only_fields(fn: Any) -> bool:
    """Whether ``fn(self, **fields)`` takes nothing but keyword fields."""
    params = list(inspect.signature(fn).parameters.values())[1:]
    return len(params) == 1 and params[0].kind is inspect.Parameter.VAR_KEYWORD


def params_signature(model: type[ParamsModel]) -> inspect.Signature:
    """``(self, *, field=default, ...)``: the constructor signature ``model`` declares."""
    empty = inspect.Parameter.empty
    args = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for name, field in model.model_fields.items():
        default = empty if field.is_required() else field.get_default(
            call_default_factory=True)
        args.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                                      default=default, annotation=field.annotation))
    return inspect.Signature(args)


#: The value of a size that the pipeline's assembly takes from the other stages.
AUTO = "auto"
Auto = Literal["auto"]


@dataclass(frozen=True)
class Sizes:
    """What the other stages fix for one component's sizes (see :meth:`Component.wire`).

    ``None``: not known here (e.g. the grid, where the data names no resolution).
    """

    vocab_size: int | None = None  # the image tokenizer's codes
    downsample: int | None = None  # the image tokenizer's f
    height: int | None = None  # rows of the latent grid at the data's resolution
    width: int | None = None  # its columns
    cond_vocab_size: int = 0  # the conditioner's ids (0: no conditioner)
    cond_length: int = 0  # condition tokens per sample, Lc (0: no conditioner)
    cond_spatial: bool = False  # the condition is a token map aligned with the grid
    in_channels: int | None = None  # channels fed to a nested (cond-stage) tokenizer
    n_classes: int | None = None  # the data's classes (None: it names none, or unknown)
    data: str = "the data"  # how a message names the data set (e.g. "data 'folder'")


class Component(ABC):  # noqa: B024 (abstract by role; subclasses add the methods)
    """Mixin shared by all components: validates and stores constructor fields.

    Subclasses call ``super().__init__(**fields)`` with exactly the fields of their
    ``Params`` model; the validated model is stored as ``self.params``. A constructor
    that takes only ``**fields`` gets its signature from ``Params`` (keyword-only, the
    same defaults), so the model is the one place its fields are declared.
    """

    Params: ClassVar[type[ParamsModel]] = NoParams

    def __init__(self, **fields: Any) -> None:
        super().__init__()  # nn.Module.__init__ where the component is a module
        self.params = type(self).Params(**fields)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None and _takes_only_fields(init):
            init.__signature__ = params_signature(cls.Params)

    @classmethod
    def wire(cls, params: dict[str, Any], sizes: Sizes) -> dict[str, Any]:
        """``params`` (resolved, every field) with each ``"auto"`` value whose name is a
        field of :class:`Sizes` replaced by that size. Components whose sizes follow
        from others in other ways (GPT's ``block_size``) extend this; a size that
        cannot be resolved, or an explicit one that cannot work, raises ValueError."""
        out = dict(params)
        for name in params:
            if params[name] == AUTO and name in Sizes.__dataclass_fields__:
                value = getattr(sizes, name)
                if value is None:
                    raise ValueError(f"{name}: 'auto' cannot be resolved here ({_UNKNOWN[name]}); "
                                     "give a number")
                out[name] = value
        return out


def check_grid(params: Mapping[str, Any], sizes: Sizes) -> None:
    """Raise ValueError where ``params`` gives a ``height`` / ``width`` other than the data's
    latent grid (in :meth:`Component.wire` of a component that places cells on the grid)."""
    for name in ("height", "width"):
        have = getattr(sizes, name)
        if have is not None and name in params and params[name] != have:
            raise ValueError(f"{name}: {params[name]}, but the data's latent grid is "
                             f"{sizes.height}x{sizes.width}; leave it out (auto)")


_UNKNOWN = {
    "vocab_size": "no tokenizer", "downsample": "no tokenizer",
    "height": "the data names no resolution", "width": "the data names no resolution",
    "in_channels": "no conditioner feeds this tokenizer",
    "n_classes": "the data set names no classes: a flat folder, a data set without labels, "
                 "or a folder that cannot be listed here",
}


def require_wired(component: Component, names: tuple[str, ...],
                  alone: Mapping[str, Any] | None = None) -> None:
    """Raise when a size in ``names`` is still ``"auto"``: a component built directly
    (not through a config) must be given the numbers that assembly would resolve.
    ``alone`` maps sizes that have a meaning without other stages (no conditioner: 0
    condition ids) to that value, which replaces their ``"auto"`` in ``params``."""
    fixed = {n: v for n, v in (alone or {}).items() if getattr(component.params, n) == AUTO}
    if fixed:
        component.params = component.params.model_copy(update=fixed)
    left = [n for n in names if getattr(component.params, n) == AUTO]
    if left:
        who = type(component).__name__
        raise VqgenError(
            f"{who}: {', '.join(left)} {'is' if len(left) == 1 else 'are'} 'auto', which a "
            f"pipeline config resolves from the other stages (vqgen.load_config, `vqgen "
            f"train`); building {who} directly, give {'it' if len(left) == 1 else 'them'}"
        )


class Tokenizer(Component, nn.Module):
    """Image ⇄ grid of codes (the first stage).

    ``encode(x)`` maps ``x: float [B, in_channels, H, W]`` in ``[-1, 1]`` to
    ``int64 [B, H // downsample, W // downsample]`` with values in ``[0, vocab_size)``;
    ``decode(codes)`` maps such a grid back to ``float [B, out_channels, H, W]``
    in ``[-1, 1]`` (approximately; decoders are not clamped).
    """

    vocab_size: int
    downsample: int
    in_channels: int

    @abstractmethod
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` float in ``[-1, 1]`` → ``[B, h, w]`` int64 codes."""

    @abstractmethod
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``[B, h, w]`` int64 codes → ``[B, C, H, W]`` float image."""

    @classmethod
    def with_downsample(cls, params: dict[str, Any], f: int) -> dict[str, Any]:
        """Given (unresolved) ``params`` of a nested (cond-stage) tokenizer, the same with
        what sets its downsampling factor filled in as ``f`` where the user left it out.
        The default leaves them as they are (a tokenizer whose f is fixed)."""
        return params

    def code_vectors(self) -> torch.Tensor | None:
        """``[vocab_size, d]`` float: what each code stands for (its codebook entry, a
        colour), for priors that start their token embeddings from it
        (:class:`InitFromCodeVectors`); ``None`` where the tokenizer has no such vectors."""
        return None

    def latent_shape(self, height: int, width: int) -> tuple[int, int]:
        """The code-grid size ``(h, w)`` for an image of ``height × width`` pixels."""
        f = self.downsample
        if height % f or width % f:
            raise ValueError(
                f"image size {height}x{width} is not divisible by the downsampling "
                f"factor f={f}; use a multiple of {f} in each dimension"
            )
        return height // f, width // f


class Conditioner(Component, nn.Module):
    """Raw condition ⇄ condition tokens.

    ``tokens(batch)`` reads what it needs from a batch mapping (``"image"``
    ``[B, 3, H, W]``, ``"label"`` ``[B]``, ``"segmentation"`` ``[B, H, W]``,
    ``"depth"`` ``[B, 1, H, W]``, ``"keypoints"`` ``[B, N, K, 3]``) and returns
    ``int64 [B, Lc]`` in ``[0, vocab_size)``: ``Lc = 1`` for a class, ``hc * wc``
    (row-major) for a spatial map.

    ``null_id`` (or ``None``) is the token meaning "no condition", used for
    condition dropout in training and classifier-free guidance in sampling;
    ``null_like(tokens)`` replaces every token of a batch by it.

    A spatial conditioner (``spatial = True``) also provides ``grid(batch) -> [B,
    hc, wc]`` and owns a Tokenizer of its own, ``self.tokenizer`` (the paper's
    "cond stage"), which is trained as its own stage 1 on
    ``condition_input(batch)`` (the tensor that tokenizer encodes, e.g. a one-hot
    map or a rendered edge image).
    """

    vocab_size: int
    spatial: ClassVar[bool] = False
    null_id: int | None = None
    #: the batch key that a condition file (``vqgen sample --cond FILE``) fills, if any
    condition_key: ClassVar[str | None] = None

    @abstractmethod
    def tokens(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Condition tokens ``[B, Lc]`` int64 for a batch."""

    def grid(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Spatial conditioners: condition tokens as a grid ``[B, hc, wc]`` int64."""
        raise TypeError(f"{type(self).__name__} is not a spatial conditioner")

    def condition_shape(self, height: int, width: int) -> tuple[int, ...]:
        """The shape of one sample's condition tokens for images of ``height × width``
        pixels: ``(1,)`` for one token (a class); ``(hc, wc)`` for a spatial map. The
        pipeline's assembly sizes the prior from it (``Lc`` is the product)."""
        return (1,)

    def condition_input(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Spatial conditioners: what their own tokenizer encodes, ``[B, C, H, W]``."""
        raise TypeError(f"{type(self).__name__} is not a spatial conditioner")

    def null_like(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, Lc]`` of ``null_id``: the unconditional input for classifier-free guidance."""
        if self.null_id is None:
            raise ValueError(
                f"{type(self).__name__} has no null token, so it supports neither condition "
                "dropout nor classifier-free guidance"
            )
        return torch.full_like(tokens, self.null_id)

    def drop(self, tokens: torch.Tensor, p: float, generator: torch.Generator | None = None,
             *, rank: int = 0, world: int = 1) -> torch.Tensor:
        """Condition dropout: each sample's ``[B, Lc]`` tokens (the conditioner's own ids,
        before the pipeline's offset) become null with probability ``p``. The draws (on
        ``generator``'s device; the CPU without one) cover a global batch of ``world``
        slices of ``B``, of which ``tokens`` is slice ``rank``: distributed ranks drop
        what one process with the whole batch would."""
        if p <= 0:
            return tokens
        b = tokens.shape[0]
        device = generator.device if generator is not None else torch.device("cpu")
        u = torch.rand(b * world, generator=generator, device=device)  # (B·world,)
        drop = u[rank * b : (rank + 1) * b].to(tokens.device) < p  # (B,)
        return torch.where(drop[:, None], self.null_like(tokens), tokens)


class Ordering(Component):
    """A bijection between an ``h × w`` grid and a sequence of ``h * w`` tokens.

    ``permutation(h, w)[i]`` is the row-major (raster) index of the grid cell
    that comes ``i``-th in the sequence; it is defined for every ``h, w >= 1``.
    ``flatten`` and ``unflatten`` apply it; subclasses implement only
    ``permutation``.
    """

    def __init__(self, **fields: Any) -> None:
        super().__init__(**fields)
        self._cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    @abstractmethod
    def permutation(self, h: int, w: int) -> torch.Tensor:
        """``int64 [h * w]``: raster index of each sequence position."""

    def _perms(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        if h < 1 or w < 1:
            raise ValueError(f"grid size must be at least 1x1, got {h}x{w}")
        key = (h, w)
        if key not in self._cache:
            perm = torch.as_tensor(self.permutation(h, w), dtype=torch.int64)  # (h*w,)
            if perm.shape != (h * w,) or not torch.equal(
                torch.sort(perm).values, torch.arange(h * w)
            ):
                raise ValueError(
                    f"{type(self).__name__}.permutation({h}, {w}) is not a permutation of "
                    f"0..{h * w - 1}"
                )
            self._cache[key] = (perm, torch.argsort(perm))
        return self._cache[key]

    def inverse(self, h: int, w: int) -> torch.Tensor:
        """``int64 [h * w]``: sequence position of each raster index."""
        return self._perms(h, w)[1]

    def flatten(self, grid: torch.Tensor) -> torch.Tensor:
        """``[B, h, w, *rest]`` → ``[B, h * w, *rest]`` in sequence order."""
        b, h, w = grid.shape[:3]
        perm = self._perms(h, w)[0].to(grid.device)
        raster = grid.reshape(b, h * w, *grid.shape[3:])  # (B, h*w, *rest)
        return raster[:, perm]

    def unflatten(self, seq: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """``[B, h * w, *rest]`` in sequence order → ``[B, h, w, *rest]``."""
        if seq.shape[1] != h * w:
            raise ValueError(f"sequence of length {seq.shape[1]} cannot fill a {h}x{w} grid")
        inv = self._perms(h, w)[1].to(seq.device)
        raster = seq[:, inv]  # (B, h*w, *rest)
        return raster.reshape(seq.shape[0], h, w, *seq.shape[2:])


@dataclass
class Decoding:
    """One request to a prior for ``batch_size`` sequences of ``length`` image codes: what
    :meth:`Prior.decode` takes. The Pipeline builds it; the prior decodes.

    * ``cond``: ``int64 [b, Lc]`` condition tokens, offset into the prior's range and, where
      the prior takes a spatial map aligned, in its sequence order; ``None``: unconditional.
    * ``null``: ``int64 [b, Lc]`` the offset null tokens, for classifier-free guidance:
      with ``guidance != 1`` every step's logits are ``uncond + guidance · (cond − uncond)``,
      the two halves computed as one doubled batch, conditional rows first (``guided``).
    * ``sampler``: warps ``[N, V]`` logits rows and draws one token per row (``pick``);
      ``None`` draws from the plain softmax.
    * ``generator``: every random draw of the decoding comes from it (``None``: torch's
      global RNG).
    * ``known``: ``int64 [b, length]`` codes fixed in advance, in sequence order, ``-1``
      where unknown (a completion); they are returned unchanged.
    """

    batch_size: int
    length: int
    sampler: Sampler | None = None
    cond: torch.Tensor | None = None  # (b, Lc)
    null: torch.Tensor | None = None  # (b, Lc): guidance's unconditional input
    guidance: float = 1.0
    generator: torch.Generator | None = None
    known: torch.Tensor | None = None  # (b, length), -1 = unknown

    @property
    def guided(self) -> bool:
        """Whether each step mixes conditional and unconditional logits (``null`` given
        and ``guidance != 1``: scale 1 is plain conditional decoding, bit for bit)."""
        return self.null is not None and self.cond is not None and self.guidance != 1.0

    def doubled_cond(self) -> torch.Tensor | None:
        """The condition a step runs on: ``[2b, Lc]`` (conditional, then null rows) when
        guided, else ``cond``."""
        if not self.guided:
            return self.cond
        assert self.cond is not None and self.null is not None
        return torch.cat([self.cond, self.null])

    def guide(self, logits: torch.Tensor) -> torch.Tensor:
        """``[2b, ...]`` logits of the doubled batch → ``[b, ...]`` guided ones (float32)."""
        return guide(logits, self.guidance)

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        """One token per row of ``[N, V]`` logits → ``int64 [N]``, from ``generator``."""
        if self.sampler is not None:
            return self.sampler.sample(logits, generator=self.generator)
        return _multinomial(logits, self.generator)


def guide(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``[2b, ...]`` logits (conditional rows, then unconditional)
    → ``[b, ...]`` float32 ``uncond + scale · (cond − uncond)``."""
    cond, uncond = logits.float().chunk(2)  # (b, ...) each
    return uncond + scale * (cond - uncond)


class Prior(Component, nn.Module):
    """A distribution over sequences of image codes given a condition: trainable from
    ``(seq, cond)`` (:meth:`loss`) and able to generate (:meth:`decode`).

    ``seq`` is ``int64 [B, L]`` with values in ``[0, vocab_size)``, the grid flattened by
    the pipeline's ordering; ``cond`` is ``int64 [B, Lc]`` condition tokens already offset
    by the pipeline into the prior's condition range, or ``None`` for an unconditional
    model.

    Two families implement it; what only one has is a Protocol, checked with
    ``isinstance``: :class:`Autoregressive` (``p(s_i | s_<i, c)``: exact ``nll``,
    ``logits``, incremental ``start``/``step``; base class :class:`AutoregressivePrior`)
    and :class:`Masked` (cells predicted in parallel from a partly masked grid, decoded in
    ``steps`` rounds; base class :class:`MaskedPrior`).

    ``loss_name`` says what :meth:`loss` is: ``"nll"`` (an exact negative log-likelihood,
    nats per image token) for autoregressive priors, ``"masked_ce"`` (cross-entropy of
    randomly masked cells: not a likelihood, and never reported as one) for masked priors.

    ``aligned_condition = True`` declares that a spatial condition (``Lc = L``) is taken
    cell by cell in the prior's *sequence order* (``cond[:, i]`` belongs to the cell of
    ``seq[:, i]``), so the pipeline permutes it with the ordering; otherwise spatial
    condition tokens come in row-major order, as conditioners make them.
    """

    vocab_size: int
    aligned_condition: bool = False
    loss_name: ClassVar[str]

    @abstractmethod
    def loss(self, seq: torch.Tensor, cond: torch.Tensor | None = None, *,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """``[B]`` float training loss per sample, nats per image token (what
        :attr:`loss_name` names). ``generator`` feeds a stochastic loss's draws (the
        masked prior's masks; ``None``: torch's global RNG); an NLL draws nothing."""

    @abstractmethod
    def decode(self, request: Decoding) -> torch.Tensor:
        """Generate ``int64 [b, length]`` codes in sequence order for a :class:`Decoding`
        request (in eval mode, without gradients; the mode is restored). Known cells are
        kept; every draw comes from ``request.generator``."""

    def forward(self, seq: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Training loss: the batch mean of :meth:`loss`."""
        return self.loss(seq, cond).mean()


@runtime_checkable
class Autoregressive(Protocol):
    """An autoregressive prior, ``p(s_i | s_<i, c)``: what only this family has.

    ``logits(seq, cond) -> [B, L, V]`` predicts position ``i`` from ``seq[:, :i]``; ``nll``
    is the exact negative log-likelihood ``[B]`` (nats per image token); ``start``/``step``
    decode one token at a time with a state (a KV cache), so sampling costs O(L) steps;
    ``prefix_logits`` declares that ``logits(seq[:, :n], cond)`` equals ``logits(seq,
    cond)[:, :n]`` (the sliding window then feeds only the window's part before the
    predicted token). Pipeline.nll and the sliding window need it.
    """

    prefix_logits: bool

    def logits(self, seq: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor: ...

    def nll(self, seq: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor: ...

    def start(self, cond: torch.Tensor | None, batch_size: int) -> Any: ...

    def step(self, state: Any, token: torch.Tensor | None) -> tuple[torch.Tensor, Any]: ...


@runtime_checkable
class Masked(Protocol):
    """A masked (MaskGIT-style) prior: what only this family has.

    ``masked_logits(seq, cond) -> [B, L, V]`` predicts every cell at once from a grid in
    which ``-1`` marks masked cells (the rest are visible); ``steps`` is the number of
    parallel decoding rounds. There is no sequence order and no likelihood.
    """

    steps: int

    def masked_logits(self, seq: torch.Tensor,
                      cond: torch.Tensor | None = None) -> torch.Tensor: ...


class AutoregressivePrior(Prior):
    """Base of autoregressive priors (GPT, PixelSNAIL): ``p(s_i | s_<i, c)``.

    Subclasses implement ``logits``, ``start`` and ``step``; this class derives the exact
    ``nll``, the training :meth:`loss` (``loss_name = "nll"``), :meth:`generate` (the
    token-by-token loop) and :meth:`decode` (that loop with guidance and known cells).
    See :class:`Autoregressive` for ``prefix_logits``.
    """

    loss_name: ClassVar[str] = "nll"
    prefix_logits: ClassVar[bool] = False

    @abstractmethod
    def logits(self, seq: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, L, vocab_size]`` float: logits for position ``i`` given ``s_<i`` and ``c``."""

    def forward(self, seq: torch.Tensor, cond: torch.Tensor | None = None,
                targets: torch.Tensor | None = None) -> torch.Tensor:
        """Training loss: mean cross-entropy (nats) of the image tokens.

        ``targets [B, L]`` defaults to ``seq``; entries of ``-100`` are ignored.
        """
        logits = self.logits(seq, cond)  # (B, L, V)
        targets = seq if targets is None else targets  # (B, L)
        return nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100
        )

    def nll(self, seq: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """``[B]`` mean negative log-likelihood (nats per image token)."""
        logits = self.logits(seq, cond)  # (B, L, V)
        nll = nn.functional.cross_entropy(logits.transpose(1, 2), seq, reduction="none")  # (B, L)
        return nll.mean(dim=1)

    def loss(self, seq: torch.Tensor, cond: torch.Tensor | None = None, *,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """``[B]``: the exact :meth:`nll` (nats per image token); draws nothing."""
        return self.nll(seq, cond)

    @abstractmethod
    def start(self, cond: torch.Tensor | None, batch_size: int) -> Any:
        """A decoding state after the condition (or the start token), ready to step."""

    @abstractmethod
    def step(self, state: Any, token: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
        """Feed the last sampled token ``[B]`` (``None`` on the first call).

        Returns the next position's logits ``[B, vocab_size]`` and the new state.
        The logits equal those of ``logits()`` at that position.
        """

    @torch.no_grad()
    def generate(
        self,
        cond: torch.Tensor | None,
        length: int,
        batch_size: int | None = None,
        sample_fn: Callable[[torch.Tensor, torch.Generator | None], torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample ``[B, length]`` image codes with ``start``/``step`` (in eval mode, without
        gradients; the mode is restored). ``sample_fn(logits [B, V], generator) -> [B]`` picks each
        token (e.g. a ``vqgen.Sampler``'s ``sample``); the default draws from the softmax.
        """
        b = batch_size if batch_size is not None else (cond.shape[0] if cond is not None else 1)
        sample_fn = sample_fn or _multinomial
        was_training = self.training
        self.eval()
        try:
            state, token, out = self.start(cond, b), None, []
            for _ in range(length):
                logits, state = self.step(state, token)  # (B, V)
                token = sample_fn(logits, generator)  # (B,)
                out.append(token)
        finally:
            self.train(was_training)
        if not out:
            device = next(self.parameters()).device
            return torch.zeros(b, 0, dtype=torch.long, device=device)
        return torch.stack(out, dim=1)  # (B, length)

    @torch.no_grad()
    def decode(self, request: Decoding) -> torch.Tensor:
        """:meth:`generate` with the request's sampler, guidance and known cells: each step
        guides the doubled batch's logits, then takes the known token of every row that has
        one (drawing nothing where all rows do) and the sampler's draw elsewhere."""
        d, b = request, request.batch_size
        known = d.known  # (b, L) or None
        every: list[bool] = []
        some: list[bool] = []
        if known is not None:  # which positions are known in every row / in some (one sync)
            given = known >= 0  # (b, L)
            every, some = torch.stack([given.all(0), given.any(0)]).tolist()
        position = 0

        def pick(logits: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
            """The next token of each sample: a known one, or the sampler's draw from the
            (guided) logits; fed twice when guided (both halves of the batch)."""
            nonlocal position
            if d.guided:
                logits = d.guide(logits)  # (b, V)
            if known is not None and every[position]:
                token = known[:, position]  # (b,)
            else:
                token = d.pick(logits)  # (b,)
                if known is not None and some[position]:
                    token = torch.where(known[:, position] >= 0, known[:, position], token)
            position += 1
            return torch.cat([token, token]) if d.guided else token  # (b or 2b,)

        seq = self.generate(d.doubled_cond(), d.length, 2 * b if d.guided else b,
                            sample_fn=pick, generator=d.generator)  # (b or 2b, L)
        return seq[:b]


class MaskedPrior(Prior):
    """Base of masked priors (MaskGIT): cells predicted in parallel, decoded in ``steps``
    rounds; see :class:`Masked`. Its :meth:`loss` is the cross-entropy of randomly masked
    cells (``loss_name = "masked_ce"``), not a likelihood: such a prior has no ``nll``.
    """

    loss_name: ClassVar[str] = "masked_ce"
    steps: int

    @abstractmethod
    def masked_logits(self, seq: torch.Tensor, cond: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """``[B, L, vocab_size]`` float logits of every cell, given ``seq [B, L]`` with
        ``-1`` at the masked cells."""


def prior_family(prior: Any) -> str:
    """``"autoregressive"``, ``"masked"`` or ``"unknown"``: for messages."""
    if isinstance(prior, Autoregressive):
        return "autoregressive"
    return "masked" if isinstance(prior, Masked) else "unknown"


def _multinomial(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row from ``softmax(logits)``: ``[B, V]`` → ``[B]``."""
    probs = torch.softmax(logits.float(), dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@runtime_checkable
class ActivationEstimate(Protocol):
    """A component that can say, before any memory is spent, about how many bytes of
    activations one training micro-batch of ``batch_size`` keeps for the backward pass
    (fp32, a lower bound: what every such model must keep, not what a kernel adds).
    ``image_size`` ``(H, W)``: the training images' size, for a tokenizer (a prior knows
    its grid). ``config validate`` adds it to the weights and Adam state to refuse a
    config that cannot train on this machine."""

    def activation_bytes(self, batch_size: int,
                         image_size: tuple[int, int] | None = None) -> int: ...


def transformer_activation_bytes(batch_size: int, length: int, width: int, layers: int,
                                 vocab: int) -> int:
    """Bytes a pre-LN transformer keeps per micro-batch for its backward pass in fp32:
    per token and layer about 16 ``width``-sized tensors (the layer norms' inputs, Q, K,
    V, the attention output and its projection, the MLP's input, 4x hidden and GELU;
    after Korthikanti et al. 2022, without the attention scores that fused kernels do not
    keep), plus the logits and their softmax."""
    per_token = 4 * (16 * width * layers + 2 * vocab)
    return batch_size * length * per_token


@runtime_checkable
class InitFromCodeVectors(Protocol):
    """A prior that can start its image-token embeddings from the tokenizer's
    :meth:`Tokenizer.code_vectors`, so that codes that look alike start alike.

    ``wants_code_vectors`` says whether its params ask for it; the trainer then calls
    ``init_from_code_vectors(vectors [vocab_size, d])`` once, before training.
    """

    wants_code_vectors: bool

    def init_from_code_vectors(self, vectors: torch.Tensor) -> None: ...


@runtime_checkable
class Fitted(Protocol):
    """A tokenizer fitted without gradients (k-means): the stage-1 engine calls
    ``fit_step(x [B, C, H, W], generator) -> {stat: value}`` once per global batch."""

    def fit_step(self, x: torch.Tensor, generator: torch.Generator) -> dict[str, float]: ...


@runtime_checkable
class Adversarial(Protocol):
    """A tokenizer trained by gradient with a loss of its own (VQGAN + discriminator).

    ``forward(x)`` returns an object with ``recon``, ``qloss``, ``usage``,
    ``perplexity`` and ``restarted``; ``last_layer`` is the decoder's last weight;
    ``build_loss()`` returns a module with ``generator_loss(x, out, step, last_layer)
    -> (loss, logs)``, ``discriminator`` (a module or None), ``discriminator_loss(x,
    recon, step) -> (loss, logs)`` and ``disc_active(step)``. Generator and
    discriminator get an Adam optimizer each.
    """

    def build_loss(self) -> nn.Module: ...


@runtime_checkable
class CondStage(Protocol):
    """A conditioner with a tokenizer of its own (the paper's cond stage): a spatial
    map encoded by ``tokenizer`` (``None`` where it has none, e.g. segmentation by
    majority vote), trained as the "cond" stage on ``condition_input(batch)``."""

    tokenizer: Tokenizer | None

    def condition_input(self, batch: Mapping[str, Any]) -> torch.Tensor: ...


def cond_stage_tokenizer(conditioner: Any) -> Tokenizer | None:
    """The tokenizer a conditioner trains as the cond stage, or None."""
    return conditioner.tokenizer if isinstance(conditioner, CondStage) else None


class Sampler(Component):
    """Turns one step's logits into the next tokens.

    ``warp(logits)`` maps ``float [B, V]`` logits to processed logits of the same
    shape (temperature applied, excluded ids set to ``-inf``; at least one id per
    row stays finite). ``sample`` draws ``int64 [B]`` from the warped
    distribution, reproducibly from ``generator``.

    A sampler that judges finished samples (rejection sampling) also has
    ``draw_and_select(draw, labels, generator) -> (images, codes, acceptance)``,
    where ``draw(idx) -> (images, codes)`` samples candidates for the requested
    ``labels[idx]``; the Pipeline hands it that closure.
    """

    @abstractmethod
    def warp(self, logits: torch.Tensor) -> torch.Tensor:
        """``[B, V]`` logits → ``[B, V]`` processed logits."""

    def sample(
        self, logits: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Draw one token per row: ``[B, V]`` logits → ``[B]`` int64."""
        probs = torch.softmax(self.warp(logits).float(), dim=-1)  # (B, V)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
