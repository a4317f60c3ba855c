"""The rollout plan: a schedule of steps, the checkpoint policy applied to it once, and the masks drawn up front.

Plain PyTorch (no Triton), so the model (``fastnca/nca.py``), the memory model (``fastnca/memory.py``), the fused
rollout op (``kernels/rollout.py``) and the benchmarks all read the same decision.

A schedule is a list of per-step "double first" flags. The checkpoint policy is a segment length: the forward
stores the input of every ``segment``-th step, and the backward recomputes the inputs in between, one segment at a
time. ``step`` stores every step's input; ``none`` also keeps every step's activations, so the backward recomputes
nothing (the reference: autograd's saved tensors; the fused op: the blocks' inputs and activations, 2 nb + 1
planes of h per cell, which its backward main kernel would otherwise recompute from the step's input).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["RolloutPlan", "draw_masks", "parse_checkpoint", "plan_rollout", "rollout_flags", "POLICIES"]

POLICIES = "none, step, segments=k or auto"


def parse_checkpoint(policy: str, num_steps: int, doubling: bool) -> int:
    """The checkpoint policy as a segment length: 0 keeps everything ('none'), 1 is 'step', k is 'segments=k'.

    'auto': non-doubling rollouts keep the state every ~sqrt(T) steps (memory ~ 2 sqrt(T) states); doubling
    rollouts keep everything ('none'): on the reference its own behaviour, on the fused backend every step's
    activations, so its backward recomputes nothing (2 nb + 1 planes of h per cell, under half of what the
    reference keeps; 'step' keeps only the inputs, at about 3x the backward main kernel's tensor work,
    ``fastnca.memory.predict_peak_memory`` gives both). The policy means the same on both backends.

    Raises:
        ValueError: ``policy`` is not one of none, step, segments=k (k >= 1) or auto.
    """
    if not isinstance(policy, str):
        raise ValueError(f"checkpoint: expected {POLICIES}, got {policy!r}")
    if policy == "none":
        return 0
    if policy == "step":
        return 1
    if policy.startswith("segments="):
        k = policy.split("=", 1)[1]
        if not k.isdigit() or int(k) < 1:
            raise ValueError(f"checkpoint: expected segments=k with an integer k >= 1, got {policy!r}")
        return int(k)
    if policy == "auto":
        if not doubling:
            return max(1, round(math.sqrt(num_steps)))
        return 0
    raise ValueError(f"checkpoint: expected {POLICIES}, got {policy!r}")


def rollout_flags(doubling: bool, *, steps_per_stage: int = 8, n_doublings: int = 4,
                  num_steps: int | None = None) -> list[bool]:
    """A model's rollout as per-step "double first" flags.

    Doubling: M steps on the seed, then K x [double, M steps] (the doubling folded into each stage's first step).
    Non-doubling: ``num_steps`` plain steps.
    """
    if doubling:
        m = steps_per_stage
        return [False] * m + ([True] + [False] * (m - 1)) * n_doublings
    if num_steps is None:
        raise ValueError("num_steps: a non-doubling schedule needs the number of steps")
    return [False] * num_steps


@dataclass(frozen=True)
class RolloutPlan:
    """One rollout's schedule and what its forward stores.

    Attributes:
        flags: per step, whether it doubles the grid first.
        segment: the policy's segment length (0: keep everything, 1: every step's input, k: every k-th).
        policy: the policy as written ('auto', 'segments=5', ...).
    """

    flags: tuple[bool, ...]
    segment: int
    policy: str

    @property
    def num_steps(self) -> int:
        return len(self.flags)

    @property
    def keeps_activations(self) -> bool:
        """Whether the forward keeps every step's activations ('none'), so the backward recomputes nothing."""
        return self.segment == 0

    @property
    def stride(self) -> int:
        """Steps per stored input: 1 for 'none' and 'step', k for 'segments=k'."""
        return max(1, self.segment)

    def segments(self) -> list[tuple[int, int]]:
        """``[start, end)`` step ranges; the forward stores the input of each range's first step."""
        k, t = self.stride, self.num_steps
        return [(i, min(i + k, t)) for i in range(0, t, k)]

    @property
    def stored_inputs(self) -> tuple[int, ...]:
        """Steps whose input state the fused forward keeps for the backward."""
        return tuple(a for a, _ in self.segments())

    @property
    def stored_states(self) -> int:
        """States held at the fused backward's peak: the stored inputs plus one segment's recomputed inputs."""
        return len(self.stored_inputs) + (self.stride - 1 if self.stride > 1 else 0)

    def grids(self, height: int, width: int) -> list[tuple[int, int]]:
        """The output grid ``(H, W)`` of every step, from an input grid of ``height`` x ``width``."""
        out = []
        for double in self.flags:
            if double:
                height, width = 2 * height, 2 * width
            out.append((height, width))
        return out


def plan_rollout(flags: list[bool] | tuple[bool, ...] | int, policy: str, *, doubling: bool) -> RolloutPlan:
    """The plan of a rollout: ``flags`` (or a number of plain steps) under checkpoint ``policy``, for a model whose
    rollouts double the grid (``doubling``) or not; the same on both backends."""
    if isinstance(flags, int):
        flags = [False] * flags
    flags = tuple(bool(f) for f in flags)
    return RolloutPlan(flags, parse_checkpoint(policy, len(flags), doubling), policy)


def draw_masks(
    plan: RolloutPlan,
    batch: int,
    height: int,
    width: int,
    p_update: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> list[Tensor | None]:
    """Every step's update mask ``U(0, 1) < p_update``, ``(B, 1, H', W')`` bool, drawn up front (None when
    ``p_update >= 1``).

    Consecutive steps on the same grid draw their masks in one batch-major ``torch.rand`` call and one comparison
    (two launches per grid size, not two per step), written back to back in step order into one buffer;
    recomputation in the backward then sees exactly the same cells.
    """
    if not 0.0 < p_update <= 1.0:
        raise ValueError(f"p_update: expected a probability in (0, 1], got {p_update}")
    grids = plan.grids(height, width)
    if p_update >= 1.0:
        return [None] * len(grids)
    # every mask lies in one buffer, back to back in step order: the small-grid kernel reads a run of steps'
    # masks from one pointer (kernels/small_grid.py)
    flat = torch.empty(batch * sum(h * w for h, w in grids), dtype=torch.bool, device=device)
    masks: list[Tensor | None] = []
    i = off = 0
    while i < len(grids):
        j = i
        while j < len(grids) and grids[j] == grids[i]:
            j += 1
        h, w = grids[i]
        # batch-major draw, so a batch split over data-parallel ranks draws rows of one process's tensor
        # (fastnca.distributed.GlobalBatchDraws slices the leading dimension); the comparison writes each step's
        # (B, 1, H, W) mask contiguously into the buffer (the kernels read it as bytes without a copy)
        u = torch.rand((batch, j - i, 1, h, w), generator=generator, device=device)
        run = flat[off: off + (j - i) * batch * h * w].view(j - i, batch, 1, h, w)
        torch.lt(u.transpose(0, 1), p_update, out=run)
        masks.extend(run.unbind(0))
        off += (j - i) * batch * h * w
        i = j
    return masks
