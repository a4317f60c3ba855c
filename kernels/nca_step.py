"""Fused forward NCA step: ``z' = z + m * f(z)`` in one Triton launch, with its autograd wrapper and custom op.

Layout: the state is ``(B, C, H, W)`` at the API and channels-last in memory (``torch.channels_last``,
physically ``(B, H, W, C)``); the output is channels-last too. The update network f is described in
``kernels/reference.py``: a 3x3 perception conv with zero padding (|z| -> h), an ELU only when there are no
residual blocks, ``n_blocks`` residual 1x1 blocks ``y + W2 ELU(W1 y + b1) + b2`` and an output 1x1 conv
(h -> |z|).

One program computes the whole step for ``BLOCK_M`` consecutive cells (flattened over B, H, W): the state
is read through nine shifted, masked loads (the neighbours' re-reads hit cache), all activations stay in
registers / shared memory, the weights stream from L2 in the compute dtype, and the new state is written
once. With ``double=True`` the input is the half-resolution state, read through the nearest-neighbour map
``(row // 2, col // 2)``, so the doubled state never exists in memory.

Dtype policy: the state is fp32 or bf16; the weights (fp32 or bf16) are packed once per call into the state's
dtype, biases into fp32. Dots accumulate in fp32 (fp32 operands with ``input_precision`` "ieee" or "tf32").
The residual stream ``y`` stays in fp32 registers; it is rounded to the compute dtype only as a dot operand.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .checks import SUPPORTED_CHANNELS, check_inputs
from .launch import launch_fitting, on_input_device, smaller_tiles
from .nca_step_bwd import nca_step_bwd
from .reference import UpdateWeights
from .spec import KernelSpec
from .stages import step_cells
from .tiles import StepConfig, interpreting, padded_hidden, step_config
from .utils import k_major, unchain

__all__ = [
    "SUPPORTED_CHANNELS",
    "StepConfig",
    "fwd_constexprs",
    "fwd_k_major",
    "fwd_kernel",
    "fwd_kernel_spec",
    "fwd_weight_args",
    "forget_packed_weights",
    "nca_step",
    "nca_step_fwd",
    "pack_weights",
    "step_config",
]




# --------------------------------------------------------------------------------------------------- kernel
@triton.jit
def _nca_step_fwd_kernel(
    z_ptr,  # (B, H_in, W_in, C) input state, channels-last, compute dtype
    out_ptr,  # (B, H, W, C) output state, channels-last, compute dtype
    mask_ptr,  # (B, H, W) uint8 update mask (read only when HAS_MASK)
    w3_ptr,  # (9, C, HID) perception weight [tap, c, o], compute dtype; W_KMAJOR: (9, HID, C) [tap, o, c]
    b3_ptr,  # (HID,) fp32 perception bias (read only when HAS_B3)
    w1_ptr,  # (N_BLOCKS, HID, HID) first 1x1 of each block, [blk, k, n] = W1[n, k]; W_KMAJOR: [blk, n, k]
    b1_ptr,  # (N_BLOCKS, HID) fp32 (zeros for a block without bias)
    w2_ptr,  # (N_BLOCKS, HID, HID) second 1x1 of each block, [blk, k, n] = W2[n, k]; W_KMAJOR: [blk, n, k]
    b2_ptr,  # (N_BLOCKS, HID) fp32
    wout_ptr,  # (HID, C) output 1x1, [k, n] = Wout[n, k], compute dtype; W_KMAJOR: (C, HID), [n, k]
    bout_ptr,  # (C,) fp32 output bias (read only when HAS_BOUT)
    acts_ptr,  # out (2 N_BLOCKS + 1, M, HID), written only when STORE_ACTS: y_0 .. y_nb, then u_0 .. u_{nb-1}
    M,  # number of output cells B * H * W
    H,  # output grid height
    W,  # output grid width
    C: tl.constexpr,  # |z|
    HID: tl.constexpr,  # h
    N_BLOCKS: tl.constexpr,
    DOUBLE: tl.constexpr,  # read the (B, H/2, W/2, C) input through (row // 2, col // 2)
    HAS_MASK: tl.constexpr,
    HAS_B3: tl.constexpr,
    HAS_B1: tl.constexpr,
    HAS_B2: tl.constexpr,
    HAS_BOUT: tl.constexpr,
    PERCEIVE_ELU: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,  # "ieee" or "tf32" for fp32 operands
    UPCAST_DOT: tl.constexpr,  # interpreter + bf16 only: dots in fp32, fp32 -> bf16 rounding emulated (RNE)
    W_KMAJOR: tl.constexpr,  # weights packed K-major (tf32: wgmma reads fp32 operands K-major only)
    UNCHAIN: tl.constexpr,  # the blocks' first dot without the chained-dot layout (utils.mma_first)
    STORE_ACTS: tl.constexpr,  # keep the activations for the backward (see stages.step_cells)
    BLOCK_M: tl.constexpr,  # cells per program
    BLOCK_K: tl.constexpr,  # K chunk of the 3x3 conv (over C) and hidden chunk of the residual blocks
    BLOCK_N: tl.constexpr,  # output channels per chunk of the output conv
):
    """One NCA step for ``BLOCK_M`` cells.

    Grid: ``(cdiv(B * H * W, BLOCK_M),)``; program ``pid`` owns output cells ``pid * BLOCK_M + [0, BLOCK_M)`` in
    (B, H, W) row-major order and computes, entirely on chip:

        y   = sum_{tap, k-chunk} z[shifted cells, k-chunk] @ W3[tap, k-chunk, :] (+ b3)    (zero padding)
        y   = ELU(y)                                   if PERCEIVE_ELU
        y   = y + sum_j ELU(y @ W1[:, j] + b1[j]) @ W2[j, :] + b2     per block, j over BLOCK_K hidden chunks
        z'[:, n] = z[:, n] + m * (y @ Wout[:, n] + bout[n])            per BLOCK_N output chunk n

    Dtypes: operands in the state's dtype (fp32 or bf16), every accumulation and the residual stream in fp32,
    one rounding to the state's dtype on store.
    """
    pid = tl.program_id(0).to(tl.int64)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # int64 cell ids
    step_cells(z_ptr, out_ptr, mask_ptr, w3_ptr, b3_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, wout_ptr, bout_ptr,
                acts_ptr, (pid * 0 + M) * HID, offs_m, offs_m < M, H, W, C, HID, N_BLOCKS, 1 if DOUBLE else 0,
                HAS_MASK, HAS_B3, HAS_B1, HAS_B2, HAS_BOUT, PERCEIVE_ELU, INPUT_PRECISION, UPCAST_DOT, W_KMAJOR,
                UNCHAIN, STORE_ACTS, BLOCK_M, BLOCK_K, BLOCK_N)


# ------------------------------------------------------------------------------------------------- launcher
# The kernel by a public name, for the rollout's launches (its own name is the one profiles and launch counts show)
fwd_kernel = _nca_step_fwd_kernel


def fwd_candidates(cfg: StepConfig, keep_cells: bool = False) -> list[StepConfig]:
    """``cfg``, then smaller tiles for GPUs with less shared memory than the H100 (``launch.smaller_tiles``): fewer
    stages, then narrower output-channel chunks, then (unless ``keep_cells``: the small-grid kernel, whose programs
    own whole samples) fewer cells per program. Compiled for sm_86 (99 KiB per block; ``python -m
    tools.fit --only small-smem``), the 256-channel forwards fit at 1 stage (bf16, 96 KiB), with 32-wide
    output chunks (fp32 "ieee", 96 KiB) or with 16-wide ones on 32 cells (tf32, 68 KiB)."""
    return smaller_tiles(cfg, "num_stages", ("block_n",) if keep_cells else ("block_n", "block_m"))


def fwd_k_major(input_precision: str) -> bool:
    """Whether the forward reads K-major weights (``utils.k_major``: tf32)."""
    return k_major(input_precision)


def fwd_weight_args(p: dict[str, Tensor | None], k_major: bool) -> dict[str, Tensor]:
    """The forward kernels' weight and bias arguments from a pack (``pack_weights``; ``k_major`` needs its K-major
    copies); absent biases and blocks point at any valid buffer (their constexpr flags keep them unread)."""
    dummy = p["w3"]
    k = "k" if k_major else ""

    def ptr(name: str) -> Tensor:
        t = p[name]
        return dummy if t is None else t

    return {"w3_ptr": ptr("w3" + k), "b3_ptr": ptr("b3"), "w1_ptr": ptr("w1" + k), "b1_ptr": ptr("b1"),
            "w2_ptr": ptr("w2" + k), "b2_ptr": ptr("b2"), "wout_ptr": ptr("wout" + k), "bout_ptr": ptr("bout")}


def fwd_constexprs(c: int, hp: int, n_blocks: int, *, double: bool, has_mask: bool, has_b3: bool, has_b1: bool,
                   has_b2: bool, has_bout: bool, input_precision: str, upcast_dot: bool, dtype: torch.dtype,
                   cfg: StepConfig, store_acts: bool = False) -> dict[str, object]:
    """The forward kernel's constexprs: one builder for every launch and for the sm_90 fit spec."""
    return {
        "C": c, "HID": hp, "N_BLOCKS": n_blocks, "DOUBLE": bool(double), "HAS_MASK": has_mask, "HAS_B3": has_b3,
        "HAS_B1": has_b1, "HAS_B2": has_b2, "HAS_BOUT": has_bout, "PERCEIVE_ELU": n_blocks == 0,
        "INPUT_PRECISION": input_precision, "UPCAST_DOT": upcast_dot, "W_KMAJOR": fwd_k_major(input_precision),
        "UNCHAIN": unchain(cfg.block_m, cfg.num_warps, dtype == torch.bfloat16 or input_precision == "tf32"),
        "STORE_ACTS": bool(store_acts), "BLOCK_M": cfg.block_m, "BLOCK_K": cfg.block_k, "BLOCK_N": cfg.block_n,
    }


