"""Training feedback: TensorBoard event files read back with TensorBoard's own reader,
curves that continue at the right step after --resume, and plain progress lines when
nobody watches a terminal."""

from __future__ import annotations

import fcntl
import io
import os
import select
import signal
import struct
import termios
from pathlib import Path
from typing import Any

import pytest

from vqgen.cli import main
from vqgen.core.progress import PlainProgress, progress_bar
from vqgen.training.loop import TrainingInterrupted

from .test_main_job import signal_at, tiny, write_config

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator")


def _events(run: Path) -> Any:
    acc = event_accumulator.EventAccumulator(
        str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_logger_writes_scalars_images_and_config(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", tiny(tokenizer={"steps": 4, "log_every": 1,
                                                            "image_every": 2},
                                                 prior={"steps": 4, "log_every": 2}))
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--run-dir", str(run), "--logger", "tensorboard"]) == 0
    acc = _events(run)
    tags = acc.Tags()
    assert {"tokenizer/loss", "tokenizer/rec", "tokenizer/usage", "tokenizer/lr",
            "prior/nll_nats", "prior/lr", "prior/grad_norm",
            "prior/val_nll_nats"} <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("tokenizer/loss")] == [1, 2, 3, 4]
    assert [e.step for e in acc.Scalars("prior/nll_nats")] == [2, 4]
    assert [e.step for e in acc.Images("tokenizer/preview")] == [2, 4]  # image_every 2
    assert "config/text_summary" in tags["tensors"]  # the resolved config
    assert "tensorboard" in (run / "config.yaml").read_text()  # recorded for --resume


def test_tensorboard_curves_continue_after_resume(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from vqgen.runs import train

    cfg = write_config(tmp_path / "c.yaml", tiny(
        tokenizer={"steps": 2, "log_every": 1},
        prior={"steps": 6, "log_every": 1, "checkpoint_every": 2}))
    text = cfg.read_text().replace("train:", "train:\n  loggers: [jsonl, tensorboard]")
    cfg.write_text(text)
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        signal_at(m, 2, signal.SIGINT, "prior")
        with pytest.raises(TrainingInterrupted):
            train(cfg, run, progress=False)
    train(run / "config.yaml", run, resume=True, progress=False)
    acc = _events(run)  # the event files of both process starts, read together
    assert [e.step for e in acc.Scalars("prior/nll_nats")] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in acc.Scalars("tokenizer/loss")] == [1, 2]  # not trained again


def test_unknown_or_missing_logger_is_a_clear_error(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path / "c.yaml", tiny())
    with pytest.raises(SystemExit) as exit_info:  # argparse: exit 2, no traceback
        main(["train", str(cfg), "--run-dir", str(tmp_path / "r"), "--logger", "wandb"])
    assert exit_info.value.code == 2
    assert "wandb" in capsys.readouterr().err
    cfg.write_text(cfg.read_text().replace("train:", "train:\n  loggers: [wandb]"))
    assert main(["config", "validate", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "train.loggers" in err and "wandb" in err and "tensorboard" in err
    assert not (tmp_path / "r").exists()


def test_plain_progress_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    bar = progress_bar(100, desc="prior", stream=out)
    assert isinstance(bar, PlainProgress)
    for _ in range(100):
        bar.update(1)
        bar.set_postfix({"nll": "1.234"})
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) == 11  # every 10 %, and a summary
    assert lines[0].startswith("prior: step 10/100 (10%)") and "ETA" in lines[0]
    assert "nll=1.234" in lines[1]
    assert lines[-1].startswith("prior: done, 100 steps in")


def test_live_bar_on_a_terminal() -> None:
    primary, secondary = os.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    with os.fdopen(secondary, "w") as tty:
        bar = progress_bar(10, desc="prior", stream=tty)
        assert not isinstance(bar, PlainProgress)  # tqdm redraws in place
        for _ in range(10):
            bar.update(1)
        bar.close()
        tty.flush()
        chunks = []
        while select.select([primary], [], [], 0.2)[0]:
            chunks.append(os.read(primary, 65536))
        shown = b"".join(chunks).decode(errors="replace")
    os.close(primary)
    assert "\r" in shown and "10/10" in shown


def test_disabled_progress_prints_nothing() -> None:
    out = io.StringIO()
    bar = progress_bar(10, desc="x", enabled=False, stream=out)
    bar.update(10)
    bar.close()
    assert out.getvalue() == ""
