"""``vqgen eval RUN``: reconstruction, likelihood and sample figures of a trained run."""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from vqgen.core.errors import VqgenError
from vqgen.core.layout import TOKENS_DIR
from vqgen.evaluation.metrics import (
    CLASSIFIER_FILE,
    class_accuracy,
    code_usage,
    find_classifier,
    lpips_model,
    psnr,
    rounded,
    ssim,
)
from vqgen.evaluation.pictures import registry_of

_CHUNK = 64  # images per tokenizer / LPIPS call


@torch.no_grad()
def evaluate_run(
    pipe: Any,
    run_dir: str | os.PathLike[str],
    *,
    n: int = 512,
    per_class: int = 32,
    classifier: str | os.PathLike[str] | None = None,
    fid_samples: int = 0,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate the trained ``pipe`` of run directory ``run_dir`` (loaded by
    :func:`vqgen.runs.load_run`; see :mod:`vqgen.evaluation`); a JSON-ready dict.

    ``n`` held-out images for the tokenizer, ``per_class`` samples per class for
    the class accuracy, ``fid_samples`` > 0 to try FID / IS.
    """
    from vqgen.core.data import held_out_dataset

    run = Path(run_dir)
    config = pipe.config  # type: ignore[attr-defined]
    held = held_out_dataset(config, registry_of(pipe), n)
    if held is None:
        raise VqgenError(
            f"dataset {config.data.name!r} has no held-out data (no 'split' param, or an "
            "empty held-out split), so there is nothing to evaluate on; for a folder, add "
            "root/val/<class>/ images or set data.params.held_out above 0"
        )
    key = config.train.tokenizer.input_key or getattr(pipe.tokenizer, "input_key", "image")
    x = torch.stack([held[i][key] for i in range(len(held))])  # (N, C, H, W)
    out: dict[str, Any] = {"run_dir": str(run), "held_out_samples": len(held),
                           "tokenizer": tokenizer_metrics(pipe.tokenizer, x)}
    if pipe.prior is None:
        out["prior"] = None
        return rounded(out)
    out["prior"] = prior_nll(pipe, run, held, progress)
    if getattr(pipe.conditioner, "n_classes", None) and pipe.conditioner.spatial is False:
        out["samples"] = _sample_accuracy(pipe, run, classifier, per_class, seed)
    if fid_samples > 0 and x.shape[1] == 3:
        out["fid_is"] = _fid(pipe, x, fid_samples)
    return rounded(out)


def tokenizer_metrics(tok: Any, x: torch.Tensor) -> dict[str, Any]:
    """Code usage of ``tok`` on inputs ``x`` ``[N, C, H, W]``; for images also PSNR,
    SSIM and LPIPS of its reconstructions."""
    codes = torch.cat([tok.encode(x[i : i + _CHUNK])
                       for i in range(0, len(x), _CHUNK)])  # (N, h, w)
    out: dict[str, Any] = code_usage(codes, tok.vocab_size)
    if not (x.is_floating_point() and x.shape[1] in (1, 3)):
        return out
    recon = torch.cat([tok.decode(codes[i : i + _CHUNK]) for i in range(0, len(x), _CHUNK)])
    recon = recon.clamp(-1, 1)  # (N, C, H, W)
    model, backbone = lpips_model()
    d = torch.cat([model(x[i : i + _CHUNK], recon[i : i + _CHUNK]).flatten()
                   for i in range(0, len(x), _CHUNK)])  # (N,)
    out.update(psnr_db=float(psnr(recon, x).mean()), ssim=float(ssim(recon, x).mean()),
               lpips=float(d.mean()), lpips_backbone=backbone)
    return out


def _sample_accuracy(pipe: Any, run: Path, classifier: str | os.PathLike[str] | None,
                     per_class: int, seed: int) -> dict[str, Any]:
    """Class accuracy of samples under the run's classifier, or how to train one."""
    config = pipe.config
    path = find_classifier(run, classifier, config)
    if path is None:
        data = json.dumps(config.data.params)
        return {"class_accuracy": None, "note": (
            f"no classifier: train one with `python -m vqgen.training.judges --data "
            f"{config.data.name} --data-params '{data}' --augment --out "
            f"{run / CLASSIFIER_FILE}` (or pass --classifier FILE)")}
    from vqgen.plugins.judges import load_classifier

    acc = class_accuracy(pipe, load_classifier(path), per_class, seed)
    acc.pop("images")
    return {**acc, "classifier": str(path)}


def prior_nll(pipe: Any, run: Path, held: Any, progress: bool = False) -> dict[str, float]:
    """Held-out NLL of ``pipe``'s prior on ``held`` (tokens cached under ``run/tokens``);
    for a masked prior its masked-token cross-entropy, named so (``val_masked_ce_*``).

    With a conditioner it adds the NLL with mismatched conditions and
    ``cond_gain_bits``, how much the prior uses its condition
    (:func:`vqgen.training.objectives.prior.condition_gain`).
    """
    from vqgen.training.objectives.prior import condition_gain, token_nll
    from vqgen.training.tokens import TokenCache

    config = pipe.config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cache = TokenCache.build(
            run / TOKENS_DIR, held, pipe.tokenizer, pipe.conditioner,
            data={"data": config.data.model_dump(mode="json"), "split": "val", "n": len(held)},
            progress=progress,
        )
    name = pipe.prior.loss_name  # nll, or a masked prior's masked_ce: never called an NLL
    if pipe.conditioner is None:
        return {f"val_{k}": v for k, v in token_nll(pipe, cache).items()}
    gain = condition_gain(pipe, cache)
    return {f"val_{name}_nats": gain[f"val_{name}_bits"] * math.log(2), **gain}


def _fid(pipe: Any, held: torch.Tensor, n: int) -> dict[str, Any]:
    """FID / IS through torch-fidelity, or ``{"fid_is": <what is missing>}``."""
    try:
        import torch_fidelity  # type: ignore[import-not-found]
    except ImportError:
        return {"fid_is": "skipped: torch-fidelity is not installed (pip install 'vqgen[eval]')"}
    from vqgen.core.images import save_image_grid

    n_classes = getattr(pipe.conditioner, "n_classes", None)
    cond = torch.arange(n)[:n] % n_classes if n_classes else None
    fake = pipe.generate(n, cond, seed=1).images
    with tempfile.TemporaryDirectory() as tmp:
        for name, images in (("real", held[:n]), ("fake", fake)):
            d = Path(tmp) / name
            d.mkdir()
            for i, im in enumerate(images):
                save_image_grid(im[None], d / f"{i:05d}.png", nrow=1, padding=0)
        try:
            m = torch_fidelity.calculate_metrics(
                input1=str(Path(tmp) / "fake"), input2=str(Path(tmp) / "real"), fid=True,
                isc=True, verbose=False, cuda=torch.cuda.is_available(),
            )
        except Exception as exc:  # noqa: BLE001 - download failures come in many kinds
            return {"fid_is": "skipped: torch-fidelity could not load its Inception weights "
                    f"({type(exc).__name__}); it downloads them on first use, which needs "
                    "network access"}
    return {"fid": m.get("frechet_inception_distance"),
            "inception_score": m.get("inception_score_mean"), "fid_is_samples": n}