def fwd_kernel_spec(
    state_channels: int,
    hidden_channels: int,
    n_blocks: int,
    dtype: torch.dtype,
    *,
    input_precision: str = "ieee",
    bias: bool = True,
    out_bias: bool = True,
    double: bool = False,
    mask: bool = False,
    store_acts: bool = False,
    config: StepConfig | None = None,
) -> KernelSpec:
    """The forward kernel as ``nca_step_fwd`` launches it on the GPU for these shapes (for the sm_90 fit,
    ``tools/fit.py``); ``store_acts``: as the rollout launches it to keep the activations; ``config`` overrides the
    shipped tiling."""
    cfg = config or step_config(state_channels, hidden_channels, dtype, input_precision=input_precision,
                                store_acts=store_acts, interpret=False)
    t = "*bf16" if dtype == torch.bfloat16 else "*fp32"
    pointers = {"z_ptr": t, "out_ptr": t, "mask_ptr": "*u8", "w3_ptr": t, "b3_ptr": "*fp32", "w1_ptr": t,
                "b1_ptr": "*fp32", "w2_ptr": t, "b2_ptr": "*fp32", "wout_ptr": t, "bout_ptr": "*fp32", "acts_ptr": t}
    constexprs = fwd_constexprs(state_channels, padded_hidden(hidden_channels), n_blocks, double=double,
                                has_mask=mask, has_b3=bias, has_b1=bias and n_blocks > 0,
                                has_b2=bias and n_blocks > 0, has_bout=out_bias, input_precision=input_precision,
                                upcast_dot=False, dtype=dtype, cfg=cfg, store_acts=store_acts)
    signature = {**pointers, "M": "i32", "H": "i32", "W": "i32", **{k: "constexpr" for k in constexprs}}
    return KernelSpec("fwd-store" if store_acts else "fwd", _nca_step_fwd_kernel, signature, constexprs,
                      cfg.num_warps, cfg.num_stages)


