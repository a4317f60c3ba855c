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

__all__ = ["RolloutPlan", "batch_cell_elems", "draw_masks", "parse_checkpoint", "plan_rollout", "rollout_flags",
           "POLICIES", "WGRADS", "WGRAD_BATCH_BYTES", "WGRAD_MAX_STEPS"]

POLICIES = "none, step, segments=k or auto"

# The fused backward's two designs of the weight gradients (kernels/rollout.py, kernels/wgrad.py):
# 'per-step': the post kernel runs each step's state gradient and weight-gradient GEMMs in one launch (K = the
# step's cells); 'batched': per step the main kernel and a state-gradient-only launch, and after a batch of steps
# one launch of split-K GEMMs over all of the batch's cells (a Triton GEMM that walks the steps);
# 'batched-cublas': the same, with the 1x1 weights' GEMMs in cuBLAS (torch ops) over the batch's rows gathered
# into one operand each. 'per-step' stays the default until a GPU measures a batched design faster
# (benchmarks/RESULTS.md, "Batched weight gradients": the rule that picks each preset's default).
WGRADS = ("per-step", "batched", "batched-cublas")
# The batch buffers' cap (bytes): the per-cell gradients (and, when the backward recomputes, the activations) of the
# batch's steps. 2 GiB holds the whole mnist-doubling rollout at B = 32 in bf16 (1.8 GB: one batch, K = 349,184
# cells) and one step of celeba-nondoubling-256 (1.2 GB: 123k cells a step, already a long K), so its memory stays
# what the per-step design needs.
WGRAD_BATCH_BYTES = 2 * 2**30
# Steps per batch at most: the GEMM kernel reads the batch's doubling flags as the bits of one int64.
WGRAD_MAX_STEPS = 63


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
        wgrad: the fused backward's weight-gradient design (:data:`WGRADS`).
        wgrad_batch_bytes: 'batched*': the cap of the batch buffers, in bytes (:meth:`wgrad_batches`).
    """

    flags: tuple[bool, ...]
    segment: int
    policy: str
    wgrad: str = "per-step"
    wgrad_batch_bytes: int = WGRAD_BATCH_BYTES

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

    @property
    def batched_wgrad(self) -> bool:
        """Whether the backward batches the weight gradients over steps (a 'batched*' design)."""
        return self.wgrad != "per-step"

    def wgrad_batches(self, step_bytes: list[int]) -> list[tuple[int, int]]:
        """The batches of steps whose weight gradients the 'batched*' designs compute together, ``[start, end)``
        step ranges, last first (the backward's order), given the batch buffers' bytes of each step.

        A batch is the longest run of consecutive steps, walking back from the last, whose bytes add up to at most
        the cap (``wgrad_batch_bytes``; one step at least, however large), of at most :data:`WGRAD_MAX_STEPS` steps,
        inside one of the plan's segments when the backward recomputes segments (``segments=k``, k > 1: their
        recomputed inputs live only while the segment is walked). One rule for the backward and the memory model.
        """
        if len(step_bytes) != self.num_steps:
            raise ValueError(f"step_bytes: expected {self.num_steps} (one per step), got {len(step_bytes)}")
        cap = self.wgrad_batch_bytes
        bounds = [(a, b) for a, b in self.segments()] if self.stride > 1 else [(0, self.num_steps)]
        out = []
        for start, end in reversed(bounds):
            hi = end
            while hi > start:
                lo, total = hi - 1, step_bytes[hi - 1]
                while lo > start and hi - lo < WGRAD_MAX_STEPS and total + step_bytes[lo - 1] <= cap:
                    lo -= 1
                    total += step_bytes[lo]
                out.append((lo, hi))
                hi = lo
        return out

    def grids(self, height: int, width: int) -> list[tuple[int, int]]:
        """The output grid ``(H, W)`` of every step, from an input grid of ``height`` x ``width``."""
        out = []
        for double in self.flags:
            if double:
                height, width = 2 * height, 2 * width
            out.append((height, width))
        return out


def batch_cell_elems(c: int, hp: int, n_blocks: int, *, recompute: bool) -> int:
    """Elements per cell of the batched designs' batch buffers (``kernels/wgrad.py``): ``da`` and ``dy``
    (``max(nb, 1)`` planes of hp each), ``g`` (|z|), ``dpre`` (hp), and, when the backward recomputes the activations
    (any policy but 'none'), those too (``2 nb + 1`` planes of hp). The backward and ``fastnca.memory`` read it."""
    return 2 * max(n_blocks, 1) * hp + c + hp + ((2 * n_blocks + 1) * hp if recompute else 0)


def plan_rollout(flags: list[bool] | tuple[bool, ...] | int, policy: str, *, doubling: bool, wgrad: str = "per-step",
                 wgrad_batch_bytes: int = WGRAD_BATCH_BYTES) -> RolloutPlan:
    """The plan of a rollout: ``flags`` (or a number of plain steps) under checkpoint ``policy``, for a model whose
    rollouts double the grid (``doubling``) or not; the same on both backends (``wgrad`` and ``wgrad_batch_bytes``:
    the fused backward's weight-gradient design and its batch cap, :class:`RolloutPlan`; the reference ignores
    them).

    Raises:
        ValueError: a policy outside the grammar, a ``wgrad`` not in :data:`WGRADS`, a cap below 1 byte.
    """
    if isinstance(flags, int):
        flags = [False] * flags
    flags = tuple(bool(f) for f in flags)
    if wgrad not in WGRADS:
        raise ValueError(f"wgrad: expected one of {WGRADS}, got {wgrad!r}")
    if isinstance(wgrad_batch_bytes, bool) or not isinstance(wgrad_batch_bytes, int) or wgrad_batch_bytes < 1:
        raise ValueError(f"wgrad_batch_bytes: expected an integer >= 1 (bytes), got {wgrad_batch_bytes!r}")
    return RolloutPlan(flags, parse_checkpoint(policy, len(flags), doubling), policy, wgrad, wgrad_batch_bytes)


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
