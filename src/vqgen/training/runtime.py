"""Where a stage runs: device, processes (DDP or FSDP), mixed precision and seeding, behind
a few verbs.

The loop (:mod:`vqgen.training.loop`) and the objectives never touch
``torch.distributed``, ``torch.autocast`` or a ``GradScaler`` themselves; they ask the
:class:`Runtime`:

* :meth:`Runtime.wrap` — a module whose gradients are averaged over ranks (DDP), whose
  parameters, gradients and optimizer state are sharded over ranks (``strategy="fsdp"``:
  PyTorch's ``fully_shard``, one unit per block), or the module itself for one process;
* :meth:`Runtime.full_state` / :meth:`Runtime.full_optimizer_state` /
  :meth:`Runtime.shard_optimizer_state` / :meth:`Runtime.gathered` — under FSDP, the
  whole tensors for a checkpoint (the same files as one process writes, so any number of
  processes resumes them and ``vqgen sample`` loads them), and every parameter gathered
  on every rank while evaluation and previews run;
* :meth:`Runtime.autocast` / :meth:`Runtime.accumulate` — the context of one
  micro-batch's forward pass (bf16/fp16 autocast on CUDA; no gradient sync before
  the last micro-batch);
* :meth:`Runtime.backward` / :meth:`Runtime.step` / :meth:`Runtime.update` — the
  (scaled) backward pass and optimizer step, with optional clipping;
* :meth:`Runtime.agree` — the one collective of a step (a sum over ranks);
* :meth:`Runtime.reseed` — per-rank random streams for dropout and masks.

Under ``torchrun`` every process trains on its slice of each global batch; with the same
global batch the result equals one process (see the module docstring of
:mod:`vqgen.training.engine`), under DDP and FSDP alike.

FSDP (``train.prior.strategy: fsdp``, launched by torchrun like DDP) keeps 1/N of the
weights, gradients and Adam moments on each of N ranks and gathers one block's weights at
a time in the forward and backward passes: for a prior whose training state does not fit
one device under DDP. Under FSDP every rank takes part in what touches the weights:
checkpoints (gathered, rank 0 writes), held-out evaluation and previews (the same work on
every rank, rank 0 logs); the optimizer is rebuilt over the sharded parameters and its
state sharded from the whole one it was restored with.
"""

from __future__ import annotations

import contextlib
import os
import random
import types
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from vqgen.core.devices import resolve_device
from vqgen.core.errors import VqgenError

__all__ = ["STRATEGIES", "DistInfo", "Runtime", "barrier", "checkpoint_activations",
           "configure_threads", "default_threads",
           "resolve_device", "seed_everything", "setup_distributed", "world_size"]

#: how a stage runs on several processes: replicated weights (DDP) or sharded ones (FSDP)
STRATEGIES = ("ddp", "fsdp")
#: the most CPU threads the default picks: beyond this, small models gain nothing
MAX_DEFAULT_THREADS = 16
#: cgroup v2's CPU quota of this process's group ("max PERIOD" or "QUOTA PERIOD")
CPU_MAX_FILE = "/sys/fs/cgroup/cpu.max"


