"""Where the loop's scalars, pictures and hyper-parameters go.

A :class:`Logger` receives metrics records (one dict of scalars per ``log_every``
steps, with ``step`` and ``stage``), preview pictures and the run's resolved config.
Built in, chosen by ``train.loggers`` in a config or ``--logger`` on the CLI:

* ``jsonl`` (always on where there is a run directory): ``metrics.jsonl``, one JSON
  object per line, and ``images/<stage>_<step>.png``;
* ``tensorboard``: event files under ``<run>/tensorboard/`` through
  :mod:`torch.utils.tensorboard` (install the ``tensorboard`` extra); watch with
  ``tensorboard --logdir <run>/tensorboard``. Tags are ``<stage>/<name>``; the global
  step of each stage is its own step, so a resumed run continues its curves.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from vqgen.core.errors import VqgenError
from vqgen.core.images import save_image_grid
from vqgen.core.layout import IMAGES_DIR, METRICS_FILE, TENSORBOARD_DIR

__all__ = ["JsonlLogger", "Logger", "TensorBoardLogger", "make_loggers", "LOGGERS"]


class Logger:
    """Receives what the training loop reports; every method may be a no-op."""

    def scalars(self, record: Mapping[str, Any]) -> None:
        """One metrics record (``step``, ``stage`` and scalar values)."""

    def images(self, stage: str, step: int, images: torch.Tensor, nrow: int) -> None:
        """A preview: ``images`` ``[N, C, H, W]`` in [-1, 1], ``nrow`` to a row."""

    def hparams(self, config: Mapping[str, Any]) -> None:
        """The run's resolved config (once per process start)."""

    def close(self) -> None:
        """Flush and release files."""


class JsonlLogger(Logger):
    """``metrics.jsonl`` (append) and ``images/<stage>_<step>.png`` in ``run``."""

    def __init__(self, run: Path) -> None:
        self.path = run / METRICS_FILE
        self.images_dir = run / IMAGES_DIR
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def scalars(self, record: Mapping[str, Any]) -> None:
        try:
            _append_line(self.path, json.dumps(dict(record), allow_nan=True))
        except OSError as exc:  # a full disk: stop before the next checkpoint is due
            raise VqgenError(
                f"cannot append to {self.path}: {exc.strerror or exc}. Checkpoints already "
                "written are whole; free some space and run the same `vqgen train` command "
                "with --resume to go on"
            ) from None

    def images(self, stage: str, step: int, images: torch.Tensor, nrow: int) -> None:
        save_image_grid(images, self.images_dir / f"{stage}_{step:06d}.png", nrow=nrow)


def _append_line(path: Path, line: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


class TensorBoardLogger(Logger):
    """TensorBoard event files in ``<run>/tensorboard`` (needs the ``tensorboard`` package).

    Each process start writes a new event file; a resumed stage starts at the step after
    its checkpoint, so its curves continue without rewound or repeated points.
    """

    def __init__(self, run: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise VqgenError(
                f"the tensorboard logger needs the tensorboard package ({exc}); install it "
                "with `pip install 'vqgen[tensorboard]'` or drop 'tensorboard' from "
                "train.loggers / --logger"
            ) from None
        self.writer = SummaryWriter(log_dir=str(run / TENSORBOARD_DIR))

    def scalars(self, record: Mapping[str, Any]) -> None:
        stage, step = str(record.get("stage", "train")), int(record["step"])
        for key, value in record.items():
            if key in ("step", "stage") or not isinstance(value, int | float):
                continue
            self.writer.add_scalar(f"{stage}/{key}", float(value), step)

    def images(self, stage: str, step: int, images: torch.Tensor, nrow: int) -> None:
        from vqgen.core.images import image_grid

        grid = image_grid(images, nrow=nrow)  # (C, Hg, Wg) in [0, 1]
        self.writer.add_image(f"{stage}/preview", grid, step)

    def hparams(self, config: Mapping[str, Any]) -> None:
        text = json.dumps(dict(config), indent=2, default=str)
        self.writer.add_text("config", "```\n" + text + "\n```", 0)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


#: the built-in loggers by name (``jsonl`` is always on where there is a run directory)
LOGGERS: dict[str, type[Logger]] = {"jsonl": JsonlLogger, "tensorboard": TensorBoardLogger}


def make_loggers(run: Path | None, names: Sequence[str] = ()) -> list[Logger]:
    """The loggers of a run directory: ``jsonl`` and each of ``names`` (none without one)."""
    if run is None:
        return []
    out: list[Logger] = [JsonlLogger(run)]
    for name in names:
        if name == "jsonl":
            continue
        cls = LOGGERS.get(name)
        if cls is None:
            raise VqgenError(f"unknown logger {name!r}; valid: {', '.join(sorted(LOGGERS))}")
        out.append(cls(run))
    return out
