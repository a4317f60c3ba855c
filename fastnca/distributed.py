"""Data-parallel training and evaluation under ``torchrun``: DistributedDataParallel over ranks.

Usage (one process per device; ``torchrun`` sets RANK, LOCAL_RANK, WORLD_SIZE and the rendezvous)::

    torchrun --nproc-per-node 4 -m fastnca train --preset celeba-doubling --out runs/c4
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 --rdzv-id run1 \\
        -m fastnca train --preset celeba-nondoubling-256 --out /shared/runs/nd256
    torchrun --nproc-per-node 4 -m fastnca eval --checkpoint runs/c4 --k 128

What holds under ``torchrun`` (the trainer and ``evaluate_iwae`` call the hooks below; one process changes
nothing):

- rank = device: ``cuda:LOCAL_RANK`` with NCCL on CUDA, the CPU with gloo otherwise.
- ``batch_size`` is the **global** batch: each rank takes rows ``[r B/W, (r+1) B/W)`` of every global batch of
  the same global data order (the CPU data generator is seeded alike and advanced alike on every rank). A batch
  not divisible by the world size is refused; so is a pool not divisible by it (each rank keeps
  ``pool_size / W`` entries, so total memory is unchanged).
- the loss goes through the DDP-wrapped VNCA's forward, so DDP all-reduces each parameter bucket once per
  iteration (the whole rollout is inside one forward), overlapping the backward. Each rank's loss is the mean
  over its B/W rows; DDP averages the gradients over ranks, which with equal shards is the gradient of the
  global-batch mean loss, as in one process.
- randomness is global too: inside the forward, every draw from the training device generator whose leading
  dimension is a multiple of the local batch (the posterior noise, the update masks) is drawn at the global
  batch's size and the rank keeps its rows (:class:`GlobalBatchDraws`). Every rank's generators therefore stay
  equal to one process's, and W ranks follow one process's trajectory up to floating-point reduction order
  (the per-rank pool of non-doubling presets aside). The cost: each rank draws W times the noise, which is
  small next to the rollout.
- rank 0 alone writes metrics, pictures and checkpoints. A checkpoint is a one-process checkpoint (rank 0's
  RNG states, the pool of every rank concatenated) plus ``distributed``: the world size, every rank's RNG state
  and pool length, gathered, so that a resume with the same world size continues exactly. A resume with a
  different world size (one process included) warns that the trajectory changes and re-splits the pool.
- evaluation shards each test batch over ranks with the same global draws and all-reduces the IWAE sums.
- CUDA graphs are off under DDP (a line on rank 0 says so): capture and DDP's bucket hooks are not combined.
- failures: an exception on one rank ends that process with its message; torchrun then stops every other
  rank (they may be blocked in a collective). The process group also has a timeout
  (``$FASTNCA_DIST_TIMEOUT_S``, default 1800 s) after which a blocked collective raises.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.overrides import TorchFunctionMode

from fastnca.rng import set_rng_state

__all__ = [
    "DistContext",
    "GlobalBatchDraws",
    "ShardedLoss",
    "active",
    "setup",
    "shutdown",
    "check_config",
    "shard_bounds",
    "mean_over_ranks",
    "any_rank",
    "sum_over_ranks",
    "gather_checkpoint",
    "restore_rank_state",
    "TIMEOUT_ENV",
]

TIMEOUT_ENV = "FASTNCA_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class DistContext:
    """This process's place in the process group."""

    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def active() -> DistContext | None:
    """The process group's context when one with more than one rank is initialised, else None."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return None
    return DistContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        backend=str(dist.get_backend()),
    )


def setup(device: str | None) -> tuple[DistContext | None, str | None]:
    """Join the process group when launched by torchrun with WORLD_SIZE > 1; return it and this rank's device.

    Args:
        device: the command's ``--device`` (None or 'auto': CUDA when available). Under torchrun a CUDA device
            is ``cuda:LOCAL_RANK`` (an explicit index is refused: rank = device), the CPU uses gloo.

    Returns:
        ``(context, device)``; ``(None, device)`` unchanged in a single process.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None, device
    if dist.is_initialized():
        ctx = active()
        return ctx, device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want = str(device) if device is not None else "auto"
    use_cuda = want.startswith("cuda") or (want == "auto" and torch.cuda.is_available())
    if use_cuda:
        if ":" in want:
            raise ValueError(f"device: under torchrun each rank uses cuda:LOCAL_RANK; pass --device cuda, not {want!r}")
        if not torch.cuda.is_available() or local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"device: rank with LOCAL_RANK={local_rank} needs a CUDA device, "
                f"{torch.cuda.device_count()} visible; use --nproc-per-node <= the GPU count or --device cpu"
            )
        torch.cuda.set_device(local_rank)
        backend, device = "nccl", f"cuda:{local_rank}"
    else:
        backend, device = "gloo", "cpu"
    timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    return active(), device


