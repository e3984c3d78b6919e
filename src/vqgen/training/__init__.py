"""Training: the stage loops (:mod:`vqgen.training.engine`) and what they share.

A floor above the components: it trains any tokenizer, conditioner and prior through
their interfaces, and is used by :mod:`vqgen.runs` (the run directory) and the CLI.
Everything public of :mod:`vqgen.training.engine` is importable from here.
"""

from vqgen.training import engine
from vqgen.training.engine import *  # noqa: F403 (the engine's __all__, re-exported)

__all__ = list(engine.__all__)
