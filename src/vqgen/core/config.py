"""Pipeline configs: pydantic models, loaded from and dumped to YAML, TOML or JSON.

A config names every component by registry name and gives its params::

    data:      {name: shapes, params: {resolution: 32}}
    tokenizer: {name: vqgan, params: {n_embed: 512}}
    ordering:  {name: row_major}
    prior:     {name: gpt, params: {n_layer: 8}}
    sampler:   {name: top_k, params: {k: 100}}
    train:     {tokenizer: {steps: 3000}, prior: {steps: 3000}}

Each component's params are validated against that component's own ``Params``
model and stored resolved (every field, defaults filled in), so a loaded config
says exactly what will be built and ``load → dump → load`` gives an equal object.
Errors are :class:`ConfigError`: they name the file, the dotted path
(``prior.params.n_head``) and the reason.

Why one file of this size: the config models and their one text format each way
(load, dump, schema) change together.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from vqgen.core.errors import VqgenError
from vqgen.core.interfaces import refuse_bools_for_numbers
from vqgen.core.io import atomic_write_text
from vqgen.core.registry import Registry, default_registry, format_validation_error
from vqgen.core.wiring import wire_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "SECTIONS",
    "ComponentSpec",
    "ConfigError",
    "PipelineConfig",
    "StageTrainConfig",
    "TrainConfig",
    "config_schema",
    "dump_config",
    "load_config",
    "parse_config",
    "resolve_path",
]

#: Config section → registry kind of the component it names.
SECTIONS: dict[str, str] = {
    "data": "dataset",
    "tokenizer": "tokenizer",
    "conditioner": "conditioner",
    "ordering": "ordering",
    "prior": "prior",
    "sampler": "sampler",
}
SUFFIXES = {".yaml": "yaml", ".yml": "yaml", ".toml": "toml", ".json": "json"}


class ConfigError(VqgenError):
    """A config that cannot be read or validated: file, dotted paths and reasons."""

    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        self.source = source
        self.problems = problems
        lines = [f"  {path or '(top level)'}: {reason}" for path, reason in problems]
        super().__init__(f"invalid config {source}:\n" + "\n".join(lines))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bools_for_numbers(cls, data: Any) -> Any:
        return refuse_bools_for_numbers(cls, data)


class ComponentSpec(_Strict):
    """A component by registry name, with its params."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class StageTrainConfig(_Strict):
    """Optimisation settings of one training stage."""

    steps: int = Field(1000, ge=0, le=10**9)
    batch_size: int = Field(32, ge=1, le=1 << 20)
    lr: float | None = Field(None, gt=0, le=10.0,
                             description="absolute learning rate; overrides base_lr")
    base_lr: float = Field(
        4.5e-6, gt=0, le=1.0,
        description="learning rate per sample: lr = base_lr × batch × accum × world"
    )
    grad_accum: int = Field(1, ge=1, le=4096, description="micro-batches per step")
    seed: int = Field(0, ge=0, lt=2**63)
    betas: tuple[Annotated[float, Field(ge=0.0, lt=1.0)],
                 Annotated[float, Field(ge=0.0, lt=1.0)]] | None = Field(
        None, description="Adam betas, each in [0, 1); unset: the stage's default "
        "(train.tokenizer / train.cond: 0.5, 0.9; train.prior: 0.9, 0.95)"
    )
    optimizer: Literal["adam", "adamw", "sgd"] | None = Field(
        None, description="adam, adamw (decoupled weight decay) or sgd (plain); unset: the "
        "stage's default (tokenizer / cond: adam; prior: adamw)"
    )
    log_every: int = Field(50, ge=1, description="steps between metrics.jsonl records")
    image_every: int = Field(
        500, ge=0, description="steps between preview image grids (and at the end); 0 = none"
    )
    checkpoint_every: int = Field(
        0, ge=0, description="steps between checkpoints; 0 = only at the end"
    )
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda|cuda:\d{1,3}|mps)$",
                        description="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1', "
                        "'mps'")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes")
    input_key: str | None = Field(
        None, description="batch key the tokenizer trains on; unset: the tokenizer's default"
    )
    warmup_steps: int = Field(0, ge=0, le=10**9, description="linear learning-rate warm-up steps")
    lr_schedule: Literal["constant", "cosine"] | None = Field(
        None, description="after warm-up: constant, or cosine decay to 10 % by the last "
        "step; unset: the stage's default (tokenizer: constant, as taming; prior: cosine)"
    )
    weight_decay: float = Field(0.01, ge=0.0, le=10.0, description="AdamW decay on weights (prior)")
    grad_clip: float = Field(1.0, gt=0.0, description="gradient-norm clipping (prior)")
    cond_dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="probability of training a sample unconditionally"
    )
    amp: Literal["bf16", "fp16", "none"] = Field(
        "bf16", description="CUDA autocast dtype, both stages (fp16 adds a grad scaler)"
    )
    compile: bool = Field(False, description="torch.compile the prior on CUDA")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="under torchrun: ddp (every rank holds the whole model) or fsdp "
        "(weights, gradients and optimizer state sharded over ranks, one unit per block; "
        "the prior stage only). Checkpoints are the same either way")
    activation_checkpointing: bool = Field(
        False, description="recompute each transformer block's activations in the backward "
        "pass instead of keeping them: less memory for long sequences, about a third more "
        "compute, the same gradients (the prior stage only)")

    @model_validator(mode="after")
    def _fsdp_precision(self) -> StageTrainConfig:
        if self.strategy == "fsdp" and self.amp == "fp16":
            raise ValueError("amp: fp16 needs a gradient scaler that vqgen does not run over "
                             "FSDP's sharded gradients; use amp: bf16 (no scaler) or none "
                             "with strategy: fsdp")
        return self
    keep_last: int = Field(
        2, ge=0, description="step-numbered checkpoints kept in <stage>/history (0: none)"
    )
    keep_best: bool = Field(
        True, description="keep <stage>/best: the checkpoint with the lowest held-out loss"
    )


