"""Pictures of a run's conditions and samples, laid out as the paper's figures."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from vqgen.core.errors import VqgenError

# label colours of condition_picture for condition inputs with more than 3 channels
_LABEL_COLOURS = torch.tensor(
    [[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
     [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60]], dtype=torch.float32,
) / 127.5 - 1  # (10, 3) in [-1, 1]


def registry_of(pipe: Any) -> Any:
    """The registry ``pipe`` was assembled from (the default one for a hand-made pipe)."""
    from vqgen.core.registry import default_registry

    registry = getattr(pipe, "registry", None)
    return registry if registry is not None else default_registry()


def held_out_batch(pipe: Any, n: int) -> dict[str, torch.Tensor]:
    """The first ``n`` items of the run config's held-out split, stacked per key."""
    from vqgen.core.data import held_out_dataset

    held = held_out_dataset(pipe.config, registry_of(pipe), n=n)
    if held is None or len(held) == 0:
        raise VqgenError(
            f"the run's data set {pipe.config.data.name!r} has no held-out split to draw "
            "conditions from; pass a condition file with --cond"
        )
    items = [held[i] for i in range(min(n, len(held)))]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def condition_picture(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A spatial conditioner's ``condition_input`` ``[B, C, h, w]`` as RGB ``[B, 3, H, W]``.

    One channel (edges, depth, a pose rendering) is shown in grey, three as they are,
    more (a one-hot label map) as the colour of each pixel's largest channel.
    """
    x = x.detach().float().cpu()
    if x.shape[1] == 1:
        rgb = x.expand(-1, 3, -1, -1)  # (B, 3, h, w)
    elif x.shape[1] == 3:
        rgb = x
    else:
        idx = x.argmax(1) % len(_LABEL_COLOURS)  # (B, h, w)
        rgb = _LABEL_COLOURS[idx].permute(0, 3, 1, 2)  # (B, 3, h, w)
    if tuple(rgb.shape[-2:]) != tuple(size):
        rgb = F.interpolate(rgb, size=size, mode="nearest")  # (B, 3, H, W)
    return rgb.clamp(-1, 1)


@torch.no_grad()
def condition_sheet(pipe: Any, rows: int = 8, per_row: int = 4, seed: int = 0,
                    sampler: Any = None, guidance: float | None = None,
                    held: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Samples of a spatially conditioned run for held-out conditions, laid out as the
    paper's figures: each row is ``condition | per_row samples | the real image``.

    The conditions are the first ``rows`` items of ``held`` (a batch mapping with
    ``"image"`` and whatever the conditioner reads), by default of the run config's
    held-out split. Returns ``[rows * (per_row + 2), 3, H, W]`` for
    ``save_image_grid(..., nrow=per_row + 2)``.
    """
    cond = pipe.conditioner
    if cond is None or not getattr(cond, "spatial", False):
        raise VqgenError("condition_sheet needs a spatially conditioned run")
    if rows < 1 or per_row < 1:
        raise VqgenError(f"rows and per_row must be at least 1, got {rows} and {per_row}")
    if held is None:
        held = held_out_batch(pipe, rows)
    batch = {k: v[:rows] for k, v in held.items()}
    real = batch["image"].float().cpu()  # (R, 3, H, W)
    r = len(real)
    size = (int(real.shape[-2]), int(real.shape[-1]))
    shown = condition_picture(cond.condition_input(pipe.cond_batch(batch, r)), size)
    repeated = {k: v.repeat_interleave(per_row, 0) for k, v in batch.items()}
    out = pipe.generate(r * per_row, repeated, sampler=sampler, seed=seed, guidance=guidance)
    samples = out.images.float().cpu().clamp(-1, 1).reshape(r, per_row, *real.shape[1:])
    sheet = torch.cat([shown[:, None], samples, real[:, None]], dim=1)  # (R, per_row + 2, ...)
    return sheet.flatten(0, 1)  # (R * (per_row + 2), 3, H, W)
