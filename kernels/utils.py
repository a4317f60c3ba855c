"""``@triton.jit`` helpers shared by the fused forward (``nca_step.py``) and backward (``nca_step_bwd.py``) kernels.

Triton inlines jit functions into the kernel that calls them, so the compiled code is the same as if each kernel
wrote them out (checked with the sm_90 fit: ``python -m tools.fit``).

Two constexpr flags work around interpreter defects (docs/KERNELS.md); both are False on the GPU (and under
``tiles.as_compiled()``: the launchers set them from ``tiles.interpreting()``):

- ``UPCAST_DOT``: the interpreter computes a bf16 ``tl.dot`` wrongly, so :func:`mma` upcasts its operands to fp32.
- ``EMULATE_RNE``: the interpreter truncates fp32 -> bf16 casts (checked with triton 3.8) where the GPU rounds to
  nearest even; truncation's one-sided error adds up over cells, so :func:`rne` rounds by hand before the cast.

Kernels pass one flag for both (``UPCAST_DOT`` in the forward, ``INTERP_BF16`` in the backward): interpreter and
bf16.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["cast_rne", "elu", "elu_grad", "k_major", "mma", "mma_first", "unchain", "perceive_conv3x3", "rne"]


def k_major(input_precision: str) -> bool:
    """Whether the kernels read their weights K-major: for tf32, whose wgmma takes fp32 operands from shared memory
    only K-major (N-major ones are copied 4 bytes at a time); bf16 wgmma reads either, "ieee" runs on FMA units."""
    return input_precision == "tf32"


def unchain(block_m: int, num_warps: int, tensor_cores: bool) -> bool:
    """Whether a tile's chained dots take :func:`mma_first`'s UNCHAIN: on the tensor cores (bf16, tf32) when the
    chained-dot layout ``[num_warps, 1]`` (16 rows per warp, 64 per warpgroup) covers more rows than the tile has,
    i.e. some warpgroup would repeat another's products (64 cells x 8 warps)."""
    return tensor_cores and block_m < 16 * num_warps


@triton.jit
def elu(x):
    """ELU with alpha = 1: x if x > 0 else exp(x) - 1."""
    # exp of the clamped value so the discarded branch never overflows
    return tl.where(x > 0, x, tl.exp(tl.minimum(x, 0.0)) - 1.0)


@triton.jit
def elu_grad(x):
    """elu'(x) = 1 if x > 0 else exp(x)."""
    return tl.where(x > 0, 1.0, tl.exp(tl.minimum(x, 0.0)))


@triton.jit
def elu_grad_from_out(e):
    """elu'(x) from e = ELU(x): 1 if e > 0 else e + 1 (= exp(x)); e in fp32."""
    return tl.where(e > 0, 1.0, e + 1.0)


@triton.jit
def udiv_magic(d):
    """(m, sh) such that ``udiv(n, m, sh) == n // d`` for every 0 <= n < 2**31 (1 <= d < 2**31): a divisor's
    multiplier, computed once per program (a scalar loop and one int64 division), so that a loop's divisions by a
    runtime value cost a multiply-high and a shift each instead of the ~8 instructions of a generic division.
    Granlund and Montgomery (1994), Theorem 4.2 with N = 31: sh = ceil(log2 d), m = ceil(2**(31 + sh) / d) < 2**32."""
    d64 = d.to(tl.int64)
    sh = d64 * 0
    while (d64 * 0 + 1) << sh < d64:
        sh += 1
    m = (((d64 * 0 + 1) << (31 + sh)) + d64 - 1) // d64
    return m.to(tl.uint32), sh.to(tl.uint32)


@triton.jit
def udiv(n, m, sh):
    """``n // d`` for uint32 0 <= n < 2**31, with ``(m, sh) = udiv_magic(d)``: floor(2 n m / 2**32) >> sh."""
    return tl.umulhi(n + n, m) >> sh


@triton.jit
def rne(x, EMULATE_RNE: tl.constexpr):
    """x (fp32), rounded to bf16's precision to nearest-even when EMULATE_RNE, so the cast that follows is exact."""
    if EMULATE_RNE:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x