#: Settings only the prior stage may change from their defaults, and why.
PRIOR_ONLY: dict[str, str] = {
    "strategy": "fsdp shards the prior stage only (a tokenizer's discriminator and codebook "
                "restarts train replicated); use ddp here, fsdp in train.prior",
    "activation_checkpointing": "activation checkpointing is for the prior's blocks; set it "
                                "in train.prior",
}

#: The stage defaults: what an unset (``None``) field of ``train.<stage>`` means. One
#: table, filled in when a config is loaded, so ``config validate --resolved`` and the
#: schema show it (taming's VQGAN: Adam 0.5 / 0.9 at a constant rate; minGPT: AdamW
#: 0.9 / 0.95 with cosine decay).
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "tokenizer": {"betas": (0.5, 0.9), "optimizer": "adam", "lr_schedule": "constant"},
    "cond": {"betas": (0.5, 0.9), "optimizer": "adam", "lr_schedule": "constant"},
    "prior": {"betas": (0.9, 0.95), "optimizer": "adamw", "lr_schedule": "cosine"},
}


def _stage_config(stage: str) -> type[StageTrainConfig]:
    """A :class:`StageTrainConfig` whose unset fields take ``STAGE_DEFAULTS[stage]``."""
    defaults = STAGE_DEFAULTS[stage]

    def fill(self: StageTrainConfig) -> StageTrainConfig:
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        return self

    validators: dict[str, Any] = {"_fill": model_validator(mode="after")(fill)}
    if stage != "prior":
        def prior_only(value: Any, info: ValidationInfo) -> Any:
            if value != StageTrainConfig.model_fields[str(info.field_name)].default:
                raise ValueError(PRIOR_ONLY[str(info.field_name)])
            return value

        validators["_prior_only"] = field_validator(*PRIOR_ONLY)(prior_only)
    fields: dict[str, Any] = {
        name: (StageTrainConfig.model_fields[name].annotation,
               Field(value, description=StageTrainConfig.model_fields[name].description))
        for name, value in defaults.items()
    }
    return create_model(  # type: ignore[call-overload,no-any-return]
        f"{stage.capitalize()}TrainConfig", __base__=StageTrainConfig,
        __doc__=f"Training settings of the {stage} stage (defaults: {defaults}).",
        __validators__=validators, **fields,
    )


TokenizerTrainConfig = _stage_config("tokenizer")
CondTrainConfig = _stage_config("cond")
PriorTrainConfig = _stage_config("prior")