def _stack(ts: list[Tensor | None], shape: tuple[int, ...], device: torch.device) -> Tensor:
    """Biases of the blocks as one fp32 tensor, zeros where a block has none."""
    return torch.stack([torch.zeros(shape, device=device) if t is None else t.detach().float() for t in ts])


def pack_weights(weights: UpdateWeights, dtype: torch.dtype, *, k_major: bool = False) -> dict[str, Tensor | None]:
    """The kernels' contiguous weight buffers in ``dtype``; biases in fp32; h zero-padded to a power of 2.

    Returns:
        ``w3 (9, C, hp)`` with ``[tap, c, o]``, ``b3 (hp,)``, ``w1 / w2 (n_blocks, hp, hp)`` with
        ``[blk, k, n] = W[n, k]``, ``b1 / b2 (n_blocks, hp)``, ``wout (hp, C)``, ``bout (C,)``; absent biases and
        empty block stacks are None. With ``k_major`` also the forward's K-major copies (tf32, see
        :func:`fwd_k_major`): ``w3k (9, hp, C)`` ``[tap, o, c]``, ``w1k / w2k`` ``[blk, n, k]``, ``woutk (C, hp)``.
    """
    c, h, nb = weights.state_channels, weights.hidden_channels, weights.n_blocks
    hp = padded_hidden(h)
    pad = hp - h
    dev = weights.w_perceive.device

    def padded(t: Tensor, widths: tuple[int, ...]) -> Tensor:  # no copy when there is nothing to pad
        return torch.nn.functional.pad(t, widths) if pad else t

    w3 = weights.w_perceive.detach().to(dtype).permute(2, 3, 1, 0).reshape(9, c, h)  # [ky*3+kx, k, n]
    out: dict[str, Tensor | None] = {
        "w3": padded(w3, (0, pad)).contiguous(),
        "b3": None if weights.b_perceive is None else padded(weights.b_perceive.detach().float(), (0, pad)),
        "wout": padded(weights.w_out.detach().to(dtype)[:, :, 0, 0].t(), (0, 0, 0, pad)).contiguous(),
        "bout": None if weights.b_out is None else weights.b_out.detach().float().contiguous(),
        "w1": None, "b1": None, "w2": None, "b2": None,
    }
    if nb:
        for i, name in ((0, "w1"), (2, "w2")):
            w = torch.stack([blk[i].detach() for blk in weights.blocks]).to(dtype)[:, :, :, 0, 0]  # (nb, n, k)
            out[name] = padded(w.transpose(1, 2), (0, pad, 0, pad)).contiguous()  # (nb, k, n)
        for i, name in ((1, "b1"), (3, "b2")):
            bs = [blk[i] for blk in weights.blocks]
            if any(b is not None for b in bs):
                out[name] = padded(_stack(bs, (h,), dev), (0, pad)).contiguous()
    if k_major:
        out["w3k"] = out["w3"].transpose(1, 2).contiguous()
        out["woutk"] = out["wout"].t().contiguous()
        for name in ("w1", "w2"):
            out[name + "k"] = None if out[name] is None else out[name].transpose(1, 2).contiguous()
    return out


