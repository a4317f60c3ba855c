"""Weight gradients batched over the steps of a rollout: a few long-K split-K GEMMs instead of small ones per step.

The rollout's 'batched' backward designs (``RolloutPlan.wgrad``, ``kernels/schedule.py``) run, per step, the
backward main kernel and a state-gradient-only launch (the data gradient, sequential from step to step), writing
each step's per-cell gradients into its region of buffers that span a *batch of steps* (``RolloutPlan.wgrad_batches``:
the whole rollout when the activations are kept and the buffers fit the cap, else fewer steps). After the batch,
every weight gradient is one GEMM over all of the batch's cells (K = their sum: 349,184 for the whole
mnist-doubling rollout at B = 32, where one step has 128 ... 32,768):

    dWp[tap]  = sum_cells dpre^T z_tap      (z gathered at the 3x3 tap's shifted cell of each step's input grid;
                                             a doubling step reads (row >> 1, col >> 1) of its half-size input)
    dWout     = sum_cells g^T y_nb,   dW1_i = sum_cells da_i^T y_i,   dW2_i = sum_cells dy_{i+1}^T u_i

with the bias gradients the column sums of the left operands. Two implementations, both deterministic:

- ``batched`` (:func:`_wgrad_batched_kernel`, one launch per batch): a split-K Triton GEMM. The batch's rows are
  cut into ``S`` <= 32 equal splits; each program owns one output tile of one GEMM and one split, walks the batch's
  steps in order (their grids and buffer offsets follow from the first input grid and the doubling bits, no table
  in memory: nothing to copy to the device, so CUDA graphs capture it) and reduces the split's rows of each step
  it overlaps, then adds its fp32 partial to its split's slot of the rollout's accumulator (the post kernel's
  layout, ``kernels/rollout.py``): one writer per slot per launch, launches in a fixed order, no atomics.
- ``batched-cublas``: the 1x1 weights' GEMMs in cuBLAS through torch ops: each operand's per-step planes gathered
  into one ``(K, n)`` buffer (one ``torch.cat`` each), then one ``torch.mm(..., out_dtype=torch.float32)`` (bf16
  operands, fp32 accumulation; fp32 operands in IEEE fp32 or TF32 as the rollout's ``input_precision``); on the CPU
  an fp32 upcast computes the same products. The perception weight stays in the Triton kernel: its B operand is a
  3x3 gather of each step's input, and materialising it (im2col) would take 9 |z| values per cell (1.6 GB for the
  mnist-doubling rollout in bf16) or a gather launch per tap per step (360 launches).

Memory (``fastnca.memory``): the batch buffers hold, per cell, ``da`` and ``dy`` (``max(nb, 1)`` planes of hp each),
``g`` (|z|) and ``dpre`` (hp), and, when the backward recomputes (any policy but 'none'), the activations the forward
would have kept (``2 nb + 1`` planes of hp, laid out as ``rollout._Layout`` lays them out in ``keep``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from .checks import TL_DTYPE
from .schedule import batch_cell_elems
from .spec import KernelSpec
from .stages import colsum_tile
from .tiles import WgradConfig, chunk, split_cells, splits, wgrad_config
from .utils import mma, udiv, udiv_magic

__all__ = ["Batch", "WgradConfig", "batch_cell_elems", "launch_batched_wgrad", "wgrad_config", "wgrad_kernel_spec"]



# --------------------------------------------------------------------------------------------------- kernel
@triton.jit
def _batched_tile(
    pid_a,  # tile index over NA
    pid_tb,  # tap * (NB / BLOCK_B) + tile index over NB
    pid_sm,  # mat * S + split
    a_ptr,  # left operand: step t's plane p at a_ptr + A_ROW * row0_t + p * m_t * NA, (m_t, NA) row-major
    b_ptr,  # right operand, likewise (B_ROW); GATHER: unused (the inputs below)
    z0_ptr,  # GATHER: the input state (B, H0, W0, NB) of the batch's first step
    zs_ptr,  # GATHER: the inputs of its later steps, back to back in step order (zstride 0) or zstride apart
    zstride,  # elements between two later inputs (0: back to back)
    dw_ptr,  # fp32 accumulator of this weight: slot s at dw_ptr + s * SLOT, (N_MAT, T, NA, NB)
    db_ptr,  # fp32 accumulator of its bias: slot s at db_ptr + s * SLOT, (N_MAT, NA)
    B, H0, W0, n_steps, flags,  # the batch's steps: samples, first input grid, count, doubling bits
    K,  # the batch's rows (cells of all its steps)
    cells_per_split,  # a multiple of BLOCK_CELLS
    S,  # splits
    SLOT,  # fp32 elements per accumulator slot
    NA: tl.constexpr,
    NB: tl.constexpr,
    T: tl.constexpr,  # 9 taps when GATHER, else 1
    A_ROW: tl.constexpr,  # elements per row of all of a step's planes of a (its region is A_ROW * m_t long)
    A_PLANE0: tl.constexpr,  # the plane of matrix 0 in a step's region of a
    B_ROW: tl.constexpr,
    B_PLANE0: tl.constexpr,
    GATHER: tl.constexpr,
    WITH_DB: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_CELLS: tl.constexpr,
):
    """``dW[mat, tap] += a[rows of split s]^T b_tap[rows of split s]`` (and the column sums of a) over the batch.

    Rows are the batch's cells, step after step (row0_t: the cells of the steps before t). The program walks the
    steps in order and reduces the rows of each that its split overlaps, in cells of BLOCK_CELLS: a fixed order.
    With GATHER, ``b_tap[cell] = z_t[row + ky - 1, col + kx - 1]`` on step t's output grid (zero outside), read at
    ``(r >> shift, c >> shift)`` of the step's input, shift its doubling bit.
    """
    B_TILES: tl.constexpr = NB // BLOCK_B
    tap = pid_tb // B_TILES
    pid_b = pid_tb % B_TILES
    s = pid_sm % S
    mat = pid_sm // S
    offs_a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_l = tl.arange(0, BLOCK_CELLS)
    lo = s * cells_per_split  # int64: pid_sm is
    hi = tl.minimum(lo + cells_per_split, K)
    dw_tile = dw_ptr + s * SLOT + ((mat * T + tap) * NA + offs_a[:, None]) * NB + offs_b[None, :]
    acc = tl.load(dw_tile)
    dr = tap // 3 - 1
    dc = tap % 3 - 1
    h = H0
    w = W0
    row0 = lo * 0  # int64
    for t in range(n_steps):
        shift = ((flags >> t) & 1).to(tl.int32)  # 1: step t doubles its input first
        h_in = h
        w_in = w
        h = h << shift
        w = w << shift
        m = B * h * w
        start = tl.maximum(lo, row0)
        end = tl.minimum(hi, row0 + m)
        a_base = a_ptr + A_ROW * row0 + (A_PLANE0 + mat) * m * NA
        if GATHER:
            if t == 0:
                zin = z0_ptr
            elif zstride > 0:
                zin = zs_ptr + (t - 1) * zstride
            else:
                zin = zs_ptr + (row0 - B * h_in * w_in) * NB  # the output of step t - 1
            hw = h * w
            m_hw, l_hw = udiv_magic(hw)
            m_w, l_w = udiv_magic(w)
        else:
            b_base = b_ptr + B_ROW * row0 + (B_PLANE0 + mat) * m * NB
        for l0 in range(start, end, BLOCK_CELLS):
            cell = (l0 - row0) + offs_l  # step-local cell ids (int64)
            ok = offs_l < (end - l0).to(tl.int32)
            b_at = tl.load(a_base + cell[None, :] * NA + offs_a[:, None], mask=ok[None, :], other=0.0)
            if GATHER:
                # int32 index arithmetic (B * H * W < 2**31, as in stages.wgrad_tile), int64 element offsets
                cu = cell.to(tl.uint32)
                bat = udiv(cu, m_hw, l_hw)
                rem = cu - bat * hw.to(tl.uint32)
                r0 = udiv(rem, m_w, l_w)
                r = r0.to(tl.int32) + dr
                c = (rem - r0 * w.to(tl.uint32)).to(tl.int32) + dc
                ok_g = ok & (r >= 0) & (r < h) & (c >= 0) & (c < w)
                r = r >> shift
                c = c >> shift
                src = ((bat.to(tl.int32) * h_in + r) * w_in + c).to(tl.int64)
                b_b = tl.load(zin + src[:, None] * NB + offs_b[None, :], mask=ok_g[:, None], other=0.0)
            else:
                b_b = tl.load(b_base + cell[:, None] * NB + offs_b[None, :], mask=ok[:, None], other=0.0)
            acc = mma(b_at, b_b, acc, INTERP_BF16, INPUT_PRECISION)
        row0 += m
    tl.store(dw_tile, acc)
    if WITH_DB:
        if (pid_b == 0) & (tap == 0):  # the bias: the column sums of a, in its own walk (as stages.wgrad_tile's)
            db_tile = db_ptr + s * SLOT + mat * NA + offs_a
            colsum = tl.load(db_tile)
            h = H0
            w = W0
            row0 = lo * 0
            for t in range(n_steps):
                shift = ((flags >> t) & 1).to(tl.int32)
                h = h << shift
                w = w << shift
                m = B * h * w
                a_base = a_ptr + A_ROW * row0 + (A_PLANE0 + mat) * m * NA
                colsum = colsum_tile(a_base, offs_a, tl.maximum(lo, row0) - row0, tl.minimum(hi, row0 + m) - row0,
                                      colsum, NA, BLOCK_A, BLOCK_CELLS)
                row0 += m
            tl.store(db_tile, colsum)


@triton.jit
def _wgrad_batched_kernel(
    dpre_ptr,  # (K, HID) perception output gradients of the batch's steps, step after step, compute dtype
    z0_ptr,  # (B, H0, W0, C) the input state of the batch's first step
    zs_ptr,  # the inputs of its later steps (zstride 0: back to back in step order; else zstride elements apart)
    g_ptr,  # (K, C) m * grad_out, step after step
    acts_ptr,  # per step (2 N_BLOCKS + 1) planes of (m_t, HID): y_0 .. y_nb, then u_0 .. u_{nb-1}
    da_ptr,  # per step N_BLOCKS planes of (m_t, HID): dL/da_i
    dy_ptr,  # per step N_BLOCKS planes of (m_t, HID): dL/dy_{i+1}
    acc_ptr,  # (S_MAX, SLOT) fp32 accumulator: per split, [dWp | dbp | dWout | dbout | dW1 | db1 | dW2 | db2]
    B,  # samples
    H0,  # the first step's input grid height
    W0,  # and width
    n_steps,  # steps of the batch
    flags,  # bit t set: step t of the batch doubles its input first
    zstride,
    K,  # rows of the batch: its steps' cells
    cells_per_split,
    S,  # splits (<= S_MAX)
    SLOT,
    n_wp,  # programs of the perception weight's GEMM
    n_wo,  # of the output conv's
    n_w1,  # of the blocks' first GEMMs (the second ones take as many)
    C: tl.constexpr,
    HID: tl.constexpr,
    N_BLOCKS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    BA_P: tl.constexpr,  # dWp tile rows (over HID)
    BB_P: tl.constexpr,  # dWp tile columns (over C)
    BA_O: tl.constexpr,  # dWout tile rows (over C)
    BB_O: tl.constexpr,  # dWout tile columns (over HID)
    BA_H: tl.constexpr,  # dW1 / dW2 tile edge
    BLOCK_CELLS: tl.constexpr,
):
    """Every weight gradient of a batch of steps, added to the rollout's accumulator (see :func:`_batched_tile`).

    Grid ``(n_wp + n_wo + 2 * n_w1,)``: the perception weight's tiles x 9 taps x S splits, then the output conv's,
    then the blocks' first and second 1x1 weights' (x N_BLOCKS matrices), each program one tile of one split.
    """
    pid = tl.program_id(0).to(tl.int64)
    OFF_WO: tl.constexpr = 9 * HID * C + HID
    OFF_DBO: tl.constexpr = OFF_WO + C * HID
    OFF_W1: tl.constexpr = OFF_DBO + C
    OFF_DB1: tl.constexpr = OFF_W1 + N_BLOCKS * HID * HID
    OFF_W2: tl.constexpr = OFF_DB1 + N_BLOCKS * HID
    OFF_DB2: tl.constexpr = OFF_W2 + N_BLOCKS * HID * HID
    ACT_ROW: tl.constexpr = (2 * N_BLOCKS + 1) * HID
    if pid < n_wp:
        GA: tl.constexpr = HID // BA_P
        GTB: tl.constexpr = 9 * (C // BB_P)
        _batched_tile(pid % GA, (pid // GA) % GTB, pid // (GA * GTB), dpre_ptr, dpre_ptr, z0_ptr, zs_ptr, zstride,
                      acc_ptr, acc_ptr + 9 * HID * C, B, H0, W0, n_steps, flags, K, cells_per_split, S, SLOT, HID, C,
                      9, HID, 0, C, 0, True, True, INPUT_PRECISION, INTERP_BF16, BA_P, BB_P, BLOCK_CELLS)
    elif pid < n_wp + n_wo:  # dWout = sum g^T y_nb
        q = pid - n_wp
        GA: tl.constexpr = C // BA_O
        GTB: tl.constexpr = HID // BB_O
        _batched_tile(q % GA, (q // GA) % GTB, q // (GA * GTB), g_ptr, acts_ptr, z0_ptr, zs_ptr, zstride,
                      acc_ptr + OFF_WO, acc_ptr + OFF_DBO, B, H0, W0, n_steps, flags, K, cells_per_split, S, SLOT,
                      C, HID, 1, C, 0, ACT_ROW, N_BLOCKS, False, True, INPUT_PRECISION, INTERP_BF16, BA_O, BB_O,
                      BLOCK_CELLS)
    elif N_BLOCKS > 0:
        q = pid - n_wp - n_wo
        GA: tl.constexpr = HID // BA_H
        qq = q % n_w1
        if q < n_w1:  # dW1_i = sum da_i^T y_i
            _batched_tile(qq % GA, (qq // GA) % GA, qq // (GA * GA), da_ptr, acts_ptr, z0_ptr, zs_ptr, zstride,
                          acc_ptr + OFF_W1, acc_ptr + OFF_DB1, B, H0, W0, n_steps, flags, K, cells_per_split, S,
                          SLOT, HID, HID, 1, N_BLOCKS * HID, 0, ACT_ROW, 0, False, True, INPUT_PRECISION,
                          INTERP_BF16, BA_H, BA_H, BLOCK_CELLS)
        else:  # dW2_i = sum dy_{i+1}^T u_i
            _batched_tile(qq % GA, (qq // GA) % GA, qq // (GA * GA), dy_ptr, acts_ptr, z0_ptr, zs_ptr, zstride,
                          acc_ptr + OFF_W2, acc_ptr + OFF_DB2, B, H0, W0, n_steps, flags, K, cells_per_split, S,
                          SLOT, HID, HID, 1, N_BLOCKS * HID, 0, ACT_ROW, N_BLOCKS + 1, False, True, INPUT_PRECISION,
                          INTERP_BF16, BA_H, BA_H, BLOCK_CELLS)


# ---------------------------------------------------------------------------------------------------- tiles
def wgrad_constexprs(c: int, hp: int, n_blocks: int, *, input_precision: str, interp_bf16: bool,
                     cfg: WgradConfig) -> dict[str, Any]:
    """The kernel's constexprs: one builder for the launch and the sm_90 fit spec."""
    return dict(C=c, HID=hp, N_BLOCKS=n_blocks, INPUT_PRECISION=input_precision, INTERP_BF16=interp_bf16,
                BA_P=chunk(hp, cfg.block), BB_P=chunk(c, cfg.block), BA_O=chunk(c, cfg.block),
                BB_O=chunk(hp, cfg.block), BA_H=chunk(hp, cfg.block), BLOCK_CELLS=cfg.block_cells)