class TrainConfig(_Strict):
    """Per-stage training settings, and where training reports."""

    tokenizer: TokenizerTrainConfig = Field(default_factory=TokenizerTrainConfig)  # type: ignore[valid-type]
    cond: CondTrainConfig = Field(  # type: ignore[valid-type]
        default_factory=CondTrainConfig,
        description="a spatial conditioner's own tokenizer (the cond stage)",
    )
    prior: PriorTrainConfig = Field(default_factory=PriorTrainConfig)  # type: ignore[valid-type]
    threads: int | None = Field(
        None, ge=1, le=1024,
        description="CPU threads per process (torch intra-op); unset: the cores this "
        "process may use (affinity, cgroup quota), at most 16. On a shared machine set it "
        "to your share (often 1 or 2); `vqgen train --threads N` overrides it",
    )
    loggers: list[Literal["jsonl", "tensorboard"]] = Field(
        default_factory=lambda: ["jsonl"],
        description="where training reports: jsonl (metrics.jsonl and images/, always on) "
        "and tensorboard (event files in <run>/tensorboard; the tensorboard extra)",
    )


class SamplingConfig(_Strict):
    """How the trained pipeline samples by default (``vqgen sample`` flags override it)."""

    guidance: float = Field(
        1.0, ge=0.0, le=100.0,
        description="classifier-free guidance scale s: logits uncond + s·(cond − uncond); "
        "1 = plain conditional sampling; s != 1 needs train.prior.cond_dropout > 0",
    )


