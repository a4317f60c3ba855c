"""Held-out evaluation: the importance-weighted bound over a test split (checkpoint files: fastnca.checkpoints).

The paper reports log p(x) as the importance-weighted bound with K = 128 samples on the test set (Burda et al.,
2015), in nats summed over all dimensions of the (padded) image, or in bits/dim = -nats / (H W C ln 2).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fastnca import distributed
from fastnca.data import to_model
from fastnca.graphs import iwae_graph_for

__all__ = ["evaluate_iwae"]

SUBSET_SEED = 0  # which test images a partial evaluation (batches > 0) uses: the same ones in every run
CHUNK_GRIDS = 256  # VNCA.iwae's default chunk decodes about this many grids at once


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
