"""Rejection: draw candidates with an inner sampler, keep those a classifier likes best.

Classifier-based rejection sampling as in Taming Transformers (Tab. 4) and
VQ-VAE-2: to return ``n`` samples of class ``c``, draw
``ceil(n / acceptance_rate)`` candidates conditioned on ``c``, score each with
a classifier's log-probability of ``c``, and keep the ``n`` best. The achieved
acceptance is ``kept / drawn`` (exactly ``acceptance_rate`` when ``n`` of every
class is a multiple of ``1 / acceptance_rate``).

.. code-block:: yaml

    sampler:
      name: rejection
      params:
        inner: {name: top_k, params: {k: 100}}   # draws the tokens of each candidate
        acceptance_rate: 0.25
        classifier: runs/classifier.safetensors  # written by save_classifier
        batch_size: 16                           # candidates drawn per call

Token by token the sampler *is* its inner sampler (``warp`` and ``sample``
delegate to it; ``rejection`` itself cannot be the inner sampler, a ``chain``
can). Judging finished samples needs the whole pipeline; it calls
:meth:`Rejection.draw_and_select` (or :func:`rejection_sample`) with a ``draw``
closure that samples and decodes the candidates it is asked for.

The classifier file is read on first use, not when the sampler is built, so a
config may name a classifier that is trained after the prior. Any torch module
mapping images ``[B, 3, H, W]`` in ``[-1, 1]`` to class logits ``[B, K]`` can be
used instead: :meth:`Rejection.set_classifier`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NamedTuple

import torch
from pydantic import ConfigDict, Field, field_validator
from torch import nn

from vqgen.core.errors import VqgenError
from vqgen.core.interfaces import ParamsModel, Sampler
from vqgen.core.progress import progress_bar
from vqgen.core.registry import ComponentError, current_registry

__all__ = [
    "DEFAULT_INNER",
    "InnerSampler",
    "Rejection",
    "RejectionResult",
    "candidates_per_label",
    "rejection_sample",
    "select",
]

#: How to get a classifier, quoted by every "no classifier" error.
HOW_TO_TRAIN = (
    "train one and name its file in the sampler's params (classifier: <file>): from the shell, "
    "`python -m vqgen.training.judges --data shapes --data-params '{\"resolution\": 32}' "
    "--out classifier.safetensors`; or in Python, `from vqgen.training.judges import "
    "train_classifier; from vqgen.plugins.judges import save_classifier; "
    "save_classifier(train_classifier(dataset), 'classifier.safetensors')`; or pass any "
    "torch module that maps images to class logits "
    "with sampler.set_classifier(module)"
)


class InnerSampler(ParamsModel):
    """The sampler that draws each candidate's tokens: a registered name and its params."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), frozen=True)

    name: str = Field(min_length=1)
    params: dict[str, Any] = {}

    @field_validator("name")
    @classmethod
    def _not_rejection(cls, name: str) -> str:
        if name == "rejection":
            raise ValueError(
                "'rejection' cannot be the inner sampler of a rejection sampler: it judges "
                "finished samples, not one step's logits; name the token sampler, e.g. top_k"
            )
        return name


#: The default inner sampler: top-k with its own defaults.
DEFAULT_INNER = InnerSampler(name="top_k", params={})

#: ``draw(idx)`` → images ``[B, C, H, W]``, or ``(images, codes [B, ...])``.
Draw = Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, torch.Tensor]]


class RejectionResult(NamedTuple):
    """What :func:`rejection_sample` returns; row ``i`` answers request ``i``."""

    images: torch.Tensor  # (n, C, H, W) the kept candidates
    codes: torch.Tensor | None  # (n, ...) their codes, where draw returned codes
    scores: torch.Tensor  # (n,) float32 classifier log-probability of the requested label
    source: torch.Tensor  # (n,) int64 the request position each was drawn for (same label)
    candidate: torch.Tensor  # (n,) int64 its index among all candidates, in drawing order
    n_drawn: int  # candidates drawn in all
    acceptance: float  # n / n_drawn


