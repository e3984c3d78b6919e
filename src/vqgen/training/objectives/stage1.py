"""Stage 1: a tokenizer (or a spatial conditioner's own tokenizer, the "cond" stage).

Two objectives, chosen by what the tokenizer is (Protocols of :mod:`vqgen.core.interfaces`):

* :class:`FittedObjective` — fitted without gradients (:class:`~vqgen.core.interfaces.Fitted`:
  ``fit_step(x, generator)``, k-means), one fit step per global batch on every rank;
* :class:`AdversarialObjective` — trained by gradient with its own loss and a
  discriminator (:class:`~vqgen.core.interfaces.Adversarial`: ``build_loss()``, VQGAN):
  one Adam optimizer for the tokenizer and one for the discriminator (disjoint
  parameters; the discriminator's gradients are averaged by the runtime, DDP wraps the
  tokenizer), channels-last on CUDA.

Optional for a tokenizer: ``input_key`` (the batch key trained on, default ``"image"``),
``prepare_input(value) -> tensor`` and ``to_rgb(x) -> images`` for previews.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from vqgen.core.config import PipelineConfig, StageTrainConfig
from vqgen.core.data import ConditionInputs, held_out_dataset, spread_indices
from vqgen.core.errors import VqgenError
from vqgen.core.interfaces import Adversarial, Fitted, cond_stage_tokenizer
from vqgen.core.registry import Registry
from vqgen.training.batches import batch_stream
from vqgen.training.objective import Objective, Optim, StepOutput, lr_at
from vqgen.training.optim import load_generator, load_optimizer, make_optimizer, resolve_lr
from vqgen.training.runtime import Runtime, seed_everything

__all__ = ["AdversarialObjective", "FittedObjective", "stage1_objective"]

log = logging.getLogger(__name__)

PREVIEW_IMAGES = 8  # samples in a preview grid
VAL_IMAGES = 64  # held-out samples behind a stage-1 validation loss


class _Stage1(Objective):
    """What the fitted and the adversarial stage-1 objectives share: the tokenizer, its
    data and held-out data, previews and the validation loss."""

    val_key = "val_loss"

    def __init__(self, config: PipelineConfig, registry: Registry, stage: str,
                 conditioner: Any, rt: Runtime) -> None:
        self.config, self.stage, self.rt, self.desc = config, stage, rt, stage
        self.cfg: StageTrainConfig = getattr(config.train, stage)
        seed_everything(self.cfg.seed)
        data = registry.create("dataset", config.data.name, config.data.params)
        held = held_out_dataset(config, registry, VAL_IMAGES)
        if stage == "cond":
            tok = cond_stage_tokenizer(conditioner)
            if tok is None:
                raise VqgenError(
                    "the cond stage trains a spatial conditioner's own tokenizer, but "
                    f"{type(conditioner).__name__} has none"
                )
            self.tok = tok
            self.name = registry.name_of(tok)[1]
            self.key = getattr(tok, "input_key", "image")
            self.dataset: Any = ConditionInputs(data, conditioner, self.key)
            self.held = ConditionInputs(held, conditioner, self.key) if held else None
        else:
            self.tok = registry.create("tokenizer", config.tokenizer.name,
                                       config.tokenizer.params)
            self.name = config.tokenizer.name
            self.key = self.cfg.input_key or getattr(self.tok, "input_key", "image")
            self.dataset, self.held = data, held
        self.tok.to(rt.device)
        sample = self.dataset[0]
        if self.key not in sample:
            raise VqgenError(
                f"dataset {config.data.name!r} has no {self.key!r} in its samples (it has "
                f"{', '.join(sorted(sample))}); set train.{stage}.input_key"
            )
        shown = spread_indices(self.dataset, PREVIEW_IMAGES, self.cfg.seed)  # across classes
        self.preview_inputs = torch.stack([self.dataset[i][self.key] for i in shown])
        self.loss_fn: Any = None

    def input_of(self, batch: Mapping[str, Any]) -> torch.Tensor:
        x = self.rt.to_device(batch[self.key])
        prepare = getattr(self.tok, "prepare_input", None)
        return prepare(x) if prepare is not None else x

    def _stream(self, start_step: int, sharded: bool) -> Iterator[Any]:
        cfg, info = self.cfg, self.rt.info
        rank, world = (info.rank, info.world) if sharded else (0, 1)
        return batch_stream(
            self.dataset, cfg.batch_size * (1 if sharded else info.world),
            seed=cfg.seed, start=start_step * cfg.grad_accum, num_workers=cfg.num_workers,
            rank=rank, world=world,
        )

    @torch.no_grad()
    def preview(self, done: int) -> tuple[torch.Tensor, int]:
        """Inputs (top row) above their reconstructions."""
        was_training = self.tok.training
        self.tok.eval()
        x = self.input_of({self.key: self.preview_inputs})
        recon = self.tok.decode(self.tok.encode(x)) if isinstance(self.tok, Fitted) \
            else self.tok(x).recon
        to_rgb = getattr(self.tok, "to_rgb", lambda t: t)
        grid = torch.cat([to_rgb(x), to_rgb(recon)]).float().cpu()  # (2n, C, H, W)
        self.tok.train(was_training)
        return grid, x.shape[0]

    @torch.no_grad()
    def evaluate(self, done: int) -> dict[str, float]:
        """The stage's loss without its GAN term on up to 64 held-out samples."""
        if self.held is None:
            return {}
        was_training = self.tok.training
        self.tok.eval()
        batch = [self.held[i][self.key] for i in range(min(VAL_IMAGES, len(self.held)))]
        x = self.input_of({self.key: torch.stack(batch)})
        if self.loss_fn is None:
            value = float((self.tok.decode(self.tok.encode(x)) - x).abs().mean())
        else:
            _, logs = self.loss_fn.generator_loss(x, self.tok(x), -1, self.tok.last_layer)
            value = float(logs.get("nll", logs["loss"]))
        self.tok.train(was_training)
        return {"val_loss": value}