def wgrad_kernel_spec(state_channels: int, hidden_channels: int, n_blocks: int, dtype: torch.dtype, *,
                      input_precision: str = "ieee", cfg: WgradConfig | None = None) -> KernelSpec:
    """The batched kernel as the rollout's backward launches it on the GPU (sm_90 fit; ``cfg`` overrides the
    shipped tiles)."""
    hp = triton.next_power_of_2(hidden_channels)
    cfg = cfg or wgrad_config(dtype, input_precision, interpret=False)
    consts = wgrad_constexprs(state_channels, hp, n_blocks, input_precision=input_precision, interp_bf16=False,
                              cfg=cfg)
    ty = TL_DTYPE[dtype]
    fn = _wgrad_batched_kernel
    sig = {n: "constexpr" if n in consts else "*fp32" if n == "acc_ptr" else f"*{ty}" if n.endswith("_ptr")
           else "i64" if n == "flags" else "i32" for n in fn.arg_names}  # flags: mnist-doubling's bits pass 2**31
    return KernelSpec("wgrad-batched", fn, sig, consts, cfg.warps, cfg.stages)


# ------------------------------------------------------------------------------------------------ launches
@dataclass
class Batch:
    """One batch of steps as the kernel walks it, and its buffers (flat views, regions step after step)."""

    batch: int  # samples
    grid_in: tuple[int, int]  # the first step's input grid
    flags: tuple[bool, ...]  # the batch's steps' doubling flags
    cells: list[int]  # each step's cells
    z0: Tensor  # the first step's input (B, H0, W0, C)
    zs: Tensor  # the later steps' inputs (back to back, or zstride apart)
    zstride: int
    dpre: Tensor
    g: Tensor
    acts: Tensor  # (2 nb + 1) planes per step
    da: Tensor
    dy: Tensor

    @property
    def rows(self) -> int:
        return sum(self.cells)