class Rejection(Sampler):
    """Classifier-based rejection sampling: keep the best-scoring fraction of candidates."""

    #: it judges candidates by their requested class, so a config needs a class condition
    needs_class_condition: ClassVar[bool] = True

    class Params(ParamsModel):
        inner: InnerSampler = Field(
            DEFAULT_INNER,
            description="the sampler that draws each candidate's tokens, {name, params}",
        )
        acceptance_rate: float = Field(
            0.25, gt=0, le=1, description="fraction of candidates kept, in (0, 1]"
        )
        classifier: str = Field(
            "",
            description="classifier file written by vqgen.plugins.judges.save_classifier "
            '("": none yet; set one before sampling, or call set_classifier)',
        )
        batch_size: int = Field(16, ge=1, description="candidates drawn per call")

    def __init__(
        self,
        inner: InnerSampler | Mapping[str, Any] = DEFAULT_INNER,
        acceptance_rate: float = 0.25,
        classifier: str = "",
        batch_size: int = 16,
    ) -> None:
        super().__init__(
            inner=inner,
            acceptance_rate=acceptance_rate,
            classifier=classifier,
            batch_size=batch_size,
        )
        spec = self.params.inner
        where = f"invalid params for sampler 'rejection': params.inner ({spec.name!r})"
        try:
            built = current_registry().create("sampler", spec.name, spec.params)
        except ComponentError as err:
            raise ComponentError(f"{where}: {err}") from None
        if isinstance(built, Rejection):  # registered under another name
            raise ComponentError(f"{where}: a rejection sampler cannot be its own inner sampler")
        #: The built inner sampler: it draws every token.
        self.inner: Sampler = built
        self._classifier: nn.Module | None = None
        self._loaded = False  # _classifier came from params.classifier (we may move it)

    # -- token by token: the inner sampler ------------------------------------
    def warp(self, logits: torch.Tensor) -> torch.Tensor:
        return self.inner.warp(logits)  # (B, V)

    def sample(
        self, logits: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return self.inner.sample(logits, generator=generator)  # (B,)

    # -- judging finished samples --------------------------------------------
    def set_classifier(self, module: nn.Module) -> Rejection:
        """Judge with ``module`` (images ``[B, 3, H, W]`` → logits ``[B, K]``); returns self.

        It replaces ``params.classifier``, is put in eval mode and runs where its
        parameters are (images are moved there).
        """
        if not isinstance(module, nn.Module):
            raise TypeError(f"set_classifier takes a torch nn.Module, not {type(module).__name__}")
        self._classifier, self._loaded = module.eval(), False
        return self

    @property
    def classifier(self) -> nn.Module:
        """The classifier module, read from ``params.classifier`` on first use."""
        if self._classifier is None:
            path = self.params.classifier
            if not path:
                raise VqgenError(f"the rejection sampler has no classifier yet: {HOW_TO_TRAIN}")
            from vqgen.plugins.judges import load_classifier  # a plugin: imported late

            try:
                model = load_classifier(path)
            except VqgenError as err:
                raise VqgenError(
                    f"sampler 'rejection', params.classifier: {err}; {HOW_TO_TRAIN}"
                ) from None
            self._classifier, self._loaded = model, True
        return self._classifier

    @torch.no_grad()
    def score(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``float32 [B]``: log p(label | image) under the classifier (higher is better).

        ``images [B, 3, H, W]`` in ``[-1, 1]``, ``labels [B]`` int64. The result is on
        ``images``' device.
        """
        model = self.classifier
        if images.ndim != 4 or labels.shape != images.shape[:1]:
            raise ValueError(
                f"score takes images [B, C, H, W] and labels [B]; got {tuple(images.shape)} "
                f"and {tuple(labels.shape)}"
            )
        if self._loaded:
            model.to(images.device)
            res = getattr(model, "resolution", None)
            if res and tuple(images.shape[-2:]) != (res, res):
                warnings.warn(
                    f"the classifier {self.params.classifier} was trained on {res}x{res} "
                    f"images but judges {images.shape[-2]}x{images.shape[-1]} samples; "
                    "its scores may mean little (train it at the sampling resolution)",
                    stacklevel=2,
                )
        param = next(model.parameters(), None)
        device = param.device if param is not None else images.device
        logits = model(images.to(device))  # (B, K)
        if logits.ndim != 2 or logits.shape[0] != images.shape[0]:
            raise VqgenError(
                f"the classifier must map images [B, C, H, W] to logits [B, n_classes]; "
                f"it returned {tuple(logits.shape)} for {tuple(images.shape)}"
            )
        k = logits.shape[1]
        labels = labels.to(device=logits.device, dtype=torch.int64)
        if len(labels) and (labels.min() < 0 or labels.max() >= k):
            bad = labels[(labels < 0) | (labels >= k)][0].item()
            raise VqgenError(f"label {bad} is out of range for a classifier of {k} classes")
        logp = torch.log_softmax(logits.float(), dim=-1)  # (B, K)
        return logp.gather(1, labels[:, None]).squeeze(1).to(images.device)  # (B,)

    def draw_and_select(
        self, draw: Draw, labels: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        """:func:`rejection_sample` for the Pipeline: ``(images, codes, acceptance)``.

        ``generator`` is accepted for the Pipeline's convenience and not used:
        the randomness is ``draw``'s own (the closure holds the generator).
        """
        res = rejection_sample(draw, labels, self)
        return res.images, res.codes, res.acceptance


# -----------------------------------------------------------------------------
# the rejection loop, free of any pipeline


def candidates_per_label(n: int, acceptance_rate: float) -> int:
    """``ceil(n / acceptance_rate)``, immune to float noise (3 / 0.1 gives 30, not 31)."""
    return math.ceil(n / acceptance_rate - 1e-9)


def select(
    scores: torch.Tensor, labels: torch.Tensor, n_per_label: Mapping[int, int] | int
) -> torch.Tensor:
    """Indices ``int64 [K]`` of the best-scoring candidates of each requested label.

    ``scores [M]`` float (NaN counts as worst), ``labels [M]`` int. ``n_per_label``
    maps a label to how many to keep (labels not in it are dropped), or is one
    count for every label present. At most that many are kept per label (fewer
    when fewer candidates have it). Order: by label ascending, then score
    descending, ties by index ascending.
    """
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError(f"scores {tuple(scores.shape)} and labels {tuple(labels.shape)} differ")
    counts = n_per_label.values() if isinstance(n_per_label, Mapping) else [n_per_label]
    if any(int(c) < 0 for c in counts):
        raise ValueError(f"counts to keep must be >= 0, got {n_per_label}")
    if scores.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=scores.device)
    s = torch.nan_to_num(scores.float(), nan=-math.inf)  # (M,)
    order = torch.sort(s, descending=True, stable=True).indices  # (M,) best first
    order = order[torch.sort(labels[order], stable=True).indices]  # (M,) by label, best first
    lab = labels[order]  # (M,)
    uniq, runs = torch.unique_consecutive(lab, return_counts=True)  # (U,), (U,)
    if isinstance(n_per_label, Mapping):
        quota = torch.tensor([int(n_per_label.get(int(u), 0)) for u in uniq.tolist()])
    else:
        quota = torch.full((len(uniq),), int(n_per_label))
    quota = quota.to(lab.device)
    starts = torch.cumsum(runs, 0) - runs  # (U,)
    rank = torch.arange(len(lab), device=lab.device) - starts.repeat_interleave(runs)  # (M,)
    return order[rank < quota.repeat_interleave(runs)]  # (K,)


def _candidates(labels: torch.Tensor, rate: float) -> tuple[dict[int, int], torch.Tensor]:
    """``{label: times requested}`` and the request position ``[M]`` of every candidate to
    draw, label by label: ``ceil(n_c / rate)`` per label, cycling over its positions."""
    uniq, n_req = torch.unique(labels, return_counts=True)  # (U,), (U,)
    want = dict(zip(uniq.tolist(), n_req.tolist(), strict=True))
    src = []
    for c, n_c in want.items():
        pos = torch.nonzero(labels == c).squeeze(1)  # (n_c,)
        src.append(pos[torch.arange(candidates_per_label(n_c, rate)) % n_c])
    return want, torch.cat(src).to(labels.device)  # (M,)


def _checked_draw(out: Any, b: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``draw``'s result as ``(images [b, C, H, W], codes [b, ...] or None)``, checked."""
    images, codes = out if isinstance(out, tuple) else (out, None)
    if images.ndim != 4 or images.shape[0] != b:
        raise ValueError(
            f"draw returned images of shape {tuple(images.shape)} for {b} "
            "candidates; expected [B, C, H, W] with B = len(idx)"
        )
    if codes is not None and codes.shape[0] != b:
        raise ValueError(f"draw returned {codes.shape[0]} codes for {b} candidates")
    return images, codes


def rejection_sample(
    draw: Draw, labels: torch.Tensor, sampler: Rejection, *, progress: bool = False
) -> RejectionResult:
    """Answer ``labels [n]`` (int64 requested classes) with the best of many candidates.

    For each label ``c`` requested ``n_c`` times, ``ceil(n_c / acceptance_rate)``
    candidates are drawn, each for one of the request positions of ``c`` in
    turn, in calls ``draw(idx)`` of at most ``sampler.params.batch_size``
    positions ``idx`` (int64, indices into ``labels``, so ``labels[idx]`` are the
    candidates' classes). ``draw`` returns images ``[B, C, H, W]`` in ``[-1, 1]``,
    or ``(images, codes)``. Each batch is scored with ``sampler.score`` at once and
    only the best so far are kept, so memory holds ``n`` plus one batch. The
    ``n_c`` kept candidates of ``c``, best first, fill ``c``'s positions in order.
    A kept candidate may have been drawn for another position of the same label
    (``source``): other per-sample conditions should not differ within a label.
    """
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)  # (n,)
    n, bs = len(labels), sampler.params.batch_size
    if n == 0:
        raise ValueError("rejection_sample needs at least one requested label")
    want, source = _candidates(labels, sampler.params.acceptance_rate)  # {c: n_c}, (M,)
    m = len(source)

    kept: dict[str, torch.Tensor] = {}
    with_codes: bool | None = None
    bar = progress_bar(m, desc="rejection", unit="sample", enabled=progress)
    for start in range(0, m, bs):
        idx = source[start : start + bs]  # (b,)
        out = draw(idx)
        images, codes = _checked_draw(out, len(idx))
        with_codes = codes is not None if with_codes is None else with_codes
        if with_codes != (codes is not None):
            raise ValueError("draw must return codes for every batch or for none")
        dev = images.device
        batch = {
            "images": images,
            "scores": sampler.score(images, labels[idx].to(dev)).float(),  # (b,)
            "label": labels[idx].to(dev),
            "source": idx.to(dev),
            "candidate": torch.arange(start, start + len(idx), device=dev),
        }
        if codes is not None:
            batch["codes"] = codes.to(dev)
        kept = {k: torch.cat([kept[k], v]) if kept else v for k, v in batch.items()}
        keep = select(kept["scores"], kept["label"], want)  # best so far, per label
        kept = {k: v[keep] for k, v in kept.items()}
        bar.update(len(idx))
    bar.close()

    # kept is ordered by label, best first, exactly like the positions below
    order = torch.cat([torch.nonzero(labels == c).squeeze(1) for c in want]).to(dev)  # (n,)
    place = torch.empty_like(order)
    place[order] = torch.arange(n, device=dev)  # place[i]: row of kept answering request i
    return RejectionResult(
        images=kept["images"][place],
        codes=kept["codes"][place] if with_codes else None,
        scores=kept["scores"][place],
        source=kept["source"][place],
        candidate=kept["candidate"][place],
        n_drawn=m,
        acceptance=n / m,
    )