class PipelineConfig(_Strict):
    """A whole two-stage model: one component per section, plus training settings.

    ``data`` and ``tokenizer`` are required (a stage-1-only config is valid);
    ``conditioner``, ``ordering``, ``prior`` and ``sampler`` are optional.
    Constructing one validates every component's params against the default
    registry (or ``context={"registry": r}``) and stores them resolved.
    """

    data: ComponentSpec
    tokenizer: ComponentSpec
    conditioner: ComponentSpec | None = None
    ordering: ComponentSpec | None = None
    prior: ComponentSpec | None = None
    sampler: ComponentSpec | None = None
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _check_components(self, info: ValidationInfo) -> PipelineConfig:
        ctx = info.context or {}
        if self.sampling.guidance != 1.0 and self.train.prior.cond_dropout == 0:
            raise ValueError(
                f"sampling.guidance: {self.sampling.guidance} needs a prior trained with "
                "condition dropout; set train.prior.cond_dropout (e.g. 0.1) or guidance: 1"
            )
        if ctx.get("structure_only"):
            return self
        problems = _resolve_components(self, ctx.get("registry"))
        if problems:
            raise ValueError("; ".join(f"{p}: {r}" for p, r in problems))
        return self

    def components(self) -> dict[str, ComponentSpec]:
        """The sections that are set, as ``{section: spec}``."""
        return {s: spec for s in SECTIONS if (spec := getattr(self, s)) is not None}

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON types), unset optional sections left out."""
        return self.model_dump(mode="json", exclude_none=True)


def _resolve_components(cfg: PipelineConfig, registry: Registry | None,
                        base: Path | None = None) -> list[tuple[str, str]]:
    """Validate each section's params in place (path params resolved against ``base``);
    return ``(path, reason)`` problems."""
    registry = registry or default_registry()
    problems: list[tuple[str, str]] = []
    for section, spec in cfg.components().items():
        kind = SECTIONS[section]
        try:
            model = registry.get(kind, spec.name).params_model
        except VqgenError as exc:
            problems.append((f"{section}.name", str(exc)))
            continue
        try:
            params = model.model_validate(spec.params)
        except ValidationError as err:
            problems += format_validation_error(err, f"{section}.params")
            continue
        except Exception as exc:  # a plugin's own validator that raised something else
            problems.append((f"{section}.params", f"{type(exc).__name__}: {exc}"))
            continue
        spec.params = params.model_dump(mode="json")
        problems += _resolve_paths(section, spec, model, base)
    if not problems:  # every size that follows from another stage (see core.wiring)
        problems = wire_config(cfg, registry)
    return problems


_VAR = re.compile(r"\$(\w+)|\$\{([^}]*)\}")


def resolve_path(value: str, base: Path | None = None) -> str:
    """A path param as a config means it: ``$VAR`` / ``${VAR}`` and ``~`` expanded, and a
    relative path taken from ``base`` (the config file's folder; None: the current
    directory), made absolute. A value in angle brackets is a placeholder, kept as it is.
    An unset variable is a ValueError naming it."""
    if value.startswith("<") and value.endswith(">") or value == "":
        return value
    unset = [a or b for a, b in _VAR.findall(value) if (a or b) not in os.environ]
    if unset:
        raise ValueError(f"{value!r} names the environment variable ${unset[0]}, which is not "
                         "set; set it, or write the path out")
    path = Path(os.path.expanduser(os.path.expandvars(value)))
    return os.path.abspath(path if path.is_absolute() else (base or Path.cwd()) / path)


def _resolve_paths(section: str, spec: ComponentSpec, model: type[BaseModel],
                   base: Path | None) -> list[tuple[str, str]]:
    """Resolve (:func:`resolve_path`) every param whose field is marked
    ``json_schema_extra={"path": True}``, in place; returns problems."""
    problems = []
    for name, field in model.model_fields.items():
        extra = field.json_schema_extra
        value = spec.params.get(name)
        if isinstance(extra, dict) and extra.get("path") and isinstance(value, str):
            try:
                spec.params[name] = resolve_path(value, base)
            except ValueError as exc:
                problems.append((f"{section}.params.{name}", str(exc)))
    return problems


def parse_config(
    data: Any, source: str = "<dict>", registry: Registry | None = None,
    base: str | os.PathLike[str] | None = None,
) -> PipelineConfig:
    """Validate already-parsed config data; errors are :class:`ConfigError`. Relative
    path params (a folder data set's ``root``) are taken from ``base`` (default: the
    current directory) and stored absolute."""
    if not isinstance(data, dict):
        raise ConfigError(
            source,
            [("", f"expected a mapping of sections ({', '.join(SECTIONS)}, train), "
                  f"got {type(data).__name__}")],
        )
    try:
        cfg = PipelineConfig.model_validate(data, context={"structure_only": True})
    except ValidationError as err:
        raise ConfigError(source, format_validation_error(err)) from None
    except RecursionError:
        raise ConfigError(source, [("", "structure is recursive or nested too deeply")]) from None
    problems = _resolve_components(cfg, registry, Path(base) if base is not None else None)
    if problems:
        raise ConfigError(source, problems)
    return cfg


def _format_of(path: Path) -> str:
    fmt = SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise ConfigError(
            str(path),
            [("", f"unsupported extension {path.suffix!r}; use .yaml, .yml, .toml or .json")],
        )
    return fmt


#: the most a config file may hold, and the most YAML aliases (``*name``) in it: a
#: config is a page of settings, and these bounds stop "billion laughs" files early
MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_ALIASES = 100


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses more than :data:`MAX_YAML_ALIASES` aliases."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.aliases_seen = getattr(self, "aliases_seen", 0) + 1
            if self.aliases_seen > MAX_YAML_ALIASES:
                raise yaml.YAMLError(f"more than {MAX_YAML_ALIASES} aliases (*name); a "
                                     "config needs a handful at most")
        return super().compose_node(parent, index)


def _read_config_text(path: Path) -> str:
    """The text of a config file: a regular file of at most ``MAX_CONFIG_BYTES``."""
    try:
        if not path.exists():
            raise ConfigError(str(path), [("", "file not found")])
        if not path.is_file():
            raise ConfigError(str(path), [("", "not a regular file (a directory, device or "
                                               "FIFO); give a YAML, TOML or JSON file")])
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(str(path), [("", f"larger than {MAX_CONFIG_BYTES >> 20} MiB; "
                                               "a config is a page of settings")])
        return raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), [("", f"cannot read file: {exc}")]) from None


def load_config(path: str | os.PathLike[str], registry: Registry | None = None) -> PipelineConfig:
    """Read a YAML, TOML or JSON pipeline config (by extension) and validate it; a
    relative path in it (``data.params.root``) is taken from the file's folder."""
    path = Path(path)
    fmt = _format_of(path)
    text = _read_config_text(path)
    try:
        if fmt == "yaml":
            data = yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 (a SafeLoader)
        elif fmt == "toml":
            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except RecursionError:
        raise ConfigError(str(path), [("", f"{fmt.upper()} nested too deeply")]) from None
    except Exception as exc:  # each parser has its own error types
        reason = " ".join(str(exc).split())
        raise ConfigError(str(path), [("", f"not valid {fmt.upper()}: {reason}")]) from None
    return parse_config(data, str(path), registry, base=path.parent)


