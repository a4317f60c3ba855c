"""The ``@triton.jit`` stages the kernels share: one step's or one tile's work, inlined into each kernel that calls it.

Each stage is the body of a per-step kernel (``nca_step.py``, ``nca_step_bwd.py``) that another kernel runs too: the
small-grid forward runs :func:`step_cells` for many steps in one program (``small_grid.py``); the rollout's post
kernel (``rollout.py``) runs :func:`dstate_tile`, :func:`wgrad_tile` and :func:`acc_wgrad_1x1_tile` in one launch;
the batched weight-gradient kernel (``wgrad.py``) takes :func:`colsum_tile`. Triton inlines a jit function into its
caller, so each kernel compiles as if it wrote its stages out (checked with the sm_90 fit).

The constexpr flags ``UPCAST_DOT`` / ``INTERP_BF16`` (interpreter and bf16 only) are those of ``utils.py``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .utils import cast_rne, elu, elu_grad, elu_grad_from_out, mma, mma_first, perceive_conv3x3, rne, udiv, udiv_magic

__all__ = ["acc_wgrad_1x1_tile", "colsum_tile", "dstate_tile", "main_cells", "step_cells", "wgrad_tile"]


@triton.jit
def step_cells(
    z_ptr, out_ptr, mask_ptr, w3_ptr, b3_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, wout_ptr, bout_ptr,  # as the kernel's
    acts_ptr,  # out, STORE_ACTS only: the step's (2 N_BLOCKS + 1) planes of (M, HID), y_0 .. y_nb then u_0 ..
    act_stride,  # elements between two of those planes (M * HID, int64)
    offs_m,  # (BLOCK_M,) int64 output cell ids, flattened over (B, H, W)
    mask_m,  # (BLOCK_M,) which of them to compute (the others are neither read nor written)
    H,  # output grid height
    W,  # output grid width
    C: tl.constexpr,
    HID: tl.constexpr,
    N_BLOCKS: tl.constexpr,
    SHIFT,  # 1: double the input first (read through (row >> 1, col >> 1)), 0: not; constexpr or runtime
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
    """The whole step for the cells ``offs_m`` (masked by ``mask_m``): the body of ``nca_step._nca_step_fwd_kernel``,
    shared with the small-grid rollout kernel (``kernels/small_grid.py``), which runs it for many steps in one
    program. Inlined by Triton: the per-step kernel compiles as if it were written out (sm_90 fit unchanged).

    With ``STORE_ACTS`` it also writes what the backward main kernel would otherwise recompute, exactly the
    operands this step's dots read (so the gradients are those of the values the forward computed): the blocks'
    inputs y_i and the output conv's input y_nb (planes 0 .. N_BLOCKS; with no blocks y_0 = ELU(pre)), then the
    activations u_i = ELU(a_i) (planes N_BLOCKS + 1 ..), one plane per (M, HID) buffer in the state's dtype, row =
    cell id: ``nca_step_bwd``'s y and a buffers, so its main kernel runs without recomputing (``RECOMPUTE``)."""
    H_in = H >> SHIFT
    W_in = W >> SHIFT
    hw = H * W
    bat = offs_m // hw
    rem = offs_m % hw
    row = rem // W
    col = rem % W
    offs_k = tl.arange(0, BLOCK_K)
    offs_h = tl.arange(0, HID)
    # strides of the blocks' (HID, HID) weights: [k, n] at k * SK + n * SN (K-major: k contiguous)
    SK: tl.constexpr = 1 if W_KMAJOR else HID
    SN: tl.constexpr = HID if W_KMAJOR else 1

    # ---- 3x3 perception conv: 9 taps x C/BLOCK_K chunks, one pipelined loop
    acc = perceive_conv3x3(z_ptr, w3_ptr, b3_ptr, bat, row, col, mask_m, H, W, H_in, W_in, C, HID, SHIFT, HAS_B3,
                           BLOCK_M, BLOCK_K, UPCAST_DOT, INPUT_PRECISION, W_KMAJOR)
    if PERCEIVE_ELU:
        acc = elu(acc)
    y = acc  # (BLOCK_M, HID) fp32 residual stream

    # ---- residual blocks: K-chunk the second dot so no register tensor is ever sliced
    # the activation inside the unchained first dot's branch (utils.mma_first) in bf16; in tf32 its fp32 result
    # spilled 8 B in the small-grid forward that keeps activations at h = 128 (both Triton releases)
    ACT_IN_DOT: tl.constexpr = UNCHAIN and z_ptr.dtype.element_ty == tl.bfloat16
    if STORE_ACTS:
        cells_h = offs_m[:, None] * HID + offs_h[None, :]
        cells_k = offs_m[:, None] * HID + offs_k[None, :]
    for blk in range(N_BLOCKS):
        y_a = cast_rne(y, z_ptr.dtype.element_ty, UPCAST_DOT)
        if STORE_ACTS:
            tl.store(acts_ptr + blk * act_stride + cells_h, y_a, mask=mask_m[:, None])
        if HAS_B2:
            acc = y + tl.load(b2_ptr + blk * HID + offs_h)[None, :]
        else:
            acc = y
        for j in range(0, HID, BLOCK_K):
            b_w1 = tl.load(w1_ptr + blk * HID * HID + offs_h[:, None] * SK + (j + offs_k)[None, :] * SN)
            if ACT_IN_DOT:  # ELU(y W1 + b1), rounded, inside mma_first's branch (once per element)
                u = mma_first(y_a, b_w1, b1_ptr + blk * HID + j, HAS_B1, UNCHAIN, BLOCK_M, BLOCK_K, UPCAST_DOT,
                              INPUT_PRECISION, z_ptr.dtype.element_ty)
            else:
                t = mma_first(y_a, b_w1, b1_ptr + blk * HID + j, HAS_B1, UNCHAIN, BLOCK_M, BLOCK_K, UPCAST_DOT,
                              INPUT_PRECISION)
                u = cast_rne(elu(t), z_ptr.dtype.element_ty, UPCAST_DOT)
            if STORE_ACTS:
                tl.store(acts_ptr + (N_BLOCKS + 1 + blk) * act_stride + j + cells_k, u, mask=mask_m[:, None])
            b_w2 = tl.load(w2_ptr + blk * HID * HID + (j + offs_k)[:, None] * SK + offs_h[None, :] * SN)
            acc = mma(u, b_w2, acc, UPCAST_DOT, INPUT_PRECISION)
        y = acc

    # ---- output 1x1 conv, N-chunked, fused with the masked residual update and the store
    y_a = cast_rne(y, z_ptr.dtype.element_ty, UPCAST_DOT)
    if STORE_ACTS:
        tl.store(acts_ptr + N_BLOCKS * act_stride + offs_m[:, None] * HID + offs_h[None, :], y_a,
                 mask=mask_m[:, None])
    if HAS_MASK:
        upd = tl.load(mask_ptr + offs_m, mask=mask_m, other=0) != 0
    if SHIFT == 0:  # static when SHIFT is a constexpr (the per-step kernel: the code it had before SHIFT existed)
        center = offs_m
    else:
        center = (bat * H_in + (row >> SHIFT)) * W_in + (col >> SHIFT)
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(0, C, BLOCK_N):
        if W_KMAJOR:
            b_wo = tl.load(wout_ptr + (n0 + offs_n)[None, :] * HID + offs_h[:, None])
        else:
            b_wo = tl.load(wout_ptr + offs_h[:, None] * C + (n0 + offs_n)[None, :])
        f = mma(y_a, b_wo, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), UPCAST_DOT, INPUT_PRECISION)
        if HAS_BOUT:
            f += tl.load(bout_ptr + n0 + offs_n)[None, :]
        b_z = tl.load(z_ptr + center[:, None] * C + (n0 + offs_n)[None, :], mask=mask_m[:, None], other=0.0)
        new = b_z.to(tl.float32) + f
        if HAS_MASK:
            new = tl.where(upd[:, None], new, b_z.to(tl.float32))
        new = cast_rne(new, out_ptr.dtype.element_ty, UPCAST_DOT)
        tl.store(out_ptr + offs_m[:, None] * C + (n0 + offs_n)[None, :], new, mask=mask_m[:, None])


