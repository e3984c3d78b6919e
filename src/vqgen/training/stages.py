"""Training a stage: an objective, the runtime, the checkpointer and the loggers, put
together and run by :func:`vqgen.training.loop.fit`.

* :func:`train_tokenizer` — stage 1 (the tokenizer, or a spatial conditioner's own
  tokenizer: the "cond" stage), fitted or adversarial
  (:mod:`vqgen.training.objectives.stage1`);
* :func:`train_prior` — stage 2 on the token cache (:mod:`vqgen.training.objectives.prior`).

A run directory gets ``metrics.jsonl``, ``images/<stage>_<step>.png`` (and
``tensorboard/`` with that logger), a checkpointed folder per stage and ``tokens/``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from vqgen.core.checkpoint import CheckpointError
from vqgen.core.config import PipelineConfig, StageTrainConfig
from vqgen.core.errors import VqgenError
from vqgen.core.interfaces import InitFromCodeVectors
from vqgen.core.layout import TOKENS_DIR
from vqgen.core.pipeline import Pipeline, assemble
from vqgen.core.registry import Registry, default_registry
from vqgen.training.checkpointer import Checkpointer
from vqgen.training.loggers import make_loggers
from vqgen.training.loop import fit
from vqgen.training.objective import Objective
from vqgen.training.objectives.prior import PriorObjective, token_caches
from vqgen.training.objectives.stage1 import AdversarialObjective, stage1_objective
from vqgen.training.runtime import Runtime, seed_everything

__all__ = ["train_prior", "train_tokenizer"]


def _run(obj: Objective, rt: Runtime, ckpt: Checkpointer, run: Path | None,
         config: PipelineConfig, progress: bool, resume: bool) -> None:
    """Restore ``ckpt`` where resuming and it has a checkpoint, start the objective, then
    fit it with the run's loggers (rank 0 alone writes)."""
    start = 0
    if resume and (state := ckpt.load(rt.device)) is not None:
        start = int(state["step"])
        try:
            obj.load_state_dict(state)
        except CheckpointError as exc:
            raise ckpt.damaged(str(exc)) from None
    obj.start(start)
    if not rt.main:
        ckpt.root = None
    loggers = make_loggers(run if rt.main else None, config.train.loggers)
    for lg in loggers:
        lg.hparams(config.model_dump(mode="json"))
    try:
        fit(obj, rt, start, checkpointer=ckpt, loggers=loggers, progress=progress and rt.main)
    finally:
        for lg in loggers:
            lg.close()


def train_tokenizer(
    config: PipelineConfig,
    run_dir: str | os.PathLike[str] | None = None,
    *,
    registry: Registry | None = None,
    progress: bool = True,
    resume: bool = False,
    stage: str = "tokenizer",
    conditioner: Any = None,
) -> Any:
    """Train a first stage of ``config``; return the tokenizer in eval mode.

    ``stage="tokenizer"``: the config's tokenizer on its data, settings from
    ``config.train.tokenizer``. ``stage="cond"``: ``conditioner``'s own tokenizer
    on ``conditioner.condition_input`` of the data, settings from
    ``config.train.cond``. With ``run_dir`` it writes metrics, preview grids and
    checkpoints to ``run_dir/<stage>``; ``resume`` continues from that checkpoint.
    SIGINT / SIGTERM write a checkpoint and raise ``TrainingInterrupted``.
    """
    if stage not in ("tokenizer", "cond"):
        raise VqgenError(f"unknown stage-1 stage {stage!r}; valid: tokenizer, cond")
    registry = registry or default_registry()
    kind = stage1_objective(config, registry, stage, conditioner)
    cfg: StageTrainConfig = getattr(config.train, stage)
    rt = Runtime(cfg.device, cfg.amp if kind is AdversarialObjective else "none")
    obj = kind(config, registry, stage, conditioner, rt)
    run = Path(run_dir) if run_dir else None
    ckpt = Checkpointer(run / stage if run else None, obj.tok, kind="tokenizer",
                        name=obj.name, keep_last=cfg.keep_last, keep_best=cfg.keep_best,
                        others={"discriminator": getattr(obj, "disc", None)})
    _run(obj, rt, ckpt, run, config, progress, resume)
    return obj.tok.eval()


def train_prior(
    config: PipelineConfig,
    tokenizer: Any,
    conditioner: Any = None,
    run_dir: str | os.PathLike[str] | None = None,
    *,
    registry: Registry | None = None,
    progress: bool = True,
    resume: bool = False,
    cache_root: str | os.PathLike[str] | None = None,
) -> Pipeline:
    """Train the prior of ``config`` on tokens of ``tokenizer`` (and ``conditioner``).

    Returns the Pipeline in eval mode. With ``run_dir`` it logs to
    ``metrics.jsonl``, keeps the token cache in ``run_dir/tokens`` and checkpoints
    to ``run_dir/prior``; ``resume`` continues from that checkpoint. SIGINT /
    SIGTERM write a checkpoint and raise ``TrainingInterrupted``.
    """
    registry = registry or default_registry()
    cfg = config.train.prior
    rt = Runtime(cfg.device, cfg.amp, strategy=cfg.strategy)
    progress = progress and rt.main
    run = Path(run_dir) if run_dir else None
    tokenizer = tokenizer.to(rt.device).eval()
    if conditioner is not None:
        conditioner = conditioner.to(rt.device).eval()
    root = Path(cache_root) if cache_root else (run / TOKENS_DIR if run else None)
    if root is None:
        root = Path(tempfile.mkdtemp(prefix="vqgen-tokens-"))
    cache, held_cache = token_caches(config, registry, tokenizer, conditioner, root,
                                      cfg.batch_size, progress, rt)
    grid = (int(cache.codes.shape[1]), int(cache.codes.shape[2]))
    if config.prior is None:
        raise VqgenError("the config has no prior section: nothing to train in stage 2")
    # seeded after the token caches: encoding them (or finding them built) must not move
    # the random stream that initialises the prior and draws its dropout masks
    seed_everything(cfg.seed)
    pipe = assemble(config, tokenizer, conditioner, grid, registry).to(rt.device)
    prior = pipe._require_prior()
    if isinstance(prior, InitFromCodeVectors) and prior.wants_code_vectors:
        vectors = tokenizer.code_vectors()
        if vectors is None:
            raise VqgenError(
                f"prior.params.tok_emb_init: code_vectors needs a tokenizer with code vectors; "
                f"{type(tokenizer).__name__} has none (use tok_emb_init: normal)"
            )
        prior.init_from_code_vectors(vectors)  # a resumed run then loads its own weights
    if cfg.cond_dropout > 0 and (conditioner is None or conditioner.null_id is None):
        raise VqgenError(
            "train.prior.cond_dropout > 0 needs a conditioner with a null token "
            "(conditioner.params.null_token: true)"
        )
    obj = PriorObjective(config, pipe, cache, held_cache, rt)
    ckpt = Checkpointer(run / "prior" if run else None, prior, kind="prior",
                        name=config.prior.name, keep_last=cfg.keep_last,
                        keep_best=cfg.keep_best)
    _run(obj, rt, ckpt, run, config, progress, resume)
    if rt.sharded:  # a whole prior for sampling, as one process would have trained it
        whole = rt.full_state(prior)  # a collective: every rank gathers
        plain = registry.create("prior", config.prior.name, prior.params)
        pipe = assemble(config, tokenizer, conditioner, grid, registry, prior=plain)
        pipe.prior.load_state_dict(whole)  # type: ignore[union-attr]
        pipe = pipe.to(rt.device)
    return pipe.eval()