# -- dumping ----------------------------------------------------------------
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_value(value: Any, path: str) -> str:
    if value is None:
        raise ConfigError(path, [("", "TOML cannot represent null; use YAML or JSON")])
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v, f"{path}[{i}]") for i, v in enumerate(value)) + "]"
    if isinstance(value, dict):
        items = []
        for k, v in value.items():
            key = k if _BARE_KEY.match(k) else json.dumps(k, ensure_ascii=False)
            items.append(f"{key} = {_toml_value(v, f'{path}.{k}')}")
        return "{" + ", ".join(items) + "}"
    raise ConfigError(path, [("", f"cannot write {type(value).__name__} to TOML")])


def _toml_params(cfg: PipelineConfig, registry: Registry | None) -> dict[str, Any]:
    """Config data for TOML, which has no null: a ``None`` param is left out where
    ``None`` is also its default (reloading fills it back in), else refused."""
    data = cfg.to_dict()
    for section, spec in cfg.components().items():
        nulls = [k for k, v in spec.params.items() if v is None]
        if not nulls:
            continue
        fields = (registry or default_registry()).get(SECTIONS[section], spec.name).params_model
        for key in nulls:
            field = fields.model_fields.get(key)
            if field is None or field.is_required() or field.get_default() is not None:
                raise ConfigError(
                    "<toml>",
                    [(f"{section}.params.{key}", "TOML cannot represent null; use YAML or JSON")],
                )
            del data[section]["params"][key]
    return data


def dumps_config(
    cfg: PipelineConfig,
    fmt: Literal["yaml", "toml", "json"] = "yaml",
    registry: Registry | None = None,
) -> str:
    """The config as text in ``fmt``."""
    if fmt == "yaml":
        return yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True)
    if fmt == "json":
        return json.dumps(cfg.to_dict(), indent=2, ensure_ascii=False) + "\n"
    lines = []
    for section, value in _toml_params(cfg, registry).items():
        try:
            lines.append(f"{section} = {_toml_value(value, section)}")
        except ConfigError as err:
            raise ConfigError("<toml>", [(err.source, err.problems[0][1])]) from None
    return "\n".join(lines) + "\n"


def dump_config(
    cfg: PipelineConfig, path: str | os.PathLike[str], registry: Registry | None = None
) -> Path:
    """Write the config to ``path`` (format by extension), atomically."""
    path = Path(path)
    text = dumps_config(cfg, _format_of(path), registry)  # type: ignore[arg-type]
    atomic_write_text(path, text)
    return path


# -- JSON Schema ------------------------------------------------------------
def config_schema(registry: Registry | None = None) -> dict[str, Any]:
    """JSON Schema of a pipeline config, with every registered component's params."""
    registry = registry or default_registry()
    fields: dict[str, Any] = {}
    for section, kind in SECTIONS.items():
        variants = []
        for entry in registry.entries(kind):
            variants.append(
                create_model(
                    f"{kind}:{entry.name}",
                    __config__=ConfigDict(extra="forbid", title=f"{kind} {entry.name!r}"),
                    name=(Literal[entry.name], ...),  # type: ignore[valid-type]
                    params=(entry.params_model, Field(default_factory=entry.params_model)),
                )
            )
        if not variants:
            union: Any = ComponentSpec
        elif len(variants) == 1:
            union = variants[0]
        else:
            from typing import Union

            union = Union[tuple(variants)]  # noqa: UP007
        required = section in ("data", "tokenizer")
        fields[section] = (union, ...) if required else (union | None, None)
    model = create_model(
        "PipelineConfig",
        __config__=ConfigDict(extra="forbid", title="vqgen pipeline config"),
        train=(TrainConfig, Field(default_factory=TrainConfig)),
        **fields,
    )
    return model.model_json_schema()