@triton.jit
def cast_rne(x, dtype: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """x.to(dtype), fp32 -> bf16 rounded to nearest even also in the interpreter (see :func:`rne`)."""
    return rne(x, EMULATE_RNE).to(dtype)


@triton.jit
def mma(a, b, acc, UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation; UPCAST_DOT computes bf16 operands in fp32 (the interpreter's bf16 dot
    is wrong, see docs/KERNELS.md)."""
    if UPCAST_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def mma_first(a, b, bias_ptr, HAS_BIAS: tl.constexpr, UNCHAIN: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
              ELU_TO: tl.constexpr = None, elu_out=None):
    """a @ b (+ the bias chunk at ``bias_ptr`` when HAS_BIAS), fp32 ``(BLOCK_M, BLOCK_N)``: the first of two chained
    dots (its result, through an activation, is the second dot's operand). UNCHAIN: without Triton's chained-dot layout.
    ELU_TO, a dtype: the result through the activation, rounded to ELU_TO: ``ELU(t)`` (the forward), or with
    ``elu_out`` (``ELU(x)`` of the same chunk, as kept by the forward) the backward's ``t * ELU'(x)``.

    Triton (3.6 and 3.8: ``warpsPerTileV3`` in AccelerateMatmul) lays out a dot whose result reaches another dot
    (its forward slice) as ``[num_warps, 1]``: on 64-row tiles with 8 warps both warpgroups then compute the same
    64 rows. The slice stops at a region's terminator, so under UNCHAIN the dot is issued inside a branch the
    compiler cannot fold (``program_id >= 0``, always true): its result leaves through the branch's yield, the dot
    gets the default layout (8 warps on 64 rows: ``[4, 2]``, each warpgroup its own half of the columns) and
    reaches the consuming dot through a layout conversion. The bias is read inside the branch too (outside, the
    loop pipeliner turned its load into 4-byte cp.async copies), and so is the activation: outside, the compiler
    converted the fp32 result to each consumer's layout (the second dot's operand, replicated over both
    warpgroups, and the store of the activations) and computed the ELU on every copy, 3x the exponentials (sm_90
    SASS of the forward that keeps activations, bf16 h = 256: 24 instead of 8 per thread per chunk). The sm_90 fit
    tests assert the tensor work.
    """
    if UNCHAIN:
        if tl.program_id(0) >= 0:
            t = mma(a, b, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), UPCAST_DOT, INPUT_PRECISION)
            if HAS_BIAS:
                t += tl.load(bias_ptr + tl.arange(0, BLOCK_N))[None, :]
            t = _act(t, ELU_TO, elu_out, UPCAST_DOT)
        else:
            if ELU_TO is not None:
                t = tl.zeros((BLOCK_M, BLOCK_N), dtype=ELU_TO)
            else:
                t = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        t = mma(a, b, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), UPCAST_DOT, INPUT_PRECISION)
        if HAS_BIAS:
            t += tl.load(bias_ptr + tl.arange(0, BLOCK_N))[None, :]
        t = _act(t, ELU_TO, elu_out, UPCAST_DOT)
    return t


@triton.jit
def _act(t, ELU_TO: tl.constexpr, elu_out, UPCAST_DOT: tl.constexpr):
    """mma_first's activation: t unchanged (no ELU_TO), ELU(t) or t * ELU'(x) from elu_out = ELU(x), rounded."""
    if ELU_TO is None:
        return t
    elif elu_out is None:
        return cast_rne(elu(t), ELU_TO, UPCAST_DOT)
    else:
        return cast_rne(t * elu_grad_from_out(elu_out.to(tl.float32)), ELU_TO, UPCAST_DOT)


@triton.jit
def perceive_conv3x3(
    z_ptr,  # (B, H_in, W_in, C) state, channels-last, compute dtype
    w3_ptr,  # (9, C, HID) perception weight, [tap, c, o] = Wp[o, c, ky, kx], tap = 3 ky + kx
    b3_ptr,  # (HID,) fp32 perception bias (read only when HAS_B3)
    bat,  # (BLOCK_M,) batch index of each output cell
    row,  # (BLOCK_M,) row of each output cell on the (doubled) grid
    col,  # (BLOCK_M,) column of each output cell on the (doubled) grid
    mask_m,  # (BLOCK_M,) which cells exist (the last program's tail is masked)
    H,  # grid height (doubled when SHIFT is 1)
    W,  # grid width (doubled when SHIFT is 1)
    H_in,  # height of the state (H // 2 when SHIFT is 1, else H)
    W_in,  # width of the state
    C: tl.constexpr,  # |z|
    HID: tl.constexpr,  # h (a power of two)
    SHIFT,  # 1: the state is doubled first (read through (row >> 1, col >> 1)), 0: not; constexpr or runtime
    HAS_B3: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,  # state-channel chunk (divides C)
    UPCAST_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    W_KMAJOR: tl.constexpr,  # w3 is (9, HID, C), [tap, o, c] (tf32: wgmma takes only K-major fp32 operands)
):
    """The perception conv's pre-activation for ``BLOCK_M`` cells, an fp32 ``(BLOCK_M, HID)`` tensor:

        pre = sum_{tap, c-chunk} z[shifted cells, c-chunk] @ W3[tap, c-chunk, :] (+ b3)     (zero padding)

    One pipelined loop over 9 taps x ``C / BLOCK_C`` chunks; each iteration loads the cells' neighbours for that
    tap with a shifted, masked load (masked = zero padding; the re-reads of neighbours hit cache). The caller
    applies the ELU if the network has one here.
    """
    offs_c = tl.arange(0, BLOCK_C)
    offs_h = tl.arange(0, HID)
    C_CHUNKS: tl.constexpr = C // BLOCK_C
    acc = tl.zeros((BLOCK_M, HID), dtype=tl.float32)
    for it in range(9 * C_CHUNKS):
        tap = it // C_CHUNKS
        c0 = (it % C_CHUNKS) * BLOCK_C
        r = row + (tap // 3 - 1)
        c = col + (tap % 3 - 1)
        ok = mask_m & (r >= 0) & (r < H) & (c >= 0) & (c < W)
        r = r >> SHIFT  # a constant 0 folds away; negative rows and columns are masked (ok)
        c = c >> SHIFT
        src = (bat * H_in + r) * W_in + c  # (BLOCK_M,) input cell ids; out-of-grid ones are masked
        b_z = tl.load(z_ptr + src[:, None] * C + (c0 + offs_c)[None, :], mask=ok[:, None], other=0.0)
        if W_KMAJOR:  # the (BLOCK_C, HID) tile with its K (c) contiguous: 16-byte copies into shared memory
            b_w = tl.load(w3_ptr + (tap * HID + offs_h)[None, :] * C + (c0 + offs_c)[:, None])
        else:
            b_w = tl.load(w3_ptr + (tap * C + c0 + offs_c)[:, None] * HID + offs_h[None, :])
        acc = mma(b_z, b_w, acc, UPCAST_DOT, INPUT_PRECISION)
    if HAS_B3:
        acc += tl.load(b3_ptr + offs_h)[None, :]
    return acc