@triton.jit
def main_cells(
    z_ptr, gout_ptr, mask_ptr, w3_ptr, b3_ptr, w1t_ptr, w1_ptr, b1_ptr, w2t_ptr, w2_ptr, b2_ptr, wout_ptr,  # as the
    y_ptr, a_ptr, da_ptr, dy_ptr, g_ptr, dpre_ptr,  # kernel's (the buffers' and the mask's rows: row0 + offs_m)
    offs_m,  # (BLOCK_M,) cell ids on the step's (doubled) grid, flattened over (B, H, W) (int32 where they fit)
    mask_m,  # (BLOCK_M,) which of them to compute
    row0,  # the step's first row in the per-cell buffers and the mask (0 in the per-step kernel)
    H,  # grid height (doubled when SHIFT is 1)
    W,  # grid width
    buf_stride,  # elements between two blocks' planes of the y / a / da / dy buffers
    C: tl.constexpr,
    HID: tl.constexpr,
    N_BLOCKS: tl.constexpr,
    SHIFT,  # 1: the step doubles its input first, 0: not; constexpr or runtime
    HAS_MASK: tl.constexpr,
    HAS_B3: tl.constexpr,
    HAS_B1: tl.constexpr,
    HAS_B2: tl.constexpr,
    PERCEIVE_ELU: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLK_STAGES: tl.constexpr,
    OUT_STAGES: tl.constexpr,
    RELOAD_OPERAND: tl.constexpr,
    W_KMAJOR: tl.constexpr,
    UNCHAIN: tl.constexpr,
    RECOMPUTE: tl.constexpr,
):
    """The body of ``nca_step_bwd._nca_step_bwd_kernel`` for the cells ``offs_m``; inlined, so the kernel compiles
    as if it wrote it out (sm_90 fit unchanged). ``row0`` and a runtime ``SHIFT`` let a kernel run it for one step
    of many in one buffer.

    With ``RELOAD_OPERAND`` the residual streams' dot operand (``y_i`` forward, ``dy_{i+1}`` backward,
    ``(BLOCK_M, HID)`` in the compute dtype) is read back from the buffer this program has just written, after a
    barrier, instead of being converted in registers: an operand that comes from a load is given to the tensor
    cores from shared memory (wgmma), one converted in registers stays there (64 registers per thread at
    128 x 256 bf16 over 8 warps). It is for h = 256 on 128-cell tiles with 8 warps, where each warpgroup computes
    its own 64 rows (no duplicated chained dots): there it cut the sm_90 spills from 384-464 B to 0-48 B
    (kernels/BACKWARD.md, not shipped while any spill is left). Same bits either way.

    Without ``RECOMPUTE`` the forward part is skipped: y and a already hold this step's y_i and u_i, written by the
    rollout's forward (``step_cells`` with ``STORE_ACTS``, the same layout), so the kernel does only the
    backward (at |z| = h = 256 with 4 blocks 9 h^2 of its 26 h^2 multiply-adds per cell), and with no blocks takes
    elu'(pre) = y_0 + 1 where y_0 = ELU(pre) <= 0."""
    H_in = H >> SHIFT
    W_in = W >> SHIFT
    dt = z_ptr.dtype.element_ty
    hw = H * W
    bat = offs_m // hw
    rem = offs_m % hw
    row = rem // W
    col = rem % W
    offs_k = tl.arange(0, BLOCK_K)
    offs_c = tl.arange(0, BLOCK_C)
    offs_h = tl.arange(0, HID)
    rows = offs_m + row0  # the cells' rows in the per-cell buffers (offs_m when row0 is the constant 0)
    cells_h = rows[:, None] * HID + offs_h[None, :]  # (BLOCK_M, HID) offsets into an (M, HID) buffer
    cells_k = rows[:, None] * HID + offs_k[None, :]  # (BLOCK_M, BLOCK_K) offsets of hidden chunk 0
    # element [k, n] of a block weight's (K, N) dot operand sits at k * SK + n * SN of the pointer's layout
    SK: tl.constexpr = 1 if W_KMAJOR else HID
    SN: tl.constexpr = HID if W_KMAJOR else 1

    if RECOMPUTE:  # (else the forward's y_i and u_i are in the buffers already)
        # ---- forward: 3x3 perception conv, 9 taps x C/BLOCK_C chunks
        acc = perceive_conv3x3(z_ptr, w3_ptr, b3_ptr, bat, row, col, mask_m, H, W, H_in, W_in, C, HID, SHIFT,
                               HAS_B3, BLOCK_M, BLOCK_C, INTERP_BF16, INPUT_PRECISION, W_KMAJOR)
        if PERCEIVE_ELU:
            pre = acc
            y = elu(acc)
        else:
            y = acc  # (BLOCK_M, HID) fp32 residual stream

        # ---- forward through the blocks, saving each block's input and activation u = ELU(a): the operand of the
        # W2 dot as it rounds it, so dW2 = dy^T u reads it as is, and elu'(a) = u + 1 (a <= 0) needs no exp
        for blk in range(N_BLOCKS):
            tl.store(y_ptr + blk * buf_stride + cells_h, rne(y, INTERP_BF16).to(dt), mask=mask_m[:, None])
            if RELOAD_OPERAND:
                tl.debug_barrier()  # the rows were written by other threads of this program
                y_a = tl.load(y_ptr + blk * buf_stride + cells_h, mask=mask_m[:, None], other=0.0)
            else:
                y_a = rne(y, INTERP_BF16).to(dt)
            if HAS_B2:
                acc = y + tl.load(b2_ptr + blk * HID + offs_h)[None, :]
            else:
                acc = y
            for j in tl.range(0, HID, BLOCK_K, num_stages=BLK_STAGES):
                b_w1t = tl.load(w1t_ptr + blk * HID * HID + offs_h[:, None] * SK + (j + offs_k)[None, :] * SN)
                u = mma_first(y_a, b_w1t, b1_ptr + blk * HID + j, HAS_B1, UNCHAIN, BLOCK_M, BLOCK_K, INTERP_BF16,
                              INPUT_PRECISION, dt)  # ELU(y W1 + b1), rounded
                tl.store(a_ptr + blk * buf_stride + j + cells_k, u, mask=mask_m[:, None])
                b_w2t = tl.load(w2t_ptr + blk * HID * HID + (j + offs_k)[:, None] * SK + offs_h[None, :] * SN)
                acc = mma(u, b_w2t, acc, INTERP_BF16, INPUT_PRECISION)
            y = acc
        tl.store(y_ptr + N_BLOCKS * buf_stride + cells_h, rne(y, INTERP_BF16).to(dt), mask=mask_m[:, None])
        # the backward re-reads u_i written by other threads of this program
        tl.debug_barrier()

    # ---- backward through the output conv: g = m * grad_out, dy = g @ Wout
    if HAS_MASK:
        upd = tl.load(mask_ptr + rows, mask=mask_m, other=0) != 0
    dy = tl.zeros((BLOCK_M, HID), dtype=tl.float32)
    for c0 in tl.range(0, C, BLOCK_C, num_stages=OUT_STAGES):
        cells_c = offs_m[:, None] * C + (c0 + offs_c)[None, :]
        b_g = tl.load(gout_ptr + cells_c, mask=mask_m[:, None], other=0.0)
        if HAS_MASK:
            b_g = tl.where(upd[:, None], b_g, 0.0).to(dt)
        tl.store(g_ptr + row0 * C + cells_c, b_g, mask=mask_m[:, None])
        if W_KMAJOR:
            b_wo = tl.load(wout_ptr + offs_h[None, :] * C + (c0 + offs_c)[:, None])
        else:
            b_wo = tl.load(wout_ptr + (c0 + offs_c)[:, None] * HID + offs_h[None, :])
        dy = mma(b_g, b_wo, dy, INTERP_BF16, INPUT_PRECISION)

    # ---- backward through the blocks in reverse
    for i in range(N_BLOCKS):
        blk = N_BLOCKS - 1 - i
        tl.store(dy_ptr + blk * buf_stride + cells_h, rne(dy, INTERP_BF16).to(dt), mask=mask_m[:, None])
        if RELOAD_OPERAND:
            tl.debug_barrier()
            dy_a = tl.load(dy_ptr + blk * buf_stride + cells_h, mask=mask_m[:, None], other=0.0)
        else:
            dy_a = rne(dy, INTERP_BF16).to(dt)
        acc = dy
        for j in tl.range(0, HID, BLOCK_K, num_stages=BLK_STAGES):
            b_w2 = tl.load(w2_ptr + blk * HID * HID + offs_h[:, None] * SK + (j + offs_k)[None, :] * SN)
            # da = (dy W2^T) * ELU'(a) from the kept u = ELU(a), rounded
            if UNCHAIN:  # inside mma_first's branch: once per element, not per consumer layout (utils.mma_first)
                b_u = tl.load(a_ptr + blk * buf_stride + j + cells_k, mask=mask_m[:, None], other=0.0)
                da = mma_first(dy_a, b_w2, b1_ptr, False, UNCHAIN, BLOCK_M, BLOCK_K, INTERP_BF16, INPUT_PRECISION,
                               dt, b_u)
            else:  # (the load after the dot: tf32 at 128 cells spilled 24 B under Triton 3.6 with it before)
                du = mma_first(dy_a, b_w2, b1_ptr, False, UNCHAIN, BLOCK_M, BLOCK_K, INTERP_BF16, INPUT_PRECISION)
                b_u = tl.load(a_ptr + blk * buf_stride + j + cells_k, mask=mask_m[:, None], other=0.0)
                da = rne(du * elu_grad_from_out(b_u.to(tl.float32)), INTERP_BF16).to(dt)
            tl.store(da_ptr + blk * buf_stride + j + cells_k, da, mask=mask_m[:, None])
            b_w1 = tl.load(w1_ptr + blk * HID * HID + (j + offs_k)[:, None] * SK + offs_h[None, :] * SN)
            acc = mma(da, b_w1, acc, INTERP_BF16, INPUT_PRECISION)
        dy = acc
    if PERCEIVE_ELU:
        if RECOMPUTE:
            dy = dy * elu_grad(pre)
        else:
            y0 = tl.load(y_ptr + cells_h, mask=mask_m[:, None], other=0.0)
            dy = dy * elu_grad_from_out(y0.to(tl.float32))
    tl.store(dpre_ptr + cells_h, rne(dy, INTERP_BF16).to(dt), mask=mask_m[:, None])