def shutdown() -> None:
    """Leave the process group (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check_config(config: Any, ctx: DistContext | None) -> None:
    """Refuse a global batch (or pool) that the world size does not divide."""
    if ctx is None:
        return
    w = ctx.world_size
    if config.batch_size % w != 0:
        raise ValueError(
            f"batch_size: the global batch {config.batch_size} is not divisible by the world size {w}; "
            f"choose a multiple of {w} (each rank takes batch_size / world_size rows)"
        )
    if config.pool_size % w != 0:
        raise ValueError(
            f"pool_size: {config.pool_size} is not divisible by the world size {w}; "
            f"each rank keeps pool_size / world_size entries"
        )


def shard_bounds(n: int, ctx: DistContext | None) -> tuple[int, int]:
    """Rows ``[start, stop)`` of an ``n``-row batch for this rank: contiguous, sizes differing by at most 1."""
    if ctx is None:
        return 0, n
    base, extra = divmod(n, ctx.world_size)
    r = ctx.rank
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)


# ---------------------------------------------------------------------------------------------- randomness
def _size_of(args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[int, ...] | None:
    if "size" in kwargs:
        return tuple(kwargs["size"])
    if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)):
        return tuple(args[0])
    if args and all(isinstance(a, int) for a in args):
        return tuple(args)
    return None


class GlobalBatchDraws(TorchFunctionMode):
    """Draws from ``generator`` made at the global batch's size; this rank keeps its rows.

    Inside the mode, ``torch.randn`` / ``torch.rand`` with ``generator=generator`` and a leading dimension
    ``n * (stop - start)`` (``n`` blocks of this rank's rows, e.g. the IWAE's sample-major repeats) draw
    ``(n * global_rows, ...)`` instead and return block rows ``[start, stop)`` of each of the ``n`` blocks. One
    process draws exactly that global tensor, so every rank sees its rows of one process's numbers and its
    generator advances as one process's does. Other calls (``randint`` for T, other generators) pass through.
    """

    def __init__(self, generator: torch.Generator, start: int, stop: int, global_rows: int) -> None:
        super().__init__()
        self.generator = generator
        self.start, self.stop, self.global_rows = start, stop, global_rows

    def __torch_function__(self, func: Callable, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in (torch.randn, torch.rand) and kwargs.get("generator") is self.generator:
            size = _size_of(args, kwargs)
            local = self.stop - self.start
            if size and local > 0 and size[0] % local == 0:
                n = size[0] // local
                rest = {k: v for k, v in kwargs.items() if k != "size"}
                full = func((n * self.global_rows, *size[1:]), **rest)
                return full.view(n, self.global_rows, *size[1:])[:, self.start : self.stop].reshape(size)
        return func(*args, **kwargs)


class ShardedLoss:
    """The DDP-wrapped model's forward on this rank's rows, with the global batch's random draws.

    Called as the model: ``loss_module(x, beta=..., generator=..., ...)`` with ``x`` this rank's
    ``B / W`` rows of the global batch.
    """

    def __init__(self, model: torch.nn.Module, ctx: DistContext, generator: torch.Generator,
                 device: torch.device) -> None:
        from torch.nn.parallel import DistributedDataParallel

        self.ctx = ctx
        self.generator = generator
        ids = [device.index] if device.type == "cuda" else None
        # the 1x1 convolutions' weight gradients come out with channels-last strides; DDP then copies them into
        # its contiguous buckets (one copy of those weights per iteration) and warns on every rank: the copy is
        # cheap next to the rollout, the warning is noise
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        self.ddp = DistributedDataParallel(model, device_ids=ids, output_device=None if ids is None else ids[0])

    def __call__(self, x: Tensor, **kwargs: Any) -> Any:
        local = x.shape[0]
        start = self.ctx.rank * local
        with GlobalBatchDraws(self.generator, start, start + local, local * self.ctx.world_size):
            return self.ddp(x, **kwargs)


# ---------------------------------------------------------------------------------------------- collectives
def mean_over_ranks(values: Tensor, ctx: DistContext | None) -> Tensor:
    """The mean of ``values`` over ranks (a copy; unchanged in a single process)."""
    if ctx is None:
        return values
    out = values.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / ctx.world_size


def sum_over_ranks(values: Sequence[float], ctx: DistContext | None, device: torch.device) -> list[float]:
    """Sums of python numbers over ranks, in float64."""
    if ctx is None:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def any_rank(flag: bool, ctx: DistContext | None, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any (e.g. a time limit that ranks reach at different times)."""
    if ctx is None:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