class _PackCache:
    """The last packed weights, reused while the very same tensors are unmodified.

    A rollout runs 40-128 steps with one set of weights; packing is ~10 small launches, as costly as the fused
    step itself on the early 2x2..8x8 grids. Entries are checked by identity (weak references, so a freed tensor
    can never alias a new one at the same address) and by ``_version`` (bumped by every in-place update, e.g. the
    optimizer's).
    """

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.refs: list[weakref.ref | None] = []
        self.value: dict[str, Tensor | None] | None = None

    def get(self, weights: UpdateWeights, dtype: torch.dtype, k_major: bool = False) -> dict[str, Tensor | None]:
        flat = weights.flat()
        try:
            key = (dtype, tuple(None if t is None else t._version for t in flat))
        except RuntimeError:  # inference tensors have no version counter: do not cache them
            return pack_weights(weights, dtype, k_major=k_major)
        if (self.value is not None and key == self.key and len(self.refs) == len(flat)
                and (not k_major or "w3k" in self.value)
                and all((r is None and t is None) or (r is not None and r() is t) for r, t in zip(self.refs, flat))):
            return self.value
        value = pack_weights(weights, dtype, k_major=k_major)
        self.key, self.value = key, value
        self.refs = [None if t is None else weakref.ref(t) for t in flat]
        return value


_PACK_CACHE = _PackCache()


def forget_packed_weights() -> None:
    """Make the next fused step pack its weights again, even from unmodified tensors (CUDA graphs: a capture must
    record the packing itself, and a replay updates the parameters without bumping their version counters)."""
    _PACK_CACHE.key = None


