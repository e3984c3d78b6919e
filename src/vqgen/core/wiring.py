"""Assembly: every size that follows from another stage, resolved from that stage.

A config leaves such sizes ``"auto"`` (the default): the prior's vocabulary is the
tokenizer's, its condition vocabulary and length the conditioner's, its positions or
grid the data's resolution over the tokenizer's f; a spatial conditioner's own
tokenizer gets the image tokenizer's f and the channels the conditioner feeds it.
:func:`wire_config` builds the tokenizer and the conditioner (on the ``meta`` device:
no memory, no weights) to learn those sizes, lets each component fill in its own
(:meth:`Component.wire`), and checks explicit values against what the stages need.
A loaded config therefore holds numbers only, and a run's ``config.yaml`` records them.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import torch
from pydantic import ValidationError

from vqgen.core.devices import resolve_device
from vqgen.core.interfaces import AUTO, ActivationEstimate, Sizes
from vqgen.core.registry import Registry, format_validation_error

#: ``vqgen.core.config``'s models (config imports this module, not the other way round)
ComponentSpec = Any
PipelineConfig = Any

__all__ = ["stage_sizes", "wire_config"]

Problems = list[tuple[str, str]]


class _Stop(Exception):
    """A problem that makes the remaining stages unresolvable."""

    def __init__(self, problems: Problems) -> None:
        super().__init__(problems)
        self.problems = problems


def _build(registry: Registry, kind: str, spec: ComponentSpec, section: str) -> Any:
    """The component of ``spec``, built on the meta device where it allows (else on CPU)."""
    try:
        try:
            with torch.device("meta"):
                return registry.create(kind, spec.name, spec.params)
        except (RuntimeError, NotImplementedError, TypeError):  # needs real tensors
            with torch.random.fork_rng(devices=[]):  # its initial weights draw nothing
                return registry.create(kind, spec.name, spec.params)
    except Exception as exc:  # noqa: BLE001 (a plugin's constructor may raise anything)
        raise _Stop([(f"{section}.params", f"cannot build it: {exc}")]) from None


def _rewire(registry: Registry, kind: str, spec: ComponentSpec, section: str,
            sizes: Sizes) -> None:
    """``spec.params`` with its ``"auto"`` sizes resolved by its class, validated."""
    entry = registry.get(kind, spec.name)
    try:
        with registry.building():  # a nested spec is looked up in the same registry
            params = entry.cls.wire(dict(spec.params), sizes)
        spec.params = entry.params_model.model_validate(params).model_dump(mode="json")
    except ValidationError as err:
        raise _Stop(format_validation_error(err, f"{section}.params")) from None
    except ValueError as exc:
        field, sep, reason = str(exc).partition(": ")
        if sep and field.isidentifier():
            raise _Stop([(f"{section}.params.{field}", reason)]) from None
        raise _Stop([(f"{section}.params", str(exc))]) from None


def stage_sizes(cfg: PipelineConfig, registry: Registry) -> Sizes:
    """What the tokenizer, data and conditioner of ``cfg`` fix for the prior (resolving
    the conditioner's own ``"auto"`` sizes in ``cfg`` on the way)."""
    tok = _build(registry, "tokenizer", cfg.tokenizer, "tokenizer")
    res = cfg.data.params.get("resolution")
    grid = None
    if isinstance(res, int) and not isinstance(res, bool):
        try:
            grid = tok.latent_shape(res, res)
        except ValueError as exc:
            raise _Stop([("data.params.resolution", f"{res} does not suit tokenizer "
                          f"{cfg.tokenizer.name!r}: {exc}")]) from None
    names = _data_classes(cfg, registry)
    sizes = Sizes(vocab_size=int(tok.vocab_size), downsample=int(tok.downsample),
                  height=grid[0] if grid else None, width=grid[1] if grid else None,
                  n_classes=len(names) if names else None, data=f"data {cfg.data.name!r}")
    if cfg.conditioner is None:
        return sizes
    _rewire(registry, "conditioner", cfg.conditioner, "conditioner", sizes)
    cond = _build(registry, "conditioner", cfg.conditioner, "conditioner")
    cfg.conditioner.params = cond.params.model_dump(mode="json")  # what building filled in
    length = 0
    if grid is not None or not cond.spatial:
        try:
            length = math.prod(cond.condition_shape(res, res) if grid else (1,))
        except (ValueError, TypeError) as exc:
            raise _Stop([("conditioner.params", f"cannot tokenize {res}x{res} conditions: "
                          f"{exc}")]) from None
    return dataclasses.replace(sizes, cond_vocab_size=int(cond.vocab_size), cond_length=length,
                               cond_spatial=bool(cond.spatial))


def _data_classes(cfg: PipelineConfig, registry: Registry) -> list[str] | None:
    """The class names of ``cfg``'s data set (its ``class_names(params)``, a listing that
    reads no image), recorded in ``data.params.classes`` where that is ``"auto"``; None for
    a data set without classes. Not knowing them (a folder absent on this machine) is a
    problem only where a size needs them: a conditioner's ``n_classes: auto``."""
    class_names = getattr(registry.get("dataset", cfg.data.name).cls, "class_names", None)
    if class_names is None:
        return None
    try:
        names = class_names(cfg.data.params)
    except Exception as exc:  # noqa: BLE001 (a plugin's listing may raise anything)
        needed = cfg.conditioner is not None and cfg.conditioner.params.get("n_classes") == AUTO
        if needed:
            raise _Stop([("data.params", f"cannot list its classes for conditioner.params."
                          f"n_classes 'auto': {exc}")]) from None
        return None
    if names is not None and cfg.data.params.get("classes") == AUTO:
        cfg.data.params["classes"] = list(names)  # the run records ids ↔ names
    return None if names is None else list(names)


def wire_config(cfg: PipelineConfig, registry: Registry) -> Problems:
    """Resolve every ``"auto"`` size of ``cfg`` in place and check the explicit ones;
    returns ``(dotted path, reason)`` problems (none: ``cfg`` is ready to build)."""
    try:
        sizes = stage_sizes(cfg, registry)
    except _Stop as stop:
        return stop.problems
    problems = _sampler_needs(cfg, registry)
    if cfg.prior is None:
        return problems
    problems += _explicit_vocabularies(cfg, sizes)
    try:
        _rewire(registry, "prior", cfg.prior, "prior", sizes)
    except _Stop as stop:
        problems += stop.problems
    if not problems:
        problems += _sizes_that_fit(cfg, registry)
    return problems


#: the most parameters one component may have: a few times the largest published
#: image priors (LlamaGen 3.1 B); beyond it a config holds a typo, not a model
MAX_PARAMETERS = 20_000_000_000
#: bytes per parameter to train with Adam in fp32: weights, gradients, two moments
TRAIN_BYTES_PER_PARAMETER = 16


def _machine_memory() -> int | None:
    """This machine's physical memory in bytes, where the OS says."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _sizes_that_fit(cfg: PipelineConfig, registry: Registry) -> Problems:
    """Components whose parameter count (counted on the meta device, no memory) is
    absurd, or, for a stage set to train on the CPU, too large for this machine."""
    problems: Problems = []
    memory = _machine_memory()
    for section, kind, stage in (("tokenizer", "tokenizer", "tokenizer"),
                                 ("prior", "prior", "prior")):
        spec = getattr(cfg, section)
        if spec is None:
            continue
        try:
            module = _build(registry, kind, spec, section)
        except _Stop as stop:
            problems += stop.problems
            continue
        n = sum(p.numel() for p in module.parameters()) if hasattr(module, "parameters") \
            else 0
        train = getattr(cfg.train, stage)
        acts = _activation_bytes(module, train.batch_size, cfg)
        need = n * TRAIN_BYTES_PER_PARAMETER + acts
        if n > MAX_PARAMETERS:
            problems.append((f"{section}.params", f"these sizes make about {n:.3g} parameters "
                             f"(more than {MAX_PARAMETERS:.0e}); check them for a typo"))
        elif memory and _on_cpu(train.device) and need > memory:
            where = (f"train.{stage}.batch_size" if acts > n * TRAIN_BYTES_PER_PARAMETER
                     else f"{section}.params")
            problems.append((where, (
                f"these sizes make about {n:.3g} parameters "
                f"({_gib(n * TRAIN_BYTES_PER_PARAMETER)} GiB to train "
                f"with Adam) and a batch of {train.batch_size} keeps at least {_gib(acts)} GiB "
                f"of activations: {_gib(need)} GiB on the CPU, more than this machine's "
                f"{_gib(memory)} GiB; use a smaller batch (grad_accum keeps the batch it "
                "sums to) or model")))
    return problems


def _on_cpu(device: str) -> bool:
    """Whether a stage set to ``device`` trains on this machine's CPU."""
    return device == "cpu" or (device == "auto" and resolve_device("auto").type == "cpu")


def _gib(n: float) -> str:
    """Bytes in GiB: two significant figures, whole numbers from 100 on."""
    gib = n / 2**30
    return f"{gib:.2g}" if gib < 100 else f"{gib:,.0f}"


def _activation_bytes(module: Any, batch_size: int, cfg: PipelineConfig) -> int:
    """A component's lower-bound activation estimate (:class:`ActivationEstimate`) for one
    micro-batch of the data's images; 0 for one that makes none."""
    if not isinstance(module, ActivationEstimate):
        return 0
    size = cfg.data.params.get("resolution") if cfg.data is not None else None
    image = (int(size), int(size)) if isinstance(size, int) and size > 0 else None
    return int(module.activation_bytes(batch_size, image))


def _sampler_needs(cfg: PipelineConfig, registry: Registry) -> Problems:
    """A sampler that judges by class (``needs_class_condition``) needs a conditioner
    whose condition is a class label."""
    if cfg.sampler is None or not getattr(
            registry.get("sampler", cfg.sampler.name).cls, "needs_class_condition", False):
        return []
    key = (getattr(registry.get("conditioner", cfg.conditioner.name).cls, "condition_key", None)
           if cfg.conditioner is not None else None)
    if key == "label":
        return []
    have = f"conditioner {cfg.conditioner.name!r}" if cfg.conditioner else "no conditioner"
    return [("sampler.name", f"{cfg.sampler.name!r} judges samples by their class, so it needs "
             f"the class conditioner (conditioner: {{name: class}}); this config has {have}")]


def _explicit_vocabularies(cfg: PipelineConfig, sizes: Sizes) -> Problems:
    """Explicit prior vocabularies that differ from the stages' (0 condition ids is
    taming's layout, where conditions share the image-code table)."""
    assert cfg.prior is not None
    given = cfg.prior.params
    problems: Problems = []
    vocab = given.get("vocab_size")
    if vocab not in (AUTO, None) and vocab != sizes.vocab_size:
        problems.append(("prior.params.vocab_size", f"{vocab}, but tokenizer "
                         f"{cfg.tokenizer.name!r} has {sizes.vocab_size} codes; leave it out "
                         "(auto)"))
    cond_vocab = given.get("cond_vocab_size")
    if (cfg.conditioner is not None and cond_vocab not in (AUTO, None, 0)
            and cond_vocab != sizes.cond_vocab_size):
        problems.append(("prior.params.cond_vocab_size", f"{cond_vocab}, but conditioner "
                         f"{cfg.conditioner.name!r} has {sizes.cond_vocab_size} tokens; leave "
                         "it out (auto)"))
    return problems