# ---------------------------------------------------------------------------------------------- checkpoints
def gather_checkpoint(state: dict[str, Any], ctx: DistContext) -> dict[str, Any] | None:
    """Gather every rank's RNG state and pool shard into rank 0's checkpoint dict (a collective).

    Returns:
        On rank 0 the checkpoint: ``state`` with ``pool`` the shards concatenated in rank order (capacity
        summed) and ``distributed`` = {world_size, rng: every rank's, pool_lengths}; None on other ranks.
    """
    pool = state.get("pool")
    if pool is not None:
        pool = {k: (v.cpu() if isinstance(v, Tensor) else v) for k, v in pool.items()}
    mine = {"rng": state["rng"], "pool": pool}
    gathered: list[Any] | None = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(mine, gathered, dst=0)
    if not ctx.is_main:
        return None
    assert gathered is not None
    lengths = [0 if g["pool"] is None or g["pool"]["states"] is None else g["pool"]["states"].shape[0]
               for g in gathered]
    if pool is not None:
        shards = [g["pool"] for g in gathered if g["pool"] is not None and g["pool"]["states"] is not None]
        merged = {
            "capacity": sum(int(g["pool"]["capacity"]) for g in gathered),
            "images": torch.cat([s["images"] for s in shards]) if shards else None,
            "states": torch.cat([s["states"] for s in shards]) if shards else None,
        }
        state = {**state, "pool": merged}
    state["distributed"] = {
        "world_size": ctx.world_size,
        "rng": [g["rng"] for g in gathered],
        "pool_lengths": lengths,
    }
    return state


def restore_rank_state(trainer: Any, ckpt: dict[str, Any], ctx: DistContext | None,
                       log: Callable[[str], None] | None = None) -> None:
    """After ``Trainer.load_state_dict``: this rank's RNG state and pool shard, and the per-rank pool capacity.

    Same world size as at the checkpoint: exactly what this rank had. A different one (one process included):
    rank 0's RNG states and an even re-split of the pool, after a warning that the trajectory changes.
    """
    saved = ckpt.get("distributed") or {"world_size": 1}
    w_saved = int(saved["world_size"])
    w = 1 if ctx is None else ctx.world_size
    rank = 0 if ctx is None else ctx.rank
    cfg = trainer.cfg
    if w_saved != w:
        if log is not None and (ctx is None or ctx.is_main):
            log(
                f"warning: the checkpoint was written by {w_saved} process(es), resuming on {w}: the trajectory "
                "changes (reduction order; the pool is re-split over ranks); resume with the same world size to "
                "continue exactly"
            )
    elif w > 1:
        gens = {"gen": trainer.gen} if trainer.dev_gen is trainer.gen else {
            "gen": trainer.gen, "dev_gen": trainer.dev_gen}
        set_rng_state(saved["rng"][rank], gens)
    if cfg.pool_size <= 0:
        return
    pool = trainer.pool
    capacity = cfg.pool_size // w
    if pool.states is not None and pool.images is not None and (w > 1 or w_saved > 1):
        n = pool.states.shape[0]
        if w_saved == w:
            offsets = [0]
            for length in saved["pool_lengths"]:
                offsets.append(offsets[-1] + int(length))
            start, stop = offsets[rank], offsets[rank + 1]
        else:
            base, extra = divmod(n, w)
            start = rank * base + min(rank, extra)
            stop = start + base + (1 if rank < extra else 0)
        pool.images = pool.images[start:stop][:capacity]
        pool.states = pool.states[start:stop][:capacity]
    pool.capacity = capacity


def log_line(message: str, ctx: DistContext | None) -> None:
    """Print ``message`` to stderr on rank 0 (or in a single process)."""
    if ctx is None or ctx.is_main:
        print(message, file=sys.stderr)