class FittedObjective(_Stage1):
    """Fitted tokenizers (k-means): one ``fit_step`` per global batch, no optimizer."""

    shown = ()

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.desc = f"{self.stage} (fit)"
        self.generator = torch.Generator().manual_seed(self.cfg.seed)

    @property
    def micro_batches(self) -> int:
        return 1

    def batches(self, start: int) -> Iterator[Any]:
        return self._stream(start, sharded=False)  # every rank fits the global batch

    def step(self, batch: Any, step: int) -> StepOutput:
        stats = self.tok.fit_step(self.input_of(batch), self.generator)
        self.shown = tuple(stats)
        return StepOutput(logs=stats)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        load_generator(self.generator, state.get("generator"), "generator")


class AdversarialObjective(_Stage1):
    """GAN-trained tokenizers (VQGAN): the tokenizer's loss and the discriminator's, each
    with its own Adam optimizer (taming's alternating updates, in one step)."""

    shown = ("loss", "rec", "ce", "usage")

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        cfg, tok, rt = self.cfg, self.tok, self.rt
        self.loss_fn = tok.build_loss().to(rt.device)
        self.disc = self.loss_fn.discriminator
        self.base_lr = resolve_lr(cfg, rt.info.world)
        self.opt_g = make_optimizer(cfg, [p for p in tok.parameters() if p.requires_grad],
                                    self.base_lr)
        self.opt_d = make_optimizer(cfg, list(self.disc.parameters()), self.base_lr) \
            if self.disc is not None else None

    def start(self, start: int) -> None:
        """After a restored checkpoint: training mode, channels-last, DDP."""
        tok, rt = self.tok, self.rt
        rt.reseed(self.cfg.seed, start)  # per-rank dropout / restarts
        tok.train()
        self.loss_fn.train()
        if rt.cuda:  # convolutions run faster channels-last
            tok.to(memory_format=torch.channels_last)
            if self.disc is not None:
                self.disc.to(memory_format=torch.channels_last)
        self.model = rt.wrap(tok)
        log.info("training %s at lr %.3g (%s, %s betas %s) for %d steps", self.stage,
                 self.base_lr, self.cfg.lr_schedule, self.cfg.optimizer, self.cfg.betas,
                 self.cfg.steps)

    def batches(self, start: int) -> Iterator[Any]:
        return self._stream(start, sharded=True)

    def optimizers(self) -> list[Optim]:
        out = [Optim(self.opt_g)]
        if self.opt_d is not None:
            out.append(Optim(self.opt_d, active=self.loss_fn.disc_active, average=self.disc))
        return out

    def lr(self, step: int) -> float:
        cfg = self.cfg
        return lr_at(step, self.base_lr, cfg.warmup_steps, cfg.steps, schedule=cfg.lr_schedule)

    def step(self, batch: Any, step: int) -> StepOutput:
        x = self.input_of(batch)
        if self.rt.cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self.model(x)
        g_loss, logs = self.loss_fn.generator_loss(x, out, step, self.tok.last_layer)
        losses = [g_loss]
        if self.loss_fn.disc_active(step):
            d_loss, d_logs = self.loss_fn.discriminator_loss(x, out.recon, step)
            losses.append(d_loss)
            logs.update(d_logs)
        logs.update(usage=out.usage, perplexity=out.perplexity, restarted=out.restarted)
        return StepOutput(losses, logs, {"restarted": float(out.restarted)})

    def after_update(self, step: int, flags: Mapping[str, float]) -> None:
        if flags.get("restarted", 0.0) > 0:  # the codebook was re-seeded from a rank's batch
            self.rt.broadcast(self.tok)

    def state_dict(self) -> dict[str, Any]:
        return {"opt_g": self.opt_g.state_dict(),
                "opt_d": self.opt_d.state_dict() if self.opt_d is not None else {}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        load_optimizer(self.opt_g, state.get("opt_g"), "opt_g")
        if self.opt_d is not None:
            load_optimizer(self.opt_d, state.get("opt_d"), "opt_d")


def stage1_objective(config: PipelineConfig, registry: Registry, stage: str,
                    conditioner: Any) -> type[_Stage1]:
    """The objective class that trains a first stage: by the Fitted / Adversarial
    Protocols of the tokenizer (unknown kinds are refused by name)."""
    if stage == "tokenizer":  # built by the objective, after seeding: its initial weights
        cls: type = registry.get("tokenizer", config.tokenizer.name).cls
    else:
        cls = type(cond_stage_tokenizer(conditioner))
    if cls is type(None):
        return _Stage1  # the cond stage without a tokenizer: its __init__ says so
    if issubclass(cls, Fitted):
        return FittedObjective
    if issubclass(cls, Adversarial):
        return AdversarialObjective
    name = config.tokenizer.name if stage == "tokenizer" else cls.__name__
    raise VqgenError(
        f"tokenizer {name!r} ({cls.__name__}) cannot be trained by vqgen's stage-1 "
        "engine: it has neither fit_step() nor build_loss() (the Fitted and Adversarial "
        "protocols of vqgen.core.interfaces)"
    )
