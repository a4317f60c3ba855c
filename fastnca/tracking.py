"""Experiment tracking beside the JSONL log: TensorBoard scalars and growth images (``fastnca train --tensorboard``).

``metrics.jsonl`` stays the source of truth; a tracker only mirrors what the trainer writes there. The trainer
calls :meth:`TensorBoardTracker.log_row` with every row it writes (its ``tracker`` attribute, None by default)
and :meth:`TensorBoardTracker.close` at the end of ``fit``.

Tags: ``train/loss``, ``train/recon``, ``train/kl``, ``train/elbo``, ``train/grad_norm``, ``train/it_per_s``
(one point per logged train row); ``test/iwae`` (nats), ``test/bpd`` (one point per evaluation); and at each
evaluation an image ``growth``: 8 prior samples, one column per NCA step (as growth.png). Needs the
``tensorboard`` package (``pip install 'fastnca[tensorboard]'``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["TensorBoardTracker", "TRAIN_TAGS", "TEST_TAGS", "TENSORBOARD_DIR"]

TENSORBOARD_DIR = "tensorboard"
TRAIN_TAGS = ("loss", "recon", "kl", "elbo", "grad_norm", "it_per_s")
TEST_TAGS = ("iwae", "bpd")


class TensorBoardTracker:
    """Writes the trainer's metric rows to a TensorBoard event folder.

    Args:
        log_dir: the event folder (``OUT/tensorboard`` for ``fastnca train --tensorboard``).
        growth_every_eval: also log a growth image with every test row.
        seed: seeds the growth image's samples, so successive images show the same latents.

    Raises:
        ImportError: the tensorboard package is missing (the message says how to install it).
    """

    def __init__(self, log_dir: str | os.PathLike[str], *, growth_every_eval: bool = True, seed: int = 0) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError(
                "--tensorboard needs the tensorboard package: pip install tensorboard "
                "(or pip install 'fastnca[tensorboard]'); metrics.jsonl is written either way"
            ) from err
        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        self.growth_every_eval = growth_every_eval
        self.seed = seed

    def log_row(self, row: dict[str, Any], model: Any = None) -> None:
        """Mirror one metrics.jsonl row; with ``model``, a test row also logs a growth image."""
        step = int(row["step"])
        split = row.get("split")
        tags = TRAIN_TAGS if split == "train" else TEST_TAGS if split == "test" else ()
        for key in tags:
            value = row.get(key)
            if isinstance(value, (int, float)):
                self.writer.add_scalar(f"{split}/{key}", float(value), step)
        if split == "test" and model is not None and self.growth_every_eval:
            self.log_growth(model, step)
        self.writer.flush()

    @torch.no_grad()
    def log_growth(self, model: Any, step: int, n: int = 8) -> None:
        """An image ``growth``: ``n`` prior samples (rows), one column per NCA step, likelihood means."""
        from fastnca.figures import growth_sequence

        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        frames, _ = growth_sequence(model, n, generator=torch.Generator(device=device).manual_seed(self.seed))
        model.train(was_training)
        # (T+1, n, C, S, S) -> one (C, n S, (T+1) S) picture: rows are samples, columns steps
        stack = torch.stack([f.float().cpu() for f in frames])
        t1, _, c, s, _ = stack.shape
        image = stack.permute(2, 1, 3, 0, 4).reshape(c, n * s, t1 * s)
        self.writer.add_image("growth", image.clamp(0, 1), step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
