"""Training: one loop (:mod:`vqgen.training.loop`), objectives that only compute
(:mod:`vqgen.training.objective`, :mod:`vqgen.training.objectives`), a runtime, a
checkpointer and loggers; :mod:`vqgen.training.stages` trains a stage of a config.

A floor above the components: it trains any tokenizer, conditioner and prior through
their interfaces, and is used by :mod:`vqgen.runs` (the run directory) and the CLI.
Everything public of :mod:`vqgen.training.engine` is importable from here.
"""

from vqgen.training import engine
from vqgen.training.engine import *  # noqa: F403 (the engine's __all__, re-exported)

__all__ = list(engine.__all__)
