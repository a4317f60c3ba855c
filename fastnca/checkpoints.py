"""Checkpoint files: where a run's state is written, and how it is read back, checked and turned into a model.

A checkpoint is ``OUT/checkpoint.pt``, written by ``fastnca train`` atomically (:func:`save_checkpoint`) with
everything a resume needs (``Trainer.state_dict``: the config, model, optimiser, every RNG state, the pool, the data
order, what ran); it loads with ``torch.load(path, weights_only=True)``: nothing in it is unpickled as code.
:func:`read_checkpoint` refuses what is not such a file with a message that says what it is not; :func:`load_checkpoint`
rebuilds the model (eval mode) on a device. Checkpoints written by earlier releases load: unknown config keys are
ignored, missing ones take their defaults.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from fastnca.config import Config
from fastnca.utils import atomic_write

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_NAME",
    "METRICS_NAME",
    "RUN_FILES",
    "checkpoint_config",
    "checkpoint_file",
    "load_checkpoint",
    "load_weights",
    "no_checkpoint_message",
    "read_checkpoint",
    "remove_orphan_temps",
    "save_checkpoint",
]

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "fastnca-checkpoint-v1"
METRICS_NAME = "metrics.jsonl"
RUN_FILES = (CHECKPOINT_NAME, METRICS_NAME, "config.json", "summary.json")  # the files a run writes atomically


def save_checkpoint(obj: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``obj`` with torch.save atomically: a temp file in the same folder, fsync, os.replace.

    A crash or an exception mid-write leaves the previous file at ``path`` untouched and no temp file behind.
    """
    return atomic_write(path, lambda f: torch.save(obj, f))


def remove_orphan_temps(out_dir: str | os.PathLike[str]) -> list[Path]:
    """Delete the temp files (``.checkpoint.pt.*.tmp``, ...) that a crash in the middle of a write left in a run folder.

    Only the run's own atomic-write temps are touched. Returns the removed paths.
    """
    removed = []
    for name in RUN_FILES:
        for tmp in Path(out_dir).glob(f".{name}.*.tmp"):
            try:
                tmp.unlink()
            except FileNotFoundError:
                continue
            removed.append(tmp)
    return removed


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a training checkpoint dict with ``torch.load(..., weights_only=True)`` onto the CPU.

    ``path`` may be the checkpoint file or the run directory holding ``checkpoint.pt``.
    """
    p = checkpoint_file(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"checkpoint {str(p)!r} not found: expected a file written by `fastnca train` (OUT/{CHECKPOINT_NAME})"
        )
    expected = f"expected a checkpoint written by `fastnca train` (OUT/{CHECKPOINT_NAME})"
    if not zipfile.is_zipfile(p):  # torch.save's format is a zip archive; a text log or random bytes are not
        raise ValueError(f"checkpoint {str(p)!r} is not a checkpoint file (not a PyTorch zip archive); {expected}")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message advises weights_only=False, which would run whatever code the file holds: never that
        raise ValueError(
            f"checkpoint {str(p)!r} holds Python objects other than tensors and plain containers, which a fastnca "
            f"checkpoint never does, so it was not written by `fastnca train`; fastnca loads checkpoints with "
            f"weights_only=True and does not unpickle arbitrary objects; {expected}"
        ) from None
    except Exception as err:  # torch raises several types for a damaged archive
        raise ValueError(
            f"checkpoint {str(p)!r} could not be read: a damaged or truncated archive ({type(err).__name__}); "
            f"{expected}"
        ) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"checkpoint {str(p)!r}: expected a fastnca training checkpoint with 'model' and 'config'")
    return ckpt


def _first_line(err: BaseException) -> str:
    """The error's first line (and the next one when the first only announces a list, as torch's often do)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def checkpoint_file(path: str | os.PathLike[str]) -> Path:
    """The checkpoint file that ``path`` names: the file itself, or ``checkpoint.pt`` in a run directory."""
    p = Path(path)
    return p / CHECKPOINT_NAME if p.is_dir() else p


def checkpoint_config(ckpt: dict[str, Any], path: str | os.PathLike[str]) -> Config:
    """The Config a checkpoint was trained with; a ValueError naming the file when it is missing or malformed."""
    d = ckpt.get("config")
    if not isinstance(d, dict):
        raise ValueError(
            f"checkpoint {str(path)!r}: its config is not a dict of Config fields (got {type(d).__name__})"
        )
    try:
        return Config.from_dict(d)
    except (TypeError, ValueError, AttributeError) as err:
        raise ValueError(
            f"checkpoint {str(path)!r}: its config is not a valid fastnca config ({_first_line(err)})"
        ) from None


def load_weights(module: Any, state: Any, path: str | os.PathLike[str], what: str = "model") -> None:
    """``module.load_state_dict(state)`` (a model or a Trainer); a ValueError naming the file when it does not fit."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as err:
        raise ValueError(
            f"checkpoint {str(path)!r}: its {what} state does not fit the model its config describes "
            f"({_first_line(err)})"
        ) from None


def load_checkpoint(path: str | os.PathLike[str], device: str | torch.device | None = "cpu") -> tuple[Any, dict]:
    """Load a training checkpoint (``weights_only=True``) and rebuild its model on ``device``.

    ``path`` may be the checkpoint file or the run directory holding ``checkpoint.pt``.

    Returns:
        ``(model, checkpoint_dict)``; the model is in eval mode.
    """
    from fastnca.run import resolve_device
    from fastnca.vae import VNCA

    path = checkpoint_file(path)
    ckpt = read_checkpoint(path)
    cfg = checkpoint_config(ckpt, path)
    dev = resolve_device(device)
    if dev.type != "cuda" and cfg.backend == "triton":
        cfg = cfg.replace(backend="auto")
    model = VNCA(cfg)
    load_weights(model, ckpt["model"], path)
    bad = next((name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())), None)
    if bad is not None:  # every result of such a model is NaN or meaningless: refuse it before any work
        raise ValueError(
            f"checkpoint {str(path)!r}: parameter {bad} holds NaN or inf (the run diverged); `fastnca train` never "
            f"writes such a checkpoint: use one written before the divergence"
        )
    model.to(dev).eval()
    return model, ckpt


def no_checkpoint_message(out_dir: Path) -> str:
    """Why ``--resume`` of ``out_dir`` cannot work, and what to do instead."""
    path = out_dir / CHECKPOINT_NAME
    held = [n for n in (METRICS_NAME, "config.json") if (out_dir / n).is_file()]
    if held:  # a run started here and stopped (diverged, crashed, was killed) before its first checkpoint
        return (f"--resume: {str(out_dir)!r} holds a run that stopped before writing its first checkpoint (it has "
                f"{' and '.join(held)}, no {CHECKPOINT_NAME}): there is nothing to resume; start it again as a new "
                f"run: remove the folder's files (or choose another --out) and run without --resume")
    return f"--resume: no checkpoint at {str(path)!r}: nothing to resume; start a new run without --resume"
