"""The early steps of a rollout in one launch each way: persistent kernels for grids that fit on chip.

In the doubling presets most steps run on grids far too small to fill a GPU (mnist-doubling, B = 32: 24 of its 40
steps on 2x2, 4x4 and 8x8 grids, i.e. 1, 4 and 16 programs of 128 cells on 132 SMs), and each such step still
costs a whole launch and one program's latency. Here one launch runs every one of those steps:

- each program owns whole samples (``spp`` of them, consecutive), so a step's 3x3 neighbourhoods never leave the
  program: no program waits for another, and the steps follow each other inside the program, separated by a
  barrier (``tl.debug_barrier``: every thread's stores of step s are visible to every thread of the program before
  step s + 1 reads them);
- a step is :func:`stages.step_cells`, the per-step kernel's own body (doubling folded into the reads as
  there), run over the program's cells in tiles of ``BLOCK_M``;
- each step's output is written once, into the rollout's buffer of stored states (the backward needs every one of
  these inputs anyway), and read back by the next step from L1/L2: a sample's state at 8x8 x 256 channels in
  bf16 is 32 KiB.

The backward of those steps is the per-step one (``kernels/rollout.py``): a small-grid backward measured slower
than it on an H100 and was removed (benchmarks/ARCHIVE.md).

The doubling flag is a runtime bit per step (``flags``), so one compiled kernel runs any schedule: the step body
reads its input through ``(row >> shift, col >> shift)`` with the step's bit as the shift (one inlined body; two,
one per variant, doubled the shared memory and spilled). Masks, when the rollout has them, are read from one flat
buffer holding every step's ``(B, H, W)`` mask in step order.

The cut-off (:data:`SMALL_GRID_CELLS`) and the samples per program (:func:`samples_per_program`) are set by
compile fit here; the forward measured 1.78x faster than the per-step launches it replaces on an H100
(benchmarks/RESULTS.md). The per-step path stays, and ``nca_rollout(..., small_grid=False)`` selects it.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from .nca_step import fwd_constexprs, fwd_weight_args
from .spec import KernelSpec
from .stages import step_cells
from .tiles import StepConfig, small_config

__all__ = ["SMALL_GRID_CELLS", "samples_per_program", "small_config", "small_fwd_kernel_spec", "small_grid_steps"]

# Steps whose output grid has at most this many cells per sample run in the small-grid kernels: 8 x 8, so one
# sample is at most one tile (64 or 128 cells; mnist-doubling: the 2x2, 4x4 and 8x8 stages, 24 of 40 steps).
SMALL_GRID_CELLS = 64
# Programs the small-grid kernel aims for: an H100 has 132 SMs; a program per sample up to that many samples.
TARGET_PROGRAMS = 132


@triton.jit
def _rollout_fwd_small_kernel(
    z_ptr,  # (B, H0, W0, C) the first step's input, channels-last, compute dtype
    keep_ptr,  # flat: outputs of steps 0 .. n-2 in step order, each (B, H_s, W_s, C) (= inputs of steps 1 .. n-1)
    last_ptr,  # (B, H, W, C) the last step's output
    mask_ptr,  # flat uint8: every step's (B, H_s, W_s) update mask in step order (read only when HAS_MASK)
    w3_ptr, b3_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, wout_ptr, bout_ptr,  # packed as for _nca_step_fwd_kernel
    acts_ptr,  # out, STORE_ACTS only: every step's activation planes in step order (as _nca_step_fwd_kernel's)
    B,  # samples
    H0,  # the first step's input grid height
    W0,  # and width
    n_steps,  # steps run by this launch (>= 1)
    flags,  # bit s set: step s doubles its input first
    spp,  # samples per program
    C: tl.constexpr,
    HID: tl.constexpr,
    N_BLOCKS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_B3: tl.constexpr,
    HAS_B1: tl.constexpr,
    HAS_B2: tl.constexpr,
    HAS_BOUT: tl.constexpr,
    PERCEIVE_ELU: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    W_KMAJOR: tl.constexpr,
    UNCHAIN: tl.constexpr,
    STORE_ACTS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``n_steps`` NCA steps of samples ``[pid * spp, pid * spp + spp)``, one after the other.

    Grid: ``(cdiv(B, spp),)``. Per step: the output grid (doubled when the step's flag is set), the program's cells
    ``[b_lo * H * W, b_hi * H * W)`` (contiguous: cells are flattened over (B, H, W)) in tiles of ``BLOCK_M``, each
    tile the per-step kernel's body; then a barrier, and the output becomes the next step's input.
    """
    pid = tl.program_id(0).to(tl.int64)
    b_lo = pid * spp
    b_hi = tl.minimum(b_lo + spp, B)
    h = H0
    w = W0
    src = z_ptr
    batch = pid * 0 + B  # int64
    keep_off = pid * 0  # element offset of step s's output in keep (int64)
    mask_off = pid * 0  # cell offset of step s's mask
    act_off = pid * 0  # element offset of step s's activation planes in acts
    for s in range(n_steps):
        shift = (flags >> s) & 1  # 1: this step doubles its input first
        h = h << shift
        w = w << shift
        hw = h * w
        if s == n_steps - 1:
            dst = last_ptr
        else:
            dst = keep_ptr + keep_off
        lo = b_lo * hw
        hi = b_hi * hw
        for m0 in range(lo, hi, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            step_cells(src, dst, mask_ptr + mask_off, w3_ptr, b3_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, wout_ptr,
                        bout_ptr, acts_ptr + act_off, batch * hw * HID, offs_m, offs_m < hi, h, w, C, HID, N_BLOCKS,
                        shift, HAS_MASK, HAS_B3, HAS_B1, HAS_B2, HAS_BOUT, PERCEIVE_ELU, INPUT_PRECISION, UPCAST_DOT,
                        W_KMAJOR, UNCHAIN, STORE_ACTS, BLOCK_M, BLOCK_K, BLOCK_N)
        tl.debug_barrier()  # step s's stores, by every thread of the program, before step s + 1 reads them
        src = dst
        keep_off += batch * hw * C
        mask_off += batch * hw
        act_off += (2 * N_BLOCKS + 1) * batch * hw * HID


def small_grid_steps(flags: tuple[bool, ...] | list[bool], height: int, width: int,
                     max_cells: int = SMALL_GRID_CELLS) -> int:
    """How many leading steps of a schedule the small-grid kernel runs: those whose output grid has at most
    ``max_cells`` cells per sample (0 when fewer than two steps qualify: one step gains nothing)."""
    n = 0
    for double in flags:
        if double:
            height, width = 2 * height, 2 * width
        if height * width > max_cells:
            break
        n += 1
    return n if n >= 2 else 0


def samples_per_program(batch: int, cells: int, block_m: int, target_programs: int = TARGET_PROGRAMS) -> int:
    """Samples per program of the small-grid kernel, from the batch and the cells per sample of its largest step.

    A step's latency is about one tile's whatever its fill, so a program per sample while the batch gives at most
    ``target_programs`` programs; beyond that, as many samples per program as make the programs about that many,
    but never more than fill one ``block_m`` tile at the largest grid (more would add a tile per step).
    """
    if batch <= target_programs:
        return 1
    return max(1, min(triton.cdiv(batch, target_programs), block_m // max(cells, 1)))


def small_fwd_constexprs(step_consts: dict[str, Any]) -> dict[str, Any]:
    """The kernel's constexprs from the per-step forward's (``nca_step.fwd_constexprs``): all but ``DOUBLE``,
    which is a runtime bit per step here."""
    return {k: v for k, v in step_consts.items() if k != "DOUBLE"}


def launch_small_fwd(p: dict[str, Tensor | None], consts: dict[str, Any], cfg: StepConfig, z0: Tensor, keep: Tensor,
                     last: Tensor, masks: Tensor | None, flags: tuple[bool, ...], batch: int, height: int, width: int,
                     spp: int, acts: Tensor | None = None) -> None:
    """Run ``len(flags)`` steps from ``z0`` (``(B, H0, W0, C)``); step outputs go to ``keep`` (flat, step order)
    and the last one to ``last``. ``p``: packed weights (``nca_step.pack_weights``); ``consts``: the per-step
    forward's constexprs for these weights (``DOUBLE`` is ignored); ``masks``: flat uint8, every step's mask in
    step order, or None; ``acts``: where ``consts["STORE_ACTS"]``, every step's activation planes in step order."""
    bits = sum(1 << i for i, f in enumerate(flags) if f)
    _rollout_fwd_small_kernel[(triton.cdiv(batch, spp),)](
        z_ptr=z0, keep_ptr=keep, last_ptr=last, mask_ptr=p["w3"] if masks is None else masks,
        **fwd_weight_args(p, consts["W_KMAJOR"]), acts_ptr=keep if acts is None else acts, B=batch, H0=height,
        W0=width, n_steps=len(flags), flags=bits, spp=spp,
        **small_fwd_constexprs(consts), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


# ------------------------------------------------------------------------------------------------------ fit
def small_fwd_kernel_spec(state_channels: int, hidden_channels: int, n_blocks: int, dtype: torch.dtype, *,
                          input_precision: str = "ieee", bias: bool = True, out_bias: bool = True, mask: bool = False,
                          store_acts: bool = False, config: StepConfig | None = None) -> KernelSpec:
    """The small-grid forward as ``nca_rollout`` launches it on the GPU for these shapes (for the sm_90 fit)."""
    cfg = config or small_config(state_channels, hidden_channels, dtype, input_precision=input_precision,
                                 store_acts=store_acts, interpret=False)
    if cfg is None:
        raise ValueError(f"small_fwd_kernel_spec: no small-grid tile for {dtype} / {input_precision} at h = "
                         f"{hidden_channels} (those shapes run per step)")
    t = "*bf16" if dtype == torch.bfloat16 else "*fp32"
    hp = triton.next_power_of_2(hidden_channels)
    consts = small_fwd_constexprs(fwd_constexprs(
        state_channels, hp, n_blocks, double=False, has_mask=mask, has_b3=bias, has_b1=bias and n_blocks > 0,
        has_b2=bias and n_blocks > 0, has_bout=out_bias, input_precision=input_precision, upcast_dot=False,
        dtype=dtype, cfg=cfg, store_acts=store_acts))
    fn = _rollout_fwd_small_kernel
    ptrs = {"z_ptr": t, "keep_ptr": t, "last_ptr": t, "mask_ptr": "*u8", "w3_ptr": t, "b3_ptr": "*fp32",
            "w1_ptr": t, "b1_ptr": "*fp32", "w2_ptr": t, "b2_ptr": "*fp32", "wout_ptr": t, "bout_ptr": "*fp32",
            "acts_ptr": t}
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "i32") for n in fn.arg_names}
    return KernelSpec("small-fwd-store" if store_acts else "small-fwd", fn, sig, consts, cfg.num_warps,
                      cfg.num_stages)
