"""The stage objectives: what each stage computes (see :mod:`vqgen.training.objective`).

:mod:`~vqgen.training.objectives.stage1` (fitted and adversarial tokenizers) and
:mod:`~vqgen.training.objectives.prior` (the prior on cached tokens). None of them
imports the loop; :mod:`vqgen.training.stages` puts an objective, the runtime, the
checkpointer and the loggers together and runs :func:`vqgen.training.loop.fit`.
"""
