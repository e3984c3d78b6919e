"""vqgen: two-stage VQ + autoregressive image generation, stage by stage swappable.

Compose components by registry name::

    import vqgen
    ordering = vqgen.create("ordering", "z_curve")
    vqgen.list_components("ordering", "spiral*")
"""

import vqgen._startup  # noqa: F401  (first: a quiet Ctrl-C during the imports below)
from vqgen.core.config import ComponentSpec, ConfigError, PipelineConfig, load_config
from vqgen.core.errors import VqgenError
from vqgen.core.hookspecs import hookimpl
from vqgen.core.interfaces import (
    AUTO,
    ActivationEstimate,
    Auto,
    Autoregressive,
    AutoregressivePrior,
    Component,
    Conditioner,
    Decoding,
    Masked,
    MaskedPrior,
    NoParams,
    Ordering,
    ParamsModel,
    Prior,
    Sampler,
    Sizes,
    Tokenizer,
    require_wired,
)
from vqgen.core.pipeline import Generation, Pipeline
from vqgen.core.registry import (
    KINDS,
    ComponentError,
    Registry,
    create,
    current_registry,
    default_registry,
    list_components,
    register,
)
from vqgen.core.version import __version__
from vqgen.runs import load_run, train

__all__ = [
    "AUTO",
    "KINDS",
    "ActivationEstimate",
    "Auto",
    "Autoregressive",
    "AutoregressivePrior",
    "Component",
    "ComponentError",
    "ComponentSpec",
    "Conditioner",
    "ConfigError",
    "Decoding",
    "Generation",
    "Masked",
    "MaskedPrior",
    "NoParams",
    "Ordering",
    "ParamsModel",
    "Pipeline",
    "PipelineConfig",
    "Prior",
    "Registry",
    "Sampler",
    "Sizes",
    "Tokenizer",
    "VqgenError",
    "__version__",
    "create",
    "current_registry",
    "default_registry",
    "hookimpl",
    "list_components",
    "load_config",
    "load_run",
    "register",
    "require_wired",
    "train",
]