def _packed(weights: UpdateWeights, dtype: torch.dtype, k_major: bool = False) -> dict[str, Tensor | None]:
    if torch.compiler.is_compiling():  # never reached in practice: the op is opaque to the compiler
        return pack_weights(weights, dtype, k_major=k_major)
    return _PACK_CACHE.get(weights, dtype, k_major)


@on_input_device
def nca_step_fwd(
    state: Tensor,
    weights: UpdateWeights,
    mask: Tensor | None = None,
    double: bool = False,
    *,
    input_precision: str = "ieee",
    config: StepConfig | None = None,
) -> Tensor:
    """Check, allocate and launch the fused step (no autograd).

    Args:
        state: ``(B, |z|, H, W)`` fp32 or bf16, channels-last (other layouts are made channels-last once);
            with ``double=True`` the half-resolution state.
        weights: the update network; fp32 or bf16, cast to the state's dtype.
        mask: ``(B, 1, H', W')`` 0/1 per output cell (bool, integer or float), or None: every cell updates.
        double: read the state through the nearest x2 map; the output is ``(B, |z|, 2H, 2W)``.
        input_precision: "ieee" or "tf32", for fp32 dots.
        config: override the shipped tiling (for fit/benchmark sweeps).

    Returns:
        ``(B, |z|, H', W')`` in the state's dtype, channels-last.
    """
    check_inputs(state, weights, mask, double, input_precision)
    b, c, h_in, w_in = state.shape
    h_out, w_out = (2 * h_in, 2 * w_in) if double else (h_in, w_in)
    num_cells = b * h_out * w_out
    dtype = state.dtype
    state = state.contiguous(memory_format=torch.channels_last)  # (B, H, W, C) in memory; no copy if already
    if mask is not None:
        mask = (mask != 0).to(torch.uint8).reshape(b, h_out, w_out).contiguous()  # (B, H, W) one byte per cell

    out = torch.empty((b, h_out, w_out, c), dtype=dtype, device=state.device).permute(0, 3, 1, 2)
    if num_cells == 0:
        return out
    cfg = config or step_config(c, weights.hidden_channels, dtype, input_precision=input_precision,
                                num_cells=num_cells)
    k_major = fwd_k_major(input_precision)
    p = _packed(weights, dtype, k_major)

    def launch(cfg: StepConfig) -> None:
        _nca_step_fwd_kernel[(triton.cdiv(num_cells, cfg.block_m),)](
            z_ptr=state, out_ptr=out, mask_ptr=p["w3"] if mask is None else mask, **fwd_weight_args(p, k_major),
            acts_ptr=out, M=num_cells, H=h_out, W=w_out,
            **fwd_constexprs(c, padded_hidden(weights.hidden_channels), weights.n_blocks, double=double,
                             has_mask=mask is not None, has_b3=p["b3"] is not None, has_b1=p["b1"] is not None,
                             has_b2=p["b2"] is not None, has_bout=p["bout"] is not None,
                             input_precision=input_precision, upcast_dot=interpreting() and dtype == torch.bfloat16,
                             dtype=dtype, cfg=cfg),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    launch_fitting(("fwd", cfg, c, weights.hidden_channels, weights.n_blocks, dtype, input_precision, double,
                    mask is not None, state.device), cfg, fwd_candidates, launch)
    return out


# ------------------------------------------------------------------------------------------- custom op
# Weights cross the op boundary as the present tensors of ``UpdateWeights.flat()`` plus one flag per entry:
# register_autograd does not take a list of optional tensors.
def _join(tensors: list[Tensor], present: list[bool]) -> UpdateWeights:
    it = iter(tensors)
    return UpdateWeights.from_flat([next(it) if p else None for p in present])


@torch.library.custom_op("fastnca::nca_step", mutates_args=())
def _nca_step_op(
    state: Tensor, tensors: list[Tensor], present: list[bool], mask: Optional[Tensor], double: bool,  # noqa: UP045
    input_precision: str,
) -> Tensor:
    """``fastnca::nca_step``: the fused forward as an opaque op for torch.compile."""
    return nca_step_fwd(state, _join(tensors, present), mask, double, input_precision=input_precision)


@_nca_step_op.register_fake
def _nca_step_fake(state, tensors, present, mask, double, input_precision):
    b, c, h, w = state.shape
    if double:
        h, w = 2 * h, 2 * w
    return state.new_empty((b, h, w, c)).permute(0, 3, 1, 2)  # channels-last, like the kernel's output


def _nca_step_setup_context(ctx, inputs, output) -> None:
    state, tensors, present, mask, double, input_precision = inputs
    ctx.save_for_backward(state, mask, *tensors)
    ctx.present = present
    ctx.double = double
    ctx.input_precision = input_precision


@torch.library.custom_op("fastnca::nca_step_backward", mutates_args=())
def _nca_step_bwd_op(
    state: Tensor, tensors: list[Tensor], present: list[bool], mask: Optional[Tensor], double: bool,  # noqa: UP045
    input_precision: str, grad_out: Tensor,
) -> list[Tensor]:
    """``fastnca::nca_step_backward``: the step's gradients, [state, *present weights], as an opaque op, so that
    torch.compile traces the backward graph without launching kernels on fake tensors."""
    grad_state, grad_weights = nca_step_bwd(state, _join(tensors, present), mask, double, grad_out.to(state.dtype),
                                            input_precision=input_precision)
    outs = [grad_state] + [g for g in grad_weights if g is not None]
    # A custom op's outputs may not share storage with its inputs or each other; the backward returns some
    # gradients as views of one buffer (e.g. the bias gradients), so those few small ones are copied.
    seen = {t.untyped_storage().data_ptr() for t in (state, grad_out, *tensors)}
    for i, g in enumerate(outs):
        ptr = g.untyped_storage().data_ptr()
        if ptr in seen:
            outs[i] = g = g.clone()
            ptr = g.untyped_storage().data_ptr()
        seen.add(ptr)
    return outs


@_nca_step_bwd_op.register_fake
def _nca_step_bwd_fake(state, tensors, present, mask, double, input_precision, grad_out):
    return [torch.empty_like(state)] + [torch.empty_like(t) for t in tensors]


def _nca_step_backward(ctx, grad_out):
    state, mask, *tensors = ctx.saved_tensors
    grads = _nca_step_bwd_op(state, list(tensors), ctx.present, mask, ctx.double, ctx.input_precision, grad_out)
    return grads[0], list(grads[1:]), None, None, None, None


_nca_step_op.register_autograd(_nca_step_backward, setup_context=_nca_step_setup_context)


def nca_step(
    state: Tensor,
    weights: UpdateWeights,
    mask: Tensor | None = None,
    double: bool = False,
    *,
    input_precision: str = "ieee",
) -> Tensor:
    """One fused NCA step ``z' = z + m * f(z)``, differentiable, traceable by torch.compile.

    Runs the fused Triton forward (the op ``torch.ops.fastnca.nca_step``) and, in backward, the fused Triton
    backward (``nca_step_bwd``: recompute on chip, then backprop). Works on CUDA tensors, and on CPU tensors in
    interpreter mode (``TRITON_INTERPRET=1``).

    Args:
        state: ``(B, |z|, H, W)`` fp32 or bf16, channels-last in memory (physically ``(B, H, W, |z|)``; other
            layouts are made channels-last once); with ``double=True`` the half-resolution state.
        weights: the update network (fp32 or bf16; cast to the state's dtype). |z| and h: multiples of 16
            from 16 to 256.
        mask: ``(B, 1, H', W')`` 0/1 per cell of the output grid (bool, integer or float), or None: every cell
            updates. Not differentiated.
        double: nearest-neighbour x2 upsampling of the state, fused into the step's reads.
        input_precision: "ieee" or "tf32" for fp32 dots (bf16 always accumulates in fp32).

    Returns:
        ``(B, |z|, H', W')`` in the state's dtype, channels-last; ``H' = 2H`` when doubling, else ``H``.
    """
    check_inputs(state, weights, mask, double, input_precision)
    flat = weights.flat()
    return _nca_step_op(state, [t for t in flat if t is not None], [t is not None for t in flat], mask, bool(double),
                        input_precision)