@triton.jit
def dstate_tile(
    start,  # int64 first input cell of the tile
    end,  # bound of the cells this call may write (the tile's cells at or past it are skipped)
    n_start,  # first state channel of the tile (0 unless N_SPAN < C_PAD)
    dpre_ptr,  # (B, H, W, HID) perception conv output gradient on the (doubled) grid, compute dtype
    wb_ptr,  # (KS * KS, HID, C_PAD) transposed-conv weights, [i * KS + j, o, c] (see nca_step_bwd)
    gout_ptr,  # (B, H, W, C) upstream gradient, compute dtype
    dz_ptr,  # out (B, H_in, W_in, C) state gradient, compute dtype
    H,  # grid height (doubled when DOUBLE)
    W,  # grid width (doubled when DOUBLE)
    C: tl.constexpr,  # |z|
    C_PAD: tl.constexpr,  # |z| rounded up to a power of two (the columns of wb)
    HID: tl.constexpr,  # h (a power of two: the launcher pads the hidden channels)
    DOUBLE: tl.constexpr,  # the input is the half-resolution state
    INPUT_PRECISION: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,  # input cells per program
    BLOCK_K: tl.constexpr,  # hidden-channel chunk
    BLOCK_N: tl.constexpr,  # state channels per pass (C_PAD: one pass, the per-step kernels; fewer: less registers)
    N_SPAN: tl.constexpr,  # state channels of the tile, n_start + [0, N_SPAN), in passes of BLOCK_N
    W_KMAJOR: tl.constexpr,  # wb is (KS * KS, C_PAD, HID), [tap, c, o]: K-major for the dot (tf32, utils.k_major)
):
    """State gradient ``dz = S(grad_out + conv3x3^T(dpre))`` for ``BLOCK_M`` input cells.

    Owns input cells ``start + [0, BLOCK_M)`` below ``end`` (the per-step kernels: ``start = pid * BLOCK_M``,
    ``end = B * H_in * W_in``) and state channels ``n_start + [0, N_SPAN)`` (all ``C_PAD`` but in the rollout's post
    kernel, whose programs split the channels).
    Without doubling S is the identity and, with zero padding,

        dz[p, q] = grad_out[p, q] + sum_{i, j in 0..2} dpre[p + i - 1, q + j - 1] @ Wp[:, :, 2 - i, 2 - j]

    With doubling S sums each 2x2 block; the four 3x3 windows of a block cover a 4x4 window, so

        dz[p, q] = sum_{2x2} grad_out + sum_{i, j in 0..3} dpre[2p + i - 1, 2q + j - 1] @ Weff[i, j]

    where Weff[i, j] sums the taps Wp[:, :, dy + 2 - i, dx + 2 - j] over the block offsets dy, dx in {0, 1}.
    Dtypes: operands in the compute dtype, fp32 accumulation, one rounding on store.
    """
    KS: tl.constexpr = 4 if DOUBLE else 3  # taps per axis of the (effective) transposed kernel
    SCALE: tl.constexpr = 2 if DOUBLE else 1
    H_in = H // SCALE
    W_in = W // SCALE

    offs_m = start + tl.arange(0, BLOCK_M)  # int64 input cell ids
    mask_m = offs_m < end
    hw = H_in * W_in
    bat = offs_m // hw
    rem = offs_m % hw
    row = rem // W_in
    col = rem % W_in
    # the tensor-core tiles do the tap loop's index arithmetic in int32 (cell ids fit: B * H * W < 2**31, as in the
    # weight-gradient gather; in int64 the row, column and cell products took 57 of the loop's 160 instructions,
    # sm_90 SASS, bf16); the fp32 "ieee" tile at |z| = h = 256 spilled 8 B with it (Triton 3.8), so it keeps int64
    IDX32: tl.constexpr = (dpre_ptr.dtype.element_ty == tl.bfloat16) or (INPUT_PRECISION == "tf32")
    if IDX32:
        row_s = (SCALE * row).to(tl.int32)
        col_s = (SCALE * col).to(tl.int32)
        corner = (bat * H * W).to(tl.int32) + row_s * W + col_s  # full-grid cell (SCALE row, SCALE col)
    offs_k = tl.arange(0, BLOCK_K)
    K_CHUNKS: tl.constexpr = HID // BLOCK_K
    for n0 in tl.static_range(0, N_SPAN, BLOCK_N):  # one pass when BLOCK_N = N_SPAN: the code it had before
        offs_n = n_start + n0 + tl.arange(0, BLOCK_N)
        mask_mn = mask_m[:, None] & (offs_n < C)[None, :]

        # identity path of z' = z + m * f(z)
        if DOUBLE:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for q in tl.static_range(4):
                src = (bat * H + SCALE * row + q // 2) * W + SCALE * col + q % 2
                acc += tl.load(gout_ptr + src[:, None] * C + offs_n[None, :], mask=mask_mn, other=0.0)
        else:
            acc = tl.load(gout_ptr + offs_m[:, None] * C + offs_n[None, :], mask=mask_mn, other=0.0)
            acc = acc.to(tl.float32)

        # transposed 3x3 conv: gather the neighbours' dpre, KS x KS taps x HID/BLOCK_K chunks
        for it in range(KS * KS * K_CHUNKS):
            tap = it // K_CHUNKS
            k0 = (it % K_CHUNKS) * BLOCK_K
            dr = tap // KS - 1
            dc = tap % KS - 1
            if IDX32:
                r = row_s + dr
                c = col_s + dc
                nbr = (corner + (dr * W + dc)).to(tl.int64)  # (BLOCK_M,) full-grid cell ids
            else:
                r = SCALE * row + dr
                c = SCALE * col + dc
                nbr = (bat * H + r) * W + c
            ok = mask_m & (r >= 0) & (r < H) & (c >= 0) & (c < W)  # out-of-grid neighbours are masked
            b_d = tl.load(dpre_ptr + nbr[:, None] * HID + (k0 + offs_k)[None, :], mask=ok[:, None], other=0.0)
            if W_KMAJOR:
                b_w = tl.load(wb_ptr + (tap * C_PAD + offs_n)[None, :] * HID + (k0 + offs_k)[:, None])
            else:
                b_w = tl.load(wb_ptr + (tap * HID + k0 + offs_k)[:, None] * C_PAD + offs_n[None, :])
            acc = mma(b_d, b_w, acc, INTERP_BF16, INPUT_PRECISION)
        tl.store(dz_ptr + offs_m[:, None] * C + offs_n[None, :], rne(acc, INTERP_BF16).to(dz_ptr.dtype.element_ty),
                 mask=mask_mn)


@triton.jit
def colsum_tile(a_base, offs_a, start, end, colsum, NA: tl.constexpr, BLOCK_A: tl.constexpr,
                 BLOCK_CELLS: tl.constexpr):
    """``colsum + sum_{cell in [start, end)} a[cell, offs_a]`` in fp32: a weight-gradient tile's bias gradient, in its
    own pass after the GEMM and only in the programs that store it (one of each row of tiles). Summed inside the GEMM
    loop it cost every program a cross-warp reduction per k-step (8 more barriers, 32 shuffles, 64 FADDs and up to
    48 more registers in the sm_90 SASS, 2026-11-28). Each thread adds up its elements over the cells first, one
    reduction at the end: a fixed order, deterministic."""
    CELLS: tl.constexpr = min(BLOCK_CELLS, 32)  # a (32, BLOCK_A) fp32 partial: few registers at 128-row tiles
    offs_l = tl.arange(0, CELLS)
    part = tl.zeros((CELLS, BLOCK_A), dtype=tl.float32)
    for l0 in range(start, end, CELLS):
        offs_cell = l0 + offs_l
        part += tl.load(a_base + offs_cell[:, None] * NA + offs_a[None, :], mask=(offs_cell < end)[:, None],
                        other=0.0).to(tl.float32)
    return colsum + tl.sum(part, axis=0)


@triton.jit
def wgrad_tile_ids(pid_a, pid_tb, pid_sm, S, NB: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                   BLOCK_CELLS: tl.constexpr):
    """What a weight-gradient program of the grid ``(NA / BLOCK_A, T * NB / BLOCK_B, N_MAT * S)`` owns: its tap,
    column tile, split and matrix, and the row, column and cell offsets of its tile (``pid_tb`` is
    ``tap * NB / BLOCK_B + pid_b``, ``pid_sm`` is ``mat * S + s``): :func:`wgrad_tile`'s and
    ``nca_step_bwd``'s weight-gradient kernel's."""
    B_TILES: tl.constexpr = NB // BLOCK_B
    tap = pid_tb // B_TILES
    pid_b = pid_tb % B_TILES
    s = pid_sm % S
    mat = pid_sm // S
    offs_a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_l = tl.arange(0, BLOCK_CELLS)
    return tap, pid_b, s, mat, offs_a, offs_b, offs_l


@triton.jit
def wgrad_tile(
    pid_a,  # tile index over NA
    pid_tb,  # tap * (NB / BLOCK_B) + tile index over NB
    pid_sm,  # int64 mat * S + split
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
    stride_dw_s,  # elements between two splits' partials in dw (N_MAT * T * NA * NB when dw is its own buffer)
    stride_db_s,  # elements between two splits' partials in db (N_MAT * NA)
    NA: tl.constexpr,
    NB: tl.constexpr,
    T: tl.constexpr,  # 9 taps when GATHER, else 1
    GATHER: tl.constexpr,  # b is the state read at the 3x3 tap's shifted cells (zero padding)
    SHIFT,  # 1: the gathered state is at half resolution, read (row >> 1, col >> 1); constexpr or runtime
    WITH_DB: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    BLOCK_A: tl.constexpr,  # rows of the dW tile (over NA)
    BLOCK_B: tl.constexpr,  # columns of the dW tile (over NB)
    BLOCK_CELLS: tl.constexpr,  # cells per step of the reduction
    ACCUMULATE: tl.constexpr,  # add to the partials already in dw / db (a rollout's earlier steps) instead of
    # overwriting them; each slot has one writer per launch and launches run in order: deterministic
    MAGIC_DIV: tl.constexpr,  # the gather's divisions by H * W and W as multiply-highs (utils.udiv)
):
    """Partial weight gradients ``dW[s, mat, tap] = a[cells of s]^T @ b_tap[cells of s]`` and ``db[s, mat]``.

    Called for one program of a grid ``(NA / BLOCK_A, T * NB / BLOCK_B, N_MAT * S)``; it owns one
    ``(BLOCK_A, BLOCK_B)`` tile of one
    tap of one matrix and reduces it over the cells ``[s * cells_per_split, (s + 1) * cells_per_split)``. The
    tap-0, column-0 programs also write the column sums of a (the bias gradient). Partials are fp32 and summed
    over s by the caller in a fixed order: deterministic, no atomics. With GATHER,
    ``b_tap[cell] = z[row + ky - 1, col + kx - 1]`` (tap = 3 ky + kx, zero outside the grid), so the partials of
    the perception weight are ``dWp[o, c, ky, kx] = sum_cells dpre[cell, o] z[cell + (ky - 1, kx - 1), c]``.
    """
    tap, pid_b, s, mat, offs_a, offs_b, offs_l = wgrad_tile_ids(pid_a, pid_tb, pid_sm, S, NB, BLOCK_A, BLOCK_B,
                                                                 BLOCK_CELLS)
    a_base = a_ptr + mat * M * NA
    b_base = b_ptr + mat * M * NB
    if GATHER:
        H_in = H >> SHIFT
        W_in = W >> SHIFT
        hw = H * W
        dr = tap // 3 - 1
        dc = tap % 3 - 1
        if MAGIC_DIV:
            m_hw, l_hw = udiv_magic(hw)
            m_w, l_w = udiv_magic(W)

    start = s * cells_per_split
    end = tl.minimum(start + cells_per_split, M)
    if ACCUMULATE:  # the rollout's accumulator: split slots stride_dw_s / stride_db_s apart
        dw_tile = dw_ptr + s * stride_dw_s + ((mat * T + tap) * NA + offs_a[:, None]) * NB + offs_b[None, :]
        db_tile = db_ptr + s * stride_db_s + mat * NA + offs_a
    else:  # dense (S, N_MAT, T, NA, NB) partials (this indexing compiles without spills in every shipped config)
        slot = (s * N_MAT + mat) * T + tap
        dw_tile = dw_ptr + (slot * NA + offs_a[:, None]) * NB + offs_b[None, :]
        db_tile = db_ptr + (s * N_MAT + mat) * NA + offs_a
    if ACCUMULATE:
        acc = tl.load(dw_tile)
    else:
        acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for l0 in range(start, end, BLOCK_CELLS):
        offs_cell = l0 + offs_l  # int64 cell ids
        ok = offs_l < (end - l0).to(tl.int32)  # one int32 compare per row (as offs_cell < end: an int64 one)
        b_at = tl.load(a_base + offs_cell[None, :] * NA + offs_a[:, None], mask=ok[None, :], other=0.0)
        if GATHER:
            # cell ids fit int32 (B * H * W < 2**31); int64 divisions were calls of a ~70-instruction routine, 4 per
            # row per k-step (sm_90 SASS), uint32 ones ~8 instructions, multiply-highs (MAGIC_DIV) 3. Element
            # offsets stay int64.
            cell = offs_cell.to(tl.uint32)  # unsigned: no sign fix-ups around each division
            if MAGIC_DIV:
                bat = udiv(cell, m_hw, l_hw)
            else:
                bat = cell // hw.to(tl.uint32)
            rem = cell - bat * hw.to(tl.uint32)
            if MAGIC_DIV:
                r0 = udiv(rem, m_w, l_w)
            else:
                r0 = rem // W.to(tl.uint32)
            r = r0.to(tl.int32) + dr
            c = (rem - r0 * W.to(tl.uint32)).to(tl.int32) + dc
            bat = bat.to(tl.int32)
            ok_g = ok & (r >= 0) & (r < H) & (c >= 0) & (c < W)
            r = r // (1 << SHIFT)  # as r // 2 (its sm_90 fit under 3.8: r >> 1 spilled 16 B in one case)
            c = c // (1 << SHIFT)
            src = ((bat * H_in + r) * W_in + c).to(tl.int64)
            b_b = tl.load(b_ptr + src[:, None] * NB + offs_b[None, :], mask=ok_g[:, None], other=0.0)
        else:
            b_b = tl.load(b_base + offs_cell[:, None] * NB + offs_b[None, :], mask=ok[:, None], other=0.0)
        acc = mma(b_at, b_b, acc, INTERP_BF16, INPUT_PRECISION)
    tl.store(dw_tile, acc)
    if WITH_DB:
        if (pid_b == 0) & (tap == 0):
            if ACCUMULATE:
                colsum = tl.load(db_tile)
            else:
                colsum = tl.zeros((BLOCK_A,), dtype=tl.float32)
            tl.store(db_tile, colsum_tile(a_base, offs_a, start, end, colsum, NA, BLOCK_A, BLOCK_CELLS))


@triton.jit
def acc_wgrad_1x1_tile(
    q,  # program index over the 1x1 weights' tiles: [0, n_wo) output conv, then n_w1 of W1, then n_w1 of W2
    g_ptr, y_ptr, a_ptr, da_ptr, dy_ptr,  # (M, C) and (N_BLOCKS [+ 1], M, HID) per-cell buffers of the main kernel
    acc_ptr,  # (S_MAX, SLOT) fp32 rollout accumulator: per split, [dWp | dbp | dWout | dbout | dW1 | db1 | dW2 | db2]
    M, cells_per_split, S, SLOT, n_wo, n_w1,
    C: tl.constexpr, HID: tl.constexpr, N_BLOCKS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    INTERP_BF16: tl.constexpr, BA_O: tl.constexpr, BB_O: tl.constexpr, BA_H: tl.constexpr, BLOCK_CELLS: tl.constexpr,
):
    """One tile of the output conv's or a block's 1x1 weight gradient over M rows, added to its slot of the rollout's
    accumulator: the 1x1 part of the rollout's post kernel, over one step's rows (or several steps' rows that lie
    back to back)."""
    OFF_WO: tl.constexpr = 9 * HID * C + HID
    OFF_DBO: tl.constexpr = OFF_WO + C * HID
    OFF_W1: tl.constexpr = OFF_DBO + C
    OFF_DB1: tl.constexpr = OFF_W1 + N_BLOCKS * HID * HID
    OFF_W2: tl.constexpr = OFF_DB1 + N_BLOCKS * HID
    OFF_DB2: tl.constexpr = OFF_W2 + N_BLOCKS * HID * HID
    if q < n_wo:  # dWout = sum g^T y_nb
        GA: tl.constexpr = C // BA_O
        GTB: tl.constexpr = HID // BB_O
        wgrad_tile(q % GA, (q // GA) % GTB, (q // (GA * GTB)).to(tl.int64), g_ptr, y_ptr + N_BLOCKS * M * HID,
                    acc_ptr + OFF_WO, acc_ptr + OFF_DBO, M, 1, 1, cells_per_split, S, 1, SLOT, SLOT, C, HID, 1,
                    False, 0, True, INPUT_PRECISION, INTERP_BF16, BA_O, BB_O, BLOCK_CELLS, True, False)
    elif N_BLOCKS > 0:
        q = q - n_wo
        GA: tl.constexpr = HID // BA_H
        GTB: tl.constexpr = HID // BA_H
        qq = q % n_w1
        if q < n_w1:  # dW1_i = sum da_i^T y_i
            wgrad_tile(qq % GA, (qq // GA) % GTB, (qq // (GA * GTB)).to(tl.int64), da_ptr, y_ptr,
                        acc_ptr + OFF_W1, acc_ptr + OFF_DB1, M, 1, 1, cells_per_split, S, N_BLOCKS, SLOT, SLOT,
                        HID, HID, 1, False, 0, True, INPUT_PRECISION, INTERP_BF16, BA_H, BA_H,
                        BLOCK_CELLS, True, False)
        else:  # dW2_i = sum dy_{i+1}^T ELU(a_i)
            wgrad_tile(qq % GA, (qq // GA) % GTB, (qq // (GA * GTB)).to(tl.int64), dy_ptr, a_ptr,
                        acc_ptr + OFF_W2, acc_ptr + OFF_DB2, M, 1, 1, cells_per_split, S, N_BLOCKS, SLOT, SLOT,
                        HID, HID, 1, False, 0, True, INPUT_PRECISION, INTERP_BF16, BA_H, BA_H,
                        BLOCK_CELLS, True, False)