def _cpu_quota() -> int | None:
    """CPUs a cgroup v2 quota (``cpu.max``, e.g. ``docker --cpus``) allows, or None."""
    try:
        with open(CPU_MAX_FILE, encoding="ascii") as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else max(1, -(-int(quota) // int(period)))
    except (OSError, ValueError):
        return None


def default_threads() -> int:
    """Torch threads for this process when none are asked for: torch's own default (the
    physical cores) capped by the cores this process may run on (affinity, cgroup quota),
    shared among the processes of one machine under torchrun, and by
    :data:`MAX_DEFAULT_THREADS`."""
    n = torch.get_num_threads()
    if hasattr(os, "sched_getaffinity"):
        n = min(n, len(os.sched_getaffinity(0)))
    quota = _cpu_quota()
    if quota is not None:
        n = min(n, quota)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, min(n // max(local, 1), MAX_DEFAULT_THREADS))


def configure_threads(threads: int | None) -> int:
    """Set torch's intra-op CPU threads (``None``: :func:`default_threads`); returns it.
    On a machine shared with other busy processes, fewer threads than cores avoid
    OpenMP threads spinning against each other (often 1 or 2 is fastest)."""
    n = default_threads() if threads is None else threads
    if n < 1:
        raise VqgenError(f"threads must be at least 1, got {n}")
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    return n


def _whole(value: Any) -> Any:
    """A sharded tensor (DTensor) gathered whole on the CPU; anything else as it is."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor().cpu() if isinstance(value, DTensor) else value


def checkpoint_activations(units: Sequence[nn.Module]) -> None:
    """Have each of ``units`` (e.g. a prior's blocks) recompute its activations in the
    backward pass instead of keeping them from the forward one, where gradients are
    enabled: activation memory of one unit instead of all, for about one more forward
    pass of compute. Random draws (dropout) are replayed, so the gradients are the same;
    without gradients (evaluation, sampling) a unit runs as before."""
    for unit in units:
        # bound to the unit (a deep copy rebinds it to the copy), its class's forward
        unit.forward = types.MethodType(_recomputed_forward, unit)  # type: ignore[method-assign]


def _recomputed_forward(unit: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``unit``'s own forward, recomputed in the backward pass where gradients are on."""
    from torch.utils.checkpoint import checkpoint

    forward = type(unit).forward.__get__(unit)
    if torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def world_size() -> int:
    """Processes in the torch.distributed group (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a torchrun job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this process logs and writes checkpoints."""
        return self.rank == 0


def setup_distributed(device_name: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the torchrun job described by the environment (once), pick this rank's device.

    Without ``WORLD_SIZE`` > 1 in the environment: rank 0 of 1, :func:`resolve_device`.
    NCCL on CUDA devices, gloo on the CPU; on CUDA, rank ``r`` uses ``cuda:LOCAL_RANK``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world <= 1:
        return DistInfo(), device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local), device


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op for one process)."""
    if info.world > 1:
        dist.barrier()


class Runtime:
    """Device, ranks and precision of one stage (see the module docstring).

    ``amp``: ``"bf16"`` / ``"fp16"`` autocast on CUDA (fp16 with a gradient scaler), or
    ``"none"``; on the CPU always full precision. ``strategy``: ``"ddp"`` or ``"fsdp"``
    (see the module docstring; the same for one process). ``info`` / ``device`` default
    to joining the torchrun job of the environment on ``device_name``.
    """

    def __init__(self, device_name: str = "auto", amp: str = "none", *,
                 info: DistInfo | None = None, device: torch.device | None = None,
                 strategy: str = "ddp") -> None:
        if strategy not in STRATEGIES:
            raise VqgenError(f"unknown strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
        if info is None or device is None:
            info, device = setup_distributed(device_name)
        self.info, self.device = info, device
        #: whether weights are sharded over ranks (FSDP on more than one process)
        self.sharded = strategy == "fsdp" and info.world > 1
        self._units: list[nn.Module] = []  # FSDP's units, the root last
        self.cuda = device.type == "cuda"
        self.amp = self.cuda and amp != "none"
        self.amp_dtype = torch.bfloat16 if amp == "bf16" else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and amp == "fp16")

    @property
    def main(self) -> bool:
        """Whether this process logs and writes checkpoints (rank 0)."""
        return self.info.main

    # -- set-up -------------------------------------------------------------
    def reseed(self, seed: int, start: int) -> None:
        """Give each rank its own global random stream from step ``start`` on (dropout,
        masks, code restarts differ between ranks); nothing for one process."""
        if self.info.world > 1:
            torch.manual_seed(seed * 1_000_003 + self.info.rank + start)

    def wrap(self, module: nn.Module, units: Sequence[nn.Module] = ()) -> nn.Module:
        """``module`` with its gradients averaged over ranks by DDP (as is for one process);
        under FSDP sharded in place, each of ``units`` (e.g. the transformer blocks) its own
        unit and ``module`` the root. Optimizers made before sharding hold parameters that
        are gone: rebuild them (:meth:`shard_optimizer_state` moves their state over)."""
        if self.info.world == 1:
            return module
        if self.sharded:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            # this stage's device type, not the machine's accelerator: a CPU stage on a
            # CUDA machine must not have its shards moved to the GPU
            mesh = init_device_mesh(self.device.type, (self.info.world,))
            for unit in units:
                fully_shard(unit, mesh=mesh)
            fully_shard(module, mesh=mesh)
            self._units = [*units, module]
            return module
        ids = [self.device.index] if self.cuda else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)

    # -- whole tensors of sharded ones (collectives under FSDP: call on every rank) --------
    def full_state(self, module: nn.Module) -> dict[str, torch.Tensor] | None:
        """``module``'s state_dict with every sharded tensor gathered whole (on the CPU), as
        one process would save it; None when nothing is sharded (save ``module`` as is)."""
        if not self.sharded:
            return None
        return {k: _whole(v) for k, v in module.state_dict().items()}

    def full_optimizer_state(self, opt: torch.optim.Optimizer) -> dict[str, Any]:
        """``opt.state_dict()`` with sharded moments gathered whole (what one process saves)."""
        state = opt.state_dict()
        if not self.sharded:
            return state
        return {**state, "state": {i: {k: _whole(v) for k, v in s.items()}
                                   for i, s in state["state"].items()}}

    def shard_optimizer_state(self, state: dict[str, Any], opt: torch.optim.Optimizer
                              ) -> dict[str, Any]:
        """A whole optimizer state (``opt.state_dict()`` of one process, same parameter
        order) with each parameter-shaped tensor sharded like ``opt``'s parameter."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        params = [p for g in opt.param_groups for p in g["params"]]
        out = {}
        for i, s in state["state"].items():
            p = params[int(i)]
            out[i] = {k: distribute_tensor(v.to(self.device), p.device_mesh, p.placements)
                      if isinstance(p, DTensor) and isinstance(v, torch.Tensor)
                      and v.shape == p.shape else v for k, v in s.items()}
        return {**state, "state": out}

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """Every sharded parameter whole on every rank within (nothing otherwise): for
        evaluation and previews, which every rank must then run alike (a forward pass on
        one rank alone leaves FSDP's state out of step with the others)."""
        if not self._units:
            yield
            return
        root = self._units[-1]
        root.set_reshard_after_forward(False, recurse=True)  # type: ignore[operator]
        for unit in self._units:
            unit.unshard()  # type: ignore[operator]
        try:
            yield
        finally:
            for unit in self._units:
                unit.reshard()  # type: ignore[operator]
            for unit in self._units[:-1]:  # the root stays unsharded after forward
                unit.set_reshard_after_forward(True, recurse=False)  # type: ignore[operator]

    def to_device(self, value: Any) -> Any:
        """A tensor moved to this device (anything else as it is)."""
        return value.to(self.device, non_blocking=True) if isinstance(value, torch.Tensor) \
            else value

    # -- one micro-batch ------------------------------------------------------
    def autocast(self) -> Any:
        """The mixed-precision context of a forward pass."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp)

    def accumulate(self, model: nn.Module, last: bool) -> Any:
        """The context of a micro-batch's forward pass: no gradient sync before the last."""
        if self.sharded:  # FSDP: reduce-scatter the gradients after the last micro-batch only
            model.set_requires_gradient_sync(last)  # type: ignore[operator]
        elif self.info.world > 1 and not last and hasattr(model, "no_sync"):
            return model.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Backward pass of ``loss`` (scaled where fp16 needs it)."""
        self.scaler.scale(loss).backward()

    # -- the update -----------------------------------------------------------
    def average_grads(self, module: nn.Module) -> None:
        """Average the gradients of a module that DDP does not wrap over ranks."""
        if self.info.world == 1:
            return
        for p in module.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.info.world

    def step(self, opt: torch.optim.Optimizer, clip: float | None = None,
             params: Iterable[torch.Tensor] | None = None) -> float | None:
        """One optimizer step; with ``clip``, the gradient norm of ``params`` is clipped to
        it first (after unscaling) and returned."""
        norm = None
        if clip is not None:
            self.scaler.unscale_(opt)
            norm = float(nn.utils.clip_grad_norm_(list(params or ()), clip))
        self.scaler.step(opt)
        return norm

    def update(self) -> None:
        """End of the step's updates (the fp16 scaler adjusts its scale)."""
        self.scaler.update()

    def agree(self, values: Sequence[float]) -> list[float]:
        """The sum of ``values`` over ranks: the step's one collective (a NaN anywhere
        reaches every rank); unchanged for one process."""
        if self.info.world == 1:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)  # (n,)
        dist.all_reduce(t)
        return t.tolist()

    def broadcast(self, module: nn.Module) -> None:
        """Give every rank rank 0's parameters and buffers of ``module``."""
        if self.info.world == 1:
            return
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                dist.broadcast(t.data, 0)

    def barrier(self) -> None:
        """Wait for every rank."""
        barrier(self.info)

