"""Held-out evaluation and checkpoint loading: the importance-weighted bound over a test split.

The paper reports log p(x) as the importance-weighted bound with K = 128 samples on the test set (Burda et al.,
2015), in nats summed over all dimensions of the (padded) image, or in bits/dim = -nats / (H W C ln 2).
"""

from __future__ import annotations

import math
import os
import pickle
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fastnca import distributed
from fastnca.config import Config
from fastnca.data import to_model
from fastnca.graphs import iwae_graph_for

__all__ = [
    "evaluate_iwae",
    "read_checkpoint",
    "checkpoint_config",
    "checkpoint_file",
    "load_weights",
    "load_checkpoint",
    "resolve_device",
    "CHECKPOINT_NAME",
]

CHECKPOINT_NAME = "checkpoint.pt"
SUBSET_SEED = 0  # which test images a partial evaluation (batches > 0) uses: the same ones in every run
CHUNK_GRIDS = 256  # VNCA.iwae's default chunk decodes about this many grids at once


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' (or None) is CUDA when available, else the CPU; anything but auto, cpu, cuda, cuda:N is refused.

    A CUDA device is made the process's current one (``torch.cuda.set_device``): CUDA graphs capture on a stream
    of the current device and Triton launches there, so ``--device cuda:1`` must not leave ``cuda:0`` current."""
    if device is None or str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected auto, cpu, cuda or cuda:N, got {str(device)!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {str(device)!r} was asked for but CUDA is not available here; use --device cpu")
        if dev.index is None:  # an explicit index, so generator and tensor devices compare equal
            dev = torch.device("cuda", torch.cuda.current_device())
        elif dev.index != torch.cuda.current_device():
            torch.cuda.set_device(dev)
    return dev


@torch.no_grad()
def evaluate_iwae(
    model: Any,
    images: Tensor,
    *,
    k: int,
    batch_size: int,
    batches: int = 0,
    seed: int = 0,
    progress: bool = False,
    desc: str = "eval",
    on_first_batch: Callable[[float, int], None] | None = None,
    steps: str | None = None,
) -> dict[str, float]:
    """The importance-weighted bound on log p(x), averaged over held-out images.

    Args:
        model: a VNCA (``.iwae``, ``.bits_per_dim``, ``.config``).
        images: ``(N, C, H, W)`` uint8 test images (the model's data domain is applied here).
        k: importance samples per image (the paper: 128).
        batch_size: images per batch.
        batches: how many batches to use; 0 means the whole split. A partial evaluation uses a fixed random
            subset of ``batches * batch_size`` images (the same in every run and for every model).
        seed: seeds the evaluation's own generator, so that evaluation never moves the training RNG streams.
        progress: show a tqdm bar.
        on_first_batch: called once with the seconds of one batch and the number of batches (to warn about a
            long evaluation): where a batch decodes more than one chunk of grids, before the first batch with an
            estimate timed on one chunk of the first image (its own generator: the result does not change);
            otherwise after the first batch, with its time.
        steps: a non-doubling model's T in the bound, 'image' or 'sample' (``VNCA.iwae``); None: the model
            config's ``iwae_steps``.

    Under torchrun (a process group of W > 1 ranks) every rank calls this: each test batch is split over the
    ranks, each rank draws one process's random numbers for the whole batch and keeps its rows
    (:class:`fastnca.distributed.GlobalBatchDraws`), and the sums are all-reduced, so every rank returns one
    process's result (up to float reduction order). CUDA graphs are not used then. The exception: a non-doubling
    model with ``p_update < 1``, whose rows grow in groups of equal T (``NCA.run_per_row``), draws its update masks
    per group and rank, so its result is the same bound with other draws, not one process's numbers.

    Returns:
        dict with iwae (mean nats per image), bpd (bits/dim), k, n_images, and iwae_steps for a non-doubling
        model.

    Raises:
        ValueError: an evaluation over zero images (an empty split, ``batch_size`` < 1, ``batches`` < 0) or k < 1.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size: expected an integer >= 1 images per evaluation batch, got {batch_size}")
    if batches < 0:
        raise ValueError(f"batches: expected an integer >= 0 (0: the whole split), got {batches}")
    if k < 1:
        raise ValueError(f"k: expected an integer >= 1 importance samples, got {k}")
    n = images.shape[0]
    if n == 0:
        raise ValueError("evaluation: the test split holds no images; a bound over zero images means nothing")
    # a non-doubling VNCA's T per image or per sample; other models have no random T and get no steps argument
    random_t = not getattr(getattr(model, "nca", None), "doubling", True)
    steps = steps or getattr(model.config, "iwae_steps", "image")
    t_kw = {"steps": steps} if random_t else {}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    n_batches = math.ceil(n / batch_size)
    if 0 < batches < n_batches:
        # a subset: a fixed random one, since test splits can be ordered (binarized MNIST's test set is sorted
        # by class, so its first images are all zeros)
        n_batches = batches
        subset = torch.randperm(n, generator=torch.Generator().manual_seed(SUBSET_SEED))[: n_batches * batch_size]
        images = images[subset.sort().values]
    ctx = distributed.active()
    # CUDA: captured per batch shape for fixed-schedule models, else None (and None under torchrun)
    graph = iwae_graph_for(model) if ctx is None else None
    total, count = 0.0, 0
    show = progress and (ctx is None or ctx.is_main)
    first_rows = min(batch_size, n) if ctx is None else max(1, min(batch_size, n) // ctx.world_size)
    if on_first_batch is not None and first_rows * k > CHUNK_GRIDS:
        # the first batch alone may take minutes: estimate it on one chunk of one image before starting
        x = to_model(images[:1], model.config.likelihood, device=device)
        own = torch.Generator(device=device).manual_seed(seed + 1)
        chunk = min(k, CHUNK_GRIDS)
        t0 = time.perf_counter()
        model.iwae(x, chunk, chunk=chunk, generator=own, **t_kw)
        on_first_batch((time.perf_counter() - t0) * first_rows * k / chunk, n_batches)
        on_first_batch = None
    bar = tqdm(range(n_batches), desc=desc, unit="batch", disable=not show, leave=False)
    t0 = time.perf_counter()
    for i in bar:
        batch = images[i * batch_size : (i + 1) * batch_size]
        if ctx is None:
            x = to_model(batch, model.config.likelihood, device=device)
            log_px = model.iwae(x, k, generator=generator, **t_kw) if graph is None else graph(x, k, generator)
        else:
            start, stop = distributed.shard_bounds(batch.shape[0], ctx)
            if stop == start:  # a last batch with fewer images than ranks
                continue
            x = to_model(batch[start:stop], model.config.likelihood, device=device)
            # one process's chunking of this batch (VNCA.iwae's default for the whole batch), so the draws match
            chunk = max(1, min(k, 256 // batch.shape[0]))
            with distributed.GlobalBatchDraws(generator, start, stop, batch.shape[0]):
                log_px = model.iwae(x, k, chunk=chunk, generator=generator, **t_kw)
        total += log_px.double().sum().item()
        count += x.shape[0]
        bar.set_postfix(nats=f"{total / count:.2f}")
        if i == 0 and on_first_batch is not None:
            on_first_batch(time.perf_counter() - t0, n_batches)
    model.train(was_training)
    if ctx is not None:
        total, n = distributed.sum_over_ranks([total, count], ctx, device)
        count = int(round(n))
    nats = total / count  # count > 0: an evaluation over zero images was refused above
    res = {"iwae": nats, "bpd": float(model.bits_per_dim(nats)), "k": k, "n_images": count}
    if random_t:
        res["iwae_steps"] = steps
    return res


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
