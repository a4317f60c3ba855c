"""Launching the shipped tiles on GPUs with less shared memory per block than the H100.

The tiles of ``step_config`` / ``bwd_config`` / ``post_config`` are sized for the H100 (sm_90, 227 KiB of shared
memory per block) and checked there by the sm_90 fit. Other GPUs allow less: 163 KiB on the A100 (sm_80), 99 KiB on
the sm_86 / sm_89 / sm_120 cards (RTX 30xx / 40xx / 50xx, A10, A40, L4, L40S). Compiled for sm_86, 18 of the 161
shipped kernels need more than 99 KiB, among them the 256-channel forward of every precision (bf16: 144 KiB) and the
bf16 backward main kernel (108 KiB) (``python -m tools.fit --only small-smem`` lists them). Triton checks
a compiled kernel's shared memory against the device's limit before it launches it and raises ``OutOfResources``
without launching anything, so :func:`launch_fitting` tries the shipped tile first and, where it does not fit,
smaller ones (:func:`smaller_tiles`: fewer pipeline stages, then narrower channel chunks, then fewer cells per
program), and remembers per launch site and device which one ran. On the H100 the first candidate always fits (the
fit tests assert it), so nothing changes there.

Stages, cells per program and the forward's output-channel chunks leave every sum's order as it is; the backward
main kernel's state-channel chunk groups its output-conv sums differently (last bits). On a given GPU the same
candidate runs every time, so runs stay bitwise repeatable there.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from triton.runtime import OutOfResources

__all__ = ["fewer_stages", "launch_fitting", "on_input_device", "smaller_tiles"]

C = TypeVar("C")
F = TypeVar("F", bound=Callable[..., Any])

# (launch site, its specialisation, device) -> index of the first candidate that launched there
_FITTING: dict[tuple[Any, ...], int] = {}


def _replace(cfg: C, **changes: Any) -> C:
    return dataclasses.replace(cfg, **changes) if dataclasses.is_dataclass(cfg) else cfg._replace(**changes)


def smaller_tiles(cfg: C, stages: str, halve: Sequence[str] = (), caps: Sequence[str] = (), floor: int = 16) -> list[C]:
    """``cfg``, then ``cfg`` with one pipeline stage fewer at a time down to 1 (field ``stages``; the per-loop
    stage fields ``caps`` capped at it), then, at 1 stage, each field of ``halve`` in turn halved down to ``floor``.
    Each candidate is smaller than the one before."""
    out = [cfg]
    while getattr(cfg, stages) > 1:
        n = getattr(cfg, stages) - 1
        cfg = _replace(cfg, **{stages: n},
                       **{c: min(getattr(cfg, c), n) for c in caps if getattr(cfg, c) is not None})
        out.append(cfg)
    for name in halve:
        while getattr(cfg, name) > floor:
            cfg = _replace(cfg, **{name: getattr(cfg, name) // 2})
            out.append(cfg)
    return out


def fewer_stages(stages: str) -> Callable[[C], list[C]]:
    """The candidates of a kernel whose tiles fit as shipped on the GPUs measured (``fit.fit_fallback``): fewer
    pipeline stages only (field ``stages``), for GPUs or Triton releases with less room still."""
    return lambda cfg: smaller_tiles(cfg, stages)


def launch_fitting(key: tuple[Any, ...], cfg: C, smaller: Callable[[C], Sequence[C]],
                   launch: Callable[[C], None]) -> C:
    """Run ``launch`` with ``cfg`` or, where the GPU cannot run that, with the first of ``smaller(cfg)`` (``cfg``
    first, then smaller tiles) it can run; return the tiles that ran.

    ``key`` names the launch site and what its kernel's shared memory depends on (tile, dtype, flags, device); where
    ``cfg`` did not fit, the index that ran is remembered under it, so later launches start there. A candidate that
    needs more shared memory than the device has raises Triton's ``OutOfResources`` before anything is launched, and
    the next one is tried. Where ``cfg`` fits (the H100) the candidates are never built.
    """
    start = _FITTING.get(key, 0)
    err: OutOfResources | None = None
    if start == 0:
        try:
            launch(cfg)
            return cfg
        except OutOfResources as e:
            err, start = e, 1
    candidates = smaller(cfg)
    for i in range(start, len(candidates)):
        try:
            launch(candidates[i])
        except OutOfResources as e:
            err = e
            continue
        _FITTING[key] = i
        return candidates[i]
    raise RuntimeError(
        f"fastnca.kernels: none of the {len(candidates)} tilings of this kernel fits the GPU ({err}); the reference "
        "backend (backend='torch') runs on any GPU"
    ) from err


def on_input_device(fn: F) -> F:
    """Run ``fn`` with the device of its first CUDA tensor argument current.

    Triton launches a kernel on the current CUDA device, whatever device its tensors are on: a model moved to
    ``cuda:1`` in a process whose current device is ``cuda:0`` (``fastnca train --device cuda:1``) would have its
    kernels launched on ``cuda:0`` with ``cuda:1`` pointers. The entry points that launch (``nca_step_fwd``,
    ``nca_step_bwd``, the rollout's forward and backward, the likelihood's) switch to their inputs' device first.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        for a in itertools.chain(args, kwargs.values()):
            if isinstance(a, torch.Tensor) and a.is_cuda:
                with torch.cuda.device(a.device):
                    return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
