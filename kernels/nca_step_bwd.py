"""Fused Triton backward of one NCA step ``z' = z + m * f(z)``: the state gradient and every weight gradient.

Layout: the state is ``(B, C, H, W)`` at the API and channels-last in memory (``torch.channels_last``,
physically ``(B, H, W, C)``); the returned state gradient is channels-last too. The update network f is the one
in ``kernels/reference.py``: a 3x3 perception conv with zero padding (|z| -> h), an ELU only when there are no
residual blocks, ``n_blocks`` residual 1x1 blocks ``y + W2 ELU(W1 y + b1) + b2`` and an output 1x1 conv
(h -> |z|). With ``double=True`` the input is the half-resolution state, read through the nearest-neighbour
map ``(row // 2, col // 2)``; the mask, the upstream gradient and every activation live on the doubled grid.

Three kernels (design, buffers and fit numbers in ``kernels/BACKWARD.md``):

1. ``_nca_step_bwd_kernel``, one program per ``BLOCK_M`` cells: recomputes the forward on chip (perception
   conv, then each block, writing each block's input ``y_i`` and activation ``u_i = ELU(a_i)`` to per-cell buffers),
   then backpropagates ``g = m * grad_out`` through the output conv and the blocks in reverse, writing each
   block's output gradient ``dy_{i+1}``, ``da_i``, ``g`` and the perception conv's output gradient ``dpre``.
2. ``_nca_step_bwd_dstate_kernel``, one program per ``BLOCK_M`` input cells: the state gradient, ``grad_out``
   (identity path, summed over each 2x2 block when doubling) plus the transposed 3x3 conv of ``dpre``, which
   gathers the neighbours' ``dpre`` (the doubling's 2x2 sum is folded into a 4x4 effective kernel).
3. ``_nca_step_bwd_wgrad_kernel``: every weight gradient is a GEMM over cells, ``dW = A^T B`` with A and B
   per-cell buffers (B gathered from the shifted state for the 3x3 conv). The cells are cut into a fixed number
   of splits that depends only on the shapes; each program writes its fp32 partial tile and torch sums the
   partials over splits. No atomics: the result is bitwise the same on every run.

Dtype policy: the state is fp32 or bf16 and sets the compute dtype; weights (fp32 or bf16) are packed once per
call into it, biases into fp32. Dots accumulate in fp32 (fp32 operands with ``input_precision`` "ieee" or
"tf32"); the per-cell buffers hold the compute dtype; weight gradients are accumulated in fp32 and returned in
each weight's own dtype.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from .checks import TL_DTYPE, check_inputs
from .launch import fewer_stages, launch_fitting, on_input_device, smaller_tiles
from .reference import UpdateWeights
from .spec import KernelSpec
from .stages import colsum_tile, dstate_tile, main_cells, wgrad_tile_ids
from .tiles import BwdConfig, bwd_config, chunk, interpreting, split_cells, splits
from .utils import (
    k_major,
    mma,
    unchain,
)

__all__ = ["BwdConfig", "bwd_config", "bwd_kernel_specs", "main_kernel", "nca_step_bwd"]





# --------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _nca_step_bwd_kernel(
    z_ptr,  # (B, H_in, W_in, C) input state, channels-last, compute dtype
    gout_ptr,  # (B, H, W, C) upstream gradient dL/dz', channels-last, compute dtype
    mask_ptr,  # (B, H, W) uint8 update mask (read only when HAS_MASK)
    # weights (W_KMAJOR: each pointer takes the other layout of its pair, K-major for the dot that reads it):
    w3_ptr,  # (9, C, HID) perception weight, [tap, c, o] = Wp[o, c, ky, kx], tap = 3 ky + kx; W_KMAJOR: [tap, o, c]
    b3_ptr,  # (HID,) fp32 perception bias (read only when HAS_B3)
    w1t_ptr,  # (N_BLOCKS, HID, HID) [blk, k, n] = W1[n, k] (forward operand); W_KMAJOR: [blk, n, k]
    w1_ptr,  # (N_BLOCKS, HID, HID) [blk, n, k] = W1[n, k] (backward operand); W_KMAJOR: [blk, k, n]
    b1_ptr,  # (N_BLOCKS, HID) fp32, zeros for a block without bias
    w2t_ptr,  # (N_BLOCKS, HID, HID) [blk, k, n] = W2[n, k]; W_KMAJOR: [blk, n, k]
    w2_ptr,  # (N_BLOCKS, HID, HID) [blk, n, k] = W2[n, k]; W_KMAJOR: [blk, k, n]
    b2_ptr,  # (N_BLOCKS, HID) fp32, zeros for a block without bias
    wout_ptr,  # (C, HID) output 1x1 weight Wout[c, k]; W_KMAJOR: (HID, C)
    y_ptr,  # out (N_BLOCKS + 1, M, HID): block inputs y_i, then the output conv's input
    a_ptr,  # out (N_BLOCKS, M, HID): activations u_i = ELU(a_i), a_i = y_i W1^T + b1 (the dots' operand)
    da_ptr,  # out (N_BLOCKS, M, HID): dL/da_i
    dy_ptr,  # out (N_BLOCKS, M, HID): dL/dy_{i+1}, the gradient of block i's output
    g_ptr,  # out (M, C): g = m * grad_out, the output conv's output gradient
    dpre_ptr,  # out (M, HID): dL/d(perception conv output, before its ELU)
    M,  # number of cells B * H * W on the (doubled) grid
    H,  # grid height (doubled when DOUBLE)
    W,  # grid width (doubled when DOUBLE)
    C: tl.constexpr,  # |z|
    HID: tl.constexpr,  # h (a power of two: the launcher pads the hidden channels with zero weights)
    N_BLOCKS: tl.constexpr,
    DOUBLE: tl.constexpr,  # read the (B, H/2, W/2, C) input through (row // 2, col // 2)
    HAS_MASK: tl.constexpr,
    HAS_B3: tl.constexpr,
    HAS_B1: tl.constexpr,
    HAS_B2: tl.constexpr,
    PERCEIVE_ELU: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,  # "ieee" or "tf32" for fp32 operands
    INTERP_BF16: tl.constexpr,  # interpreter with bf16: dots in fp32, casts rounded to nearest (see utils.rne)
    BLOCK_M: tl.constexpr,  # cells per program
    BLOCK_K: tl.constexpr,  # hidden-channel chunk of the residual blocks
    BLOCK_C: tl.constexpr,  # state-channel chunk of the perception conv and the output conv
    BLK_STAGES: tl.constexpr,  # software-pipeline stages of the hidden-chunk loops (None: the kernel's num_stages)
    OUT_STAGES: tl.constexpr,  # of the output conv's loop
    RELOAD_OPERAND: tl.constexpr,  # read the residual streams' dot operand back from its buffer (see stages.main_cells)
    IDX64: tl.constexpr,  # int64 cell and element offsets (else int32: config int32_index, where they fit)
    WIDE: tl.constexpr,  # int64 buffer-plane offsets too (the launcher sets it when M * HID could overflow int32)
    W_KMAJOR: tl.constexpr,  # the weights in their K-major layouts (tf32, utils.k_major; see the pointers above)
    UNCHAIN: tl.constexpr,  # the hidden-chunk loops' first dots without the chained-dot layout (utils.mma_first)
    RECOMPUTE: tl.constexpr,  # recompute the forward (else y and a hold the forward's, see stages.main_cells)
):
    """Recompute the forward and backpropagate to the perception conv's output for ``BLOCK_M`` cells.

    Grid: ``(cdiv(B * H * W, BLOCK_M),)``; program ``pid`` owns cells ``pid * BLOCK_M + [0, BLOCK_M)`` in
    (B, H, W) row-major order of the (doubled) grid. Forward, on chip, writing y_i and a_i:

        pre = sum_{tap, c-chunk} z[shifted cells, c-chunk] @ W3[tap, c-chunk, :] (+ b3)     (zero padding)
        y_0 = ELU(pre) if PERCEIVE_ELU else pre
        a_i = y_i @ W1_i^T + b1_i,  y_{i+1} = y_i + ELU(a_i) @ W2_i^T + b2_i     (hidden chunks of BLOCK_K)

    Backward, with elu'(a) = 1 if a > 0 else exp(a):

        g = m * grad_out,  dy_nb = g @ Wout                               (chunks of BLOCK_C over |z|)
        da_i = (dy_{i+1} @ W2_i) * elu'(a_i),  dy_i = dy_{i+1} + da_i @ W1_i   (hidden chunks, i = nb-1 .. 0)
        dpre = dy_0 * elu'(pre) if PERCEIVE_ELU else dy_0

    Every dot is chunked so that whole register tensors are only ever used as dot operands, never sliced.
    Dtypes: operands in the state's dtype, accumulation and the residual streams y, dy in fp32, the buffers in
    the state's dtype.
    """
    pid = tl.program_id(0)
    if IDX64:
        pid = pid.to(tl.int64)
    if WIDE:
        M = M.to(tl.int64)
    # int32 offsets (config int32_index, where they fit): fewer registers than int64 at the 128-cell h = 256 tiles
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # cell ids
    main_cells(z_ptr, gout_ptr, mask_ptr, w3_ptr, b3_ptr, w1t_ptr, w1_ptr, b1_ptr, w2t_ptr, w2_ptr, b2_ptr, wout_ptr,
                y_ptr, a_ptr, da_ptr, dy_ptr, g_ptr, dpre_ptr, offs_m, offs_m < M, 0, H, W, M * HID, C, HID, N_BLOCKS,
                1 if DOUBLE else 0, HAS_MASK, HAS_B3, HAS_B1, HAS_B2, PERCEIVE_ELU, INPUT_PRECISION, INTERP_BF16,
                BLOCK_M, BLOCK_K, BLOCK_C, BLK_STAGES, OUT_STAGES, RELOAD_OPERAND, W_KMAJOR, UNCHAIN, RECOMPUTE)


@triton.jit
def _nca_step_bwd_dstate_kernel(
    dpre_ptr,  # (B, H, W, HID) perception conv output gradient on the (doubled) grid, compute dtype
    wb_ptr,  # (KS * KS, HID, C_PAD) transposed-conv weights, [i * KS + j, o, c]; W_KMAJOR: [i * KS + j, c, o]
    gout_ptr,  # (B, H, W, C) upstream gradient, compute dtype
    dz_ptr,  # out (B, H_in, W_in, C) state gradient, compute dtype
    M_in,  # number of input cells B * H_in * W_in
    H,  # grid height (doubled when DOUBLE)
    W,  # grid width (doubled when DOUBLE)
    C: tl.constexpr,
    C_PAD: tl.constexpr,
    HID: tl.constexpr,
    DOUBLE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    W_KMAJOR: tl.constexpr,
):
    """State gradient of one step; grid ``(cdiv(B * H_in * W_in, BLOCK_M),)``, one tile per program (see
    :func:`stages.dstate_tile`)."""
    dstate_tile(tl.program_id(0).to(tl.int64) * BLOCK_M, M_in, 0, dpre_ptr, wb_ptr, gout_ptr, dz_ptr, H, W, C, C_PAD,
                 HID, DOUBLE, INPUT_PRECISION, INTERP_BF16, BLOCK_M, BLOCK_K, C_PAD, C_PAD, W_KMAJOR)


# The per-step kernel keeps its own copy of the GEMM loop: written as a call of stages.wgrad_tile it compiled with a
# 24 B stack frame (spills) in the fp32 "ieee" 256/256 perceive variant under Triton 3.8 (the rollout's post
# kernel, which calls stages.wgrad_tile, fits in every shipped config).
@triton.jit
def _nca_step_bwd_wgrad_kernel(
    a_ptr,  # (N_MAT, M, NA) left operand, one row per cell, compute dtype
    b_ptr,  # (N_MAT, M, NB) right operand; when GATHER the (B, H_in, W_in, NB) state
    dw_ptr,  # out (S, N_MAT, T, NA, NB) fp32 partial sums over each split's cells
    db_ptr,  # out (S, N_MAT, NA) fp32 partial column sums of a (written only when WITH_DB)
    M,  # number of cells (rows of a)
    H,  # grid height (doubled when DOUBLE), used when GATHER
    W,  # grid width (doubled when DOUBLE), used when GATHER
    cells_per_split,  # a multiple of BLOCK_CELLS
    S,  # number of splits
    N_MAT,  # number of matrices (stacked along a, b and dw)
    NA: tl.constexpr,
    NB: tl.constexpr,
    T: tl.constexpr,  # 9 taps when GATHER, else 1
    GATHER: tl.constexpr,  # b is the state read at the 3x3 tap's shifted cells (zero padding)
    DOUBLE: tl.constexpr,  # the gathered state is at half resolution: read (row // 2, col // 2)
    WITH_DB: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    BLOCK_A: tl.constexpr,  # rows of the dW tile (over NA)
    BLOCK_B: tl.constexpr,  # columns of the dW tile (over NB)
    BLOCK_CELLS: tl.constexpr,  # cells per step of the reduction
):
    """Partial weight gradients ``dW[s, mat, tap] = a[cells of s]^T @ b_tap[cells of s]`` and ``db[s, mat]``.

    Grid: ``(NA / BLOCK_A, T * NB / BLOCK_B, N_MAT * S)``; a program owns one ``(BLOCK_A, BLOCK_B)`` tile of one
    tap of one matrix and reduces it over the cells ``[s * cells_per_split, (s + 1) * cells_per_split)``. The
    tap-0, column-0 programs also write the column sums of a (the bias gradient). Partials are fp32 and summed
    over s by the caller in a fixed order: deterministic, no atomics. With GATHER,
    ``b_tap[cell] = z[row + ky - 1, col + kx - 1]`` (tap = 3 ky + kx, zero outside the grid), so the partials of
    the perception weight are ``dWp[o, c, ky, kx] = sum_cells dpre[cell, o] z[cell + (ky - 1, kx - 1), c]``.
    """
    pid_a = tl.program_id(0)
    pid_tb = tl.program_id(1)
    pid_sm = tl.program_id(2).to(tl.int64)
    tap, pid_b, s, mat, offs_a, offs_b, offs_l = wgrad_tile_ids(pid_a, pid_tb, pid_sm, S, NB, BLOCK_A, BLOCK_B,
                                                                 BLOCK_CELLS)
    a_base = a_ptr + mat * M * NA
    b_base = b_ptr + mat * M * NB
    if GATHER:
        if DOUBLE:
            H_in = H // 2
            W_in = W // 2
        else:
            H_in = H
            W_in = W
        hw = H * W
        dr = tap // 3 - 1
        dc = tap % 3 - 1

    start = s * cells_per_split
    end = tl.minimum(start + cells_per_split, M)
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for l0 in range(start, end, BLOCK_CELLS):
        offs_cell = l0 + offs_l  # int64 cell ids
        ok = offs_cell < end
        b_at = tl.load(a_base + offs_cell[None, :] * NA + offs_a[:, None], mask=ok[None, :], other=0.0)
        if GATHER:
            # int32 index arithmetic, int64 element offsets, as stages.wgrad_tile; signed here: wgrad_tile's unsigned
            # form took this kernel's tf32 variants from 124-145 to 155-171 registers (sm_90 fit)
            cell = offs_cell.to(tl.int32)
            bat = cell // hw
            rem = cell - bat * hw
            r0 = rem // W
            r = r0 + dr
            c = rem - r0 * W + dc
            ok_g = ok & (r >= 0) & (r < H) & (c >= 0) & (c < W)
            if DOUBLE:
                r = r // 2
                c = c // 2
            src = ((bat * H_in + r) * W_in + c).to(tl.int64)
            b_b = tl.load(b_ptr + src[:, None] * NB + offs_b[None, :], mask=ok_g[:, None], other=0.0)
        else:
            b_b = tl.load(b_base + offs_cell[:, None] * NB + offs_b[None, :], mask=ok[:, None], other=0.0)
        acc = mma(b_at, b_b, acc, INTERP_BF16, INPUT_PRECISION)
    slot = (s * N_MAT + mat) * T + tap
    tl.store(dw_ptr + (slot * NA + offs_a[:, None]) * NB + offs_b[None, :], acc)
    if WITH_DB:
        if (pid_b == 0) & (tap == 0):
            colsum = colsum_tile(a_base, offs_a, start, end, tl.zeros((BLOCK_A,), dtype=tl.float32), NA, BLOCK_A,
                                  BLOCK_CELLS)
            tl.store(db_ptr + (s * N_MAT + mat) * NA + offs_a, colsum)


# --------------------------------------------------------------------------------------------------- configs
# The main kernel by a public name, for the rollout's launches (its own name is the one profiles and launch counts
# show)
main_kernel = _nca_step_bwd_kernel


def main_candidates(cfg: BwdConfig) -> list[BwdConfig]:
    """``cfg``, then smaller main-kernel tiles for GPUs with less shared memory than the H100
    (``launch.smaller_tiles``): fewer stages (the per-loop ones capped with them), then narrower state-channel chunks,
    then fewer cells per program. Compiled for sm_86 (99 KiB per block; ``python -m tools.fit --only
    small-smem``), the bf16 h = 256 main kernels fit at 2 stages (72-76 KiB), tf32 at 1 (80-84 KiB)."""
    return smaller_tiles(cfg, "stages", ("block_c", "block_m"), caps=("blk_stages", "out_stages"))


def main_needs_int64(m: int, c: int, hp: int, n_blocks: int) -> bool:
    """Whether the main kernel's cell or element offsets for ``m`` cells could overflow int32 (its largest buffer
    is ``(n_blocks + 1, m, hp)``)."""
    return (n_blocks + 1) * m * max(hp, c) >= 2**31


def main_weight_args(k_major_: bool, *, w3: Tensor, w3k: Tensor | None, w1_nk: Tensor, w1_kn: Tensor,
                     w2_nk: Tensor, w2_kn: Tensor, wout_ch: Tensor, wout_hc: Tensor | None) -> dict[str, Tensor]:
    """The main kernel's weight pointers from both layouts of each weight: ``w3`` (9, C, hp) and ``w3k``
    (9, hp, C); ``w*_nk`` ``[blk, n, k] = W[n, k]`` and ``w*_kn`` ``[blk, k, n]``; ``wout_ch`` (C, hp) and
    ``wout_hc`` (hp, C). Each dot reads the layout that is K-major for it when ``k_major_`` (tf32: ``W_KMAJOR``),
    else the N-major one (``w3k`` and ``wout_hc`` are then not read and may be None)."""
    if k_major_:
        return dict(w3_ptr=w3k, w1t_ptr=w1_nk, w1_ptr=w1_kn, w2t_ptr=w2_nk, w2_ptr=w2_kn, wout_ptr=wout_hc)
    return dict(w3_ptr=w3, w1t_ptr=w1_kn, w1_ptr=w1_nk, w2t_ptr=w2_kn, w2_ptr=w2_nk, wout_ptr=wout_ch)


def main_constexprs(c: int, hp: int, n_blocks: int, *, double: bool, has_mask: bool, has_b3: bool, has_b1: bool,
                     has_b2: bool, input_precision: str, interp_bf16: bool, dtype: torch.dtype, cfg: BwdConfig,
                     m: int | None = None, recompute: bool = True) -> dict[str, Any]:
    """The main kernel's constexprs: one builder for the launch and the sm_90 fit, so the two cannot drift.

    ``m`` (the launch's cells; None: the fit, which takes offsets that fit) decides int64 offsets where the config
    asks for int32 ones; ``recompute=False``: the rollout's kernel that reads the forward's stored activations."""
    wide = m is not None and main_needs_int64(m, c, hp, n_blocks)
    return dict(C=c, HID=hp, N_BLOCKS=n_blocks, DOUBLE=double, HAS_MASK=has_mask, HAS_B3=has_b3, HAS_B1=has_b1,
                HAS_B2=has_b2, PERCEIVE_ELU=n_blocks == 0, INPUT_PRECISION=input_precision, INTERP_BF16=interp_bf16,
                BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_C=cfg.block_c,
                BLK_STAGES=cfg.blk_stages, OUT_STAGES=cfg.out_stages, RELOAD_OPERAND=cfg.reload_operand,
                IDX64=wide or not cfg.int32_index, WIDE=wide, RECOMPUTE=recompute,
                W_KMAJOR=k_major(input_precision) if cfg.k_major is None else cfg.k_major,
                UNCHAIN=(unchain(cfg.block_m, cfg.warps, dtype == torch.bfloat16 or input_precision == "tf32")
                         if cfg.unchain is None else cfg.unchain))


def dstate_constexprs(c: int, hp: int, *, double: bool, input_precision: str, interp_bf16: bool,
                       cfg: BwdConfig) -> dict[str, Any]:
    """The state-gradient kernel's constexprs (launch and fit)."""
    return dict(C=c, C_PAD=triton.next_power_of_2(c), HID=hp, DOUBLE=double, INPUT_PRECISION=input_precision,
                INTERP_BF16=interp_bf16, BLOCK_M=cfg.ds_block_m, BLOCK_K=cfg.ds_block_k,
                W_KMAJOR=k_major(input_precision))


def _wgrad_constexprs(na: int, nb: int, taps: int, *, gather: bool, double: bool, input_precision: str,
                      interp_bf16: bool, cfg: BwdConfig) -> dict[str, Any]:
    """A weight-gradient GEMM's constexprs (launch and fit); the column sums (bias gradients) are always made."""
    return dict(NA=na, NB=nb, T=taps, GATHER=gather, DOUBLE=double and gather, WITH_DB=True,
                INPUT_PRECISION=input_precision, INTERP_BF16=interp_bf16, BLOCK_A=chunk(na, cfg.wg_block),
                BLOCK_B=chunk(nb, cfg.wg_block), BLOCK_CELLS=cfg.wg_block_cells)


def bwd_kernel_specs(
    state_channels: int,
    hidden_channels: int,
    n_blocks: int,
    dtype: torch.dtype,
    *,
    double: bool = False,
    mask: bool = True,
    bias: bool = True,
    input_precision: str = "ieee",
    recompute: bool = True,
    config: BwdConfig | None = None,
) -> list[KernelSpec]:
    """Every kernel variant ``nca_step_bwd`` launches on the GPU for these shapes, as ``fit.KernelSpec`` s (for the
    sm_90 fit, ``tools/fit.py``); ``recompute=False``: the main kernel as the rollout launches it on kept
    activations; ``config`` overrides the shipped tiles."""
    cfg = config or bwd_config(state_channels, triton.next_power_of_2(hidden_channels), dtype, input_precision,
                               n_blocks=n_blocks, recompute=recompute, interpret=False)
    c, h = state_channels, hidden_channels
    ty = TL_DTYPE[dtype]

    def sig(fn: Any, ptrs: dict[str, str], consts: dict[str, Any]) -> dict[str, str]:
        out = {}
        for name in fn.arg_names:
            out[name] = "constexpr" if name in consts else ptrs.get(name, "i32")
        return out

    main_ptrs = {
        n: f"*{ty}"
        for n in (
            "z_ptr",
            "gout_ptr",
            "w3_ptr",
            "w1t_ptr",
            "w1_ptr",
            "w2t_ptr",
            "w2_ptr",
            "wout_ptr",
            "y_ptr",
            "a_ptr",
            "da_ptr",
            "dy_ptr",
            "g_ptr",
            "dpre_ptr",
        )
    }
    main_ptrs.update(mask_ptr="*u8", b3_ptr="*fp32", b1_ptr="*fp32", b2_ptr="*fp32")
    hp = triton.next_power_of_2(h)
    main_consts = main_constexprs(c, hp, n_blocks, double=double, has_mask=mask, has_b3=bias, has_b1=bias,
                                   has_b2=bias, input_precision=input_precision, interp_bf16=False, dtype=dtype,
                                   cfg=cfg, recompute=recompute)
    ds_ptrs = {n: f"*{ty}" for n in ("dpre_ptr", "wb_ptr", "gout_ptr", "dz_ptr")}
    ds_consts = dstate_constexprs(c, hp, double=double, input_precision=input_precision, interp_bf16=False, cfg=cfg)
    wg_ptrs = {"a_ptr": f"*{ty}", "b_ptr": f"*{ty}", "dw_ptr": "*fp32", "db_ptr": "*fp32"}
    specs = [
        KernelSpec(
            "main",
            _nca_step_bwd_kernel,
            sig(_nca_step_bwd_kernel, main_ptrs, main_consts),
            main_consts,
            cfg.warps,
            cfg.stages,
        ),
        KernelSpec(
            "dstate",
            _nca_step_bwd_dstate_kernel,
            sig(_nca_step_bwd_dstate_kernel, ds_ptrs, ds_consts),
            ds_consts,
            cfg.ds_warps,
            cfg.ds_stages,
        ),
    ]
    for name, na, nb, t, gather in _wgrad_variants(c, hp, n_blocks):
        consts = _wgrad_constexprs(na, nb, t, gather=gather, double=double,
                                   input_precision=input_precision, interp_bf16=False, cfg=cfg)
        specs.append(
            KernelSpec(
                f"wgrad-{name}",
                _nca_step_bwd_wgrad_kernel,
                sig(_nca_step_bwd_wgrad_kernel, wg_ptrs, consts),
                consts,
                cfg.wg_warps,
                cfg.wg_stages,
            )
        )
    return specs


def _wgrad_variants(c: int, h: int, n_blocks: int) -> list[tuple[str, int, int, int, bool]]:
    """(name, NA, NB, T, GATHER) of each weight-gradient GEMM."""
    out = [("perceive", h, c, 9, True), ("out", c, h, 1, False)]
    if n_blocks:
        out += [("w1", h, h, 1, False), ("w2", h, h, 1, False)]
    return out


# --------------------------------------------------------------------------------------------------- launcher
def _channels_last(x: Tensor) -> Tensor:
    """``(B, C, H, W)`` -> its ``(B, H, W, C)`` contiguous view (a copy only if x is not channels-last)."""
    return x.permute(0, 2, 3, 1).contiguous()


def transposed_conv_weights(w_perceive: Tensor, double: bool, dtype: torch.dtype, hp: int, cp: int,
                             k_major_: bool = False) -> Tensor:
    """``(KS * KS, hp, cp)`` weights of the state-gradient kernel's gather (see its docstring), in ``dtype``,
    zero-padded from ``(h, C)``; ``(KS * KS, cp, hp)`` with ``k_major_`` (the kernel's ``W_KMAJOR``, tf32).

    Without doubling, ``[3 i + j] = Wp[:, :, 2 - i, 2 - j]``; with doubling, the 4x4 effective kernel
    ``Weff[i, j] = sum_{dy, dx in {0, 1}} Wp[:, :, dy + 2 - i, dx + 2 - j]`` (taps outside 0..2 are skipped),
    summed in fp32 and rounded once.
    """
    h, c = w_perceive.shape[:2]
    wflip = w_perceive.float().flip(2, 3).permute(2, 3, 0, 1)  # (3, 3, h, C): [i, j] = Wp[:, :, 2 - i, 2 - j]
    ks = 4 if double else 3
    out = wflip.new_zeros(ks, ks, hp, cp)
    if not double:
        out[:, :, :h, :c] = wflip
    for dy in (0, 1) if double else ():
        for dx in (0, 1):
            out[dy : dy + 3, dx : dx + 3, :h, :c] += wflip
    out = out.reshape(ks * ks, hp, cp)
    return (out.transpose(1, 2).contiguous() if k_major_ else out).to(dtype)


@on_input_device
def nca_step_bwd(
    state: Tensor,
    weights: UpdateWeights,
    mask: Tensor | None,
    double: bool,
    grad_out: Tensor,
    *,
    input_precision: str = "ieee",
) -> tuple[Tensor, list[Tensor | None]]:
    """Gradients of one step ``z' = z + m * f(z)`` (optionally doubling z first) given ``grad_out = dL/dz'``.

    Recomputes the step's activations on chip from ``state`` (nothing from the forward is needed), in the
    state's dtype with fp32 accumulation.

    Args:
        state: ``(B, |z|, H, W)`` fp32 or bf16, the step's input (half resolution when ``double``); any memory
            format, channels-last avoids a copy.
        weights: the update network's parameters (fp32 or bf16, packed into the state's dtype).
        mask: ``(B, 1, H', W')`` 0/1 per cell of the updated grid, or None (every cell updates).
        double: the step doubled the state (nearest x2) first.
        grad_out: ``(B, |z|, H', W')`` in the state's dtype, ``H' = 2H`` when doubling, else ``H``.
        input_precision: "ieee" or "tf32", for fp32 dot operands.

    Returns:
        ``(grad_state, grads)``: grad_state ``(B, |z|, H, W)`` in the state's dtype, channels-last; grads in
        ``weights.flat()`` order, each in its weight's dtype, None where the bias is None.
    """
    check_inputs(state, weights, mask, double, input_precision, grad_out)
    dt = state.dtype
    dev = state.device
    b, c, h_in, w_in = state.shape
    h = weights.hidden_channels
    nb = weights.n_blocks
    hh, ww = (2 * h_in, 2 * w_in) if double else (h_in, w_in)
    m = b * hh * ww
    cfg = bwd_config(c, triton.next_power_of_2(h), dt, input_precision, n_blocks=nb)
    upcast = interpreting() and dt == torch.bfloat16
    kmaj = k_major(input_precision) if cfg.k_major is None else cfg.k_major

    # ---- pack
    z = _channels_last(state)  # (B, H_in, W_in, C)
    gout = _channels_last(grad_out)  # (B, H, W, C)
    mask_u8 = (mask != 0).reshape(m).to(torch.uint8) if mask is not None else z
    # the hidden channels are padded to a power of two (tl.arange) with zero weights and biases: the padded
    # channels stay zero through the forward and the backward, and their gradients are dropped
    hp, cp = triton.next_power_of_2(h), triton.next_power_of_2(c)
    if (nb + 1) * m * hp >= 2**31:  # the main kernel's buffer offsets blk * M * hp are 32-bit
        raise ValueError(f"state: {m} cells x {nb + 1} buffers x {hp} channels exceed 2**31 elements; split the batch")
    f32 = dict(dtype=torch.float32, device=dev)

    def pad(t: Tensor, *shape: int, dtype: torch.dtype = dt) -> Tensor:
        out = torch.zeros(shape, dtype=dtype, device=dev)
        out[tuple(slice(0, n) for n in t.shape)] = t
        return out

    wp = weights.w_perceive
    w3 = pad(wp.permute(2, 3, 1, 0).reshape(9, c, h), 9, c, hp)  # (9, C, hp): [3 ky + kx, c, o]
    wb = transposed_conv_weights(wp, double, dt, hp, cp, k_major(input_precision))  # (9 or 16, hp, cp) or (.., cp, hp)
    has_b3 = weights.b_perceive is not None
    b3 = pad(weights.b_perceive, hp, dtype=torch.float32) if has_b3 else torch.zeros(1, **f32)
    if nb:
        w1 = pad(torch.stack([blk[0].reshape(h, h) for blk in weights.blocks]), nb, hp, hp)  # (nb, hp, hp)
        w2 = pad(torch.stack([blk[2].reshape(h, h) for blk in weights.blocks]), nb, hp, hp)
        w1t = w1.transpose(1, 2).contiguous()
        w2t = w2.transpose(1, 2).contiguous()
        zero = torch.zeros(h, **f32)
        b1 = pad(torch.stack([zero if blk[1] is None else blk[1].float() for blk in weights.blocks]), nb, hp,
                 dtype=torch.float32)  # fmt: skip
        b2 = pad(torch.stack([zero if blk[3] is None else blk[3].float() for blk in weights.blocks]), nb, hp,
                 dtype=torch.float32)  # fmt: skip
    else:
        w1 = w2 = w1t = w2t = w3
        b1 = b2 = b3
    has_b1 = any(blk[1] is not None for blk in weights.blocks)
    has_b2 = any(blk[3] is not None for blk in weights.blocks)
    wout = pad(weights.w_out.reshape(c, h), c, hp)  # (C, hp)

    # ---- allocate per-cell buffers (every row < m is written by the main kernel)
    ybuf = torch.empty((nb + 1, m, hp), dtype=dt, device=dev)
    abuf = torch.empty((max(nb, 1), m, hp), dtype=dt, device=dev)
    dabuf = torch.empty((max(nb, 1), m, hp), dtype=dt, device=dev)
    dybuf = torch.empty((max(nb, 1), m, hp), dtype=dt, device=dev)
    gbuf = torch.empty((m, c), dtype=dt, device=dev)
    dpre = torch.empty((m, hp), dtype=dt, device=dev)
    dz = torch.empty((b, h_in, w_in, c), dtype=dt, device=dev)

    # ---- launch: recompute + backprop to dpre, then the state gradient, then the weight-gradient GEMMs
    # (each with smaller tiles where the GPU has less shared memory than the H100: launch.launch_fitting)
    wts = main_weight_args(kmaj, w3=w3, w3k=w3.transpose(1, 2).contiguous() if kmaj else None, w1_nk=w1, w1_kn=w1t,
                           w2_nk=w2, w2_kn=w2t, wout_ch=wout, wout_hc=wout.t().contiguous() if kmaj else None)
    key = (c, h, nb, dt, input_precision, double, state.device)

    def main(mc: BwdConfig) -> None:
        _nca_step_bwd_kernel[(triton.cdiv(m, mc.block_m),)](
            z_ptr=z, gout_ptr=gout, mask_ptr=mask_u8, **wts, b3_ptr=b3, b1_ptr=b1, b2_ptr=b2, y_ptr=ybuf, a_ptr=abuf,
            da_ptr=dabuf, dy_ptr=dybuf, g_ptr=gbuf, dpre_ptr=dpre, M=m, H=hh, W=ww,
            **main_constexprs(c, hp, nb, double=double, has_mask=mask is not None, has_b3=has_b3, has_b1=has_b1,
                               has_b2=has_b2, input_precision=input_precision, interp_bf16=upcast, dtype=dt,
                               cfg=mc, m=m),
            num_warps=mc.warps, num_stages=mc.stages,
        )

    launch_fitting(("main", cfg, *key, mask is not None), cfg, main_candidates, main)
    m_in = b * h_in * w_in

    def dstate(dc: BwdConfig) -> None:
        _nca_step_bwd_dstate_kernel[(triton.cdiv(m_in, dc.ds_block_m),)](
            dpre_ptr=dpre, wb_ptr=wb, gout_ptr=gout, dz_ptr=dz, M_in=m_in, H=hh, W=ww,
            **dstate_constexprs(c, hp, double=double, input_precision=input_precision, interp_bf16=upcast, cfg=dc),
            num_warps=dc.ds_warps, num_stages=dc.ds_stages,
        )

    launch_fitting(("dstate", cfg, *key), cfg, fewer_stages("ds_stages"), dstate)

    per_split, n_splits = splits(m, cfg.wg_block_cells, split_cells().step)

    def wgrad(a: Tensor, bmat: Tensor, n_mat: int, taps: int, gather: bool) -> tuple[Tensor, Tensor]:
        """fp32 ``(n_mat, taps, NA, NB)`` sums of a^T b over all cells and ``(n_mat, NA)`` column sums of a."""
        na, nbc = a.shape[-1], bmat.shape[-1]
        block_a, block_b = chunk(na, cfg.wg_block), chunk(nbc, cfg.wg_block)  # as in _wgrad_constexprs
        dw = torch.empty((n_splits, n_mat, taps, na, nbc), **f32)
        db = torch.empty((n_splits, n_mat, na), **f32)
        grid = (na // block_a, taps * (nbc // block_b), n_mat * n_splits)

        def launch(wc: BwdConfig) -> None:
            _nca_step_bwd_wgrad_kernel[grid](
                a_ptr=a, b_ptr=bmat, dw_ptr=dw, db_ptr=db, M=m, H=hh, W=ww, cells_per_split=per_split, S=n_splits,
                N_MAT=n_mat, **_wgrad_constexprs(na, nbc, taps, gather=gather, double=double,
                                                 input_precision=input_precision, interp_bf16=upcast, cfg=wc),
                num_warps=wc.wg_warps, num_stages=wc.wg_stages,
            )

        launch_fitting(("wgrad", cfg, *key, na, nbc, taps, gather), cfg, fewer_stages("wg_stages"), launch)
        return dw.sum(0), db.sum(0)

    dwp, dbp = wgrad(dpre, z, 1, 9, True)  # (1, 9, hp, C): [3 ky + kx, o, c]
    dwo, dbo = wgrad(gbuf, ybuf[nb], 1, 1, False)  # (1, 1, C, hp)
    if nb:
        dw1, db1 = wgrad(dabuf, ybuf, nb, 1, False)  # (nb, 1, hp, hp): dW1[n, k] = sum da[:, n] y[:, k]
        dw2, db2 = wgrad(dybuf, abuf, nb, 1, False)  # (nb, 1, hp, hp): dW2[n, k] = sum dy'[:, n] u[:, k]

    # ---- unpack in weights.flat() order, each in its weight's dtype
    def like(g: Tensor, t: Tensor | None) -> Tensor | None:
        return None if t is None else g.reshape(t.shape).to(t.dtype)

    grads: list[Tensor | None] = [
        like(dwp[0, :, :h].permute(1, 2, 0).reshape(h, c, 3, 3), wp),  # (h, C, 3, 3)
        like(dbp[0, :h], weights.b_perceive),
    ]
    for i, (w1_i, b1_i, w2_i, b2_i) in enumerate(weights.blocks):
        grads += [like(dw1[i, 0, :h, :h], w1_i), like(db1[i, :h], b1_i)]
        grads += [like(dw2[i, 0, :h, :h], w2_i), like(db2[i, :h], b2_i)]
    grads += [like(dwo[0, 0, :, :h], weights.w_out), like(dbo[0], weights.b_out)]
    return dz.permute(0, 3, 1, 2), grads