def launch_batched_wgrad(sp: Any, bt: Batch, acc: Tensor, *, cublas: bool = False,
                         cfg: WgradConfig | None = None) -> None:
    """Add every weight gradient of the batch ``bt`` to the rollout's accumulator ``acc`` (``(S_MAX, SLOT)`` fp32):
    one launch of :func:`_wgrad_batched_kernel`, or with ``cublas`` the perception weight's programs only and the
    1x1 weights in torch ops (:func:`_cublas_1x1`). ``sp``: the rollout's ``StepPlan``."""
    c, hp, nb = sp.c, sp.hp, sp.nb
    cfg = cfg or wgrad_config(sp.dtype, sp.input_precision)
    consts = wgrad_constexprs(c, hp, nb, input_precision=sp.input_precision, interp_bf16=sp.upcast, cfg=cfg)
    k = bt.rows
    per, n_splits = splits(k, cfg.block_cells, split_cells().batched)
    n_wp = (hp // consts["BA_P"]) * 9 * (c // consts["BB_P"]) * n_splits
    n_wo = 0 if cublas else (c // consts["BA_O"]) * (hp // consts["BB_O"]) * n_splits
    n_w1 = 0 if cublas else (hp // consts["BA_H"]) ** 2 * nb * n_splits
    bits = sum(1 << i for i, f in enumerate(bt.flags) if f)
    _wgrad_batched_kernel[(n_wp + n_wo + 2 * n_w1,)](
        dpre_ptr=bt.dpre, z0_ptr=bt.z0, zs_ptr=bt.zs, g_ptr=bt.g, acts_ptr=bt.acts, da_ptr=bt.da, dy_ptr=bt.dy,
        acc_ptr=acc, B=bt.batch, H0=bt.grid_in[0], W0=bt.grid_in[1], n_steps=len(bt.flags), flags=bits,
        zstride=bt.zstride, K=k, cells_per_split=per, S=n_splits, SLOT=sp.slot, n_wp=n_wp, n_wo=n_wo, n_w1=n_w1,
        **consts, num_warps=cfg.warps, num_stages=cfg.stages,
    )
    if cublas:
        _cublas_1x1(sp, bt, acc[0])


def _rows(bt: Batch, buf: Tensor, row: int, plane: int, n: int) -> list[Tensor]:
    """Plane ``plane`` of every step's region of ``buf`` (``row`` elements per cell over all its planes), as
    ``(m_t, n)`` views in step order."""
    out, off = [], 0
    for m in bt.cells:
        out.append(buf[off + plane * m * n: off + (plane + 1) * m * n].view(m, n))
        off += row * m
    return out


def _mm_f32(a: Tensor, b: Tensor, input_precision: str) -> Tensor:
    """``a^T @ b`` with fp32 accumulation: cuBLAS on CUDA (bf16 operands through ``out_dtype``; fp32 operands in
    IEEE fp32 or TF32 as asked); on the CPU the fp32 upcast, whose products are the same (bf16 x bf16 is exact in
    fp32)."""
    if a.device.type != "cuda":
        return a.float().t() @ b.float()
    if a.dtype == torch.bfloat16:
        return torch.mm(a.t(), b, out_dtype=torch.float32)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = input_precision == "tf32"
    try:
        return torch.mm(a.t(), b)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def _cublas_1x1(sp: Any, bt: Batch, slot: Tensor) -> None:
    """The output conv's and the blocks' weight and bias gradients of the batch, added to accumulator slot ``slot``
    (``(SLOT,)`` fp32): per GEMM, each operand's per-step planes gathered into one ``(K, n)`` buffer, then one
    cuBLAS GEMM over all K rows; biases as fp32 column sums. A fixed sequence of ops: deterministic."""
    c, hp, nb = sp.c, sp.hp, sp.nb
    k = bt.rows
    act_row, blk_row = (2 * nb + 1) * hp, max(nb, 1) * hp
    off_wo = 9 * hp * c + hp
    off_w1 = off_wo + c * hp + c
    off_w2 = off_w1 + nb * (hp * hp + hp)
    scratch = torch.empty(k * hp, dtype=bt.dpre.dtype, device=bt.dpre.device)
    scratch2 = torch.empty(k * hp, dtype=bt.dpre.dtype, device=bt.dpre.device) if nb else scratch

    def cat(buf: Tensor, row: int, plane: int, out: Tensor) -> Tensor:
        views = _rows(bt, buf, row, plane, hp)
        return views[0] if len(views) == 1 else torch.cat(views, out=out.view(k, hp))  # one step: its own plane

    def add(off: int, a: Tensor, b: Tensor) -> None:
        na, nbc = a.shape[1], b.shape[1]
        slot[off: off + na * nbc].view(na, nbc).add_(_mm_f32(a, b, sp.input_precision))
        slot[off + na * nbc: off + na * nbc + na].add_(a.sum(0, dtype=torch.float32))

    g = bt.g[: k * c].view(k, c)
    add(off_wo, g, cat(bt.acts, act_row, nb, scratch))  # dWout = g^T y_nb
    for i in range(nb):
        y_i = cat(bt.acts, act_row, i, scratch)
        w1 = slot[off_w1 + i * hp * hp: off_w1 + (i + 1) * hp * hp].view(hp, hp)
        da_i = cat(bt.da, blk_row, i, scratch2)
        w1.add_(_mm_f32(da_i, y_i, sp.input_precision))  # dW1_i = da_i^T y_i
        b1 = off_w1 + nb * hp * hp + i * hp
        slot[b1: b1 + hp].add_(da_i.sum(0, dtype=torch.float32))
        u_i = cat(bt.acts, act_row, nb + 1 + i, scratch)
        dy_i = cat(bt.dy, blk_row, i, scratch2)
        w2 = slot[off_w2 + i * hp * hp: off_w2 + (i + 1) * hp * hp].view(hp, hp)
        w2.add_(_mm_f32(dy_i, u_i, sp.input_precision))  # dW2_i = dy_{i+1}^T u_i
        b2 = off_w2 + nb * hp * hp + i * hp
        slot[b2: b2 + hp].add_(dy_i.sum(0, dtype=torch.float32))
